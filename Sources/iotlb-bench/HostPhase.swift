// The host's phase. This VM's two vCPUs are sometimes placed where a cache
// line goes between them and back in 55-85 ns and sometimes where it takes
// 310-350 ns, and every figure of two threads talking through memory (the
// datapath and its guest, a front-end and its back-end) follows, by up to 3×.
// A ping-pong of one cache line between two threads, timed before and after
// a run, tells which phase the run saw, so ratios can be taken within one.
import ArgumentParser
import Glibc
import Platform
import Synchronization

enum HostPhase: String {
    case fast, slow, mixed

    /// Round trips at or above this are the slow phase (measured here: fast
    /// 55–85 ns, slow 310–350 ns).
    static let slowFromNanos = 200.0

    /// The phase one round trip (ns) means.
    init(roundTrip: Double) { self = roundTrip >= HostPhase.slowFromNanos ? .slow : .fast }

    /// The phase a run saw, from the round trips timed before and after it.
    init(before: Double, after: Double) {
        let a = HostPhase(roundTrip: before), b = HostPhase(roundTrip: after)
        self = a == b ? a : .mixed
    }
}

private final class PingPong: Sendable {
    let line = Atomic<UInt64>(0)
    let stop = Atomic<Bool>(false)
}

/// One cache line's round trip between two threads, in ns: the median of
/// three series of `rounds`. A series is cut off after 50 ms (the two threads
/// found one vCPU: then the figure is that of a slow phase, as it should be).
func cacheLineRoundTripNanos(rounds: Int = 5000) -> Double {
    var series: [Double] = []
    for _ in 0..<3 {
        let p = PingPong()
        let answerer = startThread(name: "phase-probe") {
            var i: UInt64 = 0
            while !p.stop.load(ordering: .relaxed) {
                if p.line.load(ordering: .acquiring) == 2 * i + 1 {
                    p.line.store(2 * i + 2, ordering: .releasing)
                    i += 1
                }
            }
        }
        // Timed from the 100th round trip: the answerer's vCPU may still be waking.
        var start = monotonicNanos()
        let deadline = start + 50_000_000
        var done = 0
        series: for i in 0..<UInt64(rounds + 100) {
            if i == 100 { start = monotonicNanos(); done = 0 }
            p.line.store(2 * i + 1, ordering: .releasing)
            var spins = 0
            while p.line.load(ordering: .acquiring) != 2 * i + 2 {
                spins += 1
                if spins & 1023 == 0 && monotonicNanos() > deadline { break series }
            }
            done += 1
        }
        let elapsed = monotonicNanos() - start
        p.stop.store(true, ordering: .relaxed)
        pthread_join(answerer, nil)
        series.append(Double(elapsed) / Double(max(done, 1)))
    }
    return median(series)
}

/// `iotlb-bench phase`: the round trip and the phase it means, for the
/// side-by-side scripts, which time it around every run of other programs.
struct PhaseProbe: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "phase",
        abstract: "The host's phase now: a cache line's round trip between two threads (ns), fast or slow.",
        discussion: """
            Prints "<ns> <fast|slow>". This VM's vCPUs flip between a placement where a cache line \
            goes between them and back in 55-85 ns and one where it takes 310-350 ns (slow from \
            200 ns); every figure of two threads talking through memory follows. Runs for a few \
            milliseconds.
            """)

    func run() {
        let ns = cacheLineRoundTripNanos()
        print("\(Int(ns.rounded())) \(HostPhase(roundTrip: ns).rawValue)")
    }
}
