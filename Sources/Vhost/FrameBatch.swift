// Four frames moved together by the loopback (split and packed alike), as
// DPDK's batches do: their descriptors read together, their buffers asked
// for together, so the misses to the driver's core overlap instead of
// following one another. Only plain frames qualify: one device-readable TX
// descriptor, one device-writable RX descriptor that holds it, both
// translations cached. A batch is checked whole before anything is copied
// or counted; anything less plain goes one by one, with every check.
import CRingAtomics
import IOTLB

/// What a four-at-a-time try did.
enum BatchOutcome {
    /// Four frames moved.
    case moved
    /// Fewer than four buffers wait on a ring (or they meet its end): try again next time.
    case short
    /// The frames are not plain (a chain, a translation not cached, …): the
    /// queue goes one by one for a while before trying again (`batchMoved`).
    case refused
}

extension VirtQueue {
    /// Whether to try four at a time now; if not, one frame of the wait is
    /// counted off (the packed loop asks once per frame).
    @inline(__always)
    func batchDue() -> Bool {
        if batchHoldoff == 0 { return true }
        batchHoldoff -= 1
        return false
    }

    /// Takes the whole wait at once: the frames to go one by one before the
    /// next try, at least one (after a short try). The split loop runs them
    /// in its plain one-by-one loop, with no check per frame.
    @inline(__always)
    func takeBatchWait() -> Int {
        let wait = max(batchHoldoff, 1)
        batchHoldoff = 0
        return wait
    }

    /// Takes a try's outcome; true when four frames moved. After a refusal
    /// the queue goes one by one for 4 frames (a cold translation is warm
    /// then), twice as long after every further refusal, up to 4096; every
    /// batch that moves halves the wait. A guest whose frames rarely qualify
    /// (chains, translations not cached) then tries about once every 4096
    /// frames: at one try per 33 frames, the tries cost it a quarter of its
    /// throughput (iotlb-bench datapath, 4 KiB static, before 4 KiB pages had
    /// their own translation slots).
    @inline(__always)
    func batchMoved(_ outcome: BatchOutcome) -> Bool {
        switch outcome {
        case .moved:
            batchBackoff >>= 1
            return true
        case .refused:
            batchBackoff = min(max(batchBackoff &* 2, 4), 4096)
            batchHoldoff = batchBackoff
            return false
        case .short:
            return false
        }
    }
}

/// The four frames of a batch, admitted and waiting to be copied. Inline
/// storage: nothing is allocated.
struct FrameBatch {
    static let size = 4
    /// The device's translation generation, read once for the whole batch
    /// (nothing changes the translations while a batch moves).
    let generation: UInt64
    var src = InlineArray<4, UnsafeMutableRawPointer?>(repeating: nil)
    var dst = InlineArray<4, UnsafeMutableRawPointer?>(repeating: nil)
    var len = InlineArray<4, UInt32>(repeating: 0)
    /// What the used elements name: the RX and TX ids (packed) or heads (split).
    var rxID = InlineArray<4, UInt16>(repeating: 0)
    var txID = InlineArray<4, UInt16>(repeating: 0)
    /// Whether the RX buffer may be read too (not a write-only mapping):
    /// only then is its header compared before it is written.
    var rxReadable = InlineArray<4, Bool>(repeating: false)
}

extension Device {
    /// Host memory for all `length` bytes at `addr` if the queue's cached
    /// translation holds them with `access`; nil otherwise (nothing counted).
    @inline(__always)
    func cachedHost(_ vq: VirtQueue, _ addr: UInt64, _ length: UInt32, _ access: Permissions,
                    generation: UInt64) -> UnsafeMutableRawPointer? {
        let cache = vq.bufferCache(addr).pointee
        guard cache.answers(addr, access, generation: generation), UInt64(length &- 1) <= cache.last &- addr,
              let host = cache.host else { return nil }
        return host + Int(addr &- cache.first)
    }

