// The vhost-user backend against a front-end written from the protocol
// document: negotiation, a memory table passed as a file, rings at the
// front-end's user addresses, traffic through the loopback, IOTLB off, on
// with identity translation, and on with the front-end as vIOMMU; stopping,
// disconnecting, reconnecting. Bad sockets and hostile front-ends:
// VhostUserTests+Hardening.swift; client mode: VhostUserClientTests.swift.
import CUnixSocket
import Foundation
import Glibc
import Guest
import IOTLB
import Platform
import Testing
import TestSupport
import Vhost
@testable import VhostUser
import ControlPlane
import JSON

@Suite("vhost-user backend", .serialized)
struct VhostUserTests {
    /// In the daemon's vhost-user directory (LiveDaemon's default).
    static func socketPath(_ tag: String) -> String { "\(testSocketDirectory)/\(tag).sock" }

    /// RX ring (queue 0) at 0x10000 into guest memory, TX (queue 1) at 0x20000,
    /// RX buffers from 1 MiB, TX buffers from 2 MiB.
    struct Traffic {
        let fe: VhostUserFrontEnd
        let rx: SplitRingDriver
        let tx: SplitRingDriver
        let rxCall: Int32
        let txKick: Int32
        /// Device addresses of descriptors (GPA, or IOVA with a vIOMMU).
        let address: (UInt64) -> UInt64
        /// The guest-physical address of the memory's first byte.
        let base: UInt64
        static let num = 64
        static let rxBuffers: UInt64 = 0x10_0000
        static let txBuffers: UInt64 = 0x20_0000
        static let bufferSize: UInt64 = 2048

        init(_ fe: VhostUserFrontEnd, ringAddress: (UInt64) -> UInt64, address: @escaping (UInt64) -> UInt64) throws {
            self.fe = fe
            self.address = address
            base = fe.region.guestPhysAddr
            let r = try fe.setUpRing(0, num: Self.num, at: base + 0x1_0000, address: ringAddress)
            let t = try fe.setUpRing(1, num: Self.num, at: base + 0x2_0000, address: ringAddress)
            rx = r.driver
            tx = t.driver
            rxCall = r.call
            txKick = t.kick
        }

