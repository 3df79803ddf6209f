// The IOTLB's storage: a pool of nodes addressed by Int32 indices, an AVL
// tree over their first IOVAs (entries never overlap, so the tree orders them
// wholly) and a FIFO list threading them by insertion. The invariant every
// function here keeps: a node index handed around is in 0..<used (checked by
// `node(_:)` in debug builds) and names a live node or the free list's head.
// What an entry means is IOTLB.swift's business; this file only keeps nodes.

extension IOTLB {

    /// A node index as a pool offset: the one place indices meet raw memory,
    /// checked in debug builds (the invariant stated on `State`).
    @inline(__always)
    func node(_ n: Int32) -> Int {
        assert(n >= 0 && Int(n) < used, "node \(n) outside the pool's \(used) nodes")
        return Int(n)
    }

    /// Moves node `n` to the newest end of the FIFO list.
    func makeNewest(_ n: Int32) {
        guard n != newest else { return }
        let c = cold[node(n)]
        if c.older >= 0 { cold[node(c.older)].newer = c.newer } else { oldest = c.newer }
        cold[node(c.newer)].older = c.older
        cold[node(n)].older = newest
        cold[node(n)].newer = -1
        cold[node(newest)].newer = n
        newest = n
    }

    func entry(_ n: Int32) -> IOTLBEntry {
        let c = cold[node(n)]
        return IOTLBEntry(range: AddressRange(first: IOVA(hot[node(n)].first), last: IOVA(c.last)),
                          uaddr: UserAddr(c.uaddr), perm: Permissions(rawValue: c.perm))
    }

    func removeOverlapping(_ range: AddressRange<IOVA>, reason: RemovalReason,
                                   _ onRemove: (IOTLBEntry, RemovalReason) -> Void) -> Int {
        // Entries never overlap, so the overlapping ones form a run in key order:
        // take the lowest one each time (the entry holding `first`, else the
        // first entry starting after it) until the run ends. No walk state to
        // keep across removals.
        var removed = 0
        let lo = range.first.raw, hi = range.last.raw
        while true {
            var n = floor(lo)
            if n < 0 || cold[node(n)].last < lo { n = ceiling(lo) }
            guard n >= 0, hot[node(n)].first <= hi else { return removed }
            if let e = removeNode(key: hot[node(n)].first) { onRemove(e, reason) }
            removed += 1
        }
    }

    /// The node with the least first >= key, or -1.
    @inline(__always)
    func ceiling(_ key: UInt64) -> Int32 {
        var n = root
        var best: Int32 = -1
        while n >= 0 {
            let h = hot[node(n)]
            let left = h.first >= key
            best = left ? n : best
            n = left ? h.left : h.right
        }
        return best
    }

    /// In-order walk of the nodes overlapping [lo, hi]. Entries never overlap,
    /// so a node ending below `lo` has nothing useful on its left, and a node
    /// starting above `hi` nothing on its right.
    func visit(_ n: Int32, _ lo: UInt64, _ hi: UInt64, _ body: (Int32) -> Void) {
        if n < 0 { return }
        let h = hot[node(n)]
        if h.first > hi { visit(h.left, lo, hi, body); return }
        if cold[node(n)].last < lo { visit(h.right, lo, hi, body); return }
        visit(h.left, lo, hi, body)
        body(n)
        visit(h.right, lo, hi, body)
    }

    /// `visit` that stops as soon as `body` returns false; returns whether it went on to the end.
    func visitUntil(_ n: Int32, _ lo: UInt64, _ hi: UInt64, _ body: (Int32) -> Bool) -> Bool {
        if n < 0 { return true }
        let h = hot[node(n)]
        if h.first > hi { return visitUntil(h.left, lo, hi, body) }
        if cold[node(n)].last < lo { return visitUntil(h.right, lo, hi, body) }
        return visitUntil(h.left, lo, hi, body) && body(n) && visitUntil(h.right, lo, hi, body)
    }