    /// Admits frame `k` of a batch: a TX buffer (`from`, not NEXT, INDIRECT or
    /// WRITE) copied whole into an RX buffer (`into`, WRITE, not NEXT or
    /// INDIRECT), both cached; asks for both buffers' lines. False if not plain.
    @inline(__always)
    func admit(_ b: inout FrameBatch, _ k: Int, from tx: VirtQueue, _ t: (addr: UInt64, len: UInt32, flags: UInt16),
               into rx: VirtQueue, _ r: (addr: UInt64, len: UInt32, flags: UInt16)) -> Bool {
        let plain = Descriptor.next | Descriptor.indirect
        guard t.flags & (plain | Descriptor.write) == 0, r.flags & plain == 0, r.flags & Descriptor.write != 0,
              t.len > 0, t.len <= r.len, let s = cachedHost(tx, t.addr, t.len, .read, generation: b.generation),
              let w = cachedHost(rx, r.addr, t.len, .write, generation: b.generation) else { return false }
        // A frame and its header often straddle two lines (DPDK's header sits
        // 12 bytes before the frame's line): ask for both. The RX header's line
        // is read first (`copyFrames` may leave it alone), the frame's written.
        CRingAtomics_prefetch(s)
        CRingAtomics_prefetch(s + Int(min(t.len, 12)))  // the frame's first line: the one the driver wrote
        CRingAtomics_prefetch(s + Int(t.len &- 1))
        CRingAtomics_prefetch(w)
        CRingAtomics_prefetch_write(w + Int(min(t.len, 12)))
        CRingAtomics_prefetch_write(w + Int(t.len &- 1))
        b.src[k] = s
        b.dst[k] = w
        b.len[k] = t.len
        b.rxReadable[k] = rx.bufferCache(r.addr).pointee.perm.contains(.read)
        return true
    }

    /// Whether the 12-byte virtio-net header at `rx` already holds the TX
    /// header at `tx` as the RX side gives it (num_buffers 1): the first ten
    /// bytes equal, num_buffers 1. A driver that recycles its buffers (DPDK's
    /// mbufs) finds the header it last received there, so in a steady flow the
    /// header's line is only read, by both sides, and never changes hands.
    @inline(__always)
    static func sameNetHeader(_ tx: UnsafeMutableRawPointer, _ rx: UnsafeMutableRawPointer) -> Bool {
        tx.loadUnaligned(as: UInt64.self) == rx.loadUnaligned(as: UInt64.self)
            && (tx + 8).loadUnaligned(as: UInt16.self) == (rx + 8).loadUnaligned(as: UInt16.self)
            && (rx + 10).loadUnaligned(as: UInt16.self) == UInt16(1).littleEndian
    }

    /// Copies an admitted batch (one RX buffer per frame: num_buffers = 1,
    /// virtio-net 5.1.6.4) and counts its frames, bytes and hits.
    @inline(__always)
    func copyFrames<B: TranslatedAddress>(_ b: inout FrameBatch, _ tx: VirtQueue, _ rx: VirtQueue, _: B.Type) {
        let numBuffers = rxNetHeaderNumBuffers
        var bytes: UInt64 = 0
        for k in 0..<FrameBatch.size {
            let len = b.len[k]
            // SAFETY: admit checked both translations cover `len` bytes, and len <= the RX buffer.
            let src = b.src[k]!, dst = b.dst[k]!
            if numBuffers && len >= 12 && b.rxReadable[k] && Self.sameNetHeader(src, dst) {
                // The RX header already says what this one would: its line stays
                // shared with the driver, which then reads it without a miss (DPDK
                // writes a header field only when it differs, for the same reason).
                (dst + 12).copyMemory(from: src + 12, byteCount: Int(len) - 12)
            } else {
                dst.copyMemory(from: src, byteCount: Int(len))
                if numBuffers && len >= 12 { (dst + 10).storeBytes(of: UInt16(1).littleEndian, as: UInt16.self) }
            }
            bytes &+= UInt64(len)
        }
        let n = UInt64(FrameBatch.size)
        if B.space == .iova {
            counters.hits &+= 2 * n; tx.hits &+= n; rx.hits &+= n
        }
        tx.chains &+= n; rx.chains &+= n
        tx.bytes &+= bytes; rx.bytes &+= bytes
        batchedFrames &+= n
    }
}
