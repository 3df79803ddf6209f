// TX into a port (guest → TAP or peer): a chain's pieces are translated
// through the device's own accessors (IOTLB, memory table) and gathered into
// an iovec array, its virtio-net header checked, then the frame goes out in one
// writev from guest memory (TAP) or one copy onto the peer's wire. A TAP that
// pushes back leaves the chain in its ring, to be sent again; every other
// failure is a counted drop of that frame, never a stall of another device.
import Glibc
import IOTLB
import Ports

/// What became of one TX chain.
enum TXOutcome {
    /// It went out (or was dropped and counted): hand the chain back.
    case consumed(bytes: Int)
    /// The TAP is full: leave the chain in the ring and stop for this round.
    case backPressure
    /// A fault or a malformed chain stopped the queue: leave the chain.
    case stopped
}

/// What gathering one TX chain found.
enum Gathered {
    /// The chain's pieces (more than the capacity given: too many to gather) and its bytes.
    case frame(pieces: Int, bytes: Int)
    /// A fault or a malformed chain stopped the queue: leave the chain.
    case stopped
}

extension Device {
    /// Walks a TX chain and gathers its pieces, each translated for reading, into
    /// `iov` (at most `capacity`: past that, only counted).
    @inline(__always)
    func gather<W: ChainWalk>(_ tx: VirtQueue, _ chain: inout W, _ head: UInt16,
                              into iov: UnsafeMutablePointer<iovec>, capacity: Int) -> Gathered {
        var pieces = 0, bytes = 0
        while true {
            switch chain.next(self, tx) {
            case .end: return .frame(pieces: pieces, bytes: bytes)
            case .error(let e): chainError(tx, e); return .stopped
            case .buffer(let addr, let len, let writable):
                if writable { fail(tx, "device-writable descriptor in TX chain \(head)"); return .stopped }
                var off = 0
                while off < Int(len) {
                    // Within the buffer, which the chain walk checked does not pass 2^64-1.
                    let a = addr.uncheckedAdd(UInt64(off))
                    switch segment(a, Int(len) - off, .read, &tx.bufferCache(a.raw).pointee, tx) {
                    case .fault(let f): stop(tx, f); return .stopped
                    case .ok(let s):
                        // SAFETY: `pieces` < capacity, the array's room.
                        if pieces < capacity { iov[pieces] = iovec(iov_base: s.host, iov_len: s.length) }
                        pieces += 1
                        off += s.length
                    }
                }
                bytes += Int(len)
            }
        }
    }

    /// Why a gathered frame (`pieces` in `iov`, `bytes` with the guest's header)
    /// may not go out, or nil: too many pieces, too short or long, a header the
    /// host must not see. Reads the header into `port.header`.
    @inline(__always)
    func refusal(_ iov: UnsafeMutablePointer<iovec>, pieces: Int, capacity: Int, bytes: Int,
                 _ port: DevicePort) -> PortDropReason? {
        let p = port.m
        let hdr = p.pointee.guestHeaderBytes
        let frame = bytes - hdr
        if pieces > capacity { return .tooManySegments }
        if frame < 14 { return .runt }
        if frame > DevicePort.maxTXFrame { return .oversize }
        if hdr > 0 {
            gatherPrefix(iov, pieces, Swift.min(hdr, VirtioNetHeader.legacySize), into: port.header)
            if let problem = VirtioNetHeader.problem(port.header, frameLength: frame, allowed: p.pointee.hostOffloads) {
                return Self.dropReason(problem)
            }
        }
        return nil
    }

