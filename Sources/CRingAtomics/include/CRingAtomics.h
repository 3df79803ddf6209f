// Acquire/release accesses to ring indices in guest memory.
// Why a shim: Swift's Atomic needs storage it owns; ring indices live in
// shared guest memory, so the driver/device ordering (virtio 1.x, 2.7.13)
// is expressed with C11 atomics on raw pointers. All inline, no calls.
#ifndef CRINGATOMICS_H
#define CRINGATOMICS_H
#include <stdint.h>

/// Reads a 16-bit index with acquire ordering (ring entries after it are visible).
static inline uint16_t CRingAtomics_load_acquire_u16(const void *p) {
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}

/// Publishes a 16-bit index with release ordering (entries written before it are visible first).
static inline void CRingAtomics_store_release_u16(void *p, uint16_t v) {
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

/// A 64-bit position (a frame ring's head or tail) read with acquire ordering.
static inline uint64_t CRingAtomics_load_acquire_u64(const void *p) {
    return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE);
}

/// A 64-bit position published with release ordering.
static inline void CRingAtomics_store_release_u64(void *p, uint64_t v) {
    __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE);
}

/// Sets bits in a byte of a log shared with another process (the dirty log);
/// returns the byte before. Release: the guest-memory write it records is
/// visible before the bit (a front-end that sees the bit copies the new data).
static inline uint8_t CRingAtomics_fetch_or_u8(void *p, uint8_t bits) {
    return __atomic_fetch_or((uint8_t *)p, bits, __ATOMIC_RELEASE);
}

/// Reads a byte of the dirty log (its bits, before deciding to set more).
static inline uint8_t CRingAtomics_load_relaxed_u8(const void *p) {
    return __atomic_load_n((const uint8_t *)p, __ATOMIC_RELAXED);
}

/// Asks for the cache line at `p` ahead of use (never faults, whatever `p` is).
static inline void CRingAtomics_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }

/// The same, for a line about to be written.
static inline void CRingAtomics_prefetch_write(const void *p) { __builtin_prefetch(p, 1, 3); }

/// Full fence: orders a store before a later load (EVENT_IDX checks).
static inline void CRingAtomics_fence_seq_cst(void) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/// Acquire fence.
static inline void CRingAtomics_fence_acquire(void) {
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
}

/// Release fence.
static inline void CRingAtomics_fence_release(void) {
    __atomic_thread_fence(__ATOMIC_RELEASE);
}
#endif
