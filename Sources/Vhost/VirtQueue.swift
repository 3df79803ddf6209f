// A virtqueue, split (virtio 1.x, 2.7) or packed (2.8): its configuration,
// state, ring translations and counters. Owned by the device's worker.
import Glibc
import IOTLB
import CRingAtomics

/// What `PUT …/vrings/{n}` sets.
public struct VringConfig: Sendable, Equatable {
    /// Ring size: at most 32768; a power of 2 for split rings.
    public var num: Int
    /// Descriptor table (16-byte aligned), avail ring (2), used ring (4): IOVAs with
    /// the IOTLB on, user addresses without. A packed ring (VIRTIO_F_RING_PACKED)
    /// has its descriptor ring at `descAddr` and its driver and device event
    /// suppression areas (4 bytes each, 4-aligned) at `availAddr` and `usedAddr`.
    public var descAddr: UInt64
    public var availAddr: UInt64
    public var usedAddr: UInt64
    /// A disabled ring is not processed.
    public var enabled: Bool
    /// VIRTIO_F_RING_EVENT_IDX: rings carry used_event / avail_event.
    public var eventIdx: Bool
    /// Where processing starts in the avail ring (VHOST_SET_VRING_BASE). Nil:
    /// continue where the queue is when its ring stays the same (num and the
    /// three addresses), else 0. Packed: the slot in bits 0-14, the driver's
    /// wrap counter in bit 15 (as vhost-user encodes it).
    public var lastAvailIdx: UInt16?
    /// VIRTIO_F_RING_PACKED: the ring is packed.
    public var packed: Bool
    /// VHOST_VRING_F_LOG: while dirty logging, writes to the used area are
    /// logged at this address (vhost's log_guest_addr): an IOVA with the IOTLB
    /// on (QEMU's used_phys under ACCESS_PLATFORM), else guest-physical. Nil:
    /// the used area is not logged. Changing it keeps the ring running.
    public var logAddr: UInt64?

    public init(num: Int, descAddr: UInt64, availAddr: UInt64, usedAddr: UInt64, enabled: Bool = true,
                eventIdx: Bool = false, lastAvailIdx: UInt16? = nil, packed: Bool = false, logAddr: UInt64? = nil) {
        self.packed = packed
        self.logAddr = logAddr
        self.num = num
        self.descAddr = descAddr
        self.availAddr = availAddr
        self.usedAddr = usedAddr
        self.enabled = enabled
        self.eventIdx = eventIdx
        self.lastAvailIdx = lastAvailIdx
    }

    /// The most entries a split ring may have.
    public static let maxNum = 32768

    /// Whether `other` describes the same ring memory (so indices carry over).
    public func sameRing(as other: VringConfig) -> Bool {
        num == other.num && descAddr == other.descAddr && availAddr == other.availAddr && usedAddr == other.usedAddr
            && eventIdx == other.eventIdx && packed == other.packed
    }

    /// Bytes of each ring area (the kernel's vq_meta_prefetch lengths).
    public var descBytes: Int { packed ? PackedRing.descBytes(num: num) : SplitRing.descBytes(num: num) }
    public var availBytes: Int { packed ? PackedRing.eventBytes : SplitRing.availBytes(num: num, eventIdx: eventIdx) }
    public var usedBytes: Int { packed ? PackedRing.eventBytes : SplitRing.usedBytes(num: num, eventIdx: eventIdx) }

    /// The first field that breaks the ring rules, with why.
    public func problem() -> (field: String, message: String)? {
        if packed {
            if num < 1 || num > VringConfig.maxNum { return ("num", "num must be from 1 to \(VringConfig.maxNum)") }
            if let base = lastAvailIdx, Int(base & 0x7fff) >= num {
                return ("last_avail_idx", "a packed ring's position (bits 0-14) must be below num")
            }
            if descAddr % 16 != 0 { return ("desc_addr", "the descriptor ring must be 16-byte aligned") }
            if availAddr % 4 != 0 { return ("avail_addr", "the driver event suppression area must be 4-byte aligned") }
        } else if num < 1 || num > VringConfig.maxNum || num & (num - 1) != 0 {
            return ("num", "num must be a power of 2 from 1 to \(VringConfig.maxNum)")
        }
        if descAddr % 16 != 0 { return ("desc_addr", "the descriptor table must be 16-byte aligned") }
        if availAddr % 2 != 0 { return ("avail_addr", "the avail ring must be 2-byte aligned") }
        if usedAddr % 4 != 0 { return ("used_addr", "the used ring must be 4-byte aligned") }
        for (f, a, n) in [("desc_addr", descAddr, descBytes), ("avail_addr", availAddr, availBytes),
                          ("used_addr", usedAddr, usedBytes)] where a.addingReportingOverflow(UInt64(n - 1)).overflow {
            return (f, "the ring passes 2^64-1")
        }
        return nil
    }
}

