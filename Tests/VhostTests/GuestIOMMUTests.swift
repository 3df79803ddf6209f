@testable import Guest
import IOTLB
import Testing

@Suite struct GuestIOMMUTests {
    @Test func pagesAreCountedAndPermissionsGrow() {
        let m = GuestIOMMU(pageSize: .k4)
        let a = m.map(iova: IOVA(0x10_0800), gpa: GuestPhysAddr(0x800), size: 0x1000, perm: .write)
        #expect(a.map(\.iova.first) == [IOVA(0x10_0000), IOVA(0x10_1000)])
        #expect(a.map(\.gpa) == [GuestPhysAddr(0), GuestPhysAddr(0x1000)])
        // Same page, more permission: reported again so the device learns it.
        let b = m.map(iova: IOVA(0x10_1800), gpa: GuestPhysAddr(0x1800), size: 16, perm: .read)
        #expect(b.count == 1 && b[0].perm == .readWrite)
        #expect(m.map(iova: IOVA(0x10_1900), gpa: GuestPhysAddr(0x1900), size: 16, perm: .read).isEmpty)
        #expect(m.unmap(iova: IOVA(0x10_0800), size: 0x1000) == [AddressRange(first: IOVA(0x10_0000), last: IOVA(0x10_0fff))])
        #expect(m.unmap(iova: IOVA(0x10_1800), size: 16).isEmpty)
        #expect(m.unmap(iova: IOVA(0x10_1900), size: 16).count == 1)
        #expect(m.mappedPages == 0)
    }

    @Test func entryIsThePageClippedToItsRegion() throws {
        let table = try MemoryTable(regions: [MemoryRegion(guestPhysAddr: GuestPhysAddr(0x10_0000), memorySize: 0x30_0000,
                                                           userspaceAddr: UserAddr(0x7000_0000))])
        let m = GuestIOMMU(pageSize: .g1)
        m.map(iova: IOVA(0x4000_0000), gpa: GuestPhysAddr(0), size: 0x40_0000, perm: .read)
        let page = try #require(m.translate(IOVA(0x4020_0000)))
        #expect(page.iova == AddressRange(first: IOVA(0x4000_0000), last: IOVA(0x7fff_ffff)))
        let e = try #require(page.iotlbEntry(clippedTo: table, around: IOVA(0x4020_0000)))
        #expect(e.range == AddressRange(first: IOVA(0x4010_0000), last: IOVA(0x403f_ffff)))
        #expect(e.uaddr == UserAddr(0x7000_0000) && e.perm == .read)
        #expect(page.iotlbEntry(clippedTo: table, around: IOVA(0x4000_0000)) == nil)
    }

    @Test("read-ahead: the pages mapped after the missed one, each once at its latest place, still mapped, at most limit")
    func mappingsAfterAMissReadAhead() {
        let m = GuestIOMMU(pageSize: .k4)
        func map(_ page: UInt64) { m.map(iova: IOVA(page << 12), gpa: GuestPhysAddr(page << 12), size: 1, perm: .read) }
        for p: UInt64 in [1, 2, 3, 4, 5] { map(p) }
        m.unmap(iova: IOVA(3 << 12), size: 1)   // gone: not sent
        m.unmap(iova: IOVA(2 << 12), size: 1)
        map(2)                                   // mapped again: sent at its new place, after 5
        let after1 = m.mappings(after: IOVA(1 << 12), limit: 10).map { $0.iova.first.raw >> 12 }
        #expect(after1 == [4, 5, 2])
        #expect(m.mappings(after: IOVA(1 << 12), limit: 2).map { $0.iova.first.raw >> 12 } == [4, 5])
        #expect(m.mappings(after: IOVA(2 << 12), limit: 10).isEmpty)   // the newest page: nothing after it
        #expect(m.mappings(after: IOVA(9 << 12), limit: 10).isEmpty)   // not mapped: no answer
    }

    @Test("read-ahead skips what an earlier answer sent, and sends a page mapped again")
    func readAheadSkipsWhatWasSent() {
        let m = GuestIOMMU(pageSize: .k4)
        func map(_ page: UInt64) { m.map(iova: IOVA(page << 12), gpa: GuestPhysAddr(page << 12), size: 1, perm: .read) }
        func ahead(_ page: UInt64, _ sent: inout Range<UInt64>) -> [UInt64] {
            var out: [UInt64] = []
            sent = m.forEachMapping(after: IOVA(page << 12), skipping: sent, limit: 100) { out.append($0.iova.first.raw >> 12) }
            return out
        }
        for p: UInt64 in 1...8 { map(p) }   // log positions 0...7
        var sent: Range<UInt64> = 0..<0
        // A miss on page 5 (a TX buffer posted after the RX ones) reads 6...8 ahead.
        #expect(ahead(5, &sent) == [6, 7, 8] && sent == 4..<8)
        // A miss on page 1 then reads 2...4 ahead and skips what went already.
        #expect(ahead(1, &sent) == [2, 3, 4] && sent == 0..<8)
        #expect(ahead(2, &sent).isEmpty)
        // Unmapped and mapped again: logged anew, so read ahead again.
        m.unmap(iova: IOVA(3 << 12), size: 1)
        map(3)
        map(9)
        #expect(ahead(1, &sent) == [3, 9] && sent == 0..<10)
        // A walk that does not reach the stretch sent before forgets it (nothing is lost but a skip).
        sent = 20..<30
        #expect(ahead(8, &sent) == [3, 9] && sent == 7..<10)
    }

    @Test("the page table agrees with a Dictionary under random map/unmap churn")
    func pageTableMatchesDictionary() {
        var table = PageTable<Int>()
        var model: [UInt64: Int] = [:]
        var state: UInt64 = 0x1234_5678
        func next() -> UInt64 { state = state &* 6364136223846793005 &+ 1442695040888963407; return state >> 33 }
        for step in 0..<60_000 {
            // Clustered keys (a driver's neighbouring buffers) and scattered ones.
            let key = next() % 4 == 0 ? next() : 0x10_0000 + next() % 3000
            switch next() % 3 {
            case 0, 1:
                table[key] = step
                model[key] = step
            default:
                table[key] = nil
                model[key] = nil
            }
            if step % 997 == 0 {
                #expect(table.count == model.count)
                for (k, v) in model { #expect(table[k] == v) }
            }
            #expect(table[key] == model[key])
        }
    }
}
