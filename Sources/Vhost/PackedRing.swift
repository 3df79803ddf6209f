// The packed virtqueue (virtio 1.1+, 2.8): one descriptor ring the driver and
// the device both write, plus two 4-byte event suppression areas. A
// descriptor is available when its AVAIL bit equals the driver's wrap counter
// and its USED bit does not; the device hands a buffer back by writing one
// descriptor (id, length, both bits = its own wrap counter) at its used
// position, which then moves by the number of descriptors the buffer took.

/// Byte offsets and flags of a packed ring.
public enum PackedRing {
    /// Descriptor ring: 16 bytes a descriptor (2.8.13).
    @inlinable public static func descriptor(_ i: Int) -> Int { 16 &* i }
    @inlinable public static func descBytes(num: Int) -> Int { 16 &* num }
    /// The flags' offset in a descriptor (written last, read first).
    public static let flagsOffset = 14

    /// VIRTQ_DESC_F_AVAIL and _USED (2.8.1).
    public static let avail: UInt16 = 1 << 7
    public static let used: UInt16 = 1 << 15

    /// Event suppression areas (2.8.14): the driver's at the "avail" address,
    /// the device's at the "used" address; off_wrap then flags.
    public static let eventBytes = 4
    public static let eventOffWrap = 0
    public static let eventFlags = 2
    /// RING_EVENT_FLAGS_ENABLE, _DISABLE, _DESC.
    public static let eventEnable: UInt16 = 0
    public static let eventDisable: UInt16 = 1
    public static let eventDesc: UInt16 = 2

    /// Whether a descriptor with `flags` is available to a device whose
    /// driver wrap counter is `wrap`.
    @inlinable
    public static func isAvailable(_ flags: UInt16, wrap: Bool) -> Bool {
        (flags & avail != 0) == wrap && (flags & used != 0) != wrap
    }

    /// The flags of a used descriptor written with wrap counter `wrap` (plus `write`).
    @inlinable
    public static func usedFlags(wrap: Bool) -> UInt16 { wrap ? avail | used : 0 }
}

/// A packed descriptor as laid in guest memory (2.8.13), little-endian.
public struct PackedDescriptor: Equatable, Sendable {
    public var addr: UInt64
    public var len: UInt32
    public var id: UInt16
    public var flags: UInt16

    public init(addr: UInt64, len: UInt32, id: UInt16, flags: UInt16) {
        self.addr = addr
        self.len = len
        self.id = id
        self.flags = flags
    }

    @inlinable
    public static func decode(_ p: UnsafeRawPointer) -> PackedDescriptor {
        // SAFETY: callers pass 16 readable bytes: a ring slot < num of a mapped ring, or a local copy.
        PackedDescriptor(addr: UInt64(littleEndian: p.loadUnaligned(as: UInt64.self)),
                         len: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt32.self)),
                         id: UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 12, as: UInt16.self)),
                         flags: UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 14, as: UInt16.self)))
    }

    /// Writes everything but the flags (the caller stores them last, with release).
    @inlinable
    public func encodeAllButFlags(to p: UnsafeMutableRawPointer) {
        // SAFETY: callers pass a ring slot < num whose 16 bytes prepareRings (or the guest) mapped.
        p.storeBytes(of: addr.littleEndian, toByteOffset: 0, as: UInt64.self)
        p.storeBytes(of: len.littleEndian, toByteOffset: 8, as: UInt32.self)
        p.storeBytes(of: id.littleEndian, toByteOffset: 12, as: UInt16.self)
    }
}

/// The descriptors of one buffer in a packed ring, from its first slot: the
/// ring's own (chained by NEXT over consecutive slots, wrapping) or one
/// indirect table. Remembers how many ring slots the buffer took and its id
/// (the last descriptor's), which the used descriptor reports.
struct PackedChain<S: DeviceSpaces>: ChainWalk {
    typealias Buffer = S.Buffer
    private let num: Int
    private var slot: Int
    private var more = true           // the ring chain continues
    private(set) var slots = 0        // ring descriptors read
    private(set) var id: UInt16 = 0
    private var indirectBase = S.Buffer(0)
    private var indirectCount = 0
    private var indirectNext = 0
    private var sawWritable = false

    init(start: Int, num: Int) {
        self.num = num
        self.slot = start
    }

    mutating func next(_ device: Device, _ vq: VirtQueue) -> ChainStep<S.Buffer> {
        while true {
            if indirectNext < indirectCount {
                // The table was checked not to pass 2^64-1 when its descriptor was read.
                let at = indirectBase.uncheckedAdd(UInt64(PackedRing.descriptor(indirectNext)))
                let d: PackedDescriptor
                switch device.readDescriptor(at, &vq.bufferCache(at.raw).pointee, vq, PackedDescriptor.decode) {
                case .success(let entry): d = entry
                case .failure(let fault): return .error(.fault(fault))
                }
                indirectNext += 1
                if d.flags & Descriptor.indirect != 0 { return .error(.malformed("nested indirect descriptor table")) }
                return buffer(d)
            }
            guard more else { return .end }
            guard slots < num else {
                return .error(.malformed("packed descriptor chain longer than its ring of \(num)"))
            }
            let d = device.packedDescriptor(vq, slot, S.Ring.self)
            slots += 1
            slot = slot + 1 == num ? 0 : slot + 1
            more = d.flags & Descriptor.next != 0
            id = d.id
            if d.flags & Descriptor.indirect != 0 {
                guard indirectCount == 0, !more else {
                    return .error(.malformed("indirect packed descriptor with NEXT, or a second one in a chain"))
                }
                if let e = ChainRules.indirectTableProblem(addr: d.addr, len: d.len) { return .error(e) }
                indirectBase = S.Buffer(d.addr)
                indirectCount = Int(d.len / 16)
                continue
            }
            return buffer(d)
        }
    }

    private mutating func buffer(_ d: PackedDescriptor) -> ChainStep<S.Buffer> {
        ChainRules.buffer(addr: d.addr, len: d.len, writable: d.flags & Descriptor.write != 0, sawWritable: &sawWritable)
    }
}
