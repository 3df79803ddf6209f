// The routes of the contract (DESIGN.md, "HTTP contract (v1)").
import IOTLB
import Platform
import Vhost
import VhostUser
import Logging

extension ControlPlane {
    static func addRoutes(to r: inout Router, engine: Engine, settings: ControlPlaneSettings, logger: Logger,
                          timer: LongPollTimer, workloads: WorkloadRegistry, vhostUsers: VhostUserRegistry,
                          store: ConfigStore, sockets: VhostUserSockets) {
        r.get("/healthz") { _ in .json(200, ["status": "ok"]) }
        addDeviceRoutes(to: &r, engine: engine, settings: settings, logger: logger, workloads: workloads,
                        vhostUsers: vhostUsers, store: store, sockets: sockets)
        addIOTLBRoutes(to: &r, engine: engine)
        addVringRoutes(to: &r, engine: engine, timer: timer, store: store)
        addWorkloadRoutes(to: &r, engine: engine, workloads: workloads, store: store)
        r.get("/v1/config") { _ in .json(200, store.document) }
    }

    static func addDeviceRoutes(to r: inout Router, engine: Engine, settings: ControlPlaneSettings, logger: Logger,
                                workloads: WorkloadRegistry, vhostUsers: VhostUserRegistry, store: ConfigStore,
                                sockets: VhostUserSockets) {
        r.post("/v1/devices") { req throws(APIError) in
            let body: JSON = req.body.isEmpty ? .object([]) : try req.json()
            let config = try parseDeviceConfig(body, settings: settings)
            let h = try createDevice(config, engine: engine, logger: logger, vhostUsers: vhostUsers, store: store,
                                     sockets: sockets)
            return h.reply({ d throws(EngineError) in d.detail }) {
                .json(201, .device(h.config, detail: $0, vhostUser: vhostUsers.status(h.config.id)))
            }
        }

        r.get("/v1/devices") { _ in
            .json(200, ["devices": .array(engine.devices().map { .device($0.config) })])
        }

        r.get("/v1/devices/{id}") { req throws(APIError) in
            let h = try engine.device(for: req)
            return h.reply({ d throws(EngineError) in d.detail }) {
                .json(200, .device(h.config, detail: $0, vhostUser: vhostUsers.status(h.config.id)))
            }
        }

        r.delete("/v1/devices/{id}") { req throws(APIError) in
            let id = req.params["id"] ?? ""
            guard engine.device(id) != nil else { throw .notFound("device \(id) not found") }
            return .deferred { complete in
                // The built-in guest stops first (it must not outlive the device's queues);
                // joining its thread is not for a server thread.
                startDetachedThread(name: "delete-device") {
                    _ = workloads.remove(id)
                    vhostUsers.remove(id)?.stop()  // the front-end is dropped while the device still exists
                    let found = engine.deleteDevice(id) {
                        store.deleted(id)
                        logger.info("device deleted", metadata: ["device": "\(id)"])
                        complete(.noContent)
                    }
                    if !found { complete(.error(.notFound("device \(id) not found"))) }
                }
            }
        }

        r.put("/v1/devices/{id}/mem-table") { req throws(APIError) in
            let h = try engine.device(for: req)
            try requireHTTPOwned(h, "memory table")
            let wanted = try parseRegions(req.json())
            let id = h.config.id
            return h.reply({ d throws(EngineError) in try d.setMemTable(wanted) }) {
                store.memTableSet(id, wanted)
                return .json(200, .memTable($0))
            }
        }

        r.get("/v1/devices/{id}/mem-table") { req throws(APIError) in
            let h = try engine.device(for: req)
            return h.reply({ d throws(EngineError) in
                guard let t = d.memTable else { throw .noMemTable }
                return t
            }) { .json(200, .memTable($0)) }
        }
    }

    /// One log line per access failure; one per miss storm (more than
    /// `stormPerSecond` misses in a second), at most every 10 s per device.
    static func watchMisses(_ h: DeviceHandle, logger: Logger) {
        let id = h.config.id
        let window = Locked<(start: UInt64, count: Int, lastWarned: UInt64)>((0, 0, 0))
        h.missLog.observe { e in
            if e.kind == .accessFail {
                logger.warning("access failure: vq stopped until its vring is set again",
                               metadata: ["device": "\(id)", "vq": "\(e.vq)", "iova": "\(e.iova)", "perm": "\(e.perm)"])
                return
            }
            let storm = window.withLock { w -> Int? in
                if e.postedAt - w.start > 1_000_000_000 { w.start = e.postedAt; w.count = 0 }
                w.count += 1
                guard w.count == stormPerSecond, e.postedAt - w.lastWarned > 10_000_000_000 else { return nil }
                w.lastWarned = e.postedAt
                return w.count
            }
            if let n = storm {
                logger.warning("miss storm: \(n)+ IOTLB misses in a second", metadata: ["device": "\(id)", "last_iova": "\(e.iova)"])
            }
        }
    }

    static let stormPerSecond = 1000

    /// `{"socket": PATH, "mode"?: "server"|"client"}`: the Unix socket path (as
    /// given: `VhostUserSockets.resolve` confines it) and who listens.
    static func parseVhostUser(_ v: JSON, path: String = "vhost_user") throws(APIError) -> (String, VhostUserMode) {
        var f = try FieldReader(v, path: path)
        guard let socket = try f.string("socket") else {
            throw .invalidField(f.pathOf("socket"), "required: the Unix socket path to serve or connect to")
        }
        let mode = try f.choice("mode", default: VhostUserMode.server)
        try f.finish()
        guard (1...107).contains(socket.utf8.count), !socket.utf8.contains(0) else {
            throw .invalidField(f.pathOf("socket"), "a socket path of 1 to 107 bytes")
        }
        return (socket, mode)
    }

