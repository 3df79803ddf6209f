// A vhost-user front-end for tests: speaks the protocol over the device's
// socket, shares its memory through a file (as QEMU and DPDK do), and drives
// split rings laid in that memory with the guest's ring driver.
import CUnixSocket
import Foundation
import Glibc
import Guest
import IOTLB
import Platform
import Vhost
import VhostUser

struct FrontEndError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

final class VhostUserFrontEnd: @unchecked Sendable {
    let conn: Int32
    /// The file behind guest memory, and the memory mapped from it (our view).
    let memFD: Int32
    let memory: GuestMemory
    let guest: GuestPhysicalMemory
    let region: VhostUserMemoryRegion

    /// Connects to `path`; guest memory is `size` bytes at GPA `gpa`, "mapped"
    /// in the front-end at user address `uaddr` (the device never sees our
    /// real pointers, only these numbers and the file).
    convenience init(path: String, gpa: UInt64 = 0, size: UInt64 = 8 << 20, uaddr: UInt64 = 0x7f00_0000_0000) throws {
        var fd: Int32 = -1
        for _ in 0..<200 {  // the listener may be a moment behind the 201
            fd = cunixsock_connect(path)
            if fd >= 0 { break }
            usleep(5_000)
        }
        guard fd >= 0 else { throw FrontEndError("connect \(path): \(String(cString: strerror(errno)))") }
        try self.init(conn: fd, gpa: gpa, size: size, uaddr: uaddr)
    }

    /// A front-end in server mode (as QEMU's `server=on`, DPDK's `server=1`):
    /// waits up to `seconds` for the daemon to connect to `listenFD`.
    static func accepting(_ listenFD: Int32, seconds: Int32 = 10, size: UInt64 = 8 << 20) throws -> VhostUserFrontEnd {
        var p = pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, seconds * 1000) == 1 else { throw FrontEndError("the daemon did not connect within \(seconds) s") }
        let fd = cunixsock_accept(listenFD)
        guard fd >= 0 else { throw FrontEndError("accept: \(String(cString: strerror(errno)))") }
        return try VhostUserFrontEnd(conn: fd, size: size)
    }

    /// Takes over the connected socket `conn`.
    init(conn fd: Int32, gpa: UInt64 = 0, size: UInt64 = 8 << 20, uaddr: UInt64 = 0x7f00_0000_0000) throws {
        conn = fd
        var name = Array("/dev/shm/vu-frontend-XXXXXX".utf8CString)
        memFD = mkstemp(&name)
        guard memFD >= 0 else { throw FrontEndError("mkstemp: \(String(cString: strerror(errno)))") }
        name.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        guard ftruncate(memFD, off_t(size)) == 0 else { throw FrontEndError("ftruncate") }
        region = VhostUserMemoryRegion(guestPhysAddr: gpa, memorySize: size, userspaceAddr: uaddr, mmapOffset: 0)
        let table = try MemoryTable(regions: [region.region])
        memory = try GuestMemory(table: table, files: [(memFD, 0)])
        guest = GuestPhysicalMemory(memory)
    }

    /// Eventfds made for the device (closed with the front-end), and their
    /// kernel ids, to find copies the daemon failed to close.
    private(set) var eventFDs: [Int32] = []
    private(set) var eventIDs: Set<Int> = []

    deinit {
        close(conn)
        close(memFD)
        for fd in eventFDs { close(fd) }
    }

    /// A new eventfd, owned by the front-end.
    func eventFD() -> Int32 {
        let fd = cunixsock_eventfd()
        eventFDs.append(fd)
        if let id = eventfdID(fd) { eventIDs.insert(id) }
        return fd
    }

    /// The front-end's user address of `gpa` (what ring addresses are without a vIOMMU).
    func uaddr(_ gpa: UInt64) -> UInt64 { gpa - region.guestPhysAddr + region.userspaceAddr }

    // MARK: Messages

    func send(_ request: VhostUserRequest, _ payload: [UInt8] = [], fds: [Int32] = [], needReply: Bool = false) throws {
        try sendRaw(VhostUserHeader(request: request.rawValue,
                                    flags: VhostUserHeader.version | (needReply ? VhostUserHeader.needReplyFlag : 0),
                                    size: UInt32(payload.count)).bytes + payload, fds: fds)
    }

    func sendRaw(_ bytes: [UInt8], fds: [Int32] = []) throws {
        let n = bytes.withUnsafeBytes { b in fds.withUnsafeBufferPointer { f in
            cunixsock_send(conn, b.baseAddress, b.count, f.baseAddress, Int32(f.count))
        } }
        guard n == bytes.count else { throw FrontEndError("send: \(String(cString: strerror(errno)))") }
    }

    /// Reads one reply for `request` (waits up to 5 s).
    func reply(to request: VhostUserRequest) throws -> [UInt8] {
        let (header, payload) = try Self.readMessage(conn)
        guard header.request == request.rawValue, header.flags == VhostUserHeader.version | VhostUserHeader.replyFlag else {
            throw FrontEndError("unexpected reply \(header) to \(request)")
        }
        return payload
    }

    static func readMessage(_ fd: Int32, timeoutMs: Int32 = 5000) throws -> (VhostUserHeader, [UInt8]) {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, timeoutMs) == 1 else { throw FrontEndError("no message within \(timeoutMs) ms") }
        var head = [UInt8](repeating: 0, count: VhostUserHeader.size)
        guard head.withUnsafeMutableBytes({ recv(fd, $0.baseAddress, $0.count, Int32(MSG_WAITALL)) }) == head.count else {
            throw FrontEndError("connection closed")
        }
        let header = VhostUserHeader(head)
        var payload = [UInt8](repeating: 0, count: Int(header.size))
        if header.size > 0 {
            guard payload.withUnsafeMutableBytes({ recv(fd, $0.baseAddress, $0.count, Int32(MSG_WAITALL)) }) == payload.count else {
                throw FrontEndError("connection closed mid-message")
            }
        }
        return (header, payload)
    }

    func get64(_ request: VhostUserRequest) throws -> UInt64 {
        try send(request)
        var r = PayloadReader(try reply(to: request))
        guard let v = r.u64() else { throw FrontEndError("short reply") }
        return v
    }

    func set64(_ request: VhostUserRequest, _ v: UInt64, fds: [Int32] = []) throws {
        var w = PayloadWriter()
        w.u64(v)
        try send(request, w.bytes, fds: fds)
    }

    /// Sends with NEED_REPLY and returns the reply-ack's verdict (0 = success).
    func acked(_ request: VhostUserRequest, _ payload: [UInt8], fds: [Int32] = []) throws -> UInt64 {
        try send(request, payload, fds: fds, needReply: true)
        var r = PayloadReader(try reply(to: request))
        guard let v = r.u64() else { throw FrontEndError("short ack") }
        return v
    }

    func state(_ request: VhostUserRequest, _ index: Int, _ num: UInt32) throws {
        var w = PayloadWriter()
        w.u32(UInt32(index)); w.u32(num)
        try send(request, w.bytes)
    }

    /// GET_VRING_BASE: stops the ring; returns where the device stopped.
    func vringBase(_ index: Int) throws -> UInt32 {
        var w = PayloadWriter()
        w.u32(UInt32(index)); w.u32(0)
        try send(.getVringBase, w.bytes)
        var r = PayloadReader(try reply(to: .getVringBase))
        guard r.u32() == UInt32(index), let v = r.u32() else { throw FrontEndError("bad GET_VRING_BASE reply") }
        return v
    }

    /// Features, protocol features (acknowledging what is offered and asked for), owner.
    @discardableResult
    func negotiate(features wanted: UInt64, protocol wantedProtocol: UInt64) throws -> (UInt64, UInt64) {
        let offered = try get64(.getFeatures)
        let features = offered & wanted
        try set64(.setFeatures, features)
        var proto: UInt64 = 0
        if features & VhostUserFeature.protocolFeatures != 0 {
            proto = try get64(.getProtocolFeatures) & wantedProtocol
            try set64(.setProtocolFeatures, proto)
        }
        try send(.setOwner)
        return (features, proto)
    }

    func memTablePayload(_ regions: [VhostUserMemoryRegion]) -> [UInt8] {
        var w = PayloadWriter()
        w.u32(UInt32(regions.count)); w.u32(0)
        for r in regions { w.u64(r.guestPhysAddr); w.u64(r.memorySize); w.u64(r.userspaceAddr); w.u64(r.mmapOffset) }
        return w.bytes
    }

    /// SET_MEM_TABLE with our one region; returns the reply-ack.
    func setMemTable() throws -> UInt64 { try acked(.setMemTable, memTablePayload([region]), fds: [memFD]) }

    /// Lays ring `index` at guest-physical `base`, hands it to the device
    /// (addresses through `address`: user addresses, or IOVAs with a vIOMMU),
    /// with a call and a kick eventfd, then enables it.
    func setUpRing(_ index: Int, num: Int, at base: UInt64, address: (UInt64) -> UInt64,
                   enable: Bool = true) throws -> (driver: SplitRingDriver, call: Int32, kick: Int32) {
        let layout = RingLayout.consecutive(num: num, at: GuestPhysAddr(base))
        let driver = SplitRingDriver(memory: guest, layout: layout)
        let call = eventFD(), kick = eventFD()
        try set64(.setVringCall, UInt64(index), fds: [call])
        try state(.setVringNum, index, UInt32(num))
        try state(.setVringBase, index, 0)
        var w = PayloadWriter()
        w.u32(UInt32(index)); w.u32(0)
        w.u64(address(layout.descGPA.raw)); w.u64(address(layout.usedGPA.raw)); w.u64(address(layout.availGPA.raw))
        w.u64(0)
        try send(.setVringAddr, w.bytes)
        try set64(.setVringKick, UInt64(index), fds: [kick])
        if enable {
            // Acknowledged: the ring runs once this returns.
            var e = PayloadWriter()
            e.u32(UInt32(index)); e.u32(1)
            guard try acked(.setVringEnable, e.bytes) == 0 else { throw FrontEndError("SET_VRING_ENABLE refused") }
        }
        return (driver, call, kick)
    }
}

