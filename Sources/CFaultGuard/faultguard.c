#define _GNU_SOURCE
#include "CFaultGuard.h"

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>

#define SLOTS 1024

struct slot {
    _Atomic uintptr_t start;  // 0: free
    _Atomic uintptr_t end;    // exclusive
    _Atomic uintptr_t page;
    _Atomic uint64_t faults;
};

static struct slot slots[SLOTS];
static _Atomic uint64_t total;
static atomic_flag installed = ATOMIC_FLAG_INIT;
static struct sigaction previous;

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
    uintptr_t a = (uintptr_t)si->si_addr;
    for (int i = 0; i < SLOTS; i++) {
        uintptr_t s = atomic_load_explicit(&slots[i].start, memory_order_acquire);
        if (s == 0 || a < s || a >= atomic_load_explicit(&slots[i].end, memory_order_relaxed)) continue;
        uintptr_t page = atomic_load_explicit(&slots[i].page, memory_order_relaxed);
        void *at = (void *)(a & ~(page - 1));
        // mmap is async-signal-safe in practice (a plain system call). The page
        // now holds zeros the front-end cannot see: its memory is lost anyway.
        void *p = mmap(at, page, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) break;
        atomic_fetch_add_explicit(&slots[i].faults, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&total, 1, memory_order_release);
        return;  // the faulting access runs again, on the new page
    }
    // Not guest memory we guard: a real fault. Returning re-runs the access
    // under the handler we replaced (the default one: the process dies as it
    // would have).
    (void)uc;
    sigaction(sig, &previous, NULL);
}

int CFaultGuard_install(void) {
    if (atomic_flag_test_and_set(&installed)) return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous) != 0) {
        atomic_flag_clear(&installed);
        return errno;
    }
    return 0;
}

int CFaultGuard_register(void *start, size_t length, size_t page) {
    if (start == NULL || length == 0 || page == 0 || (page & (page - 1)) != 0) return -1;
    for (int i = 0; i < SLOTS; i++) {
        uintptr_t expected = 0;
        // Claim the slot with a placeholder start no address reaches (the top
        // of the space), then publish the real bounds: the handler never
        // matches half a slot.
        if (atomic_compare_exchange_strong(&slots[i].start, &expected, UINTPTR_MAX)) {
            atomic_store_explicit(&slots[i].end, (uintptr_t)start + length, memory_order_relaxed);
            atomic_store_explicit(&slots[i].page, page, memory_order_relaxed);
            atomic_store_explicit(&slots[i].faults, 0, memory_order_relaxed);
            atomic_store_explicit(&slots[i].start, (uintptr_t)start, memory_order_release);
            return i;
        }
    }
    return -1;
}

void CFaultGuard_unregister(int slot) {
    if (slot < 0 || slot >= SLOTS) return;
    atomic_store_explicit(&slots[slot].start, 0, memory_order_release);
    atomic_store_explicit(&slots[slot].end, 0, memory_order_relaxed);
}

uint64_t CFaultGuard_faults(int slot) {
    if (slot < 0 || slot >= SLOTS) return 0;
    return atomic_load_explicit(&slots[slot].faults, memory_order_relaxed);
}

uint64_t CFaultGuard_total(void) { return atomic_load_explicit(&total, memory_order_acquire); }
