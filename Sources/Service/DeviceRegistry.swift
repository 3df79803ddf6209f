// The one registry of devices: which ids and vhost-user sockets are taken,
// where each device is in its life, and what the configuration records of
// it. Everything else follows its transitions: the engine's index and the
// worker's devices are made by `creating → running` and dropped by
// `deleting → gone`; the configuration document (GET /v1/config, the state
// file) is read from here.
//
//     (none) ──reserve──▶ creating ──started──▶ running ──beginDelete──▶ deleting ──remove──▶ (none)
//                            │                                                       ▲
//                            └──────────────── release (a part refused) ─────────────┘
//
// An id or a socket is taken from `reserve` until `remove`/`release`. A create
// that finds its id or its socket held by a device being deleted waits for it
// to go (`reserve` answers `.wait` and calls back when it went); one that finds
// them creating or running is refused. Only running devices are found
// (`running`, `allRunning`): one being created or deleted answers 404.
import Platform
import Vhost

/// Where a device is in its life.
public enum DeviceLifecycle: String, Sendable {
    /// Its id (and socket) are reserved; its parts are being made. Not listed.
    case creating
    /// Listed and served.
    case running
    /// DELETE accepted: its parts are being torn down. Not listed; its id and socket stay taken.
    case deleting
}

/// Every device by id, in creation order, with its lifecycle state.
final class DeviceRegistry: Sendable {
    private struct Entry {
        var state: DeviceLifecycle
        var device: DeviceParts?
        /// The vhost-user socket path it holds, if any.
        var socket: String?
        /// What the configuration records (nil: not recorded, as the demo device).
        var record: ConfiguredDevice?
        /// Run once it is gone: creates waiting for its id or socket.
        var whenGone: [@Sendable () -> Void] = []
    }
    private struct State {
        var order: [String] = []
        var entries: [String: Entry] = [:]
        /// Socket path → the id holding it.
        var sockets: [String: String] = [:]
        var nextId = 0
        var open = true
        /// Bumped by every change of what the configuration records.
        var version: UInt64 = 0
    }
    private let state = Locked(State())

    /// What `reserve` did.
    enum Reservation {
        /// The id (generated when the config had none) is now `creating`.
        case reserved(id: String)
        /// A device being deleted holds the id or the socket; `retry` runs once it went.
        case wait
    }

    /// Takes `config`'s id (generating "devN" for an empty one) and its socket
    /// for a device about to be made. Refused when either is held by a device
    /// being created or running, or the registry is closed.
    func reserve(_ config: DeviceConfig, retry: @escaping @Sendable () -> Void) throws(DeviceServiceError) -> Reservation {
        try state.withLock { s throws(DeviceServiceError) -> Reservation in
            guard s.open else { throw .engine(.unavailable) }
            var id = config.id
            if id.isEmpty {
                repeat { id = "dev\(s.nextId)"; s.nextId += 1 } while s.entries[id] != nil
            }
            if let e = s.entries[id] {
                guard e.state == .deleting else { throw .exists(id: id) }
                s.entries[id]!.whenGone.append(retry)
                return .wait
            }
            if let path = config.vhostUserSocket, let owner = s.sockets[path], let e = s.entries[owner] {
                guard e.state == .deleting else { throw .socketTaken(path: path, by: owner) }
                s.entries[owner]!.whenGone.append(retry)
                return .wait
            }
            s.entries[id] = Entry(state: .creating, socket: config.vhostUserSocket)
            s.order.append(id)
            if let path = config.vhostUserSocket { s.sockets[path] = id }
            return .reserved(id: id)
        }
    }

    /// A create that failed gives its id and socket back.
    func release(_ id: String) {
        for w in remove(id).whenGone { w() }
    }

    /// `d` is made: it is listed from now on. `record`: what the configuration
    /// records of it; returns the configuration's version then (nil: nothing
    /// recorded). Refused when the registry closed meanwhile (the daemon stops):
    /// the caller drops the parts and releases the id.
    func started(_ d: DeviceParts, record: ConfiguredDevice?) throws(DeviceServiceError) -> UInt64? {
        try state.withLock { s throws(DeviceServiceError) -> UInt64? in
            guard s.open else { throw .engine(.unavailable) }
            s.entries[d.id]?.state = .running
            s.entries[d.id]?.device = d
            guard let record else { return nil }
            s.entries[d.id]?.record = record
            s.version += 1
            return s.version
        }
    }

    /// Marks running device `id` as being deleted and returns it; nil when no
    /// device `id` runs (none, or one being created or deleted).
    func beginDelete(_ id: String) -> DeviceParts? {
        state.withLock { s in
            guard let e = s.entries[id], e.state == .running else { return nil }
            s.entries[id]!.state = .deleting
            return e.device
        }
    }

    /// Forgets `id` (its teardown finished, or its create failed): frees its id
    /// and socket. Returns the configuration's version when it was recorded,
    /// and what waited for it to go (for the caller to run).
    func remove(_ id: String) -> (version: UInt64?, whenGone: [@Sendable () -> Void]) {
        state.withLock { s in
            guard let e = s.entries.removeValue(forKey: id) else { return (nil, []) }
            s.order.removeAll { $0 == id }
            if let path = e.socket, s.sockets[path] == id { s.sockets[path] = nil }
            guard e.record != nil else { return (nil, e.whenGone) }
            s.version += 1
            return (s.version, e.whenGone)
        }
    }

    /// Changes what the configuration records of `id`; returns the version then
    /// (nil: `id` is not recorded, or gone).
    func record(_ id: String, _ change: (inout ConfiguredDevice) -> Void) -> UInt64? {
        state.withLock { s in
            guard s.entries[id]?.record != nil else { return nil }
            change(&s.entries[id]!.record!)
            s.version += 1
            return s.version
        }
    }

    /// The running device `id`.
    func running(_ id: String) -> DeviceParts? {
        state.withLock { s in s.entries[id].flatMap { $0.state == .running ? $0.device : nil } }
    }

    /// Every running device, in creation order.
    func allRunning() -> [DeviceParts] {
        state.withLock { s in s.order.compactMap { id in s.entries[id].flatMap { $0.state == .running ? $0.device : nil } } }
    }

    /// Where `id` is in its life; nil when there is no such device.
    func lifecycle(_ id: String) -> DeviceLifecycle? { state.withLock { $0.entries[id]?.state } }

    /// What the configuration records, in creation order, and its version.
    func configuration() -> (version: UInt64, devices: [ConfiguredDevice]) {
        state.withLock { s in (s.version, s.order.compactMap { s.entries[$0]?.record }) }
    }

    /// Refuses later reservations; returns the running devices.
    func close() -> [DeviceParts] {
        state.withLock { s in
            s.open = false
            return s.order.compactMap { id in s.entries[id].flatMap { $0.state == .running ? $0.device : nil } }
        }
    }
}
