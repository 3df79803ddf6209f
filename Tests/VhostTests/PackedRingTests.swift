import Glibc
import Guest
import IOTLB
import Testing
import Platform
import CRingAtomics
@testable import Vhost

/// A hand-laid packed ring's driver side (virtio 2.8), written from the spec
/// independently of the device's code: descriptors, wrap counters, used ones.
final class PackedDriver: @unchecked Sendable {
    static let next: UInt16 = 1, write: UInt16 = 2, indirect: UInt16 = 4
    static let avail: UInt16 = 1 << 7, used: UInt16 = 1 << 15
    let num: Int
    let desc: UnsafeMutableRawPointer
    let layout: (desc: GuestPhysAddr, driverEvent: GuestPhysAddr, deviceEvent: GuestPhysAddr)
    private var next = 0, wrap = true          // where the next buffer goes
    private var usedNext = 0, usedWrap = true  // where the next used one appears
    private var slotsOf: [UInt16: Int] = [:]   // a buffer's descriptors, by id
    private var inFlight: [UInt16] = []        // ids offered and not yet used, in ring order

    init(memory: GuestPhysicalMemory, at base: GuestPhysAddr, num: Int) {
        self.num = num
        let events = GuestPhysAddr((base.raw + UInt64(16 * num) + 4095) & ~4095)
        layout = (base, events, GuestPhysAddr(events.raw + 4))
        desc = memory.at(base, 16 * num)
        desc.initializeMemory(as: UInt8.self, repeating: 0, count: 16 * num)
        memory.at(events, 8).initializeMemory(as: UInt8.self, repeating: 0, count: 8)  // notifications enabled
    }

    /// Makes one buffer available: its descriptors (address, length, WRITE or
    /// INDIRECT flags) in consecutive slots, the head's flags stored last.
    func offer(_ descs: [(addr: UInt64, len: UInt32, flags: UInt16)], id: UInt16) {
        var slot = next, w = wrap
        var headFlags: UInt16 = 0
        for (k, d) in descs.enumerated() {
            let p = desc + 16 * slot
            p.storeBytes(of: d.addr.littleEndian, toByteOffset: 0, as: UInt64.self)
            p.storeBytes(of: d.len.littleEndian, toByteOffset: 8, as: UInt32.self)
            p.storeBytes(of: id.littleEndian, toByteOffset: 12, as: UInt16.self)
            let flags = d.flags | (k + 1 < descs.count ? PackedDriver.next : 0) | (w ? PackedDriver.avail : PackedDriver.used)
            if k == 0 { headFlags = flags } else { p.storeBytes(of: flags.littleEndian, toByteOffset: 14, as: UInt16.self) }
            slot += 1
            if slot == num { slot = 0; w.toggle() }
        }
        CRingAtomics_store_release_u16(desc + 16 * next + 14, headFlags.littleEndian)
        slotsOf[id] = descs.count
        inFlight.append(id)
        next = slot
        wrap = w
    }

