// TLS for the HTTP server, in C because the GnuTLS and libmicrohttpd calls it
// needs are variadic (MHD_get_connection_info) or take structs and macros Swift
// imports poorly. Swift sees opaque credentials and plain results.
//
// How certificates are reloaded without dropping anything: libmicrohttpd builds
// one GnuTLS credentials object at start and gives it to every new session.
// Right after it made a connection's session (before any byte of the handshake
// is read, in the NOTIFY_CONNECTION "started" callback) the server replaces that
// session's credentials with its current CMicroHTTPD_TLS. A reload builds a new
// one; new connections take it, connections made before keep theirs until they
// close (the Swift side counts references), so nothing in flight changes.
#include "CMicroHTTPD.h"
#include <arpa/inet.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct CMicroHTTPD_TLS {
    gnutls_certificate_credentials_t cred;
    int verify_clients;
    int64_t not_after;
};

static void say(char *err, size_t len, const char *what, int rc) {
    if (err && len) snprintf(err, len, "%s: %s", what, gnutls_strerror(rc));
}

CMicroHTTPD_TLS *CMicroHTTPD_tls_load(const char *cert_pem, const char *key_pem, const char *ca_pem,
                                      char *err, size_t err_len) {
    CMicroHTTPD_TLS *tls = calloc(1, sizeof *tls);
    if (!tls) return NULL;
    int rc = gnutls_certificate_allocate_credentials(&tls->cred);
    if (rc < 0) {
        say(err, err_len, "allocating credentials", rc);
        free(tls);
        return NULL;
    }
    gnutls_datum_t cert = {(unsigned char *)cert_pem, (unsigned)strlen(cert_pem)};
    gnutls_datum_t key = {(unsigned char *)key_pem, (unsigned)strlen(key_pem)};
    // Checks that the key is the certificate's (GNUTLS_E_CERTIFICATE_KEY_MISMATCH otherwise).
    rc = gnutls_certificate_set_x509_key_mem2(tls->cred, &cert, &key, GNUTLS_X509_FMT_PEM, NULL, 0);
    if (rc < 0) {
        say(err, err_len, rc == GNUTLS_E_CERTIFICATE_KEY_MISMATCH ? "the certificate does not match the key"
                                                                  : "reading the certificate and key", rc);
        CMicroHTTPD_tls_free(tls);
        return NULL;
    }
    gnutls_x509_crt_t crt;
    if (gnutls_x509_crt_init(&crt) == 0) {
        if (gnutls_x509_crt_import(crt, &cert, GNUTLS_X509_FMT_PEM) == 0)
            tls->not_after = (int64_t)gnutls_x509_crt_get_expiration_time(crt);
        gnutls_x509_crt_deinit(crt);
    }
    if (ca_pem) {
        gnutls_datum_t ca = {(unsigned char *)ca_pem, (unsigned)strlen(ca_pem)};
        rc = gnutls_certificate_set_x509_trust_mem(tls->cred, &ca, GNUTLS_X509_FMT_PEM);
        if (rc <= 0) {
            say(err, err_len, "reading the client CA", rc == 0 ? GNUTLS_E_NO_CERTIFICATE_FOUND : rc);
            CMicroHTTPD_tls_free(tls);
            return NULL;
        }
        tls->verify_clients = 1;
    }
    return tls;
}

void CMicroHTTPD_tls_free(CMicroHTTPD_TLS *tls) {
    if (!tls) return;
    if (tls->cred) gnutls_certificate_free_credentials(tls->cred);
    free(tls);
}

int64_t CMicroHTTPD_tls_not_after(const CMicroHTTPD_TLS *tls) { return tls->not_after; }

static gnutls_session_t session_of(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    return info ? (gnutls_session_t)info->tls_session : NULL;
}

int CMicroHTTPD_tls_attach(struct MHD_Connection *c, CMicroHTTPD_TLS *tls) {
    gnutls_session_t s = session_of(c);
    if (!s) return -1;
    if (gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, tls->cred) < 0) return -1;
    // Asked for, not required: a client without one still completes the
    // handshake and gets a JSON 401 naming the reason, counted per reason.
    if (tls->verify_clients) gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUEST);
    return 0;
}

int CMicroHTTPD_tls_handshake_done(struct MHD_Connection *c) {
    gnutls_session_t s = session_of(c);
    return s && gnutls_handshake_get_last_in(s) == GNUTLS_HANDSHAKE_FINISHED;
}

int CMicroHTTPD_tls_peer(struct MHD_Connection *c, char *subject, size_t subject_len) {
    if (subject_len) subject[0] = 0;
    gnutls_session_t s = session_of(c);
    if (!s) return CMHD_PEER_NONE;
    unsigned n = 0;
    const gnutls_datum_t *chain = gnutls_certificate_get_peers(s, &n);
    if (!chain || n == 0) return CMHD_PEER_NONE;
    gnutls_x509_crt_t crt;
    if (gnutls_x509_crt_init(&crt) == 0) {
        if (gnutls_x509_crt_import(crt, &chain[0], GNUTLS_X509_FMT_DER) == 0) {
            gnutls_datum_t dn = {NULL, 0};
            if (gnutls_x509_crt_get_dn3(crt, &dn, 0) == 0) {
                snprintf(subject, subject_len, "%.*s", (int)dn.size, (const char *)dn.data);
                gnutls_free(dn.data);
            }
        }
        gnutls_x509_crt_deinit(crt);
    }
    // Against this connection's trust list, for a TLS client (extended key
    // usage clientAuth when the certificate names any usage).
    gnutls_typed_vdata_st purpose = {GNUTLS_DT_KEY_PURPOSE_OID, (unsigned char *)GNUTLS_KP_TLS_WWW_CLIENT, 0};
    unsigned status = 0;
    if (gnutls_certificate_verify_peers(s, &purpose, 1, &status) < 0) return CMHD_PEER_INVALID;
    if (status == 0) return CMHD_PEER_OK;
    if (status & GNUTLS_CERT_EXPIRED) return CMHD_PEER_EXPIRED;
    if (status & GNUTLS_CERT_NOT_ACTIVATED) return CMHD_PEER_NOT_YET_VALID;
    if (status & (GNUTLS_CERT_SIGNER_NOT_FOUND | GNUTLS_CERT_SIGNER_NOT_CA)) return CMHD_PEER_UNTRUSTED;
    return CMHD_PEER_INVALID;
}

void *CMicroHTTPD_socket_context(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return info ? info->socket_context : NULL;
}

int CMicroHTTPD_peer_address(struct MHD_Connection *c, char *out, size_t len) {
    if (len) out[0] = 0;
    const union MHD_ConnectionInfo *info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    if (!info || !info->client_addr) return -1;
    const struct sockaddr *sa = info->client_addr;
    if (sa->sa_family == AF_INET)
        return inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, out, (socklen_t)len) ? 0 : -1;
    if (sa->sa_family == AF_INET6)
        return inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, out, (socklen_t)len) ? 0 : -1;
    snprintf(out, len, "unix");
    return 0;
}
