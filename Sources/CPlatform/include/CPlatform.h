// Two system calls Swift's Glibc module does not offer: eventfd (its header is
// not in the module) and ppoll (behind _GNU_SOURCE), for the datapath's sleep;
// and the CPU's spin-wait hint, for locks that spin before they sleep.
#ifndef CPLATFORM_H
#define CPLATFORM_H
#include <poll.h>
#include <stdint.h>

/// A non-blocking, close-on-exec eventfd, or -1 with errno.
int CPlatform_eventfd(void);
/// ppoll(2) with a timeout in nanoseconds.
int CPlatform_ppoll(struct pollfd *fds, unsigned long count, uint64_t timeout_ns);
/// The spin-wait hint (x86 `pause`): a spinning thread yields the core's
/// pipeline to its sibling and leaves the memory-order machine alone.
static inline void CPlatform_spin_hint(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}
#endif
