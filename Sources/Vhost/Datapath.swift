// One processing round of a device: ring prefetch for every running queue,
// then TX chains delivered to the paired RX queue (loopback) or consumed
// (sink). Per descriptor: no locks, no allocation, no reference counting —
// only the worker-owned device, its queues and guest memory are touched.
import IOTLB
import CRingAtomics
import Platform

extension Device {
    /// Chains one queue processes per round before others get their turn.
    static let batch = 256
    /// Used elements are published every this many chains (a power of 2).
    static let publishEvery = 4

    /// One datapath round over the device's queues; true when it did work.
    /// Dirty logging picks the logged specialization (Datapath+Log.swift).
    func poll() -> Bool {
        switch logMode {
        case .off: return config.iotlb ? poll(ThroughIOTLB.self) : poll(ThroughMemoryTable.self)
        case .on: return config.iotlb ? poll(LoggedIOTLB.self) : poll(LoggedMemoryTable.self)
        case .waiting: return false
        }
    }

    /// `poll` for a device whose rings and buffers live in the spaces `S`
    /// names: everything below is specialized for it.
    private func poll<S: DeviceSpaces>(_: S.Type) -> Bool {
        guard regions.count > 0 else { return false }
        // A built-in guest's invalidations, between two rounds (as a command would be).
        if let mailbox = m.pointee.mailbox {
            _ = mailbox._withUnsafeGuaranteedRef { $0.drain { ranges in (try? invalidateIOTLB(ranges)) != nil } }
        }
        var work = false
        let n = config.queues
        let generation = translationGeneration
        for i in 0..<n {
            queueRefs[i]._withUnsafeGuaranteedRef { vq in
                // Re-check the rings only when a translation may have changed.
                if vq.state == .running && !(vq.ringsReady && vq.ringGeneration == generation) { _ = prepareRings(vq, S.Ring.self) }
            }
        }
        var i = 1
        switch port.kind {
        case .loopback, .sink:
            while i < n {
                let busy = queueRefs[i - 1]._withUnsafeGuaranteedRef { rx in
                    queueRefs[i]._withUnsafeGuaranteedRef { tx in processTX(tx, rx, S.self) }
                }
                if busy { work = true }
                i += 2
            }
        case .tap, .peer:
            let port = self.port
            while i < n {
                if queueRefs[i]._withUnsafeGuaranteedRef({ processTXToPort($0, pair: i / 2, port, S.self) }) { work = true }
                i += 2
            }
            for pair in 0..<port.pairs where receiveFromPort(pair: pair, port, S.self) { work = true }
        }
        if port.m.pointee.announcePending { sendAnnouncement(S.self) }
        if S.Ring.logs { logFlush() }  // what a stopped queue wrote and did not publish
        return work
    }

    /// Checks the three ring areas for their whole length (the kernel's
    /// vq_meta_prefetch) unless still valid; a gap is a miss, a permission
    /// mismatch an access failure.
    @discardableResult
    func prepareRings(_ vq: VirtQueue) -> Bool {
        switch logMode {
        case .off: return config.iotlb ? prepareRings(vq, ThroughIOTLB.Ring.self) : prepareRings(vq, ThroughMemoryTable.Ring.self)
        case .on: return config.iotlb ? prepareRings(vq, LoggedIOTLB.Ring.self) : prepareRings(vq, LoggedMemoryTable.Ring.self)
        case .waiting: return false
        }
    }

    func prepareRings<R: TranslatedAddress>(_ vq: VirtQueue, _: R.Type) -> Bool {
        guard let c = vq.config, vq.state == .running else { return false }
        if vq.ringsReady && vq.ringGeneration == translationGeneration { return true }
        vq.dropTranslations()
        let ring = c.areas(R.self)
        let desc = checkRange(ring.desc, c.descBytes, .read, vq)
        if let f = desc.fault { stop(vq, f); return false }
        let avail = checkRange(ring.avail, c.availBytes, .read, vq)
        if let f = avail.fault { stop(vq, f); return false }
        let used = checkRange(ring.used, c.usedBytes, .write, vq)
        if let f = used.fault { stop(vq, f); return false }
        if R.logs && !prepareLog(vq, c, descGPA: desc.gpa, R.self) { return false }
        vq.descHost = desc.contiguous; vq.availHost = avail.contiguous; vq.usedHost = used.contiguous
        if config.iotlb { pinRings(c) }
        vq.ringsReady = true
        vq.ringGeneration = translationGeneration
        if vq.needsUsedInit {
            if c.packed {
                // Nothing is in flight when a ring (re)starts: used follows avail.
                vq.usedIdx = vq.lastAvailIdx
                vq.usedWrap = vq.availWrap
            } else {
                vq.usedIdx = ringLoad16(vq, vq.usedHost, ring.used, SplitRing.usedIdx)
            }
            vq.needsUsedInit = false
        }
        if vq.driverKicks { writeUsedFlags(vq, R.self) }
        return true
    }