    /// The next used buffer: its id, length and the flags the device wrote.
    func takeUsed() -> (id: UInt16, len: UInt32, flags: UInt16)? {
        let p = desc + 16 * usedNext
        let flags = UInt16(littleEndian: CRingAtomics_load_acquire_u16(p + 14))
        guard (flags & PackedDriver.avail != 0) == usedWrap, (flags & PackedDriver.used != 0) == usedWrap else { return nil }
        let id = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 12, as: UInt16.self))
        let len = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        usedNext += slotsOf[id] ?? 1
        if usedNext >= num { usedNext -= num; usedWrap.toggle() }
        if let k = inFlight.firstIndex(of: id) { inFlight.remove(at: k) }
        return (id, len, flags)
    }

    /// Under VIRTIO_F_IN_ORDER (2.8.9): the buffers the next used descriptor
    /// hands back, oldest first: every one in flight up to the one it names.
    /// Nil when none is used yet; a name no buffer in flight has is recorded.
    func takeUsedInOrder() -> [UInt16]? {
        let p = desc + 16 * usedNext
        let flags = UInt16(littleEndian: CRingAtomics_load_acquire_u16(p + 14))
        guard (flags & PackedDriver.avail != 0) == usedWrap, (flags & PackedDriver.used != 0) == usedWrap else { return nil }
        let id = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 12, as: UInt16.self))
        guard inFlight.contains(id) else {
            Issue.record("used descriptor at slot \(usedNext) names \(id), not a buffer in flight")
            return nil
        }
        var ids: [UInt16] = []
        while let first = inFlight.first {
            inFlight.removeFirst()
            ids.append(first)
            usedNext += slotsOf[first] ?? 1
            if usedNext >= num { usedNext -= num; usedWrap.toggle() }
            if first == id { break }
        }
        return ids
    }

    func waitUsed(timeout: Double = 2) -> (id: UInt16, len: UInt32, flags: UInt16)? {
        let deadline = monotonicNanos() + UInt64(timeout * 1e9)
        while monotonicNanos() < deadline {
            if let u = takeUsed() { return u }
            usleep(200)
        }
        return nil
    }
}

extension FakeGuest {
    @discardableResult
    func setPackedVring(_ n: Int, _ d: PackedDriver, base: UInt16? = nil, inOrder: Bool = false) throws -> VringSnapshot {
        let c = VringConfig(num: d.num, descAddr: ringAddr(d.layout.desc), availAddr: ringAddr(d.layout.driverEvent),
                            usedAddr: ringAddr(d.layout.deviceEvent), lastAvailIdx: base, packed: true, inOrder: inOrder)
        return try handle.performSync { dev -> Result<VringSnapshot, EngineError> in
            do throws(EngineError) { return .success(try dev!.setVring(n, c)) } catch { return .failure(error) }
        }.get()
    }
}

@Suite struct PackedRingTests {
    /// Rings of 5 (not a power of 2: packed rings allow it), so 12 frames wrap twice.
    func rings(_ g: FakeGuest) -> (rx: PackedDriver, tx: PackedDriver) {
        (PackedDriver(memory: g.memory, at: GuestPhysAddr(0x40000), num: 5),
         PackedDriver(memory: g.memory, at: GuestPhysAddr(0x50000), num: 5))
    }

