// Invalidations a built-in guest posts to its device without a command: the
// guest thread writes a batch of ranges into a preallocated slot and publishes
// it; the worker finds it at the start of a round (one atomic load when there
// is none), applies it between two rounds as it would a command, and publishes
// the batch's ticket. No closure is made or freed, so dynamic mappings cost the
// datapath thread no allocation and no reference counting per invalidation.
import IOTLB
import Synchronization

/// A single-producer (the guest), single-consumer (the worker) ring of invalidation batches.
public final class InvalidationMailbox: @unchecked Sendable {
    // SAFETY (@unchecked): slot `i` is written by the producer only while
    // `head - tail` says it is free, read by the consumer only between `tail`
    // and `head`; `head` is stored by the producer alone, `tail` and `applied`
    // by the consumer alone, with release, and loaded by the other with acquire.
    /// Batches in flight at most.
    public static let slots = 2
    /// Ranges one batch may hold.
    public let capacity: Int
    private let ranges: UnsafeMutablePointer<AddressRange<IOVA>>
    private let counts: UnsafeMutablePointer<Int>
    private let tickets: UnsafeMutablePointer<UInt64>
    private let head = Atomic<UInt64>(0)
    private let tail = Atomic<UInt64>(0)
    private let appliedTicket = Atomic<UInt64>(0)
    private let refusedBatches = Atomic<UInt64>(0)

    public init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
        ranges = .allocate(capacity: Self.slots * capacity)
        counts = .allocate(capacity: Self.slots)
        counts.initialize(repeating: 0, count: Self.slots)
        tickets = .allocate(capacity: Self.slots)
        tickets.initialize(repeating: 0, count: Self.slots)
    }

    deinit {
        ranges.deallocate()
        counts.deallocate()
        tickets.deallocate()
    }

    // MARK: The guest's side

    /// Posts `batch` with `ticket`; false when every slot is taken or the batch
    /// is larger than `capacity` (then the caller sends a command instead).
    /// (Concrete, not generic: across modules a generic would run unspecialized,
    /// asking the runtime for metadata per element.)
    public func post(_ batch: UnsafeBufferPointer<AddressRange<IOVA>>, ticket: UInt64) -> Bool {
        let h = head.load(ordering: .relaxed)
        guard batch.count <= capacity, h - tail.load(ordering: .acquiring) < UInt64(Self.slots) else { return false }
        let slot = Int(h % UInt64(Self.slots))
        let at = ranges + slot * capacity
        if let base = batch.baseAddress { (at).initialize(from: base, count: batch.count) }
        counts[slot] = batch.count
        tickets[slot] = ticket
        head.store(h + 1, ordering: .releasing)
        return true
    }

    /// The ticket of the last batch applied (acquire: its invalidations are done).
    public var applied: UInt64 { appliedTicket.load(ordering: .acquiring) }

    /// Batches the device refused (an IOTLB that is off).
    public var refused: UInt64 { refusedBatches.load(ordering: .relaxed) }

    // MARK: The worker's side

    /// Applies the batches waiting, in order, with `apply` (false: refused);
    /// true when there was one.
    @inline(__always)
    func drain(_ apply: (UnsafeBufferPointer<AddressRange<IOVA>>) -> Bool) -> Bool {
        var t = tail.load(ordering: .relaxed)
        let h = head.load(ordering: .acquiring)
        guard t != h else { return false }
        while t != h {
            let slot = Int(t % UInt64(Self.slots))
            if !apply(UnsafeBufferPointer(start: ranges + slot * capacity, count: counts[slot])) {
                refusedBatches.add(1, ordering: .relaxed)
            }
            appliedTicket.store(tickets[slot], ordering: .releasing)
            t += 1
            tail.store(t, ordering: .releasing)
        }
        return true
    }
}
