// TLS on the server: start-up options, connections taking the current
// credentials, and reloading them (see TLS.swift for why nothing drops).
import CMicroHTTPD
import Glibc
import Platform

extension HTTPServer {
    /// The listener's credentials, loaded and checked; nil without TLS.
    func loadTLS() throws(ServerStartError) -> TLSCredentials? {
        guard let files = options.tls else { return nil }
        let tls = try TLSCredentials.load(files)
        currentTLS.withLock { $0 = tls }
        return tls
    }

    /// libmicrohttpd's TLS options: its start-up certificate (it wants one;
    /// every connection is given the current credentials instead) and TLS 1.2/1.3 only.
    func tlsOptionItems(_ tls: TLSCredentials?) -> [MHD_OptionItem] {
        guard let tls else { return [] }
        return [
            MHD_OptionItem(option: .HTTPS_MEM_CERT, value: 0, ptr_value: UnsafeMutableRawPointer(tls.certificatePEM)),
            MHD_OptionItem(option: .HTTPS_MEM_KEY, value: 0, ptr_value: UnsafeMutableRawPointer(tls.keyPEM)),
            MHD_OptionItem(option: .HTTPS_PRIORITIES, value: 0,
                           ptr_value: UnsafeMutableRawPointer(mutating: HTTPServer.priorities)),
        ]
    }

    /// `tlsPriorities` as a C string that lives as long as the process.
    nonisolated(unsafe) static let priorities: UnsafePointer<CChar> = UnsafePointer(strdup(tlsPriorities)!)

    /// Re-reads the certificate, key and client CA; new connections take them,
    /// open ones keep theirs. Throws (and keeps the old ones) when a file is
    /// unreadable, the key is open to others or does not match. False without TLS.
    @discardableResult
    public func reloadTLS() throws(ServerStartError) -> Bool {
        guard options.tls != nil, options.unixPath == nil, currentTLS.withLock({ $0 != nil }) else { return false }
        _ = try loadTLS()
        return true
    }

    /// The current certificate's notAfter (seconds since the epoch); nil without TLS.
    public var tlsNotAfter: Int64? { currentTLS.withLock { $0?.notAfter } }

    /// A connection opened: its context (peer, credentials) goes in its socket
    /// context, and a TLS session gets the current credentials before its handshake.
    func connectionStarted(_ c: OpaquePointer, _ slot: UnsafeMutablePointer<UnsafeMutableRawPointer?>) {
        let tls = currentTLS.withLock { $0 }
        var text = [CChar](repeating: 0, count: 64)
        let address = CMicroHTTPD_peer_address(c, &text, text.count) == 0
            ? String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
        if let tls { _ = CMicroHTTPD_tls_attach(c, tls.raw) }
        // SAFETY: retained here, released once in connectionClosed.
        slot.pointee = Unmanaged.passRetained(ConnectionContext(tls: tls, address: address)).toOpaque()
    }

    /// A connection closed: a TLS one that never finished its handshake is
    /// reported; its context (and its hold on the credentials) goes.
    func connectionClosed(_ c: OpaquePointer, _ slot: UnsafeMutablePointer<UnsafeMutableRawPointer?>) {
        guard let p = slot.pointee else { return }
        let ctx = Unmanaged<ConnectionContext>.fromOpaque(p).takeRetainedValue()
        slot.pointee = nil
        if ctx.tls != nil, ctx.requests == 0, CMicroHTTPD_tls_handshake_done(c) == 0 {
            onHandshakeFailure(ctx.address)
        }
    }
}
