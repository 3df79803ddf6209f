// Miss resolution times as a reader gets them: the device's recent samples,
// copied on its worker, and their percentiles, computed by the reader. The
// sort stays off the datapath thread.

/// How long misses took to resolve (µs), from a device's recent samples.
public struct ResolutionTimes: Sendable, Equatable {
    /// The most recent samples, unordered (at most `Device.resolutionWindow`).
    public var samples: [UInt32]
    /// Misses resolved so far.
    public var count: UInt64
    /// The longest resolution so far.
    public var max: UInt32

    /// The 50th and 99th percentiles of the samples (0 without any). Sorts:
    /// for the reader's thread, not the worker's.
    public func percentiles() -> (p50: UInt32, p99: UInt32) {
        let sorted = samples.sorted()
        func pct(_ p: Double) -> UInt32 {
            sorted.isEmpty ? 0 : sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]
        }
        return (pct(0.5), pct(0.99))
    }
}
