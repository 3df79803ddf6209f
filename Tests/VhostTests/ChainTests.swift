import Guest
import IOTLB
import Testing
@testable import Vhost

/// What a walk gave: its buffers (address, length, writable), and the error
/// that stopped it, if one did.
struct Walked {
    var buffers: [(addr: UInt64, len: UInt32, writable: Bool)] = []
    var error: ChainError?

    var malformed: String? { if case .malformed(let why) = error { why } else { nil } }
    var fault: AccessFault? { if case .fault(let f) = error { f } else { nil } }
    var lengths: [UInt32] { buffers.map(\.len) }
}

extension PortRig {
    /// A device with a sink port and split rings laid by hand, for walking chains
    /// on the test's thread: no worker, no polling, no sleeps.
    static func sink(iotlb: Bool = false) throws -> PortRig {
        let rig = try PortRig(port: .sink, iotlb: iotlb, net: nil, id: "walk")
        if iotlb { try rig.map(1 << 20, PortRig.memSize - (1 << 20)) }
        return rig
    }

    var txQueue: VirtQueue { device.queues[1] }

    /// Walks the TX split chain from `head` with the device's own spaces.
    func walkSplit(head: UInt16) -> Walked {
        #expect(device.prepareRings(txQueue))
        return iotlb ? walk(DescriptorChain<ThroughIOTLB>(head: head, num: num))
                     : walk(DescriptorChain<ThroughMemoryTable>(head: head, num: num))
    }

    func walk<W: ChainWalk>(_ chain: W) -> Walked {
        var w = chain, out = Walked()
        while true {
            switch w.next(device, txQueue) {
            case .end: return out
            case .error(let e): out.error = e; return out
            case .buffer(let a, let l, let writable): out.buffers.append((a.raw, l, writable))
            }
        }
    }

    /// Writes a split descriptor table of `entries` at guest-physical `gpa` (an indirect table).
    func table(at gpa: UInt64, _ entries: [(addr: UInt64, len: UInt32, flags: UInt16, next: UInt16)]) {
        let p = memory.at(GuestPhysAddr(gpa), 16 * entries.count)
        for (i, e) in entries.enumerated() {
            SplitRingDriver.write(descriptorAt: p + 16 * i, addr: e.addr, len: e.len, flags: e.flags, next: e.next)
        }
    }
}

/// The split-ring chain walker and the rules it shares with the packed one,
/// on hand-laid rings (Firecracker's queue.rs tests, in Swift).
@Suite("Descriptor chains, walked synchronously on hand-laid rings")
struct ChainTests {
    static let n = Descriptor.next, w = Descriptor.write, ind = Descriptor.indirect

    @Test("a direct chain gives its buffers in order, then the end", arguments: [false, true])
    func directChain(iotlb: Bool) throws {
        let r = try PortRig.sink(iotlb: iotlb)
        r.tx.setDescriptor(3, addr: r.dma(0x100000), len: 12, flags: Self.n, next: 7)
        r.tx.setDescriptor(7, addr: r.dma(0x100100), len: 100, flags: Self.n, next: 1)
        r.tx.setDescriptor(1, addr: r.dma(0x100200), len: 64, flags: Self.w)
        let walked = r.walkSplit(head: 3)
        #expect(walked.error == nil)
        #expect(walked.buffers.map(\.addr) == [r.dma(0x100000), r.dma(0x100100), r.dma(0x100200)])
        #expect(walked.lengths == [12, 100, 64])
        #expect(walked.buffers.map(\.writable) == [false, false, true])
    }

    @Test("a chain that loops ends on its ttl")
    func loopEnds() throws {
        let r = try PortRig.sink()
        r.tx.setDescriptor(0, addr: 0x100000, len: 1, flags: Self.n, next: 1)
        r.tx.setDescriptor(1, addr: 0x100000, len: 1, flags: Self.n, next: 0)
        let walked = r.walkSplit(head: 0)
        #expect(walked.buffers.count == r.num)
        #expect(walked.malformed == "descriptor chain from head 0 loops or is longer than its table")
    }

    @Test("a next index past the ring, a readable buffer after a writable one, a buffer past 2^64-1")
    func ringRules() throws {
        let r = try PortRig.sink()
        r.tx.setDescriptor(0, addr: 0x100000, len: 8, flags: Self.n, next: 20)
        #expect(r.walkSplit(head: 0).malformed == "descriptor index 20 is past the ring of 16")
        r.tx.setDescriptor(2, addr: 0x100000, len: 8, flags: Self.w | Self.n, next: 3)
        r.tx.setDescriptor(3, addr: 0x100100, len: 8)
        let mixed = r.walkSplit(head: 2)
        #expect(mixed.buffers.count == 1)
        #expect(mixed.malformed == "device-readable descriptor after a device-writable one")
        r.tx.setDescriptor(4, addr: .max - 3, len: 5)
        #expect(r.walkSplit(head: 4).malformed == "buffer at 0xfffffffffffffffc of 5 bytes wraps past 2^64-1")
        r.tx.setDescriptor(5, addr: .max - 3, len: 4)
        #expect(r.walkSplit(head: 5).lengths == [4])  // ends at 2^64-1 exactly: allowed
    }

