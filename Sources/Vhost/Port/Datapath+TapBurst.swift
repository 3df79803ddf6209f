// TX into a TAP in bursts: up to TapBurst.capacity chains are gathered (each
// translated through the device's accessors, its header checked), their
// frames written with one system call (io_uring), then handed back in order.
// A write the TAP pushed back leaves its chain in the ring (the ring is put
// back to where that chain was, and the next round sends it again), unless a
// later write of the same burst went out (see flushBurst). Every write has completed before the
// chains are handed back and before the worker applies a command, so a
// translation is never used after an invalidation returned.
import Glibc
import IOTLB
import Ports

extension Device {
    func processTXToTapInBursts<S: DeviceSpaces>(_ tx: VirtQueue, _ c: VringConfig, pair: Int, _ port: DevicePort,
                                                 _ burst: TapBurst, _: S.Type) -> Bool {
        let txAvail = S.Ring(c.availAddr)
        var availIdx: UInt16 = 0
        if !c.packed {
            availIdx = ringLoad16(tx, tx.availHost, txAvail, SplitRing.availIdx, acquire: true)
            if availIdx == tx.lastAvailIdx { return false }
            if UInt16(truncatingIfNeeded: availIdx &- tx.lastAvailIdx) > UInt16(c.num) {
                fail(tx, "avail index moved \(availIdx &- tx.lastAvailIdx) entries past last_avail_idx; the ring has \(c.num)")
                return false
            }
        }
        let lead = port.m.pointee.guestHeaderBytes == 0 ? 1 : 0  // a zero header in front for guests that send none
        let room = TapBurst.piecesPerFrame - lead
        let queue = port.tapQueue(pair)
        let mask = c.num - 1
        var n = 0, writes = 0, done = 0
        var txOld = tx.usedIdx
        var alone = false  // a chain of more pieces than a burst slot: it goes by itself
        rounds: while true {
            chains: while n < TapBurst.capacity && done + n < Device.batch {
                let at = tx.lastAvailIdx, wrap = tx.availWrap
                let iov = burst.pieces(n) + lead
                let gathered: Gathered, id: UInt16, slots: Int
                if c.packed {
                    guard packedAvailable(tx, S.Ring.self) else { break chains }
                    prefetchPacked(tx, num: c.num)
                    var chain = PackedChain<S>(start: Int(at), num: c.num)
                    gathered = gather(tx, &chain, at, into: iov, capacity: room)
                    (id, slots) = (chain.id, chain.slots)
                    if case .frame = gathered { consumePacked(tx, slots: slots, num: c.num) }
                } else {
                    guard at != availIdx else { break chains }
                    prefetchAhead(tx, avail: availIdx)
                    let head = ringLoad16(tx, tx.availHost, txAvail, SplitRing.availEntry(Int(at) & mask))
                    var chain = DescriptorChain<S>(head: head, num: c.num)
                    gathered = gather(tx, &chain, head, into: iov, capacity: room)
                    (id, slots) = (head, 1)
                    if case .frame = gathered { tx.lastAvailIdx &+= 1 }
                }
                guard case .frame(let pieces, let bytes) = gathered else { break rounds }  // the queue stopped
                if pieces > room && pieces <= DevicePort.maxSegments {
                    tx.lastAvailIdx = at; tx.availWrap = wrap
                    alone = true
                    break chains
                }
                var f = DevicePort.BurstFrame(id: id, slots: slots, availIdx: at, availWrap: wrap, bytes: bytes,
                                              frame: bytes - port.m.pointee.guestHeaderBytes, write: -1,
                                              drop: refusal(iov, pieces: pieces, capacity: room, bytes: bytes, port))
                if f.drop == nil {
                    // SAFETY: slot 0 of this frame's pieces, left free for it.
                    if lead == 1 { burst.pieces(n)[0] = iovec(iov_base: port.zeroHeader, iov_len: VirtioNetHeader.size) }
                    burst.queue(queue, slot: n, count: pieces + lead, index: writes)
                    f.write = writes
                    writes += 1
                }
                port.burstFrames[n] = f
                n += 1
            }
            let (handed, whole) = flushBurst(tx, c, pair: pair, port, burst, frames: n, writes: writes, S.self)
            done += handed
            n = 0; writes = 0
            if !c.packed && tx.usedIdx != txOld { publishUsed(tx, from: txOld, S.Ring.self); txOld = tx.usedIdx }
            if c.packed && handed > 0 { notifyPacked(tx, S.Ring.self) }
            guard whole else { break }
            if alone {
                // The many-pieced chain, written by itself (one writev), then the bursts go on.
                alone = false
                let at = tx.lastAvailIdx
                let sent: Int
                if c.packed {
                    var chain = PackedChain<S>(start: Int(at), num: c.num)
                    guard case .consumed(let b) = transmit(tx, &chain, at, pair: pair, port) else { break }
                    putUsedPacked(tx, id: chain.id, len: 0, slots: chain.slots, num: c.num, S.Ring.self)
                    consumePacked(tx, slots: chain.slots, num: c.num)
                    notifyPacked(tx, S.Ring.self)
                    sent = b
                } else {
                    let head = ringLoad16(tx, tx.availHost, txAvail, SplitRing.availEntry(Int(at) & mask))
                    var chain = DescriptorChain<S>(head: head, num: c.num)
                    guard case .consumed(let b) = transmit(tx, &chain, head, pair: pair, port) else { break }
                    putUsed(tx, id: head, len: 0, S.Ring.self)
                    tx.lastAvailIdx &+= 1
                    publishUsed(tx, from: txOld, S.Ring.self); txOld = tx.usedIdx
                    sent = b
                }
                tx.chains &+= 1
                tx.bytes &+= UInt64(sent)
                done += 1
            }
            if done >= Device.batch || handed == 0 { break }
            if let o = owner, o._withUnsafeGuaranteedRef({ $0.hasWaitingCommands }) { break }
        }
        if n > 0 {
            // The queue stopped while a burst was gathered: what went before it still goes.
            done += flushBurst(tx, c, pair: pair, port, burst, frames: n, writes: writes, S.self).handed
            if !c.packed && tx.usedIdx != txOld { publishUsed(tx, from: txOld, S.Ring.self) }
            if c.packed { notifyPacked(tx, S.Ring.self) }
        }
        return done > 0
    }

