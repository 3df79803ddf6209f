// The split virtqueue's memory layout (virtio 1.x, 2.7), written once: byte
// offsets inside its three areas and a descriptor's encoding. The device
// (VirtQueue, Datapath) and the built-in guest's driver both use it.

/// Byte offsets and sizes of a split ring of `num` entries.
public enum SplitRing {
    /// Descriptor table: 16 bytes a descriptor (2.7.5).
    @inlinable public static func descriptor(_ i: Int) -> Int { 16 &* i }
    @inlinable public static func descBytes(num: Int) -> Int { 16 &* num }

    // Avail ring, the driver area (2.7.6): flags, idx, ring[num], used_event.
    public static let availFlags = 0
    public static let availIdx = 2
    @inlinable public static func availEntry(_ slot: Int) -> Int { 4 &+ 2 &* slot }
    /// The head in avail ring entry `i` (masked below `num`, a power of 2) of
    /// the avail ring at `ring`, which holds at least 4+2·num bytes.
    @inlinable public static func head(inAvail ring: UnsafeRawPointer, _ i: UInt16, num: Int) -> UInt16 {
        // SAFETY: the entry is masked below num: inside the 4+2·num bytes the caller vouches for.
        UInt16(littleEndian: (ring + availEntry(Int(i) & (num &- 1))).loadUnaligned(as: UInt16.self))
    }
    @inlinable public static func usedEvent(num: Int) -> Int { 4 &+ 2 &* num }
    @inlinable public static func availBytes(num: Int, eventIdx: Bool) -> Int { 4 &+ 2 &* num &+ (eventIdx ? 2 : 0) }

    // Used ring, the device area (2.7.8): flags, idx, ring[num] of (id: u32, len: u32), avail_event.
    public static let usedFlags = 0
    public static let usedIdx = 2
    @inlinable public static func usedElement(_ slot: Int) -> Int { 4 &+ 8 &* slot }
    @inlinable public static func availEvent(num: Int) -> Int { 4 &+ 8 &* num }
    @inlinable public static func usedBytes(num: Int, eventIdx: Bool) -> Int { 4 &+ 8 &* num &+ (eventIdx ? 2 : 0) }
}

/// A descriptor as laid in guest memory (2.7.5), little-endian.
public struct Descriptor: Equatable, Sendable {
    public var addr: UInt64
    public var len: UInt32
    public var flags: UInt16
    public var next: UInt16

    public init(addr: UInt64, len: UInt32, flags: UInt16 = 0, next: UInt16 = 0) {
        self.addr = addr
        self.len = len
        self.flags = flags
        self.next = next
    }

    /// VIRTQ_DESC_F_NEXT, _WRITE, _INDIRECT.
    public static let next: UInt16 = 1
    public static let write: UInt16 = 2
    public static let indirect: UInt16 = 4

    /// The descriptor at `p` (16 bytes, any alignment).
    @inlinable
    public static func decode(_ p: UnsafeRawPointer) -> Descriptor {
        // SAFETY: callers pass 16 readable bytes: a ring slot i < num of a mapped table, or a local copy.
        Descriptor(addr: UInt64(littleEndian: p.loadUnaligned(as: UInt64.self)),
                   len: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt32.self)),
                   flags: UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 12, as: UInt16.self)),
                   next: UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 14, as: UInt16.self)))
    }

    /// Writes the descriptor at `p` (16 bytes).
    @inlinable
    public func encode(to p: UnsafeMutableRawPointer) {
        // SAFETY: callers pass 16 writable bytes (the built-in guest's own ring slot).
        p.storeBytes(of: addr.littleEndian, toByteOffset: 0, as: UInt64.self)
        p.storeBytes(of: len.littleEndian, toByteOffset: 8, as: UInt32.self)
        p.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
        p.storeBytes(of: next.littleEndian, toByteOffset: 14, as: UInt16.self)
    }
}
