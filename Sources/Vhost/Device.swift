// A vhost device: memory table, IOTLB, counters. Owned by one datapath
// worker; every method runs on that worker's thread (README, "Threads";
// checked in debug builds, see OwnerThread.swift).
import IOTLB
import CRingAtomics
import Platform
import Ports

/// What an IOTLB update did.
public struct UpdateReport: Equatable, Sendable {
    /// Entries inserted.
    public var applied = 0
    /// Entries removed by FIFO replacement.
    public var evicted = 0
    /// Entries removed because a new range overlapped them.
    public var replaced = 0
    /// Entries held afterwards.
    public var entries = 0
    /// Pending misses this update resolved.
    public var resolvedMisses = 0
}

/// IOTLB counters, as published to readers.
public struct IOTLBStats: Equatable, Sendable {
    public var entries = 0
    public var maxEntries = 0
    public var hits: UInt64 = 0
    public var misses: UInt64 = 0
    public var updates: UInt64 = 0
    public var invalidations: UInt64 = 0
    public var evictions: UInt64 = 0
    public var accessFailures: UInt64 = 0
    public var pendingMisses = 0
    /// Misses announced again with a fresh seq: an update that named the IOVA
    /// lost the answer (evicted or replaced in the batch, too little permission).
    public var reannouncedMisses: UInt64 = 0
}

/// An in-process vIOMMU (the built-in guest's, or vhost-user's identity
/// translator) that answers misses on the worker: given the missed IOVA, the
/// access and how many entries may be installed without evicting pinned ones,
/// the entries to install (the one mapping the IOVA last, so FIFO replacement
/// takes it last), or none. A class holding the function, so the worker calls
/// it through an unretained reference (no reference counting per miss).
public final class MissResolver: Sendable {
    /// Fills the buffer with the entries to install for a miss at the IOVA
    /// (with the access), at most the budget given and the buffer's room, the
    /// one mapping the IOVA last; returns how many (0: it cannot answer). Runs
    /// on the worker: no allocation, no lock held long.
    public typealias Resolve = @Sendable (IOVA, Permissions, Int, UnsafeMutableBufferPointer<IOTLBEntry>) -> Int
    let resolve: Resolve
    public init(_ resolve: @escaping Resolve) { self.resolve = resolve }
}

/// One device's state. Not thread-safe by design: only its worker touches it.
public final class Device {
    /// Creation parameters.
    public let config: DeviceConfig
    /// The device IOTLB (present even when `config.iotlb` is off, then unused).
    public let iotlb: IOTLB
    /// Guest memory and its table, once set.
    public private(set) var memory: GuestMemory?
    /// The queues without reference counting, for the datapath.
    /// SAFETY: `queues` owns them for the device's whole life, so the
    /// datapath may borrow them (`_withUnsafeGuaranteedRef`) without a count.
    let queueRefs: UnsafeMutablePointer<Unmanaged<VirtQueue>>
    /// The virtqueues: even index RX, odd TX.
    public let queues: [VirtQueue]
    /// Where misses and access failures are published.
    public let missLog: MissLog
    /// Where frames go and come from (loopback, sink, TAP, peer).
    let port: DevicePort
    let limits: EngineLimits
    static let resolutionWindow = 4096