    /// Writes a burst's `writes` frames and hands back, in order, the chains
    /// that went out or were dropped. A write the TAP pushed back keeps its
    /// chain, and every chain after it, in the ring (the ring is put back to
    /// it) unless a later write of the burst went out: then keeping it would
    /// send it out of order, and it is dropped (tap_full). Returns how many
    /// chains were handed back, and whether all of them were.
    private func flushBurst<S: DeviceSpaces>(_ tx: VirtQueue, _ c: VringConfig, pair: Int, _ port: DevicePort,
                                             _ burst: TapBurst, frames n: Int, writes: Int, _: S.Type) -> (handed: Int, whole: Bool) {
        if writes > 0 { burst.run(writes) }
        let p = port.m
        // The last write that went out: a push-back before it cannot be kept.
        var lastSent = -1
        for w in 0..<writes { if case .done = burst.result(w) { lastSent = w } }
        for k in 0..<n {
            let f = port.burstFrames[k]
            if let why = f.drop {
                port.drop(pair, why)
            } else {
                switch burst.result(f.write) {
                case .done:
                    if p.pointee.state == .down { p.pointee.state = .up }
                    p.pointee.backPressured = false
                    port.count(pair, DevicePort.Slot.txFrames)
                    port.count(pair, DevicePort.Slot.txBytes, UInt64(f.frame))
                case .wouldBlock, .cancelled:
                    port.count(pair, DevicePort.Slot.backPressure)
                    if f.write > lastSent {
                        p.pointee.backPressured = true
                        tx.lastAvailIdx = f.availIdx; tx.availWrap = f.availWrap
                        return (k, false)
                    }
                    port.drop(pair, .tapFull)
                case .down:
                    p.pointee.state = .down
                    port.drop(pair, .tapDown)
                case .gone:
                    p.pointee.state = .gone
                    port.drop(pair, .tapGone)
                case .refused, .failed:
                    port.drop(pair, .tapError)
                }
            }
            if c.packed {
                putUsedPacked(tx, id: f.id, len: 0, slots: f.slots, num: c.num, S.Ring.self)
            } else {
                putUsed(tx, id: f.id, len: 0, S.Ring.self)
            }
            tx.chains &+= 1
            tx.bytes &+= UInt64(f.bytes)
        }
        return (n, true)
    }
}
