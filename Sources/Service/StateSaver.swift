// The state file's writer: one thread of its own, so that no server thread
// and not the completion thread ever waits on the disk. Changes are numbered
// (a version, bumped under the configuration's lock); the thread writes the
// newest document it finds, so changes made while it wrote are coalesced into
// the next write, and versions reach the disk in order. Whoever must answer
// only once a change is on the disk hands a callback to `whenSaved`; it runs
// on this thread, without holding any other.
import Glibc
import Logging
import Platform

/// A change's place in the order of changes: answered once the state file holds it.
public struct SaveTicket: Sendable, Comparable {
    let version: UInt64
    /// Nothing to wait for.
    public static let none = SaveTicket(version: 0)
    public static func < (a: SaveTicket, b: SaveTicket) -> Bool { a.version < b.version }
}

/// Writes the configuration document to the state file on a thread of its own.
final class StateSaver: @unchecked Sendable {
    private struct State {
        /// The newest change made (or, paused, taken into the next `resume`).
        var wanted: UInt64 = 0
        /// The newest change the file holds (or whose write failed and was logged).
        var saved: UInt64 = 0
        var waiters: [(UInt64, @Sendable () -> Void)] = []
        var stopping = false
        var stopped = false
    }
    private let state = Locked(State())
    private let wake = WakeSignal()
    private let path: String
    private let logger: Logger
    /// The newest document and its version, taken under the configuration's lock.
    private let snapshot: @Sendable () -> (version: UInt64, bytes: () -> [UInt8])
    private var thread: pthread_t?

    init(path: String, logger: Logger, snapshot: @escaping @Sendable () -> (version: UInt64, bytes: () -> [UInt8])) {
        self.path = path
        self.logger = logger
        self.snapshot = snapshot
        thread = startThread(name: "state-saver") { [self] in run() }
    }

    /// Change `version` was made: the thread writes it (with any made meanwhile).
    func changed(_ version: UInt64) {
        state.withLock { $0.wanted = max($0.wanted, version) }
        wake.signal()
    }

    /// The file holds everything up to `version` already (written by the caller, or loaded from it).
    func markSaved(_ version: UInt64) {
        let ready = state.withLock { s -> [@Sendable () -> Void] in
            s.saved = max(s.saved, version)
            s.wanted = max(s.wanted, version)
            return Self.take(&s)
        }
        for r in ready { r() }
    }

    /// Runs `body` once the file holds `ticket`'s change: at once when it does
    /// (or the saver stopped), else on the saver's thread after the write.
    func whenSaved(_ ticket: SaveTicket, _ body: @escaping @Sendable () -> Void) {
        let now = state.withLock { s -> Bool in
            if s.stopped || s.saved >= ticket.version { return true }
            s.waiters.append((ticket.version, body))
            return false
        }
        if now { body() }
    }

    /// Writes what is left, answers every waiter, then ends the thread.
    func stop() {
        state.withLock { $0.stopping = true }
        wake.signal()
        if let t = thread { pthread_join(t, nil) }
        thread = nil
    }

    private static func take(_ s: inout State) -> [@Sendable () -> Void] {
        let saved = s.saved
        let ready = s.waiters.filter { $0.0 <= saved }.map(\.1)
        s.waiters.removeAll { $0.0 <= saved }
        return ready
    }

    private func run() {
        while true {
            let (due, stopping) = state.withLock { ($0.wanted > $0.saved, $0.stopping) }
            if !due {
                if stopping { break }
                wake.wait(timeoutNanos: 1_000_000_000)
                continue
            }
            let (version, bytes) = snapshot()
            do throws(StartupError) { try ConfigStore.writeAtomically(bytes(), to: path) } catch {
                logger.error("state not saved: \(error.description)")  // answered all the same; the next change writes again
            }
            let ready = state.withLock { s -> [@Sendable () -> Void] in
                s.saved = max(s.saved, version)
                return Self.take(&s)
            }
            for r in ready { r() }
        }
        let left = state.withLock { s -> [@Sendable () -> Void] in
            s.stopped = true
            defer { s.waiters.removeAll() }
            return s.waiters.map(\.1)
        }
        for r in left { r() }
    }
}
