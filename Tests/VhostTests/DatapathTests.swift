import Guest
import IOTLB
import Testing
import Platform
@testable import Vhost

@Suite struct DatapathTests {
    // Guest-physical layout used below: rings at 0x10000 (RX) / 0x20000 (TX),
    // TX buffers from 0x100000, RX buffers from 0x200000, indirect tables at 0x300000.

    /// One TX frame in two descriptors (12-byte header, payload) into one RX buffer.
    func loopOne(_ g: FakeGuest, payload: Int = 100, seed: UInt8 = 1) -> [UInt8] {
        let header = FakeGuest.pattern(12, seed: seed)
        let body = FakeGuest.pattern(payload, seed: seed &+ 1)
        g.write(0x100000, header)
        g.write(0x100800, body)
        g.tx.setDescriptor(0, addr: g.dma(0x100000), len: 12, flags: 1, next: 1)
        g.tx.setDescriptor(1, addr: g.dma(0x100800), len: UInt32(payload))
        g.rx.setDescriptor(0, addr: g.dma(0x200000), len: 2048, flags: 2)
        g.rx.offer(0)
        g.tx.offer(0)
        return header + body
    }

    @Test(arguments: [true, false])
    func chainsLoopBackByteExact(iotlb: Bool) throws {
        let g = try FakeGuest(iotlb: iotlb)
        if iotlb { try g.map(0, FakeGuest.memSize) }
        try g.setVring(0, g.rx)
        try g.setVring(1, g.tx)
        let sent = loopOne(g)
        let used = try #require(g.waitUsed(g.rx))
        #expect(used == UsedElement(id: 0, len: UInt32(sent.count)))
        #expect(g.read(0x200000, sent.count) == sent)
        #expect(g.waitUsed(g.tx) == UsedElement(id: 0, len: 0))
        #expect(g.vring(1).chains == 1 && g.vring(0).bytes == UInt64(sent.count))
        if iotlb { #expect(g.stats().hits > 0 && g.stats().misses == 0) }
    }

    @Test(arguments: [true, false])
    func indirectChainsBothWays(iotlb: Bool) throws {
        let g = try FakeGuest(iotlb: iotlb)
        if iotlb { try g.map(0, FakeGuest.memSize) }
        try g.setVring(0, g.rx)
        try g.setVring(1, g.tx)
        // TX: an indirect table of three readable pieces.
        let pieces = [FakeGuest.pattern(12, seed: 7), FakeGuest.pattern(300, seed: 8), FakeGuest.pattern(1, seed: 9)]
        let table = g.memory.at(GuestPhysAddr(0x300000), 48)
        for (i, p) in pieces.enumerated() {
            let gpa = 0x110000 + UInt64(i) * 0x1000
            g.write(gpa, p)
            SplitRingDriver.write(descriptorAt: table + 16 * i, addr: g.dma(gpa), len: UInt32(p.count),
                                  flags: i < 2 ? 1 : 0, next: UInt16(i + 1))
        }
        g.tx.setDescriptor(3, addr: g.dma(0x300000), len: 48, flags: 4)
        // RX: an indirect table of two writable buffers of 100 and 400 bytes.
        let rxTable = g.memory.at(GuestPhysAddr(0x301000), 32)
        SplitRingDriver.write(descriptorAt: rxTable, addr: g.dma(0x210000), len: 100, flags: 3, next: 1)
        SplitRingDriver.write(descriptorAt: rxTable + 16, addr: g.dma(0x220000), len: 400, flags: 2, next: 0)
        g.rx.setDescriptor(5, addr: g.dma(0x301000), len: 32, flags: 4)
        g.rx.offer(5)
        g.tx.offer(3)
        let sent = pieces.flatMap { $0 }
        #expect(try #require(g.waitUsed(g.rx)) == UsedElement(id: 5, len: UInt32(sent.count)))
        #expect(g.read(0x210000, 100) + g.read(0x220000, sent.count - 100) == sent)
        #expect(g.waitUsed(g.tx)?.id == 3)
    }

    @Test func ringsSpanningSeveralMappings() throws {
        // The TX descriptor table is mapped by two entries whose user addresses are not adjacent
        // (the second half is backed elsewhere), so the ring is accessed in segments.
        let g = try FakeGuest()
        try g.map(0x100000, 0x400000)
        try g.map(0x10000, 0x8000)  // RX rings
        let l = g.tx.layout
        // Desc table 256 bytes at 0x20000: map its first 128 bytes at their own place and the
        // second 128 from a copy at 0x700000, which the guest keeps in sync.
        let e1 = IOTLBEntry(range: AddressRange(start: IOVA(l.descGPA.raw + FakeGuest.iovaOffset), size: 128)!,
                            uaddr: UserAddr(FakeGuest.uaddrBase + l.descGPA.raw), perm: .read)
        let e2 = IOTLBEntry(range: AddressRange(start: IOVA(l.descGPA.raw + 128 + FakeGuest.iovaOffset), size: 128)!,
                            uaddr: UserAddr(FakeGuest.uaddrBase + 0x700000), perm: .read)
        _ = try g.handle.performSync { d -> Result<UpdateReport, EngineError> in
            do throws(EngineError) { return .success(try d!.updateIOTLB([e1, e2])) } catch { return .failure(error) }
        }.get()
        try g.map(l.availGPA.raw, 0x2000)
        try g.setVring(0, g.rx)
        try g.setVring(1, g.tx)
        let payload = FakeGuest.pattern(64, seed: 3)
        g.write(0x100000, payload)
        // Descriptor 12 lives in the second half: write it where the device will read it.
        SplitRingDriver.write(descriptorAt: g.memory.at(GuestPhysAddr(0x700000 + 16 * 4), 16), addr: g.dma(0x100000),
                              len: 64, flags: 0, next: 0)
        g.rx.setDescriptor(0, addr: g.dma(0x200000), len: 2048, flags: 2)
        g.rx.offer(0)
        g.tx.offer(12)
        #expect(try #require(g.waitUsed(g.rx)).len == 64)
        #expect(g.read(0x200000, 64) == payload)
        #expect(g.vring(1).state == .running)
    }

    @Test func unmappedRingsMissThenResume() throws {
        let g = try FakeGuest()
        try g.map(0x100000, 0x400000)  // buffers only
        try g.setVring(0, g.rx)
        try g.setVring(1, g.tx)
        // Prefetch at set time: both queues wait, each with one event at its desc table.
        for n in 0...1 {
            let v = g.vring(n)
            #expect(v.state == .waitingIOTLB)
            #expect(v.pending?.kind == .miss && v.pending?.perm == .read)
            #expect(v.pending?.iova.raw == g.ringAddr(n == 0 ? g.rx.layout.descGPA : g.tx.layout.descGPA))
        }
        #expect(g.handle.missLog.outstandingCount == 2)
        // Map RX's desc table only: RX moves on to miss at its avail ring; TX keeps waiting, no duplicate.
        let r = try g.map(0x10000, 0x1000)
        #expect(r.resolvedMisses == 1)
        #expect(g.waitFor("rx to miss at avail") { $0.queues[0].pending?.iova.raw == g.ringAddr(g.rx.layout.availGPA) })
        #expect(g.handle.missLog.outstandingCount == 2)
        // Map everything left: both run, traffic flows.
        try g.map(0x10000, 0x20000)
        #expect(g.waitFor("both running") { $0.queues[0].state == .running && $0.queues[1].state == .running })
        let sent = loopOne(g)
        #expect(try #require(g.waitUsed(g.rx)).len == UInt32(sent.count))
        #expect(g.read(0x200000, sent.count) == sent)
        let s = g.stats()
        #expect(s.misses >= 3 && s.pendingMisses == 0)
        let times = g.handle.performSync { $0!.resolutionTimes() }
        #expect(times.count >= 3 && times.samples.count == Int(times.count))
        // The reader sorts the samples it was given, off the worker.
        let (p50, p99) = times.percentiles()
        #expect(p50 <= p99 && p99 <= times.max)
        #expect(ResolutionTimes(samples: [9, 1, 5, 3, 7], count: 5, max: 9).percentiles() == (5, 9))
        #expect(ResolutionTimes(samples: [], count: 0, max: 0).percentiles() == (0, 0))
    }

    @Test func oneQueueWaitsWhileAnotherRuns() throws {
        // Four queues: pair (0,1) fully mapped, pair (2,3) with TX buffers unmapped.
        let g = try FakeGuest()
        let handle = try g.engine.createDevice(DeviceConfig(id: "four", queues: 4, port: .loopback, translator: .external))
        let region = MemoryRegion(guestPhysAddr: GuestPhysAddr(0), memorySize: FakeGuest.memSize,
                                  userspaceAddr: UserAddr(FakeGuest.uaddrBase))
        let mem = GuestPhysicalMemory(handle.performSync { d in _ = try! d!.setMemTable([region]); return d!.memory! })
        let rings = [0x10000, 0x20000, 0x30000, 0x40000].map {
            SplitRingDriver(memory: mem, layout: .consecutive(num: 16, at: GuestPhysAddr(UInt64($0))))
        }
        let off = FakeGuest.iovaOffset
        let entries = [IOTLBEntry(range: AddressRange(start: IOVA(off), size: 0x100000)!, uaddr: UserAddr(FakeGuest.uaddrBase), perm: .readWrite),
                       IOTLBEntry(range: AddressRange(start: IOVA(off + 0x200000), size: 0x100000)!,
                                  uaddr: UserAddr(FakeGuest.uaddrBase + 0x200000), perm: .readWrite)]
        _ = handle.performSync { d in try! d!.updateIOTLB(entries) }
        for (n, ring) in rings.enumerated() {
            let l = ring.layout
            let c = VringConfig(num: 16, descAddr: l.descGPA.raw + off, availAddr: l.availGPA.raw + off, usedAddr: l.usedGPA.raw + off)
            _ = handle.performSync { d in try! d!.setVring(n, c) }
        }
        func send(_ txRing: SplitRingDriver, _ rxRing: SplitRingDriver, buffer: UInt64, rxBuffer: UInt64) {
            txRing.setDescriptor(0, addr: buffer + off, len: 64)
            rxRing.setDescriptor(0, addr: rxBuffer + off, len: 2048, flags: 2)
            rxRing.offer(0)
            txRing.offer(0)
        }
        send(rings[3], rings[2], buffer: 0x150000, rxBuffer: 0x210000)  // TX buffer at 0x150000: unmapped
        send(rings[1], rings[0], buffer: 0x050000, rxBuffer: 0x220000)
        let deadline = monotonicNanos() + 2_000_000_000
        var used: UsedElement?
        while used == nil && monotonicNanos() < deadline { used = rings[0].takeUsed() }
        #expect(used?.len == 64)
        let states = handle.performSync { d in d!.queues.map { $0.snapshot.state } }
        #expect(states == [.running, .running, .running, .waitingIOTLB])
        #expect(handle.performSync { $0!.queues[3].snapshot.pending?.iova.raw } == 0x150000 + off)
        // Resolve it: queue 3 resumes and delivers.
        let entry = IOTLBEntry(range: AddressRange(start: IOVA(off + 0x150000), size: 0x1000)!,
                               uaddr: UserAddr(FakeGuest.uaddrBase + 0x150000), perm: .read)
        #expect(handle.performSync { try! $0!.updateIOTLB([entry]).resolvedMisses } == 1)
        used = nil
        while used == nil && monotonicNanos() < deadline + 2_000_000_000 { used = rings[2].takeUsed() }
        #expect(used?.len == 64)
    }

    @Test func invalidationIsFinal() throws {
        // Safety: after an invalidation returns, a descriptor using the old translation misses;
        // the old memory is never read.
        let g = try FakeGuest()
        try g.map(0, 0x30000)  // rings
        try g.map(0x200000, 0x10000)  // RX buffers
        try g.setVring(0, g.rx)
        try g.setVring(1, g.tx)
        // IOVA of "frame" maps to old memory holding a secret.
        let frameIOVA = FakeGuest.iovaOffset + 0x100000
        let secret = [UInt8](repeating: 0x5A, count: 64)
        g.write(0x100000, secret)
        try g.map(0x100000, 0x1000, .read)
        // First frame goes through: the translation is warm (and cached).
        g.tx.setDescriptor(0, addr: frameIOVA, len: 64)
        g.rx.setDescriptor(0, addr: g.dma(0x200000), len: 2048, flags: 2)
        g.rx.offer(0)
        g.tx.offer(0)
        #expect(g.waitUsed(g.rx)?.len == 64)
        _ = g.waitUsed(g.tx)
        // Invalidate, then offer a second frame at the same IOVA.
        try g.unmap(0x100000, 1)
        g.rx.setDescriptor(1, addr: g.dma(0x201000), len: 2048, flags: 2)
        g.rx.offer(1)
        g.tx.offer(0)
        #expect(g.waitFor("tx to miss") { $0.queues[1].state == .waitingIOTLB })
        #expect(g.vring(1).pending?.iova.raw == frameIOVA)
        #expect(g.read(0x201000, 64) != secret)
        #expect(g.rx.takeUsed() == nil)
        // The same IOVA now maps to new memory: the frame carries the new bytes.
        let fresh = FakeGuest.pattern(64, seed: 42)
        g.write(0x180000, fresh)
        let e = IOTLBEntry(range: AddressRange(start: IOVA(frameIOVA), size: 0x1000)!,
                           uaddr: UserAddr(FakeGuest.uaddrBase + 0x180000), perm: .read)
        #expect(g.handle.performSync { try! $0!.updateIOTLB([e]).resolvedMisses } == 1)
        #expect(g.waitUsed(g.rx)?.len == 64)
        #expect(g.read(0x201000, 64) == fresh)
    }

    @Test func readOnlyUsedRingIsAnAccessFailure() throws {
        let g = try FakeGuest()
        let used = g.tx.layout.usedGPA.raw
        try g.map(0, used)
        try g.map(used, 0x1000, .read)  // TX's used ring read-only
        try g.map(used + 0x1000, FakeGuest.memSize - used - 0x1000)
        try g.setVring(0, g.rx)
        try g.setVring(1, g.tx)
        let v = g.vring(1)
        #expect(v.state == .failed)
        #expect(v.pending?.kind == .accessFail && v.pending?.perm == .write)
        #expect(g.vring(0).state == .running)
        #expect(g.stats().accessFailures == 1)
        let answer = g.handle.missLog.events(after: 0, limit: 10)
        guard case .events(let evs, _) = answer else { Issue.record("no events"); return }
        #expect(evs.map(\.kind) == [.accessFail])
        // Fix the mapping and set the vring again: it recovers, the event is gone.
        try g.map(g.tx.layout.usedGPA.raw, 0x1000, .readWrite)
        #expect(try g.setVring(1, g.tx).state == .running)
        #expect(g.handle.missLog.outstandingCount == 0)
        let sent = loopOne(g)
        #expect(g.waitUsed(g.rx)?.len == UInt32(sent.count))
    }

    @Test func writableRXThroughReadOnlyMappingNeverWrites() throws {
        let g = try FakeGuest()
        try g.map(0, 0x30000)
        try g.map(0x100000, 0x1000, .read)
        try g.map(0x200000, 0x1000, .read)  // RX buffer mapped read-only
        try g.setVring(0, g.rx)
        try g.setVring(1, g.tx)
        g.write(0x200000, [UInt8](repeating: 0xEE, count: 128))
        g.write(0x100000, FakeGuest.pattern(64, seed: 5))
        g.tx.setDescriptor(0, addr: g.dma(0x100000), len: 64)
        g.rx.setDescriptor(0, addr: g.dma(0x200000), len: 128, flags: 2)
        g.rx.offer(0)
        g.tx.offer(0)
        #expect(g.waitFor("rx to fail") { $0.queues[0].state == .failed })
        #expect(g.read(0x200000, 128) == [UInt8](repeating: 0xEE, count: 128))
        #expect(g.vring(0).pending?.kind == .accessFail)
    }

    @Test func malformedChainsFailTheQueueNotTheDaemon() throws {
        let g = try FakeGuest()
        try g.map(0, FakeGuest.memSize)
        try g.setVring(0, g.rx)
        try g.setVring(1, g.tx)
        // A loop: 0 → 1 → 0.
        g.tx.setDescriptor(0, addr: g.dma(0x100000), len: 8, flags: 1, next: 1)
        g.tx.setDescriptor(1, addr: g.dma(0x100000), len: 8, flags: 1, next: 0)
        g.rx.setDescriptor(0, addr: g.dma(0x200000), len: 2048, flags: 2)
        g.rx.offer(0)
        g.tx.offer(0)
        #expect(g.waitFor("tx to fail") { $0.queues[1].state == .failed })
        #expect(g.vring(1).failure?.contains("loops") == true)
        // Set again from where it stopped, with the chain fixed: it runs.
        g.tx.setDescriptor(1, addr: g.dma(0x100000), len: 8, flags: 0, next: 0)
        #expect(try g.setVring(1, g.tx).state == .running)
        #expect(g.waitUsed(g.rx)?.len == 16)
        // A head past the ring, a buffer wrapping 2^64, nested indirect: each fails, the daemon stays.
        for bad in 0..<3 {
            let txd = SplitRingDriver(memory: g.memory, layout: .consecutive(num: 16, at: GuestPhysAddr(0x40000 + UInt64(bad) * 0x10000)))
            switch bad {
            case 0: txd.stage(99); txd.publish()
            case 1:
                txd.setDescriptor(0, addr: UInt64.max - 4, len: 64)
                txd.offer(0)
            default:
                let t = g.memory.at(GuestPhysAddr(0x302000), 16)
                SplitRingDriver.write(descriptorAt: t, addr: g.dma(0x302000), len: 16, flags: 4, next: 0)
                txd.setDescriptor(0, addr: g.dma(0x302000), len: 16, flags: 4)
                txd.offer(0)
            }
            g.rx.setDescriptor(0, addr: g.dma(0x200000), len: 2048, flags: 2)
            g.rx.offer(0)
            try g.setVring(1, txd)
            #expect(g.waitFor("tx to fail (\(bad))") { $0.queues[1].state == .failed })
        }
        #expect(g.vring(0).state == .running)
    }

    @Test func eventIdxPublishesAvailEvent() throws {
        let g = try FakeGuest()
        try g.map(0, FakeGuest.memSize)
        try g.setVring(0, g.rx, eventIdx: true)
        try g.setVring(1, g.tx, eventIdx: true)
        g.tx.setUsedEvent(0)
        let sent = loopOne(g)
        #expect(g.waitUsed(g.rx)?.len == UInt32(sent.count))
        _ = g.waitUsed(g.tx)
        #expect(g.tx.availEvent == 1)
        #expect(g.vring(1).notifications == 1)
    }

    @Test func sinkConsumesFrames() throws {
        let g = try FakeGuest(port: .sink)
        try g.map(0, FakeGuest.memSize)
        try g.setVring(1, g.tx)
        for i in 0..<10 {
            g.tx.setDescriptor(i, addr: g.dma(0x100000 + UInt64(i) * 0x800), len: 1500)
            g.tx.offer(UInt16(i))
        }
        var got = 0
        while got < 10, g.waitUsed(g.tx) != nil { got += 1 }
        #expect(got == 10)
        #expect(g.vring(1).bytes == 15000)
    }

    @Test func memTableReplacementUnderTrafficDropsTranslations() throws {
        let g = try FakeGuest(iotlb: false)
        try g.setVring(0, g.rx)
        try g.setVring(1, g.tx)
        let sent = loopOne(g)
        #expect(g.waitUsed(g.rx)?.len == UInt32(sent.count))
        _ = g.waitUsed(g.tx)
        // New table at other user addresses: the old mapping is gone, rings must fault.
        let region = MemoryRegion(guestPhysAddr: GuestPhysAddr(0), memorySize: 1 << 20, userspaceAddr: UserAddr(0x1000_0000))
        _ = g.handle.performSync { d in try! d!.setMemTable([region]) }
        g.rx.offer(0)
        g.tx.offer(0)
        #expect(g.waitFor("rings to fail against the new table") { $0.queues[1].state == .failed })
    }
}
