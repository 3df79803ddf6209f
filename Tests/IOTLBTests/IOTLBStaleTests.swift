import Testing
import TestSupport
@testable import IOTLB

/// No look-up ever answers from a translation that left the table. Mutations
/// (updates that replace, FIFO evictions, invalidations, flushes, pins) are
/// interleaved with look-ups that keep returning to the same addresses: the
/// entries' edges and middles, the last ones removed, their neighbours. Every
/// answer of `lookup`, `translate` and `entry(containing:)` must be the plain
/// model's, right after each mutation.
@Suite struct IOTLBStaleTests {
    /// Pages in a small window (so entries collide, replace and share pages),
    /// sub-page, page-sized and multi-page entries, and a few at the top of the space.
    static func randomEntry(_ g: inout SplitMix) -> IOTLBEntry {
        let page = g.next() % 48
        let base: UInt64 = g.next() % 16 == 0 ? UInt64.max - 0xf_ffff : 0x4000_0000
        let first: UInt64, last: UInt64
        switch g.next() % 8 {
        case 0...2:  // one page
            first = base &+ page << 12
            last = first &+ 0xfff
        case 3, 4:  // part of a page
            first = base &+ page << 12 &+ g.next() % 4096
            last = min(first &+ g.next() % 512, (first | 0xfff))
        case 5, 6:  // several pages, any alignment
            first = base &+ page << 12 &+ g.next() % 4096
            last = first &+ (1 + g.next() % 6) << 12
        default:  // up to the end of the space or 2 MiB on
            first = base &+ page << 12
            last = base == 0x4000_0000 ? first &+ 0x1f_ffff : UInt64.max
        }
        return IOTLBEntry(range: AddressRange(first: IOVA(first), last: IOVA(last)),
                          uaddr: UserAddr(g.next() % (1 << 40)), perm: Permissions(rawValue: UInt8(1 + g.next() % 3)))
    }

    static func modelLookup(_ model: NaiveIOTLB, _ iova: IOVA, _ access: Permissions) -> IOTLBLookup {
        modelLookup(iova, access, through: model.entry(containing: iova))
    }

    /// `modelLookup` once the model's entry holding `iova` (or none) is known.
    static func modelLookup(_ iova: IOVA, _ access: Permissions, through held: IOTLBEntry?) -> IOTLBLookup {
        guard let e = held else { return .miss }
        guard e.perm.contains(access) else { return .denied(perm: e.perm) }
        return .mapped(e, uaddr: UserAddr(e.uaddr.raw &+ (iova.raw &- e.range.first.raw)))
    }

    /// Addresses worth asking about once `e` is in (or out of) the table.
    static func probes(of e: IOTLBEntry) -> [IOVA] {
        let f = e.range.first.raw, l = e.range.last.raw
        return [f, l, f &+ (l &- f) / 2, f &- 1, l &+ 1, f | 0xfff, f & ~0xfff].map(IOVA.init)
    }