    /// Keeps the IOTLB entries that hold the ring areas of `c` out of FIFO
    /// replacement: rings are touched every round, so evicting them first (they
    /// are inserted first) would make every round miss once the working set
    /// outgrows the IOTLB.
    func pinRings(_ c: VringConfig) {
        // Three calls, not a loop over an array literal: this runs on the datapath
        // whenever a translation changed, where an array literal may allocate.
        func pin(_ addr: UInt64, _ bytes: Int) {
            if let r = AddressRange(start: IOVA(addr), size: UInt64(bytes)) { iotlb.pin(r) }
        }
        pin(c.descAddr, c.descBytes)
        pin(c.availAddr, c.availBytes)
        pin(c.usedAddr, c.usedBytes)
    }

    /// Pins exactly the rings of the queues that run (after a vring changed).
    func repinRings() {
        iotlb.unpinAll()
        for vq in queues where vq.state == .running && vq.ringsReady { if let c = vq.config { pinRings(c) } }
    }

    /// Asks the in-process vIOMMU, if any, for the translation of a miss and
    /// installs it at once (no round trip through the miss log): true when the
    /// queue may go on (or was failed by a permission the answer lacks).
    func resolveOnWorker(_ vq: VirtQueue, _ iova: IOVA, _ perm: Permissions) -> Bool {
        guard let resolver = m.pointee.missResolver else { return false }
        let since = monotonicNanos()
        let buffer = m.pointee.resolveBuffer
        let budget = max(1, iotlb.maxEntries - iotlb.pinnedCount)
        let n = resolver._withUnsafeGuaranteedRef { $0.resolve(iova, perm, budget, buffer) }
        guard n > 0 && n <= buffer.count else { return false }
        // What the IOTLB holds already stays (a re-insert would unpin it and cost
        // an eviction); the missed entry comes last.
        guard (try? updateIOTLB(buffer[..<n], unlessHeld: true)) != nil else { return false }
        switch iotlb.translate(iova, access: perm, size: 1) {
        case .mapped:
            recordResolution(since: since, now: monotonicNanos())
            return true
        case .denied:
            stop(vq, .denied(iova: iova, perm: perm))
            return true
        case .miss:
            return false
        }
    }

    /// Stops `vq` on a fault: a miss waits for an update, anything else fails it.
    func stop(_ vq: VirtQueue, _ fault: AccessFault) {
        switch fault {
        case .miss(let iova, let perm):
            if resolveOnWorker(vq, iova, perm) { return }
            vq.state = .waitingIOTLB
            post(vq, .miss, iova, perm)
        case .denied(let iova, let perm):
            vq.state = .failed
            vq.accessFailures &+= 1
            counters.accessFailures &+= 1
            vq.failure = fault.description
            post(vq, .accessFail, iova, perm)
        case .notInMemoryTable, .unbacked, .wraps:
            fail(vq, fault.description)
        }
        vq.dropTranslations()
    }

    /// Fails `vq` until its vring is set again.
    func fail(_ vq: VirtQueue, _ why: String) {
        vq.state = .failed
        vq.failure = why
        vq.dropTranslations()
    }

    private func post(_ vq: VirtQueue, _ kind: MissEvent.Kind, _ iova: IOVA, _ perm: Permissions) {
        precondition(vq.pending == nil, "a stopped queue posts no second event")
        let now = monotonicNanos()
        let seq = missLog.post(vq: vq.index, kind: kind, iova: iova, perm: perm, now: now)
        vq.pending = PendingEvent(seq: seq, kind: kind, iova: iova, perm: perm, postedAt: now, waitingSince: now)
    }

