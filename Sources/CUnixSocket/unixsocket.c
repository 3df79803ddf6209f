#define _GNU_SOURCE
#include "CUnixSocket.h"
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/eventfd.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdatomic.h>
#include <unistd.h>

static int fill_address(struct sockaddr_un *un, const char *path) {
    memset(un, 0, sizeof(*un));
    un->sun_family = AF_UNIX;
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof(un->sun_path)) { errno = ENAMETOOLONG; return -1; }
    memcpy(un->sun_path, path, n);
    return 0;
}

/// A close-on-exec stream socket with `un` filled for `path`, or -1 with errno.
static int open_socket(const char *path, struct sockaddr_un *un) {
    if (fill_address(un, path) < 0) return -1;
    return socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
}

/// Closes `fd` keeping the errno of the call that failed; returns -1.
static int fail_closing(int fd) {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
}

int cunixsock_listen(const char *path) {
    struct sockaddr_un un;
    int fd = open_socket(path, &un);
    if (fd < 0) return -1;
    if (bind(fd, (struct sockaddr *)&un, sizeof(un)) < 0 || listen(fd, 4) < 0) return fail_closing(fd);
    return fd;
}

int cunixsock_listen_mode(const char *path, unsigned mode, long gid, int backlog) {
    static atomic_uint counter;
    struct sockaddr_un un;
    int fd = open_socket(path, &un);
    if (fd < 0) return -1;
    char tmp[sizeof(un.sun_path)];
    const char *slash = strrchr(path, '/');
    int dirlen = slash ? (int)(slash - path + 1) : 0;
    int n = snprintf(tmp, sizeof(tmp), "%.*s.iotlbd-%d-%u.tmp", dirlen, path, (int)getpid(),
                     atomic_fetch_add(&counter, 1));
    int staged = n > 0 && (size_t)n < sizeof(tmp);
    struct sockaddr_un at;
    if (fill_address(&at, staged ? tmp : path) < 0) return fail_closing(fd);
    if (bind(fd, (struct sockaddr *)&at, sizeof(at)) < 0) return fail_closing(fd);
    const char *bound = staged ? tmp : path;
    if ((gid != -1 && chown(bound, (uid_t)-1, (gid_t)gid) < 0) || chmod(bound, mode) < 0 ||
        listen(fd, backlog) < 0 || (staged && rename(tmp, path) < 0)) {
        int e = errno;
        unlink(staged ? tmp : path);
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

int cunixsock_connect(const char *path) {
    struct sockaddr_un un;
    int fd = open_socket(path, &un);
    if (fd < 0) return -1;
    int r;
    do { r = connect(fd, (struct sockaddr *)&un, sizeof(un)); } while (r < 0 && errno == EINTR);
    if (r < 0) return fail_closing(fd);
    return fd;
}

int cunixsock_connect_nowait(const char *path) {
    struct sockaddr_un un;
    if (fill_address(&un, path) < 0) return -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&un, sizeof(un)) < 0) return fail_closing(fd);
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0) return fail_closing(fd);
    return fd;
}

int cunixsock_is_live(const char *path) {
    int fd = cunixsock_connect(path);
    if (fd < 0) return 0;
    close(fd);
    return 1;
}

#define MAX_FDS 64

ssize_t cunixsock_recv(int fd, void *buf, size_t len, int *fds, int maxfds, int *nfds) {
    union { char buf[CMSG_SPACE(MAX_FDS * sizeof(int))]; struct cmsghdr align; } control;
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof(control.buf);
    *nfds = 0;
    ssize_t r;
    do { r = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC); } while (r < 0 && errno == EINTR);
    if (r < 0) return -1;
    int got = 0, dropped = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *in = (int *)CMSG_DATA(c);
        for (size_t i = 0; i < n; i++) {
            int one;
            memcpy(&one, in + i, sizeof(int));
            if (got < maxfds) fds[got++] = one; else { close(one); dropped = 1; }
        }
    }
    *nfds = got;
    if (dropped || (msg.msg_flags & MSG_CTRUNC)) {
        for (int i = 0; i < got; i++) close(fds[i]);
        *nfds = 0;
        errno = EMSGSIZE;
        return -1;
    }
    return r;
}

ssize_t cunixsock_send(int fd, const void *buf, size_t len, const int *fds, int nfds) {
    union { char buf[CMSG_SPACE(MAX_FDS * sizeof(int))]; struct cmsghdr align; } control;
    if (nfds < 0 || nfds > MAX_FDS) { errno = EINVAL; return -1; }
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        memset(control.buf, 0, sizeof(control.buf));
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    }
    ssize_t r;
    do { r = sendmsg(fd, &msg, MSG_NOSIGNAL); } while (r < 0 && errno == EINTR);
    return r;
}

ssize_t cunixsock_send_nowait(int fd, const void *buf, size_t len) {
    ssize_t r;
    do { r = send(fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT); } while (r < 0 && errno == EINTR);
    return r;
}

int cunixsock_accept(int listen_fd) {
    int r;
    do { r = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC); } while (r < 0 && errno == EINTR);
    return r;
}

int cunixsock_eventfd(void) { return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }
