import Glibc
import IOTLB
import Ports
import Testing
@testable import Vhost

@Suite("Ports: TAP and peer, synchronous on hand-laid rings")
struct PortTests {
    @Test("TX: a chain in two pieces reaches the TAP byte for byte, header passed through")
    func txToTap() throws {
        let rig = try PortRig()
        let frame = PortRig.frame(60, seed: 3)
        rig.send(frame, pieces: 20)
        rig.run()
        #expect(rig.hostRead() == frame)
        #expect(rig.tx.takeUsed()?.len == 0)
        #expect(rig.counters.txFrames == 1 && rig.counters.txBytes == 60)
    }

    @Test("TX from a guest without a header: the TAP gets a zero header in front")
    func txWithoutHeader() throws {
        let rig = try PortRig(net: nil)
        let payload = Array(PortRig.frame(64, seed: 9).dropFirst(12))
        rig.send(payload)
        rig.run()
        #expect(rig.hostRead() == [UInt8](repeating: 0, count: 12) + payload)
    }

    @Test("TX: malformed virtio-net headers are dropped by reason, the chain handed back, nothing reaches the TAP")
    func malformedHeaders() throws {
        let rig = try PortRig(net: NetSettings(headerBytes: 12, mergeableRX: true, hostOffloads: [.checksum, .tso4]))
        rig.send(PortRig.frame(1000, flags: 1, gso: VirtioNetHeader.gsoTCPv4, hdrLen: 54, gsoSize: 0))  // gso_size 0
        rig.send(PortRig.frame(100, gso: VirtioNetHeader.gsoTCPv4, hdrLen: 400, gsoSize: 1448))         // hdr_len past the frame
        rig.send(PortRig.frame(100, flags: 1, csumStart: 90, csumOffset: 16))                            // checksum outside
        rig.send(PortRig.frame(100, gso: VirtioNetHeader.gsoTCPv6, hdrLen: 74, gsoSize: 1448))           // TSO6 not negotiated
        rig.send(PortRig.frame(100, gso: 7, gsoSize: 1448))                                              // unknown GSO type
        rig.send(PortRig.frame(8))                                                                       // runt
        rig.run()
        #expect(rig.hostRead() == nil)
        #expect(rig.drops(.gsoSize) == 2)
        #expect(rig.drops(.headerLength) == 1)
        #expect(rig.drops(.checksumOffset) == 1)
        #expect(rig.drops(.offloadNotNegotiated) == 1)
        #expect(rig.drops(.runt) == 1)
        for _ in 0..<6 { #expect(rig.tx.takeUsed() != nil) }
        // A well-formed TSO frame after them passes.
        let good = PortRig.frame(3000, flags: 1, gso: VirtioNetHeader.gsoTCPv4, hdrLen: 54, gsoSize: 1448, csumStart: 34, csumOffset: 16)
        rig.send(good)
        rig.run()
        #expect(rig.hostRead() == good)
        #expect(try rig.device.vring(1).state == .running)
    }

    @Test("TX back-pressure: a full TAP keeps the chain in its ring, then it goes out; nothing lost")
    func backPressure() throws {
        let rig = try PortRig()
        // Fill the host side's queue until the device's end refuses.
        var filled = 0
        let junk = PortRig.frame(1400)
        while (junk.withUnsafeBytes { Glibc.write(rig.device.port.tapFDs[0], $0.baseAddress, $0.count) }) > 0 { filled += 1 }
        #expect(errno == EAGAIN && filled > 0)
        let frame = PortRig.frame(200, seed: 5)
        rig.send(frame)
        rig.run()
        #expect(rig.tx.takeUsed() == nil)  // still the device's
        #expect(rig.counters.txBackPressure >= 1 && rig.counters.totalDrops == 0)
        for _ in 0..<filled { _ = rig.hostRead() }
        rig.run()
        #expect(rig.hostRead() == frame)
        #expect(rig.tx.takeUsed() != nil)
    }

    @Test("TX in bursts: a TAP that fills mid-burst keeps the rest in order; drained, they all go, byte for byte")
    func burstBackPressureKeepsOrder() throws {
        let rig = try PortRig()
        #expect(rig.device.port.burst?.batched == true, "io_uring refused: \(rig.device.port.burst?.fallback ?? "")")
        let junk = PortRig.frame(1400)
        var filled = 0
        while (junk.withUnsafeBytes { Glibc.write(rig.device.port.tapFDs[0], $0.baseAddress, $0.count) }) > 0 { filled += 1 }
        for _ in 0..<6 { _ = rig.hostRead() }  // room for a few frames only
        let frames = (0..<15).map { PortRig.frame(1388, seed: UInt8($0)) }
        for f in frames { rig.send(f) }
        rig.run(rounds: 1)
        var used = 0
        while rig.tx.takeUsed() != nil { used += 1 }
        #expect(used > 0 && used < 15, "\(used) chains handed back")
        #expect(rig.counters.txBackPressure >= 1 && rig.counters.totalDrops == 0)
        for _ in 0..<(filled - 6) { _ = rig.hostRead() }
        rig.run()
        var got: [[UInt8]] = []
        while let f = rig.hostRead() { got.append(f) }
        #expect(got == frames, "\(got.count) frames, in order: \(got.map { $0[12 + 6] })")
        while rig.tx.takeUsed() != nil { used += 1 }
        #expect(used == 15 && rig.counters.txFrames == 15)
    }

    @Test("TX: a frame of more pieces than a burst slot goes by itself, between bursts, in order")
    func manyPiecedFrame() throws {
        let rig = try PortRig(iotlb: true)
        // One descriptor over 80 IOTLB entries of 256 bytes: 80 pieces.
        for k in 0..<80 { try rig.map(PortRig.txBuffers + UInt64(k) * 256, 256, .read) }
        try rig.map(PortRig.txBuffers + 0x11000, 0x100000, .read)
        let big = PortRig.frame(80 * 256 - 12, seed: 4)
        let before = PortRig.frame(100, seed: 1), after = PortRig.frame(100, seed: 2)
        rig.send(big, at: PortRig.txBuffers)
        rig.send(before, at: PortRig.txBuffers + 0x11000)
        rig.send(after, at: PortRig.txBuffers + 0x12000)
        rig.run()
        #expect(rig.hostRead() == big)
        #expect(rig.hostRead() == before)
        #expect(rig.hostRead() == after)
        #expect(rig.counters.txFrames == 3 && rig.counters.totalDrops == 0)
    }

    @Test("RX: a 3000-byte frame spans three 1024-byte buffers with MRG_RXBUF, num_buffers 3")
    func rxMergeable() throws {
        let rig = try PortRig()
        let at = rig.offerRX(4, size: 1024)
        let frame = PortRig.frame(3000, seed: 7)
        rig.hostWrite(frame)
        rig.run()
        var got: [UInt8] = []
        for _ in 0..<3 {
            let u = try #require(rig.rx.takeUsed())
            got += rig.read(at[u.id]!, Int(u.len))
        }
        #expect(rig.rx.takeUsed() == nil)
        #expect(got.count == 3012)
        #expect(got[10] == 3 && got[11] == 0)
        var expected = frame
        expected[10] = 3
        #expect(firstDifference(got, expected) == nil)
        #expect(rig.counters.rxFrames == 1 && rig.counters.rxBytes == 3000)
    }

    @Test("RX: a frame that needs more buffers than the guest offered takes none of them until enough are there")
    func rxMergeableWaitsWhole() throws {
        let rig = try PortRig()
        rig.offerRX(2, size: 1024)
        rig.hostWrite(PortRig.frame(3000, seed: 2))
        rig.run()
        #expect(rig.rx.takeUsed() == nil)
        #expect(rig.device.port.pendingLength[0] == 3012)
        rig.offerRX(2, size: 1024)
        rig.run()
        let ids = [rig.rx.takeUsed(), rig.rx.takeUsed(), rig.rx.takeUsed()].compactMap { $0?.id }
        #expect(ids == [0, 1, 2])
        #expect(rig.rx.takeUsed() == nil)
        #expect(rig.read(PortRig.rxBuffers + 10, 1) == [3])
    }

    @Test("RX without a guest buffer: the frame waits and the TAP is not read again until it moved")
    func rxWaitsForBuffers() throws {
        let rig = try PortRig()
        let first = PortRig.frame(100, seed: 1), second = PortRig.frame(100, seed: 2)
        rig.hostWrite(first)
        rig.hostWrite(second)
        rig.run()
        #expect(rig.device.port.pendingLength[0] == 112)
        // The second is still in the TAP: the host side's socket has it queued.
        var pending: Int32 = 0
        _ = ioctl(rig.device.port.tapFDs[0], UInt(FIONREAD), &pending)
        #expect(pending == 112)
        let at = rig.offerRX(1, size: 2048)
        rig.run()
        let u = try #require(rig.rx.takeUsed())
        #expect(Array(rig.read(at[u.id]!, Int(u.len)).dropFirst(12)) == Array(first.dropFirst(12)))
        let at2 = rig.offerRX(1, size: 2048)
        rig.run()
        let u2 = try #require(rig.rx.takeUsed())
        #expect(Array(rig.read(at2[u2.id]!, Int(u2.len)).dropFirst(12)) == Array(second.dropFirst(12)))
        #expect(rig.counters.totalDrops == 0)
    }

    @Test("RX through the IOTLB: a miss on the buffer stops the queue, the frame waits, the update delivers it")
    func rxMissWaits() throws {
        let rig = try PortRig(iotlb: true)
        let at = rig.offerRX(1, size: 2048)
        let frame = PortRig.frame(500, seed: 4)
        rig.hostWrite(frame)
        rig.run()
        let vq = try rig.device.vring(0)
        #expect(vq.state == .waitingIOTLB)
        #expect(vq.pending?.iova.raw == PortRig.rxBuffers + PortRig.iovaOffset)
        #expect(rig.device.port.pendingLength[0] == 512 && rig.counters.totalDrops == 0)
        try rig.map(PortRig.rxBuffers, 0x100000)
        rig.run()
        let u = try #require(rig.rx.takeUsed())
        #expect(Array(rig.read(at[u.id]!, Int(u.len)).dropFirst(12)) == Array(frame.dropFirst(12)))
        #expect(rig.counters.rxFrames == 1 && rig.counters.totalDrops == 0)
    }

    @Test("RX: a read-only mapping of the RX buffer fails the queue; nothing is written through it")
    func rxReadOnlyMapping() throws {
        let rig = try PortRig(iotlb: true)
        try rig.map(PortRig.rxBuffers, 0x100000, .read)
        let at = rig.offerRX(1, size: 2048)
        rig.write(at.values.first!, [UInt8](repeating: 0xee, count: 64))
        rig.hostWrite(PortRig.frame(100))
        rig.run()
        #expect(try rig.device.vring(0).state == .failed)
        #expect(rig.read(at.values.first!, 64) == [UInt8](repeating: 0xee, count: 64))
        #expect(rig.rx.takeUsed() == nil)
    }

    @Test("RX without MRG_RXBUF: a frame longer than the one buffer is dropped as oversize, the buffer kept")
    func rxOversize() throws {
        let rig = try PortRig(net: NetSettings(headerBytes: 12, mergeableRX: false))
        let at = rig.offerRX(2, size: 1526)
        rig.hostWrite(PortRig.frame(2000))
        rig.hostWrite(PortRig.frame(1500, seed: 8))
        rig.run()
        #expect(rig.drops(.oversize) == 1)
        let u = try #require(rig.rx.takeUsed())
        #expect(u.id == 0 && u.len == 1512)  // the first buffer took the second frame
        #expect(rig.read(at[0]!, 1512).dropFirst(12) == PortRig.frame(1500, seed: 8).dropFirst(12))
    }

    @Test("RX: an MTU set by the front-end drops longer non-GSO frames")
    func rxMTU() throws {
        let rig = try PortRig()
        rig.device.setMTU(1500)
        rig.offerRX(4, size: 4096)
        rig.hostWrite(PortRig.frame(3000))
        rig.hostWrite(PortRig.frame(1514))
        rig.run()
        #expect(rig.drops(.oversize) == 1 && rig.counters.rxFrames == 1)
    }

    @Test("Peer: TX of one device arrives at the other's RX; a peer without buffers drops at the wire, the sender goes on")
    func peers() throws {
        let a = try PortRig(port: .peer(device: "b"), id: "a")
        let b = try PortRig(port: .peer(device: "a"), id: "b")
        #expect(try a.device.vring(1).state == .running)
        let ab = FrameRing(capacity: 64 << 10, maxFrame: 16 << 10), ba = FrameRing(capacity: 64 << 10, maxFrame: 16 << 10)
        a.device.port.link(out: [ab], inbound: [ba], peerWorker: DatapathWorker(index: 9))
        b.device.port.link(out: [ba], inbound: [ab], peerWorker: DatapathWorker(index: 8))
        let frame = PortRig.frame(1000, seed: 6)
        a.send(frame)
        a.run()
        let at = b.offerRX(2, size: 2048)
        b.run()
        let u = try #require(b.rx.takeUsed())
        var expected = frame
        expected[10] = 1
        #expect(firstDifference(b.read(at[u.id]!, Int(u.len)), expected) == nil)
        // B offers nothing now: A's frames fill the wire and are dropped there; A's chains all come back.
        for k in 0..<100 {
            a.send(PortRig.frame(1000, seed: UInt8(k)))
            a.run()
        }
        var back = 0
        while a.tx.takeUsed() != nil { back += 1 }
        #expect(back == 101)
        #expect(a.drops(.peerFull) > 0)
        #expect(a.counters.txFrames + a.drops(.peerFull) == 101)
        a.device.port.unlink()
        a.send(frame)
        a.run()
        #expect(a.drops(.peerDown) == 1)
    }
}

/// Where two byte arrays first differ (index, or the shorter length), nil when equal: short messages for long frames.
func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> String? {
    if a == b { return nil }
    let i = zip(a, b).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? min(a.count, b.count)
    return "lengths \(a.count) and \(b.count); first difference at \(i)"
}
