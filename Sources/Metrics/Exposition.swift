// GET /metrics: Prometheus text exposition. Device figures are snapshots the
// owning worker takes between batches (one command per device per scrape; the
// control plane gathers them); the datapath keeps plain counters, no per-frame
// atomics. Families are written here, from plain values.
import Guest
import Platform
import Vhost
import VhostUser

/// HTTP requests by route pattern, method and status.
public final class RequestCounter: Sendable {
    private let counts = Locked<[String: (route: String, method: String, status: Int, n: UInt64)]>([:])

    /// No requests counted yet.
    public init() {}

    /// Counts one answer.
    public func count(route: String, method: String, status: Int) {
        let key = "\(method) \(route) \(status)"
        counts.withLock { c in
            c[key, default: (route, method, status, 0)].n += 1
        }
    }

    /// Every count, sorted by route, method and status.
    public var all: [(route: String, method: String, status: Int, n: UInt64)] {
        counts.withLock { Array($0.values) }.sorted { ($0.route, $0.method, $0.status) < ($1.route, $1.method, $1.status) }
    }
}

/// One device's figures for a scrape.
public struct DeviceMetrics: Sendable {
    /// The device's id.
    public var id: String
    /// Its IOTLB counters.
    public var stats: IOTLBStats
    /// Its virtqueues.
    public var vqs: [VringSnapshot]
    /// The miss resolution histogram: each bucket's upper bound (µs) with its own (not cumulative) count.
    public var buckets: [(boundMicros: UInt32, count: UInt64)]
    /// The sum of the resolution times, µs.
    public var sumMicros: UInt64
    /// Misses resolved.
    public var resolutionCount: UInt64
    /// The built-in guest's figures, nil without one.
    public var workload: WorkloadStats?
    /// The vhost-user front-end's state, nil without vhost-user.
    public var frontEnd: VhostUserStatus?
    /// A TAP or peer port's state and counters (nil for the loopback and the sink).
    public var port: PortSnapshot?
    /// Dirty logging (live migration): on or off, pages logged, faults.
    public var dirtyLog = DirtyLogSnapshot()

    /// The figures a device's worker took (the front-end and guest are added after).
    public init(id: String, stats: IOTLBStats, vqs: [VringSnapshot], buckets: [(boundMicros: UInt32, count: UInt64)],
                sumMicros: UInt64, resolutionCount: UInt64) {
        self.id = id
        self.stats = stats
        self.vqs = vqs
        self.buckets = buckets
        self.sumMicros = sumMicros
        self.resolutionCount = resolutionCount
    }
}

/// Writes the exposition format: every family with HELP and TYPE, counters ending in _total.
struct MetricsWriter {
    var text = ""

    mutating func family(_ name: String, _ type: String, _ help: String, _ samples: [(labels: [(String, String)], value: String)]) {
        text += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
        for s in samples {
            let labels = MetricsWriter.labels(s.labels)
            text += "\(name)\(labels) \(s.value)\n"
        }
    }

    /// A sample value in the exposition format.
    static func number(_ v: Double) -> String { "\(v)" }

    static func labels(_ l: [(String, String)]) -> String {
        guard !l.isEmpty else { return "" }
        return "{" + l.map { "\($0.0)=\"\(escape($0.1))\"" }.joined(separator: ",") + "}"
    }

    static func escape(_ v: String) -> String {
        v.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            .replacingOccurrences(of: "\n", with: "\\n")
    }
}

extension String {
    fileprivate func replacingOccurrences(of a: String, with b: String) -> String {
        split(separator: a, omittingEmptySubsequences: false).joined(separator: b)
    }
}