    /// What the datapath mutates, in one struct behind a pointer.
    ///
    /// SAFETY: a device has one owner thread (its worker), so no two accesses
    /// to these fields ever overlap. Behind a pointer the compiler does not
    /// check exclusivity at run time on each access, as it would for a
    /// class's stored properties (a runtime call per field per descriptor).
    /// The fields keep their names as properties below; the memory lives as
    /// long as the device.
    struct Mutable {
        /// Who may touch the rest (debug builds check it; see `OwnerThread`).
        var ownerThread = OwnerThread()
        /// Bumped whenever the memory table is replaced (cached translations die with it).
        var memoryGeneration: UInt64 = 0
        /// The memory table flattened for the datapath.
        var regions = RegionIndex()
        var counters = IOTLBStats()
        /// Frames cut short because the RX chain was smaller than the TX frame.
        var truncatedFrames: UInt64 = 0
        /// Frames the loopback moved four at a time (FrameBatch.swift).
        var batchedFrames: UInt64 = 0
        /// The worker that owns the device. Unmanaged: read on the datapath,
        /// where a reference count would cost per batch. SAFETY: a worker
        /// outlives every device it owns (the engine stops devices first).
        var owner: Unmanaged<DatapathWorker>?
        /// Answers misses on the worker when set (see `MissResolver`); unretained:
        /// `resolverOwner` holds it. SAFETY: both change together, on the worker.
        var missResolver: Unmanaged<MissResolver>?
        /// Where a resolver writes its answer: room for `Device.resolveRoom` entries.
        var resolveBuffer: UnsafeMutableBufferPointer<IOTLBEntry> = .init(start: nil, count: 0)
        /// Invalidations a built-in guest posts without a command (see `InvalidationMailbox`).
        var mailbox: Unmanaged<InvalidationMailbox>?
        /// Whether drivers should kick (the worker is about to sleep).
        var kicksWanted = false
        /// Whether RX chains start with a 12-byte virtio-net header whose
        /// num_buffers the device sets (a vhost-user net front-end with
        /// VIRTIO_F_VERSION_1 or MRG_RXBUF). The loopback copies the TX header.
        var rxNetHeaderNumBuffers = false
        /// Miss resolution times (µs): the most recent samples, their count and maximum.
        var resolutionSamples: [UInt32] = []
        var resolutionCount: UInt64 = 0
        var resolutionMax: UInt32 = 0
        /// Cumulative-free bucket counts of resolution times (µs) for the Prometheus histogram.
        var resolutionBuckets = [UInt64](repeating: 0, count: Device.resolutionBounds.count + 1)
        var resolutionSumMicros: UInt64 = 0
    }
    private let storage: UnsafeMutablePointer<Mutable>
    /// The state, for the accessors below: checks the owner thread in debug
    /// builds (see `OwnerThread`), nothing more in release ones.
    var m: UnsafeMutablePointer<Mutable> {
        @inline(__always) get {
            storage.pointee.ownerThread.check()
            return storage
        }
    }
    /// Dirty logging (Datapath+Log.swift); behind its own pointer, as `m`.
    let logState: UnsafeMutablePointer<DirtyLogState>

