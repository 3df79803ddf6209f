// The driver side of a split virtqueue (virtio 1.x, 2.7): lays descriptors,
// offers chains in the avail ring, collects used elements. The tests build
// hand-laid rings with it and the built-in guest drives traffic with it.
import CRingAtomics
import IOTLB
import Vhost

/// Where a ring's three areas live, in guest-physical memory and as the device addresses them.
public struct RingLayout: Sendable, Equatable {
    public var num: Int
    /// Guest-physical addresses (the driver writes here).
    public var descGPA: GuestPhysAddr
    public var availGPA: GuestPhysAddr
    public var usedGPA: GuestPhysAddr

    public init(num: Int, descGPA: GuestPhysAddr, availGPA: GuestPhysAddr, usedGPA: GuestPhysAddr) {
        self.num = num
        self.descGPA = descGPA
        self.availGPA = availGPA
        self.usedGPA = usedGPA
    }

    /// Lays the three areas one after another from `base` (4 KiB aligned each).
    public static func consecutive(num: Int, at base: GuestPhysAddr, eventIdx: Bool = false) -> RingLayout {
        func up(_ x: UInt64) -> UInt64 { (x + 4095) & ~4095 }
        let desc = base.raw
        let avail = up(desc + UInt64(SplitRing.descBytes(num: num)))
        let used = up(avail + UInt64(SplitRing.availBytes(num: num, eventIdx: true)))
        return RingLayout(num: num, descGPA: base, availGPA: GuestPhysAddr(avail), usedGPA: GuestPhysAddr(used))
    }

    /// Bytes from `descGPA` to the end of the used ring.
    public var span: UInt64 { usedGPA.raw + UInt64(SplitRing.usedBytes(num: num, eventIdx: true)) - descGPA.raw }
}

/// What a descriptor names: an IOVA when the device translates through its
/// IOTLB, the guest-physical address itself without (the no-IOMMU baseline).
/// A descriptor holds a plain number; this keeps the two apart until then.
public enum DMAAddress: Sendable, Equatable {
    case iova(IOVA)
    case guestPhys(GuestPhysAddr)

    /// The number written into the descriptor.
    @inlinable public var raw: UInt64 {
        switch self {
        case .iova(let a): a.raw
        case .guestPhys(let a): a.raw
        }
    }
}

/// One used element.
public struct UsedElement: Sendable, Equatable {
    public var id: UInt16
    public var len: UInt32
    public init(id: UInt16, len: UInt32) {
        self.id = id
        self.len = len
    }
}

/// A driver for one split ring in guest memory.
public final class SplitRingDriver: @unchecked Sendable {
    public let layout: RingLayout
    // SAFETY: the three areas point into the guest memory the driver was made
    // with, which outlives it (the workload or test owns both).
    private let desc: UnsafeMutableRawPointer
    private let avail: UnsafeMutableRawPointer
    private let used: UnsafeMutableRawPointer
    /// The driver's two indices.
    ///
    /// SAFETY: one thread drives a ring at a time (the guest's). Behind a
    /// pointer they cost no run-time exclusivity check per frame, as a
    /// class's stored properties would.
    private struct Indices {
        var avail: UInt16 = 0
        var lastUsed: UInt16 = 0
    }
    private let indices: UnsafeMutablePointer<Indices>
    /// The avail index as the driver last staged it.
    public var availIdx: UInt16 { indices.pointee.avail }
    /// Used elements consumed so far.
    public var lastUsedIdx: UInt16 { indices.pointee.lastUsed }

    /// Zeroes the rings at `layout` and takes them over.
    public init(memory: GuestPhysicalMemory, layout: RingLayout) {
        self.layout = layout
        indices = .allocate(capacity: 1)
        indices.initialize(to: Indices())
        let n = layout.num
        // Room for the event fields: the device may use them (EVENT_IDX).
        let descBytes = SplitRing.descBytes(num: n)
        let availBytes = SplitRing.availBytes(num: n, eventIdx: true)
        let usedBytes = SplitRing.usedBytes(num: n, eventIdx: true)
        desc = memory.at(layout.descGPA, descBytes)
        avail = memory.at(layout.availGPA, availBytes)
        used = memory.at(layout.usedGPA, usedBytes)
        desc.initializeMemory(as: UInt8.self, repeating: 0, count: descBytes)
        avail.initializeMemory(as: UInt8.self, repeating: 0, count: availBytes)
        used.initializeMemory(as: UInt8.self, repeating: 0, count: usedBytes)
    }

    deinit { indices.deallocate() }

    /// Writes descriptor `i` naming `addr`.
    public func setDescriptor(_ i: Int, addr: DMAAddress, len: UInt32, flags: UInt16 = 0, next: UInt16 = 0) {
        setDescriptor(i, addr: addr.raw, len: len, flags: flags, next: next)
    }

    /// Writes descriptor `i`: `addr` is what the device sees (an IOVA, or a GPA without IOMMU).
    public func setDescriptor(_ i: Int, addr: UInt64, len: UInt32, flags: UInt16 = 0, next: UInt16 = 0) {
        Descriptor(addr: addr, len: len, flags: flags, next: next).encode(to: desc + SplitRing.descriptor(i))
    }

    /// Writes a descriptor at `p` (a descriptor table slot or an indirect table entry).
    public static func write(descriptorAt p: UnsafeMutableRawPointer, addr: UInt64, len: UInt32, flags: UInt16, next: UInt16) {
        Descriptor(addr: addr, len: len, flags: flags, next: next).encode(to: p)
    }

    /// Puts `head` in the next avail slot without publishing it.
    public func stage(_ head: UInt16) {
        let slot = Int(availIdx) & (layout.num - 1)
        (avail + SplitRing.availEntry(slot)).storeBytes(of: head.littleEndian, as: UInt16.self)
        indices.pointee.avail &+= 1
    }

    /// Publishes staged heads (release: descriptors and ring entries are visible first).
    public func publish() {
        CRingAtomics_store_release_u16(avail + SplitRing.availIdx, availIdx.littleEndian)
    }

    /// Offers `head` at once.
    public func offer(_ head: UInt16) {
        stage(head)
        publish()
    }

    /// Sets the avail flags (bit 0: no interrupt).
    public func setAvailFlags(_ flags: UInt16) {
        (avail + SplitRing.availFlags).storeBytes(of: flags.littleEndian, as: UInt16.self)
    }

    /// Sets used_event (EVENT_IDX).
    public func setUsedEvent(_ idx: UInt16) {
        (avail + SplitRing.usedEvent(num: layout.num)).storeBytes(of: idx.littleEndian, as: UInt16.self)
    }

    /// The device's used index now (acquire).
    public var deviceUsedIdx: UInt16 { UInt16(littleEndian: CRingAtomics_load_acquire_u16(used + SplitRing.usedIdx)) }

    /// The avail_event the device wrote (EVENT_IDX).
    public var availEvent: UInt16 {
        UInt16(littleEndian: (used + SplitRing.availEvent(num: layout.num)).loadUnaligned(as: UInt16.self))
    }

    /// The next used element, if the device has returned one.
    public func takeUsed() -> UsedElement? {
        guard deviceUsedIdx != lastUsedIdx else { return nil }
        let slot = Int(lastUsedIdx) & (layout.num - 1)
        let p = used + SplitRing.usedElement(slot)
        indices.pointee.lastUsed &+= 1
        return UsedElement(id: UInt16(truncatingIfNeeded: UInt32(littleEndian: p.loadUnaligned(as: UInt32.self))),
                           len: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt32.self)))
    }
}
