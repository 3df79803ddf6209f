// The guest's IOMMU: an IOVA → guest-physical page table, what a VMM's
// vIOMMU knows. Pages are 4 KiB, 2 MiB or 1 GiB. A page stays mapped while
// any buffer in it is mapped (a count per page); its permission is the union
// of what its buffers asked. Thread-safe: the guest maps and unmaps, a
// translator reads on a datapath thread; the lock spins before it sleeps, as
// both hold it for microseconds and a futex wake-up costs more.
import Platform
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
        var logged: UInt64    // its place in the mapping log when last appended there
    }
    private struct Table {
        var pages = PageTable<Page>()  // by IOVA page number
        var recent: [UInt64] = []        // page numbers mapped or widened, a ring of `recentCapacity`
        var recentCount: UInt64 = 0      // ever appended
    }
    private let table = Locked(Table())
    private static let recentCapacity = 4096

    public init(pageSize: PageSize) { self.pageSize = pageSize }

    private var shift: UInt64 { UInt64(pageSize.bytes.trailingZeroBitCount) }

    /// One buffer a driver maps: `[iova, iova+size)` to `[gpa, gpa+size)`.
    public struct MapRequest: Sendable {
        public var iova: IOVA
        public var gpa: GuestPhysAddr
        public var size: UInt64
        public var perm: Permissions
        public init(iova: IOVA, gpa: GuestPhysAddr, size: UInt64, perm: Permissions) {
            self.iova = iova
            self.gpa = gpa
            self.size = size
            self.perm = perm
        }
    }

    /// Maps the pages covering `[iova, iova+size)` to `[gpa, gpa+size)` (same
    /// offset within the page). Returns the pages that were not mapped before
    /// or whose permission grew: what a device IOTLB does not know yet.
    @discardableResult
    public func map(iova: IOVA, gpa: GuestPhysAddr, size: UInt64, perm: Permissions) -> [GuestPageMapping] {
        var fresh: [GuestPageMapping] = []
        map(CollectionOfOne(MapRequest(iova: iova, gpa: gpa, size: size, perm: perm)), fresh: &fresh)
        return fresh
    }

    /// Maps every request in one critical section (a driver refilling a ring),
    /// appending to `fresh` the pages a device IOTLB does not know yet.
    public func map(_ requests: some Collection<MapRequest>, fresh: inout [GuestPageMapping]) {
        table.withLockSpinning { t in
            for r in requests { map(r, in: &t, fresh: &fresh) }
        }
    }

    private func map(_ r: MapRequest, in t: inout Table, fresh: inout [GuestPageMapping]) {
        precondition(r.iova.raw % pageSize.bytes == r.gpa.raw % pageSize.bytes, "IOVA and GPA must share the page offset")
        let first = r.iova.raw >> shift, last = (r.iova.raw + r.size - 1) >> shift
        let gpaFirst = r.gpa.raw >> shift
        for n in first...last {
            if var p = t.pages[n] {
                p.refs += 1
                let grew = !p.perm.isSuperset(of: r.perm)
                p.perm.formUnion(r.perm)
                if grew { p.logged = GuestIOMMU.remember(n, in: &t) }
                t.pages[n] = p
                if grew { fresh.append(mapping(n, p)) }
            } else {
                let page = Page(gpaPage: gpaFirst + (n - first), perm: r.perm, refs: 1, logged: GuestIOMMU.remember(n, in: &t))
                t.pages[n] = page
                fresh.append(mapping(n, page))
            }
        }
    }

    /// Drops one map of each page covering `[iova, iova+size)`. Returns the
    /// pages no longer mapped: the device IOTLB must forget them before reuse.
    @discardableResult
    public func unmap(iova: IOVA, size: UInt64) -> [AddressRange<IOVA>] {
        var gone: [AddressRange<IOVA>] = []
        unmap(CollectionOfOne((iova, size)), gone: &gone)
        return gone
    }

    /// Unmaps every `(iova, size)` buffer in one critical section, appending to
    /// `gone` the pages no longer mapped.
    public func unmap(_ buffers: some Collection<(IOVA, UInt64)>, gone: inout [AddressRange<IOVA>]) {
        table.withLockSpinning { t in
            for (iova, size) in buffers {
                let first = iova.raw >> shift, last = (iova.raw + size - 1) >> shift
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
        }
    }

    /// The page holding `iova`, if mapped.
    public func translate(_ iova: IOVA) -> GuestPageMapping? {
        let n = iova.raw >> shift
        return table.withLockSpinning { t in t.pages[n].map { mapping(n, $0) } }
    }

    /// Pages mapped now.
    public var mappedPages: Int { table.withLock { $0.pages.count } }

    /// The pages mapped (or widened) after the page holding `iova` that are
    /// still mapped, in mapping order, at most `limit`: a translator answering
    /// a miss sends these too. A driver maps buffers in the order it posts
    /// them, so these are what the device reads next (read-ahead), not pages
    /// it is done with: an IOTLB smaller than the buffers in flight keeps the
    /// ones about to be used.
    public func mappings(after iova: IOVA, limit: Int) -> [GuestPageMapping] {
        var out: [GuestPageMapping] = []
        forEachMapping(after: iova, limit: limit) { out.append($0) }
        return out
    }

    /// The same pages, each given to `body` under the table's lock (a translator
    /// on a datapath thread: nothing allocated), skipping the log positions in
    /// `sent` (what the caller read ahead already). Returns the positions now
    /// known sent: the missed page's and the walk's, joined to `sent` when
    /// they touch (the next call's `sent`).
    @discardableResult
    public func forEachMapping(after iova: IOVA, skipping sent: Range<UInt64> = 0..<0, limit: Int,
                               _ body: (GuestPageMapping) -> Void) -> Range<UInt64> {
        table.withLockSpinning { t in
            guard limit > 0, let missed = t.pages[iova.raw >> shift] else { return sent }
            let cap = UInt64(GuestIOMMU.recentCapacity)
            var at = max(missed.logged + 1, t.recentCount > cap ? t.recentCount - cap : 0)
            var given = 0
            while at < t.recentCount && given < limit {
                if sent.contains(at) { at = sent.upperBound; continue }
                let n = t.recent[Int(at % cap)]
                // A page logged twice is sent once, at its latest place.
                if let p = t.pages[n], p.logged == at {
                    body(mapping(n, p))
                    given += 1
                }
                at += 1
            }
            let walked = missed.logged..<at
            guard !sent.isEmpty, walked.lowerBound <= sent.upperBound, sent.lowerBound <= walked.upperBound else { return walked }
            return min(walked.lowerBound, sent.lowerBound)..<max(walked.upperBound, sent.upperBound)
        }
    }

    /// Appends page `n` to the mapping log; returns its place there.
    private static func remember(_ n: UInt64, in t: inout Table) -> UInt64 {
        if t.recent.count < recentCapacity { t.recent.append(n) } else { t.recent[Int(t.recentCount % UInt64(recentCapacity))] = n }
        t.recentCount += 1
        return t.recentCount - 1
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
