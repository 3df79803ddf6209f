// Ports: where a device's frames go and come from. `loopback` (its own RX
// queue), `sink`, a host TAP interface (what vhost-net attaches to) or a peer
// device (guest to guest). The front-end is the other side: the virtio driver.

import Ports

/// What a front-end negotiated for a net device (from its feature bits).
public struct NetSettings: Sendable, Equatable {
    /// Bytes of virtio-net header in front of every frame: 12 (VERSION_1 or
    /// MRG_RXBUF), 10 (legacy), 0 (a device without one: the built-in guest's).
    public var headerBytes: Int
    /// VIRTIO_NET_F_MRG_RXBUF.
    public var mergeableRX: Bool
    /// What the guest may ask of the host for its frames: CSUM, HOST_TSO4/6, HOST_ECN.
    public var hostOffloads: VirtioNetHeader.HostOffloads
    /// What the guest takes: GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN.
    public var guestOffloads: TapOffloads

    public init(headerBytes: Int, mergeableRX: Bool = false, hostOffloads: VirtioNetHeader.HostOffloads = [],
                guestOffloads: TapOffloads = []) {
        self.headerBytes = headerBytes
        self.mergeableRX = mergeableRX
        self.hostOffloads = hostOffloads
        self.guestOffloads = guestOffloads
    }
}

/// Where a device's TX frames go and its RX frames come from. Part of the
/// device's configuration, fixed for its life.
public enum PortConfig: Sendable, Equatable, Hashable {
    /// TX frames go to the same device's RX queue.
    case loopback
    /// TX frames are consumed and dropped; nothing arrives.
    case sink
    /// A host TAP interface, one TAP queue per queue pair (IFF_MULTI_QUEUE).
    case tap(name: String)
    /// Another device: its TX is this device's RX and the other way round.
    case peer(device: String)

    /// The port's type, as the API names it.
    public var kind: PortKind {
        switch self {
        case .loopback: .loopback
        case .sink: .sink
        case .tap: .tap
        case .peer: .peer
        }
    }
}

/// A port's type.
public enum PortKind: String, Sendable, CaseIterable {
    case loopback, sink, tap, peer
}

/// Why a port dropped a frame (each counted on its own).
public enum PortDropReason: Int, Sendable, CaseIterable {
    /// The TAP interface is down (writes fail with EIO).
    case tapDown
    /// The TAP was full for this frame but took the ones written after it in the same
    /// burst (it freed room meanwhile): keeping this one would send it out of order.
    case tapFull
    /// The TAP interface was deleted under the device.
    case tapGone
    /// The kernel refused the frame (EINVAL), or another write error.
    case tapError
    /// A frame longer than the other side can take (the guest's buffers or MTU, 64 KiB, the peer's record).
    case oversize
    /// A frame shorter than its virtio-net header and an Ethernet header.
    case runt
    /// A GSO frame with gso_size 0 or an unknown GSO type.
    case gsoSize
    /// hdr_len past the frame.
    case headerLength
    /// csum_start/csum_offset outside the frame.
    case checksumOffset
    /// An offload the guest did not negotiate (GSO without HOST_TSO, NEEDS_CSUM without CSUM).
    case offloadNotNegotiated
    /// The peer's wire is full: it does not take frames fast enough.
    case peerFull
    /// The peer device does not exist (yet) or does not name this device back.
    case peerDown
    /// The chain had more pieces than one frame may have.
    case tooManySegments

    /// The name in JSON and metrics.
    public var name: String {
        switch self {
        case .tapDown: "tap_down"
        case .tapFull: "tap_full"
        case .tapGone: "tap_gone"
        case .tapError: "tap_error"
        case .oversize: "oversize"
        case .runt: "runt"
        case .gsoSize: "gso_size"
        case .headerLength: "header_length"
        case .checksumOffset: "checksum_offset"
        case .offloadNotNegotiated: "offload_not_negotiated"
        case .peerFull: "peer_full"
        case .peerDown: "peer_down"
        case .tooManySegments: "too_many_segments"
        }
    }
}

/// One queue pair's traffic through the port: TX is guest to port, RX port to guest.
public struct PortCounters: Sendable, Equatable {
    public var txFrames: UInt64 = 0
    public var txBytes: UInt64 = 0
    public var rxFrames: UInt64 = 0
    public var rxBytes: UInt64 = 0
    /// Drops by `PortDropReason.rawValue`.
    public var drops = [UInt64](repeating: 0, count: PortDropReason.allCases.count)
    /// Times a TX frame stayed in its ring because the TAP pushed back (EAGAIN, ENOBUFS).
    public var txBackPressure: UInt64 = 0
    public init() {}

    public var totalDrops: UInt64 { drops.reduce(0, +) }

    public static func + (a: PortCounters, b: PortCounters) -> PortCounters {
        var s = a
        s.txFrames &+= b.txFrames; s.txBytes &+= b.txBytes
        s.rxFrames &+= b.rxFrames; s.rxBytes &+= b.rxBytes
        s.txBackPressure &+= b.txBackPressure
        for i in s.drops.indices { s.drops[i] &+= b.drops[i] }
        return s
    }
}

/// A port's state and figures, as published to readers.
public struct PortSnapshot: Sendable, Equatable {
    public var config: PortConfig
    /// "up"; "down" (TAP down, peer missing); "gone" (TAP deleted).
    public var state: String
    /// The TAP interface's kernel name and whether the daemon created it.
    public var tapName: String?
    public var tapCreated = false
    /// The peer device's id while the wire is up.
    public var peerLinked = false
    /// The virtio-net header size on the guest side (0: the device has none), and whether RX merges buffers.
    public var guestHeaderBytes = 0
    public var mergeableRX = false
    /// What the TAP may hand the guest (TUNSETOFFLOAD) and what the guest may ask of the TAP.
    public var guestOffloads: [String] = []
    public var hostOffloads: [String] = []
    /// The MTU the front-end set (VHOST_USER_NET_SET_MTU), if any.
    public var mtu: Int?
    /// Per queue pair.
    public var queues: [PortCounters] = []
    public var lastError: String?

    public var total: PortCounters { queues.reduce(PortCounters(), +) }
}