    /// Processes up to `batch` TX chains (into `rx` with the loopback backend);
    /// false when there was nothing to do.
    func processTX<S: DeviceSpaces>(_ tx: VirtQueue, _ rx: VirtQueue, _: S.Type) -> Bool {
        guard tx.state == .running, tx.ringsReady, let c = tx.config else { return false }
        if c.packed { return processPackedTX(tx, rx, S.self) }
        let txAvail = S.Ring(c.availAddr)
        let availIdx = ringLoad16(tx, tx.availHost, txAvail, SplitRing.availIdx, acquire: true)
        if availIdx == tx.lastAvailIdx { return false }
        if UInt16(truncatingIfNeeded: availIdx &- tx.lastAvailIdx) > UInt16(c.num) {
            fail(tx, "avail index moved \(availIdx &- tx.lastAvailIdx) entries past last_avail_idx; the ring has \(c.num)")
            return false
        }
        let loopback = port.kind == .loopback
        var rxAvail: UInt16 = 0
        var rxRing = S.Ring(0)
        if loopback {
            guard rx.state == .running, rx.ringsReady, let rc = rx.config else { return false }
            rxRing = S.Ring(rc.availAddr)
            rxAvail = ringLoad16(rx, rx.availHost, rxRing, SplitRing.availIdx, acquire: true)
        }
        var txOld = tx.usedIdx, rxOld = rx.usedIdx
        var done = 0
        let mask = c.num - 1
        // Batches first while they move, then frames one by one until the next
        // try is due: the one-by-one loop stays as tight as without batches (a
        // per-frame check in it cost 4 KiB-mapped guests 15-30 %).
        rounds: while tx.lastAvailIdx != availIdx && done < Device.batch {
            var limit = Device.batch
            if loopback {
                if tx.batchHoldoff == 0 {
                    let moved = copySplitBatches(tx, rx, txAvail: availIdx, rxAvail: rxAvail, room: Device.batch - done,
                                                 txOld: &txOld, rxOld: &rxOld, S.self)
                    done += moved
                    if tx.lastAvailIdx == availIdx || done >= Device.batch { break }
                    if moved > 0, let o = owner, o._withUnsafeGuaranteedRef({ $0.hasWaitingCommands }) { break }
                }
                limit = min(Device.batch, done + tx.takeBatchWait())
            }
            while tx.lastAvailIdx != availIdx && done < limit {
                prefetchAhead(tx, avail: availIdx)
                if loopback { prefetchAhead(rx, avail: rxAvail) }
                let head = ringLoad16(tx, tx.availHost, txAvail, SplitRing.availEntry(Int(tx.lastAvailIdx) & mask))
                var sent = 0
                if loopback {
                    guard let rc = rx.config, rx.lastAvailIdx != rxAvail else { break rounds }  // no RX buffer: wait
                    let rxHead = ringLoad16(rx, rx.availHost, rxRing, SplitRing.availEntry(Int(rx.lastAvailIdx) & (rc.num - 1)))
                    var src = ChainCursor(DescriptorChain<S>(head: head, num: c.num))
                    var dst = ChainCursor(DescriptorChain<S>(head: rxHead, num: rc.num))
                    guard let (read, written) = copyChain(from: tx, &src, head, to: rx, &dst, rxHead) else { break rounds }
                    putUsed(rx, id: rxHead, len: UInt32(written), S.Ring.self)
                    rx.lastAvailIdx &+= 1
                    rx.chains &+= 1
                    rx.bytes &+= UInt64(written)
                    sent = read
                } else {
                    var chain = DescriptorChain<S>(head: head, num: c.num)
                    guard let read = consumeChain(tx, &chain, head) else { break rounds }
                    sent = read
                }
                handBackTX(tx, head: head, sent: sent, S.Ring.self)
                done += 1
                // Hand buffers back in small groups, so the driver refills while we go on.
                if done & (Device.publishEvery - 1) == 0 {
                    publishUsed(tx, from: txOld, S.Ring.self)
                    if loopback { publishUsed(rx, from: rxOld, S.Ring.self) }
                    txOld = tx.usedIdx
                    rxOld = rx.usedIdx
                    // Commands wait (a guest's invalidation, an API call): let them in.
                    if let o = owner, o._withUnsafeGuaranteedRef({ $0.hasWaitingCommands }) { break rounds }
                }
            }
        }
        if tx.usedIdx != txOld { publishUsed(tx, from: txOld, S.Ring.self) }
        if loopback && rx.usedIdx != rxOld { publishUsed(rx, from: rxOld, S.Ring.self) }
        return done > 0
    }

    /// Asks for what chains a few places ahead will touch, so the lines arrive
    /// from the driver's core while this one copies (a cache miss to another
    /// core costs more than a 64-byte copy): the descriptor 8 chains ahead, and
    /// the buffer named by the one 4 ahead (prefetched then) when the queue's
    /// last translation covers it. Only hints: nothing is read through them.
    @inline(__always)
    func prefetchAhead(_ vq: VirtQueue, avail: UInt16) {
        guard let desc = vq.descHost, let ring = vq.availHost, let c = vq.config else { return }
        let pending = avail &- vq.lastAvailIdx
        let mask = c.num - 1
        @inline(__always) func headAt(_ ahead: UInt16) -> Int {
            // The avail ring's 4+2·num bytes are mapped at `ring`; the head is masked for the table too.
            Int(SplitRing.head(inAvail: ring, vq.lastAvailIdx &+ ahead, num: c.num)) & mask
        }
        if pending > 8 { CRingAtomics_prefetch(desc + SplitRing.descriptor(headAt(8))) }
        guard pending > 4 else { return }
        // SAFETY: headAt masks the head below num; the table's 16·num bytes are mapped at `desc`.
        let d = Descriptor.decode(desc + SplitRing.descriptor(headAt(4)))
        let addr = d.addr, flags = d.flags
        let cache = vq.bufferCache(addr).pointee
        guard flags & Descriptor.indirect == 0, addr >= cache.first, addr < cache.last, let host = cache.host,
              cache.generation == translationGeneration else { return }
        let p = host + Int(addr &- cache.first)
        if flags & Descriptor.write != 0 { CRingAtomics_prefetch_write(p) } else { CRingAtomics_prefetch(p) }
    }