    func allocateNode() -> Int32 {
        if freeList >= 0 {
            let n = freeList
            freeList = hot[node(n)].left
            return n
        }
        if used == capacity {
            let bigger = min(capacity * 2, maxEntries)
            let freshHot = UnsafeMutablePointer<Hot>.allocate(capacity: bigger)
            freshHot.moveInitialize(from: hot, count: used)
            hot.deallocate()
            hot = freshHot
            let freshCold = UnsafeMutablePointer<Cold>.allocate(capacity: bigger)
            freshCold.moveInitialize(from: cold, count: used)
            cold.deallocate()
            cold = freshCold
            searchKeys.deallocate()
            searchNodes.deallocate()
            searchKeys = .allocate(capacity: bigger + 1)
            searchNodes = .allocate(capacity: bigger + 1)
            searchVersion = .max
            capacity = bigger
        }
        used += 1
        return Int32(used - 1)
    }

    /// Unlinks the node whose range starts at `key` from tree and FIFO list.
    @discardableResult
    func removeNode(key: UInt64) -> IOTLBEntry? {
        var found: Int32 = -1
        root = remove(root, key, &found)
        guard found >= 0 else { return nil }
        let removed = entry(found)
        let c = cold[node(found)]
        if c.older >= 0 { cold[node(c.older)].newer = c.newer } else { oldest = c.newer }
        if c.newer >= 0 { cold[node(c.newer)].older = c.older } else { newest = c.older }
        if c.pinned { state.pointee.pinnedCount -= 1 }
        hot[node(found)].left = freeList
        freeList = found
        state.pointee.count -= 1
        state.pointee.generation &+= 1
        version &+= 1
        return removed
    }

    @inline(__always)
    func height(_ n: Int32) -> Int8 { n < 0 ? 0 : cold[node(n)].height }

    @inline(__always)
    func refresh(_ n: Int32) {
        cold[node(n)].height = max(height(hot[node(n)].left), height(hot[node(n)].right)) + 1
    }

    func rotateRight(_ n: Int32) -> Int32 {
        let l = hot[node(n)].left
        hot[node(n)].left = hot[node(l)].right
        hot[node(l)].right = n
        refresh(n); refresh(l)
        return l
    }

    func rotateLeft(_ n: Int32) -> Int32 {
        let r = hot[node(n)].right
        hot[node(n)].right = hot[node(r)].left
        hot[node(r)].left = n
        refresh(n); refresh(r)
        return r
    }

    func rebalance(_ n: Int32) -> Int32 {
        refresh(n)
        let l = hot[node(n)].left, r = hot[node(n)].right
        let balance = Int(height(l)) - Int(height(r))
        if balance > 1 {
            if height(hot[node(l)].left) < height(hot[node(l)].right) {
                hot[node(n)].left = rotateLeft(l)
            }
            return rotateRight(n)
        }
        if balance < -1 {
            if height(hot[node(r)].right) < height(hot[node(r)].left) {
                hot[node(n)].right = rotateRight(r)
            }
            return rotateLeft(n)
        }
        return n
    }

    func insert(_ t: Int32, _ n: Int32) -> Int32 {
        if t < 0 { return n }
        if hot[node(n)].first < hot[node(t)].first {
            hot[node(t)].left = insert(hot[node(t)].left, n)
        } else {
            hot[node(t)].right = insert(hot[node(t)].right, n)
        }
        return rebalance(t)
    }

    func remove(_ t: Int32, _ key: UInt64, _ found: inout Int32) -> Int32 {
        if t < 0 { return -1 }
        let k = hot[node(t)].first
        if key < k {
            hot[node(t)].left = remove(hot[node(t)].left, key, &found)
        } else if key > k {
            hot[node(t)].right = remove(hot[node(t)].right, key, &found)
        } else {
            found = t
            let l = hot[node(t)].left, r = hot[node(t)].right
            if l < 0 { return r }
            if r < 0 { return l }
            var successor: Int32 = -1
            let newRight = removeMin(r, &successor)
            hot[node(successor)].left = l
            hot[node(successor)].right = newRight
            return rebalance(successor)
        }
        return rebalance(t)
    }

    func removeMin(_ t: Int32, _ minNode: inout Int32) -> Int32 {
        let l = hot[node(t)].left
        if l < 0 {
            minNode = t
            return hot[node(t)].right
        }
        hot[node(t)].left = removeMin(l, &minNode)
        return rebalance(t)
    }
}
