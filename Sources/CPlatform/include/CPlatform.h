// Two system calls Swift's Glibc module does not offer: eventfd (its header is
// not in the module) and ppoll (behind _GNU_SOURCE), for the datapath's sleep.
#ifndef CPLATFORM_H
#define CPLATFORM_H
#include <poll.h>
#include <stdint.h>

/// A non-blocking, close-on-exec eventfd, or -1 with errno.
int CPlatform_eventfd(void);
/// ppoll(2) with a timeout in nanoseconds.
int CPlatform_ppoll(struct pollfd *fds, unsigned long count, uint64_t timeout_ns);
#endif
