// Unix-domain stream sockets with file descriptors passed by SCM_RIGHTS
// (the vhost-user transport). The CMSG_* macros do not import into Swift,
// so the few calls that need them live here.
#ifndef CUNIXSOCKET_H
#define CUNIXSOCKET_H
#include <stddef.h>
#include <sys/types.h>

/// A listening socket bound to `path` (backlog 4, close-on-exec), or -1 with errno.
int cunixsock_listen(const char *path);
/// Like cunixsock_listen, with the socket file given `mode` and, when `gid`
/// is not -1, that group, before anyone can connect: it is bound under a
/// temporary name in the same directory, chmod/chown'ed, then renamed to
/// `path` (when the temporary name does not fit, bound at `path` and
/// chmod'ed at once). `backlog` as listen(2). -1 with errno on failure.
int cunixsock_listen_mode(const char *path, unsigned mode, long gid, int backlog);
/// A socket connected to `path` without blocking on a full backlog (EAGAIN
/// then), returned in blocking mode; -1 with errno.
int cunixsock_connect_nowait(const char *path);
/// A socket connected to `path`, or -1 with errno.
int cunixsock_connect(const char *path);
/// Receives up to `len` bytes and at most `maxfds` descriptors (close-on-exec).
/// Returns the bytes read (0 at end of stream) or -1 with errno; `*nfds` says how
/// many descriptors arrived. Descriptors beyond `maxfds` are closed and the call
/// fails with EMSGSIZE, so none leaks.
ssize_t cunixsock_recv(int fd, void *buf, size_t len, int *fds, int maxfds, int *nfds);
/// Sends `len` bytes with `nfds` descriptors; returns bytes sent or -1 with errno.
ssize_t cunixsock_send(int fd, const void *buf, size_t len, const int *fds, int nfds);
/// Sends `len` bytes without blocking: -1 with EAGAIN when the socket's
/// buffer is full (a front-end not reading its backend channel must not stall
/// the thread that serves its messages); else as `cunixsock_send`.
ssize_t cunixsock_send_nowait(int fd, const void *buf, size_t len);
/// Accepts a connection (close-on-exec), or -1 with errno.
int cunixsock_accept(int listen_fd);
/// A non-blocking, close-on-exec eventfd, or -1 with errno.
int cunixsock_eventfd(void);
/// Whether `path` names a socket something listens on (a live peer), 0 if
/// stale or absent.
int cunixsock_is_live(const char *path);
#endif
