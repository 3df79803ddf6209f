// The device IOTLB: IOVA ranges -> (user address, permission).
//
// Ranges are closed, [first, last] (see Address.swift). Unlike the kernel, no
// two entries ever overlap: an update first removes every entry it overlaps,
// whole, so the newest translation always wins and a look-up is a plain
// "greatest first <= iova" search. Capacity is bounded; a full table evicts
// the oldest-inserted entry (FIFO), as the kernel's max_iotlb_entries does,
// passing over pinned entries (those holding a running queue's rings: the
// kernel keeps those translations in a per-queue cache beside its IOTLB).
//
// Storage is an AVL tree laid out in one node pool addressed by Int32 indices,
// threaded by a FIFO list (IOTLB+Tree.swift); an invalidated entry's node
// stays in the tree as a tombstone until the same range comes back or room
// is needed (IOTLB+Tombstones.swift). Look-up and update are
// O(log n); a look-up touches no reference-counted object and allocates
// nothing (not even when it rebuilds the search array, IOTLB+Search.swift).
// In front of the tree, a cache of recent look-ups' entries by 4 KiB page
// answers most look-ups with one line read, and never after the entry left
// (IOTLB+Cache.swift). The values it takes and gives are in IOTLBEntry.swift.
// What a miss means is left to the caller.

/// The device IOTLB. Not thread-safe: owned by one thread (the device's datapath worker).
public final class IOTLB {
    /// The most entries the table holds before FIFO replacement.
    public let maxEntries: Int
    /// The hard ceiling for `maxEntries` (bounds memory: ~52 bytes an entry, plus a
    /// translation cache of at most 256 KiB).
    public static let entriesCeiling = 1 << 20

    /// Entries now held.
    public var count: Int { state.pointee.count }
    /// Entries FIFO replacement passes over (see `pin`).
    public var pinnedCount: Int { state.pointee.pinnedCount }
    /// Bumped whenever an entry leaves the table: a cached translation tagged
    /// with an older generation may be stale.
    public var generation: UInt64 { state.pointee.generation }

    // Nodes are split by use: what a look-up walks (16 bytes, so a 2048-entry
    // tree's keys stay in L1) and the rest.
    struct Hot {
        var first: UInt64
        var left: Int32      // AVL children; `left` doubles as the free-list link
        var right: Int32
    }
    struct Cold {
        var last: UInt64
        var uaddr: UInt64
        var older: Int32     // FIFO neighbours
        var newer: Int32
        var parent: Int32    // in the tree (-1 at the root)
        var height: Int8
        var perm: UInt8
        var pinned: Bool
        var dead: Bool       // a tombstone (IOTLB+Tombstones.swift)
    }

    /// Everything the table mutates, in one struct behind a pointer.
    ///
    /// SAFETY: the table has one owner thread (see the class comment), so no two
    /// accesses to `state` ever overlap; keeping the state behind a pointer
    /// says so to the compiler, which would otherwise check exclusivity at run
    /// time on every access to a class's stored property (a call per field on
    /// the look-up path). Node indices handed between the functions below are
    /// always in `0..<used` (`node(_:)` checks that in debug builds).
    struct State {
        var count = 0
        var pinnedCount = 0
        var generation: UInt64 = 0
        var hot: UnsafeMutablePointer<Hot>
        var cold: UnsafeMutablePointer<Cold>
        var capacity: Int
        var used = 0           // nodes ever handed out (high-water mark)
        // A read-mostly accelerator: the keys in Eytzinger (breadth-first) order,
        // so a look-up walks one contiguous array instead of chasing nodes. It is
        // rebuilt (O(n), no allocation) only after max(n/4, 16) look-ups in a row
        // found it stale with no mutation between them, so its cost stays O(1)
        // amortized per look-up and mutations stay O(log n); tables that change
        // between every few look-ups (dynamic mappings) simply keep using the tree.
        var version: UInt64 = 0          // bumped by every mutation
        var searchVersion: UInt64 = .max  // the version the arrays describe
        var staleLookups = 0
        var searchKeys: UnsafeMutablePointer<UInt64>   // 1-based
        var searchNodes: UnsafeMutablePointer<Int32>   // 1-based
        var searchCount = 0
        var freeList: Int32 = -1
        var root: Int32 = -1
        var oldest: Int32 = -1
        var newest: Int32 = -1
        // Tombstones: invalidated nodes left in the tree, oldest first, linked
        // through `older`/`newer` (they are out of the FIFO list).
        var tombstones = 0
        var oldestTombstone: Int32 = -1
        var newestTombstone: Int32 = -1
        // The translation cache (IOTLB+Cache.swift): each node's stamp (capacity
        // long), the next stamp to hand out, the slots, `cacheSets` sets of `ways`.
        var stamps: UnsafeMutablePointer<UInt32>
        var nextStamp: UInt32 = 1
        var cache: UnsafeMutablePointer<CacheSlot>
        var cacheSets: Int
        var cacheBits: UInt64   // log2(cacheSets)
        var cacheMask: UInt64   // cacheSets - 1
        // Whether the cache pays (see `stepAsideIfUseless`): look-ups so far, the
        // count at which the current window began, cache misses in it, and
        // the count until which look-ups go to the tree alone.
        var lookups: UInt64 = 0
        var windowStart: UInt64 = 0
        var windowMisses = 0
        var bypassUntil: UInt64 = 0
        var cacheMayStepAside = true
    }
    let state: UnsafeMutablePointer<State>

