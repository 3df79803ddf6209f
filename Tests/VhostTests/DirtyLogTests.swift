import Glibc
import Guest
import IOTLB
import Testing
@testable import Vhost

/// Dirty logging on hand-laid rings (LogRig: IOVA, user address and GPA all
/// differ, regions crosswise): each write path sets exactly the bits of the
/// guest-physical pages it wrote.
@Suite("Dirty logging: exact guest-physical bits, split and packed")
struct DirtyLogTests {
    typealias P = LogRig

    /// One frame from TX (in region 0) to an RX buffer (in region 1).
    func loopOne(_ rig: LogRig, rx: LoggedSplitRing, tx: LoggedSplitRing, rxBuf: [UInt64], rxLen: UInt32,
                 frame: [UInt8]) throws {
        let txGPA: UInt64 = 0x30_0000
        rig.write(txGPA, frame)
        let txIOVA = try rig.map(gpa: txGPA, bytes: 0x1000, perm: .read)
        let rxIOVA = try rig.map(rxBuf)
        rx.driver.setDescriptor(0, addr: rxIOVA, len: rxLen, flags: Descriptor.write)
        rx.driver.offer(0)
        tx.driver.setDescriptor(0, addr: txIOVA, len: UInt32(frame.count))
        tx.driver.offer(0)
        rig.run()
    }

    @Test("split: a used entry, the used index, an RX buffer and its num_buffers: exactly their GPA pages")
    func splitUsedEntryAndBuffer() throws {
        let rig = try LogRig()
        // RX ring in region 1 (GPA 1 GiB + ...), TX ring in region 0.
        let rx = try LoggedSplitRing(rig, at: P.highGPA + 0x10000)
        let tx = try LoggedSplitRing(rig, at: 0x20000)
        _ = try rig.device.setVring(0, rx.config)
        _ = try rig.device.setVring(1, tx.config)
        rig.startLogging()
        #expect(rig.dirty.isEmpty)  // preparing the rings wrote nothing (no kicks asked for)
        let rxBuf = P.highGPA + 0x50_0000
        let frame = LogRig.frame(64, seed: 3)
        try loopOne(rig, rx: rx, tx: tx, rxBuf: [rxBuf], rxLen: 2048, frame: frame)
        #expect(rx.driver.takeUsed() == UsedElement(id: 0, len: UInt32(frame.count)))
        #expect(tx.driver.takeUsed() == UsedElement(id: 0, len: 0))
        var want = frame
        want[10] = 1  // num_buffers
        #expect(rig.read(rxBuf, frame.count) == want)
        // RX used ring (entry and index), RX buffer (data and header): region 1; TX used ring: region 0.
        #expect(rig.dirty == [P.page(P.highGPA + 0x11000), P.page(rxBuf), P.page(0x21000)])
        #expect(rig.device.dirtyLogSnapshot().pagesLogged == 3)
    }

    @Test("split: an RX buffer contiguous in IOVA over two GPA pages in two regions sets both pages' bits")
    func bufferSpanningTwoPages() throws {
        let rig = try LogRig()
        let rx = try LoggedSplitRing(rig, at: P.highGPA + 0x10000)
        let tx = try LoggedSplitRing(rig, at: 0x20000)
        _ = try rig.device.setVring(0, rx.config)
        _ = try rig.device.setVring(1, tx.config)
        rig.startLogging()
        // The buffer: its last 256 bytes of one page in region 0, the rest in a page of region 1.
        let pageA: UInt64 = 0x60_0000, pageB = P.highGPA + 0x70_0000
        let frame = LogRig.frame(1500, seed: 9)
        let txGPA: UInt64 = 0x30_0000
        rig.write(txGPA, frame)
        let txIOVA = try rig.map(gpa: txGPA, bytes: 0x1000, perm: .read)
        let rxIOVA = try rig.map([pageA, pageB]) + 0x1000 - 256
        rx.driver.setDescriptor(0, addr: rxIOVA, len: 2048, flags: Descriptor.write)
        rx.driver.offer(0)
        tx.driver.setDescriptor(0, addr: txIOVA, len: UInt32(frame.count))
        tx.driver.offer(0)
        rig.run()
        #expect(rx.driver.takeUsed()?.len == UInt32(frame.count))
        #expect(rig.read(pageA + 0x1000 - 256 + 12, 244) == Array(frame[12..<256]))
        #expect(rig.read(pageB, frame.count - 256) == Array(frame[256...]))
        #expect(rig.dirty == [P.page(pageA), P.page(pageB), P.page(P.highGPA + 0x11000), P.page(0x21000)])
    }

