// A single-producer, single-consumer ring of frames between two datapath
// threads: the wire between two guest-to-guest ports. The sender's worker
// copies a TX frame in, the receiver's worker copies it out into its guest's
// RX buffers when it has them. Each side touches only its own guest's memory,
// so each keeps its own IOTLB and the concurrency rule holds; a full ring
// drops at the sender, as a switch port does, so a stuck peer never stops the
// other device. No lock, no allocation per frame: positions are byte counts
// published with release/acquire.
//
// Layout: records of an 8-byte header (the frame's length) and the frame,
// rounded up to 8 bytes; a record never wraps: when it does not fit before the
// end, a marker (length `wrapMarker`) sends the consumer back to the start.
import CRingAtomics

/// Frames in flight from one datapath thread to another.
public final class FrameRing: @unchecked Sendable {
    // SAFETY (@unchecked): `storage` is written by the producer only between
    // `tail` and the next reserve, read by the consumer only between `tail`
    // and `head`; `head` is stored by the producer alone, `tail` by the consumer
    // alone, with release, and each is read by the other side with acquire.
    // The positions sit 128 bytes apart (no false sharing); memory lives as
    // long as the ring.
    private let storage: UnsafeMutableRawPointer
    private let positions: UnsafeMutableRawPointer
    /// Bytes of storage (a power of 2).
    public let capacity: Int
    /// The longest frame a record may hold.
    public let maxFrame: Int
    private static let wrapMarker: UInt32 = .max

    // Each side's private view: its own position and a cached copy of the other's.
    private let producer: UnsafeMutablePointer<(head: UInt64, tailSeen: UInt64)>
    private let consumer: UnsafeMutablePointer<(tail: UInt64, headSeen: UInt64)>

    public init(capacity: Int = 256 << 10, maxFrame: Int = 65_536 + 64) {
        precondition(capacity > 0 && capacity & (capacity - 1) == 0 && maxFrame + 16 <= capacity / 2)
        self.capacity = capacity
        self.maxFrame = maxFrame
        storage = .allocate(byteCount: capacity, alignment: 64)
        positions = .allocate(byteCount: 256, alignment: 128)
        positions.initializeMemory(as: UInt8.self, repeating: 0, count: 256)
        producer = .allocate(capacity: 1)
        producer.initialize(to: (0, 0))
        consumer = .allocate(capacity: 1)
        consumer.initialize(to: (0, 0))
    }

    deinit {
        storage.deallocate()
        positions.deallocate()
        producer.deallocate()
        consumer.deallocate()
    }

    private var headAddress: UnsafeMutableRawPointer { positions }
    private var tailAddress: UnsafeMutableRawPointer { positions + 128 }

    @inline(__always) private static func recordBytes(_ length: Int) -> Int { 8 + (length + 7) & ~7 }

    // MARK: Producer (the sending worker)

    /// Room for a frame of `length` bytes, or nil when the ring is full (or the
    /// frame longer than `maxFrame`). Write the frame there, then `commit`.
    @inline(__always)
    public func reserve(_ length: Int) -> UnsafeMutableRawPointer? {
        guard length <= maxFrame else { return nil }
        let need = UInt64(Self.recordBytes(length))
        let head = producer.pointee.head
        let offset = Int(head & UInt64(capacity - 1))
        let pad = capacity - offset < Int(need) ? UInt64(capacity - offset) : 0
        if head &+ pad &+ need &- producer.pointee.tailSeen > UInt64(capacity) {
            producer.pointee.tailSeen = CRingAtomics_load_acquire_u64(tailAddress)
            if head &+ pad &+ need &- producer.pointee.tailSeen > UInt64(capacity) { return nil }
        }
        if pad > 0 {
            // SAFETY: offset is masked below capacity and 8-aligned (records are), so 4 bytes fit before the end.
            (storage + offset).storeBytes(of: Self.wrapMarker, as: UInt32.self)
            producer.pointee.head = head &+ pad
            return storage + 8  // SAFETY: need <= capacity/2 bytes from 0 are free (checked above)
        }
        return storage + offset + 8  // SAFETY: need bytes fit before the end (pad == 0) and are free
    }

    /// Publishes the frame written after `reserve(length)`.
    @inline(__always)
    public func commit(_ length: Int) {
        let head = producer.pointee.head
        let offset = Int(head & UInt64(capacity - 1))
        // SAFETY: the record reserve() made starts here (head, masked), 8-aligned, inside storage.
        (storage + offset).storeBytes(of: UInt32(length), as: UInt32.self)
        producer.pointee.head = head &+ UInt64(Self.recordBytes(length))
        CRingAtomics_store_release_u64(headAddress, producer.pointee.head)
    }

    // MARK: Consumer (the receiving worker)

    /// The oldest frame not yet released, or nil when none waits. Valid until `release()`.
    @inline(__always)
    public func peek() -> UnsafeRawBufferPointer? {
        var tail = consumer.pointee.tail
        if tail == consumer.pointee.headSeen {
            consumer.pointee.headSeen = CRingAtomics_load_acquire_u64(headAddress)
            if tail == consumer.pointee.headSeen { return nil }
        }
        var offset = Int(tail & UInt64(capacity - 1))
        // SAFETY: tail < head, so a record header the producer published (acquire) sits at this masked offset.
        var length = (storage + offset).load(as: UInt32.self)
        if length == Self.wrapMarker {
            tail &+= UInt64(capacity - offset)
            consumer.pointee.tail = tail
            offset = 0
            length = storage.load(as: UInt32.self)
        }
        // SAFETY: a record never wraps: its length bytes follow its header inside storage.
        return UnsafeRawBufferPointer(start: storage + offset + 8, count: Int(length))
    }

    /// Drops the frame `peek` returned, making its room the producer's again.
    @inline(__always)
    public func release() {
        let offset = Int(consumer.pointee.tail & UInt64(capacity - 1))
        // SAFETY: the header peek() read (the wrap marker already skipped), inside storage.
        let length = Int((storage + offset).load(as: UInt32.self))
        consumer.pointee.tail &+= UInt64(Self.recordBytes(length))
        CRingAtomics_store_release_u64(tailAddress, consumer.pointee.tail)
    }

    /// Whether a frame waits (the consumer's view; one acquire load at most).
    @inline(__always)
    public var isEmpty: Bool {
        consumer.pointee.tail == consumer.pointee.headSeen
            && consumer.pointee.tail == CRingAtomics_load_acquire_u64(headAddress)
    }
}
