// Vring and miss routes: set/get a queue, long-poll misses.
import HTTP
import IOTLB
import JSON
import Platform
import Service
import Vhost

extension ControlPlane {
    static func addVringRoutes(to r: inout Router, devices: DeviceService, timer: LongPollTimer) {
        r.put("/v1/devices/{id}/vrings/{n}") { req throws(APIError) in
            let d = try devices.device(for: req)
            try requireHTTPOwned(d.handle, "vrings")
            let n = try vringIndex(req)
            let config = try parseVring(req.json())
            return .engine({ done in devices.setVring(n, config, on: d, then: done) }) { .json(200, .vring($0)) }
        }

        r.get("/v1/devices/{id}/vrings/{n}") { req throws(APIError) in
            let h = try devices.handle(for: req)
            let n = try vringIndex(req)
            return h.reply({ d throws(EngineError) in try d.vring(n) }) { .json(200, .vring($0)) }
        }

        r.get("/v1/devices/{id}/iotlb/misses") { req throws(APIError) in
            let h = try devices.handle(for: req)
            try req.allowOnly(["after", "timeout_ms", "limit"])
            let after = try queryNumber(req, "after") ?? 0
            let timeout = try queryNumber(req, "timeout_ms") ?? 0
            guard timeout <= 60_000 else { throw .invalidField("timeout_ms", "timeout_ms must be 0...60000") }
            let limit = try queryNumber(req, "limit") ?? 1000
            guard (1...10_000).contains(limit) else { throw .invalidField("limit", "limit must be 1...10000") }
            let id = h.config.id
            let log = h.missLog
            if timeout == 0 { return .now(renderMisses(log.events(after: after, limit: Int(limit)), device: id)) }
            return .deferred { complete in
                let w = log.poll(after: after, limit: Int(limit)) { complete(renderMisses($0, device: id)) }
                if !w.isFinished {
                    timer.schedule(deadline: monotonicNanos() + timeout * 1_000_000, waiter: w) {
                        w.finish(log.timeoutAnswer(after: after))
                    }
                }
            }
        }
    }

    /// `{"num","desc_addr","avail_addr","used_addr","enabled"?,"event_idx"?,"last_avail_idx"?,"packed"?,"in_order"?}`;
    /// `path` prefixes the fields named in refusals; members in `ignoring` are left to the caller.
    static func parseVring(_ body: JSON, path: String = "", ignoring: [String] = []) throws(APIError) -> VringConfig {
        var f = try FieldReader(body, path: path)
        for k in ignoring { _ = f.value(k) }
        let num = try f.number("num")
        guard num <= UInt64(VringConfig.maxNum) else {
            throw .invalidField(f.pathOf("num"), "num must be from 1 to \(VringConfig.maxNum) (a power of 2 for split rings)")
        }
        var c = VringConfig(num: Int(num), descAddr: try f.number("desc_addr"), availAddr: try f.number("avail_addr"),
                            usedAddr: try f.number("used_addr"))
        c.enabled = try f.bool("enabled", default: true)
        c.eventIdx = try f.bool("event_idx", default: false)
        c.packed = try f.bool("packed", default: false)
        c.inOrder = try f.bool("in_order", default: false)
        if let base = try f.optionalNumber("last_avail_idx") {
            guard base <= UInt64(UInt16.max) else { throw .invalidField(f.pathOf("last_avail_idx"), "must be 0...65535") }
            c.lastAvailIdx = UInt16(base)
        }
        try f.finish()
        if let (field, why) = c.problem() { throw .invalidField(f.pathOf(field), why) }
        return c
    }

    static func vringIndex(_ req: Request) throws(APIError) -> Int {
        let text = req.params["n"] ?? ""
        guard let n = Int(text), n >= 0, text.allSatisfy(\.isNumber) else {
            throw .notFound("vring \(text) not found: vrings are numbered 0, 1, …")
        }
        return n
    }

    static func renderMisses(_ a: MissAnswer, device: String) -> Response {
        switch a {
        case .closed:
            return .error(.notFound("device \(device) was deleted"))
        case .events(let events, let lastSeq):
            let now = monotonicNanos()
            return .json(200, ["misses": .array(events.map { e in
                ["seq": .count(e.seq), "device": .string(device), "vq": .count(e.vq), "type": .string(e.kind.rawValue),
                 "iova": .hex(e.iova.raw), "perm": .string(e.perm.description),
                 "age_us": .count((now &- min(now, e.postedAt)) / 1000)]
            }), "last_seq": .count(lastSeq)])
        }
    }
}

extension JSON {
    static func vring(_ v: VringSnapshot) -> JSON {
        let c = v.config
        var pairs: [(String, JSON)] = [
            ("index", .count(v.index)), ("num", .count(c?.num ?? 0)),
            ("desc_addr", .hex(c?.descAddr ?? 0)), ("avail_addr", .hex(c?.availAddr ?? 0)),
            ("used_addr", .hex(c?.usedAddr ?? 0)), ("enabled", .bool(c?.enabled ?? false)),
            ("event_idx", .bool(c?.eventIdx ?? false)), ("packed", .bool(c?.packed ?? false)),
            ("in_order", .bool(c?.inOrder ?? false)),
            ("state", .string(v.state.rawValue)), ("last_avail_idx", .count(v.lastAvailIdx)),
            ("used_idx", .count(v.usedIdx)),
        ]
        if let p = v.pending {
            pairs.append(("pending_miss", ["seq": .count(p.seq), "type": .string(p.kind.rawValue), "iova": .hex(p.iova.raw),
                                           "perm": .string(p.perm.description)]))
        }
        if let why = v.failure { pairs.append(("error", .string(why))) }
        return .object(pairs)
    }

    static func vringStats(_ v: VringSnapshot) -> JSON {
        let lookups = v.hits + v.misses
        return ["index": .count(v.index), "state": .string(v.state.rawValue), "hits": .count(v.hits),
                "misses": .count(v.misses), "hit_rate": .double(lookups == 0 ? 0 : Double(v.hits) / Double(lookups)),
                "access_failures": .count(v.accessFailures), "chains": .count(v.chains), "bytes": .count(v.bytes),
                "notifications": .count(v.notifications)]
    }
}
