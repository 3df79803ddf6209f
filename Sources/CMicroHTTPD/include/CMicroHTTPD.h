// libmicrohttpd for Swift. microhttpd.h needs the socket headers first.
// Why a shim at all: MHD_start_daemon and MHD_get_connection_info are variadic
// and do not import into Swift; GnuTLS (tls.c) stays behind opaque pointers.
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

/// A certificate with its key and, optionally, the CAs client certificates must chain to.
typedef struct CMicroHTTPD_TLS CMicroHTTPD_TLS;

/// Loads PEM texts (NUL-terminated; `ca_pem` may be NULL). NULL on failure, with
/// `err` saying why (e.g. the certificate does not match the key).
CMicroHTTPD_TLS *CMicroHTTPD_tls_load(const char *cert_pem, const char *key_pem, const char *ca_pem,
                                      char *err, size_t err_len);
/// Frees what CMicroHTTPD_tls_load made (no session may use it any more).
void CMicroHTTPD_tls_free(CMicroHTTPD_TLS *tls);
/// The certificate's notAfter, seconds since the epoch.
int64_t CMicroHTTPD_tls_not_after(const CMicroHTTPD_TLS *tls);
/// Gives a new connection's TLS session these credentials (call before its
/// handshake: from the connection-started notification). 0 on success.
int CMicroHTTPD_tls_attach(struct MHD_Connection *c, CMicroHTTPD_TLS *tls);
/// 1 when the connection's TLS handshake finished.
int CMicroHTTPD_tls_handshake_done(struct MHD_Connection *c);

/// What a client certificate is worth, by CMicroHTTPD_tls_peer.
enum {
    CMHD_PEER_NONE = 0,           ///< no certificate (or no TLS)
    CMHD_PEER_OK = 1,             ///< chains to the client CA, in its validity period
    CMHD_PEER_UNTRUSTED = 2,      ///< not signed by the client CA
    CMHD_PEER_EXPIRED = 3,        ///< past its notAfter
    CMHD_PEER_NOT_YET_VALID = 4,  ///< before its notBefore
    CMHD_PEER_INVALID = 5,        ///< anything else (bad signature, revoked, wrong key usage)
};
/// Verifies the connection's client certificate against its trust list and
/// writes the certificate's subject (RFC 4514) into `subject`.
int CMicroHTTPD_tls_peer(struct MHD_Connection *c, char *subject, size_t subject_len);

/// The connection's socket context (set in the connection-started notification).
void *CMicroHTTPD_socket_context(struct MHD_Connection *c);
/// The peer's address as text ("127.0.0.1", "::1"; "unix" for a Unix socket). 0 on success.
int CMicroHTTPD_peer_address(struct MHD_Connection *c, char *out, size_t len);
#endif
