// The datapath for packed rings (virtio 2.8): the same loopback and sink as
// for split rings, through the same accessors, IOTLB and chain copier; only
// how a buffer is found and handed back differs.
import CRingAtomics

extension Device {
    /// Ring descriptor `slot` of a packed queue.
    @inline(__always)
    func packedDescriptor<R: TranslatedAddress>(_ vq: VirtQueue, _ slot: Int, _: R.Type) -> PackedDescriptor {
        // SAFETY: slot < num (callers wrap it), and prepareRings mapped the ring's 16·num bytes here.
        if let host = vq.descHost { return PackedDescriptor.decode(host + PackedRing.descriptor(slot)) }
        // As for split rings (`descriptor`): checked whole this round; an empty one if not.
        let at = ringField(R(vq.config!.descAddr), PackedRing.descriptor(slot))
        return (try? readDescriptor(at, &vq.ringCache.pointee, vq, PackedDescriptor.decode).get())
            ?? PackedDescriptor(addr: 0, len: 0, id: 0, flags: 0)
    }

    /// Whether the driver made a buffer available at the queue's next slot
    /// (acquire: the descriptors it wrote before the flags are visible).
    @inline(__always)
    func packedAvailable<R: TranslatedAddress>(_ vq: VirtQueue, _: R.Type) -> Bool {
        let flags = ringLoad16(vq, vq.descHost, R(vq.config!.descAddr),
                               PackedRing.descriptor(Int(vq.lastAvailIdx)) + PackedRing.flagsOffset, acquire: true)
        return PackedRing.isAvailable(flags, wrap: vq.availWrap)
    }

    /// Moves the avail position past a buffer of `slots` descriptors.
    @inline(__always)
    func consumePacked(_ vq: VirtQueue, slots: Int, num: Int) {
        var next = Int(vq.lastAvailIdx) + slots
        if next >= num { next -= num; vq.availWrap.toggle() }
        vq.lastAvailIdx = UInt16(next)
    }

    /// Hands buffer `id` (`slots` descriptors long, `len` bytes written) back:
    /// id and length first, then the flags with release.
    @inline(__always)
    func putUsedPacked<R: TranslatedAddress>(_ vq: VirtQueue, id: UInt16, len: UInt32, slots: Int, num: Int, _: R.Type) {
        writeUsedPacked(vq, at: Int(vq.usedIdx), wrap: vq.usedWrap, DevicePort.UsedBuffer(id: id, len: len, slots: slots), R.self)
        advanceUsedPacked(vq, slots: slots, num: num)
    }

    /// Moves the used position past a buffer of `slots` descriptors.
    @inline(__always)
    func advanceUsedPacked(_ vq: VirtQueue, slots: Int, num: Int) {
        var next = Int(vq.usedIdx) + slots
        if next >= num { next -= num; vq.usedWrap.toggle() }
        vq.usedIdx = UInt16(next)
    }

    /// Writes used descriptor `u` at ring slot `slot` with wrap counter `wrap`:
    /// id and length first, then the flags with release.
    @inline(__always)
    func writeUsedPacked<R: TranslatedAddress>(_ vq: VirtQueue, at slot: Int, wrap: Bool, _ u: DevicePort.UsedBuffer, _: R.Type) {
        let (id, len) = (u.id, u.len)
        let at = PackedRing.descriptor(slot)
        let flags = PackedRing.usedFlags(wrap: wrap)
        if let host = vq.descHost {
            // SAFETY: slot < num, so at+16 <= 16·num, inside the ring prepareRings mapped here.
            (host + at + 8).storeBytes(of: len.littleEndian, as: UInt32.self)
            (host + at + 12).storeBytes(of: id.littleEndian, as: UInt16.self)
            if R.logs { logFlush() }  // the buffers' bits, before the descriptor hands them over
            CRingAtomics_store_release_u16(host + at + PackedRing.flagsOffset, flags.littleEndian)
        } else {
            var body = (len.littleEndian, id.littleEndian)
            let base = R(vq.config!.descAddr)
            _ = withUnsafeBytes(of: &body) {
                copyToGuest(ringField(base, at + 8), $0.baseAddress!, 6, &vq.ringCache.pointee, vq)
            }
            if R.logs { logFlush() }
            ringStore16(vq, nil, base, at + PackedRing.flagsOffset, flags, release: true)
        }
        if R.logs { logDescRing(vq, at + 8, 8) }  // len, id, flags: one descriptor, one page
    }

