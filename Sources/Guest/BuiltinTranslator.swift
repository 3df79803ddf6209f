// The in-process vIOMMU (the role QEMU plays): answers a device's misses by
// walking the guest IOMMU and the memory table, with the guest page as the
// granularity clipped to the backing region. It runs on the device's worker
// (a `MissResolver`), so a miss costs a page-table walk instead of a round
// trip through the miss log and another thread: reading the guest IOMMU
// there also orders it after every invalidation the guest sent before.
import Synchronization
import IOTLB
import Vhost

/// Answers one device's misses from one guest IOMMU.
final class BuiltinTranslator: @unchecked Sendable {
    private let iommu: GuestIOMMU
    private let table: MemoryTable
    /// Misses answered so far.
    let answered = Atomic<UInt64>(0)
    /// The stretch of the guest IOMMU's mapping log read ahead already: the
    /// next answer skips it, so a page is read ahead once, not once per miss
    /// while it stays mapped (a page unmapped and mapped again is logged anew,
    /// outside it). Only the worker that calls the resolver touches it.
    private let sent = UnsafeMutablePointer<Range<UInt64>>.allocate(capacity: 1)

    /// Pages mapped after the missed one sent with each answer, at most: the
    /// buffers posted in the same batch would miss one after another otherwise.
    static let readAhead = 1024

    init(iommu: GuestIOMMU, table: MemoryTable) {
        self.iommu = iommu
        self.table = table
        sent.initialize(to: 0..<0)
    }

    deinit { sent.deallocate() }

    /// The resolver the device calls on its worker. With the missed page it
    /// sends the pages the guest mapped after it (read-ahead), but no more than
    /// a quarter of the entries the IOTLB can hold beside its pinned ones: a
    /// batch larger than the IOTLB would evict its own answer, and the entries
    /// of the chain being processed must survive it. The missed page comes
    /// last. Written into the device's buffer: nothing is allocated. A page
    /// read ahead once and evicted since misses itself and is answered then.
    var resolver: MissResolver {
        MissResolver { [self] iova, _, budget, out in
            guard out.count > 0, let page = iommu.translate(iova),
                  let missed = page.iotlbEntry(clippedTo: table, around: iova) else { return 0 }
            var n = 0
            let limit = min(BuiltinTranslator.readAhead, budget / 4, out.count - 1)
            sent.pointee = iommu.forEachMapping(after: iova, skipping: sent.pointee, limit: limit) { p in
                if let e = p.iotlbEntry(clippedTo: table, around: p.iova.first), e != missed {
                    out[n] = e
                    n += 1
                }
            }
            out[n] = missed
            answered.add(1, ordering: .relaxed)
            return n + 1
        }
    }
}