    @Test("an indirect table gives its entries; its own rules hold", arguments: [false, true])
    func indirect(iotlb: Bool) throws {
        let r = try PortRig.sink(iotlb: iotlb)
        r.table(at: 0x300000, [(r.dma(0x100000), 10, Self.n, 2), (r.dma(0x100100), 20, Self.w, 0),
                               (r.dma(0x100200), 30, Self.n | Self.w, 1)])
        r.tx.setDescriptor(0, addr: r.dma(0x300000), len: 48, flags: Self.ind)
        let walked = r.walkSplit(head: 0)
        #expect(walked.error == nil)
        #expect(walked.lengths == [10, 30, 20] && walked.buffers.map(\.writable) == [false, true, true])

        r.tx.setDescriptor(1, addr: r.dma(0x300000), len: 48, flags: Self.ind | Self.n, next: 2)
        #expect(r.walkSplit(head: 1).malformed == "indirect descriptor with the NEXT flag")
        r.tx.setDescriptor(2, addr: r.dma(0x300000), len: 40, flags: Self.ind)
        #expect(r.walkSplit(head: 2).malformed == "indirect table length 40 is not a positive multiple of 16")
        r.table(at: 0x301000, [(r.dma(0x300000), 48, Self.ind, 0)])
        r.tx.setDescriptor(3, addr: r.dma(0x301000), len: 16, flags: Self.ind)
        #expect(r.walkSplit(head: 3).malformed == "nested indirect descriptor table")
        r.table(at: 0x302000, [(r.dma(0x100000), 10, Self.n, 5), (r.dma(0x100000), 10, 0, 0)])
        r.tx.setDescriptor(4, addr: r.dma(0x302000), len: 32, flags: Self.ind)
        let past = r.walkSplit(head: 4)
        #expect(past.lengths == [10] && past.malformed == "indirect descriptor 5 is past its table of 2")
    }

    @Test("an indirect table that cannot be read is a fault naming its own space")
    func indirectFaults() throws {
        let off = try PortRig.sink()
        off.tx.setDescriptor(0, addr: 0x4000_0000, len: 16, flags: Self.ind)
        #expect(off.walkSplit(head: 0).fault == .notInMemoryTable(.guestPhys(GuestPhysAddr(0x4000_0000))))

        let on = try PortRig(port: .sink, iotlb: true, net: nil)  // only the rings mapped
        on.tx.setDescriptor(0, addr: on.dma(0x300000), len: 16, flags: Self.ind)
        #expect(on.walkSplit(head: 0).fault == .miss(iova: IOVA(on.dma(0x300000)), perm: .read))
    }

    @Test("ChainRules alone: indirect table sizes and ends, buffers and the writable order")
    func rules() {
        #expect(ChainRules.indirectTableProblem(addr: 0x1000, len: 16) == nil)
        #expect(ChainRules.indirectTableProblem(addr: .max - 15, len: 16) == nil)
        for len: UInt32 in [0, 8, 17] {
            guard case .malformed(let why) = ChainRules.indirectTableProblem(addr: 0x1000, len: len) else {
                Issue.record("length \(len) accepted"); continue
            }
            #expect(why == "indirect table length \(len) is not a positive multiple of 16")
        }
        guard case .malformed(let why) = ChainRules.indirectTableProblem(addr: .max - 14, len: 16) else {
            Issue.record("a table past 2^64-1 accepted"); return
        }
        #expect(why == "indirect table at 0xfffffffffffffff1 of 16 bytes wraps past 2^64-1")

        var sawWritable = false
        let steps: [ChainStep<GuestPhysAddr>] = [
            ChainRules.buffer(addr: 0x1000, len: 0, writable: false, sawWritable: &sawWritable),
            ChainRules.buffer(addr: 0x2000, len: 8, writable: true, sawWritable: &sawWritable),
            ChainRules.buffer(addr: 0x3000, len: 8, writable: true, sawWritable: &sawWritable),
            ChainRules.buffer(addr: 0x4000, len: 8, writable: false, sawWritable: &sawWritable),
        ]
        let kinds = steps.map { step -> String in
            switch step {
            case .buffer(let a, let l, let w): "\(a) \(l) \(w)"
            case .end: "end"
            case .error(.malformed(let why)): why
            case .error(.fault(let f)): "\(f)"
            }
        }
        #expect(kinds == ["0x1000 0 false", "0x2000 8 true", "0x3000 8 true",
                          "device-readable descriptor after a device-writable one"])
    }
}

extension ChainError: Equatable {
    public static func == (a: ChainError, b: ChainError) -> Bool {
        switch (a, b) {
        case (.fault(let x), .fault(let y)): x == y
        case (.malformed(let x), .malformed(let y)): x == y
        default: false
        }
    }
}