    // The fields by name (computed: reads and writes go through the pointer).
    var hot: UnsafeMutablePointer<Hot> { get { state.pointee.hot } set { state.pointee.hot = newValue } }
    var cold: UnsafeMutablePointer<Cold> { get { state.pointee.cold } set { state.pointee.cold = newValue } }
    var capacity: Int { get { state.pointee.capacity } set { state.pointee.capacity = newValue } }
    var used: Int { get { state.pointee.used } set { state.pointee.used = newValue } }
    var version: UInt64 { get { state.pointee.version } set { state.pointee.version = newValue } }
    var searchVersion: UInt64 { get { state.pointee.searchVersion } set { state.pointee.searchVersion = newValue } }
    var staleLookups: Int { get { state.pointee.staleLookups } set { state.pointee.staleLookups = newValue } }
    var searchKeys: UnsafeMutablePointer<UInt64> {
        get { state.pointee.searchKeys } set { state.pointee.searchKeys = newValue }
    }
    var searchNodes: UnsafeMutablePointer<Int32> {
        get { state.pointee.searchNodes } set { state.pointee.searchNodes = newValue }
    }
    var searchCount: Int { get { state.pointee.searchCount } set { state.pointee.searchCount = newValue } }
    var freeList: Int32 { get { state.pointee.freeList } set { state.pointee.freeList = newValue } }
    var root: Int32 { get { state.pointee.root } set { state.pointee.root = newValue } }
    var oldest: Int32 { get { state.pointee.oldest } set { state.pointee.oldest = newValue } }
    var newest: Int32 { get { state.pointee.newest } set { state.pointee.newest = newValue } }

    /// A table holding at most `maxEntries` (1 ... `entriesCeiling`) entries.
    public init(maxEntries: Int) {
        precondition(maxEntries >= 1 && maxEntries <= IOTLB.entriesCeiling, "maxEntries out of range")
        IOTLB.checkNodeLayout()  // the node layout `descend` reads, checked before any node exists
        self.maxEntries = maxEntries
        let capacity = min(maxEntries, 64)
        let sets = IOTLB.cacheSets(maxEntries: maxEntries)
        let stamps = UnsafeMutablePointer<UInt32>.allocate(capacity: capacity)
        stamps.initialize(repeating: IOTLB.deadStamp, count: capacity)
        state = .allocate(capacity: 1)
        state.initialize(to: State(hot: .allocate(capacity: capacity), cold: .allocate(capacity: capacity),
                                   capacity: capacity, searchKeys: .allocate(capacity: capacity + 1),
                                   searchNodes: .allocate(capacity: capacity + 1), stamps: stamps,
                                   cache: IOTLB.allocateCache(sets: sets), cacheSets: sets,
                                   cacheBits: UInt64(sets.trailingZeroBitCount), cacheMask: UInt64(sets - 1)))
    }

    deinit {
        hot.deallocate()
        cold.deallocate()
        searchKeys.deallocate()
        searchNodes.deallocate()
        state.pointee.stamps.deallocate()
        UnsafeMutableRawPointer(state.pointee.cache).deallocate()
        state.deinitialize(count: 1)
        state.deallocate()
    }

    // MARK: Look-up

    /// Looks `iova` up for an access needing `access`: the entry holding it and
    /// the user address `iova` lands on, or why there is none. The one look-up
    /// both the datapath (which caches the entry's bounds) and `translate`
    /// (the HTTP API's) answer from.
    @inline(__always)
    public func lookup(_ iova: IOVA, access: Permissions) -> IOTLBLookup {
        let key = iova.raw
        guard let s = live(key) else { return .miss }
        let perm = Permissions(rawValue: UInt8(truncatingIfNeeded: s.nodePerm & 3))
        if !perm.contains(access) { return .denied(perm: perm) }
        return .mapped(IOTLBEntry(range: AddressRange(first: IOVA(s.first), last: IOVA(s.last)), uaddr: UserAddr(s.uaddr), perm: perm),
                       uaddr: UserAddr(s.uaddr &+ (key &- s.first)))
    }

