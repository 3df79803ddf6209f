// The built-in guest's traffic loop: refill RX, send frames, reap and verify,
// map and unmap (dynamic) with the device IOTLB kept in step. Runs on the
// workload's thread only.
import Glibc
import Platform
import Synchronization
import IOTLB
import Vhost

/// The last ticket a command completed, published by the worker.
final class TicketCounter: Sendable {
    let value = Atomic<UInt64>(0)
}

/// The guest thread's own state: rings, slots, counters. Touched only by that thread.
final class GuestRun {
    // SAFETY: the run lives inside its workload's thread, which the workload
    // joins before it goes; unowned(unsafe): no reference counting on every
    // access from the loop.
    unowned(unsafe) let workload: Workload
    let config: WorkloadConfig
    let memory: GuestPhysicalMemory
    let table: MemoryTable
    let iotlb: Bool
    let iommu: GuestIOMMU?
    let rx: SplitRingDriver, tx: SplitRingDriver
    let rxBuffers: GuestPhysAddr, txBuffers: GuestPhysAddr
    let slot: Int

    /// The loop's own state.
    ///
    /// SAFETY: only the workload's thread touches a run. Behind a pointer the
    /// loop pays no run-time exclusivity check per access, as it would on a
    /// class's stored properties (a runtime call each, several per frame).
    /// The fields keep their names as properties below, in place (no copies).
    struct Mutable {
        var rxFree: [UInt16] = []
        var txFree: [UInt16] = []
        /// Dynamic mappings (strict): buffers unmapped since the last invalidation
        /// was sent, and those whose invalidation (ticket `awaited`) is in flight.
        /// A buffer is posted again only once its old IOVA has left the device
        /// IOTLB, as Linux's strict dma_unmap guarantees; the guest goes on with
        /// other buffers meanwhile instead of waiting for the round trip.
        var rxUnmapped: [UInt16] = [], txUnmapped: [UInt16] = []
        var rxQuarantined: [UInt16] = [], txQuarantined: [UInt16] = []
        var awaited: UInt64 = 0
        var tickets: UInt64 = 0
        var stats = WorkloadStats()
        var window: [(UInt64, UInt64)] = []  // (time, received) samples for the rate
    }
    private let m: UnsafeMutablePointer<Mutable> = {
        let p = UnsafeMutablePointer<Mutable>.allocate(capacity: 1)
        p.initialize(to: Mutable())
        return p
    }()
    var rxFree: [UInt16] { unsafeAddress { at(\.rxFree) } unsafeMutableAddress { mut(\.rxFree) } }
    var txFree: [UInt16] { unsafeAddress { at(\.txFree) } unsafeMutableAddress { mut(\.txFree) } }
    var rxUnmapped: [UInt16] { unsafeAddress { at(\.rxUnmapped) } unsafeMutableAddress { mut(\.rxUnmapped) } }
    var txUnmapped: [UInt16] { unsafeAddress { at(\.txUnmapped) } unsafeMutableAddress { mut(\.txUnmapped) } }
    var rxQuarantined: [UInt16] { unsafeAddress { at(\.rxQuarantined) } unsafeMutableAddress { mut(\.rxQuarantined) } }
    var txQuarantined: [UInt16] { unsafeAddress { at(\.txQuarantined) } unsafeMutableAddress { mut(\.txQuarantined) } }
    var stats: WorkloadStats { unsafeAddress { at(\.stats) } unsafeMutableAddress { mut(\.stats) } }
    var window: [(UInt64, UInt64)] { unsafeAddress { at(\.window) } unsafeMutableAddress { mut(\.window) } }
    @inline(__always) private func mut<T>(_ k: WritableKeyPath<Mutable, T>) -> UnsafeMutablePointer<T> { m.pointer(to: k)! }
    @inline(__always) private func at<T>(_ k: WritableKeyPath<Mutable, T>) -> UnsafePointer<T> { UnsafePointer(mut(k)) }
    var awaited: UInt64 { get { m.pointee.awaited } set { m.pointee.awaited = newValue } }
    var tickets: UInt64 { get { m.pointee.tickets } set { m.pointee.tickets = newValue } }
    /// The last ticket whose invalidation the device has applied (set on the worker).
    let invalidated = TicketCounter()
    /// Invalidations the device refused (counted on the worker).
    let invalidationsRefused = TicketCounter()
    /// Where invalidations go without a command (dynamic mappings through the IOTLB), nil otherwise.
    let mailbox: InvalidationMailbox?
    let startTime = monotonicNanos()

