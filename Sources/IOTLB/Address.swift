// Address spaces and ranges.
//
// Convention for the whole module: ranges are CLOSED, [first, last]. A range
// may end at 2^64-1; a range of 2^64 bytes has no 64-bit size, so nothing here
// stores a size — sizes are derived (`sizeMinusOne`) only where they fit.
// Address types offer no `+`: callers say `checkedAdd` (nil past 2^64-1) or
// `uncheckedAdd` (inside a range checked before, asserted in debug builds), so
// overflow is always a decision; likewise `checkedSub`/`uncheckedSub` and
// `checkedOffset(from:)`/`uncheckedOffset(from:)`.

/// A 64-bit address in one address space. Each space is its own type so the
/// compiler refuses to mix an IOVA with a guest-physical or user address.
public protocol Address: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The address as a plain number.
    var raw: UInt64 { get }
    /// Wraps a plain number as an address of this space.
    init(_ raw: UInt64)
}

extension Address {
    public static func < (a: Self, b: Self) -> Bool { a.raw < b.raw }

    /// `self + bytes`, or nil when that passes 2^64-1.
    @inlinable
    public func checkedAdd(_ bytes: UInt64) -> Self? {
        let (r, o) = raw.addingReportingOverflow(bytes)
        return o ? nil : Self(r)
    }

    /// `self + bytes` where the caller has ruled overflow out (the address
    /// lies in a range already checked not to pass 2^64-1, and `bytes` stays
    /// inside it): asserted in debug builds, a plain add in release ones
    /// (vm-memory's `unchecked_add`). Say at the call which check makes it safe.
    @inlinable @inline(__always)
    public func uncheckedAdd(_ bytes: UInt64) -> Self {
        let (r, o) = raw.addingReportingOverflow(bytes)
        assert(!o, "address overflow")
        return Self(r)
    }

    /// `self - bytes`, or nil when that goes below 0.
    @inlinable
    public func checkedSub(_ bytes: UInt64) -> Self? {
        let (r, o) = raw.subtractingReportingOverflow(bytes)
        return o ? nil : Self(r)
    }

    /// `self - bytes` where the caller has ruled underflow out, as `uncheckedAdd`.
    @inlinable @inline(__always)
    public func uncheckedSub(_ bytes: UInt64) -> Self {
        let (r, o) = raw.subtractingReportingOverflow(bytes)
        assert(!o, "address underflow")
        return Self(r)
    }

    /// Bytes from `base` to `self`; `self` must not be below `base`.
    @inlinable
    public func offset(from base: Self) -> UInt64 {
        precondition(raw >= base.raw, "address below base")
        return raw &- base.raw
    }

    /// Bytes from `base` to `self`, or nil when `self` is below `base`.
    @inlinable
    public func checkedOffset(from base: Self) -> UInt64? {
        raw >= base.raw ? raw &- base.raw : nil
    }

    /// Bytes from `base` to `self` where the caller knows `self` is not below
    /// `base` (both in one checked range): asserted in debug builds only.
    @inlinable @inline(__always)
    public func uncheckedOffset(from base: Self) -> UInt64 {
        assert(raw >= base.raw, "address below base")
        return raw &- base.raw
    }

    public var description: String { "0x" + String(raw, radix: 16) }
}

/// An I/O virtual address: what a device sees when the IOMMU is on.
public struct IOVA: Address {
    public let raw: UInt64
    @inlinable public init(_ raw: UInt64) { self.raw = raw }
}

/// A guest-physical address.
public struct GuestPhysAddr: Address {
    public let raw: UInt64
    @inlinable public init(_ raw: UInt64) { self.raw = raw }
}

/// A userspace address of the VMM process (the `userspace_addr` of a memory region).
public struct UserAddr: Address {
    public let raw: UInt64
    @inlinable public init(_ raw: UInt64) { self.raw = raw }
}

/// A closed range `[first, last]` of one address space.
public struct AddressRange<A: Address>: Hashable, Sendable, CustomStringConvertible {
    /// The first byte.
    public let first: A
    /// The last byte (inclusive).
    public let last: A

    /// `[first, last]`; `first` must not be above `last`.
    @inlinable
    public init(first: A, last: A) {
        precondition(first.raw <= last.raw, "inverted range")
        self.first = first
        self.last = last
    }

    /// `[start, start+size-1]`, or nil when `size` is 0 or the end passes 2^64-1.
    @inlinable
    public init?(start: A, size: UInt64) {
        guard size > 0, let end = start.checkedAdd(size - 1) else { return nil }
        self.first = start
        self.last = end
    }

    /// Bytes in the range minus one (a full 2^64-byte range does not fit a size).
    @inlinable public var sizeMinusOne: UInt64 { last.raw &- first.raw }

    /// Bytes in the range, or nil for the whole 2^64-byte space.
    @inlinable public var size: UInt64? { sizeMinusOne == .max ? nil : sizeMinusOne + 1 }

    @inlinable public func contains(_ a: A) -> Bool { a.raw >= first.raw && a.raw <= last.raw }
    @inlinable public func contains(_ r: AddressRange<A>) -> Bool {
        r.first.raw >= first.raw && r.last.raw <= last.raw
    }
    @inlinable public func overlaps(_ r: AddressRange<A>) -> Bool {
        r.first.raw <= last.raw && first.raw <= r.last.raw
    }

    public var description: String { "[\(first), \(last)]" }
}

/// Access permissions, numbered as the kernel's VHOST_ACCESS_RO/WO/RW.
public struct Permissions: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt8
    @inlinable public init(rawValue: UInt8) { self.rawValue = rawValue }

    // Computed and inlinable rather than stored: a stored static in another
    // module costs a lazy-initialisation check on every use in the datapath.
    /// The device may read (VHOST_ACCESS_RO = 1).
    @inlinable public static var read: Permissions { Permissions(rawValue: 1) }
    /// The device may write (VHOST_ACCESS_WO = 2).
    @inlinable public static var write: Permissions { Permissions(rawValue: 2) }
    /// Both (VHOST_ACCESS_RW = 3).
    @inlinable public static var readWrite: Permissions { Permissions(rawValue: 3) }

    /// "ro", "wo", "rw" or "none".
    public var description: String {
        switch rawValue & 3 {
        case 1: "ro"
        case 2: "wo"
        case 3: "rw"
        default: "none"
        }
    }

    /// Parses "ro", "wo", "rw".
    public init?(name: String) {
        switch name {
        case "ro": self = .read
        case "wo": self = .write
        case "rw": self = .readWrite
        default: return nil
        }
    }
}