/// A queue's state as the contract names it.
public enum VringState: String, Sendable {
    case running
    case waitingIOTLB = "waiting_iotlb"
    case failed
    case disabled
}

/// The event a stopped queue posted.
struct PendingEvent {
    var seq: UInt64
    var kind: MissEvent.Kind
    var iova: IOVA
    var perm: Permissions
    var postedAt: UInt64
    /// When the queue started waiting for this translation: the first post of
    /// a miss, kept when the miss is announced again with a fresh seq.
    var waitingSince: UInt64
}

/// Per-queue counters and state, as published to readers.
public struct VringSnapshot: Sendable, Equatable {
    public var index: Int
    public var config: VringConfig?
    public var state: VringState
    public var lastAvailIdx: UInt16
    public var usedIdx: UInt16
    /// The outstanding miss or access failure: seq, kind, iova, perm.
    public var pending: (seq: UInt64, kind: MissEvent.Kind, iova: IOVA, perm: Permissions)?
    public var failure: String?
    /// While the queue waits for a translation: since when (monotonic ns).
    public var waitingSince: UInt64?
    public var hits: UInt64
    public var misses: UInt64
    public var accessFailures: UInt64
    public var chains: UInt64
    public var bytes: UInt64
    public var notifications: UInt64

    public static func == (a: VringSnapshot, b: VringSnapshot) -> Bool {
        a.index == b.index && a.config == b.config && a.state == b.state && a.lastAvailIdx == b.lastAvailIdx
            && a.usedIdx == b.usedIdx && a.pending?.seq == b.pending?.seq && a.failure == b.failure
    }
}

/// One virtqueue. Not thread-safe: only the device's worker touches it.
public final class VirtQueue {
    /// Index in the device (even RX, odd TX).
    public let index: Int

    /// Everything the queue mutates, in one struct behind a pointer.
    ///
    /// SAFETY: a queue has one owner thread (its device's worker), so no two
    /// accesses to these fields ever overlap. Behind a pointer the compiler
    /// does not check exclusivity at run time on each access, as it would for
    /// a class's stored properties (a runtime call per field on the
    /// per-descriptor path). The fields keep their names as properties below;
    /// the memory lives as long as the queue.
    struct Mutable {
        var config: VringConfig?
        var state: VringState = .disabled
        var lastAvailIdx: UInt16 = 0
        var usedIdx: UInt16 = 0
        // Packed rings: the slots are lastAvailIdx and usedIdx; these the wrap counters.
        var availWrap = true
        var usedWrap = true
        var needsUsedInit = true
        var pending: PendingEvent?
        var failure: String?
        // Ring translations, checked for the whole ring length ("prefetch") and
        // valid while the device's translation generation is unchanged. A nil
        // host pointer with `ringsReady` means the area spans several mappings:
        // accessed through the general accessors.
        var ringsReady = false
        var ringGeneration: UInt64 = .max
        var descHost: UnsafeMutableRawPointer?
        var availHost: UnsafeMutableRawPointer?
        var usedHost: UnsafeMutableRawPointer?
        var ringCache = TranslationCache()
        // Dirty logging (see Datapath+Log.swift): the GPA of the used area's log
        // address and of a packed descriptor ring, when contiguous (.max: not, or none).
        var usedLogGPA: UInt64 = .max
        var usedLogPieces = false
        var descLogGPA: UInt64 = .max
        // Counters.
        var hits: UInt64 = 0
        var misses: UInt64 = 0
        var accessFailures: UInt64 = 0
        var chains: UInt64 = 0
        var bytes: UInt64 = 0
        var notifications: UInt64 = 0
        // A vhost-user front-end's notifications: its call eventfd (-1: none) and
        // whether it kicks (then the used ring's flags tell it when to).
        var callFD: Int32 = -1
        var driverKicks = false
    }
    private let m: UnsafeMutablePointer<Mutable>