/// The text of a scrape.
public enum Exposition {
    /// Every family: devices' figures (sorted by the caller), the long-polls
    /// waiting, the HTTP requests answered, the build, the process.
    public static func render(_ devices: [DeviceMetrics], longPollsWaiting: Int, requests: RequestCounter,
                              build: (version: String, commit: String)) -> String {
        var w = MetricsWriter()
        func perDevice(_ name: String, _ type: String, _ help: String, _ value: (DeviceMetrics) -> UInt64) {
            w.family(name, type, help, devices.map { ([("device", $0.id)], "\(value($0))") })
        }
        w.family("iotlbd_devices", "gauge", "Devices configured.", [([], "\(devices.count)")])
        perDevice("iotlbd_iotlb_hits_total", "counter", "IOTLB translations that hit.") { $0.stats.hits }
        perDevice("iotlbd_iotlb_misses_total", "counter", "IOTLB translations that missed.") { $0.stats.misses }
        perDevice("iotlbd_iotlb_updates_total", "counter", "IOTLB entries inserted.") { $0.stats.updates }
        perDevice("iotlbd_iotlb_invalidations_total", "counter", "IOTLB invalidation ranges and flushes applied.") { $0.stats.invalidations }
        perDevice("iotlbd_iotlb_evictions_total", "counter", "IOTLB entries removed by FIFO replacement.") { $0.stats.evictions }
        perDevice("iotlbd_iotlb_access_failures_total", "counter", "Accesses refused by an entry's permission.") { $0.stats.accessFailures }
        perDevice("iotlbd_iotlb_miss_reannouncements_total", "counter",
                  "Misses announced again (fresh seq) after an update that may have lost their answer.") { $0.stats.reannouncedMisses }
        perDevice("iotlbd_iotlb_entries", "gauge", "IOTLB entries held.") { UInt64($0.stats.entries) }
        perDevice("iotlbd_iotlb_max_entries", "gauge", "IOTLB capacity before FIFO replacement.") { UInt64($0.stats.maxEntries) }
        perDevice("iotlbd_iotlb_pending_misses", "gauge", "Queues waiting for an IOTLB update.") { UInt64($0.stats.pendingMisses) }
        // The resolution histogram, in seconds.
        var hs: [(labels: [(String, String)], value: String)] = []
        for d in devices {
            var cumulative: UInt64 = 0
            for (bound, count) in d.buckets {
                cumulative += count
                hs.append(([("device", d.id), ("le", "\(Double(bound) / 1e6)")], "\(cumulative)"))
            }
            hs.append(([("device", d.id), ("le", "+Inf")], "\(d.resolutionCount)"))
        }
        w.text += "# HELP iotlbd_miss_resolution_seconds Time from a miss posted to the update resolving it.\n"
        w.text += "# TYPE iotlbd_miss_resolution_seconds histogram\n"
        for s in hs {
            let labels = MetricsWriter.labels(s.labels)
            w.text += "iotlbd_miss_resolution_seconds_bucket\(labels) \(s.value)\n"
        }
        for d in devices {
            let labels = MetricsWriter.labels([("device", d.id)])
            w.text += "iotlbd_miss_resolution_seconds_sum\(labels) \(Double(d.sumMicros) / 1e6)\n"
            w.text += "iotlbd_miss_resolution_seconds_count\(labels) \(d.resolutionCount)\n"
        }
        func perQueue(_ name: String, _ type: String, _ help: String, _ value: (VringSnapshot) -> UInt64) {
            w.family(name, type, help, devices.flatMap { d in d.vqs.map { ([("device", d.id), ("vq", "\($0.index)")], "\(value($0))") } })
        }
        let now = monotonicNanos()
        w.family("iotlbd_vq_waiting_seconds", "gauge",
                 "How long each virtqueue has waited for an IOTLB translation (0 when not waiting).",
                 devices.flatMap { d in d.vqs.map { v in
                     ([("device", d.id), ("vq", "\(v.index)")], "\(Double(v.waitingSince.map { now &- $0 } ?? 0) / 1e9)")
                 } })
        perQueue("iotlbd_vq_hits_total", "counter", "Translations that hit, per virtqueue.") { $0.hits }
        perQueue("iotlbd_vq_misses_total", "counter", "Translations that missed, per virtqueue.") { $0.misses }
        perQueue("iotlbd_vq_access_failures_total", "counter", "Access failures, per virtqueue.") { $0.accessFailures }
        perQueue("iotlbd_vq_chains_total", "counter", "Descriptor chains processed, per virtqueue.") { $0.chains }
        perQueue("iotlbd_vq_bytes_total", "counter", "Bytes moved, per virtqueue.") { $0.bytes }
        w.family("iotlbd_vq_state", "gauge", "1 for the state each virtqueue is in.", devices.flatMap { d in
            d.vqs.flatMap { v in
                [VringState.running, .waitingIOTLB, .failed, .disabled].map {
                    ([("device", d.id), ("vq", "\(v.index)"), ("state", $0.rawValue)], v.state == $0 ? "1" : "0")
                }
            }
        })
        let loads = devices.compactMap { d in d.workload.map { (d.id, $0) } }
        w.family("iotlbd_workload_frames_sent_total", "counter", "Frames the built-in guest sent.",
                 loads.map { ([("device", $0.0)], "\($0.1.sent)") })
        w.family("iotlbd_workload_frames_received_total", "counter", "Frames the built-in guest received back.",
                 loads.map { ([("device", $0.0)], "\($0.1.received)") })
        w.family("iotlbd_workload_verify_errors_total", "counter", "Frames that came back different.",
                 loads.map { ([("device", $0.0)], "\($0.1.verifyErrors)") })
        let fronts = devices.compactMap { d in d.frontEnd.map { (d.id, $0) } }
        w.family("iotlbd_vhost_user_connected", "gauge", "1 while a vhost-user front-end is connected.",
                 fronts.map { ([("device", $0.0)], $0.1.connected ? "1" : "0") })
        w.family("iotlbd_vhost_user_connections_total", "counter", "vhost-user front-ends accepted.",
                 fronts.map { ([("device", $0.0)], "\($0.1.connections)") })
        w.family("iotlbd_vhost_user_memory_faults_total", "counter",
                 "Guest memory pages lost to a front-end shrinking its memory file (SIGBUS caught; connection ended).",
                 fronts.map { ([("device", $0.0)], "\($0.1.memoryFaults)") })
        w.family("iotlbd_vhost_user_kicks_total", "counter", "Driver kicks received (only while the datapath sleeps).",
                 fronts.map { ([("device", $0.0)], "\($0.1.kicks)") })
        w.family("iotlbd_vhost_user_announcements_total", "counter",
                 "Announcements (SEND_RARP) a front-end asked for after a live migration.",
                 fronts.map { ([("device", $0.0)], "\($0.1.announcements)") })
        writePorts(devices, to: &w)
        writeDirtyLog(devices, to: &w)
        w.family("iotlbd_http_long_polls_waiting", "gauge", "Miss long-polls waiting for an event or their time-out.",
                 [([], "\(longPollsWaiting)")])
        w.family("iotlbd_http_requests_total", "counter", "HTTP requests answered, by route, method and status.",
                 requests.all.map { ([("route", $0.route), ("method", $0.method), ("status", "\($0.status)")], "\($0.n)") })
        w.family("iotlbd_build_info", "gauge", "Always 1; the labels name the build.",
                 [([("version", build.version), ("commit", build.commit)], "1")])
        ProcessStats.read().write(to: &w)
        return w.text
    }
}