    /// Sends one TX chain through the port of queue pair `pair`, at once.
    @inline(__always)
    func transmit<W: ChainWalk>(_ tx: VirtQueue, _ chain: inout W, _ head: UInt16, pair: Int, _ port: DevicePort) -> TXOutcome {
        let iov = port.iov + 1  // slot 0: a header for guests that send none
        guard case .frame(let pieces, let bytes) = gather(tx, &chain, head, into: iov, capacity: DevicePort.maxSegments) else {
            return .stopped
        }
        if let why = refusal(iov, pieces: pieces, capacity: DevicePort.maxSegments, bytes: bytes, port) {
            port.drop(pair, why)
            return .consumed(bytes: bytes)
        }
        let p = port.m
        let hdr = p.pointee.guestHeaderBytes
        let frame = bytes - hdr
        switch port.kind {
        case .tap:
            guard p.pointee.state != .gone else { port.drop(pair, .tapGone); return .consumed(bytes: bytes) }
            var first = iov, count = pieces
            if hdr == 0 {
                // SAFETY: slot 0 of the array, reserved for this.
                port.iov[0] = iovec(iov_base: port.zeroHeader, iov_len: VirtioNetHeader.size)
                first = port.iov; count += 1
            }
            switch port.tapQueue(pair).write(first, count: count) {
            case .done:
                if p.pointee.state == .down { p.pointee.state = .up }
                p.pointee.backPressured = false
            case .wouldBlock:
                port.count(pair, DevicePort.Slot.backPressure)
                p.pointee.backPressured = true
                return .backPressure
            case .down:
                p.pointee.state = .down
                port.drop(pair, .tapDown)
                return .consumed(bytes: bytes)
            case .gone:
                p.pointee.state = .gone
                port.drop(pair, .tapGone)
                return .consumed(bytes: bytes)
            case .refused, .failed, .cancelled:
                port.drop(pair, .tapError)
                return .consumed(bytes: bytes)
            }
        case .peer:
            guard p.pointee.linked, p.pointee.outCount > 0 else { port.drop(pair, .peerDown); return .consumed(bytes: bytes) }
            let wire = p.pointee.out![pair % p.pointee.outCount]
            let record = VirtioNetHeader.size + frame
            guard let dst = wire._withUnsafeGuaranteedRef({ $0.reserve(record) }) else {
                port.drop(pair, record > DevicePort.maxTXFrame + VirtioNetHeader.size ? .oversize : .peerFull)
                return .consumed(bytes: bytes)
            }
            // Every frame on a wire carries a 12-byte header: the guest's flags and GSO fields, num_buffers 0.
            // SAFETY: reserve gave `record` = 12+frame bytes; the header takes <= 12 of them, port.header holds 16.
            dst.initializeMemory(as: UInt8.self, repeating: 0, count: VirtioNetHeader.size)
            if hdr > 0 { dst.copyMemory(from: port.header, byteCount: Swift.min(hdr, VirtioNetHeader.legacySize)) }
            copyPieces(iov, pieces, skipping: hdr, to: dst + VirtioNetHeader.size)
            wire._withUnsafeGuaranteedRef { $0.commit(record) }
        case .loopback, .sink:
            return .consumed(bytes: bytes)
        }
        port.count(pair, DevicePort.Slot.txFrames)
        port.count(pair, DevicePort.Slot.txBytes, UInt64(frame))
        return .consumed(bytes: bytes)
    }

    static func dropReason(_ p: VirtioNetHeader.Problem) -> PortDropReason {
        switch p {
        case .gsoSize: .gsoSize
        case .headerLength: .headerLength
        case .checksumOffset: .checksumOffset
        case .offloadNotNegotiated: .offloadNotNegotiated
        }
    }

    /// Copies the first `n` bytes of the gathered pieces to `dst`.
    @inline(__always)
    func gatherPrefix(_ iov: UnsafeMutablePointer<iovec>, _ pieces: Int, _ n: Int, into dst: UnsafeMutableRawPointer) {
        var done = 0, i = 0
        while done < n && i < pieces {
            let k = Swift.min(n - done, iov[i].iov_len)
            // SAFETY: iov[i] is a translated guest segment of iov_len mapped bytes; done+k <= n, dst's room.
            (dst + done).copyMemory(from: iov[i].iov_base!, byteCount: k)
            done += k
            i += 1
        }
    }

    /// Copies the gathered pieces, less their first `skip` bytes, to `dst`.
    @inline(__always)
    func copyPieces(_ iov: UnsafeMutablePointer<iovec>, _ pieces: Int, skipping skip: Int, to dst: UnsafeMutableRawPointer) {
        var skip = skip, at = 0
        for i in 0..<pieces {
            let len = iov[i].iov_len
            if skip >= len { skip -= len; continue }
            // SAFETY: iov[i] is len mapped guest bytes; dst has room for the pieces' sum less skip (the record).
            (dst + at).copyMemory(from: iov[i].iov_base! + skip, byteCount: len - skip)
            at += len - skip
            skip = 0
        }
    }