    var config: VringConfig? { get { m.pointee.config } set { m.pointee.config = newValue } }
    var state: VringState { get { m.pointee.state } set { m.pointee.state = newValue } }
    var lastAvailIdx: UInt16 { get { m.pointee.lastAvailIdx } set { m.pointee.lastAvailIdx = newValue } }
    var usedIdx: UInt16 { get { m.pointee.usedIdx } set { m.pointee.usedIdx = newValue } }
    var availWrap: Bool { get { m.pointee.availWrap } set { m.pointee.availWrap = newValue } }
    var usedWrap: Bool { get { m.pointee.usedWrap } set { m.pointee.usedWrap = newValue } }
    var needsUsedInit: Bool { get { m.pointee.needsUsedInit } set { m.pointee.needsUsedInit = newValue } }
    var pending: PendingEvent? { get { m.pointee.pending } set { m.pointee.pending = newValue } }
    var failure: String? { get { m.pointee.failure } set { m.pointee.failure = newValue } }
    var ringsReady: Bool { get { m.pointee.ringsReady } set { m.pointee.ringsReady = newValue } }
    var ringGeneration: UInt64 { get { m.pointee.ringGeneration } set { m.pointee.ringGeneration = newValue } }
    var descHost: UnsafeMutableRawPointer? { get { m.pointee.descHost } set { m.pointee.descHost = newValue } }
    var availHost: UnsafeMutableRawPointer? { get { m.pointee.availHost } set { m.pointee.availHost = newValue } }
    var usedHost: UnsafeMutableRawPointer? { get { m.pointee.usedHost } set { m.pointee.usedHost = newValue } }
    /// The ring areas' last translation, updated in place by the accessors.
    var ringCache: UnsafeMutablePointer<TranslationCache> { m.pointer(to: \.ringCache)! }
    var usedLogGPA: UInt64 { get { m.pointee.usedLogGPA } set { m.pointee.usedLogGPA = newValue } }
    var usedLogPieces: Bool { get { m.pointee.usedLogPieces } set { m.pointee.usedLogPieces = newValue } }
    var descLogGPA: UInt64 { get { m.pointee.descLogGPA } set { m.pointee.descLogGPA = newValue } }
    var hits: UInt64 { get { m.pointee.hits } set { m.pointee.hits = newValue } }
    var misses: UInt64 { get { m.pointee.misses } set { m.pointee.misses = newValue } }
    var accessFailures: UInt64 { get { m.pointee.accessFailures } set { m.pointee.accessFailures = newValue } }
    var chains: UInt64 { get { m.pointee.chains } set { m.pointee.chains = newValue } }
    var bytes: UInt64 { get { m.pointee.bytes } set { m.pointee.bytes = newValue } }
    var notifications: UInt64 { get { m.pointee.notifications } set { m.pointee.notifications = newValue } }
    var callFD: Int32 { get { m.pointee.callFD } set { m.pointee.callFD = newValue } }
    var driverKicks: Bool { get { m.pointee.driverKicks } set { m.pointee.driverKicks = newValue } }

    /// Buffer translations, direct-mapped by address bits 21-24: buffers spread
    /// over several mappings (a DPDK mbuf pool over a few 2 MiB pages) each keep
    /// theirs instead of evicting one another's. SAFETY: allocated and
    /// initialized in init, freed in deinit; touched by the worker only.
    let bufferCaches = UnsafeMutablePointer<TranslationCache>.allocate(capacity: VirtQueue.bufferCacheSlots)
    static let bufferCacheSlots = 16

    /// The buffer translation slot for `addr`.
    @inline(__always)
    func bufferCache(_ addr: UInt64) -> UnsafeMutablePointer<TranslationCache> {
        bufferCaches + Int(truncatingIfNeeded: (addr >> 21) & UInt64(VirtQueue.bufferCacheSlots - 1))
    }

    init(index: Int) {
        self.index = index
        m = .allocate(capacity: 1)
        m.initialize(to: Mutable())
        bufferCaches.initialize(repeating: TranslationCache(), count: VirtQueue.bufferCacheSlots)
    }

    deinit {
        bufferCaches.deallocate()
        m.deinitialize(count: 1)
        m.deallocate()
    }

    /// Drops every cached translation.
    func dropTranslations() {
        ringsReady = false
        descHost = nil; availHost = nil; usedHost = nil
        ringCache.pointee.clear()
        for i in 0..<VirtQueue.bufferCacheSlots { bufferCaches[i].clear() }
    }

