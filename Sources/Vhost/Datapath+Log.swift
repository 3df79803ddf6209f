// Dirty logging on the datapath (live migration). While VHOST_F_LOG_ALL is on,
// the device runs a second specialization of the same datapath, over address
// types marked `Logged`: every guest write (used ring entries, index, flags and
// avail_event; packed used descriptors; RX buffers and their virtio-net
// headers, num_buffers included) sets the bits of the guest-physical pages it
// touched, after the write and before the used index that hands it over is
// published. With logging off the datapath is the unlogged specialization, so
// a frame pays nothing for it: one test per round picks the specialization.
//
// Writes happen at IOVAs (IOTLB on) or user and guest-physical addresses; the
// log is indexed by guest-physical address. The translation a write used
// already carries its GPA (`Segment.gpa`, cached with the host pointer), so
// the IOVA → user address → memory table step costs no look-up per write.
// The used ring is logged at the vring's log address (VHOST_VRING_F_LOG),
// an IOVA under ACCESS_PLATFORM (QEMU's used_phys), translated once per ring
// preparation. Every bit is checked against the log's size: a buffer past the
// log fails its queue before it is written; a ring past it, before it runs.
import CRingAtomics
import IOTLB

/// An address of space `A` whose writes the datapath logs: the same
/// translation, and `logs` true, so the logged specialization sets bits.
struct Logged<A: TranslatedAddress>: TranslatedAddress {
    let raw: UInt64
    @inline(__always) init(_ raw: UInt64) { self.raw = raw }
    static var space: AddressSpace { A.space }
    static var logs: Bool { true }
    @inline(__always)
    static func piece(_ addr: Logged<A>, _ access: Permissions, on device: Device, _ vq: VirtQueue)
        -> PieceResult<Logged<A>> {
        switch A.piece(A(addr.raw), access, on: device, vq) {
        case .fault(let f): .fault(f)
        case .piece(let lo, let hi, let host, let gpa, let perm):
            .piece(lo: Logged(lo.raw), hi: Logged(hi.raw), host: host, gpa: gpa, perm: perm)
        }
    }
}

/// IOTLB on, logging: rings and buffers are IOVAs.
enum LoggedIOTLB: DeviceSpaces {
    typealias Ring = Logged<IOVA>
    typealias Buffer = Logged<IOVA>
}

/// IOTLB off, logging: rings at user addresses, buffers at guest-physical ones.
enum LoggedMemoryTable: DeviceSpaces {
    typealias Ring = Logged<UserAddr>
    typealias Buffer = Logged<GuestPhysAddr>
}

/// Which datapath a device runs this round.
enum LogMode {
    /// Not migrating: the unlogged datapath.
    case off
    /// Migrating with a log mapped: the logged datapath.
    case on
    /// VHOST_F_LOG_ALL is on but no log is mapped yet (QEMU restarting a device
    /// mid-migration sends the features first): nothing runs, nothing is written.
    case waiting
}

extension Device {
    /// The mode of this round: one load and test (see `LogMode`).
    @inline(__always)
    var logMode: LogMode {
        guard logState.pointee.enabled else { return .off }
        return logState.pointee.base == nil ? .waiting : .on
    }

    /// Whether every page of `[gpa, gpa+length)` (`length` >= 1) has its bit in the log.
    @inline(__always)
    func logCovers(_ gpa: UInt64, _ length: Int) -> Bool {
        let (last, wrapped) = gpa.addingReportingOverflow(UInt64(length &- 1))
        return !wrapped && last >> 12 < logState.pointee.pages
    }

    /// Records the pages of `[gpa, gpa+length)` as written; their bits are set
    /// by the next `logFlush`, which runs after the writes and before the used
    /// index (or a packed used descriptor) that hands them over is published.
    /// Callers checked `logCovers`; a page past the log is still never
    /// recorded (counted as a fault).
    @inline(__always)
    func logMark(_ gpa: UInt64, _ length: Int) {
        // The common case inline: one page, in the word recorded last.
        let page = gpa >> 12
        let n = logState.pointee.cached
        if n > 0, (gpa &+ UInt64(length &- 1)) >> 12 == page, page < logState.pointee.pages {
            let last = logState.pointee.cache + (n - 1)
            if last.pointee.word == page >> 6 { last.pointee.bits |= 1 << (page & 63); return }
        }
        logMarkPages(gpa, length)
    }

    @inline(never)
    func logMarkPages(_ gpa: UInt64, _ length: Int) {
        let pages = logState.pointee.pages
        var page = gpa >> 12
        let last = (gpa &+ UInt64(length &- 1)) >> 12
        while page <= last {
            guard page < pages else { logState.pointee.faults &+= 1; return }
            logRecord(word: page >> 6, bit: 1 << (page & 63))
            page &+= 1
        }
    }

