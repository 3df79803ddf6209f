// Built-in guest routes: start, read and stop a workload; the guest IOMMU's view.
import Guest
import HTTP
import IOTLB
import JSON
import Service
import Vhost

extension ControlPlane {
    static func addWorkloadRoutes(to r: inout Router, devices: DeviceService) {
        r.put("/v1/devices/{id}/workload") { req throws(APIError) in
            let d = try devices.device(for: req)
            try requireHTTPOwned(d.handle, "memory and rings a built-in guest would lay")
            let body: JSON = req.body.isEmpty ? .object([]) : try req.json()
            let config = try parseWorkload(body)
            return .devices({ done throws(DeviceServiceError) in try devices.startWorkload(config, on: d, then: done) }) {
                .json(200, .workload($0))
            }
        }

        r.get("/v1/devices/{id}/workload") { req throws(APIError) in
            let d = try devices.device(for: req)
            guard let w = d.workload else { throw .notFound("no workload on \(d.id)") }
            return .json(200, .workload(w))
        }

        r.delete("/v1/devices/{id}/workload") { req throws(APIError) in
            let d = try devices.device(for: req)
            return .devices({ done throws(DeviceServiceError) in try devices.stopWorkload(on: d, then: done) }) {
                .json(200, .workload($0.0, stats: $0.1))
            }
        }

        r.get("/v1/devices/{id}/guest-iommu/translate") { req throws(APIError) in
            let d = try devices.device(for: req)
            try req.allowOnly(["iova"])
            guard let iova = try queryNumber(req, "iova") else { throw .invalidField("iova", "missing required query argument iova") }
            guard let w = d.workload, let iommu = w.iommu, let mem = w.memory else {
                throw .notFound("device \(d.id) has no built-in guest with an IOMMU")
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
            ("eager_updates", .count(s.eagerUpdates)), ("eager_update_failures", .count(s.eagerUpdateFailures)),
            ("invalidation_failures", .count(s.invalidationFailures)), ("translator_answers", .count(s.translatorAnswers)),
            ("guest_memory_bytes", .hex(s.guestMemoryBytes)),
        ]
        if let e = s.error { pairs.append(("error", .string(e))) }
        return .object(pairs)
    }
}
