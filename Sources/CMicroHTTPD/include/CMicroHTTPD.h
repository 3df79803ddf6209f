// libmicrohttpd for Swift. microhttpd.h needs the socket headers first.
// Why a shim at all: MHD_start_daemon is variadic and does not import into
// Swift; this one function forwards an option array to it.
#ifndef CMICROHTTPD_H
#define CMICROHTTPD_H
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <microhttpd.h>

/// Starts a daemon with `options` (an MHD_OPTION_END-terminated array) via MHD_OPTION_ARRAY.
struct MHD_Daemon *CMicroHTTPD_start(unsigned int flags, uint16_t port,
                                     MHD_AccessHandlerCallback handler, void *handler_cls,
                                     struct MHD_OptionItem *options);

/// The port the daemon is bound to (0 when unknown).
uint16_t CMicroHTTPD_bound_port(struct MHD_Daemon *daemon);
#endif
