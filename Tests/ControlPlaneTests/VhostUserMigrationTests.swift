// Live migration's vhost-user messages against a front-end written from the
// protocol document (vhost-user.rst): LOG_ALL and LOG_SHMFD offered,
// SET_LOG_BASE mapping the log at its offset and replying, SET_FEATURES
// turning logging on and off mid-run, SET_VRING_ADDR's VHOST_VRING_F_LOG,
// GET_VRING_BASE, SEND_RARP.
import CUnixSocket
import Glibc
import Guest
import IOTLB
import Testing
import TestSupport
import Vhost
@testable import VhostUser
import JSON

@Suite("vhost-user: live migration", .serialized)
struct VhostUserMigrationTests {
    /// Guest memory at GPA 1 GiB (a GPA is not an offset), 8 MiB: the log
    /// covers GPAs below 1 GiB + 8 MiB, 33024 bytes; it sits 4096 bytes into its file.
    static let gpa: UInt64 = 0x4000_0000
    static let logSize = 33024, logOffset = 4096

    func setVringAddr(_ fe: VhostUserFrontEnd, _ index: Int, _ l: RingLayout, log: UInt64?) throws {
        var w = PayloadWriter()
        w.u32(UInt32(index)); w.u32(log == nil ? 0 : 1)
        w.u64(fe.uaddr(l.descGPA.raw)); w.u64(fe.uaddr(l.usedGPA.raw)); w.u64(fe.uaddr(l.availGPA.raw))
        w.u64(log ?? 0)
        try fe.send(.setVringAddr, w.bytes)
    }

    func setFeatures(_ fe: VhostUserFrontEnd, _ f: UInt64) throws -> UInt64 {
        var w = PayloadWriter()
        w.u64(f)
        return try fe.acked(.setFeatures, w.bytes)
    }

