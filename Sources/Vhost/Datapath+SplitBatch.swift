// The split loopback's four-at-a-time path (see FrameBatch.swift).
import CRingAtomics

extension Device {
    /// Four-at-a-time tries while they move, up to `room` frames; each moved
    /// batch is published at once. Stops early when commands wait. Returns
    /// the frames moved; a refusal sets the queue's wait (`batchMoved`).
    @inline(never)
    func copySplitBatches<S: DeviceSpaces>(_ tx: VirtQueue, _ rx: VirtQueue, txAvail: UInt16, rxAvail: UInt16, room: Int,
                                           txOld: inout UInt16, rxOld: inout UInt16, _: S.Type) -> Int {
        var moved = 0
        while moved + 4 <= room, tx.batchMoved(copySplitBatch(tx, rx, txAvail: txAvail, rxAvail: rxAvail, S.self)) {
            moved += 4
            publishUsed(tx, from: txOld, S.Ring.self)
            publishUsed(rx, from: rxOld, S.Ring.self)
            txOld = tx.usedIdx
            rxOld = rx.usedIdx
            if let o = owner, o._withUnsafeGuaranteedRef({ $0.hasWaitingCommands }) { break }
        }
        return moved
    }

    /// Loops four frames back at once when the next four TX and RX heads are
    /// plain (`admit`): avail entries and descriptors read together, then the
    /// frames copied and the used elements written. Otherwise nothing is read
    /// or counted, and the one-by-one path takes the frames.
    @inline(__always)
    func copySplitBatch<S: DeviceSpaces>(_ tx: VirtQueue, _ rx: VirtQueue, txAvail: UInt16, rxAvail: UInt16,
                                         _: S.Type) -> BatchOutcome {
        guard txAvail &- tx.lastAvailIdx >= 4, rxAvail &- rx.lastAvailIdx >= 4 else { return .short }
        guard !S.Ring.logs, let tAvail = tx.availHost, let rAvail = rx.availHost, let td = tx.descHost,
              let rd = rx.descHost, let tc = tx.config, let rc = rx.config else { return .refused }
        var b = FrameBatch(generation: translationGeneration)
        for k in 0..<FrameBatch.size {
            // Both avail rings' 4+2·num bytes are mapped at tAvail and rAvail (prepareRings).
            let th = SplitRing.head(inAvail: tAvail, tx.lastAvailIdx &+ UInt16(k), num: tc.num)
            let rh = SplitRing.head(inAvail: rAvail, rx.lastAvailIdx &+ UInt16(k), num: rc.num)
            guard Int(th) < tc.num, Int(rh) < rc.num else { return .refused }
            // SAFETY: heads checked below num; both tables' 16·num bytes are mapped at td and rd.
            let d = Descriptor.decode(td + SplitRing.descriptor(Int(th)))
            let e = Descriptor.decode(rd + SplitRing.descriptor(Int(rh)))
            guard admit(&b, k, from: tx, (d.addr, d.len, d.flags), into: rx, (e.addr, e.len, e.flags)) else { return .refused }
            b.txID[k] = th
            b.rxID[k] = rh
        }
        copyFrames(&b, tx, rx, S.Buffer.self)
        for k in 0..<FrameBatch.size { putUsed(rx, id: b.rxID[k], len: b.len[k], S.Ring.self) }
        for k in 0..<FrameBatch.size { putUsed(tx, id: b.txID[k], len: 0, S.Ring.self) }
        tx.lastAvailIdx &+= 4
        rx.lastAvailIdx &+= 4
        return .moved
    }
}
