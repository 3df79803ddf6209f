// The guest's own view of its memory: guest-physical addresses to host
// pointers, as a vCPU sees RAM. The driver writes rings and buffers through
// it; the device never does (it goes through its accessors).
import IOTLB
import Vhost

/// Guest-physical memory as the guest's CPU sees it.
public struct GuestPhysicalMemory: @unchecked Sendable {
    private let memory: GuestMemory

    /// The guest view of `memory`.
    public init(_ memory: GuestMemory) { self.memory = memory }

    /// The memory table behind it.
    public var table: MemoryTable { memory.table }

    /// A host pointer for `length` bytes at `gpa`; nil unless they lie in one region.
    public func pointer(_ gpa: GuestPhysAddr, _ length: Int = 1) -> UnsafeMutableRawPointer? {
        guard let (p, contiguous) = memory.host(gpa: gpa), UInt64(length) <= contiguous else { return nil }
        return p
    }

    /// Like `pointer`, for addresses the guest laid out itself (a miss is a bug in the guest).
    public func at(_ gpa: GuestPhysAddr, _ length: Int = 1) -> UnsafeMutableRawPointer {
        guard let p = pointer(gpa, length) else { fatalError("guest address \(gpa) (+\(length)) is not in guest memory") }
        return p
    }
}