    private func logRecord(word: UInt64, bit: UInt64) {
        let cache = logState.pointee.cache
        var i = logState.pointee.cached
        while i > 0 {
            i -= 1
            if cache[i].word == word { cache[i].bits |= bit; return }
        }
        if logState.pointee.cached == DirtyLogState.cacheSize { logFlush() }
        cache[logState.pointee.cached] = (word, bit)
        logState.pointee.cached += 1
    }

    /// Sets the recorded bits in the log, after a full fence: the guest writes
    /// they record are visible before any bit is read or set. A byte whose
    /// bits are all set already is left alone (the front-end clears bits with
    /// an atomic exchange and copies the page after it: if it has not cleared
    /// them yet, it copies what the fence made visible); an atomic OR sets the rest.
    @inline(__always)
    func logFlush() {
        if logState.pointee.cached > 0 { logFlushCached() }
    }

    @inline(never)
    func logFlushCached() {
        let n = logState.pointee.cached
        logState.pointee.cached = 0
        guard n > 0, let base = logState.pointee.base else { return }
        let cache = logState.pointee.cache
        var fresh: UInt64 = 0
        CRingAtomics_fence_seq_cst()
        for i in 0..<n {
            var bits = cache[i].bits
            // SAFETY: only pages below `pages` are recorded (logMark), so word·8+7 < pages/8, the log's bytes.
            let at = base + Int(truncatingIfNeeded: cache[i].word << 3)
            while bits != 0 {
                let k = bits.trailingZeroBitCount >> 3
                let byte = UInt8(truncatingIfNeeded: bits >> UInt64(k << 3))
                bits &= ~(UInt64(0xff) << UInt64(k << 3))
                if CRingAtomics_load_relaxed_u8(at + k) & byte == byte { continue }
                let old = CRingAtomics_fetch_or_u8(at + k, byte)
                fresh &+= UInt64((byte & ~old).nonzeroBitCount)
            }
        }
        logState.pointee.pagesLogged &+= fresh
    }

    /// Before a buffer write of segment `s`: true when the log covers it, else
    /// the queue fails (nothing is written).
    @inline(__always)
    func logAdmits(_ vq: VirtQueue, _ s: Segment) -> Bool {
        if logCovers(s.gpa, s.length) { return true }
        logFault(vq, "an RX buffer write", gpa: s.gpa, length: s.length)
        return false
    }

    /// After a buffer write (data or virtio-net header) at guest-physical `gpa`.
    @inline(__always)
    func logBuffer(_ gpa: UInt64, _ length: Int) {
        if !logState.pointee.skipBuffers { logMark(gpa, length) }
    }

    /// After a write of `length` bytes at `offset` into the used area (split
    /// used ring, packed device event area), when the vring has a log address.
    @inline(__always)
    func logUsed(_ vq: VirtQueue, _ offset: Int, _ length: Int) {
        let base = vq.usedLogGPA
        if base != .max { logMark(base &+ UInt64(offset), length) } else if vq.usedLogPieces { logUsedPieces(vq, offset, length) }
    }

    /// After a write into a packed ring's descriptor ring (a used descriptor).
    @inline(__always)
    func logDescRing(_ vq: VirtQueue, _ offset: Int, _ length: Int) {
        let base = vq.descLogGPA
        if base != .max { logMark(base &+ UInt64(offset), length) } else { logDescPieces(vq, offset, length) }
    }

    @inline(never)
    private func logUsedPieces(_ vq: VirtQueue, _ offset: Int, _ length: Int) {
        // Pieces only under ACCESS_PLATFORM, where the log address is an IOVA;
        // prepareLog checked the whole used area, so the offset stays inside.
        guard let a = vq.config?.logAddr else { return }
        _ = forEachGPA(IOVA(a).uncheckedAdd(UInt64(offset)), length) { logMark($0, $1) }
    }

    @inline(never)
    private func logDescPieces(_ vq: VirtQueue, _ offset: Int, _ length: Int) {
        // The descriptor ring is in the ring space, checked whole by problem().
        guard let a = vq.config?.descAddr else { return }
        if config.iotlb {
            _ = forEachGPA(IOVA(a).uncheckedAdd(UInt64(offset)), length) { logMark($0, $1) }
        } else {
            _ = forEachGPA(UserAddr(a).uncheckedAdd(UInt64(offset)), length) { logMark($0, $1) }
        }
    }