    @Test("split: the used index on its own page, the entries on the next, in another region (IOVA contiguous)")
    func usedIndexAcrossRegions() throws {
        let rig = try LogRig()
        // TX used ring at the last 4 bytes of a page in region 0 (flags, index),
        // its entries on a page of region 1: two IOTLB entries, GPAs far apart.
        let idxPage: UInt64 = 0x40_0000, entryPage = P.highGPA + 0x41_0000
        let rx = try LoggedSplitRing(rig, at: P.highGPA + 0x10000)
        let tx = try LoggedSplitRing(rig, at: 0x20000, usedAt: idxPage + 0x1000 - 4, usedPages: [idxPage, entryPage])
        _ = try rig.device.setVring(0, rx.config)
        _ = try rig.device.setVring(1, tx.config)
        rig.startLogging()
        let rxBuf = P.highGPA + 0x50_0000
        try loopOne(rig, rx: rx, tx: tx, rxBuf: [rxBuf], rxLen: 2048, frame: LogRig.frame(60, seed: 1))
        #expect(rig.vring(1).usedIdx == 1 && rig.vring(1).state == .running)
        // The index landed at the end of idxPage, the entry at the start of entryPage.
        #expect(rig.read(idxPage + 0x1000 - 2, 2) == [1, 0])
        #expect(rig.read(entryPage, 8) == [0, 0, 0, 0, 0, 0, 0, 0])  // id 0, len 0
        #expect(rig.dirty.isSuperset(of: [P.page(idxPage), P.page(entryPage)]))
        #expect(rig.dirty == [P.page(idxPage), P.page(entryPage), P.page(rxBuf), P.page(P.highGPA + 0x11000)])
    }

    @Test("a vring without VHOST_VRING_F_LOG: its used ring is not logged, its buffers are")
    func usedRingWithoutLogFlag() throws {
        let rig = try LogRig()
        let rx = try LoggedSplitRing(rig, at: P.highGPA + 0x10000, logUsed: false)
        let tx = try LoggedSplitRing(rig, at: 0x20000, logUsed: false)
        _ = try rig.device.setVring(0, rx.config)
        _ = try rig.device.setVring(1, tx.config)
        rig.startLogging()
        let rxBuf = P.highGPA + 0x50_0000
        try loopOne(rig, rx: rx, tx: tx, rxBuf: [rxBuf], rxLen: 2048, frame: LogRig.frame(60, seed: 1))
        #expect(rig.dirty == [P.page(rxBuf)])
    }

