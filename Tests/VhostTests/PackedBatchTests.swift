import Glibc
import Guest
import IOTLB
import Platform
import Ports
import Testing
@testable import Vhost

/// The packed loopback's four-at-a-time path (`copyPackedBatch`) against the
/// hand-laid driver: the same frames, lengths, ids and order as one by one,
/// and whatever is not plain (a chain, a short RX buffer, a miss, a bad flag)
/// left to the one-by-one path with its checks.
@Suite struct PackedBatchTests {
    /// Rings of 13: runs of four meet the ring's end at every offset, so
    /// frames near it go one by one and the batches resume after the wrap.
    func rings(_ g: FakeGuest) -> (rx: PackedDriver, tx: PackedDriver) {
        (PackedDriver(memory: g.memory, at: GuestPhysAddr(0x40000), num: 13),
         PackedDriver(memory: g.memory, at: GuestPhysAddr(0x50000), num: 13))
    }

    /// A guest with all its memory mapped and both rings set, TX in order.
    func mappedInOrder() throws -> (FakeGuest, rx: PackedDriver, tx: PackedDriver) {
        let g = try FakeGuest(iotlb: true)
        try g.map(0, FakeGuest.memSize)
        let (rx, tx) = rings(g)
        try g.setPackedVring(0, rx)
        try g.setPackedVring(1, tx, inOrder: true)
        return (g, rx, tx)
    }

    /// Runs `offers` on the device's worker, so the datapath finds every
    /// buffer it makes available at once, as after a driver's burst.
    func atOnce(_ g: FakeGuest, _ offers: @escaping @Sendable () -> Void) {
        _ = g.handle.performSync { _ in offers(); return 0 }
    }

    /// The TX buffers handed back, oldest first, and how many used descriptors said so.
    func txBack(_ tx: PackedDriver, count: Int, inOrder: Bool) throws -> (ids: [UInt16], descriptors: Int) {
        var ids: [UInt16] = [], descriptors = 0
        let deadline = monotonicNanos() + 2_000_000_000
        while ids.count < count && monotonicNanos() < deadline {
            if inOrder, let run = tx.takeUsedInOrder() { ids += run; descriptors += 1 }
            if !inOrder, let u = tx.takeUsed() { ids.append(u.id); descriptors += 1 }
        }
        try #require(ids.count == count, "TX buffers back: \(ids)")
        return (ids, descriptors)
    }

