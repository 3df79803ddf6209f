// RX from a port (TAP or peer → guest): a frame read from the TAP, or waiting
// on the peer's wire, is copied into the guest's RX buffers through the same
// accessors and IOTLB as everything else: into as many buffers as it needs with
// MRG_RXBUF (num_buffers set in the first), into one otherwise. A frame that
// meets a miss or finds no buffer stays where it is (the TAP's frame in its
// buffer, the peer's on the wire) and nothing more is read from that source
// until it has moved: a frame is never dropped because of the IOTLB.
import Glibc
import IOTLB
import Ports

/// What became of one frame offered to the guest.
enum DeliverOutcome {
    case delivered
    /// The guest has no (more) RX buffers: the frame waits.
    case noBuffers
    /// A fault or a malformed chain stopped the RX queue: the frame waits.
    case stopped
    /// The frame cannot be taken (longer than the guest's buffers): dropped and counted.
    case dropped(PortDropReason)
}

extension Device {
    /// Moves frames from the port into queue pair `pair`'s RX queue; true when it did work.
    func receiveFromPort<S: DeviceSpaces>(pair: Int, _ port: DevicePort, _: S.Type) -> Bool {
        queueRefs[2 * pair]._withUnsafeGuaranteedRef { rx in receiveFromPort(rx, pair: pair, port, S.self) }
    }

    private func receiveFromPort<S: DeviceSpaces>(_ rx: VirtQueue, pair: Int, _ port: DevicePort, _: S.Type) -> Bool {
        guard rx.state == .running, rx.ringsReady, let c = rx.config else { return false }
        var state = RXBatch(usedBefore: rx.usedIdx, availIdx: rx.lastAvailIdx)
        var did = 0
        switch port.kind {
        case .tap:
            guard port.m.pointee.state != .gone else { return false }
            let headerIn = port.m.pointee.guestHeaderBytes == VirtioNetHeader.legacySize
                ? VirtioNetHeader.legacySize : VirtioNetHeader.size
            let buffer = port.bounce(pair)
            let ready = port.readinessRef!
            ready._withUnsafeGuaranteedRef { $0.refresh() }
            frames: while did < Device.batch {
                var length = port.pendingLength[pair]
                if length == 0 {
                    guard ready._withUnsafeGuaranteedRef({ $0.mayRead(pair) }) else { break frames }
                    switch port.tapQueue(pair).read(into: buffer, capacity: DevicePort.bounceBytes) {
                    case .done(let n):
                        if n >= DevicePort.bounceBytes { port.drop(pair, .oversize); continue frames }
                        if n < headerIn + 14 { port.drop(pair, .runt); continue frames }
                        length = n
                        port.pendingLength[pair] = n
                    case .wouldBlock:
                        ready._withUnsafeGuaranteedRef { $0.drained(pair) }
                        break frames
                    case .down, .refused, .failed, .cancelled:
                        break frames
                    case .gone:
                        port.m.pointee.state = .gone
                        break frames
                    }
                }
                let outcome = deliver(rx, c, &state, UnsafeRawPointer(buffer), length, headerIn: headerIn, port, S.self)
                switch outcome {
                case .noBuffers, .stopped: break frames
                case .delivered: port.count(pair, DevicePort.Slot.rxFrames); port.count(pair, DevicePort.Slot.rxBytes, UInt64(length - headerIn))
                case .dropped(let why): port.drop(pair, why)
                }
                port.pendingLength[pair] = 0
                did += 1
            }
        case .peer:
            let p = port.m.pointee
            guard p.linked, let inbound = p.inbound else { return false }
            var j = pair
            wires: while j < p.inboundCount && did < Device.batch {
                let wire = inbound[j]
                while did < Device.batch, let f = wire._withUnsafeGuaranteedRef({ $0.peek() }) {
                    let outcome = deliver(rx, c, &state, f.baseAddress!, f.count, headerIn: VirtioNetHeader.size, port, S.self)
                    switch outcome {
                    case .noBuffers, .stopped: break wires
                    case .delivered:
                        port.count(pair, DevicePort.Slot.rxFrames)
                        port.count(pair, DevicePort.Slot.rxBytes, UInt64(f.count - VirtioNetHeader.size))
                    case .dropped(let why): port.drop(pair, why)
                    }
                    wire._withUnsafeGuaranteedRef { $0.release() }
                    did += 1
                }
                j += port.pairs
            }
        case .loopback, .sink:
            return false
        }
        finishRX(rx, c, state, S.self)
        return did > 0
    }

