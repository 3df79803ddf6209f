// The virtio-net header (virtio 1.x, 5.1.6) in front of every frame, and the
// checks a device makes before it hands a guest's frame to the host: a guest
// may write anything there, and the host stack must not see nonsense.
//
//   0 flags (NEEDS_CSUM 1, DATA_VALID 2)   1 gso_type (NONE 0, TCPV4 1, UDP 3, TCPV6 4, ECN 0x80)
//   2 hdr_len   4 gso_size   6 csum_start   8 csum_offset   10 num_buffers (12-byte header only)

/// Layout and checks of the virtio-net header.
public enum VirtioNetHeader {
    /// The header with num_buffers (VIRTIO_F_VERSION_1 or MRG_RXBUF).
    public static let size = 12
    /// The legacy header, without num_buffers.
    public static let legacySize = 10
    /// Offset of num_buffers.
    public static let numBuffersOffset = 10

    public static let needsChecksum: UInt8 = 1
    public static let gsoNone: UInt8 = 0
    public static let gsoTCPv4: UInt8 = 1
    public static let gsoUDP: UInt8 = 3
    public static let gsoTCPv6: UInt8 = 4
    public static let gsoECN: UInt8 = 0x80

    /// Why a guest's header is refused (each a drop reason of its own).
    public enum Problem: Sendable, Equatable {
        /// A GSO frame with gso_size 0, or an unknown GSO type.
        case gsoSize
        /// An offload the device did not offer or the guest did not take
        /// (GSO without HOST_TSO4/6 or HOST_ECN, NEEDS_CSUM without CSUM).
        case offloadNotNegotiated
        /// hdr_len past the frame.
        case headerLength
        /// csum_start/csum_offset outside the frame (the 2-byte checksum must fit).
        case checksumOffset
    }

    /// What the guest may ask of the host for its frames (its HOST_* features).
    public struct HostOffloads: OptionSet, Sendable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        public static let checksum = HostOffloads(rawValue: 1)
        public static let tso4 = HostOffloads(rawValue: 2)
        public static let tso6 = HostOffloads(rawValue: 4)
        public static let ecn = HostOffloads(rawValue: 8)
    }

    /// Checks the 10 header bytes at `h` for a frame of `frameLength` bytes
    /// (after the header) against what was negotiated; nil when it may pass.
    @inline(__always)
    public static func problem(_ h: UnsafeRawPointer, frameLength: Int, allowed: HostOffloads) -> Problem? {
        // SAFETY: callers pass the 10 header bytes gathered into the port's 16-byte header buffer.
        let flags = h.load(as: UInt8.self)
        let gso = h.load(fromByteOffset: 1, as: UInt8.self)
        if gso != gsoNone {
            let kind = gso & ~gsoECN
            let offered: Bool
            switch kind {
            case gsoTCPv4: offered = allowed.contains(.tso4)
            case gsoTCPv6: offered = allowed.contains(.tso6)
            default: return .gsoSize
            }
            if !offered || (gso & gsoECN != 0 && !allowed.contains(.ecn)) { return .offloadNotNegotiated }
            let gsoSize = UInt16(littleEndian: h.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
            if gsoSize == 0 { return .gsoSize }
            let hdrLen = UInt16(littleEndian: h.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
            if Int(hdrLen) > frameLength { return .headerLength }
        }
        if flags & needsChecksum != 0 {
            if !allowed.contains(.checksum) { return .offloadNotNegotiated }
            let start = Int(UInt16(littleEndian: h.loadUnaligned(fromByteOffset: 6, as: UInt16.self)))
            let offset = Int(UInt16(littleEndian: h.loadUnaligned(fromByteOffset: 8, as: UInt16.self)))
            if start + offset + 2 > frameLength { return .checksumOffset }
        }
        return nil
    }
}