    /// Up to `batch` TX chains of queue pair `pair` into the port (split rings).
    func processTXToPort<S: DeviceSpaces>(_ tx: VirtQueue, pair: Int, _ port: DevicePort, _: S.Type) -> Bool {
        guard tx.state == .running, tx.ringsReady, let c = tx.config else { return false }
        if let burst = port.burstRef, port.m.pointee.state == .up,
           burst._withUnsafeGuaranteedRef({ $0.batched }) {
            return burst._withUnsafeGuaranteedRef { processTXToTapInBursts(tx, c, pair: pair, port, $0, S.self) }
        }
        if c.packed { return processPackedTXToPort(tx, pair: pair, port, S.self) }
        let txAvail = S.Ring(c.availAddr)
        let availIdx = ringLoad16(tx, tx.availHost, txAvail, SplitRing.availIdx, acquire: true)
        if availIdx == tx.lastAvailIdx { return false }
        if UInt16(truncatingIfNeeded: availIdx &- tx.lastAvailIdx) > UInt16(c.num) {
            fail(tx, "avail index moved \(availIdx &- tx.lastAvailIdx) entries past last_avail_idx; the ring has \(c.num)")
            return false
        }
        var txOld = tx.usedIdx
        var done = 0
        let mask = c.num - 1
        chains: while tx.lastAvailIdx != availIdx && done < Device.batch {
            prefetchAhead(tx, avail: availIdx)
            let head = ringLoad16(tx, tx.availHost, txAvail, SplitRing.availEntry(Int(tx.lastAvailIdx) & mask))
            var chain = DescriptorChain<S>(head: head, num: c.num)
            let sent: Int
            switch transmit(tx, &chain, head, pair: pair, port) {
            case .backPressure, .stopped: break chains
            case .consumed(let bytes): sent = bytes
            }
            handBackTX(tx, head: head, sent: sent, S.Ring.self)
            done += 1
            if done & (Device.publishEvery - 1) == 0 {
                publishUsed(tx, from: txOld, S.Ring.self)
                txOld = tx.usedIdx
                if let o = owner, o._withUnsafeGuaranteedRef({ $0.hasWaitingCommands }) { break }
            }
        }
        if tx.usedIdx != txOld { publishUsed(tx, from: txOld, S.Ring.self) }
        if done > 0 { wakePeer(port) }
        return done > 0
    }

    /// The same for a packed ring.
    func processPackedTXToPort<S: DeviceSpaces>(_ tx: VirtQueue, pair: Int, _ port: DevicePort, _: S.Type) -> Bool {
        guard let c = tx.config else { return false }
        var done = 0, txUsed = 0
        chains: while done < Device.batch && packedAvailable(tx, S.Ring.self) {
            prefetchPacked(tx, num: c.num)
            let slot = tx.lastAvailIdx
            var chain = PackedChain<S>(start: Int(slot), num: c.num)
            let sent: Int
            switch transmit(tx, &chain, slot, pair: pair, port) {
            case .backPressure, .stopped: break chains
            case .consumed(let bytes): sent = bytes
            }
            putUsedPacked(tx, id: chain.id, len: 0, slots: chain.slots, num: c.num, S.Ring.self)
            consumePacked(tx, slots: chain.slots, num: c.num)
            tx.chains &+= 1
            tx.bytes &+= UInt64(sent)
            txUsed += 1
            done += 1
            if done & (Device.publishEvery - 1) == 0 {
                notifyPacked(tx, S.Ring.self); txUsed = 0
                if let o = owner, o._withUnsafeGuaranteedRef({ $0.hasWaitingCommands }) { break }
            }
        }
        if txUsed > 0 { notifyPacked(tx, S.Ring.self) }
        if done > 0 { wakePeer(port) }
        return done > 0
    }

    /// Frames went onto the peer's wire: wake its worker if it sleeps (one atomic load if not).
    @inline(__always)
    func wakePeer(_ port: DevicePort) {
        if let w = port.m.pointee.peerWorker { w._withUnsafeGuaranteedRef { $0.kick() } }
    }
}
