import Guest
import IOTLB
import Testing
@testable import Vhost

/// The packed chain walker, and the translators (IOTLB, memory table by
/// guest-physical and by user address) with the faults they report, all on
/// the test's thread.
@Suite("Packed chains and translators, synchronous")
struct TranslatorTests {
    /// Lays a packed TX ring of `num` at guest-physical 0x40000 and sets it as vring 1.
    func packedTX(_ r: PortRig, num: Int = 4) throws -> PackedDriver {
        let d = PackedDriver(memory: r.memory, at: GuestPhysAddr(0x40000), num: num)
        _ = try r.device.setVring(1, VringConfig(num: num, descAddr: r.ringAddr(d.layout.desc),
                                                 availAddr: r.ringAddr(d.layout.driverEvent),
                                                 usedAddr: r.ringAddr(d.layout.deviceEvent), packed: true))
        #expect(r.device.prepareRings(r.txQueue))
        return d
    }

    func walkPacked(_ r: PortRig, start: Int, num: Int) -> (Walked, slots: Int, id: UInt16) {
        var chain = PackedChain<ThroughMemoryTable>(start: start, num: num)
        var out = Walked()
        loop: while true {
            switch chain.next(r.device, r.txQueue) {
            case .end: break loop
            case .error(let e): out.error = e; break loop
            case .buffer(let a, let l, let w): out.buffers.append((a.raw, l, w))
            }
        }
        return (out, chain.slots, chain.id)
    }

    @Test("a packed chain wraps around the ring and reports its slots and the last id")
    func packedChain() throws {
        let r = try PortRig.sink()
        let d = try packedTX(r)
        d.offer([(0x100000, 12, 0), (0x100100, 40, 0), (0x100180, 2, 0)], id: 9)   // slots 0, 1, 2
        let (first, slots1, id1) = walkPacked(r, start: 0, num: 4)
        #expect(first.error == nil && first.lengths == [12, 40, 2] && slots1 == 3 && id1 == 9)
        // The device has taken slots 0-2: the next buffer takes 3, then wraps to 0 and 1.
        d.offer([(0x100200, 8, 0), (0x100300, 16, 0), (0x100400, 4, PackedDriver.write)], id: 5)
        let (second, slots2, id2) = walkPacked(r, start: 3, num: 4)
        #expect(second.error == nil && second.lengths == [8, 16, 4] && slots2 == 3 && id2 == 5)
        #expect(second.buffers.map(\.writable) == [false, false, true])
    }

    @Test("packed chain rules: longer than the ring, indirect with NEXT, an indirect table's entries")
    func packedRules() throws {
        let r = try PortRig.sink()
        _ = try packedTX(r)
        // Every slot says NEXT: the walk stops after the ring's length.
        let p = r.memory.at(GuestPhysAddr(0x40000), 64)
        for i in 0..<4 {
            PackedDescriptor(addr: 0x100000, len: 1, id: 0, flags: Descriptor.next).encodeAllButFlags(to: p + 16 * i)
            (p + 16 * i).storeBytes(of: (Descriptor.next | PackedDriver.avail).littleEndian, toByteOffset: 14, as: UInt16.self)
        }
        let (endless, slots, _) = walkPacked(r, start: 0, num: 4)
        #expect(endless.malformed == "packed descriptor chain longer than its ring of 4" && slots == 4)

        let q = try PortRig.sink()
        let e = try packedTX(q)
        q.table(at: 0x300000, [(0x100000, 10, 0, 0), (0x100100, 20, Descriptor.write, 0)])
        e.offer([(0x300000, 32, PackedDriver.indirect)], id: 3)
        let (walked, s, id) = walkPacked(q, start: 0, num: 4)
        #expect(walked.error == nil && walked.lengths == [10, 20] && s == 1 && id == 3)
        e.offer([(0x300000, 32, PackedDriver.indirect), (0x100000, 4, 0)], id: 4)
        #expect(walkPacked(q, start: 1, num: 4).0.malformed == "indirect packed descriptor with NEXT, or a second one in a chain")
    }