    /// A device's creation options (`POST /v1/devices`, a configuration's
    /// `devices[i]`); `path` prefixes the fields named in refusals. Members in
    /// `ignoring` are left to the caller.
    static func parseDeviceConfig(_ body: JSON, path: String = "", settings: ControlPlaneSettings,
                                  ignoring: [String] = []) throws(APIError) -> DeviceConfig {
        var f = try FieldReader(body, path: path)
        for k in ignoring { _ = f.value(k) }
        var config = DeviceConfig(id: "")
        if let id = try f.string("id") {
            guard isValidDeviceId(id) else {
                throw .invalidField(f.pathOf("id"), "1 to 64 characters of A-Z a-z 0-9 _ . -")
            }
            config.id = id
        }
        config.queues = try f.int("queues", default: 2, in: 1...DeviceConfig.maxQueues)
        config.iotlb = try f.bool("iotlb", default: true)
        config.iotlbMaxEntries = try f.int("iotlb_max_entries", default: settings.iotlbMaxEntries,
                                           in: 1...IOTLB.entriesCeiling)
        config.backend = try f.choice("backend", default: .loopback)
        config.translator = try f.choice("translator", default: .builtin)
        if let v = f.value("vhost_user") {
            (config.vhostUserSocket, config.vhostUserMode) = try parseVhostUser(v, path: f.pathOf("vhost_user"))
        }
        try f.finish()
        return config
    }

    /// Creates a device (and its vhost-user backend), records it in the
    /// configuration. `field` prefixes the fields named in refusals.
    static func createDevice(_ requested: DeviceConfig, field: String = "", engine: Engine, logger: Logger,
                             vhostUsers: VhostUserRegistry, store: ConfigStore,
                             sockets: VhostUserSockets) throws(APIError) -> DeviceHandle {
        var config = requested
        let socketField = field + "vhost_user.socket"
        if !config.id.isEmpty && engine.device(config.id) != nil {
            throw APIError(409, "conflict", "device \(config.id) exists", field: field.isEmpty ? nil : field + "id")
        }
        // The socket first: a path that cannot be served creates no device.
        var backend: VhostUserBackend?
        if let given = config.vhostUserSocket {
            let path = try sockets.resolve(given, field: socketField)
            config.vhostUserSocket = path
            if let other = engine.devices().first(where: { $0.config.vhostUserSocket == path }) {
                throw APIError(409, "conflict", "device \(other.config.id) uses \(path)", field: socketField)
            }
            do throws(VhostUserSetupError) {
                backend = try VhostUserBackend(socket: path, mode: config.vhostUserMode,
                                               permissions: sockets.permissions, group: sockets.group)
            } catch {
                throw error.inUse ? APIError(409, "conflict", error.description, field: socketField)
                    : .invalidField(socketField, error.description)
            }
        }
        let h: DeviceHandle
        do throws(EngineError) { h = try engine.createDevice(config) } catch {
            backend?.stop()
            var e = APIError(error)
            if let f = e.field, !field.isEmpty { e.field = field + f }
            throw e
        }
        logger.info("device created", metadata: ["device": "\(h.config.id)", "queues": "\(h.config.queues)",
                                                 "iotlb": "\(h.config.iotlb)",
                                                 "vhost_user": "\(h.config.vhostUserSocket.map { "\($0) (\(h.config.vhostUserMode.rawValue))" } ?? "-")"])
        watchMisses(h, logger: logger)
        if let backend {
            let id = h.config.id
            backend.start(handle: h, limits: engine.limits) { line in
                logger.info("\(line)", metadata: ["device": "\(id)"])
            }
            vhostUsers.add(id, backend)
        }
        store.created(h.config)
        return h
    }

    /// `{"regions":[{"guest_phys_addr","memory_size","userspace_addr"}…]}`.
    static func parseRegions(_ body: JSON, path: String = "") throws(APIError) -> [MemoryRegion] {
        var f = try FieldReader(body, path: path)
        guard case .array(let items) = try f.required("regions") else {
            throw .invalidField(f.pathOf("regions"), "expected an array of regions")
        }
        try f.finish()
        var regions: [MemoryRegion] = []
        for (i, item) in items.enumerated() {
            var rf = try FieldReader(item, path: f.pathOf("regions[\(i)]"))
            regions.append(MemoryRegion(guestPhysAddr: GuestPhysAddr(try rf.number("guest_phys_addr")),
                                        memorySize: try rf.number("memory_size"),
                                        userspaceAddr: UserAddr(try rf.number("userspace_addr"))))
            try rf.finish()
        }
        return regions
    }

    /// Refuses HTTP changes to what a vhost-user front-end owns.
    static func requireHTTPOwned(_ h: DeviceHandle, _ what: String) throws(APIError) {
        if let path = h.config.vhostUserSocket {
            throw APIError(409, "conflict", "device \(h.config.id) is a vhost-user device: its front-end on \(path) sets the \(what)")
        }
    }

    static func isValidDeviceId(_ id: String) -> Bool {
        let u = id.utf8
        return (1...64).contains(u.count) && u.allSatisfy { c in
            (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c == 95 || c == 46 || c == 45
        }
    }
}

extension Device {
    /// The parts of a device answer only its worker knows.
    var detail: DeviceDetail { DeviceDetail(memTable: memTable, vrings: vrings().map(JSON.vring)) }
}
