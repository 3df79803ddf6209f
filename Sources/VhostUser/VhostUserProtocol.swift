// The vhost-user message protocol (QEMU docs/interop/vhost-user.rst): a
// 12-byte header {request, flags, size} then `size` bytes of payload, little
// endian; file descriptors ride along by SCM_RIGHTS. Pure values here, so the
// codec is tested without a socket.
import IOTLB

/// Front-end requests this backend knows.
public enum VhostUserRequest: UInt32, Sendable {
    case getFeatures = 1, setFeatures, setOwner, resetOwner, setMemTable, setLogBase, setLogFD
    case setVringNum, setVringAddr, setVringBase, getVringBase, setVringKick, setVringCall, setVringErr
    case getProtocolFeatures, setProtocolFeatures, getQueueNum, setVringEnable, sendRARP, netSetMTU
    case setBackendReqFD, iotlbMsg, setVringEndian, getConfig, setConfig
    case getMaxMemSlots = 36
    case setStatus = 39, getStatus

    /// Requests whose answer is a payload (not a reply-ack).
    var hasReply: Bool {
        switch self {
        case .getFeatures, .getProtocolFeatures, .getQueueNum, .getVringBase, .getConfig, .getMaxMemSlots, .getStatus:
            return true
        default: return false
        }
    }
}

/// Virtio and vhost-user feature bits this backend deals with.
public enum VhostUserFeature {
    /// VIRTIO_NET_F_CSUM: the guest may send frames with a partial checksum (NEEDS_CSUM).
    public static let netCsum: UInt64 = 1 << 0
    /// VIRTIO_NET_F_GUEST_CSUM: the guest takes frames with a partial checksum.
    public static let netGuestCsum: UInt64 = 1 << 1
    /// VIRTIO_NET_F_MTU: the front-end tells the MTU (NET_SET_MTU).
    public static let netMTU: UInt64 = 1 << 3
    /// VIRTIO_NET_F_GUEST_TSO4/6, GUEST_ECN: the guest takes TCP segmentation offload frames.
    public static let netGuestTSO4: UInt64 = 1 << 7
    public static let netGuestTSO6: UInt64 = 1 << 8
    public static let netGuestECN: UInt64 = 1 << 9
    /// VIRTIO_NET_F_HOST_TSO4/6, HOST_ECN: the guest may send TSO frames.
    public static let netHostTSO4: UInt64 = 1 << 11
    public static let netHostTSO6: UInt64 = 1 << 12
    public static let netHostECN: UInt64 = 1 << 13
    /// The offloads a port that honours them (a TAP) offers.
    public static let netOffloads: UInt64 = netCsum | netGuestCsum | netMTU | netGuestTSO4 | netGuestTSO6
        | netGuestECN | netHostTSO4 | netHostTSO6 | netHostECN
    public static let netMRGRXBuf: UInt64 = 1 << 15
    /// VHOST_F_LOG_ALL: the back-end logs every guest write (live migration).
    public static let logAll: UInt64 = 1 << 26
    public static let netMQ: UInt64 = 1 << 22
    public static let indirectDesc: UInt64 = 1 << 28
    public static let eventIdx: UInt64 = 1 << 29
    /// VHOST_USER_F_PROTOCOL_FEATURES.
    public static let protocolFeatures: UInt64 = 1 << 30
    public static let version1: UInt64 = 1 << 32
    /// VIRTIO_F_ACCESS_PLATFORM (IOMMU_PLATFORM): ring and buffer addresses are IOVAs.
    public static let accessPlatform: UInt64 = 1 << 33
    /// VIRTIO_F_RING_PACKED: packed virtqueues (virtio 2.8).
    public static let ringPacked: UInt64 = 1 << 34
    /// VIRTIO_F_IN_ORDER: buffers are used in the order they were made available.
    public static let inOrder: UInt64 = 1 << 35
}

/// Protocol feature bits (VHOST_USER_PROTOCOL_F_*).
public enum VhostUserProtocolFeature {
    public static let mq: UInt64 = 1 << 0
    /// The dirty log travels as a file descriptor with SET_LOG_BASE (shared memory).
    public static let logShmFD: UInt64 = 1 << 1
    /// SEND_RARP: the back-end announces a migrated guest.
    public static let rarp: UInt64 = 1 << 2
    public static let replyAck: UInt64 = 1 << 3
    /// NET_SET_MTU.
    public static let netMTU: UInt64 = 1 << 4
    /// A backend-to-front-end channel (SET_BACKEND_REQ_FD): IOTLB misses travel on it.
    public static let backendReq: UInt64 = 1 << 5
}

