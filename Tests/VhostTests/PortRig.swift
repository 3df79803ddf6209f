import Glibc
import Guest
import IOTLB
import Ports
import Testing
@testable import Vhost

/// One device with a port, driven synchronously on the test's thread: rings
/// laid by hand, `poll()` called directly (no worker, no sleeps). A TAP port's
/// queue is one end of a SOCK_SEQPACKET pair, which carries one frame per read
/// and write as a TAP does; the test holds the other end (the host's side).
final class PortRig {
    static let uaddrBase: UInt64 = 0x7f00_0000_0000
    /// IOVAs are guest-physical + this (so an IOVA read as a GPA misses).
    static let iovaOffset: UInt64 = 0x40_0000_0000
    static let memSize: UInt64 = 16 << 20
    /// Where buffers go: RX from 1 MiB, TX from 4 MiB.
    static let rxBuffers: UInt64 = 1 << 20, txBuffers: UInt64 = 4 << 20

    let device: Device
    let memory: GuestPhysicalMemory
    let rx: SplitRingDriver
    let tx: SplitRingDriver
    /// The host's end of the TAP queue (-1 for other ports).
    let host: Int32
    let iotlb: Bool
    let num = 16
    private var nextDesc = (rx: 0, tx: 0)

    init(port: PortConfig = .tap(name: "rig0"), iotlb: Bool = false, net: NetSettings? = NetSettings(headerBytes: 12, mergeableRX: true),
         id: String = "rig") throws {
        self.iotlb = iotlb
        var tap: TapInterface?
        var hostEnd: Int32 = -1
        if case .tap = port {
            var fds: [Int32] = [0, 0]
            #expect(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 0, &fds) == 0)
            tap = TapInterface(adopting: [fds[0]], name: "rig0")
            hostEnd = fds[1]
            _ = fcntl(hostEnd, F_SETFL, fcntl(hostEnd, F_GETFL) | O_NONBLOCK)
        }
        host = hostEnd
        device = Device(config: DeviceConfig(id: id, queues: 2, iotlb: iotlb, port: port, translator: .external),
                        limits: EngineLimits(), missLog: MissLog(), tap: tap)
        let region = MemoryRegion(guestPhysAddr: GuestPhysAddr(0), memorySize: PortRig.memSize,
                                  userspaceAddr: UserAddr(PortRig.uaddrBase))
        _ = try device.setMemTable([region])
        memory = GuestPhysicalMemory(device.memory!)
        rx = SplitRingDriver(memory: memory, layout: .consecutive(num: num, at: GuestPhysAddr(0x10000)))
        tx = SplitRingDriver(memory: memory, layout: .consecutive(num: num, at: GuestPhysAddr(0x20000)))
        if let net { device.setNet(net) }
        if iotlb {
            // The rings (first 1 MiB) are mapped; buffers are mapped by each test.
            try map(0, 1 << 20)
        }
        for (n, d) in [(0, rx), (1, tx)] {
            let l = d.layout
            _ = try device.setVring(n, VringConfig(num: l.num, descAddr: ringAddr(l.descGPA), availAddr: ringAddr(l.availGPA),
                                                   usedAddr: ringAddr(l.usedGPA)))
        }
    }

    deinit { if host >= 0 { close(host) } }

    func ringAddr(_ gpa: GuestPhysAddr) -> UInt64 { iotlb ? gpa.raw + PortRig.iovaOffset : gpa.raw + PortRig.uaddrBase }
    func dma(_ gpa: UInt64) -> UInt64 { iotlb ? gpa + PortRig.iovaOffset : gpa }

    func map(_ gpa: UInt64, _ size: UInt64, _ perm: Permissions = .readWrite) throws {
        _ = try device.updateIOTLB([IOTLBEntry(range: AddressRange(start: IOVA(gpa + PortRig.iovaOffset), size: size)!,
                                               uaddr: UserAddr(PortRig.uaddrBase + gpa), perm: perm)])
    }

    /// Offers a TX chain whose buffers hold `bytes`, cut into pieces of `pieces` bytes.
    func send(_ bytes: [UInt8], pieces: Int = 1 << 30, at gpa: UInt64? = nil) {
        let base = gpa ?? PortRig.txBuffers + UInt64(nextDesc.tx % num) * 0x11000
        write(base, bytes)
        var cuts: [(UInt64, Int)] = []
        var at = 0
        while at < bytes.count {
            let n = min(pieces, bytes.count - at)
            cuts.append((base + UInt64(at), n))
            at += n
        }
        let head = nextDesc.tx % num
        for (k, c) in cuts.enumerated() {
            let i = (head + k) % num
            let more = k + 1 < cuts.count
            tx.setDescriptor(i, addr: dma(c.0), len: UInt32(c.1), flags: more ? Descriptor.next : 0,
                             next: UInt16((i + 1) % num))
        }
        nextDesc.tx += cuts.count
        tx.offer(UInt16(head))
    }

    /// Offers `count` RX buffers of `size` bytes each (one descriptor a chain); returns their GPAs by head.
    @discardableResult
    func offerRX(_ count: Int, size: UInt32) -> [UInt16: UInt64] {
        var out: [UInt16: UInt64] = [:]
        for _ in 0..<count {
            let i = nextDesc.rx % num
            let gpa = PortRig.rxBuffers + UInt64(i) * 0x11000
            rx.setDescriptor(i, addr: dma(gpa), len: size, flags: Descriptor.write)
            rx.offer(UInt16(i))
            out[UInt16(i)] = gpa
            nextDesc.rx += 1
        }
        return out
    }

    /// Polls until nothing more happens (at most `rounds`).
    func run(rounds: Int = 8) {
        for _ in 0..<rounds where !device.poll() { break }
    }

    /// A frame the host side reads from the TAP, or nil.
    func hostRead() -> [UInt8]? {
        var buf = [UInt8](repeating: 0, count: 70_000)
        let n = buf.withUnsafeMutableBytes { Glibc.read(host, $0.baseAddress, $0.count) }
        return n > 0 ? Array(buf[0..<n]) : nil
    }

    /// Writes one frame into the TAP from the host side.
    func hostWrite(_ frame: [UInt8]) {
        let n = frame.withUnsafeBytes { Glibc.write(host, $0.baseAddress, $0.count) }
        #expect(n == frame.count)
    }

    func write(_ gpa: UInt64, _ bytes: [UInt8]) {
        memory.at(GuestPhysAddr(gpa), bytes.count).copyMemory(from: bytes, byteCount: bytes.count)
    }

    func read(_ gpa: UInt64, _ count: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: memory.at(GuestPhysAddr(gpa), count), count: count))
    }

    var counters: PortCounters { device.portSnapshot().total }

    func drops(_ r: PortDropReason) -> UInt64 { counters.drops[r.rawValue] }

    /// A virtio-net header (12 bytes) with these fields, then an Ethernet frame of `length` bytes.
    static func frame(_ length: Int, seed: UInt8 = 1, flags: UInt8 = 0, gso: UInt8 = 0, hdrLen: UInt16 = 0,
                      gsoSize: UInt16 = 0, csumStart: UInt16 = 0, csumOffset: UInt16 = 0) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: 12)
        h[0] = flags; h[1] = gso
        func put(_ at: Int, _ v: UInt16) { h[at] = UInt8(v & 0xff); h[at + 1] = UInt8(v >> 8) }
        put(2, hdrLen); put(4, gsoSize); put(6, csumStart); put(8, csumOffset)
        return h + (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }
    }
}