    @Test("packed rings loop frames back byte-exact across wrap-arounds, chains of two, used flags and ids right",
          arguments: [true, false])
    func loopbackAcrossWraps(iotlb: Bool) throws {
        let g = try FakeGuest(iotlb: iotlb)
        if iotlb { try g.map(0, FakeGuest.memSize) }
        let (rx, tx) = rings(g)
        try g.setPackedVring(0, rx)
        try g.setPackedVring(1, tx)
        for k in 0..<12 {
            let header = FakeGuest.pattern(12, seed: UInt8(k)), body = FakeGuest.pattern(60 + k, seed: UInt8(k + 100))
            let txBuf = UInt64(0x100000 + 0x1000 * (k % 3)), rxBuf = UInt64(0x200000 + 0x1000 * (k % 3))
            g.write(txBuf, header)
            g.write(txBuf + 0x800, body)
            rx.offer([(g.dma(rxBuf), 2048, PackedDriver.write)], id: UInt16(40 + k))
            tx.offer([(g.dma(txBuf), 12, 0), (g.dma(txBuf + 0x800), UInt32(body.count), 0)], id: UInt16(k))
            let r = try #require(rx.waitUsed(), "frame \(k)")
            #expect(r.id == UInt16(40 + k) && r.len == UInt32(12 + body.count))
            #expect(g.read(rxBuf, 12 + body.count) == header + body)
            let t = try #require(tx.waitUsed())
            #expect(t.id == UInt16(k) && t.len == 0)
        }
        #expect(g.vring(1).chains == 12 && g.vring(0).chains == 12)
        // TX: 24 slots in a ring of 5, position 4 after 4 wraps; RX: 12 slots,
        // position 2 after 2 wraps: both wrap counters back at 1 (bit 15).
        #expect(g.vring(1).lastAvailIdx == 4 | 0x8000)
        #expect(g.vring(0).lastAvailIdx == 2 | 0x8000)
        if iotlb { #expect(g.stats().misses == 0) }
    }

    @Test("a packed ring's indirect table and a miss on a buffer: the queue waits, an update resumes it")
    func indirectAndMiss() throws {
        let g = try FakeGuest(iotlb: true)
        let (rx, tx) = rings(g)
        // Map the rings and the RX buffer, not the TX buffers yet.
        try g.map(0x40000, 0x20000)
        try g.map(0x200000, 0x1000)
        try g.map(0x300000, 0x1000)  // the indirect table
        try g.setPackedVring(0, rx)
        try g.setPackedVring(1, tx)
        let a = FakeGuest.pattern(20, seed: 7), b = FakeGuest.pattern(30, seed: 9)
        g.write(0x100000, a)
        g.write(0x110000, b)
        let table = g.memory.at(GuestPhysAddr(0x300000), 32)
        for (i, (addr, len)) in [(g.dma(0x100000), UInt32(20)), (g.dma(0x110000), UInt32(30))].enumerated() {
            PackedDescriptor(addr: addr, len: len, id: 0, flags: 0).encodeAllButFlags(to: table + 16 * i)
            (table + 16 * i + 14).storeBytes(of: UInt16(0), as: UInt16.self)
        }
        rx.offer([(g.dma(0x200000), 2048, PackedDriver.write)], id: 3)
        tx.offer([(g.dma(0x300000), 32, PackedDriver.indirect)], id: 8)
        #expect(g.waitFor("tx to miss") { $0.queues[1].state == .waitingIOTLB })
        #expect(g.vring(1).pending?.iova.raw == g.dma(0x100000))
        try g.map(0x100000, 0x20000)
        let r = try #require(rx.waitUsed())
        #expect(r.id == 3 && r.len == 50)
        #expect(g.read(0x200000, 50) == a + b)
        #expect(tx.waitUsed()?.id == 8)
    }

    @Test("a packed chain longer than its ring fails the queue, never the daemon")
    func endlessChainFails() throws {
        let g = try FakeGuest(iotlb: false)
        let (rx, tx) = rings(g)
        try g.setPackedVring(0, rx)
        try g.setPackedVring(1, tx)
        rx.offer([(0x200000, 2048, PackedDriver.write)], id: 1)
        // Every slot says NEXT, so the chain never ends.
        for i in 0..<5 {
            let p = tx.desc + 16 * i
            p.storeBytes(of: UInt64(0x100000).littleEndian, toByteOffset: 0, as: UInt64.self)
            p.storeBytes(of: UInt32(16).littleEndian, toByteOffset: 8, as: UInt32.self)
            p.storeBytes(of: (PackedDriver.next | PackedDriver.avail).littleEndian, toByteOffset: 14, as: UInt16.self)
        }
        #expect(g.waitFor("tx to fail") { $0.queues[1].state == .failed })
        #expect(g.vring(1).failure?.contains("longer than its ring") == true)
    }

    @Test("packed ring configuration is checked: position below num, alignment")
    func packedConfigChecked() {
        let ok = VringConfig(num: 5, descAddr: 0x1000, availAddr: 0x2000, usedAddr: 0x2004, packed: true)
        #expect(ok.problem() == nil)
        #expect(ok.descBytes == 80 && ok.availBytes == 4 && ok.usedBytes == 4)
        var bad = ok
        bad.lastAvailIdx = 5 | 0x8000
        #expect(bad.problem()?.field == "last_avail_idx")
        bad = ok
        bad.availAddr = 0x2002
        #expect(bad.problem()?.field == "avail_addr")
        bad = ok
        bad.packed = false
        #expect(bad.problem()?.field == "num")  // split rings need a power of 2
    }
}
