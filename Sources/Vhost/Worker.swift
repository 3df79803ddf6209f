// A datapath worker: one thread that owns a set of devices. Every mutation
// of a device is a command this thread applies between batches, so once a
// command's completion has run, no datapath access uses what it replaced.
// The threads around it, and what each may wait on: README, "Threads".
import CFaultGuard
import Glibc
import Platform
import Synchronization

/// One datapath thread and the devices it owns.
public final class DatapathWorker: @unchecked Sendable {
    /// A unit of work run on the worker thread; the device map is the worker's own.
    public typealias Command = @Sendable (DatapathWorker) -> Void

    /// The worker's number (for thread names and logs).
    public let index: Int
    private let queue = Locked<(commands: [Command], stopped: Bool)>(([], false))
    private let queued = Atomic<Int>(0)
    private let wake = EventWake()
    private var thread: pthread_t?
    private let running = Atomic<Bool>(true)
    private let sleeping = Atomic<Bool>(false)

    /// Devices owned by this worker, by id. Touched only on the worker thread.
    public internal(set) var devices: [String: Device] = [:] {
        didSet { rebuildPollList() }
    }
    /// The devices again, without reference counting, for the polling loop.
    ///
    /// SAFETY: touched only on the worker thread, like `devices`. Behind a
    /// pointer, the loop pays no run-time exclusivity check per round. The
    /// devices are unretained: `devices` owns them, and the list is rebuilt
    /// whenever that changes.
    private struct PollList {
        var devices = UnsafeMutablePointer<Unmanaged<Device>>.allocate(capacity: 1)
        var count = 0
        /// What the thread sleeps on: its wake-up eventfd, then the devices' TAP queues.
        var sleepFDs = UnsafeMutablePointer<pollfd>.allocate(capacity: 1)
        /// The command queue's other array: the batch being applied (see `drainCommands`).
        var spareCommands: [Command] = []
    }
    private let polled: UnsafeMutablePointer<PollList> = {
        let p = UnsafeMutablePointer<PollList>.allocate(capacity: 1)
        p.initialize(to: PollList())
        return p
    }()
    private var pollList: UnsafeMutablePointer<Unmanaged<Device>> { polled.pointee.devices }
    private var pollCount: Int { polled.pointee.count }

    private func rebuildPollList() {
        polled.pointee.devices.deallocate()
        polled.pointee.devices = .allocate(capacity: max(devices.count, 1))
        polled.pointee.count = 0
        var watched = 1
        for d in devices.values {
            (polled.pointee.devices + polled.pointee.count).initialize(to: .passUnretained(d))
            polled.pointee.count += 1
            watched += d.port.pairs
        }
        polled.pointee.sleepFDs.deallocate()
        polled.pointee.sleepFDs = .allocate(capacity: watched)
    }

    /// Empty rounds the thread keeps polling before it starts sleeping (a round
    /// is well under a microsecond): long enough to bridge a driver's gaps between
    /// batches, short enough that an idle daemon sleeps.
    static let spinRounds = 20_000
    /// How long an idle thread sleeps when every device's work wakes it (kicks, TAPs, commands).
    static let longSleepNanos: UInt64 = 1_000_000_000

    init(index: Int) {
        self.index = index
    }

    deinit {
        polled.pointee.sleepFDs.deallocate()
        polled.pointee.devices.deallocate()
        polled.deinitialize(count: 1)  // the spare command array's buffer
        polled.deallocate()
    }

    func start() {
        thread = startThread(name: "datapath-\(index)") { [self] in run() }
    }

    /// Queues `command`; it runs on the worker thread, in submission order.
    /// After `stop()` the command runs at once on the caller's thread with an
    /// empty device map, so every completion still fires exactly once.
    public func submit(_ command: @escaping Command) {
        let accepted = queue.withLock { q -> Bool in
            if q.stopped { return false }
            q.commands.append(command)
            return true
        }
        if accepted {
            queued.add(1, ordering: .releasing)
            wake.signal()
        } else {
            command(DatapathWorker(index: -1))
        }
    }

    /// Whether commands wait to be applied: a long batch of traffic stops
    /// early for them, so a driver that waits on its command (a strict-mode
    /// invalidation) is not held up by a whole batch. One relaxed load.
    @inline(__always) var hasWaitingCommands: Bool { queued.load(ordering: .relaxed) > 0 }

