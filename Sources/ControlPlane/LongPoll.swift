// Time-outs for long-polls: one thread sleeps until the nearest deadline and
// answers expired waiters. A waiter is answered exactly once, by whichever
// comes first: an event, its deadline, or its device closing.
import Glibc
import Platform
import Synchronization
import Vhost

/// Deadlines of waiting long-polls.
final class LongPollTimer: @unchecked Sendable {
    private struct Entry {
        let deadline: UInt64
        let waiter: MissWaiter
        let expire: @Sendable () -> Void
    }
    private let entries = Locked<(list: [Entry], running: Bool)>(([], true))
    private let wake = WakeSignal()
    private var thread: pthread_t?

    init() {
        thread = startThread(name: "long-poll") { [self] in run() }
    }

    /// Calls `expire` at `deadline` (monotonic ns) unless the waiter was answered before.
    func schedule(deadline: UInt64, waiter: MissWaiter, expire: @escaping @Sendable () -> Void) {
        entries.withLock { $0.list.append(Entry(deadline: deadline, waiter: waiter, expire: expire)) }
        wake.signal()
    }

    /// Waiters scheduled and not yet answered.
    var pending: Int { entries.withLock { $0.list.filter { !$0.waiter.isFinished }.count } }

    /// Expires every waiter now and stops the thread.
    func stop() {
        let rest = entries.withLock { e -> [Entry] in
            e.running = false
            defer { e.list.removeAll() }
            return e.list
        }
        for e in rest where !e.waiter.isFinished { e.expire() }
        wake.signal()
        if let t = thread { pthread_join(t, nil) }
        thread = nil
    }

    private func run() {
        while true {
            let now = monotonicNanos()
            let (due, next, running) = entries.withLock { e -> ([Entry], UInt64, Bool) in
                e.list.removeAll { $0.waiter.isFinished }
                let due = e.list.filter { $0.deadline <= now }
                e.list.removeAll { $0.deadline <= now }
                return (due, e.list.map(\.deadline).min() ?? now + 1_000_000_000, e.running)
            }
            for d in due { d.expire() }
            if !running { return }
            wake.wait(timeoutNanos: max(next > now ? next - now : 0, 100_000))
        }
    }
}
