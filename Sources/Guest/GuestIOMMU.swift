// The guest's IOMMU: an IOVA → guest-physical page table, what a VMM's
// vIOMMU knows. Pages are 4 KiB, 2 MiB or 1 GiB. A page stays mapped while
// any buffer in it is mapped (a count per page); its permission is the union
// of what its buffers asked. Thread-safe: the guest maps and unmaps, a
// translator reads.
import Synchronization
import Vhost
import IOTLB

/// A guest IOMMU page size.
public enum PageSize: String, Sendable, CaseIterable {
    case k4 = "4k"
    case m2 = "2m"
    case g1 = "1g"

    /// Bytes in one page.
    public var bytes: UInt64 {
        switch self {
        case .k4: 4 << 10
        case .m2: 2 << 20
        case .g1: 1 << 30
        }
    }
}

/// One page's mapping.
public struct GuestPageMapping: Sendable, Equatable {
    /// The page's IOVAs.
    public var iova: AddressRange<IOVA>
    /// Guest-physical address of the page's first byte.
    public var gpa: GuestPhysAddr
    /// What the device may do.
    public var perm: Permissions
}

/// IOVA → GPA page table with per-page map counts.
public final class GuestIOMMU: Sendable {
    /// The page size of every mapping.
    public let pageSize: PageSize
    private struct Page {
        var gpaPage: UInt64
        var perm: Permissions
        var refs: Int
    }
    private struct Table {
        var pages: [UInt64: Page] = [:]  // by IOVA page number
        var recent: [UInt64] = []        // page numbers mapped or widened, a ring of `recentCapacity`
        var recentCount: UInt64 = 0      // ever appended
    }
    private let table = Locked(Table())
    private static let recentCapacity = 4096

    public init(pageSize: PageSize) { self.pageSize = pageSize }

    private var shift: UInt64 { UInt64(pageSize.bytes.trailingZeroBitCount) }

    /// Maps the pages covering `[iova, iova+size)` to `[gpa, gpa+size)` (same
    /// offset within the page). Returns the pages that were not mapped before
    /// or whose permission grew: what a device IOTLB does not know yet.
    @discardableResult
    public func map(iova: IOVA, gpa: GuestPhysAddr, size: UInt64, perm: Permissions) -> [GuestPageMapping] {
        precondition(iova.raw % pageSize.bytes == gpa.raw % pageSize.bytes, "IOVA and GPA must share the page offset")
        let first = iova.raw >> shift, last = (iova.raw + size - 1) >> shift
        let gpaFirst = gpa.raw >> shift
        var fresh: [GuestPageMapping] = []
        table.withLock { t in
            for n in first...last {
                if var p = t.pages[n] {
                    p.refs += 1
                    let grew = !p.perm.isSuperset(of: perm)
                    p.perm.formUnion(perm)
                    t.pages[n] = p
                    if grew { fresh.append(mapping(n, p)); GuestIOMMU.remember(n, in: &t) }
                } else {
                    let page = Page(gpaPage: gpaFirst + (n - first), perm: perm, refs: 1)
                    t.pages[n] = page
                    fresh.append(mapping(n, page))
                    GuestIOMMU.remember(n, in: &t)
                }
            }
        }
        return fresh
    }

    /// Drops one map of each page covering `[iova, iova+size)`. Returns the
    /// pages no longer mapped: the device IOTLB must forget them before reuse.
    @discardableResult
    public func unmap(iova: IOVA, size: UInt64) -> [AddressRange<IOVA>] {
        let first = iova.raw >> shift, last = (iova.raw + size - 1) >> shift
        var gone: [AddressRange<IOVA>] = []
        table.withLock { t in
            for n in first...last {
                guard var p = t.pages[n] else { continue }
                p.refs -= 1
                if p.refs == 0 {
                    t.pages[n] = nil
                    gone.append(mapping(n, p).iova)
                } else {
                    t.pages[n] = p
                }
            }
        }
        return gone
    }

    /// The page holding `iova`, if mapped.
    public func translate(_ iova: IOVA) -> GuestPageMapping? {
        let n = iova.raw >> shift
        return table.withLock { t in t.pages[n].map { mapping(n, $0) } }
    }

    /// Pages mapped now.
    public var mappedPages: Int { table.withLock { $0.pages.count } }

    /// Pages mapped (or widened) since `cursor` that are still mapped, at most
    /// `limit`, and the cursor to continue from. A translator answering a miss
    /// pushes these too, so one miss brings in a whole batch of new buffers.
    public func recentMappings(since cursor: UInt64, limit: Int) -> ([GuestPageMapping], UInt64) {
        table.withLock { t in
            let cap = UInt64(GuestIOMMU.recentCapacity)
            var from = max(cursor, t.recentCount > cap ? t.recentCount - cap : 0)
            var out: [GuestPageMapping] = []
            while from < t.recentCount && out.count < limit {
                let n = t.recent[Int(from % cap)]
                if let p = t.pages[n], !out.contains(where: { $0.iova.first.raw == n << shift }) { out.append(mapping(n, p)) }
                from += 1
            }
            return (out, from)
        }
    }

    private static func remember(_ n: UInt64, in t: inout Table) {
        if t.recent.count < recentCapacity { t.recent.append(n) } else { t.recent[Int(t.recentCount % UInt64(recentCapacity))] = n }
        t.recentCount += 1
    }

    private func mapping(_ n: UInt64, _ p: Page) -> GuestPageMapping {
        GuestPageMapping(iova: AddressRange(first: IOVA(n << shift), last: IOVA((n << shift) | (pageSize.bytes - 1))),
                         gpa: GuestPhysAddr(p.gpaPage << shift), perm: p.perm)
    }
}

extension GuestPageMapping {
    /// The device IOTLB entry for this page, clipped to the memory region that
    /// backs it (what QEMU's vIOMMU answers); nil when no region backs it.
    public func iotlbEntry(clippedTo table: MemoryTable, around iova: IOVA) -> IOTLBEntry? {
        table.iotlbEntry(mapping: self.iova, toGPA: gpa, around: iova, perm: perm)
    }
}
