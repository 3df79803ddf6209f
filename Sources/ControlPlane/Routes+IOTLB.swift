// IOTLB routes: updates, invalidations, flush, entries, translate, stats.
import HTTP
import IOTLB
import JSON
import Service
import Vhost

extension ControlPlane {
    static func addIOTLBRoutes(to r: inout Router, devices: DeviceService) {
        r.post("/v1/devices/{id}/iotlb/updates") { req throws(APIError) in
            let h = try devices.handle(for: req)
            var entries: [IOTLBEntry] = []
            let items = try entriesOf(req.json(), key: "entries")
            for (item, path) in items {
                var f = try FieldReader(item, path: path)
                let range = try readRange(&f)
                let uaddr = UserAddr(try f.number("uaddr"))
                let perm = try f.perm("perm")
                try f.finish()
                // uaddr+size past 2^64 is the engine's to refuse (range_overflow), for every caller.
                entries.append(IOTLBEntry(range: range, uaddr: uaddr, perm: perm))
            }
            let batch = entries
            return h.reply({ d throws(EngineError) in try d.updateIOTLB(batch) }, paths: items.map(\.1)) { rep in
                .json(200, ["applied": .count(rep.applied), "evicted": .count(rep.evicted),
                            "replaced": .count(rep.replaced), "entries": .count(rep.entries),
                            "resolved_misses": .count(rep.resolvedMisses)])
            }
        }

        r.post("/v1/devices/{id}/iotlb/invalidations") { req throws(APIError) in
            let h = try devices.handle(for: req)
            var ranges: [AddressRange<IOVA>] = []
            for (item, path) in try entriesOf(req.json(), key: "entries") {
                var f = try FieldReader(item, path: path)
                ranges.append(try readRange(&f))
                try f.finish()
            }
            let batch = ranges
            return h.reply({ d throws(EngineError) in (try d.invalidateIOTLB(batch), d.stats().entries) }) {
                .json(200, ["removed": .count($0.0), "entries": .count($0.1)])
            }
        }

        r.delete("/v1/devices/{id}/iotlb") { req throws(APIError) in
            let h = try devices.handle(for: req)
            return h.reply({ d throws(EngineError) in (try d.flushIOTLB(), d.stats().entries) }) {
                .json(200, ["removed": .count($0.0), "entries": .count($0.1)])
            }
        }

        r.get("/v1/devices/{id}/iotlb/entries") { req throws(APIError) in
            let h = try devices.handle(for: req)
            try req.allowOnly(["iova", "size", "limit", "after"])
            var range: AddressRange<IOVA>?
            let iova = try queryNumber(req, "iova")
            let size = try queryNumber(req, "size")
            let limit = try queryNumber(req, "limit")
            if let limit, !(1...65536).contains(limit) {
                throw .invalidField("limit", "limit must be from 1 to 65536")
            }
            let after = try queryNumber(req, "after")
            if iova != nil || size != nil {
                let first = IOVA(iova ?? 0)
                if let size {
                    guard let r = AddressRange(start: first, size: size) else {
                        throw APIError(422, "range_overflow", size == 0 ? "size must be at least 1" : "iova+size passes 2^64-1",
                                       field: "size")
                    }
                    range = r
                } else {
                    range = AddressRange(first: first, last: IOVA(.max))  // from iova to the top
                }
            }
            // A cursor: only entries starting past `after` (the `next` of the previous page).
            if let after {
                guard after < .max else { return .now(.json(200, ["entries": .array([])])) }
                let from = IOVA(after + 1)
                if let r = range {
                    guard r.last >= from else { return .now(.json(200, ["entries": .array([])])) }
                    range = AddressRange(first: max(r.first, from), last: r.last)
                } else {
                    range = AddressRange(first: from, last: IOVA(.max))
                }
            }
            let q = range
            let n = limit.map { Int($0) } ?? .max
            let cursor = after.map(IOVA.init)
            return h.reply({ d throws(EngineError) in try d.entries(overlapping: q, after: cursor, limit: n) }) { page in
                var body: [(String, JSON)] = [("entries", .array(page.entries.map(JSON.entry)))]
                if page.more, let last = page.entries.last { body.append(("next", .hex(last.range.first.raw))) }
                return .json(200, .object(body))
            }
        }

        r.get("/v1/devices/{id}/iotlb/translate") { req throws(APIError) in
            let h = try devices.handle(for: req)
            try req.allowOnly(["iova", "perm", "size"])
            guard let iova = try queryNumber(req, "iova") else { throw .invalidField("iova", "missing required query argument iova") }
            guard let permText = req.query("perm") else { throw .invalidField("perm", "missing required query argument perm") }
            let perm = try parsePerm(parseNumber(text: permText).map { .int(Int64(clamping: $0)) } ?? .string(permText), field: "perm")
            let size = try queryNumber(req, "size") ?? .max
            guard size > 0 else { throw APIError(422, "range_overflow", "size must be at least 1", field: "size") }
            return h.reply({ d throws(EngineError) in try d.translate(IOVA(iova), access: perm, size: size) }) { t in
                switch t {
                case .mapped(let uaddr, let length, let entryPerm):
                    .json(200, ["iova": .hex(iova), "uaddr": .hex(uaddr.raw), "size": .hex(length),
                                "perm": .string(entryPerm.description)])
                case .miss:
                    .error(APIError(404, "iotlb_miss", "no IOTLB entry holds iova \(hexText(iova))", field: "iova"))
                case .denied(let entryPerm):
                    .error(APIError(403, "access_denied",
                                    "the entry holding iova \(hexText(iova)) is \(entryPerm), \(perm) was asked", field: "perm"))
                }
            }
        }

        r.get("/v1/devices/{id}/iotlb/stats") { req throws(APIError) in
            let h = try devices.handle(for: req)
            return h.reply({ d throws(EngineError) in (d.stats(), d.resolutionTimes(), d.vrings()) }) {
                .json(200, .stats($0.0, resolution: $0.1, vqs: $0.2))
            }
        }
    }

    /// A numeric query argument, or nil when absent.
    static func queryNumber(_ req: Request, _ name: String) throws(APIError) -> UInt64? {
        guard let text = req.query(name) else { return nil }
        guard let n = parseNumber(text: text) else {
            throw .invalidField(name, "\"\(text.prefix(40))\" is not a number: use 0x… hex or decimal digits, up to 2^64-1")
        }
        return n
    }
}
