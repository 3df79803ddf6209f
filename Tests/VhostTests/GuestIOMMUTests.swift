import Guest
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
}