    /// Writes `count` used descriptors from `group` at the queue's used
    /// position: every id and length first, then every flag (release), in ring
    /// order. The driver reads a descriptor's flags before its id and length,
    /// so each is whole when it sees it; the ring's lines change once per
    /// group. A logged ring, or one without a host mapping, goes one by one.
    @inline(__always)
    func writeUsedPackedGroup<R: TranslatedAddress>(_ vq: VirtQueue, _ group: UnsafeMutablePointer<DevicePort.UsedBuffer>,
                                                    count: Int, num: Int, _: R.Type) {
        guard let host = vq.descHost, !R.logs else {
            for k in 0..<count { putUsedPacked(vq, id: group[k].id, len: group[k].len, slots: group[k].slots, num: num, R.self) }
            return
        }
        var slot = Int(vq.usedIdx)
        for k in 0..<count {
            // SAFETY: `slot` < num; the ring was checked whole (16 × num bytes) at `host` this round.
            let at = host + PackedRing.descriptor(slot)
            (at + 8).storeBytes(of: group[k].len.littleEndian, as: UInt32.self)
            (at + 12).storeBytes(of: group[k].id.littleEndian, as: UInt16.self)
            slot += group[k].slots
            if slot >= num { slot -= num }
        }
        slot = Int(vq.usedIdx)
        var wrap = vq.usedWrap
        for k in 0..<count {
            CRingAtomics_store_release_u16(host + PackedRing.descriptor(slot) + PackedRing.flagsOffset,
                                           PackedRing.usedFlags(wrap: wrap).littleEndian)
            slot += group[k].slots
            if slot >= num { slot -= num; wrap.toggle() }
        }
        vq.usedIdx = UInt16(slot)
        vq.usedWrap = wrap
    }

    /// Hands back a run of TX buffers under VIRTIO_F_IN_ORDER (2.8.9): one used
    /// descriptor at the run's first slot, with the last buffer's id, stands
    /// for all of them; the ring's other lines stay the driver's. Starts a
    /// run at the queue's used position when `run` is empty, and writes it
    /// once it holds `InOrderRun.most` buffers.
    @inline(__always)
    func addInOrderUsed<R: TranslatedAddress>(_ vq: VirtQueue, _ run: inout InOrderRun, id: UInt16, slots: Int, num: Int,
                                              _: R.Type) {
        if run.count == 0 { run = InOrderRun(slot: Int(vq.usedIdx), wrap: vq.usedWrap) }
        run.id = id
        run.count += 1
        advanceUsedPacked(vq, slots: slots, num: num)
        if run.count == InOrderRun.most { finishInOrderUsed(vq, &run, R.self) }
    }

    /// Writes the used descriptor of a run `addInOrderUsed` gathered, if any.
    @inline(__always)
    func finishInOrderUsed<R: TranslatedAddress>(_ vq: VirtQueue, _ run: inout InOrderRun, _: R.Type) {
        guard run.count > 0 else { return }
        writeUsedPacked(vq, at: run.slot, wrap: run.wrap, DevicePort.UsedBuffer(id: run.id, len: 0, slots: 0), R.self)
        run.count = 0
    }

    /// Holds a used descriptor back for `writeUsedPackedGroup`; writes the group once it is whole.
    @inline(__always)
    func stageUsedPacked<R: TranslatedAddress>(_ vq: VirtQueue, _ u: DevicePort.UsedBuffer, staged: inout Int, num: Int,
                                               _: R.Type) {
        vq.usedStage[staged] = u
        staged += 1
        if staged == VirtQueue.usedGroup {
            writeUsedPackedGroup(vq, vq.usedStage, count: staged, num: num, R.self)
            staged = 0
        }
    }