    /// Copies a TX chain's bytes into an RX chain (`txHead`, `rxHead`: where
    /// they start, for messages); nil when a fault or a malformed chain
    /// stopped a queue (nothing is published then).
    @inline(__always)
    func copyChain<T: ChainWalk, R: ChainWalk>(from tx: VirtQueue, _ src: inout ChainCursor<T>, _ txHead: UInt16,
                                               to rx: VirtQueue, _ dst: inout ChainCursor<R>, _ rxHead: UInt16) -> (Int, Int)? {
        var read = 0, written = 0
        var headerAt: UnsafeMutableRawPointer?  // where the RX frame starts, when its header fits the first segment
        var headerGPA: UInt64 = 0               // and its guest-physical address (dirty logging)
        while true {
            switch src.fill(self, tx) {
            case .end:
                // One RX chain per frame: num_buffers = 1 (virtio-net, 5.1.6.4).
                if let h = headerAt, written >= 12 {
                    // SAFETY: headerAt is set only from a segment of >= 12 mapped, writable bytes.
                    (h + 10).storeBytes(of: UInt16(1).littleEndian, as: UInt16.self)
                    if R.Buffer.logs { logBuffer(headerGPA &+ 10, 2) }
                }
                return (read, written)
            case .error(let e): chainError(tx, e); return nil
            case .ready: break
            }
            if src.writable { fail(tx, "device-writable descriptor in TX chain \(txHead)"); return nil }
            switch dst.fill(self, rx) {
            case .end:
                // The RX buffers are full: the rest of the frame is dropped, as a NIC would.
                truncatedFrames &+= 1
                if let h = headerAt, written >= 12 {
                    // SAFETY: headerAt is set only from a segment of >= 12 mapped, writable bytes.
                    (h + 10).storeBytes(of: UInt16(1).littleEndian, as: UInt16.self)
                    if R.Buffer.logs { logBuffer(headerGPA &+ 10, 2) }
                }
                return (read + Int(src.left), written)
            case .error(let e): chainError(rx, e); return nil
            case .ready: break
            }
            if !dst.writable { fail(rx, "device-readable descriptor in RX chain \(rxHead)"); return nil }
            let want = Int(min(src.left, dst.left))
            let s: Segment
            switch segment(src.addr, want, .read, &tx.bufferCache(src.addr.raw).pointee, tx) {
            case .fault(let f): stop(tx, f); return nil
            case .ok(let seg): s = seg
            }
            switch segment(dst.addr, s.length, .write, &rx.bufferCache(dst.addr.raw).pointee, rx) {
            case .fault(let f): stop(rx, f); return nil
            case .ok(let d):
                if R.Buffer.logs && !logAdmits(rx, d) { return nil }
                // SAFETY: d.length <= s.length: both segments hold that many mapped bytes (translated above).
                d.host.copyMemory(from: s.host, byteCount: d.length)
                if R.Buffer.logs { logBuffer(d.gpa, d.length) }
                if written == 0 && rxNetHeaderNumBuffers && d.length >= 12 {
                    headerAt = d.host
                    headerGPA = d.gpa
                }
                src.advance(d.length)
                dst.advance(d.length)
                read += d.length
                written += d.length
            }
        }
    }

    /// Translates every byte of a TX chain (the sink backend); nil on a fault.
    func consumeChain<W: ChainWalk>(_ tx: VirtQueue, _ chain: inout W, _ head: UInt16) -> Int? {
        var total = 0
        while true {
            switch chain.next(self, tx) {
            case .end: return total
            case .error(let e): chainError(tx, e); return nil
            case .buffer(let addr, let len, let writable):
                if writable { fail(tx, "device-writable descriptor in TX chain \(head)"); return nil }
                var off = 0
                while off < Int(len) {
                    // Within the buffer, which the chain walk checked does not pass 2^64-1.
                    let a = addr.uncheckedAdd(UInt64(off))
                    switch segment(a, Int(len) - off, .read, &tx.bufferCache(a.raw).pointee, tx) {
                    case .fault(let f): stop(tx, f); return nil
                    case .ok(let s): off += s.length
                    }
                }
                total += Int(len)
            }
        }
    }

    func chainError(_ vq: VirtQueue, _ e: ChainError) {
        switch e {
        case .fault(let f): stop(vq, f)
        case .malformed(let why): fail(vq, why)
        }
    }
}
