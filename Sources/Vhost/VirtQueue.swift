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
    /// VIRTIO_F_IN_ORDER: the driver takes buffers back in the order it made
    /// them available, so buffers the device only read may go back a run at a
    /// time, one used descriptor naming the run's last (virtio 2.8.9); packed
    /// TX rings do.
    public var inOrder: Bool
    /// VHOST_VRING_F_LOG: while dirty logging, writes to the used area are
    /// logged at this address (vhost's log_guest_addr): an IOVA with the IOTLB
    /// on (QEMU's used_phys under ACCESS_PLATFORM), else guest-physical. Nil:
    /// the used area is not logged. Changing it keeps the ring running.
    public var logAddr: UInt64?

    public init(num: Int, descAddr: UInt64, availAddr: UInt64, usedAddr: UInt64, enabled: Bool = true,
                eventIdx: Bool = false, lastAvailIdx: UInt16? = nil, packed: Bool = false, logAddr: UInt64? = nil,
                inOrder: Bool = false) {
        self.packed = packed
        self.inOrder = inOrder
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
        /// Who may touch the rest (debug builds check it; see `OwnerThread`).
        var ownerThread = OwnerThread()
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
        /// Frames to go one by one before the next four-at-a-time try, after
        /// a batch was refused for what its frames are (see FrameBatch.swift).
        var batchHoldoff = 0
        var batchBackoff = 0
        /// Frames handed back on a packed TX queue (and its loopback RX)
        /// since the drivers' event suppression was last read.
        var unnotified = 0
    }
    private let storage: UnsafeMutablePointer<Mutable>
    /// The state, for the accessors below: checks the owner thread in debug
    /// builds (see `OwnerThread`), nothing more in release ones.
    private var m: UnsafeMutablePointer<Mutable> {
        @inline(__always) get {
            storage.pointee.ownerThread.check()
            return storage
        }
    }

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
    var batchHoldoff: Int { get { m.pointee.batchHoldoff } set { m.pointee.batchHoldoff = newValue } }
    var batchBackoff: Int { get { m.pointee.batchBackoff } set { m.pointee.batchBackoff = newValue } }
    var unnotified: Int { get { m.pointee.unnotified } set { m.pointee.unnotified = newValue } }

    /// Buffer translations, direct-mapped by address bits 21-24: buffers spread
    /// over several mappings (a DPDK mbuf pool over a few 2 MiB pages) each keep
    /// theirs instead of evicting one another's. SAFETY: allocated and
    /// initialized in init, freed in deinit; touched by the worker only.
    let bufferCaches = UnsafeMutablePointer<TranslationCache>.allocate(capacity: VirtQueue.bufferCacheSlots)
    static let bufferCacheSlots = 16

    /// Packed rings: used descriptors held back to be written four at a time (a
    /// cache line of the ring), so the line the driver polls moves between the
    /// cores once per group rather than once per buffer. Empty between rounds.
    /// SAFETY: allocated in init, freed in deinit; touched by the worker only.
    let usedStage = UnsafeMutablePointer<DevicePort.UsedBuffer>.allocate(capacity: VirtQueue.usedGroup)
    static let usedGroup = 4

    /// The buffer translation slot for `addr`.
    @inline(__always)
    func bufferCache(_ addr: UInt64) -> UnsafeMutablePointer<TranslationCache> {
        bufferCaches + Int(truncatingIfNeeded: (addr >> 21) & UInt64(VirtQueue.bufferCacheSlots - 1))
    }

    init(index: Int) {
        self.index = index
        storage = .allocate(capacity: 1)
        storage.initialize(to: Mutable())
        bufferCaches.initialize(repeating: TranslationCache(), count: VirtQueue.bufferCacheSlots)
    }

    deinit {
        usedStage.deallocate()
        bufferCaches.deallocate()
        storage.deinitialize(count: 1)
        storage.deallocate()
    }

    /// Makes the calling thread the queue's owner (its device's worker).
    func adoptThread() { storage.pointee.ownerThread.adopt() }

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
