// The devices the control plane manages. Each one is an engine device plus the
// parts kept beside it: its vhost-user front-end (when it has one), its miss
// logger, and its built-in guest (when one was started). Creating, deleting and
// shutting down go through here, so a device's parts come and go together; the
// routes parse, call, and render.
import Glibc
import Guest
import Logging
import Platform
import Ports
import Vhost
import VhostUser

/// Why the devices service refused. Nothing was changed when one is thrown.
/// The control plane gives each its HTTP answer (`APIError(_:fieldPrefix:)`).
public enum DeviceServiceError: Error, Sendable {
    /// A device with this id exists.
    case exists(id: String)
    /// The vhost-user socket path was refused (outside the directory, a symlink, too long...).
    case socketRefused(String)
    /// Another device serves or connects to this socket.
    case socketTaken(path: String, by: String)
    /// The socket could not be made or connected to.
    case socketSetup(VhostUserSetupError)
    /// The engine refused.
    case engine(EngineError)
    /// The port could not be set up (a TAP that cannot be opened): why.
    case portUnavailable(String)
    /// No device with this id.
    case notFound(id: String)
    /// A workload is starting or running on the device.
    case workloadBusy(id: String)
    /// The built-in guest cannot run on this device: why.
    case workloadUnsuitable(String)
    /// The device has no workload.
    case noWorkload(id: String)
}

/// One device as the service holds it: the engine's handle and the parts
/// kept beside it, made and dropped together (README, "Device types").
public final class DeviceParts: Sendable {
    /// The engine's device.
    public let handle: DeviceHandle
    /// The vhost-user backend serving (or connecting to) its socket, nil without vhost-user.
    public let frontEnd: VhostUserBackend?
    /// Logs its access failures and miss storms.
    let missLogger: MissLogger
    /// Its built-in guest: the latest one (running or finished) and whether another is starting.
    let workloadSlot = Locked(WorkloadSlot())

    init(handle: DeviceHandle, frontEnd: VhostUserBackend?, missLogger: MissLogger) {
        self.handle = handle
        self.frontEnd = frontEnd
        self.missLogger = missLogger
    }

    /// Its id.
    public var id: String { handle.config.id }
    /// Its configuration (as the engine settled it: ids and socket paths filled in).
    public var config: DeviceConfig { handle.config }

    /// The latest workload (running or finished), nil when none was started or it was stopped.
    public var workload: Workload? { workloadSlot.withLock { $0.current } }

    /// Takes its workload away for good (the device goes): a start still
    /// setting up stops its guest when it finishes.
    func takeWorkloadForDeletion() -> Workload? {
        workloadSlot.withLock { s in
            s.deleted = true
            defer { s.current = nil }
            return s.current
        }
    }
}

/// A device's built-in guest, as far as the control plane knows it.
struct WorkloadSlot {
    /// The latest workload started; kept once it finished so its figures stay readable.
    var current: Workload?
    /// A start was accepted and has not finished setting up.
    var starting = false
    /// The device was deleted (or the daemon is stopping): a start that finishes
    /// now stops its guest at once.
    var deleted = false
}

/// The devices service: every device the control plane manages, by id, in
/// creation order (README, "Device types"). Its
/// `DeviceRegistry` is the one truth of which devices exist and where each is
/// in its life (creating, running, deleting); teardown work (joining a guest's
/// or a front-end's thread) runs on one thread of its own, in order.
public final class DeviceService: Sendable {
    /// The engine that runs them.
    public let engine: Engine
    /// Where the configuration is written: creates, deletes and workloads are recorded.
    public let store: ConfigStore
    private let sockets: VhostUserSockets
    /// Whether a TAP port may create its interface (--tap-create); else it attaches only.
    private let tapCreate: Bool
    let logger: Logger
    let registry = DeviceRegistry()
    /// Deletes, workload stops and creates that waited for a deletion: one
    /// thread, in order, so that no request thread joins another thread and
    /// no delete starts a thread of its own.
    let teardown = ControlExecutor(name: "teardown")

    /// The devices of `engine`, recorded in `store`, with vhost-user sockets where `sockets` allows;
    /// `tapCreate`: a TAP port may make its interface (else it only attaches to one that exists).
    public init(engine: Engine, store: ConfigStore, sockets: VhostUserSockets, logger: Logger, tapCreate: Bool = false) {
        self.engine = engine
        self.store = store
        self.sockets = sockets
        self.logger = logger
        self.tapCreate = tapCreate
        let registry = self.registry
        store.attach { registry.configuration() }
    }

    // MARK: Look-ups

    /// The running device named `id` (not one being created or deleted).
    public func device(_ id: String) -> DeviceParts? { registry.running(id) }

    /// Every running device, in creation order.
    public func all() -> [DeviceParts] { registry.allRunning() }

    /// Where device `id` is in its life; nil when there is none.
    public func lifecycle(_ id: String) -> DeviceLifecycle? { registry.lifecycle(id) }

    // MARK: Create, delete, shut down

    /// Creates a device with its parts (see `make`); `done` gets it once the
    /// configuration's state file holds it (on the saver's thread, or at once
    /// without --state-dir). Refusals known at once are thrown; when a device
    /// being deleted holds the id or the socket, the create waits until it is
    /// gone and then proceeds (or is refused through `done`), on the teardown thread.
    public func create(_ requested: DeviceConfig, persist: Bool = true,
                       then done: @escaping @Sendable (Result<DeviceParts, DeviceServiceError>) -> Void) throws(DeviceServiceError) {
        let retry: @Sendable () -> Void = { [self] in
            teardown.run { [self] in
                do throws(DeviceServiceError) { try create(requested, persist: persist, then: done) } catch { done(.failure(error)) }
            }
        }
        guard let (d, saved) = try make(requested, persist: persist, retry: retry) else { return }
        store.whenSaved(saved) { done(.success(d)) }
    }

