// A device's port as its worker holds it: the TAP queues or the peer wires,
// the frames waiting for the guest, the scratch the datapath gathers into, and
// the counters. Everything the datapath touches per frame is preallocated here
// when the device is made; nothing is allocated, locked or counted per frame.
import Glibc
import Ports

/// The port of one device. Only the device's worker touches it.
final class DevicePort {
    let config: PortConfig
    /// The port's type, for the per-frame switch (no payload to copy).
    let kind: PortKind
    /// Queue pairs of the device (TAP queues, peer wires out, pending frames).
    let pairs: Int
    /// The TAP interface, for a TAP port (opened before the device was made).
    let tap: TapInterface?

    /// What the front-end negotiated and where the port stands.
    ///
    /// SAFETY: one owner thread (the device's worker), as `Device.Mutable`;
    /// behind a pointer so the per-frame path pays no exclusivity check.
    struct Mutable {
        /// Bytes of virtio-net header leading the guest's frames: 0 for a device
        /// the HTTP API set up (the built-in guest's frames have none), 12 with
        /// VIRTIO_F_VERSION_1 or MRG_RXBUF, 10 for a legacy front-end.
        var guestHeaderBytes = 0
        /// MRG_RXBUF: a received frame may span several RX buffers.
        var mergeable = false
        /// What the guest may ask of the port for its frames (HOST_*).
        var hostOffloads: VirtioNetHeader.HostOffloads = []
        /// What the TAP may hand the guest (GUEST_*), as set with TUNSETOFFLOAD.
        var guestOffloads: TapOffloads = []
        /// The MTU the front-end set, if any: longer received frames (without GSO) are dropped.
        var mtu: Int?
        var state = LinkState.up
        var lastError: String?
        /// The peer's wires, one per queue pair of the sender (unretained: `wires` holds them).
        var linked = false
        var out: UnsafeMutablePointer<Unmanaged<FrameRing>>?
        var outCount = 0
        var inbound: UnsafeMutablePointer<Unmanaged<FrameRing>>?
        var inboundCount = 0
        /// The peer's worker, woken when frames were put on its wire while it sleeps.
        var peerWorker: Unmanaged<DatapathWorker>?
        /// A TX frame met a full TAP and waits in its ring: nothing will kick for it, so the worker polls.
        var backPressured = false
        /// A RARP announcement (`announceFrame`) waits to go out (Device+Announce.swift).
        var announcePending = false
        /// Announcements sent.
        var announcements: UInt64 = 0
    }
    let m: UnsafeMutablePointer<Mutable>

    /// What the port last saw: frames moved (up), the TAP down (EIO) or the peer missing, the TAP deleted.
    enum LinkState: String { case up, down, gone }

    /// The wires while linked: the references that keep them alive.
    private var wires: (out: [FrameRing], inbound: [FrameRing], worker: DatapathWorker?) = ([], [], nil)

    /// Per queue pair: counters in a flat row (`Slot`), a frame read from the
    /// TAP and not yet given to the guest (its length; 0: none), and the buffer it sits in.
    let counters: UnsafeMutablePointer<UInt64>
    let pendingLength: UnsafeMutablePointer<Int>
    let bounce: UnsafeMutableRawPointer?
    /// Scratch for one frame: its pieces (header first) and a header.
    let iov: UnsafeMutablePointer<iovec>
    let header: UnsafeMutableRawPointer
    /// A zero virtio-net header, sent to the TAP ahead of frames from a guest that writes none.
    let zeroHeader: UnsafeMutableRawPointer
    /// Scratch for the RX buffers one frame fills before they are handed back (packed rings).
    let usedScratch: UnsafeMutablePointer<UsedBuffer>
    /// Frames gathered for the TAP and written with one system call (io_uring); nil for other ports.
    let burst: TapBurst?
    /// Which TAP queues have frames to read (io_uring completions): no empty read per round.
    let readiness: TapReadiness?
    /// The same two, without reference counting, for the datapath.
    /// SAFETY: `burst` and `readiness` own them for the port's whole life.
    let burstRef: Unmanaged<TapBurst>?
    let readinessRef: Unmanaged<TapReadiness>?
    /// What the datapath remembers of each frame of a burst until its write is done.
    let burstFrames: UnsafeMutablePointer<BurstFrame>

