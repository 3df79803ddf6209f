// Walking a descriptor chain (virtio 1.x, 2.7.5 and 2.7.5.3). A malicious or
// buggy driver can hand us a loop, an index past the table, nested indirect
// tables, or readable buffers after writable ones: each is a typed error
// that fails the queue, never the daemon. A ttl bounds every walk.
import IOTLB

/// Why a chain could not be walked.
enum ChainError {
    /// An address in the chain (an indirect table) could not be read.
    case fault(AccessFault)
    /// The chain breaks the ring rules.
    case malformed(String)
}

/// One step of a walk: a buffer at an address of the device's buffer space.
enum ChainStep<Buffer: TranslatedAddress> {
    case buffer(addr: Buffer, len: UInt32, writable: Bool)
    case end
    case error(ChainError)
}

/// Walks one buffer's descriptors: a split ring's chain, or a packed ring's.
protocol ChainWalk {
    associatedtype Buffer: TranslatedAddress
    /// The next descriptor's buffer, the end, or why the walk stopped.
    mutating func next(_ device: Device, _ vq: VirtQueue) -> ChainStep<Buffer>
}

extension ChainWalk {
    /// Walks the rest without using it (a packed ring's used descriptor needs
    /// the chain's length and id); the error that stopped it, if any.
    mutating func finish(_ device: Device, _ vq: VirtQueue) -> ChainError? {
        while true {
            switch next(device, vq) {
            case .end: return nil
            case .error(let e): return e
            case .buffer: continue
            }
        }
    }
}

/// The rules both ring kinds' walkers apply to what a driver wrote (2.7.5, 2.8.13).
enum ChainRules {
    /// Why an indirect table at `addr` of `len` bytes cannot be walked, if it cannot.
    static func indirectTableProblem(addr: UInt64, len: UInt32) -> ChainError? {
        guard len >= 16, len % 16 == 0 else {
            return .malformed("indirect table length \(len) is not a positive multiple of 16")
        }
        guard !addr.addingReportingOverflow(UInt64(len) - 1).overflow else {
            return .malformed("indirect table at 0x\(String(addr, radix: 16)) of \(len) bytes wraps past 2^64-1")
        }
        return nil
    }

    /// The step for a buffer descriptor, or why it breaks the rules: a buffer
    /// wrapping past 2^64-1, a device-readable one after a device-writable one.
    static func buffer<B: TranslatedAddress>(addr: UInt64, len: UInt32, writable: Bool,
                                             sawWritable: inout Bool) -> ChainStep<B> {
        if len > 0 && addr.addingReportingOverflow(UInt64(len) - 1).overflow {
            return .error(.malformed("buffer at 0x\(String(addr, radix: 16)) of \(len) bytes wraps past 2^64-1"))
        }
        if !writable && sawWritable { return .error(.malformed("device-readable descriptor after a device-writable one")) }
        sawWritable = sawWritable || writable
        return .buffer(addr: B(addr), len: len, writable: writable)
    }
}

/// The descriptors of one chain, in order, direct and indirect alike. The
/// table lives in the device's ring space, the buffers (and indirect tables)
/// in its buffer space: `S` names both.
struct DescriptorChain<S: DeviceSpaces>: ChainWalk {
    /// The head index, as named by the avail ring.
    let head: UInt16
    private var nextIndex: UInt16?
    private var indirectBase = S.Buffer(0)
    private var indirectCount = 0  // 0: walking the queue's own table
    private var ttl: Int
    private var sawWritable = false

    init(head: UInt16, num: Int) {
        self.head = head
        self.nextIndex = head
        self.ttl = num
    }

    /// The next descriptor's buffer, the end, or why the walk stopped.
    mutating func next(_ device: Device, _ vq: VirtQueue) -> ChainStep<S.Buffer> {
        while let i = nextIndex {
            ttl -= 1
            guard ttl >= 0 else { return .error(.malformed("descriptor chain from head \(head) loops or is longer than its table")) }
            var d: Descriptor
            if indirectCount > 0 {
                guard Int(i) < indirectCount else {
                    return .error(.malformed("indirect descriptor \(i) is past its table of \(indirectCount)"))
                }
                // The table was checked not to pass 2^64-1 when its descriptor was read.
                let at = indirectBase.uncheckedAdd(UInt64(SplitRing.descriptor(Int(i))))
                switch device.readDescriptor(at, &vq.bufferCache(at.raw).pointee, vq, Descriptor.decode) {
                case .success(let entry): d = entry
                case .failure(let fault): return .error(.fault(fault))
                }
            } else {
                guard Int(i) < vq.config!.num else {
                    return .error(.malformed("descriptor index \(i) is past the ring of \(vq.config!.num)"))
                }
                d = device.descriptor(vq, i, S.Ring.self)
            }
            if d.flags & Descriptor.indirect != 0 {
                guard indirectCount == 0 else { return .error(.malformed("nested indirect descriptor table")) }
                guard d.flags & Descriptor.next == 0 else {
                    return .error(.malformed("indirect descriptor with the NEXT flag"))
                }
                if let e = ChainRules.indirectTableProblem(addr: d.addr, len: d.len) { return .error(e) }
                indirectBase = S.Buffer(d.addr)
                indirectCount = Int(d.len / 16)
                ttl = indirectCount
                nextIndex = 0
                continue
            }
            nextIndex = d.flags & Descriptor.next != 0 ? d.next : nil
            return ChainRules.buffer(addr: d.addr, len: d.len, writable: d.flags & Descriptor.write != 0,
                                     sawWritable: &sawWritable)
        }
        return .end
    }
}

/// A position inside a chain's buffers, for copying chain to chain.
struct ChainCursor<W: ChainWalk> {
    var chain: W
    var addr = W.Buffer(0)
    var left: UInt32 = 0
    var writable = false

    init(_ chain: W) { self.chain = chain }

    enum Status { case ready, end, error(ChainError) }

    /// Moves to a buffer with bytes left, unless the current one has some.
    mutating func fill(_ device: Device, _ vq: VirtQueue) -> Status {
        while left == 0 {
            switch chain.next(device, vq) {
            case .end: return .end
            case .error(let e): return .error(e)
            case .buffer(let a, let l, let w):
                addr = a; left = l; writable = w
            }
        }
        return .ready
    }

    mutating func advance(_ n: Int) {
        // Within the buffer `fill` returned, which does not pass 2^64-1.
        addr = addr.uncheckedAdd(UInt64(n))
        left -= UInt32(n)
    }
}
