// The embedded HTTP server: libmicrohttpd, wrapped once. Handlers never see
// C types; this is the only file that imports libmicrohttpd (CUnixSocket
// serves a Unix listener here; jansson stays in the JSON target).
//
// Threads: libmicrohttpd's internal epoll threads call `handle`, which must
// not block. A deferred reply suspends the connection; whoever completes it
// stores the response and resumes the connection (safe from any thread), and
// libmicrohttpd calls `handle` again to queue it.
import CMicroHTTPD
import CUnixSocket
import Glibc
import Platform
import Synchronization

/// How the server listens and what it accepts.
public struct ServerOptions: Sendable {
    /// Address to bind: IPv4 dotted quad, IPv6 literal, or "localhost".
    public var host = "127.0.0.1"
    /// Port; 0 picks a free one (see `HTTPServer.port`).
    public var port: UInt16 = 8080
    /// libmicrohttpd worker threads.
    public var threads = 2
    /// Connections answered at once; more get a JSON 503.
    public var maxConnections = 1024
    /// Largest request body; larger gets 413.
    public var maxBodyBytes = 8 << 20
    /// Seconds an idle or half-sent connection may hold its place.
    public var connectionTimeout = 30
    /// Listen on this Unix socket instead of host and port (`--listen unix:PATH`).
    public var unixPath: String?
    /// The Unix socket's mode: who may connect is who may write it.
    public var unixPermissions: mode_t = 0o660
    /// TLS on a TCP listener (a Unix socket stays plain, guarded by its mode).
    public var tls: TLSFiles?
    /// 127.0.0.1:8080, as `iotlbd` without --listen.
    public init() {}

    /// What the listener is, for messages: "HOST:PORT" or "unix:PATH" ("… (TLS)" with TLS).
    public var address: String {
        if let unixPath { return "unix:" + unixPath }
        let hostPort = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        return tls == nil ? hostPort : hostPort + " (TLS)"
    }
}

/// Why the server did not start.
public struct ServerStartError: Error, CustomStringConvertible {
    /// What failed, for the operator.
    public let description: String
    /// A refusal saying `description`.
    public init(description: String) { self.description = description }
}

/// A raw C pointer carried across threads; libmicrohttpd allows resume from any thread.
/// SAFETY: a suspended connection stays valid until it is resumed (and its
/// completion callback runs), and every one is resumed exactly once.
private struct ConnectionRef: @unchecked Sendable { let raw: OpaquePointer }

/// Per-request state, owned by libmicrohttpd's `con_cls` slot.
private final class ConnectionState: @unchecked Sendable {
    var body: [UInt8] = []
    var tooLarge = false
    let completed = Locked<Response?>(nil)
    /// 0: waiting for a deferred reply; 1: it came before the connection was
    /// suspended; 2: the connection is suspended, the completer resumes it.
    let phase = Atomic<Int>(0)
}

/// libmicrohttpd behind a Swift responder.
public final class HTTPServer: @unchecked Sendable {
    /// The options given.
    public let options: ServerOptions
    private let responder: @Sendable (Request) -> Reply
    /// Called with the peer's address when a TLS handshake failed (e.g. plain HTTP on the TLS port).
    let onHandshakeFailure: @Sendable (String) -> Void
    /// The credentials new connections take (see TLS.swift); nil without TLS.
    let currentTLS = Locked<TLSCredentials?>(nil)
    private var daemon: OpaquePointer?
    private let open = Atomic<Int>(0)
    private let suspended = Atomic<Int>(0)
    /// The bound port (the chosen one when `options.port` was 0).
    public private(set) var port: UInt16 = 0

    /// A server (not yet listening: see `start()`) that answers every request with `responder`;
    /// `onHandshakeFailure` hears of every TLS handshake that failed, with the peer's address.
    public init(options: ServerOptions, onHandshakeFailure: @escaping @Sendable (String) -> Void = { _ in },
                responder: @escaping @Sendable (Request) -> Reply) {
        self.options = options
        self.onHandshakeFailure = onHandshakeFailure
        self.responder = responder
    }