    @Test("four at a time: byte-exact, RX used in ring order, across wraps; in order, TX goes back in runs",
          arguments: [(true, true), (true, false), (false, true), (false, false)])
    func batchedLoopback(iotlb: Bool, inOrder: Bool) throws {
        let g = try FakeGuest(iotlb: iotlb)
        if iotlb { try g.map(0, FakeGuest.memSize) }
        let (rx, tx) = rings(g)
        try g.setPackedVring(0, rx)
        try g.setPackedVring(1, tx, inOrder: inOrder)
        let perRound = 12, rounds = 6
        var txDescriptors = 0
        for round in 0..<rounds {
            let bodies = (0..<perRound).map { FakeGuest.pattern(40 + (round * 7 + $0) % 30, seed: UInt8(round * 16 + $0)) }
            for (k, b) in bodies.enumerated() { g.write(0x100000 + 0x800 * UInt64(k), b) }
            atOnce(g) {
                for (k, b) in bodies.enumerated() {
                    rx.offer([(g.dma(0x200000 + 0x800 * UInt64(k)), 2048, PackedDriver.write)], id: UInt16(100 + k))
                    tx.offer([(g.dma(0x100000 + 0x800 * UInt64(k)), UInt32(b.count), 0)], id: UInt16(k))
                }
            }
            for (k, b) in bodies.enumerated() {
                let r = try #require(rx.waitUsed(), "round \(round), frame \(k)")
                #expect(r.id == UInt16(100 + k) && r.len == UInt32(b.count), "round \(round), frame \(k)")
                #expect(g.read(0x200000 + 0x800 * UInt64(k), b.count) == b, "round \(round), frame \(k)")
            }
            let back = try txBack(tx, count: perRound, inOrder: inOrder)
            #expect(back.ids == (0..<perRound).map { UInt16($0) })
            txDescriptors += back.descriptors
        }
        let frames = perRound * rounds
        #expect(g.vring(1).chains == UInt64(frames) && g.vring(0).chains == UInt64(frames))
        let batched = g.handle.performSync { $0!.batchedFrames }
        #expect(batched >= UInt64(frames / 2) && batched % 4 == 0, "batched \(batched) of \(frames)")
        // In order, one used descriptor hands back a whole run; else one each.
        if inOrder { #expect(txDescriptors <= rounds * 2) } else { #expect(txDescriptors == frames) }
        if iotlb { #expect(g.stats().misses == 0) }
    }

    @Test("12-byte headers: the RX buffer ends as the TX frame with num_buffers 1, whatever it held before",
          arguments: [Permissions.readWrite, .write])
    func rxHeaderAsSent(rxPerm: Permissions) throws {
        let g = try FakeGuest(iotlb: true)
        try g.map(0, 0x200000)
        try g.map(0x200000, 0x10000, rxPerm)  // RX buffers: write-only as a Linux guest maps them, or not
        g.handle.performSync { $0!.setNet(NetSettings(headerBytes: 12, mergeableRX: true)) }
        let (rx, tx) = rings(g)
        try g.setPackedVring(0, rx)
        try g.setPackedVring(1, tx, inOrder: true)
        let zero = [UInt8](repeating: 0, count: 10)
        for round in 0..<3 {
            var expected: [[UInt8]] = []
            for k in 0..<12 {
                // TX headers: all zero (DPDK's, num_buffers left 0 or 1), or with flags and checksum fields.
                var header = k % 3 == 2 ? [1, 0, 0, 0, 0, 0, 34, 0, 16, 0] : zero
                header += [UInt8(k % 2), 0]
                let body = header + FakeGuest.pattern(52 + k, seed: UInt8(round * 16 + k))
                g.write(0x100000 + 0x800 * UInt64(k), body)
                // What the RX buffer held: the header it would get (left alone then), its
                // first ten bytes with num_buffers 0, another header, or garbage.
                var before = Array(body.prefix(10)) + [1, 0]
                switch k % 4 {
                case 1: before[10] = 0
                case 2: before[6] = 99
                case 3: before = FakeGuest.pattern(12, seed: 0xa5)
                default: break
                }
                g.write(0x200000 + 0x800 * UInt64(k), before + FakeGuest.pattern(80, seed: 0x5a))
                expected.append(Array(body.prefix(10)) + [1, 0] + body.dropFirst(12))
            }
            let lengths = expected.map { UInt32($0.count) }
            atOnce(g) {
                for k in 0..<12 {
                    rx.offer([(g.dma(0x200000 + 0x800 * UInt64(k)), 2048, PackedDriver.write)], id: UInt16(100 + k))
                    tx.offer([(g.dma(0x100000 + 0x800 * UInt64(k)), lengths[k], 0)], id: UInt16(k))
                }
            }
            for k in 0..<12 {
                let r = try #require(rx.waitUsed(), "round \(round), frame \(k)")
                #expect(r.id == UInt16(100 + k) && r.len == UInt32(expected[k].count), "round \(round), frame \(k)")
                #expect(g.read(0x200000 + 0x800 * UInt64(k), expected[k].count) == expected[k], "round \(round), frame \(k)")
            }
            _ = try txBack(tx, count: 12, inOrder: true)
        }
        #expect(g.handle.performSync { $0!.batchedFrames } >= 16, "the header rule is the batches'")
    }

    @Test("event suppression: a driver that asks hears of every burst once the worker has nothing left; one that declines does not")
    func notificationsAfterEachBurst() throws {
        let (g, rx, tx) = try mappedInOrder()
        func burst(_ frames: Int, seed: Int) throws {
            let bodies = (0..<frames).map { FakeGuest.pattern(60 + $0, seed: UInt8(seed + $0)) }
            for (k, b) in bodies.enumerated() { g.write(0x100000 + 0x800 * UInt64(k), b) }
            let lengths = bodies.map { UInt32($0.count) }
            atOnce(g) {
                for k in 0..<frames {
                    rx.offer([(g.dma(0x200000 + 0x800 * UInt64(k)), 2048, PackedDriver.write)], id: UInt16(k))
                    tx.offer([(g.dma(0x100000 + 0x800 * UInt64(k)), lengths[k], 0)], id: UInt16(k))
                }
            }
            for k in 0..<frames { _ = try #require(rx.waitUsed(), "frame \(k) of \(frames)") }
            _ = try txBack(tx, count: frames, inOrder: true)
        }
        // Bursts shorter and longer than the frames between two checks while busy.
        for (round, frames) in [1, 5, 12, 3, 12, 12].enumerated() {
            let before = (g.vring(0).notifications, g.vring(1).notifications)
            try burst(frames, seed: round * 16)
            #expect(g.waitFor("notifications after a burst of \(frames)") { d in
                let (r, t) = ((try? d.vring(0).notifications) ?? 0, (try? d.vring(1).notifications) ?? 0)
                return r > before.0 && t > before.1
            })
        }
        // Both drivers decline (driver event flags: disable): nothing more, however long.
        for ring in [rx, tx] { g.write(ring.layout.driverEvent.raw + 2, [1, 0]) }
        let declined = (g.vring(0).notifications, g.vring(1).notifications)
        for round in 0..<3 { try burst(12, seed: 100 + round) }
        usleep(20_000)
        #expect(g.vring(0).notifications == declined.0 && g.vring(1).notifications == declined.1)
    }

    @Test("a chain of two and a short RX buffer inside a run of four go one by one, as before")
    func unplainBuffersFallBack() throws {
        let (g, rx, tx) = try mappedInOrder()
        // Warm both queues' translations, so the batches below are refused for
        // their buffers only.
        g.write(0x100000, FakeGuest.pattern(50, seed: 1))
        rx.offer([(g.dma(0x200000), 2048, PackedDriver.write)], id: 99)
        tx.offer([(g.dma(0x100000), 50, 0)], id: 99)
        _ = try #require(rx.waitUsed())
        _ = try txBack(tx, count: 1, inOrder: true)

        let bodies = (0..<8).map { FakeGuest.pattern(50 + $0, seed: UInt8(10 + $0)) }
        for (k, b) in bodies.enumerated() { g.write(0x100000 + 0x800 * UInt64(k), b) }
        atOnce(g) {
            for (k, b) in bodies.enumerated() {
                let rxLen: UInt32 = k == 5 ? 20 : 2048  // frame 5 does not fit: cut, as one by one
                rx.offer([(g.dma(0x200000 + 0x800 * UInt64(k)), rxLen, PackedDriver.write)], id: UInt16(100 + k))
                let at = g.dma(0x100000 + 0x800 * UInt64(k))
                if k == 2 {
                    tx.offer([(at, 12, 0), (at + 12, UInt32(b.count - 12), 0)], id: UInt16(k))  // a chain of two
                } else {
                    tx.offer([(at, UInt32(b.count), 0)], id: UInt16(k))
                }
            }
        }
        for (k, b) in bodies.enumerated() {
            let r = try #require(rx.waitUsed(), "frame \(k)")
            let len = k == 5 ? 20 : b.count
            #expect(r.id == UInt16(100 + k) && r.len == UInt32(len), "frame \(k)")
            #expect(g.read(0x200000 + 0x800 * UInt64(k), len) == Array(b.prefix(len)), "frame \(k)")
        }
        #expect(try txBack(tx, count: 8, inOrder: true).ids == (0..<8).map { UInt16($0) })
        #expect(g.handle.performSync { $0!.truncatedFrames } == 1)
    }

    @Test("a miss inside a run of four: the frames before it go, the queue waits at it, an update resumes it")
    func missInsideARun() throws {
        let g = try FakeGuest(iotlb: true)
        try g.map(0x40000, 0x20000)   // the rings
        try g.map(0x100000, 0x10000)  // TX buffers 0, 1, 2 and 4 on
        try g.map(0x200000, 0x10000)  // RX buffers
        let (rx, tx) = rings(g)
        try g.setPackedVring(0, rx)
        try g.setPackedVring(1, tx)
        @Sendable func txBuffer(_ k: Int) -> UInt64 { k == 3 ? 0x180000 : 0x100000 + 0x800 * UInt64(k) }  // 3: unmapped
        let bodies = (0..<8).map { FakeGuest.pattern(60, seed: UInt8(30 + $0)) }
        for (k, b) in bodies.enumerated() { g.write(txBuffer(k), b) }
        atOnce(g) {
            for (k, b) in bodies.enumerated() {
                rx.offer([(g.dma(0x200000 + 0x800 * UInt64(k)), 2048, PackedDriver.write)], id: UInt16(100 + k))
                tx.offer([(g.dma(txBuffer(k)), UInt32(b.count), 0)], id: UInt16(k))
            }
        }
        #expect(g.waitFor("tx to miss") { $0.queues[1].state == .waitingIOTLB })
        #expect(g.vring(1).pending?.iova.raw == g.dma(0x180000))
        #expect(g.vring(0).chains == 3, "frames 0-2 went; none past the miss")
        try g.map(0x180000, 0x1000)
        for (k, b) in bodies.enumerated() {
            let r = try #require(rx.waitUsed(), "frame \(k)")
            #expect(r.id == UInt16(100 + k) && r.len == 60)
            #expect(g.read(0x200000 + 0x800 * UInt64(k), 60) == b, "frame \(k)")
        }
        #expect(try txBack(tx, count: 8, inOrder: false).ids == (0..<8).map { UInt16($0) })
    }

    @Test("a device-writable TX descriptor inside a run of four fails the queue after the frames before it")
    func writableTXInsideARunFails() throws {
        let g = try FakeGuest(iotlb: false)
        let (rx, tx) = rings(g)
        try g.setPackedVring(0, rx)
        try g.setPackedVring(1, tx)
        atOnce(g) {
            for k in 0..<8 {
                rx.offer([(0x200000 + 0x800 * UInt64(k), 2048, PackedDriver.write)], id: UInt16(100 + k))
                tx.offer([(0x100000 + 0x800 * UInt64(k), 60, k == 2 ? PackedDriver.write : 0)], id: UInt16(k))
            }
        }
        #expect(g.waitFor("tx to fail") { $0.queues[1].state == .failed })
        #expect(g.vring(1).failure?.contains("device-writable descriptor in TX chain") == true)
        #expect(g.vring(0).chains == 2)
        #expect(rx.takeUsed()?.id == 100 && rx.takeUsed()?.id == 101 && rx.takeUsed() == nil)
    }
}