    /// A driver's notification ("kick"): wakes the thread if it is backing off idle.
    /// Costs one atomic load when the thread is busy polling.
    public func kick() {
        if sleeping.load(ordering: .sequentiallyConsistent) { wake.signal() }
    }

    /// Runs `body` on the worker thread and waits for its result (tests, tools).
    public func sync<T: Sendable>(_ body: @escaping @Sendable (DatapathWorker) -> T) -> T {
        let box = Locked<T?>(nil)
        let done = WakeSignal()
        submit { w in
            let v = body(w)
            box.withLock { $0 = v }
            done.signal()
        }
        // The worker picks commands up between batches, within microseconds
        // when busy: spin briefly before sleeping, a futex round trip costs more.
        let spinUntil = monotonicNanos() + 50_000
        while monotonicNanos() < spinUntil {
            if let v = box.withLock({ $0 }) { return v }
        }
        while true {
            if let v = box.withLock({ $0 }) { return v }
            done.wait(timeoutNanos: 100_000_000)
        }
    }

    /// Stops the thread after it has run every queued command.
    func stop() {
        queue.withLock { $0.stopped = true }
        running.store(false, ordering: .releasing)
        wake.signal()
        if let t = thread { pthread_join(t, nil) }
        thread = nil
    }

    @discardableResult
    private func drainCommands() -> Bool {
        guard queued.load(ordering: .acquiring) > 0 else { return false }
        // Two arrays swapped (the queue's and this thread's): taking a batch allocates nothing.
        queue.withLock { q in swap(&q.commands, &polled.pointee.spareCommands) }
        let count = polled.pointee.spareCommands.count
        queued.subtract(count, ordering: .relaxed)
        for i in 0..<count { polled.pointee.spareCommands[i](self) }
        polled.pointee.spareCommands.removeAll(keepingCapacity: true)
        return true
    }

    private func run() {
        var idleNanos: UInt64 = 0
        var idleRounds = 0
        var faultsSeen = CFaultGuard_total()
        while running.load(ordering: .acquiring) {
            // A front-end shrank a memory file under us (SIGBUS caught): one load
            // per round tells whether to look which device lost memory.
            let faults = CFaultGuard_total()
            if faults != faultsSeen {
                faultsSeen = faults
                for d in devices.values { d.checkLostMemory() }
            }
            // Commands come in bursts (an orchestrator's answers): keep polling after one.
            if drainCommands() { idleRounds = 0 }
            var busy = false
            for i in 0..<pollCount where pollList[i]._withUnsafeGuaranteedRef({ $0.poll() }) { busy = true }
            if busy {
                idleNanos = 0
                idleRounds = 0
            } else if idleRounds < Self.spinRounds {
                idleRounds += 1
            } else {
                // Back off while idle so an idle daemon costs next to nothing; a
                // command or a driver's kick wakes the thread at once. Drivers that
                // kick are asked to before the last look (vhost_enable_notify).
                sleeping.store(true, ordering: .sequentiallyConsistent)
                var late = false
                for i in 0..<pollCount { pollList[i]._withUnsafeGuaranteedRef { $0.setKickNotification(true) } }
                for i in 0..<pollCount where pollList[i]._withUnsafeGuaranteedRef({ $0.poll() }) { late = true }
                if late {
                    idleNanos = 0
                    idleRounds = 0
                } else {
                    idleNanos = min(max(idleNanos * 2, 20_000), 4_000_000)
                    // TAP queues with room in their guest's RX ring wake the thread when a frame arrives.
                    let fds = polled.pointee.sleepFDs
                    var watched = 1
                    var allWake = true
                    for i in 0..<pollCount {
                        pollList[i]._withUnsafeGuaranteedRef { d in
                            watched = d.watchFDs(fds, from: watched)
                            if !d.wakesWorker() { allWake = false }
                        }
                    }
                    // When every source of work wakes the thread, a long sleep costs nothing; the
                    // cap is a safety net only.
                    wake.wait(timeoutNanos: allWake ? Self.longSleepNanos : idleNanos, fds: fds, count: watched)
                }
                sleeping.store(false, ordering: .relaxed)
                for i in 0..<pollCount { pollList[i]._withUnsafeGuaranteedRef { $0.setKickNotification(false) } }
            }
        }
        drainCommands()
    }
}
