import IOTLB

/// Why the engine refused an operation. Nothing was changed when one is thrown.
/// The control plane maps each case to an HTTP status and error code.
public enum EngineError: Error, Equatable, Sendable {
    /// The device has no memory table yet.
    case noMemTable
    /// `entries[index]`'s user range is not wholly backed by the memory table.
    case uaddrNotMapped(index: Int)
    /// `entries[index]`'s user range, uaddr+size, wraps past 2^64-1.
    case uaddrRangeOverflow(index: Int)
    /// The memory table was refused.
    case invalidMemTable(MemoryTableError)
    /// The memory could not be mapped.
    case memoryUnavailable(String)
    /// A state conflict (duplicate id, IOTLB disabled, ...).
    case conflict(String)
    /// No such device, vring, or entry.
    case notFound(String)
    /// A field has a value the engine cannot accept.
    case invalidField(field: String, message: String)
    /// The engine is shutting down.
    case unavailable
}