    @Test("packed: used descriptors and the RX buffer, exactly their GPA pages")
    func packed() throws {
        let rig = try LogRig()
        let rxRing = P.highGPA + 0x80000, txRing: UInt64 = 0x90000
        let rx = PackedDriver(memory: rig.memory, at: GuestPhysAddr(rxRing), num: 8)
        let tx = PackedDriver(memory: rig.memory, at: GuestPhysAddr(txRing), num: 8)
        for (n, at) in [(0, rxRing), (1, txRing)] {
            let iova = try rig.map(gpa: at, bytes: 0x2000)
            _ = try rig.device.setVring(n, VringConfig(num: 8, descAddr: iova, availAddr: iova + 0x1000, usedAddr: iova + 0x1004,
                                                       packed: true, logAddr: iova + 0x1004))
        }
        rig.startLogging()
        let frame = LogRig.frame(100, seed: 5)
        let txGPA: UInt64 = 0x30_0000, rxBuf = P.highGPA + 0x50_0000
        rig.write(txGPA, frame)
        rx.offer([(try rig.map(gpa: rxBuf, bytes: 0x1000), 2048, PackedDriver.write)], id: 7)
        tx.offer([(try rig.map(gpa: txGPA, bytes: 0x1000, perm: .read), UInt32(frame.count), 0)], id: 2)
        rig.run()
        #expect(rx.takeUsed()?.id == 7)
        #expect(tx.takeUsed()?.id == 2)
        #expect(rig.dirty == [P.page(rxRing), P.page(txRing), P.page(rxBuf)])
        // GET_VRING_BASE for packed: avail position, and the used one in bits 16-31.
        let base = rig.device.disableVring(1)
        #expect(base == UInt32(1 | 0x8000) | UInt32(1 | 0x8000) << 16)
    }

    @Test("logging off costs no bit; logging on without a log waits, then runs when the log comes")
    func offAndWaiting() throws {
        let rig = try LogRig()
        let rx = try LoggedSplitRing(rig, at: P.highGPA + 0x10000)
        let tx = try LoggedSplitRing(rig, at: 0x20000)
        _ = try rig.device.setVring(0, rx.config)
        _ = try rig.device.setVring(1, tx.config)
        rig.device.setDirtyLog(rig.log)  // a log, but VHOST_F_LOG_ALL off
        try loopOne(rig, rx: rx, tx: tx, rxBuf: [P.highGPA + 0x50_0000], rxLen: 2048, frame: LogRig.frame(60, seed: 1))
        #expect(rx.driver.takeUsed() != nil && rig.dirty.isEmpty)
        rig.device.setDirtyLog(nil)
        rig.device.setLogging(true)
        #expect(rig.device.dirtyLogSnapshot().waiting)
        try loopOne(rig, rx: rx, tx: tx, rxBuf: [P.highGPA + 0x51_0000], rxLen: 2048, frame: LogRig.frame(60, seed: 2))
        #expect(rx.driver.takeUsed() == nil)  // nothing ran, nothing was written
        rig.device.setDirtyLog(rig.log)
        rig.run()
        #expect(rx.driver.takeUsed() != nil)
        #expect(rig.dirty.contains(P.page(P.highGPA + 0x51_0000)))
    }

    @Test("a RARP announcement into the loopback RX queue is logged too")
    func announcement() throws {
        let rig = try LogRig()
        let rx = try LoggedSplitRing(rig, at: P.highGPA + 0x10000)
        let tx = try LoggedSplitRing(rig, at: 0x20000)
        _ = try rig.device.setVring(0, rx.config)
        _ = try rig.device.setVring(1, tx.config)
        rig.startLogging()
        let mac: [UInt8] = [0x52, 0x54, 0, 0x12, 0x34, 0x56]
        rig.device.announce(mac: mac)
        let rxBuf = P.highGPA + 0x52_0000
        rx.driver.setDescriptor(0, addr: try rig.map(gpa: rxBuf, bytes: 0x1000), len: 2048, flags: Descriptor.write)
        rx.driver.offer(0)
        rig.run()
        #expect(rx.driver.takeUsed()?.len == 72)
        let got = rig.read(rxBuf, 72)
        #expect(Array(got[12...]) == Device.rarpFrame(mac: mac))
        #expect(Array(got[18..<24]) == mac && got[24] == 0x80 && got[25] == 0x35)
        #expect(rig.device.announcements == 1)
        #expect(rig.dirty == [P.page(rxBuf), P.page(P.highGPA + 0x11000)])
    }
}
