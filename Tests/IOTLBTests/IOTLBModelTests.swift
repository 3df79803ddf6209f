import Testing
import TestSupport
@testable import IOTLB

/// The obviously-correct model: a list in insertion order, scanned linearly.
struct NaiveIOTLB {
    let max: Int
    var entries: [IOTLBEntry] = []
    /// Pinned entries, by first IOVA (entries never overlap, so it names one).
    var pinned: Set<UInt64> = []

    mutating func update(_ e: IOTLBEntry) -> UpdateOutcome {
        let before = entries.count
        entries.removeAll { $0.range.overlaps(e.range) }
        // Before the new entry comes in: it may start where a removed pinned one did.
        forgetPins()
        var out = UpdateOutcome(replaced: before - entries.count, evicted: 0)
        if entries.count == max {
            // Pinned ones go to the back of the line unless all are pinned.
            if entries.contains(where: { !pinned.contains($0.range.first.raw) }) {
                while pinned.contains(entries[0].range.first.raw) { entries.append(entries.removeFirst()) }
            }
            pinned.remove(entries.removeFirst().range.first.raw)
            out.evicted = 1
        }
        entries.append(e)
        return out
    }

    mutating func updateUnlessHeld(_ e: IOTLBEntry) -> UpdateOutcome? {
        entries.contains(e) ? nil : update(e)
    }

    mutating func invalidate(_ r: AddressRange<IOVA>) -> Int {
        let before = entries.count
        entries.removeAll { $0.range.overlaps(r) }
        forgetPins()
        return before - entries.count
    }

    mutating func pin(_ r: AddressRange<IOVA>) {
        for e in entries where e.range.overlaps(r) { pinned.insert(e.range.first.raw) }
    }

    /// Pins die with their entries.
    mutating func forgetPins() { pinned = pinned.filter { p in entries.contains { $0.range.first.raw == p } } }

    /// The entry holding `iova`, if any.
    func entry(containing iova: IOVA) -> IOTLBEntry? { entries.first { $0.range.contains(iova) } }

    func translate(_ iova: IOVA, _ access: Permissions, _ size: UInt64) -> Translation {
        NaiveIOTLB.translate(iova, access, size, through: entry(containing: iova))
    }

    /// `translate` once the entry holding `iova` (or none) is known.
    static func translate(_ iova: IOVA, _ access: Permissions, _ size: UInt64, through held: IOTLBEntry?) -> Translation {
        guard let e = held else { return .miss }
        guard e.perm.contains(access) else { return .denied(perm: e.perm) }
        let left = UInt128(e.range.last.raw) - UInt128(iova.raw) + 1
        return .mapped(uaddr: UserAddr(e.uaddr.raw &+ (iova.raw - e.range.first.raw)),
                       length: UInt64(min(left, UInt128(size))), perm: e.perm)
    }
}

/// Addresses clustered near 0, near 2^64-1 and in a small middle window, so ranges collide often.
func randomAddress(_ g: inout SplitMix) -> UInt64 {
    switch g.next() % 4 {
    case 0: return g.next() % 4096
    case 1: return UInt64.max - g.next() % 4096
    case 2: return 0x1_0000 + g.next() % 0x1_0000
    default: return g.next()
    }
}

func randomRange(_ g: inout SplitMix) -> AddressRange<IOVA> {
    let a = randomAddress(&g)
    let size: UInt64 = g.next() % 8 == 0 ? g.next() : 1 + g.next() % 8192
    let last = a.addingReportingOverflow(size).overflow ? UInt64.max : a + size - 1
    return AddressRange(first: IOVA(a), last: IOVA(max(a, last)))
}

