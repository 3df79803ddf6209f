#define _GNU_SOURCE
#include "CPlatform.h"
#include <sys/eventfd.h>
#include <time.h>

int CPlatform_eventfd(void) { return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }

int CPlatform_ppoll(struct pollfd *fds, unsigned long count, uint64_t timeout_ns) {
    struct timespec ts = { .tv_sec = (time_t)(timeout_ns / 1000000000u), .tv_nsec = (long)(timeout_ns % 1000000000u) };
    return ppoll(fds, (nfds_t)count, &ts, NULL);
}