    @Test(arguments: [1, 2, 3, 8, 64, 2048])
    func noStaleAnswerAfterAnyRemoval(maxEntries: Int) {
        var g = SplitMix(state: 0x5eed &+ UInt64(maxEntries))
        let tlb = IOTLB(maxEntries: maxEntries)
        tlb.state.pointee.cacheMayStepAside = false  // the check below expects every found entry cached
        var model = NaiveIOTLB(max: maxEntries)
        var watched: [IOVA] = []  // most recent last, at most 96
        func watch(_ e: IOTLBEntry) {
            watched.append(contentsOf: IOTLBStaleTests.probes(of: e))
            if watched.count > 96 { watched.removeFirst(watched.count - 96) }
        }
        // Each answer is compared plainly and reported through `#expect` only
        // when it differs: with up to 96 addresses checked twice a step, 3,000
        // steps, six table sizes, `#expect`'s own machinery was half of this
        // test's time in a debug build (`perf`), and a failure reads the same.
        func check(_ step: Int, _ what: String) {
            for iova in watched {
                let access = Permissions(rawValue: UInt8(1 + g.next() % 3))
                let held = model.entry(containing: iova)  // one scan of the model for the three answers
                let want = IOTLBStaleTests.modelLookup(iova, access, through: held)
                let got = tlb.lookup(iova, access: access)
                guard got == want else {
                    #expect(got == want, "step \(step) after \(what): iova \(iova) \(access)")
                    return
                }
                // What a look-up found, the cache now holds (until another page's entry displaces it).
                let cached = tlb.cacheAnswers(iova)
                let translated = tlb.translate(iova, access: access, size: 64)
                let entry = tlb.entry(containing: iova)
                let wantTranslated = NaiveIOTLB.translate(iova, access, 64, through: held)
                if cached != (want != .miss) || translated != wantTranslated || entry != held {
                    #expect(cached == (want != .miss), "step \(step): iova \(iova)")
                    #expect(translated == wantTranslated, "step \(step): iova \(iova)")
                    #expect(entry == held, "step \(step): iova \(iova)")
                }
            }
        }
        // Look-ups the cache could have answered stale: cached before a mutation that removed their entry.
        var cachedThenRemoved = 0
        var removed: [IOTLBEntry] = []
        let noteRemoval: (IOTLBEntry, RemovalReason) -> Void = { e, _ in removed.append(e) }
        // Invalidated ranges, mapped again now and then to another address and
        // permission: a tombstone comes back, and its old translation must not.
        var gone: [AddressRange<IOVA>] = []
        for step in 0..<3000 {
            removed.removeAll(keepingCapacity: true)
            let cachedBefore = watched.filter { tlb.cacheAnswers($0) }
            let what: String
            switch g.next() % 20 {
            case 0...8:
                var e = IOTLBStaleTests.randomEntry(&g)
                if !gone.isEmpty && g.next() % 3 == 0 { e.range = gone.removeLast() }
                #expect(tlb.update(e, onRemove: noteRemoval) == model.update(e), "step \(step)")
                watch(e)
                what = "update \(e.range)"
            case 9...12:
                // Mostly a range some watched address falls in: the invalidations that matter.
                let at = watched.isEmpty ? 0x4000_0000 : watched[Int(g.next() % UInt64(watched.count))].raw
                let r = AddressRange(first: IOVA(at), last: IOVA(at &+ min(g.next() % 0x3000, UInt64.max - at)))
                #expect(tlb.invalidate(r, onRemove: noteRemoval) == model.invalidate(r), "step \(step)")
                gone += removed.map(\.range)
                if gone.count > 32 { gone.removeFirst(gone.count - 32) }
                what = "invalidate \(r)"
            case 13 where g.next() % 8 == 0:
                model.entries.removeAll()
                model.pinned.removeAll()
                _ = tlb.flush(onRemove: noteRemoval)
                what = "flush"
            case 14:
                let e = IOTLBStaleTests.randomEntry(&g)
                tlb.pin(e.range)
                model.pin(e.range)
                what = "pin \(e.range)"
            case 15 where g.next() % 10 == 0:
                tlb.unpinAll()
                model.pinned.removeAll()
                what = "unpin all"
            default:
                what = "look-ups"
            }
            cachedThenRemoved += cachedBefore.filter { iova in removed.contains { $0.range.contains(iova) } }.count
            for e in removed { watch(e) }
            // Twice: the first pass may fill whatever a look-up keeps, the second answers from it.
            check(step, what)
            check(step, what)
            #expect(tlb.count == model.entries.count, "step \(step)")
        }
        #expect(tlb.entriesByAge() == model.entries)
        #expect(cachedThenRemoved > 5000, "the cache held \(cachedThenRemoved) removed translations")
    }