    /// Creates a device with its parts and returns it without waiting for the
    /// state file (start-up, tests). Waits, on the caller's thread, when a
    /// device being deleted holds the id or the socket: not for request threads.
    public func create(_ requested: DeviceConfig, persist: Bool = true) throws(DeviceServiceError) -> DeviceParts {
        while true {
            let gone = WakeSignal()
            if let (d, _) = try make(requested, persist: persist, retry: { gone.signal() }) { return d }
            gone.wait(timeoutNanos: 10_000_000_000)
        }
    }

    /// Creates a device with its parts: its id and socket reserved first (nil
    /// when a device being deleted holds either: `retry` runs once it went),
    /// then the vhost-user socket (a path that cannot be served creates no
    /// device), the TAP, the engine's device, its miss logger, the front-end
    /// started on it; `persist`: recorded in the configuration.
    private func make(_ requested: DeviceConfig, persist: Bool, retry: @escaping @Sendable () -> Void)
        throws(DeviceServiceError) -> (device: DeviceParts, saved: SaveTicket)? {
        var config = requested
        if let given = config.vhostUserSocket { config.vhostUserSocket = try sockets.resolve(given) }
        guard case .reserved(let id) = try registry.reserve(config, retry: retry) else { return nil }
        config.id = id
        let made: DeviceParts
        do throws(DeviceServiceError) { made = try makeParts(config) } catch {
            registry.release(id)
            throw error
        }
        let version: UInt64?
        do throws(DeviceServiceError) { version = try registry.started(made, record: persist ? ConfiguredDevice(config: made.config) : nil) } catch {
            made.frontEnd?.stop()
            _ = engine.deleteDevice(id) {}
            registry.release(id)
            throw error
        }
        return (made, store.changed(version))
    }

    /// The parts of a device whose id and socket are reserved.
    private func makeParts(_ config: DeviceConfig) throws(DeviceServiceError) -> DeviceParts {
        var frontEnd: VhostUserBackend?
        if let path = config.vhostUserSocket {
            do throws(VhostUserSetupError) {
                frontEnd = try VhostUserBackend(socket: path, mode: config.vhostUserMode,
                                                permissions: sockets.permissions, group: sockets.group)
            } catch {
                throw .socketSetup(error)
            }
        }
        var tap: TapInterface?
        if case .tap(let name) = config.port {
            do throws(TapError) { tap = try TapInterface(name: name, queues: config.queuePairs, create: tapCreate) } catch {
                frontEnd?.stop()
                throw .portUnavailable(error.description)
            }
        }
        let h: DeviceHandle
        do throws(EngineError) { h = try engine.createDevice(config, tap: tap) } catch {
            frontEnd?.stop()
            throw .engine(error)
        }
        let id = h.config.id
        logger.info("device created", metadata: ["device": "\(id)", "queues": "\(h.config.queues)",
                                                 "iotlb": "\(h.config.iotlb)",
                                                 "vhost_user": "\(h.config.vhostUserSocket.map { "\($0) (\(h.config.vhostUserMode.rawValue))" } ?? "-")"])
        let missLogger = MissLogger(device: id, logger: logger)
        missLogger.watch(h.missLog)
        if let frontEnd {
            let logger = self.logger
            frontEnd.start(handle: h, limits: engine.limits) { line in
                logger.info("\(line)", metadata: ["device": "\(id)"])
            }
        }
        return DeviceParts(handle: h, frontEnd: frontEnd, missLogger: missLogger)
    }

    /// Deletes running device `id` with its parts, on the teardown thread: its
    /// built-in guest stops first (it must not outlive the device's queues),
    /// its front-end is dropped while the device still exists, then the
    /// engine drops the device, answering its waiting long-polls; then its id
    /// and socket are free. Throws `.notFound` at once (none, or one being
    /// created or deleted); `done` runs once it is gone and the state file says so.
    public func delete(_ id: String, then done: @escaping @Sendable (Result<Void, DeviceServiceError>) -> Void) throws(DeviceServiceError) {
        guard let d = registry.beginDelete(id) else { throw .notFound(id: id) }
        let (engine, store, registry, teardown, logger) = (self.engine, self.store, self.registry, self.teardown, self.logger)
        teardown.run {
            _ = d.takeWorkloadForDeletion()?.stop()
            d.frontEnd?.stop()
            // Its id and socket are free from here; the delete is answered before
            // the creates that waited for them go on.
            let gone: @Sendable (_ answer: @escaping @Sendable () -> Void) -> Void = { answer in
                let (version, waiting) = registry.remove(id)
                store.whenSaved(store.changed(version), answer)
                for w in waiting { w() }
            }
            let inEngine = engine.deleteDevice(id) {
                logger.info("device deleted", metadata: ["device": "\(id)"])
                gone { done(.success(())) }
            }
            if !inEngine { gone { done(.failure(.notFound(id: id))) } }
        }
    }

    /// Stops every device's built-in guest and drops every front-end, closing
    /// its socket (before the engine stops the devices), after the teardown
    /// work queued so far. Later creates are refused as the engine's shutdown refuses them.
    public func shutdown() {
        let all = registry.close()
        teardown.stop()
        for d in all { _ = d.takeWorkloadForDeletion()?.stop() }
        for d in all { d.frontEnd?.stop() }
    }
}