@Suite struct IOTLBModelTests {
    @Test(arguments: [1, 2, 7, 64, 2048])
    func randomizedAgainstModel(maxEntries: Int) {
        var g = SplitMix(state: UInt64(maxEntries) * 7919)
        let tlb = IOTLB(maxEntries: maxEntries)
        var model = NaiveIOTLB(max: maxEntries)
        // Ranges invalidated lately: mapped again now and then (the same range,
        // sometimes elsewhere), as dynamic mappings do: tombstones come back.
        var gone: [AddressRange<IOVA>] = []
        for step in 0..<6000 {
            switch g.next() % 10 {
            case 0...4:
                let r = !gone.isEmpty && g.next() % 3 == 0 ? gone.removeLast() : randomRange(&g)
                let e = IOTLBEntry(range: r, uaddr: UserAddr(g.next() % (1 << 40)),
                                   perm: Permissions(rawValue: UInt8(1 + g.next() % 3)))
                var removed: [IOTLBEntry] = []
                // Now and then the very same entry again, as a read-ahead answer offers it.
                let held = g.next() % 4 == 0 ? tlb.entriesByAge() : []
                let again = !held.isEmpty
                if again || g.next() % 3 == 0 {
                    let offered = again ? held[Int(g.next() % UInt64(held.count))] : e
                    let got = tlb.updateUnlessHeld(offered) { r, _ in removed.append(r) }
                    let want = model.updateUnlessHeld(offered)
                    #expect(got == want, "step \(step)")
                    #expect(removed.count == (want.map { $0.replaced + $0.evicted } ?? 0))
                } else {
                    let got = tlb.update(e) { r, _ in removed.append(r) }
                    let want = model.update(e)
                    #expect(got == want, "step \(step)")
                    #expect(removed.count == want.replaced + want.evicted)
                }
            case 5, 6:
                let r = randomRange(&g)
                #expect(tlb.invalidate(r) { e, _ in gone.append(e.range) } == model.invalidate(r), "step \(step)")
                if gone.count > 64 { gone.removeFirst(gone.count - 64) }
            case 7 where g.next() % 50 == 0:
                model.entries.removeAll()
                model.pinned.removeAll()
                _ = tlb.flush()
            case 8 where g.next() % 3 == 0:
                let r = randomRange(&g)
                tlb.pin(r)
                model.pin(r)
            case 9 where g.next() % 25 == 0:
                tlb.unpinAll()
                model.pinned.removeAll()
            default:
                for _ in 0..<8 {
                    let iova = IOVA(randomAddress(&g))
                    let access = Permissions(rawValue: UInt8(1 + g.next() % 3))
                    let size = g.next() % 2 == 0 ? UInt64.max : 1 + g.next() % 10000
                    #expect(tlb.translate(iova, access: access, size: size) == model.translate(iova, access, size),
                            "step \(step) iova \(iova)")
                }
            }
            #expect(tlb.count == model.entries.count)
            #expect(tlb.pinnedCount == model.pinned.count, "step \(step)")
            #expect(tlb.treeIsValid(), "step \(step)")
            #expect(tlb.tombstones <= max(tlb.count, 64) && tlb.count + tlb.tombstones <= maxEntries, "step \(step)")
            if step % 500 == 0 {
                #expect(tlb.entriesByAge() == model.entries)
                #expect(tlb.entries() == model.entries.sorted { $0.range.first < $1.range.first })
                let q = randomRange(&g)
                #expect(tlb.entries(overlapping: q) ==
                        model.entries.filter { $0.range.overlaps(q) }.sorted { $0.range.first < $1.range.first })
            }
        }
        #expect(tlb.entriesByAge() == model.entries)
    }
}

@Suite struct IOTLBEdgeTests {
    func entry(_ first: UInt64, _ last: UInt64, _ uaddr: UInt64 = 0x1000, _ perm: Permissions = .readWrite) -> IOTLBEntry {
        IOTLBEntry(range: AddressRange(first: IOVA(first), last: IOVA(last)), uaddr: UserAddr(uaddr), perm: perm)
    }