    init(workload: Workload, memory: GuestPhysicalMemory, table: MemoryTable, iotlb: Bool, iommu: GuestIOMMU?,
         rxRing: RingLayout, txRing: RingLayout, rxBuffers: GuestPhysAddr, txBuffers: GuestPhysAddr,
         mailbox: InvalidationMailbox? = nil) {
        self.workload = workload
        self.mailbox = mailbox
        self.config = workload.config
        self.memory = memory
        self.table = table
        self.iotlb = iotlb
        self.iommu = iommu
        self.rx = SplitRingDriver(memory: memory, layout: rxRing)
        self.tx = SplitRingDriver(memory: memory, layout: txRing)
        self.rxBuffers = rxBuffers
        self.txBuffers = txBuffers
        self.slot = config.slotBytes
        m.pointee.rxFree = Array((0..<config.ringSize).map { UInt16(truncatingIfNeeded: $0) }.reversed())
        m.pointee.txFree = m.pointee.rxFree
    }

    deinit {
        m.deinitialize(count: 1)
        m.deallocate()
    }

    /// What a descriptor names for guest-physical `gpa` under a static mapping.
    @inline(__always) func dma(_ gpa: GuestPhysAddr) -> DMAAddress {
        iotlb ? .iova(IOVA(gpa.raw + Workload.iovaBase)) : .guestPhys(gpa)
    }

    func rxGPA(_ i: UInt16) -> GuestPhysAddr { GuestPhysAddr(rxBuffers.raw + UInt64(i) * UInt64(slot)) }
    func txGPA(_ i: UInt16) -> GuestPhysAddr { GuestPhysAddr(txBuffers.raw + UInt64(i) * UInt64(slot)) }

    /// The IOVA a dynamic mapping gives buffer `i` (RX when `rx`) at guest-physical
    /// `gpa`: its own page-aligned window, the buffer at its page offset.
    func dynamicIOVA(rx: Bool, _ i: UInt16, _ gpa: GuestPhysAddr) -> IOVA {
        let page = config.pageSize.bytes
        let stride = (UInt64(slot) + page - 1) / page * page + page
        let window = UInt64((rx ? 0 : config.ringSize) + Int(i)) * stride
        return IOVA(Workload.dynamicIOVABase + window + gpa.raw % page)
    }

    // MARK: Commands to the device (the same path the HTTP API takes)

    private func update(_ entries: [IOTLBEntry]) throws(WorkloadError) {
        guard !entries.isEmpty else { return }
        // Commands run in order: an update follows every invalidation sent before.
        let r = workload.handle.performSync { d -> Result<UpdateReport, EngineError> in
            guard let d else { return .failure(.notFound("device gone")) }
            do throws(EngineError) { return .success(try d.updateIOTLB(entries)) } catch { return .failure(error) }
        }
        if case .failure(let e) = r { throw .engine(e) }
        stats.eagerUpdates &+= 1
    }