    /// The live entry holding `key`, as a cache slot: from the cache when it
    /// has it, else from the tree, and then cached.
    @inline(__always)
    func live(_ key: UInt64) -> CacheSlot? {
        let lookups = state.pointee.lookups &+ 1
        state.pointee.lookups = lookups
        if lookups < state.pointee.bypassUntil { return liveInTree(key) }
        let set = cacheSet(key)
        if answers(set[0], key) { return set[0] }
        if answers(set[1], key) { return set[1] }
        state.pointee.windowMisses += 1
        if state.pointee.windowMisses == IOTLB.cacheWindow { stepAsideIfUseless() }
        let n = lookupFloor(key)
        // A tombstone as the floor means no live entry holds `key` (IOTLB+Tombstones.swift).
        guard n >= 0, cold[node(n)].last >= key, !cold[node(n)].dead else { return nil }
        fill(set, n)
        return set[0]
    }

    /// `live` without the cache, for when it steps aside.
    @inline(__always)
    func liveInTree(_ key: UInt64) -> CacheSlot? {
        let n = lookupFloor(key)
        guard n >= 0, cold[node(n)].last >= key, !cold[node(n)].dead else { return nil }
        let c = cold[node(n)]
        return CacheSlot(first: hot[node(n)].first, last: c.last, uaddr: c.uaddr, stamp: 0,
                         nodePerm: UInt32(truncatingIfNeeded: n) << 2 | UInt32(c.perm))
    }

    /// Translates `iova` for an access needing `access`, `size` (>= 1) bytes long.
    public func translate(_ iova: IOVA, access: Permissions, size: UInt64 = .max) -> Translation {
        switch lookup(iova, access: access) {
        case .miss: return .miss
        case .denied(let perm): return .denied(perm: perm)
        case .mapped(let e, let uaddr):
            // Bytes left in the entry, minus one; +1 cannot overflow when it is below size-1.
            let leftMinusOne = e.range.last.uncheckedOffset(from: iova)  // iova lies in the entry
            let length = (size &- 1) <= leftMinusOne ? size : leftMinusOne &+ 1
            return .mapped(uaddr: uaddr, length: length, perm: e.perm)
        }
    }

    /// The entry holding `iova`, if any.
    public func entry(containing iova: IOVA) -> IOTLBEntry? {
        guard let s = live(iova.raw) else { return nil }
        return IOTLBEntry(range: AddressRange(first: IOVA(s.first), last: IOVA(s.last)), uaddr: UserAddr(s.uaddr),
                          perm: Permissions(rawValue: UInt8(truncatingIfNeeded: s.nodePerm & 3)))
    }

    /// Calls `body` with every entry overlapping `range`, in IOVA order.
    public func forEachOverlapping(_ range: AddressRange<IOVA>, _ body: (IOTLBEntry) -> Void) {
        visit(root, range.first.raw, range.last.raw) { body(self.entry($0)) }
    }

    /// Every entry overlapping `range` (all of them when nil), in IOVA order;
    /// with `limit`, only the first `limit` of them.
    public func entries(overlapping range: AddressRange<IOVA>? = nil, limit: Int = .max) -> [IOTLBEntry] {
        var out: [IOTLBEntry] = []
        out.reserveCapacity(min(limit, range == nil ? count : 8))
        let r = range ?? AddressRange(first: IOVA(0), last: IOVA(.max))
        _ = visitUntil(root, r.first.raw, r.last.raw) { n in
            guard out.count < limit else { return false }
            out.append(entry(n))
            return true
        }
        return out
    }

    /// Entries from oldest to newest inserted (the FIFO order eviction follows).
    public func entriesByAge() -> [IOTLBEntry] {
        var out: [IOTLBEntry] = []
        out.reserveCapacity(count)
        var n = oldest
        while n >= 0 {
            out.append(entry(n))
            n = cold[node(n)].newer
        }
        return out
    }

    // MARK: Mutation

    /// Inserts `e` after removing, whole, every entry it overlaps; evicts the
    /// oldest entry first when the table is full.
    @discardableResult
    public func update(_ e: IOTLBEntry, onRemove: (IOTLBEntry, RemovalReason) -> Void = { _, _ in }) -> UpdateOutcome {
        // The common case, room and no overlap, takes one descent.
        insert(e, after: count < maxEntries ? link(e) : .overlaps, onRemove)
    }

    /// `update`, unless the very same entry (range, user address, permission)
    /// is held already: then nothing changes, not its place in the FIFO order
    /// nor its pin, and the answer is nil. A translator's read-ahead offers
    /// pages the table may hold; this tells in the one descent an insertion
    /// makes anyway, where a look-up first would make two.
    public func updateUnlessHeld(_ e: IOTLBEntry, onRemove: (IOTLBEntry, RemovalReason) -> Void = { _, _ in }) -> UpdateOutcome? {
        let first: Link
        if count < maxEntries {
            first = link(e)
        } else {
            let n = floor(e.range.first.raw)
            first = n >= 0 && !cold[node(n)].dead && entry(n) == e ? .held : .overlaps
        }
        return first == .held ? nil : insert(e, after: first, onRemove)
    }

