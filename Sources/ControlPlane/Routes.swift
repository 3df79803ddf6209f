// The routes of the contract (api/openapi.yaml describes each; README.md walks through them).
import IOTLB
import Platform
import Vhost
import VhostUser
import Logging
import JSON
import HTTP
import Service

extension ControlPlane {
    static func addRoutes(to r: inout Router, devices: DeviceService, settings: ControlPlaneSettings, timer: LongPollTimer,
                          store: ConfigStore) {
        r.get("/healthz") { _ in .json(200, ["status": "ok"]) }
        addDeviceRoutes(to: &r, devices: devices, settings: settings)
        addIOTLBRoutes(to: &r, devices: devices)
        addVringRoutes(to: &r, devices: devices, timer: timer)
        addWorkloadRoutes(to: &r, devices: devices)
        r.get("/v1/config") { _ in .json(200, store.document) }
    }

    static func addDeviceRoutes(to r: inout Router, devices: DeviceService, settings: ControlPlaneSettings) {
        r.post("/v1/devices") { req throws(APIError) in
            let body: JSON = req.body.isEmpty ? .object([]) : try req.json()
            let config = try parseDeviceConfig(body, settings: settings)
            // Answered once the state file holds it, then with what its worker knows.
            return .devices({ done throws(DeviceServiceError) in try devices.create(config, then: done) }, then: { d, complete in
                d.handle.perform({ dev in dev?.detail }) { detail in
                    complete(detail.map { .json(201, .device(d, detail: $0)) }
                             ?? .error(.notFound("device \(d.id) was deleted meanwhile")))
                }
            })
        }

        r.get("/v1/devices") { _ in
            .json(200, ["devices": .array(devices.all().map { .device($0.config) })])
        }

        r.get("/v1/devices/{id}") { req throws(APIError) in
            let d = try devices.device(for: req)
            return d.handle.reply({ dev throws(EngineError) in dev.detail }) { .json(200, .device(d, detail: $0)) }
        }

        r.delete("/v1/devices/{id}") { req in
            let id = req.params["id"] ?? ""
            return .devices({ done throws(DeviceServiceError) in try devices.delete(id, then: done) }) { .noContent }
        }

        r.put("/v1/devices/{id}/mem-table") { req throws(APIError) in
            let d = try devices.device(for: req)
            try requireHTTPOwned(d.handle, "memory table")
            let wanted = try parseRegions(req.json())
            return .engine({ done in devices.setMemTable(wanted, on: d, then: done) }) { .json(200, .memTable($0)) }
        }

        r.get("/v1/devices/{id}/mem-table") { req throws(APIError) in
            let h = try devices.handle(for: req)
            return h.reply({ d throws(EngineError) in
                guard let t = d.memTable else { throw .noMemTable }
                return t
            }) { .json(200, .memTable($0)) }
        }
    }

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
        config.port = try parsePort(backend: f.string("backend"), port: f.value("port"), reader: f)
        config.translator = try f.choice("translator", default: .builtin)
        if case .peer(let other) = config.port, other == config.id {
            throw .invalidField(f.pathOf("port.device"), "a device cannot be its own peer (that is the loopback port)")
        }
        if let v = f.value("vhost_user") {
            (config.vhostUserSocket, config.vhostUserMode) = try parseVhostUser(v, path: f.pathOf("vhost_user"))
        }
        try f.finish()
        return config
    }

    /// A device's port: `"backend":"loopback"|"sink"` (the first form, kept),
    /// or `"port"`: `"loopback"`, `"sink"`, `{"type":"tap","name":IFNAME}`,
    /// `{"type":"peer","device":ID}`. Both given must agree.
    static func parsePort(backend: String?, port: JSON?, reader f: FieldReader) throws(APIError) -> PortConfig {
        var legacy: PortConfig?
        if let backend {
            switch backend {
            case "loopback": legacy = .loopback
            case "sink": legacy = .sink
            default:
                throw .invalidField(f.pathOf("backend"), "must be one of \"loopback\", \"sink\" (TAP and peer ports are given as \"port\")")
            }
        }
        guard let port else { return legacy ?? .loopback }
        let path = f.pathOf("port")
        let parsed: PortConfig
        if case .string(let kind) = port {
            switch kind {
            case "loopback": parsed = .loopback
            case "sink": parsed = .sink
            default: throw .invalidField(path, "a port is \"loopback\", \"sink\", or an object {\"type\":\"tap\"|\"peer\",…}")
            }
        } else {
            var pf = try FieldReader(port, path: path)
            let kind = try pf.choice("type", default: PortKind.loopback)
            switch kind {
            case .loopback: parsed = .loopback
            case .sink: parsed = .sink
            case .tap:
                guard let name = try pf.string("name") else {
                    throw .invalidField(pf.pathOf("name"), "required: the TAP interface to attach to (or create)")
                }
                guard isValidInterfaceName(name) else {
                    throw .invalidField(pf.pathOf("name"), "an interface name: 1 to 15 bytes, no '/', ':', whitespace, not \".\" or \"..\"")
                }
                parsed = .tap(name: name)
            case .peer:
                guard let other = try pf.string("device") else {
                    throw .invalidField(pf.pathOf("device"), "required: the id of the device to wire this one to")
                }
                guard isValidDeviceId(other) else { throw .invalidField(pf.pathOf("device"), "1 to 64 characters of A-Z a-z 0-9 _ . -") }
                parsed = .peer(device: other)
            }
            try pf.finish()
        }
        if let legacy, legacy != parsed {
            throw .invalidField(f.pathOf("backend"), "\"backend\" and \"port\" disagree; give one")
        }
        return parsed
    }

    /// The kernel's rule for interface names (dev_valid_name).
    static func isValidInterfaceName(_ name: String) -> Bool {
        let u = Array(name.utf8)
        return (1...15).contains(u.count) && name != "." && name != ".."
            && !u.contains { $0 == 47 || $0 == 58 || $0 == 32 || (9...13).contains($0) || $0 == 0 }
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
    var detail: DeviceDetail { DeviceDetail(memTable: memTable, vrings: vrings().map(JSON.vring), port: portSnapshot(),
                                     worker: workerIndex, dirtyLog: dirtyLogSnapshot()) }
}