    /// What a batch of deliveries into one RX queue has done so far.
    struct RXBatch {
        /// The used index when the batch began (split rings publish from there).
        var usedBefore: UInt16
        /// The driver's avail index last read (split rings).
        var availIdx: UInt16
        /// Packed used descriptors written since the last notification.
        var packedUsed = 0
    }

    /// Publishes what a batch put in the used ring and notifies the driver if it asked.
    func finishRX<S: DeviceSpaces>(_ rx: VirtQueue, _ c: VringConfig, _ b: RXBatch, _: S.Type) {
        if c.packed {
            if b.packedUsed > 0 { notifyPacked(rx, S.Ring.self) }
        } else if rx.usedIdx != b.usedBefore {
            publishUsed(rx, from: b.usedBefore, S.Ring.self)
        }
    }

    /// Copies one frame (`length` bytes at `frame`, a `headerIn`-byte
    /// virtio-net header first) into the guest's RX buffers. All or nothing: on
    /// anything but `.delivered` no buffer was consumed.
    @inline(__always)
    func deliver<S: DeviceSpaces>(_ rx: VirtQueue, _ c: VringConfig, _ b: inout RXBatch, _ frame: UnsafeRawPointer,
                                  _ length: Int, headerIn: Int, _ port: DevicePort, _: S.Type) -> DeliverOutcome {
        let p = port.m
        let hdrOut = p.pointee.guestHeaderBytes
        let payloadLength = length - headerIn
        if let mtu = p.pointee.mtu, frame.load(fromByteOffset: 1, as: UInt8.self) == VirtioNetHeader.gsoNone,
           payloadLength > mtu + 18 {
            return .dropped(.oversize)
        }
        // The header the guest gets: the port's flags and GSO fields; num_buffers once known.
        if hdrOut > 0 {
            // SAFETY: port.header holds 16 bytes; the frame starts with headerIn bytes of header.
            port.header.initializeMemory(as: UInt8.self, repeating: 0, count: VirtioNetHeader.size)
            port.header.copyMemory(from: frame, byteCount: Swift.min(VirtioNetHeader.legacySize, headerIn))
        }
        let source = FrameSource(header: UnsafeRawPointer(port.header), headerBytes: hdrOut,
                                 payload: frame + headerIn, total: hdrOut + payloadLength)
        return c.packed ? deliverPacked(rx, c, &b, source, port, S.self) : deliverSplit(rx, c, &b, source, port, S.self)
    }

    /// The bytes a guest receives: a header then the payload, as one stream.
    struct FrameSource {
        let header: UnsafeRawPointer
        let headerBytes: Int
        let payload: UnsafeRawPointer
        let total: Int

        /// Copies stream bytes `[at, at+n)` to `dst` (guest-physical `gpa`);
        /// remembers where num_buffers lands.
        @inline(__always)
        func copy(_ at: Int, _ n: Int, to dst: UnsafeMutableRawPointer, gpa: UInt64, _ numBuffers: inout NumBuffersAt) {
            var done = 0
            if at < headerBytes {
                let k = Swift.min(headerBytes - at, n)
                // SAFETY: k <= n, the mapped bytes at dst (one segment); at+k <= headerBytes, the header's size.
                dst.copyMemory(from: header + at, byteCount: k)
                let nb = VirtioNetHeader.numBuffersOffset
                if headerBytes == VirtioNetHeader.size {
                    if at <= nb && nb < at + k { numBuffers.low = dst + (nb - at); numBuffers.lowGPA = gpa &+ UInt64(nb - at) }
                    if at <= nb + 1 && nb + 1 < at + k {
                        numBuffers.high = dst + (nb + 1 - at)
                        numBuffers.highGPA = gpa &+ UInt64(nb + 1 - at)
                    }
                }
                done = k
            }
            // SAFETY: n bytes are mapped at dst; at+n <= total, so the payload holds at+n-headerBytes bytes.
            if done < n { (dst + done).copyMemory(from: payload + (at + done - headerBytes), byteCount: n - done) }
        }
    }

