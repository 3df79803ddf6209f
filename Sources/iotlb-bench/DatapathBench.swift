// Datapath: frames through the engine, IOTLB on vs off side by side.
import ArgumentParser
import CBenchCounters
import Foundation
import Guest
import IOTLB
import JSON
import Platform
import Synchronization
import Vhost

struct DatapathBench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "datapath",
                                                    abstract: "Mpps, Gbit/s and hit rate per cell; IOTLB on/off ratio.")

    @Option(help: "Payload sizes in bytes.") var sizes = "64,1500"
    @Option(help: "Guest IOMMU page sizes.") var pages = "4k,2m,1g"
    @Option(help: "Guest mappings.") var mappings = "static,dynamic"
    @Option(help: "Seconds measured per run (after warm-up).") var seconds = 1.5
    @Option(help: "Warm-up seconds per run.") var warmup = 0.4
    @Option(help: "Runs per side (on, off alternately).") var repeats = 3
    @Option(help: "Ring size.") var ringSize = 256
    @Flag(help: "Builtin translator pushes guest mappings eagerly (dynamic).") var eager = false
    @Option(help: "Which sides to run: on,off (alternately), or one of them (profiling).") var sides = "on,off"
    @Option(help: "What the sides differ in: iotlb (on/off), or dirty-log (logging on/off, IOTLB on in both: live migration's cost).")
    var compare = "iotlb"
    @OptionGroup var output: ReportOptions

    func run() throws {
        guard compare == "iotlb" || compare == "dirty-log" else { throw ValidationError("--compare takes iotlb or dirty-log") }
        let logging = compare == "dirty-log"
        let sideList = sides.split(separator: ",").map { $0 == "on" }
        guard !sideList.isEmpty, sides.split(separator: ",").allSatisfy({ $0 == "on" || $0 == "off" }) else {
            throw ValidationError("--sides takes on, off, or on,off")
        }
        let sizeList = sizes.split(separator: ",").compactMap { Int($0) }
        let pageList = pages.split(separator: ",").compactMap { PageSize(rawValue: String($0)) }
        let mapList = mappings.split(separator: ",").compactMap { MappingMode(rawValue: String($0)) }
        guard !sizeList.isEmpty, !pageList.isEmpty, !mapList.isEmpty else {
            throw ValidationError("nothing to run: check --sizes, --pages, --mappings")
        }
        var report = Report(benchmark: "datapath", parameters: [
            ("sizes", .array(sizeList.map { .count($0) })), ("pages", .array(pageList.map { .string($0.rawValue) })),
            ("mappings", .array(mapList.map { .string($0.rawValue) })), ("seconds", .double(seconds)),
            ("warmup", .double(warmup)), ("repeats", .count(repeats)), ("ring_size", .count(ringSize)),
            ("eager", .bool(eager)), ("sides", .array(sideList.map { .string($0 ? "on" : "off") })),
            ("compare", .string(compare)),
        ])
        var cells: [Cell] = []
        let total = sizeList.count * pageList.count * mapList.count * repeats * sideList.count
        var done = 0
        for size in sizeList {
            for page in pageList {
                for mapping in mapList {
                    var cell = Cell(size: size, page: page, mapping: mapping, eager: eager, ringSize: ringSize)
                    for index in 0..<repeats {
                        for on in sideList {
                            done += 1
                            let what = logging ? "dirty log" : "iotlb"
                            progress("[\(done)/\(total)] \(size) B \(page.rawValue) \(mapping.rawValue) \(what) \(on ? "on " : "off") …")
                            var c = WorkloadConfig()
                            c.packetSize = size
                            c.pageSize = page
                            c.mapping = mapping
                            c.ringSize = ringSize
                            c.eager = eager
                            let r = try measure(c, iotlb: logging || on, dirtyLog: logging && on, warmup: warmup, seconds: seconds)
                            progress("[\(done)/\(total)] \(size) B \(page.rawValue) \(mapping.rawValue) \(what) \(on ? "on " : "off") \(fmt(r.mpps)) Mpps")
                            if on { cell.on.append(r) } else { cell.off.append(r) }
                            report.row(cell.parameters + [(logging ? "dirty_log" : "iotlb", .string(on ? "on" : "off")),
                                                          ("repeat", .count(index))] + r.fields)
                        }
                    }
                    cells.append(cell)
                }
            }
        }
        progressDone()
        for c in cells { report.summary(c.parameters + c.summaryFields) }
        try report.emit(table: Cell.markdown(cells), to: output)
    }
}

