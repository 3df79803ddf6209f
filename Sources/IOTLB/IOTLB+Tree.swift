// The IOTLB's storage: a pool of nodes addressed by Int32 indices, an AVL
// tree over their first IOVAs (entries never overlap, so the tree orders them
// wholly) and a FIFO list threading them by insertion. Nodes know their
// parent, so a node found otherwise (the oldest, for eviction; a cached
// translation, for an invalidation) leaves the tree without a descent. The
// invariant every function here keeps: a node index handed around is in
// 0..<used (checked by `node(_:)` in debug builds) and names a live node or
// the free list's head. What an entry means is IOTLB.swift's business; this
// file only keeps nodes.

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
        // invalidation (one page, one entry) costs one search and one removal,
        // and the search is a cache probe when the datapath used the entry.
        var removed = 0
        var lo = range.first.raw
        let hi = range.last.raw
        while true {
            var n = cachedNode(lo)
            if n < 0 {
                let (below, above, _) = bracket(lo)
                n = below >= 0 && cold[node(below)].last >= lo ? below : above
                guard n >= 0, hot[node(n)].first <= hi else { return removed }
            }
            let end = cold[node(n)].last
            if cold[node(n)].dead {
                // Gone for look-ups already; an entry coming in over it takes its place in the tree.
                if reason != .invalidated { purge(n) }
            } else {
                // An invalidated entry's node stays in the tree as a tombstone, for
                // the same range mapped again to come back without a rebalance.
                onRemove(reason == .invalidated ? bury(n) : remove(n), reason)
                removed += 1
            }
            if end >= hi { return removed }
            lo = end + 1  // entries never overlap: nothing else holds [lo, end]
        }
    }

    /// In-order walk of the nodes overlapping [lo, hi]. Entries never overlap,
    /// so a node ending below `lo` has nothing useful on its left, and a node
    /// starting above `hi` nothing on its right.
    @inline(__always)
    func visit(_ start: Int32, _ lo: UInt64, _ hi: UInt64, _ body: (Int32) -> Void) {
        // In order, without recursion (a recursive walk passing `body` along cost
        // reference counting per node): an explicit stack of the overlapping
        // ancestors whose right subtree is still to visit. An AVL tree of 2^20
        // entries is at most 29 high; 64 leaves room.
        withUnsafeTemporaryAllocation(of: Int32.self, capacity: 64) { stack in
            var top = 0
            var n = start
            while true {
                while n >= 0 {
                    let h = hot[node(n)]
                    if h.first > hi { n = h.left; continue }           // this and its right: past the range
                    if cold[node(n)].last < lo { n = h.right; continue }  // this and its left: before it
                    // SAFETY: `top` < 64, the tree's height bound (see above).
                    stack[top] = n
                    top += 1
                    n = h.left
                }
                if top == 0 { return }
                top -= 1
                let v = stack[top]
                if !cold[node(v)].dead { body(v) }
                n = hot[node(v)].right
            }
        }
    }

    /// `visit` that stops as soon as `body` returns false; returns whether it went on to the end.
    func visitUntil(_ n: Int32, _ lo: UInt64, _ hi: UInt64, _ body: (Int32) -> Bool) -> Bool {
        if n < 0 { return true }
        let h = hot[node(n)]
        if h.first > hi { return visitUntil(h.left, lo, hi, body) }
        if cold[node(n)].last < lo { return visitUntil(h.right, lo, hi, body) }
        return visitUntil(h.left, lo, hi, body) && (cold[node(n)].dead || body(n)) && visitUntil(h.right, lo, hi, body)
    }

    @inline(__always)
    func allocateNode() -> Int32 {
        if freeList >= 0 {
            let n = freeList
            freeList = hot[node(n)].left
            return n
        }
        return allocateFreshNode()
    }

    /// A node never handed out before, the arrays grown first when full.
    func allocateFreshNode() -> Int32 {
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

    /// Unlinks node `n` from tree and FIFO list, frees it, and returns its entry.
    func remove(_ n: Int32) -> IOTLBEntry {
        let removed = entry(n)
        unlink(n)
        let cold = self.cold
        let c = cold[node(n)]
        if c.older >= 0 { cold[node(c.older)].newer = c.newer } else { oldest = c.newer }
        if c.newer >= 0 { cold[node(c.newer)].older = c.older } else { newest = c.older }
        if c.pinned { state.pointee.pinnedCount -= 1 }
        state.pointee.stamps[node(n)] = IOTLB.deadStamp  // its cached copies stop answering
        hot[node(n)].left = freeList
        freeList = n
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
        let state: UnsafeMutablePointer<State>

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

        /// Makes the link from `parent` (the root when -1) that named `old` name `new`.
        @inline(__always)
        func replaceChild(_ parent: Int32, _ old: Int32, _ new: Int32) {
            if parent < 0 {
                state.pointee.root = new
            } else if hot[at(parent)].left == old {
                hot[at(parent)].left = new
            } else {
                hot[at(parent)].right = new
            }
        }

        /// Sets `child`'s parent, if there is a child.
        @inline(__always)
        func adopt(_ child: Int32, by parent: Int32) {
            if child >= 0 { cold[at(child)].parent = parent }
        }

        /// Rotates `n`'s left child above it; returns that child, now the subtree's top.
        func rotateRight(_ n: Int32) -> Int32 {
            let l = hot[at(n)].left, p = cold[at(n)].parent
            let moved = hot[at(l)].right
            hot[at(n)].left = moved
            adopt(moved, by: n)
            hot[at(l)].right = n
            cold[at(n)].parent = l
            cold[at(l)].parent = p
            replaceChild(p, n, l)
            refresh(n); refresh(l)
            return l
        }

        /// Rotates `n`'s right child above it; returns that child, now the subtree's top.
        func rotateLeft(_ n: Int32) -> Int32 {
            let r = hot[at(n)].right, p = cold[at(n)].parent
            let moved = hot[at(r)].left
            hot[at(n)].right = moved
            adopt(moved, by: n)
            hot[at(r)].left = n
            cold[at(n)].parent = r
            cold[at(r)].parent = p
            replaceChild(p, n, r)
            refresh(n); refresh(r)
            return r
        }

        /// `n` with its height brought up to date, or the subtree's new top
        /// after the rotations that restore its balance (linked in `n`'s place).
        @inline(__always)
        func rebalance(_ n: Int32) -> Int32 {
            let l = hot[at(n)].left, r = hot[at(n)].right
            let hl = height(l), hr = height(r)
            if hl &- hr > 1 {
                if height(hot[at(l)].left) < height(hot[at(l)].right) { _ = rotateLeft(l) }
                return rotateRight(n)
            }
            if hr &- hl > 1 {
                if height(hot[at(r)].right) < height(hot[at(r)].left) { _ = rotateRight(r) }
                return rotateLeft(n)
            }
            cold[at(n)].height = max(hl, hr) &+ 1
            return n
        }

        /// Walks up from `n`, rebalancing, until a subtree's height is what it
        /// was: above it nothing changed. Insertions and removals both touch
        /// O(1) nodes on average this way.
        func retrace(from n: Int32) {
            var t = n
            while t >= 0 {
                let before = cold[at(t)].height
                let top = rebalance(t)
                if cold[at(top)].height == before { return }
                t = cold[at(top)].parent
            }
        }
    }

    var nodes: Nodes { Nodes(hot: hot, cold: cold, used: used, state: state) }

    /// The deepest an AVL tree of `entriesCeiling` nodes gets is ~1.44 log2(n) < 32.
    static let maxDepth = 64

    /// What `link` did: linked a new node, brought back a tombstone of the
    /// same range as the newest node, or nothing (an overlap, or the very
    /// same entry held already).
    enum Link { case linked, revived, overlaps, held }

    /// Links a new node for `e` when no entry overlaps its range, in one
    /// descent: the search for overlaps is the walk to the insertion point;
    /// brings back a tombstone of exactly `e`'s range instead. Otherwise
    /// changes nothing, and tells an overlap from the very same entry held.
    func link(_ e: IOTLBEntry) -> Link {
        let lo = e.range.first.raw, hi = e.range.last.raw
        // When tombstones hold the pool's last nodes, the oldest gives its node
        // up first (unless it is the one coming back), before the descent.
        let oldestTomb = state.pointee.oldestTombstone
        if freeList < 0 && used == maxEntries && oldestTomb >= 0
            && (hot[node(oldestTomb)].first != lo || cold[node(oldestTomb)].last != hi) {
            purge(oldestTomb)
        }
        let hot = self.hot
        let (below, above, parent) = bracket(lo)
        if below >= 0 && cold[node(below)].last >= lo {
            let c = cold[node(below)]
            let sameRange = hot[node(below)].first == lo && c.last == hi
            if c.dead {
                guard sameRange else { return .overlaps }
                revive(below, e)
                return .revived
            }
            return sameRange && c.uaddr == e.uaddr.raw && c.perm == e.perm.rawValue ? .held : .overlaps
        }
        if above >= 0 && hot[node(above)].first <= hi { return .overlaps }
        let n = newNode(e, parent: parent)  // may move the node arrays: `hot` is stale from here
        let nodes = self.nodes
        guard parent >= 0 else { root = n; return .linked }
        // The parent is the node found last, `below` or `above`.
        if parent == above { nodes.hot[nodes.at(parent)].left = n } else { nodes.hot[nodes.at(parent)].right = n }
        // The parent had no child on this side: if it has one on the other,
        // its height holds and nothing above changes.
        if nodes.hot[nodes.at(parent)].left < 0 || nodes.hot[nodes.at(parent)].right < 0 { nodes.retrace(from: parent) }
        return .linked
    }

    /// Unlinks node `n` from the tree.
    @inline(__always)
    func unlink(_ n: Int32) {
        let nodes = self.nodes, hot = nodes.hot, cold = nodes.cold
        let p = cold[nodes.at(n)].parent
        let l = hot[nodes.at(n)].left, r = hot[nodes.at(n)].right
        if l < 0 || r < 0 {
            let child = l < 0 ? r : l
            nodes.replaceChild(p, n, child)
            nodes.adopt(child, by: p)
            nodes.retrace(from: p)
            return
        }
        // Two children: the successor (leftmost of the right subtree) takes n's place.
        var s = r
        while hot[nodes.at(s)].left >= 0 { s = hot[nodes.at(s)].left }
        var lowest = s  // where the heights may have changed
        if s != r {
            let sp = cold[nodes.at(s)].parent
            let sr = hot[nodes.at(s)].right
            hot[nodes.at(sp)].left = sr
            nodes.adopt(sr, by: sp)
            hot[nodes.at(s)].right = r
            cold[nodes.at(r)].parent = s
            lowest = sp
        }
        hot[nodes.at(s)].left = l
        cold[nodes.at(l)].parent = s
        cold[nodes.at(s)].parent = p
        cold[nodes.at(s)].height = cold[nodes.at(n)].height
        nodes.replaceChild(p, n, s)
        nodes.retrace(from: lowest)
    }

    /// Whether the tree is sound: keys in order, stored heights and parents
    /// right, every node balanced, and exactly the live nodes and the
    /// tombstones reachable (for tests).
    func treeIsValid() -> Bool {
        var reached = 0
        var previous: UInt64? = nil
        func check(_ t: Int32, _ parent: Int32) -> Int8? {
            if t < 0 { return 0 }
            guard cold[node(t)].parent == parent, let lh = check(hot[node(t)].left, t) else { return nil }
            if let p = previous, p >= hot[node(t)].first { return nil }
            previous = hot[node(t)].first
            reached += 1
            guard let rh = check(hot[node(t)].right, t), abs(Int(lh) - Int(rh)) <= 1,
                  cold[node(t)].height == max(lh, rh) + 1 else { return nil }
            return cold[node(t)].height
        }
        return check(root, -1) != nil && reached == count + state.pointee.tombstones
    }
}
