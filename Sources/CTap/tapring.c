#define _GNU_SOURCE
#include "CTapRing.h"
#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <stdlib.h>

struct CTapRing {
    struct io_uring ring;
};

CTapRing *CTap_ring_new(unsigned entries) {
    CTapRing *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    int e = io_uring_queue_init(entries, &r->ring, 0);
    if (e < 0) {
        free(r);
        errno = -e;
        return NULL;
    }
    return r;
}

void CTap_ring_free(CTapRing *r) {
    if (!r) return;
    io_uring_queue_exit(&r->ring);
    free(r);
}

int CTap_ring_writev(CTapRing *r, int fd, const struct iovec *iov, int count, unsigned index) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -1;
    io_uring_prep_writev(sqe, fd, iov, (unsigned)count, 0);
    // Never wait for room: a full queue answers -EAGAIN at once (io_uring would
    // otherwise arm a poll and the burst would wait for the reader).
    sqe->rw_flags = RWF_NOWAIT;
    sqe->user_data = index;
    return 0;
}

int CTap_ring_run(CTapRing *r, int *results, unsigned queued) {
    if (queued == 0) return 0;
    int e = io_uring_submit_and_wait(&r->ring, queued);
    if (e < 0 && e != -EINTR) return e;
    unsigned done = 0;
    while (done < queued) {
        struct io_uring_cqe *cqe;
        e = io_uring_wait_cqe(&r->ring, &cqe);
        if (e == -EINTR) continue;
        if (e < 0) return e;
        if (cqe->user_data < queued) results[cqe->user_data] = cqe->res;
        io_uring_cqe_seen(&r->ring, cqe);
        done++;
    }
    return (int)done;
}

struct CTapPoller {
    struct io_uring ring;
    unsigned count;
    int fds[];
};

static int arm(CTapPoller *p, unsigned i) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&p->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_poll_multishot(sqe, p->fds[i], POLLIN);
    sqe->user_data = i;
    return 0;
}

CTapPoller *CTap_poller_new(const int *fds, unsigned count) {
    CTapPoller *p = calloc(1, sizeof *p + count * sizeof(int));
    if (!p) return NULL;
    p->count = count;
    for (unsigned i = 0; i < count; i++) p->fds[i] = fds[i];
    struct io_uring_params params = {0};
    params.flags = IORING_SETUP_CQSIZE;
    params.cq_entries = 1024;
    int e = io_uring_queue_init_params(count < 8 ? 8 : count, &p->ring, &params);
    if (e < 0) { free(p); errno = -e; return NULL; }
    for (unsigned i = 0; i < count; i++) arm(p, i);
    e = io_uring_submit(&p->ring);
    if (e < 0) { io_uring_queue_exit(&p->ring); free(p); errno = -e; return NULL; }
    return p;
}

void CTap_poller_free(CTapPoller *p) {
    if (!p) return;
    io_uring_queue_exit(&p->ring);
    free(p);
}

int CTap_poller_reap(CTapPoller *p, unsigned char *ready) {
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0, rearm = 0;
    // Completions the kernel kept aside when the ring was full end their multishot polls: a re-arm below.
    if (IO_URING_READ_ONCE(*p->ring.sq.kflags) & IORING_SQ_CQ_OVERFLOW) io_uring_get_events(&p->ring);
    io_uring_for_each_cqe(&p->ring, head, cqe) {
        unsigned i = (unsigned)cqe->user_data;
        if (i < p->count) {
            ready[i] = 1;
            if (!(cqe->flags & IORING_CQE_F_MORE)) { arm(p, i); rearm++; }
        }
        seen++;
    }
    io_uring_cq_advance(&p->ring, seen);
    if (rearm) {
        int e = io_uring_submit(&p->ring);
        if (e < 0) return e;
    }
    return (int)seen;
}
