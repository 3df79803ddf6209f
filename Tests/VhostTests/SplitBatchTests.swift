import Guest
import IOTLB
import Testing
@testable import Vhost

/// The split loopback's four-at-a-time path (`copySplitBatch`) against the
/// hand-laid driver: the same frames, lengths, ids and order as one by one,
/// and whatever is not plain left to the one-by-one path with its checks.
@Suite struct SplitBatchTests {
    /// Frame `k`'s TX and RX buffers.
    static func txBuffer(_ k: Int) -> UInt64 { 0x100000 + 0x800 * UInt64(k) }
    static func rxBuffer(_ k: Int) -> UInt64 { 0x200000 + 0x800 * UInt64(k) }

    /// Waits for `count` used elements on `driver`, in order.
    func used(_ g: FakeGuest, _ driver: SplitRingDriver, _ count: Int) throws -> [UsedElement] {
        try (0..<count).map { k in try #require(g.waitUsed(driver), "used element \(k) of \(count)") }
    }

    @Test("four at a time: byte-exact, used elements in ring order, across the avail ring's wraps",
          arguments: [true, false])
    func batchedLoopback(iotlb: Bool) throws {
        let g = try FakeGuest(iotlb: iotlb)
        if iotlb { try g.map(0, FakeGuest.memSize) }
        try g.setVring(0, g.rx)
        try g.setVring(1, g.tx)
        let perRound = 12, rounds = 6
        for round in 0..<rounds {
            let bodies = (0..<perRound).map { FakeGuest.pattern(40 + (round * 5 + $0) % 30, seed: UInt8(round * 16 + $0)) }
            // Heads rotate through the table, so they are not the avail slots' numbers.
            let heads = (0..<perRound).map { UInt16((round * perRound + $0 * 3) % g.num) }
            for (k, b) in bodies.enumerated() {
                g.write(Self.txBuffer(k), b)
                g.rx.setDescriptor(Int(heads[k]), addr: g.dma(Self.rxBuffer(k)), len: 2048, flags: Descriptor.write)
                g.tx.setDescriptor(Int(heads[k]), addr: g.dma(Self.txBuffer(k)), len: UInt32(b.count))
                g.rx.stage(heads[k])
                g.tx.stage(heads[k])
            }
            g.rx.publish()
            g.tx.publish()
            for (k, u) in try used(g, g.rx, perRound).enumerated() {
                #expect(u.id == heads[k] && u.len == UInt32(bodies[k].count), "round \(round), frame \(k)")
                #expect(g.read(Self.rxBuffer(k), bodies[k].count) == bodies[k], "round \(round), frame \(k)")
            }
            #expect(try used(g, g.tx, perRound).map(\.id) == heads)
        }
        let frames = perRound * rounds
        #expect(g.vring(1).chains == UInt64(frames) && g.vring(0).chains == UInt64(frames))
        let batched = g.handle.performSync { $0!.batchedFrames }
        #expect(batched >= UInt64(frames / 2) && batched % 4 == 0, "batched \(batched) of \(frames)")
        if iotlb { #expect(g.stats().misses == 0) }
    }

    @Test("a chain of two and a short RX buffer inside a run of four go one by one, as before")
    func unplainBuffersFallBack() throws {
        let g = try FakeGuest(iotlb: true)
        try g.map(0, FakeGuest.memSize)
        try g.setVring(0, g.rx)
        try g.setVring(1, g.tx)
        let bodies = (0..<8).map { FakeGuest.pattern(50 + $0, seed: UInt8(10 + $0)) }
        for (k, b) in bodies.enumerated() {
            g.write(Self.txBuffer(k), b)
            // Frame 5 does not fit its RX buffer: cut, as one by one.
            g.rx.setDescriptor(k, addr: g.dma(Self.rxBuffer(k)), len: k == 5 ? 20 : 2048, flags: Descriptor.write)
            if k == 2 {  // a chain of two, through descriptor 12
                g.tx.setDescriptor(k, addr: g.dma(Self.txBuffer(k)), len: 12, flags: Descriptor.next, next: 12)
                g.tx.setDescriptor(12, addr: g.dma(Self.txBuffer(k) + 12), len: UInt32(b.count - 12))
            } else {
                g.tx.setDescriptor(k, addr: g.dma(Self.txBuffer(k)), len: UInt32(b.count))
            }
            g.rx.stage(UInt16(k))
            g.tx.stage(UInt16(k))
        }
        g.rx.publish()
        g.tx.publish()
        for (k, u) in try used(g, g.rx, 8).enumerated() {
            let len = k == 5 ? 20 : bodies[k].count
            #expect(u.id == UInt16(k) && u.len == UInt32(len), "frame \(k)")
            #expect(g.read(Self.rxBuffer(k), len) == Array(bodies[k].prefix(len)), "frame \(k)")
        }
        #expect(try used(g, g.tx, 8).map(\.id) == (0..<8).map { UInt16($0) })
        #expect(g.handle.performSync { $0!.truncatedFrames } == 1)
    }

    @Test("a miss inside a run of four: the frames before it go, the queue waits at it, an update resumes it")
    func missInsideARun() throws {
        let g = try FakeGuest(iotlb: true)
        try g.map(0x10000, 0x20000)   // the rings
        try g.map(0x100000, 0x10000)  // TX buffers but frame 3's
        try g.map(0x200000, 0x10000)  // RX buffers
        try g.setVring(0, g.rx)
        try g.setVring(1, g.tx)
        func txBuffer(_ k: Int) -> UInt64 { k == 3 ? 0x180000 : Self.txBuffer(k) }  // 3: unmapped
        let bodies = (0..<8).map { FakeGuest.pattern(60, seed: UInt8(30 + $0)) }
        for (k, b) in bodies.enumerated() {
            g.write(txBuffer(k), b)
            g.rx.setDescriptor(k, addr: g.dma(Self.rxBuffer(k)), len: 2048, flags: Descriptor.write)
            g.tx.setDescriptor(k, addr: g.dma(txBuffer(k)), len: 60)
            g.rx.stage(UInt16(k))
            g.tx.stage(UInt16(k))
        }
        g.rx.publish()
        g.tx.publish()
        #expect(g.waitFor("tx to miss") { $0.queues[1].state == .waitingIOTLB })
        #expect(g.vring(1).pending?.iova.raw == g.dma(0x180000))
        #expect(g.vring(0).chains == 3, "frames 0-2 went; none past the miss")
        try g.map(0x180000, 0x1000)
        for (k, u) in try used(g, g.rx, 8).enumerated() {
            #expect(u.id == UInt16(k) && u.len == 60)
            #expect(g.read(Self.rxBuffer(k), 60) == bodies[k], "frame \(k)")
        }
        #expect(try used(g, g.tx, 8).map(\.id) == (0..<8).map { UInt16($0) })
    }

    @Test("a bad head inside a run of four fails the queue after the frames before it, saying why",
          arguments: ["device-writable descriptor in TX chain 2", "descriptor index 40 is past the ring of 16"])
    func badHeadInsideARunFails(why: String) throws {
        let g = try FakeGuest(iotlb: false)
        try g.setVring(0, g.rx)
        try g.setVring(1, g.tx)
        let writable = why.hasPrefix("device-writable")
        for k in 0..<8 {
            g.rx.setDescriptor(k, addr: Self.rxBuffer(k), len: 2048, flags: Descriptor.write)
            g.tx.setDescriptor(k, addr: Self.txBuffer(k), len: 60, flags: k == 2 && writable ? Descriptor.write : 0)
            g.rx.stage(UInt16(k))
            g.tx.stage(k == 2 && !writable ? 40 : UInt16(k))
        }
        g.rx.publish()
        g.tx.publish()
        #expect(g.waitFor("tx to fail") { $0.queues[1].state == .failed })
        #expect(g.vring(1).failure?.contains(why) == true, "\(String(describing: g.vring(1).failure))")
        #expect(g.vring(0).chains == 2)
        #expect(g.rx.takeUsed()?.id == 0 && g.rx.takeUsed()?.id == 1 && g.rx.takeUsed() == nil)
    }
}
