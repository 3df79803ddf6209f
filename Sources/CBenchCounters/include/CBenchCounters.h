// Per-thread counts of heap allocations and Swift reference-count operations,
// for iotlb-bench only. Why a shim: proving "the hot path allocates nothing
// and does no reference counting" needs the real calls counted. Linked into
// the benchmark executable alone, where these definitions take precedence
// over libc's malloc family and the Swift runtime's retain/release.
#ifndef CBENCHCOUNTERS_H
#define CBENCHCOUNTERS_H
#include <stdint.h>

/// Allocations (malloc, calloc, realloc, aligned) made on the calling thread so far.
uint64_t CBenchCounters_allocations(void);
/// swift_retain / swift_release (and _n, bridge-object) calls on the calling thread so far.
uint64_t CBenchCounters_refcounts(void);
#endif