    /// Where the two bytes of num_buffers went (they may lie in two pieces).
    struct NumBuffersAt {
        var low: UnsafeMutableRawPointer?
        var high: UnsafeMutableRawPointer?
        /// Their guest-physical addresses (dirty logging).
        var lowGPA: UInt64 = 0
        var highGPA: UInt64 = 0

        func set(_ n: Int) {
            // SAFETY: each points into a segment copy() wrote, still mapped (same translation generation).
            low?.storeBytes(of: UInt8(truncatingIfNeeded: n), as: UInt8.self)
            high?.storeBytes(of: UInt8(truncatingIfNeeded: n >> 8), as: UInt8.self)
        }

        /// After `set`, while logging: the header's pages again (the front-end
        /// may have copied them since the header was first written).
        func log(_ device: Device) {
            if low != nil { device.logBuffer(lowGPA, 1) }
            if high != nil { device.logBuffer(highGPA, 1) }
        }
    }

    /// Fills the buffers of one RX chain with stream bytes from `written`;
    /// returns how many it took, or nil when the chain stopped the queue.
    @inline(__always)
    private func fillChain<W: ChainWalk>(_ rx: VirtQueue, _ chain: inout W, _ head: UInt16, _ src: FrameSource,
                                         _ written: inout Int, _ numBuffers: inout NumBuffersAt) -> Int? {
        var inChain = 0
        while written < src.total {
            switch chain.next(self, rx) {
            case .end: return inChain
            case .error(let e): chainError(rx, e); return nil
            case .buffer(let addr, let len, let writable):
                guard writable else { fail(rx, "device-readable descriptor in RX chain \(head)"); return nil }
                var off = 0
                while off < Int(len) && written < src.total {
                    // Within the buffer, which the chain walk checked does not pass 2^64-1.
                    let a = addr.uncheckedAdd(UInt64(off))
                    switch segment(a, Swift.min(Int(len) - off, src.total - written), .write, &rx.bufferCache(a.raw).pointee, rx) {
                    case .fault(let f): stop(rx, f); return nil
                    case .ok(let s):
                        if W.Buffer.logs && !logAdmits(rx, s) { return nil }
                        src.copy(written, s.length, to: s.host, gpa: s.gpa, &numBuffers)
                        if W.Buffer.logs { logBuffer(s.gpa, s.length) }
                        off += s.length
                        written += s.length
                        inChain += s.length
                    }
                }
            }
        }
        return inChain
    }

    private func deliverSplit<S: DeviceSpaces>(_ rx: VirtQueue, _ c: VringConfig, _ b: inout RXBatch, _ src: FrameSource,
                                               _ port: DevicePort, _: S.Type) -> DeliverOutcome {
        let savedAvail = rx.lastAvailIdx, savedUsed = rx.usedIdx
        func rollback() { rx.lastAvailIdx = savedAvail; rx.usedIdx = savedUsed }
        let ring = S.Ring(c.availAddr)
        let mask = c.num - 1
        let mergeable = port.m.pointee.mergeable
        var written = 0, buffers = 0
        var numBuffers = NumBuffersAt()
        while written < src.total {
            if rx.lastAvailIdx == b.availIdx {
                b.availIdx = ringLoad16(rx, rx.availHost, ring, SplitRing.availIdx, acquire: true)
                if UInt16(truncatingIfNeeded: b.availIdx &- savedAvail) > UInt16(c.num) {
                    fail(rx, "avail index moved \(b.availIdx &- savedAvail) entries past last_avail_idx; the ring has \(c.num)")
                    rollback()
                    return .stopped
                }
                if rx.lastAvailIdx == b.availIdx { rollback(); return .noBuffers }
            }
            if buffers == DevicePort.maxRXBuffers || (buffers == 1 && !mergeable) { rollback(); return .dropped(.oversize) }
            let head = ringLoad16(rx, rx.availHost, ring, SplitRing.availEntry(Int(rx.lastAvailIdx) & mask))
            var chain = DescriptorChain<S>(head: head, num: c.num)
            guard let took = fillChain(rx, &chain, head, src, &written, &numBuffers) else { rollback(); return .stopped }
            putUsed(rx, id: head, len: UInt32(took), S.Ring.self)
            rx.lastAvailIdx &+= 1
            buffers += 1
        }
        numBuffers.set(buffers)
        if S.Buffer.logs { numBuffers.log(self) }
        rx.chains &+= UInt64(buffers)
        rx.bytes &+= UInt64(written)
        return .delivered
    }

