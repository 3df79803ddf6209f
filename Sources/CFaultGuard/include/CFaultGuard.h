// A SIGBUS guard for guest memory that a vhost-user front-end passed as a
// file. If the front-end truncates that file, the datapath's next touch of a
// page past the new end raises SIGBUS, which would take down every device of
// every tenant. The handler maps anonymous memory over the lost page so the
// access completes (reading zeros), counts the fault against the region, and
// returns; the daemon then fails that front-end's queues and drops it. The
// hot path pays nothing: no check per access. A signal handler must be C
// (async-signal-safe, no Swift runtime), hence this shim.
#ifndef CFAULTGUARD_H
#define CFAULTGUARD_H

#include <stddef.h>
#include <stdint.h>

/// Installs the SIGBUS handler (idempotent); 0, or an errno value.
int CFaultGuard_install(void);

/// Guards [start, start+length), whose pages are `page` bytes (4096, or the
/// huge page size of a hugetlbfs file). Returns a slot, or -1 when all are taken.
int CFaultGuard_register(void *start, size_t length, size_t page);

/// Stops guarding a slot. Call before unmapping its memory.
void CFaultGuard_unregister(int slot);

/// Faults caught in a slot so far.
uint64_t CFaultGuard_faults(int slot);

/// Faults caught in any slot so far: one load tells a worker whether to look.
uint64_t CFaultGuard_total(void);

#endif
