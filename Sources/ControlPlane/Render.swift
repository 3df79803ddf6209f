// How engine values are written in answers: addresses and sizes as "0x…".
import IOTLB
import JSON
import Service
import Vhost
import VhostUser

extension JSON {
    static func entry(_ e: IOTLBEntry) -> JSON {
        ["iova": .hex(e.range.first.raw), "size": sizeOf(e.range), "uaddr": .hex(e.uaddr.raw),
         "perm": .string(e.perm.description)]
    }

    /// A range's size; the whole 2^64-byte space, whose size has no 64-bit form, is written as "0x10000000000000000".
    static func sizeOf<A>(_ r: AddressRange<A>) -> JSON {
        r.size.map { .hex($0) } ?? .string("0x10000000000000000")
    }

    static func memTable(_ t: MemoryTable) -> JSON {
        ["regions": .array(t.regions.map(region))]
    }

    static func device(_ c: DeviceConfig, detail: DeviceDetail? = nil, vhostUser: VhostUserStatus? = nil) -> JSON {
        var pairs: [(String, JSON)] = [
            ("id", .string(c.id)), ("queues", .count(c.queues)), ("iotlb", .bool(c.iotlb)),
            ("iotlb_max_entries", .count(c.iotlbMaxEntries)), ("backend", .string(c.port.kind.rawValue)),
            ("translator", .string(c.translator.rawValue)),
        ]
        if let path = c.vhostUserSocket {
            var v: [(String, JSON)] = [("socket", .string(path)), ("mode", .string(c.vhostUserMode.rawValue))]
            if let s = vhostUser {
                v += [("connected", .bool(s.connected)), ("connections", .count(s.connections)),
                      ("reconnect_attempts", .count(s.reconnectAttempts)),
                      ("messages", .count(s.messages)), ("features", .hex(s.features)),
                      ("protocol_features", .hex(s.protocolFeatures)),
                      ("misses_forwarded", .count(s.missesForwarded)), ("miss_send_failures", .count(s.missSendFailures)),
                      ("identity_updates", .count(s.identityUpdates)),
                      ("kicks", .count(s.kicks)), ("memory_faults", .count(s.memoryFaults)),
                      ("announcements", .count(s.announcements))]
                if let e = s.lastError { v.append(("last_error", .string(e))) }
            }
            pairs.append(("vhost_user", .object(v)))
        }
        pairs.append(("port", port(c.port, detail?.port)))
        if let detail {
            pairs.append(("worker", .count(detail.worker)))
            pairs.append(("mem_table", detail.memTable.map(memTable) ?? .null))
            pairs.append(("vrings", .array(detail.vrings)))
            pairs.append(("dirty_log", dirtyLog(detail.dirtyLog)))
        }
        return .object(pairs)
    }

    /// A managed device: its configuration, its front-end's state, and what its worker knows.
    static func device(_ d: DeviceParts, detail: DeviceDetail) -> JSON {
        device(d.config, detail: detail, vhostUser: d.frontEnd?.status)
    }

    /// A device's IOTLB figures; sorts the resolution samples (call off the worker).
    static func stats(_ s: IOTLBStats, resolution r: ResolutionTimes, vqs: [VringSnapshot]) -> JSON {
        let lookups = s.hits + s.misses
        let (p50, p99) = r.percentiles()
        return [
            "entries": .count(s.entries), "max_entries": .count(s.maxEntries),
            "hits": .count(s.hits), "misses": .count(s.misses),
            "hit_rate": .double(lookups == 0 ? 0 : Double(s.hits) / Double(lookups)),
            "updates": .count(s.updates), "invalidations": .count(s.invalidations),
            "evictions": .count(s.evictions), "access_failures": .count(s.accessFailures),
            "pending_misses": .count(s.pendingMisses), "reannounced_misses": .count(s.reannouncedMisses),
            "miss_resolution_us": ["count": .count(r.count), "p50": .count(p50), "p99": .count(p99),
                                   "max": .count(r.max)],
            "vqs": .array(vqs.map(vringStats)),
        ]
    }
}

/// What a device answer adds to its configuration.
struct DeviceDetail: Sendable {
    var memTable: MemoryTable?
    var vrings: [JSON]
    var port: PortSnapshot?
    /// The datapath worker that owns the device.
    var worker: Int
    /// Dirty logging (live migration).
    var dirtyLog = DirtyLogSnapshot()
}

extension JSON {
    /// Dirty logging: on (a front-end migrates the guest), waiting for its log,
    /// the log's size, pages logged, writes refused past the log.
    static func dirtyLog(_ s: DirtyLogSnapshot) -> JSON {
        var pairs: [(String, JSON)] = [("enabled", .bool(s.enabled)), ("waiting", .bool(s.waiting)), ("size", .hex(s.size)),
                                       ("pages_logged", .count(s.pagesLogged)), ("faults", .count(s.faults))]
        if let f = s.lastFault { pairs.append(("last_fault", .string(f))) }
        return .object(pairs)
    }
}

extension JSON {
    /// A port: its configuration, then (from its worker) its state and counters.
    static func port(_ p: PortConfig, _ s: PortSnapshot?) -> JSON {
        var pairs = portConfig(p)
        // The loopback and the sink have no state of their own: the vrings' counters say it all.
        guard let s, p.kind == .tap || p.kind == .peer else { return .object(pairs) }
        pairs.append(("state", .string(s.state)))
        if let name = s.tapName { pairs.append(("interface", .string(name))); pairs.append(("created", .bool(s.tapCreated))) }
        if case .peer = p { pairs.append(("linked", .bool(s.peerLinked))) }
        pairs += [("header_bytes", .count(s.guestHeaderBytes)), ("mergeable_rx", .bool(s.mergeableRX)),
                  ("offloads", ["guest": .array(s.guestOffloads.map { .string($0) }),
                                "host": .array(s.hostOffloads.map { .string($0) })])]
        if let mtu = s.mtu { pairs.append(("mtu", .count(mtu))) }
        if let e = s.lastError { pairs.append(("last_error", .string(e))) }
        pairs.append(("counters", portCounters(s.total)))
        if s.queues.count > 1 { pairs.append(("queues", .array(s.queues.map { portCounters($0, onlyDrops: true) }))) }
        return .object(pairs)
    }

    /// A port's counters; drops by reason, every reason (or, per queue, those that happened).
    static func portCounters(_ c: PortCounters, onlyDrops: Bool = false) -> JSON {
        let reasons = PortDropReason.allCases.filter { !onlyDrops || c.drops[$0.rawValue] > 0 }
        return ["tx_frames": .count(c.txFrames), "tx_bytes": .count(c.txBytes), "rx_frames": .count(c.rxFrames),
                "rx_bytes": .count(c.rxBytes), "tx_back_pressure": .count(c.txBackPressure),
                "drops": .object(reasons.map { ($0.name, JSON.count(c.drops[$0.rawValue])) })]
    }
}

/// "0x…" for messages.
func hexText(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
