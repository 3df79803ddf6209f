import Glibc
import Guest
import IOTLB
import Testing
@testable import Vhost

/// Chains and logs built to make the device write past its dirty log
/// (CVE-2019-14835 was a guest's chain overflowing the kernel's log array):
/// nothing is written outside the log, and the queue fails with a reason.
/// Also run under AddressSanitizer (`make test-asan`).
@Suite("Dirty logging: hostile chains and short logs")
struct DirtyLogHostileTests {
    typealias P = LogRig
    /// A log of 1000 bytes: 8000 pages, guest-physical memory below 0x1f40000 (region 0 only).
    static let shortLog = 1000

    /// The bytes of the log's page after its end stay zero (a write past the log would land there).
    func tailIsClean(_ rig: LogRig) -> Bool {
        let p = rig.log.base
        return (Int(rig.log.size)..<4096).allSatisfy { p.load(fromByteOffset: $0, as: UInt8.self) == 0 }
    }

    func rings(_ rig: LogRig, rxAt: UInt64 = 0x10000) throws -> (LoggedSplitRing, LoggedSplitRing) {
        let rx = try LoggedSplitRing(rig, at: rxAt)
        let tx = try LoggedSplitRing(rig, at: 0x20000)
        _ = try rig.device.setVring(0, rx.config)
        _ = try rig.device.setVring(1, tx.config)
        rig.startLogging()
        return (rx, tx)
    }

    func send(_ rig: LogRig, _ tx: LoggedSplitRing, _ frame: [UInt8]) throws {
        rig.write(0x30_0000, frame)
        tx.driver.setDescriptor(0, addr: try rig.map(gpa: 0x30_0000, bytes: 0x1000, perm: .read), len: UInt32(frame.count))
        tx.driver.offer(0)
    }

    @Test("an RX buffer past a log shorter than memory: not written, the queue fails with a reason")
    func bufferPastTheLog() throws {
        let rig = try LogRig(logBytes: Self.shortLog)
        let (rx, tx) = try rings(rig)
        let rxBuf = P.highGPA + 0x50_0000  // region 1: past the short log
        rig.write(rxBuf, [UInt8](repeating: 0xee, count: 256))
        rx.driver.setDescriptor(0, addr: try rig.map(gpa: rxBuf, bytes: 0x1000), len: 2048, flags: Descriptor.write)
        rx.driver.offer(0)
        try send(rig, tx, LogRig.frame(100, seed: 1))
        rig.run()
        let v = rig.vring(0)
        #expect(v.state == .failed)
        #expect(v.failure?.contains("dirty log: an RX buffer write at guest-physical 0x40500000") == true)
        #expect(rig.read(rxBuf, 256) == [UInt8](repeating: 0xee, count: 256))  // nothing written
        #expect(rx.driver.takeUsed() == nil && tx.driver.takeUsed() == nil)
        let s = rig.device.dirtyLogSnapshot()
        #expect(s.faults == 1 && s.lastFault == v.failure)
        #expect(tailIsClean(rig))
    }

    @Test("a chain of 16 buffers whose last lies past the log: the queue fails, no bit past the log")
    func longChainEndingPastTheLog() throws {
        let rig = try LogRig(logBytes: Self.shortLog)
        let (rx, tx) = try rings(rig)
        // 15 buffers of 100 bytes in region 0, the 16th in region 1; a 1600-byte frame needs all.
        for i in 0..<16 {
            let gpa = i < 15 ? 0x60_0000 + UInt64(i) * 0x1000 : P.highGPA + 0x60_0000
            rx.driver.setDescriptor(i, addr: try rig.map(gpa: gpa, bytes: 0x1000), len: 100,
                                    flags: Descriptor.write | (i < 15 ? Descriptor.next : 0), next: UInt16(i + 1))
        }
        rx.driver.offer(0)
        try send(rig, tx, LogRig.frame(1600, seed: 2))
        rig.run()
        #expect(rig.vring(0).state == .failed)
        #expect(rig.dirty.allSatisfy { $0 < rig.log.pages })
        #expect(rx.driver.takeUsed() == nil)
        #expect(tailIsClean(rig))
    }