extension Reply {
    /// The answer of a devices service call, delivered when `call` calls back:
    /// `render` of its result, or its refusal (thrown at once or given later).
    static func devices<T: Sendable>(
        _ call: @escaping @Sendable (_ done: @escaping @Sendable (Result<T, DeviceServiceError>) -> Void) throws(DeviceServiceError) -> Void,
        render: @escaping @Sendable (T) -> Response
    ) -> Reply {
        devices(call, then: { v, complete in complete(render(v)) })
    }

    /// As `devices(_:render:)`, where answering the result takes a further step
    /// (`then` completes it, e.g. after asking the device's worker).
    static func devices<T: Sendable>(
        _ call: @escaping @Sendable (_ done: @escaping @Sendable (Result<T, DeviceServiceError>) -> Void) throws(DeviceServiceError) -> Void,
        then: @escaping @Sendable (T, _ complete: @escaping @Sendable (Response) -> Void) -> Void
    ) -> Reply {
        .deferred { complete in
            let answer: @Sendable (Result<T, DeviceServiceError>) -> Void = { result in
                switch result {
                case .success(let v): then(v, complete)
                case .failure(let e): complete(.error(APIError(e)))
                }
            }
            do throws(DeviceServiceError) { try call(answer) } catch { answer(.failure(error)) }
        }
    }

    /// The answer of a change a device's worker applies and the configuration
    /// records (`DeviceService.setMemTable`, `setVring`): `render` of its result once
    /// saved, or the engine's refusal.
    static func engine<T: Sendable>(
        _ call: @escaping @Sendable (_ done: @escaping @Sendable (Result<T, EngineError>) -> Void) -> Void,
        render: @escaping @Sendable (T) -> Response
    ) -> Reply {
        .later { complete in
            call { result in
                switch result {
                case .success(let v): complete(render(v))
                case .failure(let e): complete(.error(APIError(e)))
                }
            }
        }
    }
}
