// The per-device log of outstanding misses and access failures, with a
// cursor (`seq`, strictly increasing). The datapath worker posts and
// resolves; HTTP long-polls read and wait. Not on the per-packet path: a
// queue posts at most one event and then stops. Waiters and observers are
// answered on the completion thread, never on the posting datapath thread.
import Platform
import Synchronization
import IOTLB

/// One published event.
public struct MissEvent: Sendable, Equatable {
    /// "miss" or "access_fail".
    public enum Kind: String, Sendable { case miss, accessFail = "access_fail" }
    /// Position in the device's log.
    public var seq: UInt64
    /// The virtqueue that stopped.
    public var vq: Int
    public var kind: Kind
    /// The first byte that could not be accessed.
    public var iova: IOVA
    /// The permission the access needed.
    public var perm: Permissions
    /// When it was posted (monotonic ns).
    public var postedAt: UInt64
}

/// What a waiting poller is finally given.
public enum MissAnswer: Sendable {
    /// Outstanding events after the cursor (maybe none, on time-out) and the cursor to continue from.
    case events([MissEvent], lastSeq: UInt64)
    /// The device was deleted (or the daemon is stopping) while it waited.
    case closed
}

/// A poller waiting for events; answered exactly once, by an event, its time-out, or closing.
public final class MissWaiter: Sendable {
    let after: UInt64
    let limit: Int
    private let done = Atomic<Bool>(false)
    private let deliver: @Sendable (MissAnswer) -> Void

    init(after: UInt64, limit: Int, deliver: @escaping @Sendable (MissAnswer) -> Void) {
        self.after = after
        self.limit = limit
        self.deliver = deliver
    }

    /// Answers unless already answered; returns whether this call answered.
    @discardableResult
    public func finish(_ answer: MissAnswer) -> Bool {
        guard !done.exchange(true, ordering: .acquiringAndReleasing) else { return false }
        deliver(answer)
        return true
    }

    /// Whether it has been answered.
    public var isFinished: Bool { done.load(ordering: .acquiring) }
}

/// Outstanding events of one device, and the pollers waiting for them.
public final class MissLog: Sendable {
    private struct State {
        var events: [MissEvent] = []  // outstanding, ascending seq
        var head: UInt64 = 0          // highest seq ever assigned
        var waiters: [MissWaiter] = []
        var closed = false
    }
    private let state = Locked(State())
    private let observers = Locked<[@Sendable (MissEvent) -> Void]>([])

    /// Where waiters and observers are answered (nil: on the posting thread).
    private let completions: ControlExecutor?

    public init(completions: ControlExecutor? = nil) { self.completions = completions }

    /// Adds `body`, called (outside the log's lock, on the completion thread)
    /// for every event posted: logging, alerting and forwarding hang here.
    public func observe(_ body: @escaping @Sendable (MissEvent) -> Void) {
        observers.withLock { $0.append(body) }
    }

    /// Appends an event and wakes the pollers; returns its seq. The posting
    /// (datapath) thread only appends and takes the waiters: their answers are
    /// built where they are delivered (the completion thread), each from the
    /// log as it is then.
    func post(vq: Int, kind: MissEvent.Kind, iova: IOVA, perm: Permissions, now: UInt64) -> UInt64 {
        let (seq, woken) = state.withLock { s -> (UInt64, [MissWaiter]) in
            s.head += 1
            s.events.append(MissEvent(seq: s.head, vq: vq, kind: kind, iova: iova, perm: perm, postedAt: now))
            defer { s.waiters = [] }
            return (s.head, s.waiters)
        }
        let event = MissEvent(seq: seq, vq: vq, kind: kind, iova: iova, perm: perm, postedAt: now)
        let observers = self.observers
        let deliver: @Sendable () -> Void = { [self] in
            for w in woken { answerOrWait(w) }
            for o in observers.withLock({ $0 }) { o(event) }
        }
        if let completions { completions.run(deliver) } else { deliver() }
        return seq
    }

    /// Answers a woken poller with the events past its cursor; when there are
    /// none (resolved since, or its cursor is past them) it waits again.
    private func answerOrWait(_ w: MissWaiter) {
        guard !w.isFinished else { return }
        let now: MissAnswer? = state.withLock { s in
            if s.closed { return .closed }
            if s.events.contains(where: { $0.seq > w.after }) { return MissLog.answer(s, after: w.after, limit: w.limit) }
            s.waiters.append(w)
            return nil
        }
        if let now { w.finish(now) }
    }

    /// Removes an event (resolved, or its vring was set again).
    func remove(seq: UInt64) {
        state.withLock { s in s.events.removeAll { $0.seq == seq } }
    }

    /// Answers every waiter with `.closed`; later polls are answered `.closed` at once.
    public func close() {
        let woken = state.withLock { s -> [MissWaiter] in
            s.closed = true
            s.events.removeAll()
            defer { s.waiters.removeAll() }
            return s.waiters
        }
        let answer: @Sendable () -> Void = { for w in woken { w.finish(.closed) } }
        if let completions { completions.run(answer) } else { answer() }
    }

    /// Outstanding events now.
    public var outstandingCount: Int { state.withLock { $0.events.count } }

    /// Outstanding events with seq > `after`, oldest first, at most `limit`.
    public func events(after: UInt64, limit: Int) -> MissAnswer {
        state.withLock { s in s.closed ? .closed : MissLog.answer(s, after: after, limit: limit) }
    }

    /// Answers at once when events with seq > `after` are outstanding (or the
    /// log is closed); otherwise registers a waiter that the next event
    /// answers. The caller owns the time-out: it calls `finish` on the waiter.
    public func poll(after: UInt64, limit: Int, deliver: @escaping @Sendable (MissAnswer) -> Void) -> MissWaiter {
        let w = MissWaiter(after: after, limit: limit, deliver: deliver)
        let now: MissAnswer? = state.withLock { s in
            if s.closed { return .closed }
            if s.events.contains(where: { $0.seq > after }) { return MissLog.answer(s, after: after, limit: limit) }
            s.waiters.removeAll { $0.isFinished }
            s.waiters.append(w)
            return nil
        }
        if let now { w.finish(now) }
        return w
    }

    /// What a time-out answers: no events, and the cursor to continue from.
    public func timeoutAnswer(after: UInt64) -> MissAnswer {
        state.withLock { s in s.closed ? .closed : .events([], lastSeq: s.head) }
    }

    private static func answer(_ s: State, after: UInt64, limit: Int) -> MissAnswer {
        let picked = Array(s.events.lazy.filter { $0.seq > after }.prefix(limit))
        // The newest seq returned, or the head when nothing is: every event up
        // to the head that is not outstanding was resolved already.
        return .events(picked, lastSeq: picked.last?.seq ?? s.head)
    }
}
