// The memory table: guest-physical regions and the user addresses that back them.
//
// Ranges are closed (see Address.swift). A table holds 1...maxRegions regions
// that overlap neither in guest-physical nor in user address space. Look-ups
// by GPA and by user address are binary searches over two sorted index lists;
// they allocate nothing.

/// One region `{guest_phys_addr, memory_size, userspace_addr}`.
public struct MemoryRegion: Hashable, Sendable {
    /// First guest-physical address.
    public var guestPhysAddr: GuestPhysAddr
    /// Bytes in the region (>= 1).
    public var memorySize: UInt64
    /// User address of the first byte.
    public var userspaceAddr: UserAddr

    public init(guestPhysAddr: GuestPhysAddr, memorySize: UInt64, userspaceAddr: UserAddr) {
        self.guestPhysAddr = guestPhysAddr
        self.memorySize = memorySize
        self.userspaceAddr = userspaceAddr
    }

    /// Guest-physical range, nil when empty or wrapping.
    public var gpaRange: AddressRange<GuestPhysAddr>? { AddressRange(start: guestPhysAddr, size: memorySize) }
    /// User address range, nil when empty or wrapping.
    public var uaddrRange: AddressRange<UserAddr>? { AddressRange(start: userspaceAddr, size: memorySize) }

    /// One of a region's three fields, to name the one at fault.
    public enum Field: Sendable {
        case guestPhysAddr, memorySize, userspaceAddr
    }
}

/// Why a memory table was refused. `index` names the region at fault.
public enum MemoryTableError: Error, Equatable, Sendable {
    /// No regions.
    case empty
    /// More than the allowed number of regions.
    case tooManyRegions(count: Int, max: Int)
    /// A region of size 0 (`field` is `.memorySize`) or one whose end passes
    /// 2^64-1 in guest-physical (`.memorySize`) or user (`.userspaceAddr`) space.
    case overflow(index: Int, field: MemoryRegion.Field)
    /// Two regions overlap in guest-physical space.
    case gpaOverlap(index: Int, other: Int)
    /// Two regions overlap in user address space.
    case uaddrOverlap(index: Int, other: Int)
    /// The regions together exceed the allowed total size.
    case tooLarge(total: UInt64, max: UInt64)
}

/// Where an address falls inside the table.
public struct RegionHit: Equatable, Sendable {
    /// Index of the region in `MemoryTable.regions`.
    public var region: Int
    /// Offset of the address in that region.
    public var offset: UInt64
    /// Bytes from the address to the region's end (>= 1).
    public var contiguous: UInt64
}

/// A validated, immutable memory table.
public struct MemoryTable: Equatable, Sendable {
    /// The default for the most regions a table may hold (the kernel's default, 64).
    public static let defaultMaxRegions = 64

    /// The regions, in the order given.
    public let regions: [MemoryRegion]
    private let byGPA: [Int]
    private let byUaddr: [Int]

    /// Validates `regions`: 1...maxRegions, none empty or wrapping, no overlap
    /// in either space, total at most `maxTotalBytes`.
    public init(regions: [MemoryRegion], maxRegions: Int = MemoryTable.defaultMaxRegions,
                maxTotalBytes: UInt64 = .max) throws(MemoryTableError) {
        guard !regions.isEmpty else { throw .empty }
        guard regions.count <= maxRegions else { throw .tooManyRegions(count: regions.count, max: maxRegions) }
        var total: UInt64 = 0
        var overflowed = false
        for (i, r) in regions.enumerated() {
            if r.memorySize == 0 || r.gpaRange == nil { throw .overflow(index: i, field: .memorySize) }
            if r.uaddrRange == nil { throw .overflow(index: i, field: .userspaceAddr) }
            let (t, o) = total.addingReportingOverflow(r.memorySize)
            total = t
            overflowed = overflowed || o
        }
        if overflowed || total > maxTotalBytes { throw .tooLarge(total: overflowed ? .max : total, max: maxTotalBytes) }
        let byGPA = regions.indices.sorted { regions[$0].guestPhysAddr < regions[$1].guestPhysAddr }
        for (a, b) in zip(byGPA, byGPA.dropFirst()) where regions[a].gpaRange!.overlaps(regions[b].gpaRange!) {
            throw .gpaOverlap(index: max(a, b), other: min(a, b))
        }
        let byUaddr = regions.indices.sorted { regions[$0].userspaceAddr < regions[$1].userspaceAddr }
        for (a, b) in zip(byUaddr, byUaddr.dropFirst()) where regions[a].uaddrRange!.overlaps(regions[b].uaddrRange!) {
            throw .uaddrOverlap(index: max(a, b), other: min(a, b))
        }
        self.regions = regions
        self.byGPA = byGPA
        self.byUaddr = byUaddr
    }