/// One run's figures.
struct RunResult {
    var mpps: Double
    var gbps: Double
    var frames: UInt64
    var hits: UInt64
    var misses: UInt64
    var invalidations: UInt64
    var verifyErrors: UInt64
    /// Heap allocations and retain/release calls on the datapath thread per frame, net of the measurement's own.
    var allocationsPerFrame: Double
    var refcountsPerFrame: Double
    /// A cache line's round trip between two threads just before and after the run (`HostPhase`).
    var roundTripBefore = 0.0, roundTripAfter = 0.0
    var hitRate: Double { hits + misses == 0 ? 0 : Double(hits) / Double(hits + misses) }
    var phase: HostPhase { HostPhase(before: roundTripBefore, after: roundTripAfter) }

    /// Its figures as report fields.
    var fields: [(String, JSON)] {
        [("mpps", .double(mpps)), ("gbps", .double(gbps)), ("frames", .count(frames)), ("hits", .count(hits)),
         ("misses", .count(misses)), ("hit_rate", hits + misses == 0 ? .null : .double(hitRate)), ("invalidations", .count(invalidations)),
         ("verify_errors", .count(verifyErrors)), ("allocations_per_frame", .double(allocationsPerFrame)),
         ("retains_per_frame", .double(refcountsPerFrame)), ("host_round_trip_ns_before", .double(roundTripBefore)),
         ("host_round_trip_ns_after", .double(roundTripAfter)), ("host_phase", .string(phase.rawValue))]
    }
}

/// Runs one workload for `seconds` after `warmup` and reads its figures. With
/// `dirtyLog`, the device logs as a migrating front-end would have it: a log
/// covering guest memory, VHOST_F_LOG_ALL, and each vring's used ring logged
/// at its own address (VHOST_VRING_F_LOG); a thread clears the log every 100 ms,
/// as QEMU's migration does each time it syncs and copies the dirty pages.
func measure(_ c: WorkloadConfig, iotlb: Bool, dirtyLog: Bool = false, warmup: Double, seconds: Double,
             maxEntries: Int = 2048) throws -> RunResult {
    let before = cacheLineRoundTripNanos()
    var r = try measureRun(c, iotlb: iotlb, dirtyLog: dirtyLog, warmup: warmup, seconds: seconds, maxEntries: maxEntries)
    (r.roundTripBefore, r.roundTripAfter) = (before, cacheLineRoundTripNanos())
    return r
}

/// `measure` without the host's phase.
private func measureRun(_ c: WorkloadConfig, iotlb: Bool, dirtyLog: Bool, warmup: Double, seconds: Double,
                        maxEntries: Int) throws -> RunResult {
    var limits = EngineLimits()
    limits.hugePages = true
    let engine = Engine(datapathThreads: 1, limits: limits)
    defer { engine.shutdown() }
    let h = try engine.createDevice(DeviceConfig(id: "bench", iotlb: iotlb, iotlbMaxEntries: maxEntries))
    let started = Locked<Result<Workload, WorkloadError>?>(nil)
    Workload.start(c, on: h) { r in started.withLock { $0 = r } }
    var w: Workload?
    while w == nil {
        if let r = started.withLock({ $0 }) { w = try r.get() } else { usleep(1000) }
    }
    let workload = w!
    defer { _ = workload.stop() }
    let clearing = Atomic<Bool>(true)
    defer { clearing.store(false, ordering: .relaxed) }
    if dirtyLog {
        let made = h.performSync { d -> Result<DirtyLog, ValidationError> in
            guard let d, let t = d.memTable else { return .failure(ValidationError("no memory table")) }
            let last = t.regions.map { $0.guestPhysAddr.raw + ($0.memorySize - 1) }.max()!
            do throws(SystemCallError) { return .success(try DirtyLog(bytes: DirtyLog.bytes(covering: last))) } catch {
                return .failure(ValidationError(error.description))
            }
        }
        let log = try made.get()
        Thread.detachNewThread {
            while clearing.load(ordering: .relaxed) {
                usleep(100_000)
                log.clear()
            }
        }
        let failed = h.performSync { d -> String? in
            guard let d else { return "device gone" }
            d.setDirtyLog(log)
            d.setLogging(true)
            for v in d.vrings() {
                guard var vc = v.config else { continue }
                vc.logAddr = vc.usedAddr
                vc.lastAvailIdx = nil
                if (try? d.setVring(v.index, vc)) == nil { return "vring \(v.index) refused" }
            }
            return nil
        }
        if let failed { throw ValidationError("dirty log: \(failed)") }
    }
    sleepSeconds(warmup)
    // What the datapath thread counted, read on that thread; two reads back to back
    // give what reading itself costs.
    let probe: @Sendable (Device?) -> (UInt64, UInt64, IOTLBStats) = { d in
        (CBenchCounters_allocations(), CBenchCounters_refcounts(), d!.stats())
    }
    let b0 = h.performSync(probe), b1 = h.performSync(probe)
    let baseAlloc = b1.0 - b0.0, baseRef = b1.1 - b0.1
    let s0 = workload.stats
    let p0 = h.performSync(probe)
    sleepSeconds(seconds)
    let p1 = h.performSync(probe)
    let s1 = workload.stats
    let frames = s1.received - s0.received
    let dt = s1.elapsed - s0.elapsed
    let mpps = dt > 0 ? Double(frames) / dt / 1e6 : 0
    let f = Double(max(frames, 1))
    return RunResult(mpps: mpps, gbps: mpps * 1e6 * Double(c.packetSize) * 8 / 1e9, frames: frames,
                     hits: p1.2.hits - p0.2.hits, misses: p1.2.misses - p0.2.misses,
                     invalidations: s1.invalidations - s0.invalidations, verifyErrors: s1.verifyErrors,
                     allocationsPerFrame: Double(Int64(p1.0 - p0.0) - Int64(baseAlloc)) / f,
                     refcountsPerFrame: Double(Int64(p1.1 - p0.1) - Int64(baseRef)) / f)
}