    private func deliverPacked<S: DeviceSpaces>(_ rx: VirtQueue, _ c: VringConfig, _ b: inout RXBatch, _ src: FrameSource,
                                                _ port: DevicePort, _: S.Type) -> DeliverOutcome {
        let savedAvail = rx.lastAvailIdx, savedWrap = rx.availWrap
        func rollback() { rx.lastAvailIdx = savedAvail; rx.availWrap = savedWrap }
        let mergeable = port.m.pointee.mergeable
        let used = port.usedScratch
        var written = 0, buffers = 0
        var numBuffers = NumBuffersAt()
        while written < src.total {
            guard packedAvailable(rx, S.Ring.self) else { rollback(); return .noBuffers }
            if buffers == DevicePort.maxRXBuffers || (buffers == 1 && !mergeable) { rollback(); return .dropped(.oversize) }
            let slot = rx.lastAvailIdx
            var chain = PackedChain<S>(start: Int(slot), num: c.num)
            guard let took = fillChain(rx, &chain, slot, src, &written, &numBuffers) else { rollback(); return .stopped }
            // The used descriptor needs the buffer's id and length in slots: walk what is left.
            if let e = chain.finish(self, rx) { chainError(rx, e); rollback(); return .stopped }
            used[buffers] = DevicePort.UsedBuffer(id: chain.id, len: UInt32(took), slots: chain.slots)
            consumePacked(rx, slots: chain.slots, num: c.num)
            buffers += 1
        }
        numBuffers.set(buffers)
        if S.Buffer.logs { numBuffers.log(self) }
        // The driver reads a merged frame's buffers from its first: write that one last.
        var at = Int(rx.usedIdx), wrap = rx.usedWrap
        let firstAt = at, firstWrap = wrap
        for k in 0..<buffers {
            if k > 0 { writeUsedPacked(rx, at: at, wrap: wrap, used[k], S.Ring.self) }
            at += used[k].slots
            if at >= c.num { at -= c.num; wrap.toggle() }
        }
        writeUsedPacked(rx, at: firstAt, wrap: firstWrap, used[0], S.Ring.self)
        rx.usedIdx = UInt16(at)
        rx.usedWrap = wrap
        b.packedUsed += buffers
        rx.chains &+= UInt64(buffers)
        rx.bytes &+= UInt64(written)
        return .delivered
    }
}

extension Device {
    /// Before the worker sleeps: adds to `fds` (from `at`) the TAP queues whose
    /// RX queue runs and holds no frame back, so a frame arriving wakes the
    /// worker; returns the next free index. A queue holding a frame waits for
    /// the guest's buffers (a kick) instead: watching it would wake at once.
    func watchFDs(_ fds: UnsafeMutablePointer<pollfd>, from at: Int) -> Int {
        guard port.kind == .tap, port.m.pointee.state != .gone else { return at }
        var n = at
        for pair in 0..<port.pairs where port.pendingLength[pair] == 0 {
            let rx = queues[2 * pair]
            guard rx.state == .running, rx.ringsReady else { continue }
            fds[n] = pollfd(fd: port.tapFDs[pair], events: Int16(POLLIN), revents: 0)
            n += 1
        }
        return n
    }
}

extension Device {
    /// Whether everything that can give this device work wakes the worker by
    /// itself, so that it may sleep long: every running queue's driver kicks
    /// (asked to before the worker sleeps), a TAP wakes it through `watchFDs`,
    /// a peer kicks it, commands signal it. A queue polled without kicks (set
    /// over HTTP), or a frame held back by a full TAP, needs the short timeout.
    func wakesWorker() -> Bool {
        if port.m.pointee.backPressured { return false }
        for vq in queues where vq.state == .running && !vq.driverKicks { return false }
        return true
    }
}
