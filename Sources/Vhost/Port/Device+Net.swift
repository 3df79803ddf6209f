// What a vhost-user front-end negotiated for the net device, given to the port.
import Ports

extension Device {
    /// What a vhost-user front-end negotiated for the net device: the header
    /// in front of its frames, mergeable RX buffers, and the offloads both ways.
    /// A TAP port is told at once (header size, TUNSETOFFLOAD); returns the
    /// offloads the TAP took (it may refuse some).
    @discardableResult
    public func setNet(_ n: NetSettings) -> TapOffloads {
        // The loopback fills in num_buffers of the 12-byte header it copies.
        rxNetHeaderNumBuffers = n.headerBytes == VirtioNetHeader.size
        let p = port.m
        p.pointee.guestHeaderBytes = n.headerBytes
        p.pointee.mergeable = n.mergeableRX
        p.pointee.hostOffloads = n.hostOffloads
        guard let tap = port.tap else {
            p.pointee.guestOffloads = []
            return []
        }
        do throws(TapError) {
            try tap.setHeaderSize(n.headerBytes == VirtioNetHeader.legacySize ? VirtioNetHeader.legacySize : VirtioNetHeader.size)
        } catch {
            p.pointee.lastError = error.description
        }
        p.pointee.guestOffloads = tap.setOffloads(n.guestOffloads)
        return p.pointee.guestOffloads
    }

    /// The MTU a front-end set (VHOST_USER_NET_SET_MTU): received frames
    /// longer than it (without GSO) are dropped; the TAP is given it when the
    /// daemon may (its own interface), else it keeps its own.
    public func setMTU(_ mtu: Int) {
        port.m.pointee.mtu = mtu
        if let tap = port.tap, tap.created, tap.mtu != mtu {
            do throws(TapError) { try tap.setMTU(mtu) } catch { port.m.pointee.lastError = error.description }
        }
    }

    /// The port's state and counters.
    public func portSnapshot() -> PortSnapshot { port.snapshot }
}