    /// After used buffers were written: notify unless the driver's event
    /// suppression area says not to. A driver asking for a specific
    /// descriptor (EVENT_IDX) is notified at every batch: more often than it
    /// asked, which the spec allows, never less.
    func notifyPacked<R: TranslatedAddress>(_ vq: VirtQueue, _: R.Type) {
        guard let c = vq.config else { return }
        CRingAtomics_fence_seq_cst()
        let flags = ringLoad16(vq, vq.availHost, R(c.availAddr), PackedRing.eventFlags)
        if flags & 3 != PackedRing.eventDisable { notify(vq) }
    }

    /// The notifications a busy worker put off for the pair holding queue
    /// `index` (`unnotified`), sent before the pair's notifiers change (a ring
    /// stops, a new call eventfd). Sent without reading the drivers' event
    /// suppression: a driver bears a notification it did not ask for (the
    /// spec's spurious notifications), and one it asked for is not lost.
    func sendOwedNotifications(pairOf index: Int) {
        let t = index | 1
        guard t < queues.count, queues[t].unnotified > 0 else { return }
        queues[t].unnotified = 0
        notify(queues[t])
        notify(queues[t - 1])
    }

    /// Asks for the lines the next buffers will touch, as `prefetchAhead` does
    /// for split rings: the ring's next cache line of descriptors (four), and
    /// the buffer named two slots ahead when it is available and the queue's
    /// translation for it is cached. Only hints: nothing is read through them.
    @inline(__always)
    func prefetchPacked(_ vq: VirtQueue, num: Int) {
        guard let desc = vq.descHost else { return }
        var ahead = Int(vq.lastAvailIdx) + 4
        if ahead >= num { ahead -= num }
        // SAFETY (for both slots): wrapped below num; the ring's 16·num bytes are mapped at `desc`.
        CRingAtomics_prefetch(desc + PackedRing.descriptor(ahead))
        var next = Int(vq.lastAvailIdx) + 2
        var wrap = vq.availWrap
        if next >= num { next -= num; wrap.toggle() }
        let d = PackedDescriptor.decode(desc + PackedRing.descriptor(next))
        let cache = vq.bufferCache(d.addr).pointee
        guard PackedRing.isAvailable(d.flags, wrap: wrap), d.flags & Descriptor.indirect == 0,
              d.addr >= cache.first, d.addr < cache.last, let host = cache.host,
              cache.generation == translationGeneration else { return }
        let p = host + Int(d.addr &- cache.first)
        if d.flags & Descriptor.write != 0 { CRingAtomics_prefetch_write(p) } else { CRingAtomics_prefetch(p) }
    }

    /// Asks, while a batch at `slot` moves, for what the next two need: the
    /// descriptor line two batches ahead (for writing on the RX ring, whose
    /// used descriptors go there), and the buffers of the next batch, whose
    /// line was asked for one batch ago: every line a frame touches (TX: the
    /// header's, the frame's first and last; RX: the header's to read, the
    /// frame's to write). A line's round trip to the driver's core takes
    /// 300 ns in this host's slow phase; asked one batch ahead, it overlaps a
    /// batch's copies. Only hints: nothing read here is used. `num` >= 4 (a
    /// batch was admitted).
    @inline(__always)
    func prefetchBatchAhead(_ vq: VirtQueue, _ desc: UnsafeMutableRawPointer, _ slot: Int, _ num: Int, write: Bool,
                            generation: UInt64) {
        var far = slot + 2 * FrameBatch.size
        while far >= num { far -= num }  // at most twice: num >= 4
        // SAFETY (all reads here): slots wrapped below num, in the ring mapped whole at `desc`.
        if write { CRingAtomics_prefetch_write(desc + PackedRing.descriptor(far)) } else { CRingAtomics_prefetch(desc + PackedRing.descriptor(far)) }
        var next = slot + FrameBatch.size
        if next >= num { next -= num }
        for k in 0..<FrameBatch.size {
            let d = PackedDescriptor.decode(desc + PackedRing.descriptor(next + k < num ? next + k : next + k - num))
            guard d.len > 0, let p = cachedHost(vq, d.addr, d.len, write ? .write : .read, generation: generation) else { return }
            if write {
                CRingAtomics_prefetch(p)  // the header: maybe only read (`copyFrames`)
                CRingAtomics_prefetch_write(p + 12)
            } else {
                CRingAtomics_prefetch(p)
                CRingAtomics_prefetch(p + Int(min(d.len, 12)))
                CRingAtomics_prefetch(p + Int(d.len &- 1))
            }
        }
    }