    /// Finishes an update whose first `link` gave `first`: a linked or revived
    /// node needs only its bookkeeping; otherwise (an overlap, or the same
    /// entry, which `update` replaces) what overlaps goes, the oldest entry
    /// too when the table is full, and `e` is linked.
    private func insert(_ e: IOTLBEntry, after first: Link, _ onRemove: (IOTLBEntry, RemovalReason) -> Void) -> UpdateOutcome {
        var outcome = UpdateOutcome()
        switch first {
        case .revived:
            didRevive(e)
            return outcome
        case .linked:
            break
        case .overlaps, .held:
            outcome.replaced = removeOverlapping(e.range, reason: .replaced, onRemove)
            if count == maxEntries, oldest >= 0 {
                // A pinned entry goes to the back of the line instead, unless every entry is pinned.
                if pinnedCount < count {
                    while cold[node(oldest)].pinned { makeNewest(oldest) }
                }
                onRemove(remove(oldest), .evicted)
                outcome.evicted = 1
            }
            // Nothing overlaps `e` any more, not even a tombstone: this links it, in the same one descent.
            let relinked = link(e)
            precondition(relinked == .linked, "an entry still overlaps after removeOverlapping")
        }
        didLink(e)
        return outcome
    }

    /// The bookkeeping after a tombstone came back as `e`, the newest node:
    /// the tree's keys did not change, so the search arrays stay current.
    @inline(__always)
    private func didRevive(_ e: IOTLBEntry) {
        state.pointee.count += 1
        fill(cacheSet(e.range.first.raw), newest)
    }

    /// The bookkeeping after `e` was linked as the newest node.
    @inline(__always)
    private func didLink(_ e: IOTLBEntry) {
        state.pointee.count += 1
        mutated()
        // A new mapping is about to be used: cached now, its first look-up
        // (and an invalidation soon after) needs no descent.
        fill(cacheSet(e.range.first.raw), newest)
    }

    /// A node for `e`, newest in the FIFO list, to be linked below `parent`.
    @inline(__always)
    func newNode(_ e: IOTLBEntry, parent: Int32) -> Int32 {
        let n = allocateNode()
        stamp(n)
        hot[node(n)] = Hot(first: e.range.first.raw, left: -1, right: -1)
        cold[node(n)] = Cold(last: e.range.last.raw, uaddr: e.uaddr.raw, older: newest, newer: -1, parent: parent, height: 1,
                            perm: e.perm.rawValue, pinned: false, dead: false)
        if newest >= 0 { cold[node(newest)].newer = n } else { oldest = n }
        newest = n
        return n
    }

    /// Removes, whole, every entry overlapping `range`; returns how many.
    @discardableResult
    public func invalidate(_ range: AddressRange<IOVA>, onRemove: (IOTLBEntry, RemovalReason) -> Void = { _, _ in }) -> Int {
        removeOverlapping(range, reason: .invalidated, onRemove)
    }

    /// Removes every entry; returns how many.
    @discardableResult
    public func flush(onRemove: (IOTLBEntry, RemovalReason) -> Void = { _, _ in }) -> Int {
        let removed = count
        var n = oldest
        while n >= 0 {
            onRemove(entry(n), .flushed)
            state.pointee.stamps[node(n)] = IOTLB.deadStamp  // its cached copies stop answering
            n = cold[node(n)].newer
        }
        root = -1; oldest = -1; newest = -1; freeList = -1; used = 0
        state.pointee.tombstones = 0; state.pointee.oldestTombstone = -1; state.pointee.newestTombstone = -1
        state.pointee.count = 0
        state.pointee.pinnedCount = 0
        if removed > 0 { state.pointee.generation &+= 1 }
        mutated()
        return removed
    }

    /// Pins every entry overlapping `range`: FIFO replacement passes over it
    /// while unpinned entries remain. Invalidation, flush and overlapping
    /// updates remove pinned entries as any other.
    public func pin(_ range: AddressRange<IOVA>) {
        visit(root, range.first.raw, range.last.raw) { n in
            if !cold[node(n)].pinned { cold[node(n)].pinned = true; state.pointee.pinnedCount += 1 }
        }
    }

    /// Unpins every entry.
    public func unpinAll() {
        var n = oldest
        while n >= 0 {
            cold[node(n)].pinned = false
            n = cold[node(n)].newer
        }
        state.pointee.pinnedCount = 0
    }
}
