// An executor for control-plane work that must leave the thread producing it.
// The engine's one (the "completions" thread) takes what the datapath hands
// back: command completions (JSON rendering, resuming HTTP connections),
// long-poll deliveries and miss observers (logging, forwarding). A datapath
// thread only appends here, so slow readers never cost the datapath time. The
// devices service has another ("teardown") for work that joins threads.
import Glibc
import Platform

/// An executor: closures run one at a time, in the order queued, on one
/// thread of its own (named after the executor: `completions`, `teardown`).
public final class ControlExecutor: @unchecked Sendable {
    private let queue = Locked<(items: [@Sendable () -> Void], running: Bool)>(([], true))
    private let wake = WakeSignal()
    private var thread: pthread_t?

    public init(name: String = "completions") {
        thread = startThread(name: name) { [self] in run() }
    }

    /// Queues `body`; it runs after everything queued before it. Once stopped,
    /// runs it at once on the caller's thread, so nothing is ever dropped.
    public func run(_ body: @escaping @Sendable () -> Void) {
        let accepted = queue.withLock { q -> Bool in
            guard q.running else { return false }
            q.items.append(body)
            return true
        }
        if accepted { wake.signal() } else { body() }
    }

    /// Runs what is queued, then stops the thread.
    public func stop() {
        queue.withLock { $0.running = false }
        wake.signal()
        if let t = thread { pthread_join(t, nil) }
        thread = nil
    }

    private func run() {
        var batch: [@Sendable () -> Void] = []
        while true {
            let running = queue.withLock { q -> Bool in
                swap(&batch, &q.items)
                return q.running
            }
            for b in batch { b() }
            batch.removeAll(keepingCapacity: true)
            guard queue.withLock({ $0.items.isEmpty }) else { continue }
            if !running { return }
            wake.wait(timeoutNanos: 100_000_000)  // a signal since the check returns at once
        }
    }
}
