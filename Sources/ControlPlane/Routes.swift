// The routes of the contract (DESIGN.md, "HTTP contract (v1)").
import IOTLB
import Vhost
import Logging

extension ControlPlane {
    static func addRoutes(to r: inout Router, engine: Engine, settings: ControlPlaneSettings, logger: Logger,
                          timer: LongPollTimer, workloads: WorkloadRegistry, vhostUsers: VhostUserRegistry) {
        r.get("/healthz") { _ in .json(200, ["status": "ok"]) }
        addDeviceRoutes(to: &r, engine: engine, settings: settings, logger: logger, workloads: workloads,
                        vhostUsers: vhostUsers)
        addIOTLBRoutes(to: &r, engine: engine)
        addVringRoutes(to: &r, engine: engine, timer: timer)
        addWorkloadRoutes(to: &r, engine: engine, workloads: workloads)
    }

    static func addDeviceRoutes(to r: inout Router, engine: Engine, settings: ControlPlaneSettings, logger: Logger,
                                workloads: WorkloadRegistry, vhostUsers: VhostUserRegistry) {
        r.post("/v1/devices") { req throws(APIError) in
            let body: JSON = req.body.isEmpty ? .object([]) : try req.json()
            var f = try FieldReader(body)
            var config = DeviceConfig(id: "")
            if let id = try f.string("id") {
                guard isValidDeviceId(id) else {
                    throw .invalidField("id", "1 to 64 characters of A-Z a-z 0-9 _ . -")
                }
                config.id = id
            }
            config.queues = try f.int("queues", default: 2, in: 1...DeviceConfig.maxQueues)
            config.iotlb = try f.bool("iotlb", default: true)
            config.iotlbMaxEntries = try f.int("iotlb_max_entries", default: settings.iotlbMaxEntries,
                                               in: 1...IOTLB.entriesCeiling)
            config.backend = try f.choice("backend", default: .loopback)
            config.translator = try f.choice("translator", default: .builtin)
            if let v = f.value("vhost_user") { config.vhostUserSocket = try parseVhostUser(v) }
            try f.finish()
            if !config.id.isEmpty && engine.device(config.id) != nil {
                throw APIError(409, "conflict", "device \(config.id) exists")
            }
            // The socket first: a path that cannot be served creates no device.
            var backend: VhostUserBackend?
            if let path = config.vhostUserSocket {
                do throws(VhostUserSetupError) { backend = try VhostUserBackend(socket: path) } catch {
                    throw error.inUse ? APIError(409, "conflict", error.description, field: "vhost_user.socket")
                        : .invalidField("vhost_user.socket", error.description)
                }
            }
            let h: DeviceHandle
            do throws(EngineError) { h = try engine.createDevice(config) } catch {
                backend?.stop()
                throw APIError(error)
            }
            logger.info("device created", metadata: ["device": "\(h.config.id)", "queues": "\(h.config.queues)",
                                                     "iotlb": "\(h.config.iotlb)",
                                                     "vhost_user": "\(h.config.vhostUserSocket ?? "-")"])
            watchMisses(h, logger: logger)
            if let backend {
                let id = h.config.id
                backend.start(handle: h, limits: engine.limits) { line in
                    logger.info("\(line)", metadata: ["device": "\(id)"])
                }
                vhostUsers.add(id, backend)
            }
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
            var f = try FieldReader(req.json())
            guard case .array(let items) = try f.required("regions") else {
                throw .invalidField("regions", "expected an array of regions")
            }
            try f.finish()
            var regions: [MemoryRegion] = []
            for (i, item) in items.enumerated() {
                var rf = try FieldReader(item, path: "regions[\(i)]")
                regions.append(MemoryRegion(guestPhysAddr: GuestPhysAddr(try rf.number("guest_phys_addr")),
                                            memorySize: try rf.number("memory_size"),
                                            userspaceAddr: UserAddr(try rf.number("userspace_addr"))))
                try rf.finish()
            }
            let wanted = regions
            return h.reply({ d throws(EngineError) in try d.setMemTable(wanted) }) { .json(200, .memTable($0)) }
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

    /// `{"socket": PATH}`: the Unix socket path a vhost-user front-end connects to.
    static func parseVhostUser(_ v: JSON) throws(APIError) -> String {
        var f = try FieldReader(v, path: "vhost_user")
        guard let path = try f.string("socket") else {
            throw .invalidField("vhost_user.socket", "required: the Unix socket path to serve")
        }
        try f.finish()
        guard (1...107).contains(path.utf8.count), !path.utf8.contains(0) else {
            throw .invalidField("vhost_user.socket", "a socket path of 1 to 107 bytes")
        }
        return path
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
