// One vhost-user connection: the message protocol with a front-end. It maps
// the memory the front-end passes and turns every message that changes the
// device into a command on the device's worker — the same path the HTTP API
// takes, so the concurrency rule holds unchanged. Kicks wake the worker;
// misses are forwarded to a front-end with a vIOMMU, or answered here by
// identity (IOVA = guest-physical) for one without.
import Glibc
import IOTLB
import CUnixSocket
import Ports
import Vhost

/// A protocol violation: the connection is dropped.
struct VhostUserProtocolError: Error {
    let message: String
    init(_ message: String) { self.message = message }
}

/// One front-end connection: what it set up, owned by the backend thread.
final class VhostUserSession {
    struct Ring {
        var num = 0
        var desc: UInt64 = 0, avail: UInt64 = 0, used: UInt64 = 0
        var addressed = false
        var base: UInt16 = 0
        var baseFresh = true  // a ring's first start uses `base` (0 unless SET_VRING_BASE said)
        var kickFD: Int32 = -1
        var callFD: Int32 = -1
        var errFD: Int32 = -1
        var started = false
        var enabled: Bool?  // nil: as the protocol-features rule says
        var applied = false
        var logAddr: UInt64?  // VHOST_VRING_F_LOG: log_guest_addr
    }

    let backend: VhostUserBackend
    let handle: DeviceHandle
    let conn: Int32
    var rings: [Ring]
    var features: UInt64 = 0
    var protocolFeatures: UInt64 = 0
    var memory: GuestMemory?
    var backendFD: Int32 = -1
    /// The newest miss-log seq dealt with: sent, or not for the front-end.
    var missCursor: UInt64 = 0
    /// A miss could not be sent (the channel was full): try again soon.
    var missesUnsent = false
    /// SET_LOG_BASE's log and SET_LOG_FD's descriptor (VhostUserSession+Migration.swift).
    var dirtyLog: DirtyLog?
    var logFD: Int32 = -1

    init(backend: VhostUserBackend, handle: DeviceHandle, conn: Int32) {
        self.backend = backend
        self.handle = handle
        self.conn = conn
        rings = Array(repeating: Ring(), count: handle.config.queues)
    }

    var config: DeviceConfig { handle.config }

    /// Whether ring and buffer addresses are IOVAs the front-end's vIOMMU maps.
    var frontEndIOMMU: Bool { features & VhostUserFeature.accessPlatform != 0 }

    /// Serves messages until the front-end leaves, breaks the protocol, or
    /// `keepGoing` turns false; returns why it ended abnormally.
    func serve(while keepGoing: () -> Bool) -> String? {
        while keepGoing() {
            var pfds = [pollfd(fd: conn, events: Int16(POLLIN), revents: 0),
                        pollfd(fd: backend.notifier.fd, events: Int16(POLLIN), revents: 0)]
            let kickIndex = pfds.count
            for r in rings where r.kickFD >= 0 { pfds.append(pollfd(fd: r.kickFD, events: Int16(POLLIN), revents: 0)) }
            _ = poll(&pfds, nfds_t(pfds.count), missesUnsent ? 50 : 1000)
            if pfds[kickIndex...].contains(where: { $0.revents != 0 }) {
                var kicks: UInt64 = 0
                for p in pfds[kickIndex...] where p.revents & Int16(POLLIN) != 0 {
                    var v: UInt64 = 0
                    if read(p.fd, &v, 8) == 8 { kicks &+= v }
                }
                handle.worker.kick()
                backend.updateStatus { $0.kicks &+= kicks }
            }
            if pfds[1].revents != 0 || missesUnsent {
                if pfds[1].revents != 0 { backend.notifier.drain() }
                answerMisses()
            }
            // The front-end shrank its memory file (the datapath's SIGBUS was caught
            // and its queues failed): its memory is gone, so is the connection.
            if let lost = memory?.lostPages, lost > 0 {
                backend.updateStatus { $0.memoryFaults &+= lost }
                return "the front-end shrank its memory file under the datapath (\(lost) pages lost, SIGBUS caught)"
            }
            if pfds[0].revents != 0 {
                do {
                    guard try handleOneMessage() else { return nil }
                } catch {
                    return error.message
                }
            }
        }
        return nil
    }

    // MARK: Messages