    /// Where the device is in the ring: the avail index (split), or the slot
    /// with the wrap counter in bit 15 (packed, as vhost-user's VRING_BASE).
    var availPosition: UInt16 { config?.packed == true ? lastAvailIdx | (availWrap ? 0x8000 : 0) : lastAvailIdx }
    var usedPosition: UInt16 { config?.packed == true ? usedIdx | (usedWrap ? 0x8000 : 0) : usedIdx }

    var snapshot: VringSnapshot {
        VringSnapshot(index: index, config: config, state: state, lastAvailIdx: availPosition, usedIdx: usedPosition,
                      pending: pending.map { ($0.seq, $0.kind, $0.iova, $0.perm) }, failure: failure,
                      waitingSince: state == .waitingIOTLB ? pending?.waitingSince : nil,
                      hits: hits, misses: misses, accessFailures: accessFailures, chains: chains, bytes: bytes,
                      notifications: notifications)
    }
}

// MARK: Ring field access, after a successful prefetch of the round.

extension VringConfig {
    /// The descriptor table, avail and used rings as addresses of `R`, the
    /// space the device reads them in (IOVAs, or user addresses without IOTLB).
    @inline(__always)
    func areas<R: Address>(_: R.Type) -> (desc: R, avail: R, used: R) { (R(descAddr), R(availAddr), R(usedAddr)) }
}

/// `offset` bytes into a ring area: `problem()` refused any ring passing 2^64-1.
@inline(__always)
func ringField<R: Address>(_ base: R, _ offset: Int) -> R { base.uncheckedAdd(UInt64(offset)) }

extension Device {
    @inline(__always)
    func ringLoad16<R: TranslatedAddress>(_ vq: VirtQueue, _ host: UnsafeMutableRawPointer?, _ base: R, _ offset: Int,
                                          acquire: Bool = false) -> UInt16 {
        if let host {
            // SAFETY: prefetch checked the whole area maps to this contiguous host range.
            let p = host + offset
            return UInt16(littleEndian: acquire ? CRingAtomics_load_acquire_u16(p) : p.loadUnaligned(as: UInt16.self))
        }
        var v: UInt16 = 0
        _ = withUnsafeMutableBytes(of: &v) {
            copyFromGuest(ringField(base, offset), $0.baseAddress!, 2, &vq.ringCache.pointee, vq)
        }
        if acquire { CRingAtomics_fence_acquire() }
        return UInt16(littleEndian: v)
    }

    @inline(__always)
    func ringStore16<R: TranslatedAddress>(_ vq: VirtQueue, _ host: UnsafeMutableRawPointer?, _ base: R, _ offset: Int,
                                           _ value: UInt16, release: Bool = false) {
        if let host {
            let p = host + offset
            if release { CRingAtomics_store_release_u16(p, value.littleEndian) } else {
                p.storeBytes(of: value.littleEndian, toByteOffset: 0, as: UInt16.self)
            }
            return
        }
        if release { CRingAtomics_fence_release() }
        var v = value.littleEndian
        _ = withUnsafeBytes(of: &v) {
            copyToGuest(ringField(base, offset), $0.baseAddress!, 2, &vq.ringCache.pointee, vq)
        }
    }

    /// Descriptor `i` of the queue's table (`i` < num).
    @inline(__always)
    func descriptor<R: TranslatedAddress>(_ vq: VirtQueue, _ i: UInt16, _: R.Type) -> Descriptor {
        if let host = vq.descHost { return Descriptor.decode(host + SplitRing.descriptor(Int(i))) }
        // The ring was checked whole this round (prepareRings); were it not to
        // translate, an empty descriptor reads as nothing rather than garbage.
        let at = ringField(R(vq.config!.descAddr), SplitRing.descriptor(Int(i)))
        return (try? readDescriptor(at, &vq.ringCache.pointee, vq, Descriptor.decode).get()) ?? Descriptor(addr: 0, len: 0)
    }

