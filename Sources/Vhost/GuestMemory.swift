// The memory behind a memory table: one shared mapping per region.
import CFaultGuard
import Glibc
import IOTLB
import Platform

/// One region's host mapping; unmapped when the last table using it goes.
final class RegionMapping: @unchecked Sendable {
    let region: MemoryRegion
    /// The region's first byte.
    /// SAFETY: mapped in init, unmapped in deinit only: valid while this
    /// object lives (the device holds it while any queue may use it). A
    /// front-end shrinking its file under us is caught by the SIGBUS guard.
    let base: UnsafeMutableRawPointer
    let length: Int
    let huge: Bool
    /// What munmap takes (a file mapping starts before `base`).
    private let mapBase: UnsafeMutableRawPointer
    private let mapLength: Int
    /// The SIGBUS guard's slot for a file mapping (-1: none, anonymous memory cannot shrink).
    private var guardSlot: Int32 = -1

    /// Pages of a file mapping that were lost (the file shrank) and replaced
    /// with zeros by the SIGBUS guard.
    var lostPages: UInt64 { guardSlot < 0 ? 0 : CFaultGuard_faults(guardSlot) }

    /// Maps `region`: MAP_HUGETLB (2 MiB) when asked and the size allows,
    /// else plain shared anonymous memory with transparent-huge-page advice.
    init(_ region: MemoryRegion, hugePages: Bool) throws(SystemCallError) {
        guard region.memorySize <= UInt64(Int.max) else { throw SystemCallError(call: "mmap", errno: ENOMEM) }
        let len = Int(region.memorySize)
        let wantHuge = hugePages && region.memorySize % (2 << 20) == 0
        // Huge pages are reserved at mmap time (no MAP_NORESERVE): with too few
        // free, mmap fails and we fall back, instead of SIGBUS on first touch.
        let hugeBase = wantHuge ? try? mapShared(len, flags: MAP_ANONYMOUS | 0x40000 /* MAP_HUGETLB */) : nil
        let huge = hugeBase != nil
        let base: UnsafeMutableRawPointer
        if let hugeBase { base = hugeBase } else { base = try mapShared(len, flags: MAP_ANONYMOUS | MAP_NORESERVE) }
        if !huge { _ = madvise(base, len, 14 /* MADV_HUGEPAGE */) }
        self.region = region
        self.base = base
        self.length = len
        self.huge = huge
        mapBase = base
        mapLength = len
    }

    /// Maps `region` from a file a front-end passed (vhost-user): the region
    /// starts `offset` bytes into it. The mapping starts at offset 0 and is
    /// rounded up to the file's block size, as hugetlbfs requires.
    init(_ region: MemoryRegion, file fd: Int32, offset: UInt64) throws(SystemCallError) {
        var st = stat()
        try syscall("fstat") { fstat(fd, &st) }
        let block = UInt64(max(Int(st.st_blksize), Int(getpagesize())))
        let (end, o1) = region.memorySize.addingReportingOverflow(offset)
        let (rounded, o2) = end.addingReportingOverflow(block - 1)
        guard !o1, !o2, rounded / block * block <= UInt64(Int.max) else {
            throw SystemCallError(call: "mmap", errno: EINVAL)
        }
        let total = Int(rounded / block * block)
        // Touching a page past the end of the file would raise SIGBUS in the
        // datapath: a region must lie within the file as passed.
        if st.st_mode & S_IFMT == S_IFREG && UInt64(st.st_size) < end {
            throw SystemCallError(call: "mmap (region ends past the end of its file)", errno: EINVAL)
        }
        let p = try mapShared(total, fd: fd)
        self.region = region
        // SAFETY: offset+memorySize = end <= total, the bytes mapped from p; and <= the file's size (above).
        self.base = p + Int(offset)
        self.length = Int(region.memorySize)
        self.huge = block >= 2 << 20
        mapBase = p
        mapLength = total
        // The front-end keeps the file and may shrink it: a touch past its new
        // end must not SIGBUS the daemon (see CFaultGuard.h).
        let rc = CFaultGuard_install()
        if rc != 0 { munmap(p, total); throw SystemCallError(call: "sigaction(SIGBUS)", errno: rc) }
        guardSlot = CFaultGuard_register(p, total, Int(block))
        if guardSlot < 0 { munmap(p, total); throw SystemCallError(call: "mmap (no SIGBUS guard slot left)", errno: ENOMEM) }
    }

    deinit {
        // Unguard first: once unmapped, the address may be reused by anything.
        if guardSlot >= 0 { CFaultGuard_unregister(guardSlot) }
        munmap(mapBase, mapLength)
    }
}

/// Host mappings backing each region of a memory table. Kept alive by every
/// holder (the device, a built-in guest), so no pointer into it dangles; the
/// owning worker drops the device's reference only between batches.
public final class GuestMemory: @unchecked Sendable {
    /// Base of each region's mapping, in the table's region order.
    public let bases: [UnsafeMutableRawPointer]
    /// The table this memory backs.
    public let table: MemoryTable
    /// Whether explicit huge pages back every region.
    public let hugePages: Bool
    private let mappings: [RegionMapping]

    /// Maps every region of `table`. A region identical to one of `previous`
    /// (same guest-physical address, size and user address) keeps its memory,
    /// as RAM stays in place when a VMM re-sends its table.
    public convenience init(table: MemoryTable, hugePages: Bool = false, previous: GuestMemory? = nil) throws(SystemCallError) {
        var mappings: [RegionMapping] = []
        for r in table.regions {
            if let same = previous?.mappings.first(where: { $0.region == r }) {
                mappings.append(same)
            } else {
                mappings.append(try RegionMapping(r, hugePages: hugePages))
            }
        }
        self.init(table: table, mappings: mappings)
    }

    /// Maps every region of `table` from the file passed with it (vhost-user):
    /// `files[i]` (descriptor, offset of the region in it) backs `table.regions[i]`.
    /// The descriptors stay the caller's; the mappings outlive them.
    public convenience init(table: MemoryTable, files: [(fd: Int32, offset: UInt64)]) throws(SystemCallError) {
        precondition(files.count == table.regions.count)
        var mappings: [RegionMapping] = []
        for (r, f) in zip(table.regions, files) { mappings.append(try RegionMapping(r, file: f.fd, offset: f.offset)) }
        self.init(table: table, mappings: mappings)
    }

    private init(table: MemoryTable, mappings: [RegionMapping]) {
        self.mappings = mappings
        self.bases = mappings.map(\.base)
        self.table = table
        self.hugePages = mappings.allSatisfy(\.huge)
    }
    /// Pages lost because a front-end shrank the file behind them (each now
    /// reads zeros): when non-zero, this memory no longer holds the guest's data.
    public var lostPages: UInt64 { mappings.reduce(0) { $0 + $1.lostPages } }

    /// The host pointer of guest-physical `gpa` and the bytes contiguous from it.
    public func host(gpa: GuestPhysAddr) -> (UnsafeMutableRawPointer, UInt64)? {
        table.lookup(gpa: gpa).map { (bases[$0.region] + Int($0.offset), $0.contiguous) }
    }

    /// The host pointer of user address `uaddr` and the bytes contiguous from it.
    public func host(uaddr: UserAddr) -> (UnsafeMutableRawPointer, UInt64)? {
        table.lookup(uaddr: uaddr).map { (bases[$0.region] + Int($0.offset), $0.contiguous) }
    }
}
