// Built-in guest routes: start, read and stop a workload; the guest IOMMU's view.
import Glibc
import Guest
import IOTLB
import Synchronization
import Vhost

/// The built-in guests, by device id.
final class WorkloadRegistry: Sendable {
    private let byDevice = Locked<[String: Workload]>([:])
    private let starting = Locked<Set<String>>([])

    func get(_ id: String) -> Workload? { byDevice.withLock { $0[id] } }

    /// Claims `id` for a new workload unless one is starting or running there.
    func claim(_ id: String) -> Bool {
        let running = byDevice.withLock { $0[id]?.stats.state.isActive ?? false }
        if running { return false }
        return starting.withLock { $0.insert(id).inserted }
    }

    func started(_ id: String, _ w: Workload?) {
        let old = byDevice.withLock { t -> Workload? in
            defer { if let w { t[id] = w } }
            return w == nil ? nil : t[id]
        }
        _ = old?.stop()
        starting.withLock { _ = $0.remove(id) }
    }

    /// Stops and forgets the workload of `id`; returns its final figures.
    func remove(_ id: String) -> (Workload, WorkloadStats)? {
        guard let w = byDevice.withLock({ $0.removeValue(forKey: id) }) else { return nil }
        return (w, w.stop())
    }

    /// Stops every workload.
    func stopAll() {
        let all = byDevice.withLock { t -> [Workload] in
            defer { t.removeAll() }
            return Array(t.values)
        }
        for w in all { _ = w.stop() }
    }
}

extension ControlPlane {
    static func addWorkloadRoutes(to r: inout Router, engine: Engine, workloads: WorkloadRegistry, store: ConfigStore) {
        r.put("/v1/devices/{id}/workload") { req throws(APIError) in
            let h = try engine.device(for: req)
            try requireHTTPOwned(h, "memory and rings a built-in guest would lay")
            let body: JSON = req.body.isEmpty ? .object([]) : try req.json()
            let config = try parseWorkload(body)
            guard workloads.claim(h.config.id) else {
                throw APIError(409, "conflict", "a workload is already running on \(h.config.id); DELETE it first")
            }
            return .deferred { complete in
                Workload.start(config, on: h) { result in
                    switch result {
                    case .success(let w):
                        workloads.started(h.config.id, w)
                        store.workloadSet(h.config.id, config)
                        complete(.json(200, .workload(w)))
                    case .failure(let e):
                        workloads.started(h.config.id, nil)
                        switch e {
                        case .engine(let ee): complete(.error(APIError(ee)))
                        case .unsuitable(let why): complete(.error(APIError(409, "conflict", why)))
                        }
                    }
                }
            }
        }

        r.get("/v1/devices/{id}/workload") { req throws(APIError) in
            let h = try engine.device(for: req)
            guard let w = workloads.get(h.config.id) else { throw .notFound("no workload on \(h.config.id)") }
            return .json(200, .workload(w))
        }

        r.delete("/v1/devices/{id}/workload") { req throws(APIError) in
            let h = try engine.device(for: req)
            guard workloads.get(h.config.id) != nil else { throw .notFound("no workload on \(h.config.id)") }
            // Joining the guest thread may take a moment: not on a server thread.
            return .deferred { complete in
                startDetachedThread(name: "stop-workload") {
                    guard let (w, final) = workloads.remove(h.config.id) else {
                        complete(.error(.notFound("no workload on \(h.config.id)")))
                        return
                    }
                    store.workloadSet(h.config.id, nil)
                    complete(.json(200, .workload(w, stats: final)))
                }
            }
        }

        r.get("/v1/devices/{id}/guest-iommu/translate") { req throws(APIError) in
            let h = try engine.device(for: req)
            try req.allowOnly(["iova"])
            guard let iova = try queryNumber(req, "iova") else { throw .invalidField("iova", "missing required query argument iova") }
            guard let w = workloads.get(h.config.id), let iommu = w.iommu, let mem = w.memory else {
                throw .notFound("device \(h.config.id) has no built-in guest with an IOMMU")
            }
            guard let page = iommu.translate(IOVA(iova)),
                  let e = page.iotlbEntry(clippedTo: mem.table, around: IOVA(iova)) else {
                throw APIError(404, "not_found", "the guest IOMMU does not map iova \(hexText(iova))", field: "iova")
            }
            let gpa = page.gpa.raw + e.range.first.offset(from: page.iova.first)
            return .json(200, ["iova": .hex(e.range.first.raw), "size": .sizeOf(e.range), "gpa": .hex(gpa),
                               "uaddr": .hex(e.uaddr.raw), "perm": .string(e.perm.description),
                               "page_size": .hex(iommu.pageSize.bytes)])
        }
    }

    static func parseWorkload(_ body: JSON, path: String = "") throws(APIError) -> WorkloadConfig {
        var f = try FieldReader(body, path: path)
        var c = WorkloadConfig()
        c.packetSize = try f.int("packet_size", default: 64, in: 64...65535)
        c.pageSize = try f.choice("page_size", default: .m2)
        c.mapping = try f.choice("mapping", default: .static)
        c.packets = try f.optionalNumber("packets") ?? 0
        c.ringSize = try f.int("ring_size", default: 256, in: 2...VringConfig.maxNum)
        guard c.ringSize & (c.ringSize - 1) == 0 else { throw .invalidField(f.pathOf("ring_size"), "ring_size must be a power of 2") }
        c.eager = try f.bool("eager", default: false)
        try f.finish()
        return c
    }
}

extension JSON {
    static func workload(_ w: Workload, stats: WorkloadStats? = nil) -> JSON {
        let s = stats ?? w.stats
        let c = w.config
        var pairs: [(String, JSON)] = [
            ("state", .string(s.state.rawValue)), ("sent", .count(s.sent)), ("received", .count(s.received)),
            ("verify_errors", .count(s.verifyErrors)), ("pps", .double((s.pps * 10).rounded() / 10)),
            ("gbps", .double((s.gbps * 1000).rounded() / 1000)), ("elapsed_s", .double((s.elapsed * 1000).rounded() / 1000)),
            ("packet_size", .count(c.packetSize)), ("page_size", .string(c.pageSize.rawValue)),
            ("mapping", .string(c.mapping.rawValue)), ("packets", .count(c.packets)), ("ring_size", .count(c.ringSize)),
            ("eager", .bool(c.eager)), ("iommu", .bool(w.iommu != nil)), ("invalidations", .count(s.invalidations)),
            ("eager_updates", .count(s.eagerUpdates)), ("translator_answers", .count(s.translatorAnswers)),
            ("guest_memory_bytes", .hex(s.guestMemoryBytes)),
        ]
        if let e = s.error { pairs.append(("error", .string(e))) }
        return .object(pairs)
    }
}