    @Test("an endless chain (a descriptor naming itself) under logging: the walk ends, the queue fails")
    func endlessChain() throws {
        let rig = try LogRig(logBytes: Self.shortLog)
        let (rx, tx) = try rings(rig)
        rx.driver.setDescriptor(0, addr: try rig.map(gpa: 0x60_0000, bytes: 0x1000), len: 8,
                                flags: Descriptor.write | Descriptor.next, next: 0)
        rx.driver.offer(0)
        try send(rig, tx, LogRig.frame(1500, seed: 3))
        rig.run()
        #expect(rig.vring(0).state == .failed)
        #expect(rig.vring(0).failure?.contains("loops") == true)
        #expect(tailIsClean(rig))
    }

    @Test("a huge indirect table whose buffers all lie past the log: the first one fails the queue")
    func hugeIndirectPastTheLog() throws {
        let rig = try LogRig(logBytes: Self.shortLog)
        let (rx, tx) = try rings(rig)
        let table: UInt64 = 0x70_0000, far = P.highGPA + 0x10_0000
        let farIOVA = try rig.map(gpa: far, bytes: 0x10_0000)
        let entries = 4096  // 64 KiB of descriptors, each 256 bytes far past the log
        for i in 0..<entries {
            SplitRingDriver.write(descriptorAt: rig.memory.at(GuestPhysAddr(table + UInt64(16 * i)), 16),
                                  addr: farIOVA + UInt64(i % 4096) * 256, len: 256,
                                  flags: Descriptor.write | (i + 1 < entries ? Descriptor.next : 0), next: UInt16(i + 1))
        }
        rx.driver.setDescriptor(0, addr: try rig.map(gpa: table, bytes: 0x10000), len: UInt32(16 * entries),
                                flags: Descriptor.indirect)
        rx.driver.offer(0)
        try send(rig, tx, LogRig.frame(1500, seed: 4))
        rig.run()
        #expect(rig.vring(0).state == .failed)
        #expect(rig.vring(0).failure?.contains("past the log") == true)
        #expect(rig.dirty.isEmpty && tailIsClean(rig))
    }

    @Test("a used ring past the log: the queue fails before it runs; a log covering it lets it run again")
    func usedRingPastTheLog() throws {
        let rig = try LogRig(logBytes: Self.shortLog)
        let (rx, _) = try rings(rig, rxAt: P.highGPA + 0x10000)
        rig.run()
        #expect(rig.vring(0).state == .failed)
        #expect(rig.vring(0).failure?.contains("the used ring at guest-physical 0x40011000") == true)
        #expect(rig.dirty.isEmpty && tailIsClean(rig))
        // The front-end gives a log large enough and sets the ring again.
        rig.device.setDirtyLog(try DirtyLog(bytes: DirtyLog.bytes(covering: P.highGPA + P.regionSize - 1)))
        _ = try rig.device.setVring(0, rx.config)
        rig.run()
        #expect(rig.vring(0).state == .running)
    }

    @Test("a mapped log: SET_LOG_BASE's offset and size, a file too short refused")
    func mappedLog() throws {
        var name = Array("/tmp/iotlbd-log-XXXXXX".utf8CString)
        let fd = mkstemp(&name)
        unlink(String(decoding: name.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self))
        defer { close(fd) }
        #expect(ftruncate(fd, 8192) == 0)
        let log = try DirtyLog(fd: fd, size: 4096, offset: 4096)
        #expect(log.pages == 32768)
        #expect(throws: (any Error).self) { try DirtyLog(fd: fd, size: 8192, offset: 4096) }
        #expect(throws: (any Error).self) { try DirtyLog(fd: fd, size: 0, offset: 0) }
        #expect(throws: (any Error).self) { try DirtyLog(fd: fd, size: .max, offset: 2) }
    }
}
