// The memory behind a memory table: one shared mapping per region.
import Glibc
import IOTLB

/// A system call failed; `errno` says why.
public struct SystemCallError: Error, CustomStringConvertible, Sendable {
    public let call: String
    public let errno: Int32
    public var description: String { "\(call): \(String(cString: strerror(errno)))" }
}

/// Calls `body` until it stops failing with EINTR; turns -1 into a typed error.
@discardableResult
func syscall<T: FixedWidthInteger>(_ name: String, _ body: () -> T) throws(SystemCallError) -> T {
    while true {
        let r = body()
        if r != -1 { return r }
        if errno != EINTR { throw SystemCallError(call: name, errno: errno) }
    }
}

/// Host mappings backing each region of a memory table. Unmapped on deinit,
/// so it must outlive every pointer handed out (the owning worker drops it
/// only between batches).
public final class GuestMemory: @unchecked Sendable {
    /// Base of each region's mapping, in the table's region order.
    public let bases: [UnsafeMutableRawPointer]
    /// The table this memory backs.
    public let table: MemoryTable
    /// Whether explicit huge pages back the regions.
    public let hugePages: Bool
    private let lengths: [Int]

    /// Maps every region of `table`: MAP_HUGETLB (2 MiB) when `hugePages`
    /// and every size is a multiple of 2 MiB, else plain shared anonymous
    /// memory with transparent-huge-page advice. Pages are touched lazily.
    public init(table: MemoryTable, hugePages wantHuge: Bool = false) throws(SystemCallError) {
        let twoMiB: UInt64 = 2 << 20
        let huge = wantHuge && table.regions.allSatisfy { $0.memorySize % twoMiB == 0 }
        var bases: [UnsafeMutableRawPointer] = []
        var lengths: [Int] = []
        var fellBack = false
        for r in table.regions {
            guard r.memorySize <= UInt64(Int.max) else {
                GuestMemory.unmap(bases, lengths)
                throw SystemCallError(call: "mmap", errno: ENOMEM)
            }
            let len = Int(r.memorySize)
            // Huge pages are reserved at mmap time (no MAP_NORESERVE): with too few
            // free, mmap fails and we fall back, instead of SIGBUS on first touch.
            let flags = huge ? MAP_SHARED | MAP_ANONYMOUS | 0x40000 /* MAP_HUGETLB */
                             : MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE
            var p = mmap(nil, len, PROT_READ | PROT_WRITE, flags, -1, 0)
            if p == MAP_FAILED && huge {
                fellBack = true
                p = mmap(nil, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            }
            guard let base = p, base != MAP_FAILED else {
                let e = errno
                GuestMemory.unmap(bases, lengths)
                throw SystemCallError(call: "mmap", errno: e)
            }
            if !huge || fellBack { _ = madvise(base, len, 14 /* MADV_HUGEPAGE */) }
            bases.append(base)
            lengths.append(len)
        }
        self.bases = bases
        self.lengths = lengths
        self.table = table
        self.hugePages = huge && !fellBack
    }

    deinit { GuestMemory.unmap(bases, lengths) }

    private static func unmap(_ bases: [UnsafeMutableRawPointer], _ lengths: [Int]) {
        for (b, l) in zip(bases, lengths) { munmap(b, l) }
    }

    /// The host pointer of guest-physical `gpa` and the bytes contiguous from it.
    public func host(gpa: GuestPhysAddr) -> (UnsafeMutableRawPointer, UInt64)? {
        table.lookup(gpa: gpa).map { (bases[$0.region] + Int($0.offset), $0.contiguous) }
    }

    /// The host pointer of user address `uaddr` and the bytes contiguous from it.
    public func host(uaddr: UserAddr) -> (UnsafeMutableRawPointer, UInt64)? {
        table.lookup(uaddr: uaddr).map { (bases[$0.region] + Int($0.offset), $0.contiguous) }
    }
}
