// The IOTLB under pressure: lazy dynamic 4 KiB mappings (the built-in vIOMMU
// answers every miss) against the IOTLB's size, with static mappings as the
// reference, all alternated round by round so ratios compare like with like.
import ArgumentParser
import Guest

struct PressureBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pressure",
        abstract: "Dynamic 4 KiB Mpps against iotlb_max_entries; dynamic / static; alternated rounds.",
        discussion: """
            Each round runs, for each payload size, static mappings at 2048 entries, then dynamic \
            mappings at every size in --entries. Ratios are taken within a round (side by side) and \
            their medians reported: size / 2048 entries, and dynamic / static, also per host phase \
            (a cache line's round trip between two threads, timed around every run: fast below \
            200 ns, slow above; rounds whose runs saw different phases count in neither).
            """)

    @Option(help: "Payload sizes in bytes.") var sizes = "64,1500"
    @Option(help: "IOTLB sizes (iotlb_max_entries) for the dynamic runs.") var entries = "16,32,64,128,256,512,1024,2048,4096"
    @Option(help: "Seconds measured per run (after warm-up).") var seconds = 1.0
    @Option(help: "Warm-up seconds per run.") var warmup = 0.3
    @Option(help: "Rounds.") var repeats = 3
    @Option(help: "Ring size.") var ringSize = 256
    @OptionGroup var output: ReportOptions

    func run() throws {
        let sizeList = sizes.split(separator: ",").compactMap { Int($0) }
        let entryList = entries.split(separator: ",").compactMap { Int($0) }
        guard !sizeList.isEmpty, !entryList.isEmpty, entryList.allSatisfy({ $0 >= 1 && $0 <= 1 << 20 }) else {
            throw ValidationError("check --sizes and --entries (1 to 1048576)")
        }
        let total = sizeList.count * repeats * (entryList.count + 1)
        var done = 0
        var rows: [[String]] = []
        var report = Report(benchmark: "pressure", parameters: [
            ("sizes", .array(sizeList.map { .count($0) })), ("entries", .array(entryList.map { .count($0) })),
            ("seconds", .double(seconds)), ("warmup", .double(warmup)), ("repeats", .count(repeats)),
            ("ring_size", .count(ringSize)), ("page_size", .string("4k"))])
        for size in sizeList {
            var staticRuns: [RunResult] = []
            var dynamicRuns: [Int: [RunResult]] = [:]
            for round in 0..<repeats {
                for e in [0] + entryList {  // 0: the static reference
                    done += 1
                    let label = e == 0 ? "static 2048" : "dynamic \(e)"
                    progress("[\(done)/\(total)] \(size) B round \(round + 1) \(label) …")
                    var c = WorkloadConfig()
                    c.packetSize = size
                    c.pageSize = .k4
                    c.mapping = e == 0 ? .static : .dynamic
                    c.ringSize = ringSize
                    let r = try measure(c, iotlb: true, warmup: warmup, seconds: seconds, maxEntries: e == 0 ? 2048 : e)
                    progress("[\(done)/\(total)] \(size) B round \(round + 1) \(label) \(fmt(r.mpps, 3)) Mpps")
                    if e == 0 { staticRuns.append(r) } else { dynamicRuns[e, default: []].append(r) }
                    report.row([("packet_size", .count(size)), ("round", .count(round)),
                                ("mapping", .string(e == 0 ? "static" : "dynamic")),
                                ("iotlb_max_entries", .count(e == 0 ? 2048 : e)), ("mpps", .double(r.mpps)),
                                ("frames", .count(r.frames)), ("misses", .count(r.misses)), ("hit_rate", .double(r.hitRate)),
                                ("verify_errors", .count(r.verifyErrors)),
                                ("allocations_per_frame", .double(r.allocationsPerFrame)),
                                ("retains_per_frame", .double(r.refcountsPerFrame)),
                                ("host_round_trip_ns_before", .double(r.roundTripBefore)),
                                ("host_round_trip_ns_after", .double(r.roundTripAfter)),
                                ("host_phase", .string(r.phase.rawValue))])
                }
            }
            let reference = dynamicRuns[2048]
            for e in entryList {
                let runs = dynamicRuns[e] ?? []
                let perRound = zip(runs, staticRuns).map { $1.mpps > 0 ? $0.mpps / $1.mpps : 0 }
                // The same ratios, kept apart by the host's phase when both runs of a round saw the same one.
                func inPhase(_ phase: HostPhase) -> [Double] {
                    zip(runs, staticRuns).filter { $0.phase == phase && $1.phase == phase }
                        .map { $1.mpps > 0 ? $0.mpps / $1.mpps : 0 }
                }
                let fast = inPhase(.fast), slow = inPhase(.slow)
                func phaseCell(_ xs: [Double]) -> String { xs.isEmpty ? "-" : "\(fmt(median(xs), 3)) (\(xs.count))" }
                let vs2048 = reference.map { ref in zip(runs, ref).map { $1.mpps > 0 ? $0.mpps / $1.mpps : 0 } } ?? []
                let misses = runs.reduce(0) { $0 + $1.misses }, frames = runs.reduce(0) { $0 + $1.frames }
                let verify = runs.reduce(0) { $0 + $1.verifyErrors }
                rows.append(["\(size)", "\(e)", fmt(median(runs.map(\.mpps)), 3), fmt(median(staticRuns.map(\.mpps)), 3),
                             fmt(median(perRound), 3), phaseCell(fast), phaseCell(slow),
                             vs2048.isEmpty ? "-" : fmt(median(vs2048), 3),
                             fmt(Double(misses) / Double(max(frames, 1)), 3), "\(verify)"])
                report.summary([("packet_size", .count(size)), ("iotlb_max_entries", .count(e)),
                                ("dynamic_mpps_median", .double(median(runs.map(\.mpps)))),
                                ("static_mpps_median", .double(median(staticRuns.map(\.mpps)))),
                                ("dynamic_over_static", .array(perRound.map { .double($0) })),
                                ("dynamic_over_static_median", .double(median(perRound))),
                                ("dynamic_over_static_fast_phase", .array(fast.map { .double($0) })),
                                ("dynamic_over_static_slow_phase", .array(slow.map { .double($0) })),
                                ("over_2048", .array(vs2048.map { .double($0) })),
                                ("over_2048_median", vs2048.isEmpty ? .null : .double(median(vs2048))),
                                ("misses_per_frame", .double(Double(misses) / Double(max(frames, 1)))),
                                ("verify_errors", .count(verify))])
            }
        }
        progressDone()
        try report.emit(table: table(["bytes", "iotlb_max_entries", "dynamic Mpps", "static Mpps (2048)", "dynamic / static",
                                      "fast phase (rounds)", "slow phase (rounds)", "× at 2048", "misses/frame",
                                      "verify errors"], rows), to: output)
    }
}
