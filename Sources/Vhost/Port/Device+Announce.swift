// Announcing a migrated guest (VHOST_USER_SEND_RARP): QEMU on the destination
// asks the back-end to broadcast a RARP from the guest's MAC for a guest that
// cannot announce itself (no VIRTIO_NET_F_GUEST_ANNOUNCE), so switches learn
// where it now is. As DPDK's vhost library does, the frame goes where the
// guest's own frames go, as if the guest had sent it: out of a TAP or to the
// peer, and for the loopback into the device's RX queue. It waits until it can
// go (the RX queue running and with a buffer); a sink drops it.
import Glibc
import Ports

extension Device {
    /// The Ethernet frame of a RARP request ("reverse request", opcode 3) from
    /// `mac` for itself, broadcast and padded to 60 bytes (DPDK's make_rarp_packet).
    public static func rarpFrame(mac: [UInt8]) -> [UInt8] {
        precondition(mac.count == 6)
        var f = [UInt8](repeating: 0xff, count: 6) + mac + [0x80, 0x35]  // ETH_P_RARP
        f += [0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03]  // Ethernet, IPv4, 6 and 4 bytes, reverse request
        f += mac + [0, 0, 0, 0] + mac + [0, 0, 0, 0]
        return f + [UInt8](repeating: 0, count: 60 - f.count)
    }

    /// Queues an announcement of `mac` (SEND_RARP): sent on the next rounds.
    public func announce(mac: [UInt8]) {
        let frame = Device.rarpFrame(mac: mac)
        port.announceFrame.initializeMemory(as: UInt8.self, repeating: 0, count: VirtioNetHeader.size)
        // SAFETY: announceFrame holds VirtioNetHeader.size + 60 bytes (DevicePort), the frame 60.
        frame.withUnsafeBytes { (port.announceFrame + VirtioNetHeader.size).copyMemory(from: $0.baseAddress!, byteCount: 60) }
        port.m.pointee.announcePending = true
    }

    /// Announcements sent so far.
    public var announcements: UInt64 { port.m.pointee.announcements }

    /// Sends the waiting announcement if it can go now (a round's work, not a frame's).
    func sendAnnouncement<S: DeviceSpaces>(_: S.Type) {
        let p = port.m
        let frame = UnsafeRawPointer(port.announceFrame)
        let length = VirtioNetHeader.size + 60
        switch port.kind {
        case .loopback:
            let rx = queues[0]
            guard rx.state == .running, rx.ringsReady, let c = rx.config else { return }
            var b = RXBatch(usedBefore: rx.usedIdx, availIdx: rx.lastAvailIdx)
            switch deliver(rx, c, &b, frame, length, headerIn: VirtioNetHeader.size, port, S.self) {
            case .noBuffers, .stopped: return  // again next round
            case .delivered, .dropped: break
            }
            finishRX(rx, c, b, S.self)
        case .tap:
            guard p.pointee.state != .gone else { break }
            let header = p.pointee.guestHeaderBytes == VirtioNetHeader.legacySize ? VirtioNetHeader.legacySize : VirtioNetHeader.size
            var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: frame + VirtioNetHeader.size - header), iov_len: header + 60)
            if case .wouldBlock = port.tapQueue(0).write(&iov, count: 1) { return }
        case .peer:
            guard p.pointee.linked, p.pointee.outCount > 0,
                  let dst = p.pointee.out![0]._withUnsafeGuaranteedRef({ $0.reserve(length) }) else { return }
            // SAFETY: reserve(length) gave length bytes; announceFrame holds length.
            dst.copyMemory(from: frame, byteCount: length)
            p.pointee.out![0]._withUnsafeGuaranteedRef { $0.commit(length) }
            wakePeer(port)
        case .sink:
            break
        }
        p.pointee.announcePending = false
        p.pointee.announcements &+= 1
    }
}
