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
        // keep across removals. An entry reaching `hi` ends the run: the common
        // invalidation (one page, one entry) costs one search and one removal.
        var removed = 0
        let lo = range.first.raw, hi = range.last.raw
        while true {
            let (below, above) = neighbours(lo)
            let n = below >= 0 && cold[node(below)].last >= lo ? below : above
            guard n >= 0, hot[node(n)].first <= hi else { return removed }
            let end = cold[node(n)].last
            if let e = removeNode(key: hot[node(n)].first) { onRemove(e, reason) }
            removed += 1
            if end >= hi { return removed }
        }
    }

    /// In one descent: the node with the greatest first <= key, and the one
    /// with the least first > key (-1 for none).
    @inline(__always)
    func neighbours(_ key: UInt64) -> (atOrBelow: Int32, above: Int32) {
        var n = root
        var below: Int32 = -1, above: Int32 = -1
        while n >= 0 {
            let h = hot[node(n)]
            let right = h.first <= key
            below = right ? n : below
            above = right ? above : n
            n = right ? h.right : h.left
        }
        return (below, above)
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
            let freshStamps = UnsafeMutablePointer<UInt32>.allocate(capacity: bigger)
            freshStamps.moveInitialize(from: state.pointee.stamps, count: used)
            (freshStamps + used).initialize(repeating: IOTLB.deadStamp, count: bigger - used)
            state.pointee.stamps.deallocate()
            state.pointee.stamps = freshStamps
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
        let found = unlink(key)
        guard found >= 0 else { return nil }
        let removed = entry(found)
        let c = cold[node(found)]
        if c.older >= 0 { cold[node(c.older)].newer = c.newer } else { oldest = c.newer }
        if c.newer >= 0 { cold[node(c.newer)].older = c.older } else { newest = c.older }
        if c.pinned { state.pointee.pinnedCount -= 1 }
        state.pointee.stamps[node(found)] = IOTLB.deadStamp  // its cached copies stop answering
        hot[node(found)].left = freeList
        freeList = found
        state.pointee.count -= 1
        state.pointee.generation &+= 1
        mutated()
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

    /// The deepest an AVL tree of `entriesCeiling` nodes gets is ~1.44 log2(n) < 32.
    static let maxDepth = 64

    /// Sets the link from `parent` (the root when -1) that named `old` to `new`.
    @inline(__always)
    func relink(_ parent: Int32, _ old: Int32, _ new: Int32) {
        if parent < 0 { root = new } else if hot[node(parent)].left == old { hot[node(parent)].left = new } else { hot[node(parent)].right = new }
    }

    /// Walks `path` (root first, `depth` long) back up, rebalancing, until a
    /// subtree's height is what it was: above it nothing changed. Insertions
    /// and removals both touch O(1) nodes on average this way, where a
    /// recursive version rebalances every level.
    func retrace(_ path: UnsafeMutableBufferPointer<Int32>, _ depth: Int) {
        var i = depth - 1
        while i >= 0 {
            let t = path[i]
            let before = cold[node(t)].height
            let top = rebalance(t)
            if top != t { relink(i > 0 ? path[i - 1] : -1, t, top) }
            if cold[node(top)].height == before { return }
            i -= 1
        }
    }

    /// Links the node `make` returns for [lo, hi] when no entry overlaps that
    /// range, in one descent: the search for overlaps is the walk to the
    /// insertion point. Returns false, having changed nothing, otherwise.
    func linkIfFree(_ lo: UInt64, _ hi: UInt64, _ make: () -> Int32) -> Bool {
        withUnsafeTemporaryAllocation(of: Int32.self, capacity: IOTLB.maxDepth) { path -> Bool in
            var depth = 0
            var t = root
            var below: Int32 = -1, above: Int32 = -1
            while t >= 0 {
                path[depth] = t
                depth += 1
                let h = hot[node(t)]
                let right = h.first <= lo
                below = right ? t : below
                above = right ? above : t
                t = right ? h.right : h.left
            }
            if below >= 0 && cold[node(below)].last >= lo { return false }
            if above >= 0 && hot[node(above)].first <= hi { return false }
            let n = make()
            guard depth > 0 else { root = n; return true }
            let parent = path[depth - 1]
            if lo < hot[node(parent)].first { hot[node(parent)].left = n } else { hot[node(parent)].right = n }
            retrace(path, depth)
            return true
        }
    }

    /// Unlinks the node whose range starts at `key` from the tree; returns it, or -1.
    func unlink(_ key: UInt64) -> Int32 {
        withUnsafeTemporaryAllocation(of: Int32.self, capacity: IOTLB.maxDepth) { path -> Int32 in
            var depth = 0
            var t = root
            while t >= 0 && hot[node(t)].first != key {
                path[depth] = t
                depth += 1
                t = key < hot[node(t)].first ? hot[node(t)].left : hot[node(t)].right
            }
            guard t >= 0 else { return -1 }
            let parent: Int32 = depth > 0 ? path[depth - 1] : -1
            let l = hot[node(t)].left, r = hot[node(t)].right
            if l < 0 || r < 0 {
                relink(parent, t, l < 0 ? r : l)
            } else {
                // Two children: the successor (leftmost of the right subtree) takes t's place.
                let slot = depth
                path[depth] = t  // replaced by the successor below
                depth += 1
                var s = r
                while hot[node(s)].left >= 0 {
                    path[depth] = s
                    depth += 1
                    s = hot[node(s)].left
                }
                if s != r {
                    hot[node(path[depth - 1])].left = hot[node(s)].right
                    hot[node(s)].right = r
                }
                hot[node(s)].left = l
                cold[node(s)].height = cold[node(t)].height
                relink(parent, t, s)
                path[slot] = s
            }
            retrace(path, depth)
            return t
        }
    }

    /// Whether the tree is sound: keys in order, stored heights right, every
    /// node balanced, and exactly `count` nodes reachable (for tests).
    func treeIsValid() -> Bool {
        var reached = 0
        var previous: UInt64? = nil
        func check(_ t: Int32) -> Int8? {
            if t < 0 { return 0 }
            guard let lh = check(hot[node(t)].left) else { return nil }
            if let p = previous, p >= hot[node(t)].first { return nil }
            previous = hot[node(t)].first
            reached += 1
            guard let rh = check(hot[node(t)].right), abs(Int(lh) - Int(rh)) <= 1,
                  cold[node(t)].height == max(lh, rh) + 1 else { return nil }
            return cold[node(t)].height
        }
        return check(root) != nil && reached == count
    }
}