    struct BurstFrame {
        /// The chain's head (split) or buffer id (packed), and its ring slots (packed).
        var id: UInt16
        var slots: Int
        /// Where the ring was before this chain (to keep it and what follows, in order).
        var availIdx: UInt16
        var availWrap: Bool
        /// The chain's bytes, and the frame's (without the header).
        var bytes: Int
        var frame: Int
        /// Its write in the burst, or -1 when it was refused (`drop` says why).
        var write: Int
        var drop: PortDropReason?
    }

    /// A RARP frame after a 12-byte virtio-net header, made when a front-end asks for an announcement.
    let announceFrame: UnsafeMutableRawPointer
    /// The TAP's queue descriptors, one per pair (read per frame without touching `tap`).
    /// SAFETY: `tap` keeps them open as long as the port lives.
    let tapFDs: UnsafeMutablePointer<Int32>

    struct UsedBuffer { var id: UInt16; var len: UInt32; var slots: Int }

    /// A TAP read buffer: the longest GSO frame (64 KiB) with its headers.
    static let bounceBytes = 65_536 + 256
    /// The most pieces a TX frame may have (IOV_MAX less the header's).
    static let maxSegments = 1023
    /// The most RX buffers one frame may fill.
    static let maxRXBuffers = 256
    /// The longest TX frame after its header (a 64 KiB GSO frame with its Ethernet and VLAN headers).
    static let maxTXFrame = 65_536 + 18

    /// A counter row: TX frames, TX bytes, RX frames, RX bytes, back-pressure, then drops by reason.
    enum Slot {
        static let txFrames = 0, txBytes = 1, rxFrames = 2, rxBytes = 3, backPressure = 4, drops = 5
        static let count = 5 + PortDropReason.allCases.count
    }

    init(config: PortConfig, pairs: Int, tap: TapInterface?) {
        self.config = config
        self.kind = config.kind
        self.pairs = pairs
        self.tap = tap
        burst = tap != nil ? TapBurst() : nil
        readiness = tap.map { TapReadiness($0.queues) }
        burstRef = burst.map { .passUnretained($0) }
        readinessRef = readiness.map { .passUnretained($0) }
        burstFrames = .allocate(capacity: TapBurst.capacity)
        tapFDs = .allocate(capacity: pairs)
        for i in 0..<pairs { (tapFDs + i).initialize(to: tap.map { $0.queues[i % $0.queues.count].fd } ?? -1) }
        m = .allocate(capacity: 1)
        m.initialize(to: Mutable())
        counters = .allocate(capacity: pairs * Slot.count)
        counters.initialize(repeating: 0, count: pairs * Slot.count)
        pendingLength = .allocate(capacity: pairs)
        pendingLength.initialize(repeating: 0, count: pairs)
        bounce = tap != nil ? .allocate(byteCount: pairs * Self.bounceBytes, alignment: 64) : nil
        iov = .allocate(capacity: Self.maxSegments + 1)
        header = .allocate(byteCount: 16, alignment: 8)
        header.initializeMemory(as: UInt8.self, repeating: 0, count: 16)
        zeroHeader = .allocate(byteCount: 16, alignment: 8)
        zeroHeader.initializeMemory(as: UInt8.self, repeating: 0, count: 16)
        usedScratch = .allocate(capacity: Self.maxRXBuffers)
        announceFrame = .allocate(byteCount: VirtioNetHeader.size + 60, alignment: 8)
        announceFrame.initializeMemory(as: UInt8.self, repeating: 0, count: VirtioNetHeader.size + 60)
    }

