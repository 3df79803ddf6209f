// The memory table flattened for the datapath: two sorted arrays of spans
// (by guest-physical and by user address) carrying each region's host base.
// Plain pointers, so a look-up touches no reference-counted object.
import IOTLB

/// One region as the datapath looks it up.
struct RegionSpan {
    var first: UInt64
    var last: UInt64
    var host: UnsafeMutableRawPointer
    /// The region's first guest-physical address (= `first` in the GPA index):
    /// a user address's GPA in one step, for the dirty log.
    var gpa: UInt64
}

/// Sorted spans by guest-physical and by user address. Owned by one Device;
/// `free()` when replaced.
///
/// SAFETY: the span arrays are allocated here and freed by `free()` exactly
/// once (the device's memory replacement or deinit); their host pointers
/// point into the device's `GuestMemory`, which is replaced together with them.
struct RegionIndex {
    private(set) var count = 0
    private var byGPA: UnsafeMutablePointer<RegionSpan>?
    private var byUser: UnsafeMutablePointer<RegionSpan>?

    init() {}

    init(_ memory: GuestMemory) {
        let regions = memory.table.regions
        count = regions.count
        let g = UnsafeMutablePointer<RegionSpan>.allocate(capacity: count)
        let u = UnsafeMutablePointer<RegionSpan>.allocate(capacity: count)
        let spans = regions.indices.map { i in
            (gpa: RegionSpan(first: regions[i].guestPhysAddr.raw, last: regions[i].guestPhysAddr.raw + (regions[i].memorySize - 1),
                             host: memory.bases[i], gpa: regions[i].guestPhysAddr.raw),
             user: RegionSpan(first: regions[i].userspaceAddr.raw, last: regions[i].userspaceAddr.raw + (regions[i].memorySize - 1),
                              host: memory.bases[i], gpa: regions[i].guestPhysAddr.raw))
        }
        for (k, s) in spans.map(\.gpa).sorted(by: { $0.first < $1.first }).enumerated() { (g + k).initialize(to: s) }
        for (k, s) in spans.map(\.user).sorted(by: { $0.first < $1.first }).enumerated() { (u + k).initialize(to: s) }
        byGPA = g
        byUser = u
    }

    func free() {
        byGPA?.deallocate()
        byUser?.deallocate()
    }

    /// The span holding `addr` in guest-physical (`user` false) or user space.
    @inline(__always)
    func find(_ addr: UInt64, user: Bool) -> RegionSpan? {
        guard let spans = user ? byUser : byGPA else { return nil }
        var lo = 0, hi = count  // first span starting above addr
        while lo < hi {
            let mid = (lo + hi) >> 1
            if spans[mid].first <= addr { lo = mid + 1 } else { hi = mid }
        }
        guard lo > 0, spans[lo - 1].last >= addr else { return nil }
        return spans[lo - 1]
    }
}