    /// Writes used element `(id, len)` at the queue's current used index (not yet published).
    @inline(__always)
    func putUsed<R: TranslatedAddress>(_ vq: VirtQueue, id: UInt16, len: UInt32, _: R.Type) {
        let slot = Int(vq.usedIdx) & (vq.config!.num - 1)
        let offset = SplitRing.usedElement(slot)
        if let host = vq.usedHost {
            (host + offset).storeBytes(of: UInt32(id).littleEndian, as: UInt32.self)
            (host + offset + 4).storeBytes(of: len.littleEndian, as: UInt32.self)
        } else {
            var elem = (UInt32(id).littleEndian, len.littleEndian)
            _ = withUnsafeBytes(of: &elem) {
                copyToGuest(ringField(R(vq.config!.usedAddr), offset), $0.baseAddress!, 8, &vq.ringCache.pointee, vq)
            }
        }
        if R.logs { logUsed(vq, offset, 8) }
        vq.usedIdx &+= 1
    }

    /// Publishes the used index (release: elements first) and, with EVENT_IDX,
    /// decides whether the driver asked to be notified.
    func publishUsed<R: TranslatedAddress>(_ vq: VirtQueue, from old: UInt16, _: R.Type) {
        guard let c = vq.config else { return }
        if R.logs { logFlush() }  // logging: the bits of what the entries hand over (the index's: next flush)
        let ring = c.areas(R.self)
        ringStore16(vq, vq.usedHost, ring.used, SplitRing.usedIdx, vq.usedIdx, release: true)
        if R.logs { logUsed(vq, SplitRing.usedIdx, 2) }
        if c.eventIdx {
            ringStore16(vq, vq.usedHost, ring.used, SplitRing.availEvent(num: c.num), vq.lastAvailIdx)
            if R.logs { logUsed(vq, SplitRing.availEvent(num: c.num), 2) }
            CRingAtomics_fence_seq_cst()
            let usedEvent = ringLoad16(vq, vq.availHost, ring.avail, SplitRing.usedEvent(num: c.num))
            // vring_need_event: notify when used_event lies in (old, new].
            if vq.usedIdx &- usedEvent &- 1 < vq.usedIdx &- old { notify(vq) }
        } else {
            let flags = ringLoad16(vq, vq.availHost, ring.avail, SplitRing.availFlags)
            if flags & 1 == 0 { notify(vq) }  // VRING_AVAIL_F_NO_INTERRUPT clear
        }
    }

    /// The driver asked to hear of used buffers: count it, and signal its call
    /// eventfd when it gave one (polling drivers suppress this, so it is rare).
    @inline(__always)
    func notify(_ vq: VirtQueue) {
        vq.notifications &+= 1
        if vq.callFD >= 0 {
            var one: UInt64 = 1
            _ = write(vq.callFD, &one, 8)
        }
    }

    /// VRING_USED_F_NO_NOTIFY while the worker polls, clear when it wants kicks.
    func writeUsedFlags(_ vq: VirtQueue) {
        switch logMode {
        case .off:
            if config.iotlb { writeUsedFlags(vq, ThroughIOTLB.Ring.self) } else { writeUsedFlags(vq, ThroughMemoryTable.Ring.self) }
        case .on:
            if config.iotlb { writeUsedFlags(vq, LoggedIOTLB.Ring.self) } else { writeUsedFlags(vq, LoggedMemoryTable.Ring.self) }
        case .waiting:
            break  // nothing is written unlogged; preparing the ring once the log comes writes them
        }
    }

    func writeUsedFlags<R: TranslatedAddress>(_ vq: VirtQueue, _: R.Type) {
        defer { if R.logs { logFlush() } }
        if let c = vq.config, c.packed {
            // The device's event suppression area: notifications wanted or not.
            ringStore16(vq, vq.usedHost, c.areas(R.self).used, PackedRing.eventFlags,
                        kicksWanted ? PackedRing.eventEnable : PackedRing.eventDisable)
            if R.logs { logUsed(vq, PackedRing.eventFlags, 2) }
            return
        }
        guard let c = vq.config else { return }
        if c.eventIdx {
            // vhost_enable_notify: avail_event at the next entry asks for a kick when one is added.
            if kicksWanted {
                ringStore16(vq, vq.usedHost, c.areas(R.self).used, SplitRing.availEvent(num: c.num), vq.lastAvailIdx)
                if R.logs { logUsed(vq, SplitRing.availEvent(num: c.num), 2) }
            }
            return
        }
        ringStore16(vq, vq.usedHost, c.areas(R.self).used, SplitRing.usedFlags, kicksWanted ? 0 : 1)
        if R.logs { logUsed(vq, SplitRing.usedFlags, 2) }
    }
}
