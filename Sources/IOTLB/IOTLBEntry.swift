// The IOTLB's values: an entry, what a look-up or a translation finds, why an
// entry left, what an update did. Ranges are closed, [first, last] (see
// Address.swift).

/// One translation: the IOVAs of `range` map to `uaddr` onwards, with permission `perm`.
public struct IOTLBEntry: Hashable, Sendable {
    /// The IOVAs covered.
    public var range: AddressRange<IOVA>
    /// The user address of `range.first`.
    public var uaddr: UserAddr
    /// What the device may do through this entry.
    public var perm: Permissions

    public init(range: AddressRange<IOVA>, uaddr: UserAddr, perm: Permissions) {
        self.range = range
        self.uaddr = uaddr
        self.perm = perm
    }

    /// The user addresses covered, or nil when `uaddr` plus the range size would wrap.
    public var uaddrRange: AddressRange<UserAddr>? {
        guard let last = uaddr.checkedAdd(range.sizeMinusOne) else { return nil }
        return AddressRange(first: uaddr, last: last)
    }
}

/// The answer of a look-up. Failures are values: the caller decides what a miss means.
public enum Translation: Equatable, Sendable {
    /// `iova` maps to `uaddr`; `length` bytes from there are contiguous (capped at the size asked).
    case mapped(uaddr: UserAddr, length: UInt64, perm: Permissions)
    /// No entry holds the IOVA.
    case miss
    /// An entry holds the IOVA but lacks a requested permission.
    case denied(perm: Permissions)
}

/// What `IOTLB.lookup` finds.
public enum IOTLBLookup: Equatable, Sendable {
    /// `entry` holds the IOVA, which lands on `uaddr`.
    case mapped(IOTLBEntry, uaddr: UserAddr)
    /// No entry holds the IOVA.
    case miss
    /// An entry holds the IOVA but lacks a requested permission.
    case denied(perm: Permissions)
}

/// Why an entry left the table (reported to `onRemove` callbacks).
public enum RemovalReason: Sendable {
    /// An update overlapped it.
    case replaced
    /// The table was full and it was the oldest.
    case evicted
    /// An invalidation overlapped it.
    case invalidated
    /// The table was flushed.
    case flushed
}

/// Counts of what an update did.
public struct UpdateOutcome: Equatable, Sendable {
    /// Entries removed because the new range overlapped them.
    public var replaced = 0
    /// Entries removed by FIFO replacement.
    public var evicted = 0
    public init(replaced: Int = 0, evicted: Int = 0) {
        self.replaced = replaced
        self.evicted = evicted
    }
}