    /// Sum of region sizes.
    public var totalBytes: UInt64 { regions.reduce(0) { $0 + $1.memorySize } }

    /// The region holding guest-physical `gpa`.
    public func lookup(gpa: GuestPhysAddr) -> RegionHit? {
        find(gpa.raw, in: byGPA) { $0.guestPhysAddr.raw }
    }

    /// The region holding user address `uaddr`.
    public func lookup(uaddr: UserAddr) -> RegionHit? {
        find(uaddr.raw, in: byUaddr) { $0.userspaceAddr.raw }
    }

    /// Whether every byte of `range` is backed by some region (possibly several adjacent ones).
    public func isBacked(_ range: AddressRange<UserAddr>) -> Bool {
        var at = range.first
        while true {
            guard let hit = lookup(uaddr: at) else { return false }
            let leftMinusOne = range.last.offset(from: at)
            if hit.contiguous - 1 >= leftMinusOne { return true }
            at = at.uncheckedAdd(hit.contiguous)  // <= range.last, cannot wrap
        }
    }

    /// The IOTLB entry for `iova` mapped linearly onto guest-physical memory
    /// from `gpa` (`iova.first` ↦ `gpa`), clipped to the region that holds the
    /// guest-physical address of `around` (which must lie in `iova`): what a
    /// vIOMMU answers, as an IOTLB entry must not span regions. Nil when no
    /// region holds it.
    public func iotlbEntry(mapping iova: AddressRange<IOVA>, toGPA gpa: GuestPhysAddr, around: IOVA,
                           perm: Permissions) -> IOTLBEntry? {
        let (gpaOfAround, wrapped) = gpa.raw.addingReportingOverflow(around.offset(from: iova.first))
        guard !wrapped, let hit = lookup(gpa: GuestPhysAddr(gpaOfAround)) else { return nil }
        let region = regions[hit.region]
        let regionFirst = gpaOfAround - hit.offset
        let regionLast = regionFirst + (region.memorySize - 1)
        let lo = max(gpa.raw, regionFirst)
        let (mappedLast, past) = gpa.raw.addingReportingOverflow(iova.sizeMinusOne)
        let hi = past ? regionLast : min(mappedLast, regionLast)
        let iovaLo = iova.first.raw + (lo - gpa.raw)
        return IOTLBEntry(range: AddressRange(first: IOVA(iovaLo), last: IOVA(iovaLo + (hi - lo))),
                          uaddr: UserAddr(region.userspaceAddr.raw + (lo - regionFirst)), perm: perm)
    }

    private func find(_ key: UInt64, in order: [Int], start: (MemoryRegion) -> UInt64) -> RegionHit? {
        var lo = 0, hi = order.count  // first position whose start is above key
        while lo < hi {
            let mid = (lo + hi) / 2
            if start(regions[order[mid]]) <= key { lo = mid + 1 } else { hi = mid }
        }
        guard lo > 0 else { return nil }
        let i = order[lo - 1]
        let r = regions[i]
        let offset = key - start(r)
        guard offset < r.memorySize else { return nil }
        return RegionHit(region: i, offset: offset, contiguous: r.memorySize - offset)
    }
}
