// A device's misses once answered: the waiting queues an update resumes (or
// whose miss it announces again), and how long misses took to resolve.
// Owned by the device's worker, as the rest of the device.
import IOTLB
import Platform

extension Device {
    /// After an update: resumes every waiting queue whose missed IOVA now
    /// translates with the permission it needs; returns how many. A queue
    /// whose miss is still unresolved announces it again with a fresh seq (as
    /// the kernel's vq sends its miss again) when `answerMayBeLost(iova)`: the
    /// batch named the IOVA yet it does not translate (evicted or replaced in
    /// the same batch, or too little permission). A reader that only asks past
    /// its last seq then sees the miss once more; unrelated updates (another
    /// queue's answer) do not repeat it.
    func resolveMisses(answerMayBeLost: (IOVA) -> Bool) -> Int {
        var resolved = 0
        let now = monotonicNanos()
        // Through the unretained references: this runs on the worker after every update (a miss answered there).
        for i in 0..<config.queues where queueRefs[i]._withUnsafeGuaranteedRef({ resumeIfAnswered($0, now, answerMayBeLost) }) {
            resolved += 1
        }
        return resolved
    }

    /// Resumes `vq` if it waits for a miss the IOTLB now answers (true), or
    /// announces the miss again when the update may have lost its answer.
    @inline(__always)
    private func resumeIfAnswered(_ vq: VirtQueue, _ now: UInt64, _ answerMayBeLost: (IOVA) -> Bool) -> Bool {
        guard vq.state == .waitingIOTLB, let p = vq.pending, p.kind == .miss else { return false }
        guard case .mapped = iotlb.translate(p.iova, access: p.perm, size: 1) else {
            guard answerMayBeLost(p.iova) else { return false }
            missLog.remove(seq: p.seq)
            vq.pending!.seq = missLog.post(vq: vq.index, kind: .miss, iova: p.iova, perm: p.perm, now: now)
            vq.pending!.postedAt = now
            counters.reannouncedMisses &+= 1
            return false
        }
        missLog.remove(seq: p.seq)
        vq.pending = nil
        vq.state = .running
        recordResolution(since: p.waitingSince, now: now)
        return true
    }

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

    /// Miss resolution times in µs: the samples copied (the reader sorts them, off the worker), count, max.
    public func resolutionTimes() -> ResolutionTimes {
        // A copy of its own: sharing the buffer would make the worker's next sample copy it.
        ResolutionTimes(samples: resolutionSamples.withUnsafeBufferPointer { Array($0) }, count: resolutionCount,
                        max: resolutionMax)
    }

    /// Misses resolved so far (the histogram's count).
    public var resolvedMisses: UInt64 { resolutionCount }

    /// The resolution histogram: per-bucket counts (last one above every bound) and the sum in µs.
    public func resolutionHistogram() -> (buckets: [UInt64], sumMicros: UInt64) { (resolutionBuckets, resolutionSumMicros) }
}
