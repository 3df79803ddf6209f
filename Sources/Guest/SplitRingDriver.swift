// The driver side of a split virtqueue (virtio 1.x, 2.7): lays descriptors,
// offers chains in the avail ring, collects used elements. The tests build
// hand-laid rings with it and the built-in guest drives traffic with it.
import CRingAtomics
import IOTLB

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
    public static func packed(num: Int, at base: GuestPhysAddr, eventIdx: Bool = false) -> RingLayout {
        func up(_ x: UInt64) -> UInt64 { (x + 4095) & ~4095 }
        let desc = base.raw
        let avail = up(desc + UInt64(16 * num))
        let used = up(avail + UInt64(4 + 2 * num + 2))
        return RingLayout(num: num, descGPA: base, availGPA: GuestPhysAddr(avail), usedGPA: GuestPhysAddr(used))
    }

    /// Bytes from `descGPA` to the end of the used ring.
    public var span: UInt64 { usedGPA.raw + UInt64(4 + 8 * num + 2) - descGPA.raw }
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
        desc = memory.at(layout.descGPA, 16 * n)
        avail = memory.at(layout.availGPA, 4 + 2 * n + 2)
        used = memory.at(layout.usedGPA, 4 + 8 * n + 2)
        desc.initializeMemory(as: UInt8.self, repeating: 0, count: 16 * n)
        avail.initializeMemory(as: UInt8.self, repeating: 0, count: 4 + 2 * n + 2)
        used.initializeMemory(as: UInt8.self, repeating: 0, count: 4 + 8 * n + 2)
    }

    deinit { indices.deallocate() }

    /// Writes descriptor `i`: `addr` is what the device sees (an IOVA, or a GPA without IOMMU).
    public func setDescriptor(_ i: Int, addr: UInt64, len: UInt32, flags: UInt16 = 0, next: UInt16 = 0) {
        SplitRingDriver.write(descriptorAt: desc + 16 * i, addr: addr, len: len, flags: flags, next: next)
    }

    /// Writes a descriptor at `p` (a descriptor table slot or an indirect table entry).
    public static func write(descriptorAt p: UnsafeMutableRawPointer, addr: UInt64, len: UInt32, flags: UInt16, next: UInt16) {
        p.storeBytes(of: addr.littleEndian, toByteOffset: 0, as: UInt64.self)
        p.storeBytes(of: len.littleEndian, toByteOffset: 8, as: UInt32.self)
        p.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
        p.storeBytes(of: next.littleEndian, toByteOffset: 14, as: UInt16.self)
    }

    /// Puts `head` in the next avail slot without publishing it.
    public func stage(_ head: UInt16) {
        let slot = Int(availIdx) & (layout.num - 1)
        (avail + 4 + 2 * slot).storeBytes(of: head.littleEndian, as: UInt16.self)
        indices.pointee.avail &+= 1
    }

    /// Publishes staged heads (release: descriptors and ring entries are visible first).
    public func publish() {
        CRingAtomics_store_release_u16(avail + 2, availIdx.littleEndian)
    }

    /// Offers `head` at once.
    public func offer(_ head: UInt16) {
        stage(head)
        publish()
    }

    /// Sets the avail flags (bit 0: no interrupt).
    public func setAvailFlags(_ flags: UInt16) { (avail).storeBytes(of: flags.littleEndian, as: UInt16.self) }

    /// Sets used_event (EVENT_IDX).
    public func setUsedEvent(_ idx: UInt16) {
        (avail + 4 + 2 * layout.num).storeBytes(of: idx.littleEndian, as: UInt16.self)
    }

    /// The device's used index now (acquire).
    public var deviceUsedIdx: UInt16 { UInt16(littleEndian: CRingAtomics_load_acquire_u16(used + 2)) }

    /// The avail_event the device wrote (EVENT_IDX).
    public var availEvent: UInt16 {
        UInt16(littleEndian: (used + 4 + 8 * layout.num).loadUnaligned(as: UInt16.self))
    }

    /// The next used element, if the device has returned one.
    public func takeUsed() -> UsedElement? {
        guard deviceUsedIdx != lastUsedIdx else { return nil }
        let slot = Int(lastUsedIdx) & (layout.num - 1)
        let p = used + 4 + 8 * slot
        indices.pointee.lastUsed &+= 1
        return UsedElement(id: UInt16(truncatingIfNeeded: UInt32(littleEndian: p.loadUnaligned(as: UInt32.self))),
                           len: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt32.self)))
    }
}
