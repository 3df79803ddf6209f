// Batched TAP writes through io_uring (liburing): one system call for a burst
// of frames instead of one writev each. Not linked (a link costs a quarter of
// a write's time in task work): each write has its own result, in order.
#ifndef CTAPRING_H
#define CTAPRING_H
#include <stdint.h>
#include <sys/uio.h>

typedef struct CTapRing CTapRing;

/// A ring for up to `entries` writes in flight, or NULL with errno (ENOSYS
/// where the kernel has no io_uring, EPERM where a seccomp filter refuses it).
CTapRing *CTap_ring_new(unsigned entries);
void CTap_ring_free(CTapRing *ring);
/// Queues writev(fd, iov, count) with RWF_NOWAIT (-EAGAIN rather than a wait;
/// -EOPNOTSUPP where the file cannot); its result will be results[index] of
/// CTap_ring_run. -1 when the ring is full.
int CTap_ring_writev(CTapRing *ring, int fd, const struct iovec *iov, int count, unsigned index);
/// Submits what was queued and waits for all of it; results[i] is the i-th
/// write's byte count or -errno. Returns how many completed, or -errno.
int CTap_ring_run(CTapRing *ring, int *results, unsigned queued);

// Readiness of TAP queues without a system call per look: a multishot poll
// per descriptor posts a completion each time the queue becomes readable; the
// datapath reads the completion ring (shared memory) instead of trying an
// empty read() every round.
typedef struct CTapPoller CTapPoller;
/// Polls `count` descriptors for POLLIN, or NULL with errno.
CTapPoller *CTap_poller_new(const int *fds, unsigned count);
void CTap_poller_free(CTapPoller *poller);
/// Marks ready[i] = 1 for each descriptor that became readable since the last
/// call, re-arming a poll the kernel ended; returns the events seen (or -errno).
int CTap_poller_reap(CTapPoller *poller, unsigned char *ready);
#endif
