// The guest IOMMU's page table: page number -> value, in two flat arrays
// with linear probing. A vIOMMU walks a page table on every miss and the
// guest maps and unmaps a page per buffer, so a look-up costs one multiply
// and, usually, one cache line, where a `Dictionary` hashes with SipHash.
// Removal shifts the following entries back (no tombstones), so the table
// never degrades under constant map/unmap churn.

/// Page numbers (any UInt64 but `UInt64.max`) to values.
struct PageTable<Value> {
    private static var empty: UInt64 { .max }
    private var keys: [UInt64]
    private var values: [Value?]
    private var shift: UInt64       // 64 - log2(capacity)
    private(set) var count = 0

    init() {
        keys = Array(repeating: PageTable.empty, count: 64)
        values = Array(repeating: nil, count: 64)
        shift = 64 - 6
    }

    private var mask: Int { keys.count - 1 }

    /// Fibonacci hashing: the top bits of the product spread neighbouring
    /// page numbers (a driver's buffers) across the table.
    @inline(__always)
    private func home(_ key: UInt64) -> Int { Int(truncatingIfNeeded: (key &* 0x9E37_79B9_7F4A_7C15) >> shift) }

    /// The slot holding `key`, or the empty slot where it would go.
    @inline(__always)
    private func slot(_ key: UInt64) -> (Int, found: Bool) {
        var i = home(key)
        while true {
            let k = keys[i]
            if k == key { return (i, true) }
            if k == PageTable.empty { return (i, false) }
            i = (i &+ 1) & mask
        }
    }

    subscript(key: UInt64) -> Value? {
        get {
            let (i, found) = slot(key)
            return found ? values[i] : nil
        }
        set {
            precondition(key != PageTable.empty, "page number out of range")
            let (i, found) = slot(key)
            if let v = newValue {
                if found { values[i] = v; return }
                keys[i] = key
                values[i] = v
                count += 1
                if count * 2 > keys.count { grow() }
            } else if found {
                remove(at: i)
            }
        }
    }

    /// Empties slot `i`, moving back each following entry that would no
    /// longer be found past the gap (linear probing's deletion).
    private mutating func remove(at i: Int) {
        var gap = i
        var j = i
        while true {
            j = (j &+ 1) & mask
            let k = keys[j]
            if k == PageTable.empty { break }
            let h = home(k)
            // Entry j stays when its home lies cyclically in (gap, j].
            let stays = gap <= j ? (gap < h && h <= j) : (gap < h || h <= j)
            if stays { continue }
            keys[gap] = k
            values[gap] = values[j]
            gap = j
        }
        keys[gap] = PageTable.empty
        values[gap] = nil
        count -= 1
    }

    private mutating func grow() {
        let oldKeys = keys, oldValues = values
        keys = Array(repeating: PageTable.empty, count: oldKeys.count * 2)
        values = Array(repeating: nil, count: oldKeys.count * 2)
        shift -= 1
        for (i, k) in oldKeys.enumerated() where k != PageTable.empty {
            let (s, _) = slot(k)
            keys[s] = k
            values[s] = oldValues[i]
        }
    }
}
