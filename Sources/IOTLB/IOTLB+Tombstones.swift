// Tombstones: an invalidated entry's node stays in the tree, dead, instead of
// leaving it. Dynamic mappings unmap and map the same IOVA ranges again and
// again (a driver's buffers, an IOVA allocator's recycled ranges), and each
// removal and insertion rebalanced the tree. Now the same range mapped again
// brings its node back in place: no rebalancing, and the search arrays stay
// current (the keys did not change).
//
// For look-ups a tombstone is absent: its stamp is dead, so no cached copy
// answers, and a descent that ends on one answers a miss. That is exact
// because no live entry overlaps a tombstone: an update over one removes it
// first, as it does an entry. Tombstones are out of the FIFO list and the
// count; at most max(count, `minTombstones`) are kept, the oldest leaving the
// tree first, and they give way when the node pool is full.

extension IOTLB {
    /// Tombstones kept however few entries are live.
    static let minTombstones = 64

    /// Tombstones in the tree now (for tests and figures).
    public var tombstones: Int { state.pointee.tombstones }

    /// Takes live node `n` out of the table but leaves it in the tree; returns its entry.
    func bury(_ n: Int32) -> IOTLBEntry {
        if state.pointee.tombstones >= max(count - 1, IOTLB.minTombstones) && state.pointee.oldestTombstone >= 0 {
            purge(state.pointee.oldestTombstone)  // moves links only: `n` stays where it is
        }
        let removed = entry(n)
        let c = cold[node(n)]
        if c.older >= 0 { cold[node(c.older)].newer = c.newer } else { oldest = c.newer }
        if c.newer >= 0 { cold[node(c.newer)].older = c.older } else { newest = c.older }
        if c.pinned { state.pointee.pinnedCount -= 1 }
        state.pointee.stamps[node(n)] = IOTLB.deadStamp  // its cached copies stop answering
        state.pointee.count -= 1
        state.pointee.generation &+= 1
        cold[node(n)].dead = true
        cold[node(n)].pinned = false
        let last = state.pointee.newestTombstone
        cold[node(n)].older = last
        cold[node(n)].newer = -1
        if last >= 0 { cold[node(last)].newer = n } else { state.pointee.oldestTombstone = n }
        state.pointee.newestTombstone = n
        state.pointee.tombstones += 1
        return removed
    }

    /// Brings tombstone `n` back as `e` (the same range), the newest entry.
    func revive(_ n: Int32, _ e: IOTLBEntry) {
        unlistTombstone(n)
        cold[node(n)].dead = false
        cold[node(n)].uaddr = e.uaddr.raw
        cold[node(n)].perm = e.perm.rawValue
        stamp(n)  // a stamp no earlier life of the node had: old cached copies stay dead
        cold[node(n)].older = newest
        cold[node(n)].newer = -1
        if newest >= 0 { cold[node(newest)].newer = n } else { oldest = n }
        newest = n
    }

    /// Takes tombstone `n` out of the tree and frees its node.
    func purge(_ n: Int32) {
        unlistTombstone(n)
        unlink(n)
        hot[node(n)].left = freeList
        freeList = n
        mutated()
    }

    private func unlistTombstone(_ n: Int32) {
        let c = cold[node(n)]
        if c.older >= 0 { cold[node(c.older)].newer = c.newer } else { state.pointee.oldestTombstone = c.newer }
        if c.newer >= 0 { cold[node(c.newer)].older = c.older } else { state.pointee.newestTombstone = c.older }
        state.pointee.tombstones -= 1
    }
}
