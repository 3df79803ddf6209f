// A vhost-user backend for one device: a thread that serves one front-end at
// a time (DPDK virtio-user, QEMU), each connection a VhostUserSession
// (VhostUserSession.swift). In server mode it listens on a Unix socket; in
// client mode it connects to the front-end's socket and reconnects with a
// bounded back-off (50 ms doubling to 2 s) whenever the connection is lost or
// was never there. Status for the HTTP API lives here.
import Glibc
import Platform
import Synchronization
import CUnixSocket
import Vhost

/// Why a vhost-user socket could not be served.
public struct VhostUserSetupError: Error, CustomStringConvertible, Sendable {
    public let description: String
    /// The path is taken (a live socket, or not a socket at all), not merely unusable.
    public let inUse: Bool
    init(_ description: String, inUse: Bool = false) {
        self.description = description
        self.inUse = inUse
    }
}

/// What the HTTP API shows of a vhost-user device's front-end.
public struct VhostUserStatus: Sendable, Equatable {
    /// Whether a front-end is connected now.
    public var connected = false
    /// Front-ends accepted so far.
    public var connections: UInt64 = 0
    /// Messages handled so far.
    public var messages: UInt64 = 0
    /// Feature bits the front-end acknowledged (virtio and protocol).
    public var features: UInt64 = 0
    public var protocolFeatures: UInt64 = 0
    /// Misses sent to the front-end (vIOMMU) and answered here (identity).
    public var missesForwarded: UInt64 = 0
    /// Sends of a miss to the front-end that failed (channel full, closed, or
    /// not given yet is not one); the miss is sent again.
    public var missSendFailures: UInt64 = 0
    public var identityUpdates: UInt64 = 0
    /// Kicks received (drivers kick only while the worker sleeps).
    public var kicks: UInt64 = 0
    /// Guest memory pages lost to a front-end shrinking its memory file (its connection ended).
    public var memoryFaults: UInt64 = 0
    /// Announcements (SEND_RARP) the front-end asked for after a migration.
    public var announcements: UInt64 = 0
    /// Client mode: connection attempts that failed (nothing listening yet,
    /// refused, backlog full), since the device was created. 0 in server mode.
    public var reconnectAttempts: UInt64 = 0
    /// Why the last connection ended abnormally (or, in client mode, why the
    /// last attempt failed), if it did.
    public var lastError: String?
}

/// Wakes the backend thread from another thread (stop, a miss posted). Its
/// eventfd lives as long as the last holder (the miss log keeps one).
final class EventNotifier: Sendable {
    let fd: Int32
    init() throws(VhostUserSetupError) {
        do throws(SystemCallError) { fd = try syscall("eventfd") { cunixsock_eventfd() } } catch {
            throw VhostUserSetupError(error.description)
        }
    }
    func signal() {
        var one: UInt64 = 1
        _ = write(fd, &one, 8)
    }
    func drain() {
        var v: UInt64 = 0
        _ = read(fd, &v, 8)
    }
    deinit { close(fd) }
}

/// One device's vhost-user socket and the thread serving it.
public final class VhostUserBackend: @unchecked Sendable {
    /// The socket path front-ends connect to (server) or listen on (client).
    public let socketPath: String
    /// Who listens.
    public let mode: VhostUserMode
    private let listenFD: Int32
    let notifier: EventNotifier
    private let running = Atomic<Bool>(true)
    private let statusBox = Locked(VhostUserStatus())
    private var thread: pthread_t?
    // Set by `start`, before the thread exists.
    private(set) var handle: DeviceHandle!
    private(set) var limits = EngineLimits()
    private(set) var log: @Sendable (String) -> Void = { _ in }

    /// The first and the longest wait between two connection attempts (client mode).
    public static let firstBackoffMillis = 50, maxBackoffMillis = 2000

    /// Server mode: listens on `socket` (not yet serving: see `start`), the
    /// socket file made with `permissions` and, when given, `group` (it appears
    /// under its name with them). A stale socket file (nothing listening) is
    /// replaced; a live one or any other file is refused. Client mode: nothing
    /// happens until `start`, which connects to `socket`.
    public init(socket: String, mode: VhostUserMode = .server, permissions: mode_t = 0o600,
                group: gid_t? = nil) throws(VhostUserSetupError) {
        self.mode = mode
        if mode == .client {
            do { notifier = try EventNotifier() } catch { throw error }
            socketPath = socket
            listenFD = -1
            return
        }
        var st = stat()
        if lstat(socket, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else {
                throw VhostUserSetupError("\(socket) exists and is not a socket", inUse: true)
            }
            guard cunixsock_is_live(socket) == 0 else {
                throw VhostUserSetupError("\(socket) is in use: something listens on it", inUse: true)
            }
            unlink(socket)
        }
        let fd: Int32
        do throws(SystemCallError) {
            fd = try syscall("cannot listen on \(socket)") {
                cunixsock_listen_mode(socket, UInt32(permissions), group.map { Int($0) } ?? -1, 16)
            }
        } catch {
            throw VhostUserSetupError(error.description)
        }
        do { notifier = try EventNotifier() } catch {
            close(fd)
            unlink(socket)
            throw error
        }
        socketPath = socket
        listenFD = fd
    }