    /// Frames between two checks of a packed driver's event suppression
    /// while traffic flows (DPDK checks once per burst of up to 32).
    static let notifyEvery = 32

    /// Loops four frames back at once when the next four TX and RX slots hold
    /// plain buffers (`admit`, FrameBatch.swift): flags and descriptors read
    /// together, then the frames copied and handed back. Otherwise nothing is
    /// read or counted, and the one-by-one path takes the frames.
    @inline(__always)
    func copyPackedBatch<S: DeviceSpaces>(_ tx: VirtQueue, _ rx: VirtQueue, num: Int, rxNum: Int, inOrder: Bool,
                                          txRun: inout InOrderRun, txStaged: inout Int, rxStaged: inout Int,
                                          _: S.Type) -> BatchOutcome {
        guard !S.Ring.logs, let td = tx.descHost, let rd = rx.descHost else { return .refused }
        let t = Int(tx.lastAvailIdx), r = Int(rx.lastAvailIdx)
        guard t + 4 <= num, r + 4 <= rxNum else { return .short }
        for k in 0..<FrameBatch.size {
            // SAFETY (all ring reads here): t+k < num and r+k < rxNum, slots of rings mapped whole at td and rd.
            let tf = UInt16(littleEndian: CRingAtomics_load_acquire_u16(td + PackedRing.descriptor(t + k) + PackedRing.flagsOffset))
            let rf = UInt16(littleEndian: CRingAtomics_load_acquire_u16(rd + PackedRing.descriptor(r + k) + PackedRing.flagsOffset))
            guard PackedRing.isAvailable(tf, wrap: tx.availWrap), PackedRing.isAvailable(rf, wrap: rx.availWrap) else {
                return .short
            }
        }
        var b = FrameBatch(generation: translationGeneration)
        prefetchBatchAhead(tx, td, t, num, write: false, generation: b.generation)
        prefetchBatchAhead(rx, rd, r, rxNum, write: true, generation: b.generation)
        for k in 0..<FrameBatch.size {
            let d = PackedDescriptor.decode(td + PackedRing.descriptor(t + k))
            let e = PackedDescriptor.decode(rd + PackedRing.descriptor(r + k))
            guard admit(&b, k, from: tx, (d.addr, d.len, d.flags), into: rx, (e.addr, e.len, e.flags)) else { return .refused }
            b.txID[k] = d.id
            b.rxID[k] = e.id
        }
        copyFrames(&b, tx, rx, S.Buffer.self)
        for k in 0..<FrameBatch.size {
            stageUsedPacked(rx, DevicePort.UsedBuffer(id: b.rxID[k], len: b.len[k], slots: 1), staged: &rxStaged,
                            num: rxNum, S.Ring.self)
            if inOrder {
                addInOrderUsed(tx, &txRun, id: b.txID[k], slots: 1, num: num, S.Ring.self)
            } else {
                stageUsedPacked(tx, DevicePort.UsedBuffer(id: b.txID[k], len: 0, slots: 1), staged: &txStaged, num: num,
                                S.Ring.self)
            }
        }
        consumePacked(tx, slots: 4, num: num)
        consumePacked(rx, slots: 4, num: rxNum)
        return .moved
    }