/// The kernel's id of an eventfd (Linux 6.0+), nil where fdinfo has none.
func eventfdID(_ fd: Int32) -> Int? {
    guard let text = try? String(contentsOfFile: "/proc/self/fdinfo/\(fd)", encoding: .utf8) else { return nil }
    for line in text.split(separator: "\n") where line.hasPrefix("eventfd-id:") {
        return Int(line.dropFirst("eventfd-id:".count).trimmingCharacters(in: .whitespaces))
    }
    return nil
}

/// What of test front-ends this process still holds once they are gone: memory
/// files open or mapped, and eventfds among `eventIDs`. Empty when the daemon
/// released everything a departed front-end passed it.
func leftoversOfFrontEnds(eventIDs: Set<Int>) -> [String] {
    var found: [String] = []
    let fm = FileManager.default
    for name in (try? fm.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
        guard let target = try? fm.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(name)") else { continue }
        if target.contains("vu-frontend") { found.append("fd \(name) → \(target)") }
        if target == "anon_inode:[eventfd]", let fd = Int32(name), let id = eventfdID(fd), eventIDs.contains(id) {
            found.append("fd \(name) → eventfd \(id)")
        }
    }
    let maps = (try? String(contentsOfFile: "/proc/self/maps", encoding: .utf8)) ?? ""
    for line in maps.split(separator: "\n") where line.contains("vu-frontend") { found.append("mapping \(line)") }
    return found
}

/// Polls `condition` every 2 ms for up to `seconds`.
func eventually(_ seconds: Double = 5, _ condition: () throws -> Bool) rethrows -> Bool {
    let end = monotonicNanos() + UInt64(seconds * 1e9)
    while monotonicNanos() < end {
        if try condition() { return true }
        usleep(2_000)
    }
    return try condition()
}
