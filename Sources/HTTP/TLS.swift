// TLS on a TCP listener: the PEM files, their checks, and what a connection
// learns about its client. GnuTLS stays in CMicroHTTPD/tls.c.
//
// Reloading (SIGHUP): `HTTPServer.reloadTLS()` loads the files again into new
// credentials and makes them current. Each connection takes the current ones
// when it opens (before its handshake) and keeps them until it closes, so a
// reload drops nothing: connections and long-polls in flight go on with the
// old certificate, new connections get the new one, and the old credentials
// are freed when their last connection closes.
import CMicroHTTPD
import Glibc
import Platform

/// Where a TCP listener's certificate, key and (optionally) client CA come from.
public struct TLSFiles: Sendable, Equatable {
    /// The server's certificate chain, PEM.
    public var certificate: String
    /// Its private key, PEM; refused when others may read it.
    public var key: String
    /// CA certificates (PEM) client certificates must chain to; with it a
    /// client certificate is required on every request but `/healthz`.
    public var clientCA: String?

    /// The files as given (read by `HTTPServer.start()` and `reloadTLS()`).
    public init(certificate: String, key: String, clientCA: String? = nil) {
        self.certificate = certificate
        self.key = key
        self.clientCA = clientCA
    }
}

/// TLS 1.2 and 1.3 only (GnuTLS priority string).
let tlsPriorities = "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

/// Loaded credentials. Freed when the last holder (the server, a connection) lets go.
final class TLSCredentials: @unchecked Sendable {
    // SAFETY: GnuTLS credentials are read-only once loaded and may be shared
    // by sessions on any thread; freed once, in deinit.
    let raw: OpaquePointer
    /// The PEM texts (C strings, freed in deinit), for libmicrohttpd's own
    /// start-up credentials, which no connection keeps (see connectionStarted).
    let certificatePEM: UnsafeMutablePointer<CChar>
    let keyPEM: UnsafeMutablePointer<CChar>
    /// Whether client certificates are asked for and verified.
    let verifiesClients: Bool
    /// The certificate's notAfter, seconds since the epoch.
    let notAfter: Int64

    private init(raw: OpaquePointer, certificatePEM: [CChar], keyPEM: [CChar], verifiesClients: Bool) {
        self.raw = raw
        self.certificatePEM = certificatePEM.withUnsafeBufferPointer { strdup($0.baseAddress!)! }
        self.keyPEM = keyPEM.withUnsafeBufferPointer { strdup($0.baseAddress!)! }
        self.verifiesClients = verifiesClients
        notAfter = CMicroHTTPD_tls_not_after(raw)
    }

    deinit {
        CMicroHTTPD_tls_free(raw)
        // The key's copy is wiped before it goes back to the allocator.
        memset(keyPEM, 0, strlen(keyPEM))
        free(keyPEM)
        free(certificatePEM)
    }

