// The vhost-user backends, by device id: created with their device, stopped
// before it is deleted and when the daemon stops.
import Platform
import Vhost
import VhostUser

final class VhostUserRegistry: Sendable {
    private let byDevice = Locked<[String: VhostUserBackend]>([:])

    func add(_ id: String, _ backend: VhostUserBackend) { byDevice.withLock { $0[id] = backend } }

    /// Forgets `id`'s backend and returns it (the caller stops it).
    func remove(_ id: String) -> VhostUserBackend? { byDevice.withLock { $0.removeValue(forKey: id) } }

    /// The front-end's state for `id`, nil for a device without vhost-user.
    func status(_ id: String) -> VhostUserStatus? { byDevice.withLock { $0[id] }?.status }

    /// Drops every front-end and closes every socket.
    func stopAll() {
        let all = byDevice.withLock { t -> [VhostUserBackend] in
            defer { t.removeAll() }
            return Array(t.values)
        }
        for b in all { b.stop() }
    }
}