    /// Reads and handles one message; false at end of stream.
    private func handleOneMessage() throws(VhostUserProtocolError) -> Bool {
        var head = [UInt8](repeating: 0, count: VhostUserHeader.size)
        var fds = [Int32](repeating: -1, count: 8)
        var nfds: Int32 = 0
        // SAFETY: head holds VhostUserHeader.size bytes, fds 8 descriptors: the sizes passed.
        let got = head.withUnsafeMutableBytes { b in
            cunixsock_recv(conn, b.baseAddress, VhostUserHeader.size, &fds, 8, &nfds)
        }
        var received = Array(fds.prefix(Int(nfds)))
        // Every descriptor not taken over by a handler is closed.
        defer { for fd in received where fd >= 0 { close(fd) } }
        if got == 0 { return false }
        guard got > 0 else { throw VhostUserProtocolError("recvmsg: \(String(cString: strerror(errno)))") }
        if got < VhostUserHeader.size {
            try readExactly(&head, from: got)
        }
        let header = VhostUserHeader(head)
        guard header.flags & 3 == VhostUserHeader.version else {
            throw VhostUserProtocolError("message with protocol version \(header.flags & 3), expected 1")
        }
        guard header.size <= VhostUserHeader.maxPayload else {
            throw VhostUserProtocolError("payload of \(header.size) bytes (at most \(VhostUserHeader.maxPayload))")
        }
        var payload = [UInt8](repeating: 0, count: Int(header.size))
        if header.size > 0 { try readExactly(&payload, from: 0) }
        backend.updateStatus { $0.messages += 1 }

        guard let request = VhostUserRequest(rawValue: header.request) else {
            backend.log("vhost-user: request \(header.request) not supported")
            if header.needsReply { try sendAck(header.request, ok: false) }
            return true
        }
        let ok: Bool
        do {
            if let answer = try handle(request, payload, &received) {
                try send(header.request, answer)
                return true
            }
            ok = true
        } catch let e as VhostUserProtocolError {
            throw e
        } catch {
            // A request the device refused (a bad ring, an unbacked update): the
            // front-end hears of it when it asked for a reply; the connection stays.
            backend.log("vhost-user: \(request) refused: \(error)")
            ok = false
        }
        if header.needsReply && !request.hasReply { try sendAck(header.request, ok: ok) }
        return true
    }

    /// A refusal that keeps the connection.
    struct Refused: Error, CustomStringConvertible {
        let description: String
        init(_ d: String) { description = d }
    }