    var memoryGeneration: UInt64 { get { m.pointee.memoryGeneration } set { m.pointee.memoryGeneration = newValue } }
    var regions: RegionIndex { get { m.pointee.regions } set { m.pointee.regions = newValue } }
    var counters: IOTLBStats { get { m.pointee.counters } set { m.pointee.counters = newValue } }
    var truncatedFrames: UInt64 { get { m.pointee.truncatedFrames } set { m.pointee.truncatedFrames = newValue } }
    var batchedFrames: UInt64 { get { m.pointee.batchedFrames } set { m.pointee.batchedFrames = newValue } }
    var owner: Unmanaged<DatapathWorker>? { get { m.pointee.owner } set { m.pointee.owner = newValue } }
    /// The in-process vIOMMU answering misses on the worker, if any.
    public var missResolver: MissResolver? {
        get { resolverOwner }
        set {
            resolverOwner = newValue
            m.pointee.missResolver = newValue.map { .passUnretained($0) }
        }
    }
    private var resolverOwner: MissResolver?
    /// The built-in guest's invalidation mailbox, if any: polled every round.
    public var invalidationMailbox: InvalidationMailbox? {
        get { mailboxOwner }
        set {
            mailboxOwner = newValue
            m.pointee.mailbox = newValue.map { .passUnretained($0) }
        }
    }
    private var mailboxOwner: InvalidationMailbox?
    /// Entries one miss answer may carry (a resolver's read-ahead and the missed page).
    static let resolveRoom = 1025
    var kicksWanted: Bool { get { m.pointee.kicksWanted } set { m.pointee.kicksWanted = newValue } }
    var rxNetHeaderNumBuffers: Bool {
        get { m.pointee.rxNetHeaderNumBuffers } set { m.pointee.rxNetHeaderNumBuffers = newValue }
    }
    // Arrays in place (a get/set pair would copy them on every change).
    var resolutionSamples: [UInt32] {
        unsafeAddress { UnsafePointer(m.pointer(to: \.resolutionSamples)!) }
        unsafeMutableAddress { m.pointer(to: \.resolutionSamples)! }
    }
    var resolutionBuckets: [UInt64] {
        unsafeAddress { UnsafePointer(m.pointer(to: \.resolutionBuckets)!) }
        unsafeMutableAddress { m.pointer(to: \.resolutionBuckets)! }
    }
    var resolutionCount: UInt64 { get { m.pointee.resolutionCount } set { m.pointee.resolutionCount = newValue } }
    var resolutionMax: UInt32 { get { m.pointee.resolutionMax } set { m.pointee.resolutionMax = newValue } }
    var resolutionSumMicros: UInt64 { get { m.pointee.resolutionSumMicros } set { m.pointee.resolutionSumMicros = newValue } }
    /// Upper bounds (µs) of the resolution histogram's buckets.
    public static let resolutionBounds: [UInt32] = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000, 250_000, 1_000_000]

    init(config: DeviceConfig, limits: EngineLimits, missLog: MissLog, tap: TapInterface? = nil) {
        self.config = config
        self.port = DevicePort(config: config.port, pairs: config.queuePairs, tap: tap)
        self.limits = limits
        self.missLog = missLog
        self.iotlb = IOTLB(maxEntries: config.iotlbMaxEntries)
        storage = .allocate(capacity: 1)
        storage.initialize(to: Mutable())
        storage.pointee.resolutionSamples.reserveCapacity(Device.resolutionWindow)
        storage.pointee.resolveBuffer = .allocate(capacity: Device.resolveRoom)
        logState = .allocate(capacity: 1)
        logState.initialize(to: DirtyLogState(skipBuffers: limits.unloggedRXBuffersForTests,
                                              cache: .allocate(capacity: DirtyLogState.cacheSize)))
        self.queues = (0..<config.queues).map { VirtQueue(index: $0) }
        queueRefs = .allocate(capacity: queues.count)
        for (i, q) in queues.enumerated() { (queueRefs + i).initialize(to: .passUnretained(q)) }
    }

    deinit {
        queueRefs.deallocate()
        storage.pointee.regions.free()
        storage.pointee.resolveBuffer.deallocate()
        storage.deinitialize(count: 1)
        storage.deallocate()
        logState.pointee.cache.deallocate()
        logState.deinitialize(count: 1)
        logState.deallocate()
    }

    /// Makes the calling thread (the worker that places the device) the only
    /// one that may touch the device's and its queues' state from now on:
    /// checked in debug builds (`OwnerThread`).
    func adoptThread() {
        storage.pointee.ownerThread.adopt()
        for q in queues { q.adoptThread() }
    }

    /// The memory table, once set.
    public var memTable: MemoryTable? { memory?.table }

    /// Replaces the memory table: maps new backing memory, then flushes the IOTLB.
    public func setMemTable(_ regions: [MemoryRegion]) throws(EngineError) -> MemoryTable {
        let table: MemoryTable
        do {
            table = try MemoryTable(regions: regions, maxRegions: limits.maxMemRegions,
                                    maxTotalBytes: limits.maxGuestMemory)
        } catch { throw .invalidMemTable(error) }
        let mem: GuestMemory
        do { mem = try GuestMemory(table: table, hugePages: limits.hugePages, previous: memory) } catch {
            throw .memoryUnavailable(error.description)
        }
        install(memory: mem)
        return table
    }

    /// Replaces the memory with one mapped elsewhere (a vhost-user front-end's
    /// files), or removes it (nil: the front-end left). Flushes the IOTLB: its
    /// user addresses belonged to the old table.
    public func install(memory mem: GuestMemory?) {
        memory = mem
        lostPagesSeen = 0
        if mem == nil { missResolver = nil }  // it answered from the memory that left
        regions.free()
        regions = mem.map { RegionIndex($0) } ?? RegionIndex()
        memoryGeneration &+= 1
        iotlb.flush()
        for vq in queues { vq.dropTranslations() }
    }

    private func requireIOTLB() throws(EngineError) {
        guard config.iotlb else { throw .conflict("device \(config.id) was created with \"iotlb\": false") }
    }

    /// Applies `entries` in order, all or nothing: no user range may wrap (the
    /// one place this is checked, for every caller, and first: a malformed
    /// entry is refused as such whatever the device), and every one must be
    /// wholly backed by the memory table before any is inserted.
    public func updateIOTLB(_ entries: [IOTLBEntry]) throws(EngineError) -> UpdateReport {
        try updateIOTLB(entries[...])
    }

    /// The same for any collection of entries (the worker's own answers: a
    /// buffer, nothing allocated); `unlessHeld`: an entry the IOTLB holds
    /// already, the very same, stays as it is (a read-ahead answer's).
    func updateIOTLB<C: Collection<IOTLBEntry>>(_ entries: C, unlessHeld: Bool = false) throws(EngineError) -> UpdateReport {
        for (i, e) in entries.enumerated() where e.uaddrRange == nil { throw .uaddrRangeOverflow(index: i) }
        try requireIOTLB()
        guard let table = memTable else { throw .noMemTable }
        for (i, e) in entries.enumerated() where !table.isBacked(e.uaddrRange!) { throw .uaddrNotMapped(index: i) }
        var report = UpdateReport()
        for e in entries {
            guard let out = unlessHeld ? iotlb.updateUnlessHeld(e) : iotlb.update(e) else { continue }
            report.applied += 1
            report.evicted += out.evicted
            report.replaced += out.replaced
        }
        counters.updates += UInt64(report.applied)
        counters.evictions += UInt64(report.evicted)
        report.entries = iotlb.count
        // A queue still waiting although this batch named its IOVA lost its answer
        // (evicted or replaced within the batch, or too little permission). Any
        // other waiting queue's answer has not come yet: an earlier batch's would
        // have resumed it. Announcing that one again would only send the front-end
        // a duplicate, which it may walk after the guest unmapped the buffer.
        report.resolvedMisses = resolveMisses { iova in entries.contains { $0.range.contains(iova) } }
        return report
    }

    /// Removes every entry overlapping any of `ranges`; returns how many.
    public func invalidateIOTLB(_ ranges: [AddressRange<IOVA>]) throws(EngineError) -> Int {
        try invalidateIOTLB(ranges[...])
    }

    /// The same for any collection of ranges (a mailbox's: nothing allocated).
    func invalidateIOTLB<C: Collection<AddressRange<IOVA>>>(_ ranges: C) throws(EngineError) -> Int {
        try requireIOTLB()
        var removed = 0
        for r in ranges { removed += iotlb.invalidate(r) }
        counters.invalidations += UInt64(ranges.count)
        return removed
    }

    /// Removes every entry; returns how many.
    public func flushIOTLB() throws(EngineError) -> Int {
        try requireIOTLB()
        counters.invalidations += 1
        return iotlb.flush()
    }

    /// A pure look-up: posts no miss, counts nothing.
    public func translate(_ iova: IOVA, access: Permissions, size: UInt64) throws(EngineError) -> Translation {
        try requireIOTLB()
        return iotlb.translate(iova, access: access, size: size)
    }

    /// Entries overlapping `range` (all when nil), sorted by IOVA; only those
    /// starting past `after` when given (a cursor); with `limit`, at most that
    /// many and whether more follow them.
    public func entries(overlapping range: AddressRange<IOVA>?, after: IOVA? = nil, limit: Int = .max)
        throws(EngineError) -> (entries: [IOTLBEntry], more: Bool) {
        try requireIOTLB()
        var list = iotlb.entries(overlapping: range, limit: limit >= Int.max - 2 ? .max : limit + 2)
        // The range may begin inside the entry the cursor names: that one was returned already.
        if let after, let first = list.first, first.range.first <= after { list.removeFirst() }
        let more = list.count > limit
        if more { list.removeLast(list.count - limit) }
        return (list, more)
    }

    /// A snapshot of the counters.
    public func stats() -> IOTLBStats {
        var s = counters
        s.entries = iotlb.count
        s.maxEntries = iotlb.maxEntries
        s.pendingMisses = queues.reduce(0) { $0 + ($1.pending?.kind == .miss ? 1 : 0) }
        return s
    }

    /// Lost pages of the current memory already acted on.
    var lostPagesSeen: UInt64 = 0

    /// Fails every queue once the memory lost pages (a front-end shrank its
    /// file; the SIGBUS guard put zeros there): nothing in it can be trusted.
    func checkLostMemory() {
        guard let lost = memory?.lostPages, lost > lostPagesSeen else { return }
        lostPagesSeen = lost
        for vq in queues where vq.state != .disabled {
            fail(vq, "guest memory lost: the front-end shrank the file behind it (\(lost) pages)")
        }
    }

    /// Called when the device leaves its worker (deletion, shutdown).
    func detach() {
        for vq in queues {
            vq.state = .disabled
            vq.dropTranslations()
        }
        missLog.close()
    }
}
