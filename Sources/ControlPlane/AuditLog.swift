// The audit trail: one JSON line per state-changing request (every method but
// GET and HEAD, answered or refused): time, credential name (never a secret),
// peer, method, route, path, device, status, duration.
//
// Request threads only queue the line (one short lock). A writer thread of its
// own writes what is queued and, for --audit-log FILE, fsyncs it before it
// takes more: nothing on a request thread waits on the disk. A queue past
// `maxQueued` lines drops (and counts) rather than block a request.
import Glibc
import HTTP
import JSON
import Platform
import Synchronization

/// Where audit lines go: stderr (journald under systemd) or a file, appended.
public final class AuditLog: Sendable {
    /// The file, nil for stderr.
    public let path: String?
    private struct Queue {
        var lines: [[UInt8]] = []
        var stopping = false
        var reopen = false
    }
    private let queue = Locked(Queue())
    private let wake = WakeSignal()
    private let fd: Atomic<Int32>
    private let droppedLines = Atomic<UInt64>(0)
    private let pendingLines = Atomic<Int>(0)
    private let done = WakeSignal()
    private let finished = Atomic<Bool>(false)
    /// Lines held at most before new ones are dropped.
    static let maxQueued = 100_000

    /// Opens `path` for appending (created 0600), or takes stderr; starts the writer thread.
    public init(path: String?) throws(SystemCallError) {
        self.path = path
        fd = Atomic(try path.map { (p: String) throws(SystemCallError) in try AuditLog.open(p) } ?? 2)
        // One writer for the daemon's life; `stop` waits for it to finish.
        pthread_detach(startThread(name: "audit-writer") { [self] in run() })
    }

    private static func open(_ path: String) throws(SystemCallError) -> Int32 {
        try syscall("cannot open --audit-log \(path)") { Glibc.open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600) }
    }

    /// Lines dropped because the queue was full.
    public var dropped: UInt64 { droppedLines.load(ordering: .relaxed) }
    /// Lines queued and not yet written.
    public var pending: Int { pendingLines.load(ordering: .relaxed) }

    /// Queues one line (a newline is added).
    public func record(_ line: [UInt8]) {
        let queued = queue.withLock { q -> Bool in
            guard q.lines.count < AuditLog.maxQueued, !q.stopping else { return false }
            q.lines.append(line + [10])
            return true
        }
        if queued {
            pendingLines.add(1, ordering: .relaxed)
            wake.signal()
        } else {
            droppedLines.add(1, ordering: .relaxed)
        }
    }

    /// Reopens the file (after logrotate moved it), on the writer thread.
    public func reopen() {
        guard path != nil else { return }
        queue.withLock { $0.reopen = true }
        wake.signal()
    }

    /// Writes what is queued, then stops the writer (waits up to two seconds).
    public func stop() {
        queue.withLock { $0.stopping = true }
        wake.signal()
        let deadline = monotonicNanos() + 2_000_000_000
        while !finished.load(ordering: .acquiring), monotonicNanos() < deadline { done.wait(timeoutNanos: 100_000_000) }
    }

    private func run() {
        while true {
            wake.wait(timeoutNanos: 1_000_000_000)
            let (lines, stopping, reopen) = queue.withLock { q in
                defer { q.lines.removeAll(keepingCapacity: true); q.reopen = false }
                return (q.lines, q.stopping, q.reopen)
            }
            if !lines.isEmpty {
                var out: [UInt8] = []
                out.reserveCapacity(lines.reduce(0) { $0 + $1.count })
                for l in lines { out += l }
                writeAll(out)
                if path != nil { fsync(fd.load(ordering: .relaxed)) }
                pendingLines.subtract(lines.count, ordering: .relaxed)
            }
            if reopen, let path, let fresh = try? AuditLog.open(path) {
                close(fd.exchange(fresh, ordering: .relaxed))
            }
            if stopping {
                if path != nil { close(fd.load(ordering: .relaxed)) }
                finished.store(true, ordering: .releasing)
                done.signal()
                return
            }
        }
    }

    private func writeAll(_ bytes: [UInt8]) {
        // Disk full or closed: the lines are lost, the daemon goes on.
        try? Platform.writeAll(fd.load(ordering: .relaxed), bytes, "audit log")
    }
}

/// One audit line: `{"time","credential","scope","via","peer","method","route","path","device"?,"status","duration_ms","reason"?}`.
/// The credential is named, never shown; an unauthenticated request's is "-".
func auditLine(_ request: Request, _ match: Router.Match, _ who: Identity?, status: Int, started: UInt64) -> [UInt8] {
    var fields: [(String, JSON)] = [
        ("time", .string(utcNow())),
        ("credential", .string(who?.name ?? "-")),
        ("scope", who.map { .string($0.scope.description) } ?? .null),
        ("via", .string(who?.via ?? "none")),
        ("peer", .string(request.peer.address.isEmpty ? "local" : request.peer.address)),
        ("method", .string(request.method)),
        ("route", .string(match.pattern ?? "unmatched")),
        ("path", .string(request.path)),
    ]
    if let id = match.params["id"] {
        fields.append(("device", .string(id)))
    } else if match.pattern == "/v1/devices", let body = try? request.json(), case .string(let id)? = body["id"] {
        fields.append(("device", .string(id)))
    }
    fields.append(("status", .int(Int64(status))))
    fields.append(("duration_ms", .double((Double(monotonicNanos() &- started) / 1e3).rounded() / 1e3)))
    return JSON.object(fields).serialized()
}

/// Wall-clock time, UTC, as RFC 3339 with milliseconds.
func utcNow() -> String {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    var t = tm()
    var secs = ts.tv_sec
    gmtime_r(&secs, &t)
    func pad(_ v: Int32, _ n: Int) -> String {
        let s = String(v)
        return String(repeating: "0", count: max(0, n - s.count)) + s
    }
    return "\(pad(t.tm_year + 1900, 4))-\(pad(t.tm_mon + 1, 2))-\(pad(t.tm_mday, 2))T"
        + "\(pad(t.tm_hour, 2)):\(pad(t.tm_min, 2)):\(pad(t.tm_sec, 2)).\(pad(Int32(ts.tv_nsec / 1_000_000), 3))Z"
}
