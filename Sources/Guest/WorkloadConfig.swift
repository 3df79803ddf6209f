// What a built-in guest workload is asked to do, and what it reports.
import IOTLB

/// How the guest maps its buffers in its IOMMU.
public enum MappingMode: String, Sendable, CaseIterable {
    /// Everything mapped once at start (DPDK-style).
    case `static`
    /// Each buffer mapped before posting and unmapped after use, each unmap
    /// invalidating the device IOTLB before the IOVA is reused (Linux strict mode).
    case dynamic
}

/// `PUT …/workload`.
public struct WorkloadConfig: Sendable, Equatable {
    /// Payload bytes per frame (64...65535), after the 12-byte virtio-net header.
    public var packetSize = 64
    /// Guest IOMMU page size.
    public var pageSize = PageSize.m2
    /// Static or dynamic guest mappings.
    public var mapping = MappingMode.static
    /// Frames to send; 0 = until stopped.
    public var packets: UInt64 = 0
    /// Entries per ring (power of 2).
    public var ringSize = 256
    /// With the builtin translator: push each new guest mapping to the device
    /// IOTLB when the guest maps it, so buffers do not miss.
    public var eager = false

    public init() {}

    /// Bytes a buffer slot takes: header plus payload, 64-byte aligned.
    var slotBytes: Int { (Frame.headerBytes + packetSize + 63) & ~63 }
}

/// Where a workload is in its life.
public enum WorkloadState: String, Sendable, Equatable {
    case starting, running
    /// All frames asked for came back.
    case done
    case stopped, failed

    /// Starting or running: the device is taken.
    public var isActive: Bool { self == .starting || self == .running }
}

/// A workload's figures.
public struct WorkloadStats: Sendable, Equatable {
    public var state = WorkloadState.starting
    public var sent: UInt64 = 0
    public var received: UInt64 = 0
    public var verifyErrors: UInt64 = 0
    /// Frames per second over the last second (over the whole run once finished).
    public var pps: Double = 0
    /// Payload gigabits per second, same window.
    public var gbps: Double = 0
    public var elapsed: Double = 0
    /// Invalidation commands the guest issued (dynamic mappings).
    public var invalidations: UInt64 = 0
    /// Update commands the guest pushed (eager).
    public var eagerUpdates: UInt64 = 0
    /// Eager pushes the device refused (its memory table no longer backs the
    /// guest's pages, say): those pages miss instead, and the translator answers.
    public var eagerUpdateFailures: UInt64 = 0
    /// Invalidations the device refused. A strict guest relies on each one:
    /// any is also reported in `error` (a buffer it reused may still be mapped).
    public var invalidationFailures: UInt64 = 0
    /// Misses the builtin translator answered.
    public var translatorAnswers: UInt64 = 0
    /// Why it failed, or the first verify error.
    public var error: String?
    /// Memory layout: where the guest put things.
    public var guestMemoryBytes: UInt64 = 0
}