    @Test("IOTLB on: a range over two entries whose user addresses are apart is two segments")
    func iovaSegments() throws {
        let r = try PortRig(port: .sink, iotlb: true, net: nil)
        let base = IOVA(0x9000_0000)
        // [base, base+0xfff] → GPA 0x100000, [base+0x1000, base+0x1fff] → GPA 0x180000.
        _ = try r.device.updateIOTLB([
            IOTLBEntry(range: AddressRange(start: base, size: 0x1000)!, uaddr: UserAddr(PortRig.uaddrBase + 0x100000), perm: .readWrite),
            IOTLBEntry(range: AddressRange(start: base.uncheckedAdd(0x1000), size: 0x1000)!,
                       uaddr: UserAddr(PortRig.uaddrBase + 0x180000), perm: .read),
        ])
        let vq = r.txQueue
        var cache = TranslationCache()
        var pieces: [(host: UnsafeMutableRawPointer, length: Int, gpa: UInt64, offset: Int)] = []
        let fault = r.device.walkSegments(base.uncheckedAdd(0xf00), 0x200, .read, &cache, vq) { s, off in
            pieces.append((s.host, s.length, s.gpa, off))
        }
        #expect(fault == nil)
        #expect(pieces.map(\.length) == [0x100, 0x100] && pieces.map(\.offset) == [0, 0x100])
        #expect(pieces.map(\.gpa) == [0x100f00, 0x180000])
        #expect(pieces[0].host == r.memory.at(GuestPhysAddr(0x100f00)) && pieces[1].host == r.memory.at(GuestPhysAddr(0x180000)))
        let whole = r.device.checkRange(base.uncheckedAdd(0xf00), 0x200, .read, vq)
        #expect(whole.fault == nil && whole.contiguous == nil && whole.gpa == nil)  // neither host nor GPA contiguous

        // A write needs the second entry's write permission; a miss names the first unmapped byte.
        #expect(r.device.checkRange(base.uncheckedAdd(0xf00), 0x200, .write, vq).fault
                == .denied(iova: base.uncheckedAdd(0x1000), perm: .write))
        #expect(r.device.checkRange(base.uncheckedAdd(0x1f00), 0x200, .read, vq).fault
                == .miss(iova: base.uncheckedAdd(0x2000), perm: .read))
    }

    @Test("IOTLB on: the translation cache answers the next access near the last and counts it as a hit")
    func cacheHits() throws {
        let r = try PortRig.sink(iotlb: true)
        let vq = r.txQueue
        var cache = TranslationCache()
        let before = r.device.counters.hits
        guard case .ok(let a) = r.device.segment(IOVA(r.dma(0x200000)), 64, .read, &cache, vq),
              case .ok(let b) = r.device.segment(IOVA(r.dma(0x200040)), 64, .read, &cache, vq) else {
            Issue.record("no translation"); return
        }
        #expect(b.host == a.host + 0x40 && b.gpa == 0x200040)
        #expect(r.device.counters.hits == before + 2)
        #expect(cache.first <= r.dma(0x200000) && cache.last >= r.dma(0x200080))
    }

    @Test("IOTLB off: guest-physical and user addresses through the memory table, across two regions")
    func memoryTableSpaces() throws {
        let r = try PortRig.sink()
        // A second table: GPAs adjacent, user addresses apart.
        let lo = MemoryRegion(guestPhysAddr: GuestPhysAddr(0), memorySize: 1 << 20, userspaceAddr: UserAddr(0x10_0000_0000))
        let hi = MemoryRegion(guestPhysAddr: GuestPhysAddr(1 << 20), memorySize: 1 << 20, userspaceAddr: UserAddr(0x20_0000_0000))
        _ = try r.device.setMemTable([lo, hi])
        let vq = r.txQueue
        var cache = TranslationCache()
        var lengths: [Int] = [], gpas: [UInt64] = []
        #expect(r.device.walkSegments(GuestPhysAddr((1 << 20) - 8), 16, .write, &cache, vq) { s, _ in
            lengths.append(s.length); gpas.append(s.gpa)
        } == nil)
        #expect(lengths == [8, 8] && gpas == [(1 << 20) - 8, 1 << 20])
        let user = r.device.checkRange(UserAddr(0x20_0000_0010), 32, .read, vq)
        #expect(user.fault == nil && user.gpa == (1 << 20) + 0x10 && user.contiguous != nil)
        #expect(r.device.checkRange(UserAddr(0x10_0000_0000 + (1 << 20) - 8), 16, .read, vq).fault
                == .notInMemoryTable(.user(UserAddr(0x10_0000_0000 + (1 << 20)))))
        #expect(r.device.checkRange(GuestPhysAddr(2 << 20), 1, .read, vq).fault
                == .notInMemoryTable(.guestPhys(GuestPhysAddr(2 << 20))))
    }

    @Test("every fault message names the address in its own space")
    func faultMessages() {
        #expect(AccessFault.notInMemoryTable(.guestPhys(GuestPhysAddr(0x4000_0000))).description
                == "guest-physical address 0x40000000 is not in the memory table")
        #expect(AccessFault.notInMemoryTable(.user(UserAddr(0x1000))).description
                == "user address 0x1000 is not in the memory table")
        #expect(AccessFault.unbacked(iova: IOVA(0x9000), uaddr: UserAddr(0x7000)).description
                == "IOVA 0x9000 maps to user address 0x7000, which is not in the memory table")
        #expect(AccessFault.wraps(start: .iova(IOVA(.max - 1)), length: 4).description
                == "4 bytes from IOVA 0xfffffffffffffffe pass 2^64-1")
        #expect(AccessFault.denied(iova: IOVA(0x2000), perm: .write).description
                == "access failure: wo access to iova 0x2000 denied by the IOTLB entry")
        #expect(AccessFault.miss(iova: IOVA(0x2000), perm: .read).description == "IOTLB miss: no entry holds IOVA 0x2000 (ro)")
    }

    @Test("a queue failed by each fault says so in its vring's failure", arguments: [0, 1, 2])
    func queueFailures(kind: Int) throws {
        let r = try PortRig(port: .sink, iotlb: kind == 2, net: nil)
        let want: String
        switch kind {
        case 0:  // IOTLB off, a buffer at a guest-physical address past the memory
            r.tx.setDescriptor(0, addr: 0x4000_0000, len: 64)
            r.tx.offer(0)
            want = "guest-physical address 0x40000000 is not in the memory table"
        case 1:  // IOTLB off, a ring at a user address the table does not hold
            _ = try r.device.setVring(1, VringConfig(num: 16, descAddr: 0x1000, availAddr: 0x2000, usedAddr: 0x3000))
            want = "user address 0x1000 is not in the memory table"
        default:  // IOTLB on, an entry pointing outside the memory (inserted past update's check)
            _ = r.device.iotlb.update(IOTLBEntry(range: AddressRange(start: IOVA(0x9000_0000), size: 0x1000)!,
                                                 uaddr: UserAddr(0x1000), perm: .read))
            r.tx.setDescriptor(0, addr: 0x9000_0000, len: 64)
            r.tx.offer(0)
            want = "IOVA 0x90000000 maps to user address 0x1000, which is not in the memory table"
        }
        r.run()
        let s = r.device.queues[1].snapshot
        #expect(s.state == .failed)
        #expect(s.failure == want)
    }
}
