#define _GNU_SOURCE
#include "CBenchCounters.h"
#include <dlfcn.h>
#include <stddef.h>
#include <stdlib.h>

static __thread uint64_t allocations;
static __thread uint64_t refcounts;

uint64_t CBenchCounters_allocations(void) { return allocations; }
uint64_t CBenchCounters_refcounts(void) { return refcounts; }

// glibc's own entry points, which its malloc/free wrap.
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

void *malloc(size_t n) { allocations++; return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { allocations++; return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { allocations++; return __libc_realloc(p, n); }
void free(void *p) { __libc_free(p); }
void *memalign(size_t a, size_t n) { allocations++; return __libc_memalign(a, n); }
void *aligned_alloc(size_t a, size_t n) { allocations++; return __libc_memalign(a, n); }
int posix_memalign(void **out, size_t a, size_t n) {
    allocations++;
    void *p = __libc_memalign(a, n);
    if (!p) return 12; /* ENOMEM */
    *out = p;
    return 0;
}

// The Swift runtime's, found on first use.
typedef void *(*retain_fn)(void *);
typedef void (*release_fn)(void *);
typedef void *(*retain_n_fn)(void *, uint32_t);
typedef void (*release_n_fn)(void *, uint32_t);
static retain_fn real_retain, real_bridge_retain;
static release_fn real_release, real_bridge_release;
static retain_n_fn real_retain_n;
static release_n_fn real_release_n;

#define RESOLVE(var, name) do { if (!var) var = dlsym(RTLD_NEXT, name); } while (0)

void *swift_retain(void *o) { refcounts++; RESOLVE(real_retain, "swift_retain"); return real_retain(o); }
void swift_release(void *o) { refcounts++; RESOLVE(real_release, "swift_release"); real_release(o); }
void *swift_retain_n(void *o, uint32_t n) { refcounts++; RESOLVE(real_retain_n, "swift_retain_n"); return real_retain_n(o, n); }
void swift_release_n(void *o, uint32_t n) { refcounts++; RESOLVE(real_release_n, "swift_release_n"); real_release_n(o, n); }
void *swift_bridgeObjectRetain(void *o) {
    refcounts++; RESOLVE(real_bridge_retain, "swift_bridgeObjectRetain"); return real_bridge_retain(o);
}
void swift_bridgeObjectRelease(void *o) {
    refcounts++; RESOLVE(real_bridge_release, "swift_bridgeObjectRelease"); real_bridge_release(o);
}