    /// Stamps running out start a new epoch: cached copies all go (the ones
    /// made early in the old epoch carry the small stamps the new one hands
    /// out again), live entries stay.
    @Test func stampsRunningOutKeepTheCacheExact() {
        var g = SplitMix(state: 77)
        let tlb = IOTLB(maxEntries: 8)
        var model = NaiveIOTLB(max: 8)
        for step in 0..<600 {
            // As if 4 billion updates went by after the first 300.
            if step == 300 { tlb.state.pointee.nextStamp = IOTLB.deadStamp - 40 }
            let e = IOTLBStaleTests.randomEntry(&g)
            #expect(tlb.update(e) == model.update(e))
            for x in model.entries + [e] {
                for iova in IOTLBStaleTests.probes(of: x) {
                    #expect(tlb.lookup(iova, access: .read) == IOTLBStaleTests.modelLookup(model, iova, .read),
                            "step \(step) iova \(iova)")
                }
            }
        }
        #expect(tlb.state.pointee.nextStamp < 1000)
    }

    /// Uniform look-ups over far more entries than the cache holds: it steps
    /// aside (answers from the tree, exact all the same), and comes back
    /// for a working set it can hold.
    @Test func cacheStepsAsideWhenItCannotHelp() {
        let n = 65536  // 8 times what the cache holds (updates cache their entries too)
        let tlb = IOTLB(maxEntries: n)
        for i in 0..<UInt64(n) {
            tlb.update(IOTLBEntry(range: AddressRange(start: IOVA(i << 12), size: 4096)!, uaddr: UserAddr(i << 20), perm: .read))
        }
        var g = SplitMix(state: 3)
        func check(_ i: UInt64) {
            let iova = IOVA(i << 12 | 0x10)
            let want = IOTLBLookup.mapped(IOTLBEntry(range: AddressRange(start: IOVA(i << 12), size: 4096)!,
                                                     uaddr: UserAddr(i << 20), perm: .read), uaddr: UserAddr(i << 20 | 0x10))
            #expect(tlb.lookup(iova, access: .read) == want)
        }
        for _ in 0..<20_000 { check(g.next() % UInt64(n)) }
        #expect(tlb.state.pointee.bypassUntil > tlb.state.pointee.lookups, "uniform over 65536 entries: stepped aside")
        tlb.invalidate(AddressRange(start: IOVA(5 << 12), size: 1)!)
        #expect(tlb.lookup(IOVA(5 << 12), access: .read) == .miss)
        for _ in 0..<Int(IOTLB.bypassLength) + 5_000 { check(g.next() % 64 + 100) }
        #expect(tlb.state.pointee.bypassUntil <= tlb.state.pointee.lookups, "64 entries in turn: cached again")
        #expect(tlb.cacheAnswers(IOVA(120 << 12)))
    }

    /// The case a new epoch exists for: a slot from early in the old epoch
    /// names the same node with the same stamp as a new entry gets.
    @Test func newEpochForgetsEverySlot() {
        let tlb = IOTLB(maxEntries: 8)
        func page(_ i: UInt64, _ uaddr: UInt64) -> IOTLBEntry {
            IOTLBEntry(range: AddressRange(start: IOVA(i << 12), size: 4096)!, uaddr: UserAddr(uaddr), perm: .read)
        }
        // Nodes 0...7 get stamps 1...8, and each lands in the cache.
        for i in 0..<8 as Range<UInt64> { tlb.update(page(i, 0xa000_0000 + i << 12)) }
        for i in 0..<8 as Range<UInt64> { #expect(tlb.entry(containing: IOVA(i << 12)) != nil) }
        // Freed highest first, so node 0 is handed out next.
        for i in (0..<8 as Range<UInt64>).reversed() { tlb.invalidate(page(i, 0).range) }
        tlb.state.pointee.nextStamp = IOTLB.deadStamp
        // Node 0 again, stamp 1 again: its old slot, for page 0, must not answer.
        tlb.update(page(100, 0xb000_0000))
        for i in 0..<8 as Range<UInt64> { #expect(tlb.lookup(IOVA(i << 12), access: .read) == .miss, "page \(i)") }
        #expect(tlb.lookup(IOVA(100 << 12), access: .read) ==
                .mapped(page(100, 0xb000_0000), uaddr: UserAddr(0xb000_0000)))
    }
}
