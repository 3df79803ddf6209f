import Testing
import TestSupport
@testable import IOTLB

@Suite struct MemoryTableTests {
    func region(_ gpa: UInt64, _ size: UInt64, _ uaddr: UInt64) -> MemoryRegion {
        MemoryRegion(guestPhysAddr: GuestPhysAddr(gpa), memorySize: size, userspaceAddr: UserAddr(uaddr))
    }

    @Test func lookupsByBothSpaces() throws {
        let t = try MemoryTable(regions: [region(0x10_0000, 0x1000, 0x7000_0000), region(0, 0x1000, 0x7000_1000)])
        #expect(t.lookup(gpa: GuestPhysAddr(0x10_0010)) == RegionHit(region: 0, offset: 0x10, contiguous: 0xff0))
        #expect(t.lookup(gpa: GuestPhysAddr(0x1000)) == nil)
        #expect(t.lookup(uaddr: UserAddr(0x7000_1fff)) == RegionHit(region: 1, offset: 0xfff, contiguous: 1))
        #expect(t.lookup(uaddr: UserAddr(0x6fff_ffff)) == nil)
        #expect(t.lookup(uaddr: UserAddr(0x7000_2000)) == nil)
    }

    @Test func backedAcrossAdjacentRegions() throws {
        let t = try MemoryTable(regions: [region(0, 0x1000, 0x1000), region(0x8000, 0x1000, 0x2000),
                                          region(0x20000, 0x1000, 0x4000)])
        #expect(t.isBacked(AddressRange(first: UserAddr(0x1000), last: UserAddr(0x2fff))))
        #expect(!t.isBacked(AddressRange(first: UserAddr(0x1000), last: UserAddr(0x3000))))
        #expect(!t.isBacked(AddressRange(first: UserAddr(0x0fff), last: UserAddr(0x1000))))
        #expect(t.isBacked(AddressRange(first: UserAddr(0x4fff), last: UserAddr(0x4fff))))
    }

    @Test func regionEndingAtTopOfSpace() throws {
        let t = try MemoryTable(regions: [region(.max - 0xfff, 0x1000, .max - 0xfff)])
        #expect(t.lookup(gpa: GuestPhysAddr(.max))?.contiguous == 1)
        #expect(t.isBacked(AddressRange(first: UserAddr(.max - 0xfff), last: UserAddr(.max))))
    }

    @Test("an IOTLB entry for a linear mapping is clipped to the region holding the address asked about")
    func iotlbEntryClippedToRegion() throws {
        // Two regions: GPA [1 MiB, 3 MiB) at uaddr 0x7f00_0000_0000, [3 MiB, 4 MiB) elsewhere.
        let t = try MemoryTable(regions: [region(1 << 20, 2 << 20, 0x7f00_0000_0000), region(3 << 20, 1 << 20, 0x5000_0000)])
        // A 4 MiB IOVA window at 0x1_0000_0000 mapped onto GPA 0.
        let window = AddressRange(first: IOVA(0x1_0000_0000), last: IOVA(0x1_003f_ffff))
        let low = try #require(t.iotlbEntry(mapping: window, toGPA: GuestPhysAddr(0), around: IOVA(0x1_0018_0000), perm: .read))
        #expect(low.range == AddressRange(first: IOVA(0x1_0010_0000), last: IOVA(0x1_002f_ffff)))
        #expect(low.uaddr == UserAddr(0x7f00_0000_0000))
        #expect(low.perm == .read)
        let high = try #require(t.iotlbEntry(mapping: window, toGPA: GuestPhysAddr(0), around: IOVA(0x1_0030_0010), perm: .readWrite))
        #expect(high.range == AddressRange(first: IOVA(0x1_0030_0000), last: IOVA(0x1_003f_ffff)))
        #expect(high.uaddr == UserAddr(0x5000_0000))
        // GPA below the first region: nothing backs it.
        #expect(t.iotlbEntry(mapping: window, toGPA: GuestPhysAddr(0), around: IOVA(0x1_0000_0000), perm: .read) == nil)
        // A mapping that would run past 2^64-1 in guest-physical space ends with the region.
        let top = try MemoryTable(regions: [region(.max - 0xfff, 0x1000, 0x1000)])
        let e = try #require(top.iotlbEntry(mapping: AddressRange(first: IOVA(0), last: IOVA(0xffff)),
                                            toGPA: GuestPhysAddr(.max - 0xfff), around: IOVA(5), perm: .read))
        #expect(e.range == AddressRange(first: IOVA(0), last: IOVA(0xfff)))
    }

    @Test func rejections() {
        #expect(throws: MemoryTableError.empty) { try MemoryTable(regions: []) }
        #expect(throws: MemoryTableError.overflow(index: 0, field: .memorySize)) {
            try MemoryTable(regions: [region(0, 0, 0)])
        }
        #expect(throws: MemoryTableError.overflow(index: 1, field: .memorySize)) {
            try MemoryTable(regions: [region(0, 1, 0), region(.max, 2, 0x10)])
        }
        #expect(throws: MemoryTableError.overflow(index: 0, field: .userspaceAddr)) {
            try MemoryTable(regions: [region(0, 2, .max)])
        }
        #expect(throws: MemoryTableError.gpaOverlap(index: 1, other: 0)) {
            try MemoryTable(regions: [region(0, 0x2000, 0), region(0x1fff, 1, 0x10000)])
        }
        #expect(throws: MemoryTableError.uaddrOverlap(index: 1, other: 0)) {
            try MemoryTable(regions: [region(0, 0x1000, 0x5000), region(0x10000, 0x1000, 0x5fff)])
        }
        #expect(throws: MemoryTableError.tooManyRegions(count: 3, max: 2)) {
            try MemoryTable(regions: [region(0, 1, 0), region(1, 1, 1), region(2, 1, 2)], maxRegions: 2)
        }
        #expect(throws: MemoryTableError.tooLarge(total: 0x2000, max: 0x1000)) {
            try MemoryTable(regions: [region(0, 0x2000, 0)], maxTotalBytes: 0x1000)
        }
    }

    @Test func randomizedLookupsAgainstScan() throws {
        var g = SplitMix(state: 42)
        for _ in 0..<50 {
            var regions: [MemoryRegion] = []
            var gpa: UInt64 = 0, ua: UInt64 = 1 << 40
            for _ in 0..<Int(1 + g.next() % 64) {
                let size = 1 + g.next() % 0x10000
                regions.append(region(gpa, size, ua))
                gpa += size + g.next() % 3 * 0x1000
                ua += size + g.next() % 2 * 0x800
            }
            regions.shuffle(using: &g)
            let t = try MemoryTable(regions: regions)
            for _ in 0..<500 {
                let q = g.next() % (gpa + 0x1000)
                let want = regions.firstIndex { $0.gpaRange!.contains(GuestPhysAddr(q)) }
                #expect(t.lookup(gpa: GuestPhysAddr(q))?.region == want)
                let u = (1 << 40) + g.next() % (ua - (1 << 40) + 0x1000)
                let wantU = regions.firstIndex { $0.uaddrRange!.contains(UserAddr(u)) }
                #expect(t.lookup(uaddr: UserAddr(u))?.region == wantU)
            }
        }
    }
}