    /// Up to `batch` TX buffers of a packed queue, into `rx` (loopback) or consumed.
    func processPackedTX<S: DeviceSpaces>(_ tx: VirtQueue, _ rx: VirtQueue, _: S.Type) -> Bool {
        guard let c = tx.config else { return false }
        let loopback = port.kind == .loopback
        var rc = c
        if loopback {
            guard rx.state == .running, rx.ringsReady, let r = rx.config, r.packed else { return false }
            rc = r
        }
        var done = 0, txStaged = 0, rxStaged = 0
        var txRun = InOrderRun(slot: 0, wrap: false)
        while done < Device.batch && packedAvailable(tx, S.Ring.self) {
            if loopback && tx.batchDue()
                && tx.batchMoved(copyPackedBatch(tx, rx, num: c.num, rxNum: rc.num, inOrder: c.inOrder, txRun: &txRun,
                                                 txStaged: &txStaged, rxStaged: &rxStaged, S.self)) {
                done += 4
                if let o = owner, o._withUnsafeGuaranteedRef({ $0.hasWaitingCommands }) { break }
                continue
            }
            prefetchPacked(tx, num: c.num)
            if loopback { prefetchPacked(rx, num: rc.num) }
            let txSlot = tx.lastAvailIdx
            var sent = 0
            var txChain = PackedChain<S>(start: Int(txSlot), num: c.num)
            if loopback {
                guard packedAvailable(rx, S.Ring.self) else { break }  // no RX buffer: wait
                let rxSlot = rx.lastAvailIdx
                var src = ChainCursor(txChain)
                var dst = ChainCursor(PackedChain<S>(start: Int(rxSlot), num: rc.num))
                guard let (read, written) = copyChain(from: tx, &src, txSlot, to: rx, &dst, rxSlot) else { break }
                // The used descriptors need each buffer's length in slots and its id: walk what is left.
                if let e = src.chain.finish(self, tx) { chainError(tx, e); break }
                if let e = dst.chain.finish(self, rx) { chainError(rx, e); break }
                txChain = src.chain
                stageUsedPacked(rx, DevicePort.UsedBuffer(id: dst.chain.id, len: UInt32(written), slots: dst.chain.slots),
                                staged: &rxStaged, num: rc.num, S.Ring.self)
                consumePacked(rx, slots: dst.chain.slots, num: rc.num)
                rx.chains &+= 1
                rx.bytes &+= UInt64(written)
                sent = read
            } else {
                guard let read = consumeChain(tx, &txChain, txSlot) else { break }
                sent = read
            }
            if c.inOrder {
                addInOrderUsed(tx, &txRun, id: txChain.id, slots: txChain.slots, num: c.num, S.Ring.self)
            } else {
                stageUsedPacked(tx, DevicePort.UsedBuffer(id: txChain.id, len: 0, slots: txChain.slots),
                                staged: &txStaged, num: c.num, S.Ring.self)
            }
            consumePacked(tx, slots: txChain.slots, num: c.num)
            tx.chains &+= 1
            tx.bytes &+= UInt64(sent)
            done += 1
            // Commands wait (a guest's invalidation, an API call): let them in.
            if done & (Device.publishEvery - 1) == 0, let o = owner, o._withUnsafeGuaranteedRef({ $0.hasWaitingCommands }) {
                break
            }
        }
        // What is held back goes now, and the drivers hear of it once per batch.
        if txStaged > 0 { writeUsedPackedGroup(tx, tx.usedStage, count: txStaged, num: c.num, S.Ring.self) }
        finishInOrderUsed(tx, &txRun, S.Ring.self)
        if rxStaged > 0 { writeUsedPackedGroup(rx, rx.usedStage, count: rxStaged, num: rc.num, S.Ring.self) }
        // The check for notifications costs a full fence, which waits for every
        // store in flight (lines the driver holds): taken once per
        // `notifyEvery` frames while traffic flows, and at the first call that
        // finds nothing to do, so no notification is lost, only put off while
        // the worker is busy.
        tx.unnotified &+= done
        if tx.unnotified > 0 && (done == 0 || tx.unnotified >= Device.notifyEvery) {
            tx.unnotified = 0
            notifyPacked(tx, S.Ring.self)
            if loopback { notifyPacked(rx, S.Ring.self) }
        }
        return done > 0
    }
}

/// A run of used TX buffers handed back together under VIRTIO_F_IN_ORDER:
/// where its one used descriptor goes (slot and wrap counter when the run
/// began), and the last buffer's id.
struct InOrderRun {
    let slot: Int
    let wrap: Bool
    var id: UInt16 = 0
    var count = 0
    /// The longest run: a driver waiting for TX slots gets them back after at
    /// most this many buffers (DPDK's burst), not after a whole batch.
    static let most = 32
}
