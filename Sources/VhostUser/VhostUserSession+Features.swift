// What the vhost-user session offers a front-end (virtio and protocol
// feature bits) and what the bits it acknowledged mean for the net device.
import Ports
import Vhost

extension VhostUserSession {
    /// Virtio features offered: split or packed rings with indirect
    /// descriptors and event index; in order (every port uses chains in the
    /// order offered); mergeable RX buffers; ACCESS_PLATFORM when the device
    /// IOTLB is on. Checksum and TSO offloads both ways and the MTU only with a
    /// TAP port, whose kernel side honours them; the loopback, the sink and a
    /// peer would have to compute checksums and segment themselves.
    var offeredFeatures: UInt64 {
        var f = VhostUserFeature.version1 | VhostUserFeature.protocolFeatures | VhostUserFeature.indirectDesc
            | VhostUserFeature.eventIdx | VhostUserFeature.inOrder | VhostUserFeature.netMRGRXBuf
            | VhostUserFeature.ringPacked | VhostUserFeature.logAll
        if config.iotlb { f |= VhostUserFeature.accessPlatform }
        if config.queues > 2 { f |= VhostUserFeature.netMQ }
        if config.port.kind == .tap { f |= VhostUserFeature.netOffloads }
        return f
    }

    var offeredProtocolFeatures: UInt64 {
        var f = VhostUserProtocolFeature.mq | VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.logShmFD
            | VhostUserProtocolFeature.rarp
        if config.iotlb { f |= VhostUserProtocolFeature.backendReq }
        if config.port.kind == .tap { f |= VhostUserProtocolFeature.netMTU }
        return f
    }

    /// What the acknowledged features `f` mean for the net device.
    static func netSettings(_ f: UInt64) -> NetSettings {
        func has(_ bit: UInt64) -> Bool { f & bit != 0 }
        var host: VirtioNetHeader.HostOffloads = []
        if has(VhostUserFeature.netCsum) { host.insert(.checksum) }
        if has(VhostUserFeature.netHostTSO4) { host.insert(.tso4) }
        if has(VhostUserFeature.netHostTSO6) { host.insert(.tso6) }
        if has(VhostUserFeature.netHostECN) { host.insert(.ecn) }
        var guest: TapOffloads = []
        if has(VhostUserFeature.netGuestCsum) { guest.insert(.checksum) }
        if has(VhostUserFeature.netGuestTSO4) { guest.insert(.tso4) }
        if has(VhostUserFeature.netGuestTSO6) { guest.insert(.tso6) }
        if has(VhostUserFeature.netGuestECN) { guest.insert(.tsoECN) }
        // A 12-byte header (with num_buffers) leads every frame under VERSION_1 or MRG_RXBUF.
        let twelve = has(VhostUserFeature.version1) || has(VhostUserFeature.netMRGRXBuf)
        return NetSettings(headerBytes: twelve ? VirtioNetHeader.size : VirtioNetHeader.legacySize,
                           mergeableRX: has(VhostUserFeature.netMRGRXBuf), hostOffloads: host, guestOffloads: guest)
    }
}