extension Exposition {
    /// Dirty logging: whether each device logs (a front-end migrates it), the
    /// pages it made dirty, and the writes refused because the log ends before them.
    static func writeDirtyLog(_ devices: [DeviceMetrics], to w: inout MetricsWriter) {
        w.family("iotlbd_dirty_log_enabled", "gauge", "1 while the device logs its guest writes (VHOST_F_LOG_ALL, live migration).",
                 devices.map { ([("device", $0.id)], $0.dirtyLog.enabled ? "1" : "0") })
        w.family("iotlbd_dirty_log_pages_total", "counter", "Guest-physical pages whose dirty-log bit the device set (it was clear).",
                 devices.map { ([("device", $0.id)], "\($0.dirtyLog.pagesLogged)") })
        w.family("iotlbd_dirty_log_faults_total", "counter",
                 "Guest writes refused because their page lies past the dirty log (each failed its virtqueue).",
                 devices.map { ([("device", $0.id)], "\($0.dirtyLog.faults)") })
    }

    /// TAP and peer ports: frames and bytes each way and drops by reason, per
    /// queue pair; back-pressure; the state each port is in.
    static func writePorts(_ devices: [DeviceMetrics], to w: inout MetricsWriter) {
        let ports = devices.compactMap { d in d.port.map { (d.id, $0) } }
        typealias Sample = (labels: [(String, String)], value: String)
        func perQueue(_ value: (PortCounters) -> [(extra: [(String, String)], n: UInt64)]) -> [Sample] {
            ports.flatMap { id, p in
                p.queues.enumerated().flatMap { q, c in
                    value(c).map { ([("device", id), ("queue", "\(q)")] + $0.extra, "\($0.n)") }
                }
            }
        }
        w.family("iotlbd_port_frames_total", "counter",
                 "Frames through a TAP or peer port, per queue pair: tx from the guest to the port, rx from the port to the guest.",
                 perQueue { [([("direction", "tx")], $0.txFrames), ([("direction", "rx")], $0.rxFrames)] })
        w.family("iotlbd_port_bytes_total", "counter", "Bytes of those frames (without the virtio-net header).",
                 perQueue { [([("direction", "tx")], $0.txBytes), ([("direction", "rx")], $0.rxBytes)] })
        w.family("iotlbd_port_drops_total", "counter", "Frames a port dropped, by reason, per queue pair.",
                 perQueue { c in PortDropReason.allCases.map { ([("reason", $0.name)], c.drops[$0.rawValue]) } })
        w.family("iotlbd_port_tx_back_pressure_total", "counter",
                 "Times a TX frame stayed in its ring because the TAP was full (sent again later, not lost).",
                 perQueue { [([], $0.txBackPressure)] })
        w.family("iotlbd_port_state", "gauge", "1 for the state each TAP or peer port is in.", ports.flatMap { id, p in
            ["up", "down", "gone"].map { ([("device", id), ("type", p.config.kind.rawValue), ("state", $0)], p.state == $0 ? "1" : "0") }
        })
    }
}
