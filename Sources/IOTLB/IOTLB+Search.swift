// The IOTLB's look-up search: the AVL tree's floor, and in front of it a
// read-mostly copy of the keys in Eytzinger (breadth-first) order, rebuilt
// without allocating only after enough look-ups found it stale (see
// `IOTLB.State`). Ranges are closed, as everywhere in this module.

extension IOTLB {
    /// `floor` for look-ups: through the search arrays when they are current.
    @inline(__always)
    func lookupFloor(_ key: UInt64) -> Int32 {
        if searchVersion != version {
            staleLookups += 1
            if staleLookups < max(count / 4, 16) { return floor(key) }
            rebuildSearch()
        }
        // Each step appends one bit to k: 1 to the right (key <= the search key),
        // 0 to the left; no branch but the loop's. The floor is the last node
        // where the walk went right: drop the trailing left moves and that 1.
        var k = 1
        let n = searchCount
        while k <= n {
            // The Bool's bits, not a branch (the compiler would otherwise branch here).
            // SAFETY: a Bool is one byte holding 0 or 1.
            k = 2 &* k &+ Int(unsafeBitCast(searchKeys[k] <= key, to: UInt8.self))
        }
        k = k >> (k.trailingZeroBitCount + 1)
        return k == 0 ? -1 : searchNodes[k]
    }

    /// Marks the search arrays stale and restarts the count of look-ups
    /// since the last change.
    @inline(__always)
    func mutated() {
        version &+= 1
        staleLookups = 0
    }

    /// Lays the keys out in Eytzinger order: an in-order walk of the tree (an
    /// explicit stack, no allocation) feeds the array's in-order positions.
    func rebuildSearch() {
        withUnsafeTemporaryAllocation(of: Int32.self, capacity: IOTLB.maxDepth) { stack in
            var depth = 0
            var next = root
            func nextInOrder() -> Int32 {
                while next >= 0 {
                    stack[depth] = next
                    depth += 1
                    next = hot[node(next)].left
                }
                depth -= 1
                let n = stack[depth]
                next = hot[node(n)].right
                return n
            }
            let total = count + state.pointee.tombstones  // every node in the tree
            func fill(_ k: Int) {
                guard k <= total else { return }
                fill(2 * k)
                let n = nextInOrder()
                searchKeys[k] = hot[node(n)].first
                searchNodes[k] = n
                fill(2 * k + 1)
            }
            fill(1)
            searchCount = total
        }
        searchVersion = version
        staleLookups = 0
    }

    /// The node with the greatest first <= key, or -1. The descent compiles
    /// to conditional moves (`descend`): random look-ups would otherwise pay a
    /// mispredicted branch per level.
    @inline(__always)
    func floor(_ key: UInt64) -> Int32 {
        var n = root
        var best: Int32 = -1
        let hot = self.hot
        while n >= 0 {
            let (right, child) = descend(hot, n, toward: key)
            best = right ? n : best
            n = child
        }
        return best
    }
}