        /// Sends `frames` through the device, each behind a 12-byte virtio-net
        /// header (VERSION_1 is negotiated) whose num_buffers is junk on TX, and
        /// returns what came back on RX, in order, headers checked and stripped.
        func loop(_ payloads: [[UInt8]], seconds: Double = 10) throws -> [[UInt8]] {
            precondition(payloads.count <= Self.num)
            let header: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xef, 0xbe]
            let frames = payloads.map { header + $0 }
            for i in 0..<frames.count {
                let gpa = base + Self.rxBuffers + UInt64(i) * Self.bufferSize
                rx.setDescriptor(i, addr: address(gpa), len: UInt32(Self.bufferSize), flags: 2)
                rx.stage(UInt16(i))
            }
            rx.publish()
            for (i, f) in frames.enumerated() {
                let gpa = base + Self.txBuffers + UInt64(i) * Self.bufferSize
                f.withUnsafeBytes { fe.guest.at(GuestPhysAddr(gpa), f.count).copyMemory(from: $0.baseAddress!, byteCount: f.count) }
                tx.setDescriptor(i, addr: address(gpa), len: UInt32(f.count))
                tx.stage(UInt16(i))
            }
            tx.publish()
            var got: [[UInt8]] = []
            let done = eventually(seconds) {
                while let u = rx.takeUsed() {
                    let p = fe.guest.at(GuestPhysAddr(base + Self.rxBuffers + UInt64(u.id) * Self.bufferSize), Int(u.len))
                    got.append(Array(UnsafeRawBufferPointer(start: p, count: Int(u.len))))
                }
                while tx.takeUsed() != nil {}
                return got.count == frames.count
            }
            if !done { throw FrontEndError("\(got.count) of \(frames.count) frames came back") }
            return try got.map { f in
                guard f.count >= 12, f[10] == 1, f[11] == 0, f[0..<10].allSatisfy({ $0 == 0 }) else {
                    throw FrontEndError("RX header \(f.prefix(12)): num_buffers must be 1, the rest as sent")
                }
                return Array(f.dropFirst(12))
            }
        }
    }

    static func frames(_ n: Int, seed: UInt64) -> [[UInt8]] {
        var rng = SplitMix(state: seed)
        return (0..<n).map { _ in (0..<(60 + Int(rng.next() % 1400))).map { _ in UInt8(truncatingIfNeeded: rng.next()) } }
    }

    static let plainFeatures = VhostUserFeature.version1 | VhostUserFeature.protocolFeatures | VhostUserFeature.indirectDesc

    /// A well-behaved front-end without a vIOMMU: negotiates, passes its memory
    /// table, lays its rings and gets `n` frames through, byte-exact.
    @discardableResult
    static func plainTraffic(_ fe: VhostUserFrontEnd, frames n: Int, seed: UInt64) throws -> Traffic {
        try fe.negotiate(features: plainFeatures, protocol: VhostUserProtocolFeature.replyAck)
        #expect(try fe.setMemTable() == 0)
        let t = try Traffic(fe, ringAddress: fe.uaddr, address: { $0 })
        let sent = frames(n, seed: seed)
        #expect(try t.loop(sent) == sent)
        return t
    }

    /// Device "other" with a built-in guest (64 B, static), on the one datapath
    /// thread a LiveDaemon has: the tenant a hostile front-end must not stop.
    static func startOtherTenant(_ d: LiveDaemon) throws {
        try d.expect(201, "POST", "/v1/devices", #"{"id":"other"}"#)
        try d.expect(200, "PUT", "/v1/devices/other/workload", #"{"packet_size":64,"page_size":"2m","mapping":"static"}"#)
        // Moving before anything hostile starts: a slow start (TSan, a loaded
        // machine) must not read as harm done by what comes next.
        #expect(try eventually { try otherMoves(d) }, "the other tenant never started moving frames")
    }

    /// Whether "other" received frames within `seconds`, every one verified.
    static func otherMoves(_ d: LiveDaemon, seconds: Double = 0.1) throws -> Bool {
        func received() throws -> Int64 {
            let w = try d.expect(200, "GET", "/v1/devices/other/workload")
            #expect(w["verify_errors"] == 0)
            if case .int(let n)? = w["received"] { return n }
            return -1
        }
        let r0 = try received()
        usleep(UInt32(seconds * 1e6))
        return try received() > r0
    }

    @Test("IOTLB off: negotiation, memory table from a file, frames loop back byte-exact, calls signalled")
    func loopbackWithoutIOTLB() throws {
        let d = try LiveDaemon()
        let path = Self.socketPath("off")
        let created = try d.expect(201, "POST", "/v1/devices", #"{"id":"vu","iotlb":false,"vhost_user":{"socket":"\#(path)"}}"#)
        #expect(created["vhost_user"]?["socket"] == .string(path))
        #expect(created["vhost_user"]?["connected"] == .bool(false))

        let fe = try VhostUserFrontEnd(path: path, gpa: 0, uaddr: 0x7f00_0000_0000)
        let offered = try fe.get64(.getFeatures)
        #expect(offered & VhostUserFeature.version1 != 0)
        #expect(offered & VhostUserFeature.accessPlatform == 0, "no ACCESS_PLATFORM without the device IOTLB")
        let (features, proto) = try fe.negotiate(features: Self.plainFeatures,
                                                 protocol: VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.mq)
        #expect(features == Self.plainFeatures)
        #expect(try fe.get64(.getQueueNum) == 1)
        #expect(try fe.setMemTable() == 0)

        // The front-end's table is the device's table.
        let mt = try d.expect(200, "GET", "/v1/devices/vu/mem-table")
        #expect(mt["regions"]?[0]?["guest_phys_addr"] == .string("0x0"))
        #expect(mt["regions"]?[0]?["memory_size"] == .string("0x800000"))
        #expect(mt["regions"]?[0]?["userspace_addr"] == .string("0x7f0000000000"))

        let t = try Traffic(fe, ringAddress: fe.uaddr, address: { $0 })
        let vr = try d.expect(200, "GET", "/v1/devices/vu/vrings/1")
        #expect(vr["state"] == .string("running"))
        #expect(vr["desc_addr"] == .string("0x7f0000020000"), "ring addresses are the front-end's user addresses")

        let sent = Self.frames(64, seed: 1)
        #expect(try t.loop(sent) == sent)

        // The driver left interrupts on (avail flags 0): the call eventfd was signalled.
        var calls: UInt64 = 0
        #expect(read(t.rxCall, &calls, 8) == 8 && calls > 0)
        let dev = try d.expect(200, "GET", "/v1/devices/vu")
        #expect(dev["vhost_user"]?["connected"] == .bool(true))
        #expect(dev["vhost_user"]?["features"] == .hex(features))
        #expect(dev["vhost_user"]?["protocol_features"] == .hex(proto))

        // Idle, the datapath asks drivers to kick before it sleeps (used flags 0,
        // not VRING_USED_F_NO_NOTIFY), and a kick reaches it.
        let usedFlags = { fe.guest.at(t.tx.layout.usedGPA, 2).loadUnaligned(as: UInt16.self) }
        #expect(eventually { usedFlags() == 0 })
        var kick: UInt64 = 1
        #expect(write(t.txKick, &kick, 8) == 8)
        #expect(try eventually { try d.expect(200, "GET", "/v1/devices/vu")["vhost_user"]?["kicks"] == .int(1) })
        let metrics = try d.call("GET", "/metrics").text
        #expect(metrics.contains(#"iotlbd_vhost_user_connected{device="vu"} 1"#))
        #expect(metrics.contains(#"iotlbd_vhost_user_connections_total{device="vu"} 1"#))

        // The HTTP API does not touch what the front-end owns.
        try d.expectError(409, "conflict", "PUT", "/v1/devices/vu/mem-table",
                          #"{"regions":[{"guest_phys_addr":0,"memory_size":4096,"userspace_addr":4096}]}"#)
        try d.expectError(409, "conflict", "PUT", "/v1/devices/vu/vrings/0",
                          #"{"num":64,"desc_addr":0,"avail_addr":4096,"used_addr":8192}"#)
        try d.expectError(409, "conflict", "PUT", "/v1/devices/vu/workload", "{}")

        // GET_VRING_BASE stops the ring where it is.
        #expect(try fe.vringBase(1) == 64)
        #expect(try d.expect(200, "GET", "/v1/devices/vu/vrings/1")["state"] == .string("disabled"))
        // Started again (a new kick eventfd) without SET_VRING_BASE: it carries on from there.
        try fe.set64(.setVringKick, 1, fds: [fe.eventFD()])
        var enable = PayloadWriter()
        enable.u32(1); enable.u32(1)
        #expect(try fe.acked(.setVringEnable, enable.bytes) == 0)
        let restarted = try d.expect(200, "GET", "/v1/devices/vu/vrings/1")
        #expect(restarted["state"] == .string("running"))
        #expect(restarted["last_avail_idx"] == .int(64))
        // SET_VRING_BASE belongs to a stopped ring: a running one reports where it stopped.
        try fe.state(.setVringBase, 0, 7)
        #expect(try fe.vringBase(0) == 64)

        // A ring disabled before GET_VRING_BASE (SET_VRING_ENABLE 0, as DPDK's
        // virtio-user stops its device) reports where it stopped, not the base
        // it was last given (64): a front-end restarting from the answer would
        // hand the device buffers it already used.
        try fe.set64(.setVringKick, 0, fds: [fe.eventFD()])
        var enableRX = PayloadWriter()
        enableRX.u32(0); enableRX.u32(1)
        #expect(try fe.acked(.setVringEnable, enableRX.bytes) == 0)
        let more = Self.frames(8, seed: 3)
        #expect(try t.loop(more) == more)
        var disable = PayloadWriter()
        disable.u32(1); disable.u32(0)
        #expect(try fe.acked(.setVringEnable, disable.bytes) == 0)
        #expect(try d.expect(200, "GET", "/v1/devices/vu/vrings/1")["state"] == .string("disabled"))
        #expect(try fe.vringBase(1) == 72)
        // Enabled again, it carries on from there.
        try fe.set64(.setVringKick, 1, fds: [fe.eventFD()])
        #expect(try fe.acked(.setVringEnable, enable.bytes) == 0)
        #expect(try d.expect(200, "GET", "/v1/devices/vu/vrings/1")["last_avail_idx"] == .int(72))
    }

    @Test("IOTLB on without a vIOMMU (DPDK virtio-user): identity translation, 2 MiB clipped to the region")
    func identityTranslation() throws {
        let d = try LiveDaemon()
        let path = Self.socketPath("identity")
        try d.expect(201, "POST", "/v1/devices", #"{"id":"vu","vhost_user":{"socket":"\#(path)"}}"#)
        // 3 MiB at GPA 1 GiB: the second 2 MiB page is clipped to 1 MiB.
        let fe = try VhostUserFrontEnd(path: path, gpa: 0x4000_0000, size: 3 << 20, uaddr: 0x7f00_0000_0000)
        let (features, _) = try fe.negotiate(features: Self.plainFeatures, protocol: VhostUserProtocolFeature.replyAck)
        #expect(features & VhostUserFeature.accessPlatform == 0)
        #expect(try fe.setMemTable() == 0)
        let base = fe.region.guestPhysAddr
        let t = try Traffic(fe, ringAddress: fe.uaddr, address: { $0 })
        // The ring addresses become guest-physical: IOVAs under identity.
        #expect(try d.expect(200, "GET", "/v1/devices/vu/vrings/0")["desc_addr"] == .hex(base + 0x1_0000))
        let sent = Self.frames(40, seed: 2)
        #expect(try t.loop(sent) == sent)
        let entries = try d.expect(200, "GET", "/v1/devices/vu/iotlb/entries")["entries"]
        #expect(entries?[0]?["iova"] == .hex(base))
        #expect(entries?[0]?["size"] == .hex(2 << 20))
        #expect(entries?[0]?["uaddr"] == .string("0x7f0000000000"))
        #expect(entries?[0]?["perm"] == .string("rw"))
        let stats = try d.expect(200, "GET", "/v1/devices/vu/iotlb/stats")
        #expect((stats["misses"]?.intValue ?? 0) >= 1)
        #expect(stats["pending_misses"] == .int(0))
        let dev = try d.expect(200, "GET", "/v1/devices/vu")
        #expect((dev["vhost_user"]?["identity_updates"]?.intValue ?? 0) >= 1)

        // The identity entry of the second page ends with the region.
        let table = try MemoryTable(regions: [fe.region.region])
        let clipped = VhostUserSession.identityEntry(for: IOVA(base + (2 << 20) + 5), in: table)
        #expect(clipped?.range.first == IOVA(base + (2 << 20)))
        #expect(clipped?.range.size == 1 << 20)
        #expect(clipped?.uaddr == UserAddr(0x7f00_0000_0000 + (2 << 20)))
        #expect(VhostUserSession.identityEntry(for: IOVA(base + (3 << 20)), in: table) == nil)
    }

    @Test("IOTLB on with the front-end as vIOMMU: misses on the backend channel and the long-poll, IOTLB_MSG updates and invalidations")
    func frontEndIOMMU() throws {
        let d = try LiveDaemon()
        let path = Self.socketPath("viommu")
        try d.expect(201, "POST", "/v1/devices", #"{"id":"vu","translator":"external","vhost_user":{"socket":"\#(path)"}}"#)
        let fe = try VhostUserFrontEnd(path: path, gpa: 0, uaddr: 0x7f00_0000_0000)
        let wantProto = VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.backendReq
        let (features, proto) = try fe.negotiate(features: Self.plainFeatures | VhostUserFeature.accessPlatform,
                                                 protocol: wantProto)
        #expect(features & VhostUserFeature.accessPlatform != 0)
        #expect(proto == wantProto)
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        defer { close(pair[0]) }
        try fe.send(.setBackendReqFD, fds: [pair[1]])
        close(pair[1])
        #expect(try fe.setMemTable() == 0)

        // The guest's DMA space: IOVA = GPA + 4 GiB, mapped by us (the vIOMMU) on demand.
        let shift: UInt64 = 0x1_0000_0000
        let t = try Traffic(fe, ringAddress: { $0 + shift }, address: { $0 + shift })
        let (header, payload) = try VhostUserFrontEnd.readMessage(pair[0])
        #expect(header.request == VhostUserBackendRequest.iotlbMsg.rawValue)
        let miss = try #require(VhostIOTLBMessage(payload))
        #expect(miss.kind == VhostIOTLBMessage.Kind.miss.rawValue)
        #expect(miss.iova >= shift && miss.iova < shift + 0x3_0000, "a ring address missed first")
        // The same miss is on the HTTP long-poll.
        let polled = try d.expect(200, "GET", "/v1/devices/vu/iotlb/misses?after=0&timeout_ms=2000")
        #expect(polled["misses"]?[0]?["iova"] == .hex(miss.iova))

        // Answer every miss with the 2 MiB page around it, from a thread of our own.
        let answering = Locked(true)
        let backendFD = pair[0]
        let answerer = startThread(name: "viommu") {
            var next: VhostIOTLBMessage? = miss
            while answering.withLock({ $0 }) {
                if let m = next {
                    let page = m.iova & ~UInt64((2 << 20) - 1)
                    let update = VhostIOTLBMessage(iova: page, size: 2 << 20, uaddr: fe.uaddr(page - shift), perm: 3, kind: .update)
                    guard (try? fe.acked(.iotlbMsg, update.bytes)) == 0 else { return }
                }
                next = (try? VhostUserFrontEnd.readMessage(backendFD, timeoutMs: 50)).flatMap { VhostIOTLBMessage($0.1) }
            }
        }
        let sent = Self.frames(32, seed: 3)
        #expect(try t.loop(sent) == sent)
        answering.withLock { $0 = false }
        pthread_join(answerer, nil)
        let entries = try d.expect(200, "GET", "/v1/devices/vu/iotlb/entries")["entries"]
        #expect(entries?[0]?["iova"] == .hex(shift))
        #expect(entries?[0]?["uaddr"] == .string("0x7f0000000000"))
        #expect((try d.expect(200, "GET", "/v1/devices/vu")["vhost_user"]?["misses_forwarded"]?.intValue ?? 0) >= 1)

        // An invalidation through the socket removes the entry; an update the
        // memory table does not back is refused and changes nothing.
        #expect(try fe.acked(.iotlbMsg, VhostIOTLBMessage(iova: shift, size: 8 << 20, uaddr: 0, perm: 0, kind: .invalidate).bytes) == 0)
        #expect(try d.expect(200, "GET", "/v1/devices/vu/iotlb/entries")["entries"] == .array([]))
        let unbacked = VhostIOTLBMessage(iova: 0, size: 4096, uaddr: 0x1000, perm: 3, kind: .update)
        #expect(try fe.acked(.iotlbMsg, unbacked.bytes) == 1)
        #expect(try d.expect(200, "GET", "/v1/devices/vu/iotlb/entries")["entries"] == .array([]))
        // The HTTP API still owns the IOTLB too.
        try d.expect(200, "POST", "/v1/devices/vu/iotlb/updates",
                     #"{"iova":"0x100000000","size":"0x200000","uaddr":"0x7f0000000000","perm":"rw"}"#)
        #expect(try d.expect(200, "GET", "/v1/devices/vu/iotlb/entries")["entries"]?[0]?["iova"] == .hex(shift))
    }

    @Test("disconnect and reconnect: the device goes back to waiting, nothing leaks, traffic resumes")
    func reconnect() throws {
        let d = try LiveDaemon()
        let path = Self.socketPath("reconnect")
        try d.expect(201, "POST", "/v1/devices", #"{"id":"vu","iotlb":false,"vhost_user":{"socket":"\#(path)"}}"#)
        var eventIDs: Set<Int> = []
        for round in 0..<6 {
            do {
                let fe = try VhostUserFrontEnd(path: path)
                try Self.plainTraffic(fe, frames: 16, seed: UInt64(10 + round))
                eventIDs.formUnion(fe.eventIDs)
            }  // the front-end closes its socket, files and eventfds here
            #expect(try eventually {
                let dev = try d.expect(200, "GET", "/v1/devices/vu")
                return dev["vhost_user"]?["connected"] == .bool(false) && dev["mem_table"] == .null
                    && dev["vrings"]?[1]?["state"] == .string("disabled")
            })
        }
        // Memory files, their mappings, kick and call eventfds: the daemon holds none.
        #expect(leftoversOfFrontEnds(eventIDs: eventIDs) == [])
        #expect(try d.expect(200, "GET", "/v1/devices/vu")["vhost_user"]?["connections"] == .int(6))
        // Deleting the device removes its socket.
        try d.expect(204, "DELETE", "/v1/devices/vu")
        #expect(access(path, F_OK) != 0)
    }

    @Test("a front-end that shrinks its memory file loses its connection; the daemon and another device on the same worker go on")
    func truncatedMemoryFile() throws {
        let d = try LiveDaemon()  // one datapath thread: both devices share it
        try Self.startOtherTenant(d)
        let path = Self.socketPath("shrink")
        try d.expect(201, "POST", "/v1/devices", #"{"id":"vu","iotlb":false,"vhost_user":{"socket":"\#(path)"}}"#)
        let fe = try VhostUserFrontEnd(path: path)
        let t = try Self.plainTraffic(fe, frames: 16, seed: 77)
        // The front-end takes its memory away under the datapath, which polls the rings.
        #expect(ftruncate(fe.memFD, 0) == 0)
        var kick: UInt64 = 1
        _ = write(t.txKick, &kick, 8)  // wake the worker if it dozes
        #expect(try eventually(10) {
            let v = try d.expect(200, "GET", "/v1/devices/vu")["vhost_user"]
            guard case .int(let faults)? = v?["memory_faults"], faults > 0, v?["connected"] == .bool(false),
                  case .string(let why)? = v?["last_error"] else { return false }
            return why.contains("shrank its memory file")
        }, "the connection ends with the reason")
        #expect(try d.call("GET", "/metrics").text.contains(#"iotlbd_vhost_user_memory_faults_total{device="vu"} "#))
        // The daemon is up and the other device's traffic goes on.
        #expect(try Self.otherMoves(d, seconds: 0.3), "the other device still moves frames")
        #expect(try d.expect(200, "GET", "/healthz")["status"] == "ok")
        // A new front-end with a good file is served again.
        try Self.plainTraffic(VhostUserFrontEnd(path: path), frames: 16, seed: 78)
    }
}


extension JSON {
    subscript(index: Int) -> JSON? {
        if case .array(let a) = self, a.indices.contains(index) { return a[index] }
        return nil
    }

    var intValue: Int? {
        if case .int(let v) = self { return Int(v) }
        return nil
    }
}
