// Lookup: what one IOTLB translation costs, by table size and access pattern.
import ArgumentParser
import IOTLB
import Platform
import Vhost

struct LookupBench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "lookup",
                                                    abstract: "Translate cost (ns) at several IOTLB sizes; update+invalidate pair cost.")

    @Option(help: "IOTLB sizes.") var entries = "64,2048,65536"
    @Option(help: "Look-ups per measurement.") var lookups = 4_000_000
    @OptionGroup var output: ReportOptions

    func run() throws {
        let sizes = entries.split(separator: ",").compactMap { Int($0) }
        var report = Report(benchmark: "lookup", parameters: [("entries", .array(sizes.map { .count($0) })),
                                                              ("lookups", .count(lookups))])
        var rows: [[String]] = []
        for n in sizes {
            progress("lookup: \(n) entries …")
            let r = measureLookups(entries: n, lookups: lookups)
            rows.append(["\(n)", fmt(r.random, 1), fmt(r.sequential, 1), fmt(r.miss, 1), fmt(r.pair, 1)])
            report.row([("entries", .count(n)), ("lookups", .count(lookups)), ("random_hit_ns", .double(r.random)),
                        ("sequential_hit_ns", .double(r.sequential)), ("miss_ns", .double(r.miss)),
                        ("update_invalidate_pair_ns", .double(r.pair))])
        }
        progressDone()
        try report.emit(table: table(["entries", "random hit ns", "sequential hit ns", "miss ns", "update+invalidate ns"], rows),
                        to: output)
    }
}

/// Entries are 4 KiB pages 64 KiB apart, inserted in random order; look-ups
/// hit a random entry, walk them in order, or fall in the gaps. Each pattern
/// is timed by a function of its own, so `valgrind --tool=callgrind` can
/// count each one's instructions (inclusive cost of `timeRandomHits` etc.).
func measureLookups(entries n: Int, lookups: Int) -> (random: Double, sequential: Double, miss: Double, pair: Double) {
    var g = SystemRandomNumberGenerator()
    let tlb = IOTLB(maxEntries: n)
    for i in (0..<n).shuffled(using: &g) {
        let iova = UInt64(i) << 16
        tlb.update(IOTLBEntry(range: AddressRange(start: IOVA(iova), size: 4096)!, uaddr: UserAddr(0x7f00_0000_0000 + iova),
                              perm: .readWrite))
    }
    let k = 1 << 16
    let random = (0..<k).map { _ in (UInt64.random(in: 0..<UInt64(n), using: &g) << 16) | UInt64.random(in: 0..<4096, using: &g) }
    let sequential = (0..<k).map { (UInt64($0 % n) << 16) | 0x80 }
    let gaps = (0..<k).map { _ in (UInt64.random(in: 0..<UInt64(n), using: &g) << 16) | 0x8000 }
    let pair = timeUpdateInvalidatePairs(tlb, entries: n, pairs: lookups / 8)
    return (timeRandomHits(tlb, random, lookups), timeSequentialHits(tlb, sequential, lookups),
            timeMisses(tlb, gaps, lookups), pair)
}

/// ns per update+invalidate pair: a 256-byte entry in a gap (the table keeps its size), then its invalidation.
@inline(never)
func timeUpdateInvalidatePairs(_ tlb: IOTLB, entries n: Int, pairs: Int) -> Double {
    let t0 = monotonicNanos()
    for i in 0..<pairs {
        let iova = (UInt64(i % n) << 16) | 0x8000  // a gap: the table keeps its size
        let r = AddressRange(start: IOVA(iova), size: 256)!
        tlb.update(IOTLBEntry(range: r, uaddr: UserAddr(0x1000), perm: .read))
        tlb.invalidate(r)
    }
    return Double(monotonicNanos() - t0) / Double(pairs)
}

// Each seeds its sink differently: identical bodies would be merged into one symbol.
@inline(never) func timeRandomHits(_ tlb: IOTLB, _ a: [UInt64], _ lookups: Int) -> Double { timeLookups(tlb, a, lookups, 1) }
@inline(never) func timeSequentialHits(_ tlb: IOTLB, _ a: [UInt64], _ lookups: Int) -> Double { timeLookups(tlb, a, lookups, 2) }
@inline(never) func timeMisses(_ tlb: IOTLB, _ a: [UInt64], _ lookups: Int) -> Double { timeLookups(tlb, a, lookups, 3) }

/// ns per `translate` of the addresses of `addrs` (a power of two of them), in turn.
@inline(__always)
func timeLookups(_ tlb: IOTLB, _ addrs: [UInt64], _ lookups: Int, _ seed: UInt64) -> Double {
    var sink: UInt64 = seed
    let mask = addrs.count - 1
    let t0 = monotonicNanos()
    addrs.withUnsafeBufferPointer { a in
        for i in 0..<lookups {
            switch tlb.translate(IOVA(a[i & mask]), access: .read, size: 64) {
            case .mapped(let u, let len, _): sink &+= u.raw &+ len
            case .miss: sink &+= 1
            case .denied: sink &+= 2
            }
        }
    }
    let dt = Double(monotonicNanos() - t0) / Double(lookups)
    if sink == 42 { print("") }  // keeps the loop
    return dt
}