/// A message header.
public struct VhostUserHeader: Equatable, Sendable {
    public static let size = 12
    public static let version: UInt32 = 1
    public static let replyFlag: UInt32 = 1 << 2
    public static let needReplyFlag: UInt32 = 1 << 3
    /// The largest payload accepted (SET_MEM_TABLE with 8 regions is 264 bytes;
    /// configuration spaces are at most 256 bytes plus 12).
    public static let maxPayload = 4096

    public var request: UInt32
    public var flags: UInt32
    public var size: UInt32

    public init(request: UInt32, flags: UInt32 = VhostUserHeader.version, size: UInt32) {
        self.request = request
        self.flags = flags
        self.size = size
    }

    public init(_ bytes: [UInt8]) {
        var r = PayloadReader(bytes)
        request = r.u32() ?? 0
        flags = r.u32() ?? 0
        size = r.u32() ?? 0
    }

    public var bytes: [UInt8] {
        var w = PayloadWriter()
        w.u32(request); w.u32(flags); w.u32(size)
        return w.bytes
    }

    public var needsReply: Bool { flags & VhostUserHeader.needReplyFlag != 0 }
}

/// Reads little-endian fields from a payload; nil once it runs short.
public struct PayloadReader {
    private let bytes: [UInt8]
    private var at = 0
    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public mutating func u64() -> UInt64? { field(8) }
    public mutating func u32() -> UInt32? { field(4).map { UInt32(truncatingIfNeeded: $0) } }
    public mutating func u8() -> UInt8? { field(1).map { UInt8(truncatingIfNeeded: $0) } }

    private mutating func field(_ n: Int) -> UInt64? {
        guard at + n <= bytes.count else { return nil }
        var v: UInt64 = 0
        for i in 0..<n { v |= UInt64(bytes[at + i]) << (8 * i) }
        at += n
        return v
    }
}

/// Writes little-endian fields.
public struct PayloadWriter {
    public private(set) var bytes: [UInt8] = []
    public init() {}
    public mutating func u64(_ v: UInt64) { put(v, 8) }
    public mutating func u32(_ v: UInt32) { put(UInt64(v), 4) }
    public mutating func u8(_ v: UInt8) { put(UInt64(v), 1) }
    public mutating func zeros(_ n: Int) { bytes += [UInt8](repeating: 0, count: n) }
    private mutating func put(_ v: UInt64, _ n: Int) { for i in 0..<n { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
}

/// One region of SET_MEM_TABLE.
public struct VhostUserMemoryRegion: Equatable, Sendable {
    public var guestPhysAddr: UInt64
    public var memorySize: UInt64
    public var userspaceAddr: UInt64
    /// Where the region starts in the file passed with it.
    public var mmapOffset: UInt64

    public init(guestPhysAddr: UInt64, memorySize: UInt64, userspaceAddr: UInt64, mmapOffset: UInt64) {
        self.guestPhysAddr = guestPhysAddr
        self.memorySize = memorySize
        self.userspaceAddr = userspaceAddr
        self.mmapOffset = mmapOffset
    }

    public var region: MemoryRegion {
        MemoryRegion(guestPhysAddr: GuestPhysAddr(guestPhysAddr), memorySize: memorySize,
                     userspaceAddr: UserAddr(userspaceAddr))
    }
}

/// struct vhost_iotlb_msg: {iova, size, uaddr, perm, type}, 32 bytes with padding.
public struct VhostIOTLBMessage: Equatable, Sendable {
    public enum Kind: UInt8, Sendable { case miss = 1, update, invalidate, accessFail }
    public var iova: UInt64
    public var size: UInt64
    public var uaddr: UInt64
    public var perm: UInt8
    public var kind: UInt8

    public init(iova: UInt64, size: UInt64, uaddr: UInt64, perm: UInt8, kind: Kind) {
        self.iova = iova
        self.size = size
        self.uaddr = uaddr
        self.perm = perm
        self.kind = kind.rawValue
    }

    public init?(_ payload: [UInt8]) {
        var r = PayloadReader(payload)
        guard let iova = r.u64(), let size = r.u64(), let uaddr = r.u64(), let perm = r.u8(), let kind = r.u8() else {
            return nil
        }
        self.iova = iova; self.size = size; self.uaddr = uaddr; self.perm = perm; self.kind = kind
    }

    public var bytes: [UInt8] {
        var w = PayloadWriter()
        w.u64(iova); w.u64(size); w.u64(uaddr); w.u8(perm); w.u8(kind); w.zeros(6)
        return w.bytes
    }
}

/// Backend-to-front-end requests (VHOST_USER_BACKEND_*).
public enum VhostUserBackendRequest: UInt32 {
    case iotlbMsg = 1
}
