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
        // invalidation (one page, one entry) costs one descent and one removal.
        // Both candidates lie on the descent toward `lo`, so the path it
        // records is the removal's too.
        var removed = 0
        let lo = range.first.raw, hi = range.last.raw
        while true {
            let hot = self.hot, path = state.pointee.path
            var t = root, depth = 0
            var below: Int32 = -1, belowDepth = 0, above: Int32 = -1, aboveDepth = 0
            while t >= 0 {
                path[depth] = t
                let h = hot[node(t)]
                let right = h.first <= lo
                below = right ? t : below
                belowDepth = right ? depth : belowDepth
                above = right ? above : t
                aboveDepth = right ? aboveDepth : depth
                t = right ? h.right : h.left
                depth &+= 1
            }
            let holdsLo = below >= 0 && cold[node(below)].last >= lo
            let n = holdsLo ? below : above
            guard n >= 0, hot[node(n)].first <= hi else { return removed }
            let end = cold[node(n)].last
            onRemove(remove(at: holdsLo ? belowDepth : aboveDepth), reason)
            removed += 1
            if end >= hi { return removed }
        }
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
        let hot = self.hot, path = state.pointee.path
        var t = root, depth = 0
        while t >= 0 {
            let h = hot[node(t)]
            if h.first == key { break }
            path[depth] = t
            depth &+= 1
            t = key < h.first ? h.left : h.right
        }
        guard t >= 0 else { return nil }
        path[depth] = t
        return remove(at: depth)
    }

    /// Removes `path[depth]` (its ancestors in `path[0..<depth]`) from tree
    /// and FIFO list, frees it, and returns its entry.
    func remove(at depth: Int) -> IOTLBEntry {
        let found = state.pointee.path[depth]
        let removed = entry(found)
        unlink(at: depth)
        let cold = self.cold
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

    /// The node arrays as they are now, with the AVL steps on them. The
    /// pointers stay in registers, where `hot` and `cold` would be reloaded
    /// from the state after every store (nothing tells the compiler the
    /// nodes do not alias it). Valid until `allocateNode` moves the arrays.
    struct Nodes {
        let hot: UnsafeMutablePointer<Hot>
        let cold: UnsafeMutablePointer<Cold>
        let used: Int

        @inline(__always)
        func at(_ n: Int32) -> Int {
            assert(n >= 0 && Int(n) < used, "node \(n) outside the pool's \(used) nodes")
            return Int(n)
        }

        @inline(__always)
        func height(_ n: Int32) -> Int8 { n < 0 ? 0 : cold[at(n)].height }

        @inline(__always)
        func refresh(_ n: Int32) {
            cold[at(n)].height = max(height(hot[at(n)].left), height(hot[at(n)].right)) &+ 1
        }

        func rotateRight(_ n: Int32) -> Int32 {
            let l = hot[at(n)].left
            hot[at(n)].left = hot[at(l)].right
            hot[at(l)].right = n
            refresh(n); refresh(l)
            return l
        }

        func rotateLeft(_ n: Int32) -> Int32 {
            let r = hot[at(n)].right
            hot[at(n)].right = hot[at(r)].left
            hot[at(r)].left = n
            refresh(n); refresh(r)
            return r
        }

        /// `n` with its height brought up to date, or the subtree's new top
        /// after the rotations that restore its balance.
        @inline(__always)
        func rebalance(_ n: Int32) -> Int32 {
            let l = hot[at(n)].left, r = hot[at(n)].right
            let hl = height(l), hr = height(r)
            if hl &- hr > 1 {
                if height(hot[at(l)].left) < height(hot[at(l)].right) { hot[at(n)].left = rotateLeft(l) }
                return rotateRight(n)
            }
            if hr &- hl > 1 {
                if height(hot[at(r)].right) < height(hot[at(r)].left) { hot[at(n)].right = rotateRight(r) }
                return rotateLeft(n)
            }
            cold[at(n)].height = max(hl, hr) &+ 1
            return n
        }
    }

    var nodes: Nodes { Nodes(hot: hot, cold: cold, used: used) }

    /// The deepest an AVL tree of `entriesCeiling` nodes gets is ~1.44 log2(n) < 32.
    static let maxDepth = 64

    /// Sets the link from `parent` (the root when -1) that named `old` to `new`.
    @inline(__always)
    func relink(_ nodes: Nodes, _ parent: Int32, _ old: Int32, _ new: Int32) {
        if parent < 0 {
            root = new
        } else if nodes.hot[nodes.at(parent)].left == old {
            nodes.hot[nodes.at(parent)].left = new
        } else {
            nodes.hot[nodes.at(parent)].right = new
        }
    }

    /// Walks the recorded path (root first, `depth` long) back up, rebalancing,
    /// until a subtree's height is what it was: above it nothing changed.
    /// Insertions and removals both touch O(1) nodes on average this way,
    /// where a recursive version rebalances every level.
    func retrace(_ depth: Int) {
        let nodes = self.nodes, path = state.pointee.path
        var i = depth &- 1
        while i >= 0 {
            let t = path[i]
            let before = nodes.cold[nodes.at(t)].height
            let top = nodes.rebalance(t)
            if top != t { relink(nodes, i > 0 ? path[i &- 1] : -1, t, top) }
            if nodes.cold[nodes.at(top)].height == before { return }
            i &-= 1
        }
    }

    /// Links a new node for `e` when no entry overlaps its range, in one
    /// descent: the search for overlaps is the walk to the insertion point.
    /// Returns false, having changed nothing, otherwise.
    func linkIfFree(_ e: IOTLBEntry) -> Bool {
        let lo = e.range.first.raw, hi = e.range.last.raw
        let hot = self.hot, path = state.pointee.path
        var depth = 0
        var t = root
        var below: Int32 = -1, above: Int32 = -1
        while t >= 0 {
            path[depth] = t
            depth &+= 1
            let h = hot[node(t)]
            let right = h.first <= lo
            below = right ? t : below
            above = right ? above : t
            t = right ? h.right : h.left
        }
        if below >= 0 && cold[node(below)].last >= lo { return false }
        if above >= 0 && hot[node(above)].first <= hi { return false }
        let n = newNode(e)  // may move the node arrays: `hot` is stale from here
        guard depth > 0 else { root = n; return true }
        let parent = path[depth &- 1]
        if lo < self.hot[node(parent)].first { self.hot[node(parent)].left = n } else { self.hot[node(parent)].right = n }
        retrace(depth)
        return true
    }

    /// Unlinks `path[depth]` from the tree, its ancestors in `path[0..<depth]`.
    func unlink(at depth: Int) {
        let nodes = self.nodes, hot = nodes.hot, path = state.pointee.path
        let t = path[depth]
        let parent: Int32 = depth > 0 ? path[depth &- 1] : -1
        let l = hot[nodes.at(t)].left, r = hot[nodes.at(t)].right
        var depth = depth
        if l < 0 || r < 0 {
            relink(nodes, parent, t, l < 0 ? r : l)
        } else {
            // Two children: the successor (leftmost of the right subtree) takes t's place.
            let slot = depth
            depth &+= 1
            var s = r
            while hot[nodes.at(s)].left >= 0 {
                path[depth] = s
                depth &+= 1
                s = hot[nodes.at(s)].left
            }
            if s != r {
                hot[nodes.at(path[depth &- 1])].left = hot[nodes.at(s)].right
                hot[nodes.at(s)].right = r
            }
            hot[nodes.at(s)].left = l
            nodes.cold[nodes.at(s)].height = nodes.cold[nodes.at(t)].height
            relink(nodes, parent, t, s)
            path[slot] = s
        }
        retrace(depth)
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