    deinit {
        m.pointee.out?.deallocate()
        m.pointee.inbound?.deallocate()
        m.deinitialize(count: 1)
        m.deallocate()
        counters.deallocate()
        pendingLength.deallocate()
        bounce?.deallocate()
        iov.deallocate()
        header.deallocate()
        zeroHeader.deallocate()
        usedScratch.deallocate()
        announceFrame.deallocate()
        tapFDs.deallocate()
        burstFrames.deallocate()
    }

    /// The TAP queue of pair `pair`.
    @inline(__always) func tapQueue(_ pair: Int) -> TapQueue { TapQueue(fd: tapFDs[pair]) }

    @inline(__always) func count(_ pair: Int, _ slot: Int, _ n: UInt64 = 1) { counters[pair * Slot.count + slot] &+= n }
    @inline(__always) func drop(_ pair: Int, _ reason: PortDropReason) { count(pair, Slot.drops + reason.rawValue) }

    /// The frame buffer of queue pair `pair` (TAP ports).
    @inline(__always) func bounce(_ pair: Int) -> UnsafeMutableRawPointer { bounce! + pair * Self.bounceBytes }

    /// Connects the wires to a peer (on this device's worker).
    func link(out: [FrameRing], inbound: [FrameRing], peerWorker: DatapathWorker) {
        unlink()
        wires = (out, inbound, peerWorker)
        let o = UnsafeMutablePointer<Unmanaged<FrameRing>>.allocate(capacity: max(out.count, 1))
        for (i, r) in out.enumerated() { (o + i).initialize(to: .passUnretained(r)) }
        let n = UnsafeMutablePointer<Unmanaged<FrameRing>>.allocate(capacity: max(inbound.count, 1))
        for (i, r) in inbound.enumerated() { (n + i).initialize(to: .passUnretained(r)) }
        m.pointee.out = o; m.pointee.outCount = out.count
        m.pointee.inbound = n; m.pointee.inboundCount = inbound.count
        m.pointee.peerWorker = .passUnretained(peerWorker)
        m.pointee.linked = true
        m.pointee.state = .up
    }

    /// Disconnects from the peer: frames to it are dropped (peer_down) from now on.
    func unlink() {
        m.pointee.linked = false
        m.pointee.out?.deallocate(); m.pointee.out = nil; m.pointee.outCount = 0
        m.pointee.inbound?.deallocate(); m.pointee.inbound = nil; m.pointee.inboundCount = 0
        m.pointee.peerWorker = nil
        wires = ([], [], nil)
        if config.kind == .peer { m.pointee.state = .down }
    }

    /// Counters of queue pair `pair`.
    func counters(_ pair: Int) -> PortCounters {
        let row = counters + pair * Slot.count
        var c = PortCounters()
        c.txFrames = row[Slot.txFrames]; c.txBytes = row[Slot.txBytes]
        c.rxFrames = row[Slot.rxFrames]; c.rxBytes = row[Slot.rxBytes]
        c.txBackPressure = row[Slot.backPressure]
        for r in PortDropReason.allCases { c.drops[r.rawValue] = row[Slot.drops + r.rawValue] }
        return c
    }

    var snapshot: PortSnapshot {
        let s = m.pointee
        var p = PortSnapshot(config: config, state: s.state.rawValue)
        p.tapName = tap?.name
        p.tapCreated = tap?.created ?? false
        p.peerLinked = s.linked
        p.guestHeaderBytes = s.guestHeaderBytes
        p.mergeableRX = s.mergeable
        p.mtu = s.mtu
        p.lastError = s.lastError
        let g: [(TapOffloads, String)] = [(.checksum, "csum"), (.tso4, "tso4"), (.tso6, "tso6"), (.tsoECN, "ecn")]
        p.guestOffloads = g.filter { s.guestOffloads.contains($0.0) }.map(\.1)
        let h: [(VirtioNetHeader.HostOffloads, String)] = [(.checksum, "csum"), (.tso4, "tso4"), (.tso6, "tso6"), (.ecn, "ecn")]
        p.hostOffloads = h.filter { s.hostOffloads.contains($0.0) }.map(\.1)
        p.queues = (0..<pairs).map { counters($0) }
        return p
    }
}