    /// The guest-physical pieces of the IOVAs `[addr, addr+length)`, each given
    /// to `body`; false when a piece does not translate. Uncached and
    /// uncounted: for ring areas whose GPAs are not contiguous (rare; checked
    /// whole when the ring is prepared).
    func forEachGPA(_ addr: IOVA, _ length: Int, _ body: (UInt64, Int) -> Void) -> Bool {
        var done = 0
        while done < length {
            guard let a = addr.checkedAdd(UInt64(done)),
                  case .mapped(let e, let u) = iotlb.lookup(a, access: .write) else { return false }
            let n = min(UInt64(length - done) &- 1, e.range.last.uncheckedOffset(from: a)) &+ 1
            guard forEachGPA(u, Int(n), body) else { return false }
            done += Int(n)
        }
        return true
    }

    /// The guest-physical pieces of the user addresses `[addr, addr+length)`,
    /// as `forEachGPA(_: IOVA, …)`.
    func forEachGPA(_ addr: UserAddr, _ length: Int, _ body: (UInt64, Int) -> Void) -> Bool {
        var done = 0
        while done < length {
            guard let ua = addr.checkedAdd(UInt64(done)), let span = regions.find(ua) else { return false }
            let into = ua.uncheckedOffset(from: span.first)
            let n = min(UInt64(length - done) &- 1, span.last.uncheckedOffset(from: ua)) &+ 1
            body(span.gpa.uncheckedAdd(into).raw, Int(n))
            done += Int(n)
        }
        return true
    }

    /// `forEachGPA` for a ring area in its own space; a guest-physical one
    /// is its own single piece.
    private func forEachGPA(_ addr: AnyAddress, _ length: Int, _ body: (UInt64, Int) -> Void) -> Bool {
        switch addr {
        case .iova(let a): return forEachGPA(a, length, body)
        case .user(let a): return forEachGPA(a, length, body)
        case .guestPhys(let a):
            guard a.checkedAdd(UInt64(length &- 1)) != nil else { return false }
            body(a.raw, length)
            return true
        }
    }

    /// When a logged ring is prepared: where its used area and (packed) its
    /// descriptor ring are logged, each checked whole against the log. False
    /// (the queue stopped or failed) when they cannot be.
    func prepareLog<R: TranslatedAddress>(_ vq: VirtQueue, _ c: VringConfig, descGPA: UInt64?, _: R.Type) -> Bool {
        vq.usedLogGPA = .max
        vq.usedLogPieces = false
        vq.descLogGPA = .max
        if let logAddr = c.logAddr {
            if R.space == .iova {
                // ACCESS_PLATFORM: the log address is an IOVA (QEMU's used_phys).
                let r = checkRange(IOVA(logAddr), c.usedBytes, .write, vq)
                if let f = r.fault { stop(vq, f); return false }
                if let g = r.gpa { vq.usedLogGPA = g } else { vq.usedLogPieces = true }
            } else {
                vq.usedLogGPA = logAddr  // without it, a guest-physical address
            }
            let at: AnyAddress = R.space == .iova ? .iova(IOVA(logAddr)) : .guestPhys(GuestPhysAddr(logAddr))
            if !logCoversRing(vq, "the used ring", at, c.usedBytes, base: vq.usedLogGPA) { return false }
        }
        if c.packed {
            if let g = descGPA { vq.descLogGPA = g }
            if !logCoversRing(vq, "the descriptor ring", R(c.descAddr).tagged, c.descBytes, base: vq.descLogGPA) {
                return false
            }
        }
        return true
    }

    private func logCoversRing(_ vq: VirtQueue, _ what: String, _ addr: AnyAddress, _ bytes: Int, base: UInt64) -> Bool {
        if base != .max {
            if logCovers(base, bytes) { return true }
            logFault(vq, what, gpa: base, length: bytes)
            return false
        }
        var bad: (UInt64, Int)?
        let ok = forEachGPA(addr, bytes) { g, n in if bad == nil && !logCovers(g, n) { bad = (g, n) } }
        if let (g, n) = bad { logFault(vq, what, gpa: g, length: n); return false }
        if !ok { fail(vq, "dirty log: \(what) at \(addr) does not translate to guest-physical memory") }
        return ok
    }

    /// A write the log cannot record: the queue fails with why, and it counts.
    @inline(never)
    func logFault(_ vq: VirtQueue, _ what: String, gpa: UInt64, length: Int) {
        let pages = logState.pointee.pages
        let why = "dirty log: \(what) at guest-physical 0x\(String(gpa, radix: 16)) (\(length) bytes) lies past the log "
            + "(\(pages / 8) bytes cover guest-physical memory below 0x\(String(pages << 12, radix: 16)))"
        logState.pointee.faults &+= 1
        logState.pointee.lastFault = why
        fail(vq, why)
    }
}
