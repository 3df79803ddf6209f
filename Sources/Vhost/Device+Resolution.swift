// A device's miss resolution times: the samples, histogram and figures readers get.
import Platform

extension Device {
    /// Miss resolution times in µs: count, p50, p99, max.
    public func resolutionTimes() -> (count: UInt64, p50: UInt32, p99: UInt32, max: UInt32) {
        let sorted = resolutionSamples.sorted()
        func pct(_ p: Double) -> UInt32 {
            sorted.isEmpty ? 0 : sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]
        }
        return (resolutionCount, pct(0.5), pct(0.99), resolutionMax)
    }

    /// Misses resolved so far (the histogram's count).
    public var resolvedMisses: UInt64 { resolutionCount }

    /// The resolution histogram: per-bucket counts (last one above every bound) and the sum in µs.
    public func resolutionHistogram() -> (buckets: [UInt64], sumMicros: UInt64) { (resolutionBuckets, resolutionSumMicros) }

    /// Adds one miss resolution time (from the queue's first post) to the figures.
    func recordResolution(since: UInt64, now: UInt64) {
        let us = UInt32(clamping: (now &- since) / 1000)
        if resolutionSamples.count < Device.resolutionWindow {
            resolutionSamples.append(us)
        } else {
            resolutionSamples[Int(resolutionCount % UInt64(Device.resolutionWindow))] = us
        }
        resolutionCount &+= 1
        resolutionMax = max(resolutionMax, us)
        resolutionSumMicros &+= UInt64(us)
        resolutionBuckets[Device.resolutionBounds.firstIndex { us <= $0 } ?? Device.resolutionBounds.count] &+= 1
    }
}