    /// Handles `request`; returns its reply payload when it has one. Takes over
    /// the descriptors it keeps by setting them to -1 in `fds`.
    private func handle(_ request: VhostUserRequest, _ payload: [UInt8], _ fds: inout [Int32]) throws -> [UInt8]? {
        var r = PayloadReader(payload)
        func u64() throws(VhostUserProtocolError) -> UInt64 {
            guard let v = r.u64() else { throw VhostUserProtocolError("\(request): payload too short") }
            return v
        }
        func u32() throws(VhostUserProtocolError) -> UInt32 {
            guard let v = r.u32() else { throw VhostUserProtocolError("\(request): payload too short") }
            return v
        }
        func ringIndex(_ raw: UInt64) throws(VhostUserProtocolError) -> Int {
            guard raw < UInt64(rings.count) else {
                throw VhostUserProtocolError("\(request): vring \(raw) out of range (the device has \(rings.count))")
            }
            return Int(raw)
        }
        func reply64(_ v: UInt64) -> [UInt8] {
            var w = PayloadWriter()
            w.u64(v)
            return w.bytes
        }
        /// Takes over the first descriptor that came with the message.
        func takeFD() throws(VhostUserProtocolError) -> Int32 {
            guard let first = fds.firstIndex(where: { $0 >= 0 }) else {
                throw VhostUserProtocolError("\(request) without a file descriptor")
            }
            defer { fds[first] = -1 }
            return fds[first]
        }
        /// The acknowledged bits, refused when any was not offered.
        func acknowledged(_ offered: UInt64, _ what: String) throws(VhostUserProtocolError) -> UInt64 {
            let f = try u64()
            guard f & ~offered == 0 else {
                throw VhostUserProtocolError("\(what) 0x\(String(f & ~offered, radix: 16)) were not offered")
            }
            return f
        }
        switch request {
        case .getFeatures:
            return reply64(offeredFeatures)
        case .setFeatures:
            let f = try acknowledged(offeredFeatures, "features")
            features = f
            backend.updateStatus { $0.features = f }
            let net = Self.netSettings(f), logging = f & VhostUserFeature.logAll != 0
            handle.performSync { d in
                d?.setNet(net)
                d?.setLogging(logging)
            }
            for i in rings.indices { try syncRing(i) }
        case .getProtocolFeatures:
            return reply64(offeredProtocolFeatures)
        case .setProtocolFeatures:
            let f = try acknowledged(offeredProtocolFeatures, "protocol features")
            protocolFeatures = f
            backend.updateStatus { $0.protocolFeatures = f }
        case .getQueueNum:
            return reply64(UInt64(max(1, rings.count / 2)))
        case .setOwner:
            break
        case .resetOwner:
            stopAllRings()
        case .setMemTable:
            try setMemTable(&r, &fds)
        case .setVringNum:
            let i = try ringIndex(UInt64(try u32()))
            rings[i].num = Int(try u32())
            if rings[i].applied { try syncRing(i) }
        case .setVringAddr:
            let i = try ringIndex(UInt64(try u32()))
            let flags = try u32()
            rings[i].desc = try u64()
            rings[i].used = try u64()
            rings[i].avail = try u64()
            let logAddr = try u64()
            rings[i].logAddr = flags & VhostUserSession.vringFLog != 0 ? logAddr : nil
            rings[i].addressed = true
            if rings[i].applied { try syncRing(i) }
        case .setVringBase:
            let i = try ringIndex(UInt64(try u32()))
            rings[i].base = UInt16(truncatingIfNeeded: try u32())
            rings[i].baseFresh = true
        case .getVringBase:
            let i = try ringIndex(UInt64(try u32()))
            // A ring that is not running reports its base: the one it was
            // given, or where it stopped when it was disabled.
            let last = stopRing(i) ?? neverRunBase(rings[i].base)
            rings[i].baseFresh = true
            rings[i].started = false
            rings[i].base = UInt16(truncatingIfNeeded: last)
            closeFD(&rings[i].kickFD)
            closeFD(&rings[i].callFD)
            var w = PayloadWriter()
            w.u32(UInt32(i)); w.u32(last)
            return w.bytes
        case .setVringKick, .setVringCall, .setVringErr:
            let v = try u64()
            let i = try ringIndex(v & 0xff)
            let fd = v & 0x100 == 0 ? try takeFD() : -1  // bit 8: no descriptor, the ring is polled
            switch request {
            case .setVringKick:
                closeFD(&rings[i].kickFD)
                rings[i].kickFD = fd
                rings[i].started = true  // with no fd: the driver never kicks, we poll
                try syncRing(i)
            case .setVringCall:
                let old = rings[i].callFD
                rings[i].callFD = fd
                if rings[i].applied {
                    let kicks = rings[i].kickFD >= 0, call = fd
                    handle.performSync { $0?.setNotifiers(i, call: call, kicks: kicks) }
                }
                if old >= 0 { close(old) }  // the worker no longer holds it
            default:
                closeFD(&rings[i].errFD)
                rings[i].errFD = fd
            }
        case .setVringEnable:
            let i = try ringIndex(UInt64(try u32()))
            rings[i].enabled = try u32() != 0
            try syncRing(i)
        case .setBackendReqFD:
            let fd = try takeFD()
            closeFD(&backendFD)
            backendFD = fd
            answerMisses()  // what could not be sent before goes on this channel
        case .iotlbMsg:
            guard let m = VhostIOTLBMessage(payload) else { throw VhostUserProtocolError("IOTLB_MSG: payload too short") }
            try applyIOTLB(m)
        case .netSetMTU:
            guard protocolFeatures & VhostUserProtocolFeature.netMTU != 0 else {
                throw Refused("NET_SET_MTU without the NET_MTU protocol feature")
            }
            let mtu = try u64()
            guard (68...65_535).contains(mtu) else { throw Refused("NET_SET_MTU \(mtu): an MTU is 68 to 65535") }
            handle.performSync { $0?.setMTU(Int(mtu)) }
        case .setLogBase:
            return try setLogBase(&r, &fds)
        case .setLogFD:
            let fd = try takeFD()
            closeFD(&logFD)
            logFD = fd
        case .sendRARP:
            try sendRARP(&r)
        case .setVringEndian, .getConfig, .setConfig,
             .getMaxMemSlots, .setStatus, .getStatus:
            // Features these belong to are not offered.
            throw Refused("\(request) needs a feature this backend does not offer")
        }
        return nil
    }

    func closeFD(_ fd: inout Int32) {
        if fd >= 0 { close(fd) }
        fd = -1
    }
}