    /// Sends the invalidation of what the guest unmapped (a range that
    /// continues the one before it merged into it: buffers reaped in ring
    /// order) without waiting; `invalidated` reaches `ticket` once the device
    /// IOTLB has dropped them. The buffers stay out of use until then.
    /// `merged` is the caller's reused buffer. Not sorted first: the device
    /// drops the same pages in any order, and a sort cost the guest ~50 ns a
    /// frame.
    private func submitInvalidation(_ ranges: inout [AddressRange<IOVA>], merged: inout [AddressRange<IOVA>],
                                    ticket: UInt64) {
        merged.removeAll(keepingCapacity: true)
        for r in ranges {
            if let last = merged.last, last.last.raw != .max, last.last.raw + 1 == r.first.raw {
                merged[merged.count - 1] = AddressRange(first: last.first, last: max(last.last, r.last))
            } else {
                merged.append(r)
            }
        }
        ranges.removeAll(keepingCapacity: true)
        if !merged.isEmpty { stats.invalidations &+= 1 }
        // The mailbox costs the worker no command (no allocation, no reference counting).
        if let mailbox, merged.withUnsafeBufferPointer({ mailbox.post($0, ticket: ticket) }) { return }
        let invalidations = merged, invalidated = self.invalidated, refused = self.invalidationsRefused
        workload.handle.submit { d in
            if !invalidations.isEmpty, let d {
                do throws(EngineError) { _ = try d.invalidateIOTLB(invalidations) } catch {
                    refused.value.add(1, ordering: .relaxed)
                }
            }
            invalidated.value.store(ticket, ordering: .releasing)
        }
    }

    /// The last ticket whose invalidations the device applied (by command or through the mailbox).
    private var invalidatedTicket: UInt64 {
        max(invalidated.value.load(ordering: .acquiring), mailbox?.applied ?? 0)
    }

    /// Maps guest-physical [gpa, gpa+len) at its static IOVA in the guest
    /// IOMMU; with `eager`, pushes new pages to the device.
    private func map(_ gpa: GuestPhysAddr, _ len: Int, _ perm: Permissions, pushing: inout [IOTLBEntry]) {
        // A guest IOMMU exists only with the IOTLB on, where dma() gives IOVAs.
        guard let iommu, case .iova(let iova) = dma(gpa) else { return }
        appendEager(iommu.map(iova: iova, gpa: gpa, size: UInt64(len), perm: perm), to: &pushing)
    }

    /// With `eager`, the IOTLB entries of `fresh` pages, appended to `pushing`.
    private func appendEager(_ fresh: [GuestPageMapping], to pushing: inout [IOTLBEntry]) {
        guard config.eager else { return }
        for page in fresh {
            if let e = page.iotlbEntry(clippedTo: table, around: page.iova.first) { pushing.append(e) }
        }
    }

    func mapStatic() throws(WorkloadError) {
        guard iommu != nil else { return }
        var push: [IOTLBEntry] = []
        for ring in [rx.layout, tx.layout] {
            map(ring.descGPA, Int(ring.span), .readWrite, pushing: &push)
        }
        if config.mapping == .static {
            map(rxBuffers, config.ringSize * slot, .write, pushing: &push)
            map(txBuffers, config.ringSize * slot, .read, pushing: &push)
        }
        try update(push)
    }

    func setVrings() throws(WorkloadError) {
        for (n, ring) in [(0, rx.layout), (1, tx.layout)] {
            // The device sees rings at IOVAs with the IOTLB on, at user addresses without.
            let ringAddr: (GuestPhysAddr) -> UInt64 = { gpa in
                if self.iotlb { return gpa.raw + Workload.iovaBase }
                let hit = self.table.lookup(gpa: gpa)!
                return self.table.regions[hit.region].userspaceAddr.raw + hit.offset
            }
            let c = VringConfig(num: ring.num, descAddr: ringAddr(ring.descGPA), availAddr: ringAddr(ring.availGPA),
                                usedAddr: ringAddr(ring.usedGPA))
            let r = workload.handle.performSync { d -> Result<VringSnapshot, EngineError> in
                guard let d else { return .failure(.notFound("device gone")) }
                do throws(EngineError) { return .success(try d.setVring(n, c)) } catch { return .failure(error) }
            }
            if case .failure(let e) = r { throw .engine(e) }
        }
    }

    // MARK: Traffic