    /// Reads and checks the files: each readable, the key not readable by
    /// others, the certificate matching the key, the CA file holding a CA.
    static func load(_ files: TLSFiles) throws(ServerStartError) -> TLSCredentials {
        func read(_ path: String, _ what: String) throws(ServerStartError) -> [CChar] {
            let bytes: [UInt8]?
            do { bytes = try readWholeFile(path) } catch {
                throw ServerStartError(description: "\(what) \(path): \(error.description)")
            }
            guard let bytes, !bytes.isEmpty else {
                throw ServerStartError(description: "\(what) \(path): \(bytes == nil ? "no such file" : "the file is empty")")
            }
            return bytes.map { CChar(bitPattern: $0) } + [0]
        }
        var st = stat()
        if stat(files.key, &st) == 0, st.st_mode & (S_IROTH | S_IWOTH) != 0 {
            throw ServerStartError(description: "--tls-key \(files.key): readable by others (mode 0\(String(st.st_mode & 0o777, radix: 8))); chmod o-rwx it")
        }
        let cert = try read(files.certificate, "--tls-cert")
        let key = try read(files.key, "--tls-key")
        let ca = try files.clientCA.map { (path: String) throws(ServerStartError) in try read(path, "--tls-client-ca") }
        var err = [CChar](repeating: 0, count: 256)
        let raw: OpaquePointer? = cert.withUnsafeBufferPointer { c in
            key.withUnsafeBufferPointer { k in
                if let ca {
                    return ca.withUnsafeBufferPointer { a in
                        CMicroHTTPD_tls_load(c.baseAddress, k.baseAddress, a.baseAddress, &err, err.count)
                    }
                }
                return CMicroHTTPD_tls_load(c.baseAddress, k.baseAddress, nil, &err, err.count)
            }
        }
        guard let raw else {
            let why = String(decoding: err.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let which = why.hasPrefix("reading the client CA") ? "--tls-client-ca \(files.clientCA ?? "")"
                : "--tls-cert \(files.certificate) with --tls-key \(files.key)"
            throw ServerStartError(description: "\(which): \(why)")
        }
        return TLSCredentials(raw: raw, certificatePEM: cert, keyPEM: key, verifiesClients: ca != nil)
    }
}

/// Who is at the other end of a request's connection.
public struct Peer: Sendable, Equatable {
    /// The peer's address ("127.0.0.1", "::1"), "unix" on a Unix socket, "" in-process.
    public var address: String
    /// Whether the connection is TLS.
    public var tls: Bool
    /// The client certificate's check; nil when the listener asks for none.
    public var certificate: ClientCertificate?

    /// A peer at `address`.
    public init(address: String = "", tls: Bool = false, certificate: ClientCertificate? = nil) {
        self.address = address
        self.tls = tls
        self.certificate = certificate
    }
}

/// A client certificate as the listener's client CA judged it.
public struct ClientCertificate: Sendable, Equatable {
    /// The verdict.
    public enum Status: String, Sendable {
        /// Chains to the client CA and is in its validity period.
        case verified
        /// The client sent none.
        case missing
        /// Not signed by the client CA.
        case untrusted
        /// Past its notAfter.
        case expired
        /// Before its notBefore.
        case notYetValid = "not_yet_valid"
        /// Anything else: bad signature, revoked, not for TLS clients.
        case invalid
    }
    /// The verdict.
    public var status: Status
    /// The certificate's subject, RFC 4514 ("CN=orchestrator,O=Example"); "" when missing.
    public var subject: String

    /// A certificate judged `status`.
    public init(status: Status, subject: String) {
        self.status = status
        self.subject = subject
    }
}

/// One connection's state, in libmicrohttpd's socket context: the credentials
/// it was opened with, its peer, and its client certificate's check (done
/// once per connection, again after a minute, not per request).
final class ConnectionContext: @unchecked Sendable {
    // SAFETY: a connection is served by one libmicrohttpd thread; its context
    // is only touched by the callbacks of that connection, on that thread.
    let tls: TLSCredentials?
    let address: String
    var requests = 0
    private var checked: (at: UInt64, certificate: ClientCertificate)?

    init(tls: TLSCredentials?, address: String) {
        self.tls = tls
        self.address = address
    }

    /// The peer, its certificate verified when the listener asks for one.
    func peer(_ c: OpaquePointer) -> Peer {
        guard let tls else { return Peer(address: address) }
        guard tls.verifiesClients else { return Peer(address: address, tls: true) }
        let now = monotonicNanos()
        if let checked, now &- checked.at < 60_000_000_000 {
            return Peer(address: address, tls: true, certificate: checked.certificate)
        }
        var subject = [CChar](repeating: 0, count: 1024)
        let verdict = CMicroHTTPD_tls_peer(c, &subject, subject.count)
        let status: ClientCertificate.Status = switch Int(verdict) {
        case CMHD_PEER_OK: .verified
        case CMHD_PEER_NONE: .missing
        case CMHD_PEER_UNTRUSTED: .untrusted
        case CMHD_PEER_EXPIRED: .expired
        case CMHD_PEER_NOT_YET_VALID: .notYetValid
        default: .invalid
        }
        let cert = ClientCertificate(status: status, subject: String(decoding: subject.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
        checked = (now, cert)
        return Peer(address: address, tls: true, certificate: cert)
    }
}