    /// Connections open now.
    public var openConnections: Int { open.load(ordering: .relaxed) }
    /// Connections waiting for a deferred reply.
    public var suspendedConnections: Int { suspended.load(ordering: .relaxed) }

    /// The Unix socket listened on (removed at stop).
    private var unixListening: String?

    /// A listening Unix socket at `path` with `options.unixPermissions`: a stale
    /// socket file is replaced, a live one or any other file refused.
    private func listenUnix(_ path: String) throws(ServerStartError) -> Int32 {
        var st = stat()
        if lstat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else {
                throw ServerStartError(description: "cannot listen on unix:\(path): the file exists and is not a socket")
            }
            guard cunixsock_is_live(path) == 0 else {
                throw ServerStartError(description: "cannot listen on unix:\(path): something listens on it already")
            }
            unlink(path)
        }
        let fd = cunixsock_listen_mode(path, UInt32(options.unixPermissions), -1, 1024)
        guard fd >= 0 else {
            throw ServerStartError(description: "cannot listen on unix:\(path): \(String(cString: strerror(errno)))")
        }
        return fd
    }

    /// Binds and starts serving.
    public func start() throws(ServerStartError) {
        var flags = MHD_USE_INTERNAL_POLLING_THREAD.rawValue | MHD_USE_EPOLL.rawValue
            | MHD_ALLOW_SUSPEND_RESUME.rawValue | MHD_USE_TURBO.rawValue
        let host = options.host == "localhost" ? "127.0.0.1" : options.host
        var v4 = sockaddr_in()
        var v6 = sockaddr_in6()
        var addrPtr: UnsafeMutableRawPointer?
        var unixFD: Int32 = -1
        if let path = options.unixPath {
            unixFD = try listenUnix(path)
        } else if inet_pton(AF_INET, host, &v4.sin_addr) == 1 {
            v4.sin_family = sa_family_t(AF_INET)
            v4.sin_port = options.port.bigEndian
            addrPtr = withUnsafeMutablePointer(to: &v4) { UnsafeMutableRawPointer($0) }
        } else if inet_pton(AF_INET6, host.trimmingBrackets, &v6.sin6_addr) == 1 {
            v6.sin6_family = sa_family_t(AF_INET6)
            v6.sin6_port = options.port.bigEndian
            flags |= MHD_USE_IPv6.rawValue
            addrPtr = withUnsafeMutablePointer(to: &v6) { UnsafeMutableRawPointer($0) }
        } else {
            throw ServerStartError(description: "cannot listen on \"\(options.host)\": not an IPv4 or IPv6 address")
        }
        // SAFETY: the daemon is stopped in `stop()`/deinit before the server
        // goes, so callbacks never see a dead server; each connection's state
        // is retained into `con_cls` and released once, when it completes.
        let me = Unmanaged.passUnretained(self).toOpaque()
        let completed: MHD_RequestCompletedCallback = { _, _, conCls, _ in
            guard let slot = conCls, let p = slot.pointee else { return }
            Unmanaged<ConnectionState>.fromOpaque(p).release()
            slot.pointee = nil
        }
        let notify: MHD_NotifyConnectionCallback = { cls, connection, socketContext, code in
            let server = Unmanaged<HTTPServer>.fromOpaque(cls!).takeUnretainedValue()
            if code == .CONNECTION_NOTIFY_STARTED {
                server.open.add(1, ordering: .relaxed)
                server.connectionStarted(connection!, socketContext!)
            } else {
                server.open.subtract(1, ordering: .relaxed)
                server.connectionClosed(connection!, socketContext!)
            }
        }
        let tls = unixFD >= 0 ? nil : try loadTLS()
        if tls != nil { flags |= MHD_USE_TLS.rawValue }
        var items: [MHD_OptionItem] = tlsOptionItems(tls) + [
            unixFD >= 0 ? MHD_OptionItem(option: .LISTEN_SOCKET, value: Int(unixFD), ptr_value: nil)
                : MHD_OptionItem(option: .SOCK_ADDR, value: 0, ptr_value: addrPtr),
            MHD_OptionItem(option: .THREAD_POOL_SIZE, value: max(1, options.threads), ptr_value: nil),
            // libmicrohttpd refuses past this; below it we answer a JSON 503 ourselves.
            MHD_OptionItem(option: .CONNECTION_LIMIT, value: options.maxConnections + 64, ptr_value: nil),
            MHD_OptionItem(option: .CONNECTION_TIMEOUT, value: options.connectionTimeout, ptr_value: nil),
            MHD_OptionItem(option: .NOTIFY_COMPLETED, value: unsafeBitCast(completed, to: Int.self), ptr_value: nil),
            MHD_OptionItem(option: .NOTIFY_CONNECTION, value: unsafeBitCast(notify, to: Int.self), ptr_value: me),
            MHD_OptionItem(option: .LISTEN_BACKLOG_SIZE, value: 1024, ptr_value: nil),
            MHD_OptionItem(option: .END, value: 0, ptr_value: nil),
        ]
        let handler: MHD_AccessHandlerCallback = { cls, connection, url, method, _, uploadData, uploadSize, conCls in
            let server = Unmanaged<HTTPServer>.fromOpaque(cls!).takeUnretainedValue()
            return server.handle(connection!, url!, method!, uploadData, uploadSize!, conCls!)
        }
        daemon = CMicroHTTPD_start(flags, unixFD >= 0 ? 0 : options.port, handler, me, &items)
        withExtendedLifetime((v4, v6, tls)) {}
        guard let daemon else {
            let why = String(cString: strerror(errno))
            if unixFD >= 0, let path = options.unixPath {
                close(unixFD)
                unlink(path)
            }
            throw ServerStartError(description: "cannot listen on \(options.address): \(why)")
        }
        if unixFD >= 0 {
            unixListening = options.unixPath
        } else {
            port = CMicroHTTPD_bound_port(daemon)
        }
    }

    /// Stops serving. Deferred replies should have completed; waits up to
    /// `grace` seconds for the last ones, since libmicrohttpd must not stop
    /// with suspended connections.
    public func stop(grace: Double = 2) {
        guard let d = daemon else { return }
        let deadline = monotonicNanos() + UInt64(max(0, grace) * 1e9)
        while suspended.load(ordering: .acquiring) > 0 && monotonicNanos() < deadline {
            usleep(2_000)
        }
        MHD_stop_daemon(d)  // closes the listening socket, Unix or not
        daemon = nil
        if let path = unixListening {
            unlink(path)
            unixListening = nil
        }
    }

    deinit { stop() }

    // MARK: Requests

    private func handle(_ c: OpaquePointer, _ url: UnsafePointer<CChar>, _ method: UnsafePointer<CChar>,
                        _ uploadData: UnsafePointer<CChar>?, _ uploadSize: UnsafeMutablePointer<Int>,
                        _ conCls: UnsafeMutablePointer<UnsafeMutableRawPointer?>) -> MHD_Result {
        guard let slot = conCls.pointee else {
            // First call: headers only.
            let state = ConnectionState()
            conCls.pointee = Unmanaged.passRetained(state).toOpaque()
            if open.load(ordering: .relaxed) > options.maxConnections {
                return queue(c, .error(APIError(503, "unavailable",
                                                "connection limit (\(options.maxConnections)) reached; retry later")))
            }
            if let cl = MHD_lookup_connection_value(c, .HEADER_KIND, "Content-Length"),
               let n = Int(String(cString: cl)), n > options.maxBodyBytes {
                return queue(c, .error(tooLarge))
            }
            return .YES
        }
        let state = Unmanaged<ConnectionState>.fromOpaque(slot).takeUnretainedValue()
        if uploadSize.pointee > 0 {
            let n = uploadSize.pointee
            if !state.tooLarge {
                if state.body.count + n > options.maxBodyBytes {
                    state.tooLarge = true
                    state.body = []
                } else {
                    uploadData!.withMemoryRebound(to: UInt8.self, capacity: n) {
                        state.body.append(contentsOf: UnsafeBufferPointer(start: $0, count: n))
                    }
                }
            }
            uploadSize.pointee = 0
            return .YES
        }
        if let done = state.completed.withLock({ $0.take() }) { return queue(c, done) }
        if state.tooLarge { return queue(c, .error(tooLarge)) }

        var request = Request(method: String(cString: method), path: String(cString: url))
        request.body = state.body
        if let context = CMicroHTTPD_socket_context(c) {
            let ctx = Unmanaged<ConnectionContext>.fromOpaque(context).takeUnretainedValue()
            ctx.requests += 1
            request.peer = ctx.peer(c)
        }
        request.query = values(c, .GET_ARGUMENT_KIND)
        for (k, v) in values(c, .HEADER_KIND) { request.headers[k.lowercased()] = v }
        switch responder(request) {
        case .now(let response):
            return queue(c, response)
        case .later(let start):
            return deferReply(c, state, start, waitNanos: HTTPServer.fastPathNanos)
        case .deferred(let start):
            return deferReply(c, state, start, waitNanos: 0)
        }
    }

    /// How long a server thread waits for a worker's command before it suspends
    /// the connection: a resume costs a trip through the event loop.
    static let fastPathNanos: UInt64 = 150_000

    private func deferReply(_ c: OpaquePointer, _ state: ConnectionState,
                            _ start: @Sendable (@escaping @Sendable (Response) -> Void) -> Void,
                            waitNanos: UInt64) -> MHD_Result {
        let ref = ConnectionRef(raw: c)
        start { [self] response in
            state.completed.withLock { $0 = response }
            // Before suspension: the waiting server thread takes it. After: resume, exactly once.
            if state.phase.compareExchange(expected: 0, desired: 1, ordering: .acquiringAndReleasing).exchanged { return }
            MHD_resume_connection(ref.raw)
            suspended.subtract(1, ordering: .releasing)
        }
        if waitNanos > 0 {
            let until = monotonicNanos() + waitNanos
            repeat {
                if state.phase.load(ordering: .acquiring) == 1, let r = state.completed.withLock({ $0.take() }) {
                    return queue(c, r)
                }
            } while monotonicNanos() < until
        }
        suspended.add(1, ordering: .relaxed)
        MHD_suspend_connection(c)
        if !state.phase.compareExchange(expected: 0, desired: 2, ordering: .acquiringAndReleasing).exchanged {
            // It completed between the wait and the suspension: nobody else will resume.
            MHD_resume_connection(c)
            suspended.subtract(1, ordering: .releasing)
        }
        return .YES
    }

    private var tooLarge: APIError {
        APIError(413, "payload_too_large", "the body exceeds \(options.maxBodyBytes) bytes (--max-body-bytes)")
    }

    private func values(_ c: OpaquePointer, _ kind: MHD_ValueKind) -> [(String, String)] {
        var out: [(String, String)] = []
        withUnsafeMutablePointer(to: &out) { p in
            _ = MHD_get_connection_values(c, kind, { cls, _, key, value in
                let out = cls!.assumingMemoryBound(to: [(String, String)].self)
                out.pointee.append((String(cString: key!), value.map { String(cString: $0) } ?? ""))
                return .YES
            }, p)
        }
        return out
    }

    private func queue(_ c: OpaquePointer, _ r: Response) -> MHD_Result {
        let resp = r.body.withUnsafeBytes { buf in
            MHD_create_response_from_buffer(buf.count, UnsafeMutableRawPointer(mutating: buf.baseAddress),
                                            .RESPMEM_MUST_COPY)
        }
        guard let resp else { return .NO }
        for (k, v) in r.headers { MHD_add_response_header(resp, k, v) }
        let rc = MHD_queue_response(c, UInt32(r.status), resp)
        MHD_destroy_response(resp)
        return rc
    }
}

private extension String {
    var trimmingBrackets: String {
        hasPrefix("[") && hasSuffix("]") ? String(dropFirst().dropLast()) : self
    }
}