    /// Serves front-ends for `handle`'s device on a thread of its own.
    public func start(handle: DeviceHandle, limits: EngineLimits, log: @escaping @Sendable (String) -> Void) {
        precondition(thread == nil && self.handle == nil)
        self.handle = handle
        self.limits = limits
        self.log = log
        let n = notifier
        handle.missLog.observe { _ in n.signal() }
        thread = startThread(name: "vhost-user") { [self] in run() }
    }

    /// What the front-end negotiated and how the connection goes.
    public var status: VhostUserStatus { statusBox.withLock { $0 } }

    func updateStatus(_ body: (inout VhostUserStatus) -> Void) { statusBox.withLock { body(&$0) } }

    /// Drops the front-end (its rings stop, its memory is unmapped), stops
    /// listening and removes the socket file. Call before deleting the device.
    public func stop() {
        guard running.exchange(false, ordering: .acquiringAndReleasing) else { return }
        notifier.signal()
        if let t = thread { pthread_join(t, nil) }
        thread = nil
        guard mode == .server else { return }  // the front-end's socket is the front-end's
        close(listenFD)
        unlink(socketPath)
    }

    private func run() {
        if mode == .client { return runClient() }
        while running.load(ordering: .acquiring) {
            var fds = [pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: notifier.fd, events: Int16(POLLIN), revents: 0)]
            _ = poll(&fds, 2, 1000)
            if fds[1].revents != 0 { notifier.drain() }
            guard running.load(ordering: .acquiring), fds[0].revents & Int16(POLLIN) != 0 else { continue }
            let conn = cunixsock_accept(listenFD)
            if conn < 0 { continue }
            serve(conn)
        }
    }

    /// Client mode: connect, serve, and after a failure or a lost connection
    /// wait 50 ms, doubling up to 2 s while attempts keep failing. A connection
    /// that lasted under a second does not reset the wait: a front-end that
    /// accepts and drops at once is not retried in a tight loop.
    private func runClient() {
        var backoff = Self.firstBackoffMillis
        while running.load(ordering: .acquiring) {
            let conn = cunixsock_connect_nowait(socketPath)
            if conn < 0 {
                let why = "connect \(socketPath): \(String(cString: strerror(errno)))"
                let news = statusBox.withLock { s -> Bool in
                    defer { s.reconnectAttempts += 1; s.lastError = why }
                    return s.lastError != why  // one log line per new reason, not per attempt
                }
                if news { log("vhost-user: \(why); retrying (back-off up to \(Self.maxBackoffMillis) ms)") }
                pause(backoff)
                backoff = min(backoff * 2, Self.maxBackoffMillis)
                continue
            }
            let began = monotonicMillis()
            serve(conn)
            if monotonicMillis() - began >= 1000 { backoff = Self.firstBackoffMillis }
            pause(backoff)
            backoff = min(backoff * 2, Self.maxBackoffMillis)
        }
    }

    /// Waits `millis` unless stopped meanwhile.
    private func pause(_ millis: Int) {
        let end = monotonicMillis() + millis
        while running.load(ordering: .acquiring) {
            let left = end - monotonicMillis()
            if left <= 0 { return }
            var pfd = pollfd(fd: notifier.fd, events: Int16(POLLIN), revents: 0)
            if poll(&pfd, 1, Int32(left)) > 0 { notifier.drain() }
        }
    }

    /// Serves one front-end on `conn` until it leaves; closes `conn`.
    private func serve(_ conn: Int32) {
        updateStatus {
            $0.connected = true
            $0.connections += 1
            $0.features = 0
            $0.protocolFeatures = 0
            $0.lastError = nil
        }
        log(mode == .server ? "vhost-user front-end connected" : "vhost-user: connected to the front-end at \(socketPath)")
        let session = VhostUserSession(backend: self, handle: handle, conn: conn)
        let why = session.serve(while: { self.running.load(ordering: .acquiring) })
        session.teardown()
        close(conn)
        updateStatus {
            $0.connected = false
            if let why { $0.lastError = why }
        }
        log("vhost-user front-end disconnected" + (why.map { ": \($0)" } ?? ""))
    }
}
