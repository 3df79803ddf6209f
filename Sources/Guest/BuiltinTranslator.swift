// The in-process vIOMMU (the role QEMU plays): answers a device's misses by
// walking the guest IOMMU and the memory table, with the guest page as the
// granularity clipped to the backing region, and posts the update through
// the same command path as the HTTP API.
import Glibc
import Synchronization
import IOTLB
import Vhost

/// A thread answering one device's misses from one guest IOMMU.
final class BuiltinTranslator: @unchecked Sendable {
    private let handle: DeviceHandle
    private let iommu: GuestIOMMU
    private let table: MemoryTable
    private let running = Atomic<Bool>(true)
    private let wake = WakeSignal()
    private var thread: pthread_t?
    /// Misses answered so far.
    let answered = Atomic<UInt64>(0)

    init(handle: DeviceHandle, iommu: GuestIOMMU, table: MemoryTable) {
        self.handle = handle
        self.iommu = iommu
        self.table = table
        thread = startThread(name: "translator") { [self] in run() }
    }

    func stop() {
        running.store(false, ordering: .releasing)
        wake.signal()
        if let t = thread { pthread_join(t, nil) }
        thread = nil
    }

    private func run() {
        var cursor: UInt64 = 0
        var recentCursor: UInt64 = 0
        let log = handle.missLog
        while running.load(ordering: .acquiring) {
            guard case .events(let events, _) = log.events(after: cursor, limit: 256) else { return }
            if events.isEmpty {
                let w = log.poll(after: cursor, limit: 1) { [wake] answer in
                    if case .events(let e, _) = answer, e.isEmpty { return }  // withdrawn below
                    wake.signal()
                }
                wake.wait(timeoutNanos: 50_000_000)
                w.finish(.events([], lastSeq: cursor))  // withdraw if still parked
                continue
            }
            var entries: [IOTLBEntry] = []
            var missed = false
            for e in events {
                cursor = e.seq
                guard e.kind == .miss, let page = iommu.translate(e.iova),
                      let entry = page.iotlbEntry(clippedTo: table, around: e.iova) else { continue }
                missed = true
                if !entries.contains(entry) { entries.append(entry) }
            }
            if !missed { continue }
            // With the missed pages, the guest's other recent mappings: the buffers
            // posted in the same batch would miss one after another otherwise.
            let (recent, next) = iommu.recentMappings(since: recentCursor, limit: 256)
            recentCursor = next
            for page in recent {
                if let e = page.iotlbEntry(clippedTo: table, around: page.iova.first), !entries.contains(e) { entries.append(e) }
            }
            let batch = entries
            let iommu = self.iommu, table = self.table
            // Applied on the device's worker, each entry checked against the guest
            // IOMMU there: a page the guest unmapped meanwhile is not installed, so
            // no entry outlives the guest's invalidation (which the worker orders).
            let applied = handle.performSync { d -> Int in
                let live = batch.filter { e in
                    iommu.translate(e.range.first)?.iotlbEntry(clippedTo: table, around: e.range.first) == e
                }
                return (try? d?.updateIOTLB(live))?.applied ?? 0
            }
            answered.add(UInt64(applied), ordering: .relaxed)
        }
    }
}