    @Test func wholeSpaceEntryTranslatesEverywhere() {
        let tlb = IOTLB(maxEntries: 4)
        tlb.update(entry(0, .max, 0))
        #expect(tlb.translate(IOVA(0), access: .read) == .mapped(uaddr: UserAddr(0), length: .max, perm: .readWrite))
        #expect(tlb.translate(IOVA(.max), access: .write) == .mapped(uaddr: UserAddr(.max), length: 1, perm: .readWrite))
        #expect(tlb.translate(IOVA(.max - 9), access: .write, size: 100) ==
                .mapped(uaddr: UserAddr(.max - 9), length: 10, perm: .readWrite))
    }

    @Test func rangeConstructionRejectsZeroAndWrap() {
        #expect(AddressRange(start: IOVA(5), size: 0) == nil)
        #expect(AddressRange(start: IOVA(.max), size: 2) == nil)
        #expect(AddressRange(start: IOVA(.max), size: 1)?.last == IOVA(.max))
        #expect(AddressRange(start: IOVA(0), size: .max)?.last == IOVA(.max - 1))
        #expect(AddressRange(first: IOVA(0), last: IOVA(.max)).size == nil)
    }

    @Test func newestWinsAndRemovesOverlapsWhole() {
        let tlb = IOTLB(maxEntries: 8)
        tlb.update(entry(0x1000, 0x1fff, 0xa000))
        tlb.update(entry(0x2000, 0x2fff, 0xb000))
        let out = tlb.update(entry(0x1800, 0x27ff, 0xc000, .read))
        #expect(out == UpdateOutcome(replaced: 2, evicted: 0))
        #expect(tlb.translate(IOVA(0x1000), access: .read) == .miss)
        #expect(tlb.translate(IOVA(0x2800), access: .read) == .miss)
        #expect(tlb.translate(IOVA(0x2000), access: .read) == .mapped(uaddr: UserAddr(0xc800), length: 0x800, perm: .read))
    }

    @Test func fifoEvictsOldestInserted() {
        let tlb = IOTLB(maxEntries: 2)
        tlb.update(entry(0x3000, 0x3fff))
        tlb.update(entry(0x1000, 0x1fff))
        var evicted: [IOTLBEntry] = []
        let out = tlb.update(entry(0x2000, 0x2fff)) { e, why in if why == .evicted { evicted.append(e) } }
        #expect(out.evicted == 1)
        #expect(evicted.map(\.range.first) == [IOVA(0x3000)])
        #expect(tlb.translate(IOVA(0x3000), access: .read) == .miss)
        #expect(tlb.entries().map(\.range.first) == [IOVA(0x1000), IOVA(0x2000)])
    }

    @Test func limitOneKeepsOnlyNewest() {
        let tlb = IOTLB(maxEntries: 1)
        for i in 0..<100 as Range<UInt64> {
            tlb.update(entry(i * 0x1000, i * 0x1000 + 0xfff))
            #expect(tlb.count == 1)
            #expect(tlb.entries().first?.range.first == IOVA(i * 0x1000))
        }
    }

    @Test func permissionChecks() {
        let tlb = IOTLB(maxEntries: 4)
        tlb.update(entry(0, 0xfff, 0x10, .read))
        tlb.update(entry(0x1000, 0x1fff, 0x20, .write))
        #expect(tlb.translate(IOVA(0x10), access: .write) == .denied(perm: .read))
        #expect(tlb.translate(IOVA(0x1010), access: .read) == .denied(perm: .write))
        #expect(tlb.translate(IOVA(0x1010), access: .readWrite) == .denied(perm: .write))
        if case .mapped = tlb.translate(IOVA(0x1010), access: .write) {} else { Issue.record("write should map") }
    }

    @Test func generationMovesOnlyOnRemoval() {
        let tlb = IOTLB(maxEntries: 4)
        let g0 = tlb.generation
        tlb.update(entry(0, 0xfff))
        #expect(tlb.generation == g0)
        tlb.invalidate(AddressRange(first: IOVA(0x2000), last: IOVA(0x2fff)))
        #expect(tlb.generation == g0)
        tlb.invalidate(AddressRange(first: IOVA(0xfff), last: IOVA(0xfff)))
        #expect(tlb.generation > g0)
    }

    @Test func flushEmptiesAndReportsEach() {
        let tlb = IOTLB(maxEntries: 16)
        for i in 0..<10 as Range<UInt64> { tlb.update(entry(i << 12, (i << 12) | 0xfff)) }
        var reasons: [RemovalReason] = []
        let removed = tlb.flush { _, why in reasons.append(why) }
        #expect(removed == 10 && reasons.count == 10 && reasons.allSatisfy { $0 == .flushed })
        let seen = reasons.count
        #expect(seen == 10 && tlb.count == 0 && tlb.entries().isEmpty)
        tlb.update(entry(0, 0))
        #expect(tlb.count == 1)
    }
}

@Suite struct IOTLBSearchArrayTests {
    /// Long runs of look-ups without mutation switch to the search arrays; they must agree with the model.
    @Test(arguments: [1, 5, 64, 1000, 2048])
    func lookupsAfterQuietPeriodsMatchTheModel(entries: Int) {
        var g = SplitMix(state: UInt64(entries))
        let tlb = IOTLB(maxEntries: 4096)
        var model = NaiveIOTLB(max: 4096)
        for round in 0..<6 {
            for _ in 0..<(round == 0 ? entries : max(1, entries / 10)) {
                let e = IOTLBEntry(range: randomRange(&g), uaddr: UserAddr(g.next() % (1 << 40)),
                                   perm: Permissions(rawValue: UInt8(1 + g.next() % 3)))
                #expect(tlb.update(e) == model.update(e))
            }
            if round % 2 == 1 {
                let r = randomRange(&g)
                #expect(tlb.invalidate(r) == model.invalidate(r))
            }
            for _ in 0..<3000 {
                let iova = IOVA(g.next() % 4 == 0 ? randomAddress(&g)
                                : (model.entries.randomElement(using: &g)?.range.first.raw ?? 0) &+ g.next() % 64)
                #expect(tlb.translate(iova, access: .read, size: 100) == model.translate(iova, .read, 100))
            }
        }
    }
}
