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
            for e in events {
                cursor = e.seq
                guard e.kind == .miss, let page = iommu.translate(e.iova),
                      let entry = page.iotlbEntry(clippedTo: table, around: e.iova) else { continue }
                if !entries.contains(entry) { entries.append(entry) }
            }
            if entries.isEmpty { continue }
            let batch = entries
            let ok = handle.performSync { d -> Bool in (try? d?.updateIOTLB(batch)) != nil }
            if ok { answered.add(UInt64(batch.count), ordering: .relaxed) }
        }
    }
}
