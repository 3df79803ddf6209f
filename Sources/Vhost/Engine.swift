// The engine: datapath workers and the registry of devices.
import Platform
import Ports
import Synchronization
import IOTLB

/// A device as seen from outside its worker: configuration and a way to run
/// operations on it. Thread-safe.
public final class DeviceHandle: Sendable {
    /// Creation parameters.
    public let config: DeviceConfig
    /// The worker that owns the device.
    public let worker: DatapathWorker
    /// The device's misses and access failures (long-polled directly, not through the worker).
    public let missLog: MissLog
    /// Where `perform`'s completions run: off the datapath thread.
    let completions: ControlExecutor

    init(config: DeviceConfig, worker: DatapathWorker, completions: ControlExecutor) {
        self.config = config
        self.worker = worker
        self.completions = completions
        self.missLog = MissLog(completions: completions)
    }

    /// Runs `op` on the owning thread between batches, then `done` with its
    /// result on the control plane's completion thread (rendering and answering
    /// never take datapath time). `op` receives nil when the device is gone
    /// (deleted, shutting down).
    public func perform<T: Sendable>(_ op: @escaping @Sendable (Device?) -> T,
                                     then done: @escaping @Sendable (T) -> Void) {
        let id = config.id
        let completions = self.completions
        worker.submit { w in
            let v = op(w.devices[id])
            completions.run { done(v) }
        }
    }

    /// Runs `op` on the owning thread between batches without waiting: `op`
    /// itself publishes whatever the caller needs to learn (an atomic, say).
    public func submit(_ op: @escaping @Sendable (Device?) -> Void) {
        let id = config.id
        worker.submit { w in op(w.devices[id]) }
    }

    /// Runs `op` on the owning thread and waits for its result.
    public func performSync<T: Sendable>(_ op: @escaping @Sendable (Device?) -> T) -> T {
        let id = config.id
        return worker.sync { w in op(w.devices[id]) }
    }
}

/// Workers plus their index of devices (placement, peer wiring, shutdown).
/// Which devices exist, and where each is in its life, is the caller's to
/// decide (the daemon's `DeviceRegistry`): it creates and deletes here.
public final class Engine: Sendable {
    /// Limits applied to every device.
    public let limits: EngineLimits
    private let workers: [DatapathWorker]
    /// Runs command completions and miss deliveries off the datapath threads.
    public let completions = ControlExecutor()
    private let registry = Locked<(byId: [String: DeviceHandle], order: [String], nextId: Int, open: Bool)>(([:], [], 0, true))

    /// An engine with `datapathThreads` workers, started at once.
    public init(datapathThreads: Int = 1, limits: EngineLimits = EngineLimits()) {
        precondition(datapathThreads >= 1)
        self.limits = limits
        self.workers = (0..<datapathThreads).map { DatapathWorker(index: $0) }
        for w in workers { w.start() }
    }

    /// Registers a device and has its worker create it. An empty `config.id`
    /// gets a generated one ("dev0", "dev1", ...).
    /// `tap`: the opened interface of a TAP port (the caller opens it, so a
    /// refusal comes before anything is registered); the device owns it.
    /// A peer port is wired as soon as its peer exists and names this device back.
    public func createDevice(_ requested: DeviceConfig, tap: TapInterface? = nil) throws(EngineError) -> DeviceHandle {
        let limits = self.limits
        let handle: DeviceHandle = try registry.withLock { r throws(EngineError) -> DeviceHandle in
            guard r.open else { throw .unavailable }
            var config = requested
            if config.id.isEmpty {
                repeat { config.id = "dev\(r.nextId)"; r.nextId += 1 } while r.byId[config.id] != nil
            }
            guard r.byId[config.id] == nil else { throw .conflict("device \(config.id) exists") }
            // Spread devices over workers: the least loaded one.
            let load = Dictionary(grouping: r.byId.values, by: { $0.worker.index }).mapValues(\.count)
            let worker = workers.min { load[$0.index, default: 0] < load[$1.index, default: 0] }!
            let h = DeviceHandle(config: config, worker: worker, completions: completions)
            r.byId[config.id] = h
            r.order.append(config.id)
            let frozen = config
            let log = h.missLog
            worker.submit { w in
                let d = Device(config: frozen, limits: limits, missLog: log, tap: tap)
                d.owner = .passUnretained(w)
                d.adoptThread()
                w.devices[frozen.id] = d
            }
            if case .peer(let other) = config.port, let p = r.byId[other], p.config.port == .peer(device: config.id) {
                Self.wire(h, p)
            }
            return h
        }
        return handle
    }

    /// Wires two peer devices: a frame ring each way, one per queue pair of
    /// the sender. Each side gets its ends on its own worker, after the
    /// commands queued before (its creation among them).
    private static func wire(_ a: DeviceHandle, _ b: DeviceHandle) {
        let ab = (0..<a.config.queuePairs).map { _ in FrameRing() }
        let ba = (0..<b.config.queuePairs).map { _ in FrameRing() }
        let (wa, wb) = (a.worker, b.worker)
        a.submit { $0?.port.link(out: ab, inbound: ba, peerWorker: wb) }
        b.submit { $0?.port.link(out: ba, inbound: ab, peerWorker: wa) }
    }

    /// The device named `id`.
    public func device(_ id: String) -> DeviceHandle? { registry.withLock { $0.byId[id] } }

    /// Every device, in creation order.
    public func devices() -> [DeviceHandle] { registry.withLock { r in r.order.compactMap { r.byId[$0] } } }

    /// Unregisters `id`; its worker drops the device (and its memory) after
    /// the commands queued before. `done` runs once it is gone.
    public func deleteDevice(_ id: String, then done: @escaping @Sendable () -> Void) -> Bool {
        guard let h = registry.withLock({ r -> DeviceHandle? in
            guard let h = r.byId.removeValue(forKey: id) else { return nil }
            r.order.removeAll { $0 == id }
            return h
        }) else { return false }
        if case .peer(let other) = h.config.port, let p = device(other), p.config.port == .peer(device: id) {
            // Its peer drops the wires first: from then on it counts its frames as peer_down.
            p.submit { $0?.port.unlink() }
        }
        h.worker.submit { w in
            w.devices[id]?.detach()
            w.devices[id] = nil
            h.missLog.close()
            h.completions.run(done)
        }
        return true
    }

    /// Stops every worker after their queued commands ran; later commands see no devices.
    public func shutdown() {
        let handles = registry.withLock { r -> [DeviceHandle] in
            r.open = false
            return Array(r.byId.values)
        }
        for h in handles { h.performSync { $0?.detach() } }
        for w in workers { w.stop() }
        completions.stop()
    }
}
