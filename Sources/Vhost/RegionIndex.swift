// The memory table flattened for the datapath: two sorted arrays of spans
// (by guest-physical and by user address) carrying each region's host base.
// Plain pointers, so a look-up touches no reference-counted object. Spans are
// closed ranges, [first, last], as everywhere in IOTLB.
import IOTLB

/// One region as the datapath looks it up in space `A`.
struct RegionSpan<A: Address> {
    var first: A
    var last: A
    var host: UnsafeMutableRawPointer
    /// The region's first guest-physical address (= `first` in the GPA index):
    /// a user address's GPA in one step, for the dirty log.
    var gpa: GuestPhysAddr
}

/// Sorted spans by guest-physical and by user address. Owned by one Device;
/// `free()` when replaced. `find` has one entry point per space, so the
/// address's type picks the index.
///
/// SAFETY: the span arrays are allocated here and freed by `free()` exactly
/// once (the device's memory replacement or deinit); their host pointers
/// point into the device's `GuestMemory`, which is replaced together with them.
struct RegionIndex {
    private(set) var count = 0
    private var byGPA: UnsafeMutablePointer<RegionSpan<GuestPhysAddr>>?
    private var byUser: UnsafeMutablePointer<RegionSpan<UserAddr>>?

    init() {}

    init(_ memory: GuestMemory) {
        let regions = memory.table.regions
        count = regions.count
        // The memory table refused regions that pass 2^64-1, so `last` fits.
        let gpa = regions.indices.map { i in
            RegionSpan(first: regions[i].guestPhysAddr, last: regions[i].guestPhysAddr.uncheckedAdd(regions[i].memorySize - 1),
                       host: memory.bases[i], gpa: regions[i].guestPhysAddr)
        }
        let user = regions.indices.map { i in
            RegionSpan(first: regions[i].userspaceAddr, last: regions[i].userspaceAddr.uncheckedAdd(regions[i].memorySize - 1),
                       host: memory.bases[i], gpa: regions[i].guestPhysAddr)
        }
        byGPA = Self.sorted(gpa)
        byUser = Self.sorted(user)
    }

    private static func sorted<A>(_ spans: [RegionSpan<A>]) -> UnsafeMutablePointer<RegionSpan<A>> {
        let p = UnsafeMutablePointer<RegionSpan<A>>.allocate(capacity: spans.count)
        // SAFETY: p has room for spans.count elements, one initialized per index.
        for (k, s) in spans.sorted(by: { $0.first < $1.first }).enumerated() { (p + k).initialize(to: s) }
        return p
    }

    func free() {
        byGPA?.deallocate()
        byUser?.deallocate()
    }

    /// The span holding guest-physical `addr`.
    @inline(__always)
    func find(_ addr: GuestPhysAddr) -> RegionSpan<GuestPhysAddr>? { Self.search(byGPA, count, addr) }

    /// The span holding user address `addr`.
    @inline(__always)
    func find(_ addr: UserAddr) -> RegionSpan<UserAddr>? { Self.search(byUser, count, addr) }

    @inline(__always)
    private static func search<A>(_ spans: UnsafeMutablePointer<RegionSpan<A>>?, _ count: Int, _ addr: A) -> RegionSpan<A>? {
        guard let spans else { return nil }
        var lo = 0, hi = count  // first span starting above addr
        while lo < hi {
            let mid = (lo + hi) >> 1
            // SAFETY: 0 <= mid < count, the arrays' length.
            if spans[mid].first.raw <= addr.raw { lo = mid + 1 } else { hi = mid }
        }
        // SAFETY: 0 <= lo-1 < count.
        guard lo > 0, spans[lo - 1].last.raw >= addr.raw else { return nil }
        return spans[lo - 1]
    }
}
