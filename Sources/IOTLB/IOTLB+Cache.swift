// The translation cache: recent look-ups' entries, found by the IOVA's 4 KiB
// page without a descent. A set-associative table (two slots a set, one cache
// line) of copies of live entries, beside the tree, which stays the truth.
//
// Exactness rests on stamps, not on finding the slots an entry went to (a
// 1 GiB entry may sit in thousands of them): every live node carries a stamp
// no other life of any node had in this epoch, a slot records the stamp of
// the node it copied, and a slot answers only while its node's stamp is still
// that one. Removing an entry, however, kills its node's stamp (`deadStamp`),
// so every slot copied from it stops answering at once, in O(1). Live nodes
// never change their range, address or permission in place (an update removes
// and inserts), so a slot whose stamp holds is the entry itself.
//
// When look-ups are spread over many more entries than the cache holds (a
// huge table read uniformly), probing and filling it only add to each
// look-up: after `cacheWindow` cache misses with fewer than a quarter of the
// look-ups answered, look-ups go to the tree alone for a while, then the
// cache gets another window.
//
// Stamps are 32 bits: when they run out, every slot is emptied and the live
// nodes are stamped afresh from 1 (a new epoch), once per ~4 billion inserts.

extension IOTLB {
    /// One cached entry: `[first, last]` maps to `uaddr` onwards.
    struct CacheSlot {
        var first: UInt64
        var last: UInt64
        var uaddr: UInt64
        /// The stamp its node had when copied; 0 in an empty slot (no node has it).
        var stamp: UInt32
        /// The node's index << 2 | the entry's permission bits.
        var nodePerm: UInt32

        static let empty = CacheSlot(first: 1, last: 0, uaddr: 0, stamp: 0, nodePerm: 0)
    }

    /// Cache misses per window judged by `stepAsideIfUseless`.
    static let cacheWindow = 1024
    /// Look-ups that go to the tree alone once the cache steps aside.
    static let bypassLength: UInt64 = 1 << 16

    /// Called at the window's last cache miss: when the cache answered
    /// fewer than a quarter of the window's look-ups, the next
    /// `bypassLength` skip it (neither probed nor filled).
    func stepAsideIfUseless() {
        let lookups = state.pointee.lookups
        let hits = (lookups &- state.pointee.windowStart) &- UInt64(IOTLB.cacheWindow)
        state.pointee.windowMisses = 0
        state.pointee.windowStart = lookups
        if state.pointee.cacheMayStepAside && hits < UInt64(IOTLB.cacheWindow / 3) {
            state.pointee.bypassUntil = lookups &+ IOTLB.bypassLength
            state.pointee.windowStart = state.pointee.bypassUntil &- 1
        }
    }

    /// Slots in one set (one 64-byte line).
    static let ways = 2
    /// A removed node's stamp: never handed out, never in a slot.
    static let deadStamp = UInt32.max

    /// Sets for a table of `maxEntries`: as many sets as entries (so two
    /// slots an entry), a power of two, from 16 up to 4096 sets (256 KiB,
    /// which stays in a core's L2: a bigger cache would make every look-up
    /// it cannot answer, uniform ones over a huge table, pay a miss to memory).
    static func cacheSets(maxEntries: Int) -> Int {
        var sets = 16
        while sets < maxEntries && sets < 4096 { sets *= 2 }
        return sets
    }

    static func allocateCache(sets: Int) -> UnsafeMutablePointer<CacheSlot> {
        let raw = UnsafeMutableRawPointer.allocate(byteCount: sets * ways * MemoryLayout<CacheSlot>.stride, alignment: 64)
        return raw.initializeMemory(as: CacheSlot.self, repeating: .empty, count: sets * ways)
    }

    /// The first slot of the set `key`'s page belongs to: the page number's
    /// low bits with the next two groups of as many bits folded in. Pages
    /// evenly spaced by any power of two (4 KiB in a row, one in 16, one per
    /// 2 MiB) then fill distinct sets, where multiplicative hashing clusters
    /// some strides (one page in 16 filled 58 % of 64 entries' sets alone).
    @inline(__always)
    func cacheSet(_ key: UInt64) -> UnsafeMutablePointer<CacheSlot> {
        let page = key &>> 12
        let bits = state.pointee.cacheBits  // at most 12: the shifts stay below 64
        let set = (page ^ page &>> bits ^ page &>> (bits &<< 1)) & state.pointee.cacheMask
        return state.pointee.cache + Int(truncatingIfNeeded: set) &* IOTLB.ways
    }

    /// Whether `slot` holds `key` and still describes a live entry.
    @inline(__always)
    func answers(_ slot: CacheSlot, _ key: UInt64) -> Bool {
        slot.first <= key && key <= slot.last && state.pointee.stamps[Int(slot.nodePerm >> 2)] == slot.stamp
    }

    /// The live node the cache holds for `key`, or -1: a probe, neither filled nor counted.
    @inline(__always)
    func cachedNode(_ key: UInt64) -> Int32 {
        let set = cacheSet(key)
        if answers(set[0], key) { return Int32(truncatingIfNeeded: set[0].nodePerm >> 2) }
        if answers(set[1], key) { return Int32(truncatingIfNeeded: set[1].nodePerm >> 2) }
        return -1
    }

    /// Copies live node `n` into the front of `set`; the older front slot moves back.
    @inline(__always)
    func fill(_ set: UnsafeMutablePointer<CacheSlot>, _ n: Int32) {
        let c = cold[node(n)]
        set[1] = set[0]
        set[0] = CacheSlot(first: hot[node(n)].first, last: c.last, uaddr: c.uaddr, stamp: state.pointee.stamps[node(n)],
                           nodePerm: UInt32(truncatingIfNeeded: n) << 2 | UInt32(c.perm))
    }

    /// Gives node `n` (just handed out) a stamp of its own.
    @inline(__always)
    func stamp(_ n: Int32) {
        if state.pointee.nextStamp == IOTLB.deadStamp { newEpoch() }
        state.pointee.stamps[node(n)] = state.pointee.nextStamp
        state.pointee.nextStamp &+= 1
    }

    /// Stamps ran out: no slot may answer any more, and the live nodes start again from 1.
    func newEpoch() {
        let all = state.pointee.cacheSets * IOTLB.ways
        for i in 0..<all { state.pointee.cache[i] = .empty }
        var next: UInt32 = 1
        var n = oldest
        while n >= 0 {
            state.pointee.stamps[node(n)] = next
            next += 1
            n = cold[node(n)].newer
        }
        state.pointee.nextStamp = next
    }

    /// Whether a slot answers for `iova` (for tests): the two ways `live` reads.
    func cacheAnswers(_ iova: IOVA) -> Bool {
        let set = cacheSet(iova.raw)
        return answers(set[0], iova.raw) || answers(set[1], iova.raw)
    }
}