    @Test("LOG_ALL with SET_LOG_BASE and F_LOG: exactly the written pages' bits; GET_VRING_BASE; SEND_RARP; logging off again")
    func loggingThroughTheProtocol() throws {
        let d = try LiveDaemon()
        let path = VhostUserTests.socketPath("mig")
        try d.expect(201, "POST", "/v1/devices", #"{"id":"vm","iotlb":false,"vhost_user":{"socket":"\#(path)"}}"#)
        let fe = try VhostUserFrontEnd(path: path, gpa: Self.gpa, uaddr: 0x7f00_0000_0000)
        #expect(try fe.get64(.getFeatures) & VhostUserFeature.logAll != 0)
        let wanted = VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.logShmFD | VhostUserProtocolFeature.rarp
        let (features, proto) = try fe.negotiate(features: VhostUserTests.plainFeatures, protocol: wanted)
        #expect(proto == wanted)
        #expect(try fe.setMemTable() == 0)
        let t = try VhostUserTests.Traffic(fe, ringAddress: fe.uaddr, address: { $0 })
        let before = VhostUserTests.frames(8, seed: 1)
        #expect(try t.loop(before) == before)

        // The log: a file with the log 4096 bytes in.
        var name = Array("/dev/shm/vu-log-XXXXXX".utf8CString)
        let logFD = mkstemp(&name)
        #expect(logFD >= 0)
        name.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        defer { close(logFD) }
        #expect(ftruncate(logFD, off_t(Self.logOffset + Self.logSize)) == 0)
        let mapped = mmap(nil, Self.logOffset + Self.logSize, PROT_READ, MAP_SHARED, logFD, 0)!
        defer { munmap(mapped, Self.logOffset + Self.logSize) }
        let log = mapped + Self.logOffset
        func dirty() -> Set<UInt64> {
            var s = Set<UInt64>()
            for i in 0..<Self.logSize {
                let b = log.load(fromByteOffset: i, as: UInt8.self)
                for k in 0..<8 where b & (1 << k) != 0 { s.insert(UInt64(i * 8 + k)) }
            }
            return s
        }
        var w = PayloadWriter()
        w.u64(UInt64(Self.logSize)); w.u64(UInt64(Self.logOffset))
        try fe.send(.setLogBase, w.bytes, fds: [logFD])
        #expect(try fe.reply(to: .setLogBase).isEmpty, "QEMU reads a reply without payload")
        #expect(try setFeatures(fe, features | VhostUserFeature.logAll) == 0)
        // QEMU's order: features, then each ring's log address (the used ring's GPA without a vIOMMU).
        try setVringAddr(fe, 0, t.rx.layout, log: t.rx.layout.usedGPA.raw)
        try setVringAddr(fe, 1, t.tx.layout, log: t.tx.layout.usedGPA.raw)
        var dev = try d.expect(200, "GET", "/v1/devices/vm")
        #expect(dev["dirty_log"]?["enabled"] == .bool(true))
        #expect(dev["dirty_log"]?["size"] == .string("0x8100"))

        let during = VhostUserTests.frames(8, seed: 2)
        #expect(try t.loop(during) == during)
        // RX buffers (8 of 2 KiB from 1 MiB in), both used rings; not the TX buffers nor the rings' other areas.
        let page = { (g: UInt64) in g >> 12 }
        var want = Set((0..<8).map { page(Self.gpa + VhostUserTests.Traffic.rxBuffers + UInt64($0) * 2048) })
        want.insert(page(t.rx.layout.usedGPA.raw))
        want.insert(page(t.tx.layout.usedGPA.raw))
        #expect(eventually { dirty() == want })
        dev = try d.expect(200, "GET", "/v1/devices/vm")
        #expect(dev["dirty_log"]?["faults"] == .int(0))
        if case .int(let n)? = dev["dirty_log"]?["pages_logged"] { #expect(n >= Int64(want.count)) } else { Issue.record("pages_logged") }
        let metrics = try d.call("GET", "/metrics").text
        #expect(metrics.contains(#"iotlbd_dirty_log_enabled{device="vm"} 1"#))
        #expect(metrics.contains(#"iotlbd_dirty_log_faults_total{device="vm"} 0"#))

        // GET_VRING_BASE: TX stopped exactly after its 16 chains, the RX queue still runs.
        #expect(try fe.vringBase(1) == 16)
        #expect(try d.expect(200, "GET", "/v1/devices/vm/vrings/1")["state"] == .string("disabled"))

        // SEND_RARP: the loopback puts the announcement in the RX queue, logged like any frame.
        let mac: [UInt8] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]
        let rxAt = Self.gpa + VhostUserTests.Traffic.rxBuffers + 0x8000
        t.rx.setDescriptor(0, addr: rxAt, len: 2048, flags: 2)
        t.rx.offer(0)
        var v: UInt64 = 0
        for (i, b) in mac.enumerated() { v |= UInt64(b) << (8 * UInt64(i)) }
        w = PayloadWriter()
        w.u64(v)
        try fe.send(.sendRARP, w.bytes)
        var used: UsedElement?
        #expect(eventually { used = t.rx.takeUsed(); return used != nil })
        #expect(used?.len == 72)
        let got = Array(UnsafeRawBufferPointer(start: fe.guest.at(GuestPhysAddr(rxAt), 72), count: 72))
        #expect(Array(got[12...]) == Device.rarpFrame(mac: mac))
        #expect(got[10] == 1, "num_buffers")
        #expect(eventually { dirty().contains(page(rxAt)) })
        dev = try d.expect(200, "GET", "/v1/devices/vm")
        #expect(dev["vhost_user"]?["announcements"] == .int(1))

        // Logging off mid-run (migration cancelled): the device says so.
        #expect(try setFeatures(fe, features) == 0)
        #expect(try d.expect(200, "GET", "/v1/devices/vm")["dirty_log"]?["enabled"] == .bool(false))
    }

    @Test("SET_LOG_BASE with a log past the end of its file ends the connection (pages would go unlogged)")
    func logPastItsFile() throws {
        let d = try LiveDaemon()
        let path = VhostUserTests.socketPath("migbad")
        try d.expect(201, "POST", "/v1/devices", #"{"id":"vm","iotlb":false,"vhost_user":{"socket":"\#(path)"}}"#)
        let fe = try VhostUserFrontEnd(path: path)
        try fe.negotiate(features: VhostUserTests.plainFeatures,
                         protocol: VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.logShmFD)
        var name = Array("/dev/shm/vu-log-XXXXXX".utf8CString)
        let logFD = mkstemp(&name)
        name.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        defer { close(logFD) }
        #expect(ftruncate(logFD, 4096) == 0)
        var w = PayloadWriter()
        w.u64(8192); w.u64(0)
        try fe.send(.setLogBase, w.bytes, fds: [logFD])
        #expect(throws: (any Error).self) { _ = try fe.reply(to: .setLogBase) }
        #expect(eventually { (try? d.expect(200, "GET", "/v1/devices/vm"))?["vhost_user"]?["connected"] == .bool(false) })
    }
}