/// One cell of the table: the on and off runs of one configuration.
struct Cell {
    var size: Int
    var page: PageSize
    var mapping: MappingMode
    var eager: Bool
    var ringSize: Int
    var on: [RunResult] = []
    var off: [RunResult] = []

    /// on/off ratios of the runs made side by side.
    var ratios: [Double] { zip(on, off).map { $1.mpps > 0 ? $0.mpps / $1.mpps : 0 } }

    static func markdown(_ cells: [Cell]) -> String {
        let rows = cells.map { c -> [String] in
            let r = c.ratios
            let onM = median(c.on.map(\.mpps)), offM = median(c.off.map(\.mpps))
            let hits = c.on.reduce(0) { $0 + $1.hits }, misses = c.on.reduce(0) { $0 + $1.misses }
            let rate = hits + misses == 0 ? 0 : Double(hits) / Double(hits + misses)
            return ["\(c.size)", c.page.rawValue, c.mapping.rawValue, fmt(onM), fmt(offM),
                    fmt(median(c.on.map(\.gbps))),
                    "\(fmt(r.min() ?? 0, 3)) / \(fmt(median(r), 3)) / \(fmt(r.max() ?? 0, 3))",
                    String(format: "%.5f", rate * 100) + " %", "\(misses)",
                    "\(c.on.reduce(0) { $0 + $1.invalidations })",
                    fmt(c.on.map(\.allocationsPerFrame).max() ?? 0, 4),
                    fmt(c.on.map(\.refcountsPerFrame).max() ?? 0, 4),
                    "\(c.on.reduce(0) { $0 + $1.verifyErrors } + c.off.reduce(0) { $0 + $1.verifyErrors })"]
        }
        return table(["bytes", "page", "mapping", "on Mpps", "off Mpps", "on Gbit/s", "on/off min / median / max",
                      "hit rate", "misses", "invalidations", "allocs/frame", "retains/frame", "verify errors"], rows)
    }

    /// What identifies the cell in the report.
    var parameters: [(String, JSON)] {
        [("packet_size", .count(size)), ("page_size", .string(page.rawValue)), ("mapping", .string(mapping.rawValue)),
         ("eager", .bool(eager)), ("ring_size", .count(ringSize))]
    }

    /// The table's figures: medians over the runs, the on/off ratio of each
    /// side-by-side pair (repeat i on / repeat i off) with min, median and max.
    var summaryFields: [(String, JSON)] {
        let r = ratios
        func opt(_ v: Double?) -> JSON { v.map { .double($0) } ?? .null }
        let hits = on.reduce(0) { $0 + $1.hits }, misses = on.reduce(0) { $0 + $1.misses }
        return [("on_mpps_median", on.isEmpty ? .null : .double(median(on.map(\.mpps)))),
                ("off_mpps_median", off.isEmpty ? .null : .double(median(off.map(\.mpps)))),
                ("on_gbps_median", on.isEmpty ? .null : .double(median(on.map(\.gbps)))),
                ("off_gbps_median", off.isEmpty ? .null : .double(median(off.map(\.gbps)))),
                ("ratios", .array(r.map { .double($0) })),
                ("ratio_min", opt(r.min())), ("ratio_median", r.isEmpty ? .null : .double(median(r))), ("ratio_max", opt(r.max())),
                ("on_hit_rate", hits + misses == 0 ? .null : .double(Double(hits) / Double(hits + misses))),
                ("on_misses", .count(misses)), ("on_invalidations", .count(on.reduce(0) { $0 + $1.invalidations })),
                ("on_allocations_per_frame_max", opt(on.map(\.allocationsPerFrame).max())),
                ("on_retains_per_frame_max", opt(on.map(\.refcountsPerFrame).max())),
                ("verify_errors", .count((on + off).reduce(0) { $0 + $1.verifyErrors }))]
    }
}
