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
public enum DevicesError: Error, Sendable {
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

/// One device and its parts.
public final class ManagedDevice: Sendable {
    /// The engine's device.
    public let handle: DeviceHandle
    /// The vhost-user backend serving (or connecting to) its socket, nil without vhost-user.
    public let frontEnd: VhostUserBackend?
    /// Logs its access failures and miss storms.
    let missLogger: MissLogger
    /// Whether the configuration (GET /v1/config, the state file) records it: not the demo device.
    let persisted: Bool
    /// Its built-in guest: the latest one (running or finished) and whether another is starting.
    let workloadSlot = Locked(WorkloadSlot())

    init(handle: DeviceHandle, frontEnd: VhostUserBackend?, missLogger: MissLogger, persisted: Bool) {
        self.handle = handle
        self.frontEnd = frontEnd
        self.missLogger = missLogger
        self.persisted = persisted
    }

    /// Its id.
    public var id: String { handle.config.id }
    /// Its configuration (as the engine settled it: ids and socket paths filled in).
    public var config: DeviceConfig { handle.config }

    /// The latest workload (running or finished), nil when none was started or it was stopped.
    public var workload: Workload? { workloadSlot.withLock { $0.current } }
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

/// Every device the control plane manages, by id, in creation order.
public final class Devices: Sendable {
    /// The engine that runs them.
    public let engine: Engine
    /// What clients configured: creates, deletes and workloads are recorded here.
    public let store: ConfigStore
    private let sockets: VhostUserSockets
    /// Whether a TAP port may create its interface (--tap-create); else it attaches only.
    private let tapCreate: Bool
    let logger: Logger
    private let registry = Locked<(order: [String], byId: [String: ManagedDevice], open: Bool)>(([], [:], true))

    /// The devices of `engine`, recorded in `store`, with vhost-user sockets where `sockets` allows;
    /// `tapCreate`: a TAP port may make its interface (else it only attaches to one that exists).
    public init(engine: Engine, store: ConfigStore, sockets: VhostUserSockets, logger: Logger, tapCreate: Bool = false) {
        self.engine = engine
        self.store = store
        self.sockets = sockets
        self.logger = logger
        self.tapCreate = tapCreate
    }

    // MARK: Look-ups

    /// The device named `id`.
    public func device(_ id: String) -> ManagedDevice? { registry.withLock { $0.byId[id] } }

    /// Every device, in creation order.
    public func all() -> [ManagedDevice] { registry.withLock { r in r.order.compactMap { r.byId[$0] } } }

    // MARK: Create, delete, shut down

    /// Creates a device with its parts: the vhost-user socket first (a path that
    /// cannot be served creates no device), then the engine's device, its miss
    /// logger, the front-end started on it; `persist`: recorded in the configuration.
    public func create(_ requested: DeviceConfig, persist: Bool = true) throws(DevicesError) -> ManagedDevice {
        var config = requested
        guard registry.withLock({ $0.open }) else { throw .engine(.unavailable) }
        if !config.id.isEmpty && (device(config.id) != nil || engine.device(config.id) != nil) {
            throw .exists(id: config.id)
        }
        var frontEnd: VhostUserBackend?
        if let given = config.vhostUserSocket {
            let path = try sockets.resolve(given)
            config.vhostUserSocket = path
            if let other = engine.devices().first(where: { $0.config.vhostUserSocket == path }) {
                throw .socketTaken(path: path, by: other.config.id)
            }
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
        // Recorded before it can be found, so that a delete's record always follows this one.
        if persist { store.created(h.config) }
        let d = ManagedDevice(handle: h, frontEnd: frontEnd, missLogger: missLogger, persisted: persist)
        registry.withLock { r in
            r.byId[id] = d
            r.order.append(id)
        }
        return d
    }

    /// Deletes `id` with its parts: its built-in guest stops first (it must not
    /// outlive the device's queues), its front-end is dropped while the device
    /// still exists, then the engine drops the device, answering its waiting
    /// long-polls. Throws `.notFound` at once; `done` runs once the device is gone.
    public func delete(_ id: String, then done: @escaping @Sendable (Result<Void, DevicesError>) -> Void) throws(DevicesError) {
        let found = registry.withLock { r -> ManagedDevice? in
            guard let d = r.byId.removeValue(forKey: id) else { return nil }
            r.order.removeAll { $0 == id }
            return d
        }
        guard let d = found else { throw .notFound(id: id) }
        let (engine, store, logger) = (self.engine, self.store, self.logger)
        // Joining the guest's thread is not for a server thread.
        startDetachedThread(name: "delete-device") {
            let workload = d.workloadSlot.withLock { s -> Workload? in
                s.deleted = true
                defer { s.current = nil }
                return s.current
            }
            _ = workload?.stop()
            d.frontEnd?.stop()
            let inEngine = engine.deleteDevice(id) {
                if d.persisted { store.deleted(id) }
                logger.info("device deleted", metadata: ["device": "\(id)"])
                done(.success(()))
            }
            if !inEngine { done(.failure(.notFound(id: id))) }
        }
    }

    /// Stops every device's built-in guest and drops every front-end, closing
    /// its socket (before the engine stops the devices). Later creates are
    /// refused as the engine's shutdown refuses them.
    public func shutdown() {
        let all = registry.withLock { r -> [ManagedDevice] in
            r.open = false
            return r.order.compactMap { r.byId[$0] }
        }
        for d in all {
            let w = d.workloadSlot.withLock { s -> Workload? in
                s.deleted = true  // a start still setting up stops its guest when it finishes
                defer { s.current = nil }
                return s.current
            }
            _ = w?.stop()
        }
        for d in all { d.frontEnd?.stop() }
    }
}
