// The IOTLB's searches: the AVL tree's one descent (`bracket`, which
// look-ups, insertions and removals share), and in front of it for look-ups
// a read-mostly copy of the keys in Eytzinger (breadth-first) order, rebuilt
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

    /// The node with the greatest first <= key, or -1.
    @inline(__always)
    func floor(_ key: UInt64) -> Int32 { bracket(key).below }

    /// The tree's one descent, toward `key`: the node with the greatest first
    /// <= key (`below`), the one with the least first > key (`above`), -1
    /// where there is none, and the last node visited (`last`, one of the
    /// two: where a new node for `key` hangs). Conditional moves, no branch
    /// but the loop's: random keys would otherwise pay a mispredicted branch
    /// per level. Look-ups, `link` and `removeOverlapping` all descend here.
    @inline(__always)
    func bracket(_ key: UInt64) -> (below: Int32, above: Int32, last: Int32) {
        let hot = self.hot
        var t = root, last: Int32 = -1
        var below: Int32 = -1, above: Int32 = -1
        while t >= 0 {
            last = t
            let (right, child) = descend(hot, t, toward: key)
            below = right ? t : below
            above = right ? above : t
            t = child
        }
        return (below, above, last)
    }

    /// One level of a descent toward `key` from node `n`: whether `key` lies
    /// on n's right (n's first <= key) and n's child on that side. Both
    /// children come in one 8-byte load (`Hot` keeps `right` just after
    /// `left`: `childrenOffset`) and a conditional move picks one, so a level
    /// waits for one load. Written `right ? h.right : h.left`, it compiled to
    /// picking the child's address and then loading it: two loads in a row
    /// per level, 15 % of an update+invalidate pair (`iotlb-bench lookup`).
    @inline(__always)
    func descend(_ hot: UnsafeMutablePointer<Hot>, _ n: Int32, toward key: UInt64) -> (right: Bool, child: Int32) {
        let p = UnsafeRawPointer(hot + node(n))
        let children = p.load(fromByteOffset: IOTLB.childrenOffset, as: UInt64.self)
        let right = p.load(as: UInt64.self) <= key  // `first`, at offset 0
        let left = Int32(truncatingIfNeeded: children), rightChild = Int32(truncatingIfNeeded: children &>> 32)
        return (right, right ? rightChild : left)
    }

    /// Where `Hot`'s two children sit, as one little-endian 8-byte word: left
    /// in its low half. `checkNodeLayout` holds the compiler to it.
    static let childrenOffset = 8

    /// Traps if `Hot` is not laid out as `descend` reads it (first at 0, the
    /// children as one word at `childrenOffset`); run when an IOTLB is made.
    static func checkNodeLayout() {
        #if _endian(big)
        #error("descend(_:_:toward:) reads both children as one little-endian word")
        #endif
        precondition(MemoryLayout<Hot>.offset(of: \Hot.first) == 0
                     && MemoryLayout<Hot>.offset(of: \Hot.left) == childrenOffset
                     && MemoryLayout<Hot>.offset(of: \Hot.right) == childrenOffset + 4,
                     "Hot's layout changed: descend(_:_:toward:) reads first at 0 and both children as one word")
    }
}