    func loop() {
        var idleSince: UInt64 = 0
        var lastPublish = monotonicNanos()
        var rounds = 0
        let limit = config.packets
        let dynamic = config.mapping == .dynamic && iommu != nil
        let frameBytes = UInt32(Frame.headerBytes + config.packetSize)
        // Host pointers of every buffer, resolved once: the guest's CPU view of its RAM.
        let rxHost = (0..<config.ringSize).map { memory.at(rxGPA(UInt16($0)), slot) }
        let txHost = (0..<config.ringSize).map { memory.at(txGPA(UInt16($0)), slot) }
        var push: [IOTLBEntry] = []
        var unmapped: [AddressRange<IOVA>] = [], merged: [AddressRange<IOVA>] = []
        // Dynamic: the buffers of one round, mapped and unmapped in one critical
        // section each (as a driver batches a refill), not one per buffer.
        var toUnmap: [(IOVA, UInt64)] = []
        var toMap: [GuestIOMMU.MapRequest] = []
        var fresh: [GuestPageMapping] = []
        push.reserveCapacity(config.ringSize)
        unmapped.reserveCapacity(2 * config.ringSize)
        merged.reserveCapacity(2 * config.ringSize)
        toUnmap.reserveCapacity(2 * config.ringSize)
        toMap.reserveCapacity(2 * config.ringSize)
        fresh.reserveCapacity(2 * config.ringSize)
        rxFree.reserveCapacity(config.ringSize)
        txFree.reserveCapacity(config.ringSize)
        var stopping = false
        while !stopping {
            var progress = false
            // Reap: TX buffers back, RX frames in (verified). Dynamic: unmap each;
            // pages no longer mapped leave the device IOTLB before any of them is
            // handed out again (below).
            while let u = tx.takeUsed() {
                if dynamic {
                    toUnmap.append((dynamicIOVA(rx: false, u.id, txGPA(u.id)), UInt64(slot)))
                    txUnmapped.append(u.id)
                } else {
                    txFree.append(u.id)
                }
                progress = true
            }
            while let u = rx.takeUsed() {
                if !Frame.verify(rxHost[Int(u.id)], length: Int(u.len), seq: stats.received, payload: config.packetSize) {
                    stats.verifyErrors &+= 1
                    if stats.error == nil {
                        stats.error = "frame \(stats.received): \(u.len) bytes did not match what was sent"
                    }
                }
                stats.received &+= 1
                if dynamic {
                    toUnmap.append((dynamicIOVA(rx: true, u.id, rxGPA(u.id)), UInt64(slot)))
                    rxUnmapped.append(u.id)
                } else {
                    rxFree.append(u.id)
                }
                progress = true
            }
            if !toUnmap.isEmpty {
                iommu!.unmap(toUnmap, gone: &unmapped)
                toUnmap.removeAll(keepingCapacity: true)
            }

            // Dynamic mappings: buffers whose invalidation has completed are free
            // again; what was unmapped since goes out in one invalidation, once a
            // quarter of a ring has gathered (a driver's interrupt coalescing: a
            // command per frame or two would bound the guest by the round trip)
            // or nothing is left in flight.
            let quarter = config.ringSize / 4
            if dynamic {
                if awaited != 0 && invalidatedTicket >= awaited {
                    rxFree += rxQuarantined; txFree += txQuarantined
                    rxQuarantined.removeAll(keepingCapacity: true); txQuarantined.removeAll(keepingCapacity: true)
                    awaited = 0
                    progress = true
                }
                let txInFlight = config.ringSize - txFree.count - txUnmapped.count - txQuarantined.count
                if awaited == 0 && !(rxUnmapped.isEmpty && txUnmapped.isEmpty)
                    && (rxUnmapped.count >= quarter || txUnmapped.count >= quarter || txInFlight == 0) {
                    tickets &+= 1
                    awaited = tickets
                    submitInvalidation(&unmapped, merged: &merged, ticket: awaited)
                    swap(&rxQuarantined, &rxUnmapped); swap(&txQuarantined, &txUnmapped)
                    progress = true
                }
            }
            let coalesce = dynamic && txFree.count < quarter && rxFree.count < quarter
                && txFree.count + txUnmapped.count + txQuarantined.count < config.ringSize
            if !coalesce {
                // Refill RX, then send while TX slots are free.
                push.removeAll(keepingCapacity: true)
                var rxPosted = false, txPosted = false
                while let i = rxFree.popLast() {
                    var addr = dma(rxGPA(i))
                    if dynamic {
                        let iova = dynamicIOVA(rx: true, i, rxGPA(i))
                        addr = .iova(iova)
                        toMap.append(.init(iova: iova, gpa: rxGPA(i), size: UInt64(slot), perm: .write))
                    }
                    rx.setDescriptor(Int(i), addr: addr, len: UInt32(slot), flags: 2)
                    rx.stage(i)
                    rxPosted = true
                }
                while limit == 0 || stats.sent < limit, let i = txFree.popLast() {
                    Frame.write(txHost[Int(i)], seq: stats.sent, payload: config.packetSize)
                    var addr = dma(txGPA(i))
                    if dynamic {
                        let iova = dynamicIOVA(rx: false, i, txGPA(i))
                        addr = .iova(iova)
                        toMap.append(.init(iova: iova, gpa: txGPA(i), size: UInt64(slot), perm: .read))
                    }
                    tx.setDescriptor(Int(i), addr: addr, len: frameBytes)
                    tx.stage(i)
                    stats.sent &+= 1
                    txPosted = true
                    // Static mappings: offer frames in small groups so the device starts
                    // while we write the rest (dynamic ones wait for their command below).
                    if !dynamic && stats.sent & 31 == 0 {
                        if rxPosted { rx.publish(); rxPosted = false }
                        tx.publish()
                        workload.handle.worker.kick()
                        progress = true
                    }
                }
                // Before anything is published: the buffers enter the guest IOMMU
                // and, eager, the device IOTLB.
                if dynamic && !toMap.isEmpty {
                    iommu!.map(toMap, fresh: &fresh)
                    appendEager(fresh, to: &push)
                    toMap.removeAll(keepingCapacity: true)
                    fresh.removeAll(keepingCapacity: true)
                    if !push.isEmpty {
                        // Refused: those pages miss instead and the translator answers them.
                        do throws(WorkloadError) { try update(push) } catch { stats.eagerUpdateFailures &+= 1 }
                    }
                }
                if rxPosted { rx.publish() }
                if txPosted { tx.publish() }
                if rxPosted || txPosted {
                    workload.handle.worker.kick()
                    progress = true
                }
            }
            if limit > 0 && stats.received >= limit { break }
            // The clock and the stop flag, every 64 rounds or when idle.
            rounds &+= 1
            if progress && rounds & 63 != 0 {
                idleSince = 0
                continue
            }
            stopping = workload.stopping
            let now = monotonicNanos()
            if now - lastPublish > 20_000_000 {
                publish(now: now)
                lastPublish = now
            }
            if progress {
                idleSince = 0
            } else if idleSince == 0 {
                idleSince = now
            } else if now - idleSince > 100_000 {
                // Spin first (the device answers within microseconds), then doze.
                usleep(now - idleSince > 100_000_000 ? 1000 : 20)
            }
        }
    }

    func publish(now: UInt64 = monotonicNanos(), final: Bool = false) {
        stats.invalidationFailures = invalidationsRefused.value.load(ordering: .relaxed) + (mailbox?.refused ?? 0)
        if stats.invalidationFailures > 0 && stats.error == nil {
            stats.error = "the device refused an invalidation: a buffer used again may still be mapped"
        }
        stats.elapsed = Double(now - startTime) / 1e9
        window.append((now, stats.received))
        while let first = window.first, now - first.0 > 1_000_000_000, window.count > 2 { window.removeFirst() }
        let (t0, r0) = final ? (startTime, 0) : window.first!
        let dt = Double(now - t0) / 1e9
        stats.pps = dt > 0 ? Double(stats.received - r0) / dt : 0
        stats.gbps = stats.pps * Double(config.packetSize) * 8 / 1e9
        workload.publish(stats)
    }
}
