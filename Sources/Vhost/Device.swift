// A vhost device: memory table, IOTLB, counters. Owned by one datapath
// worker; every method runs on that worker's thread (see Worker.swift).
import IOTLB

/// What an IOTLB update did.
public struct UpdateReport: Equatable, Sendable {
    /// Entries inserted.
    public var applied = 0
    /// Entries removed by FIFO replacement.
    public var evicted = 0
    /// Entries removed because a new range overlapped them.
    public var replaced = 0
    /// Entries held afterwards.
    public var entries = 0
    /// Pending misses this update resolved.
    public var resolvedMisses = 0
}

/// IOTLB counters, as published to readers.
public struct IOTLBStats: Equatable, Sendable {
    public var entries = 0
    public var maxEntries = 0
    public var hits: UInt64 = 0
    public var misses: UInt64 = 0
    public var updates: UInt64 = 0
    public var invalidations: UInt64 = 0
    public var evictions: UInt64 = 0
    public var accessFailures: UInt64 = 0
    public var pendingMisses = 0
}

/// One device's state. Not thread-safe by design: only its worker touches it.
public final class Device {
    /// Creation parameters.
    public let config: DeviceConfig
    /// The device IOTLB (present even when `config.iotlb` is off, then unused).
    public let iotlb: IOTLB
    /// Guest memory and its table, once set.
    public private(set) var memory: GuestMemory?
    let limits: EngineLimits
    var counters = IOTLBStats()

    init(config: DeviceConfig, limits: EngineLimits) {
        self.config = config
        self.limits = limits
        self.iotlb = IOTLB(maxEntries: config.iotlbMaxEntries)
    }

    /// The memory table, once set.
    public var memTable: MemoryTable? { memory?.table }

    /// Replaces the memory table: maps new backing memory, then flushes the IOTLB.
    public func setMemTable(_ regions: [MemoryRegion]) throws(EngineError) -> MemoryTable {
        let table: MemoryTable
        do {
            table = try MemoryTable(regions: regions, maxRegions: limits.maxMemRegions,
                                    maxTotalBytes: limits.maxGuestMemory)
        } catch { throw .invalidMemTable(error) }
        let mem: GuestMemory
        do { mem = try GuestMemory(table: table, hugePages: limits.hugePages) } catch {
            throw .memoryUnavailable(error.description)
        }
        memory = mem
        iotlb.flush()
        return table
    }

    private func requireIOTLB() throws(EngineError) {
        guard config.iotlb else { throw .conflict("device \(config.id) was created with \"iotlb\": false") }
    }

    /// Applies `entries` in order, all or nothing: every user range must be
    /// wholly backed by the memory table before any is inserted.
    public func updateIOTLB(_ entries: [IOTLBEntry]) throws(EngineError) -> UpdateReport {
        try requireIOTLB()
        guard let table = memTable else { throw .noMemTable }
        for (i, e) in entries.enumerated() {
            guard let ur = e.uaddrRange else { throw .rangeOverflow(index: i, field: "uaddr") }
            guard table.isBacked(ur) else { throw .uaddrNotMapped(index: i) }
        }
        var report = UpdateReport()
        for e in entries {
            let out = iotlb.update(e)
            report.applied += 1
            report.evicted += out.evicted
            report.replaced += out.replaced
        }
        counters.updates += UInt64(report.applied)
        counters.evictions += UInt64(report.evicted)
        report.entries = iotlb.count
        return report
    }

    /// Removes every entry overlapping any of `ranges`; returns how many.
    public func invalidateIOTLB(_ ranges: [AddressRange<IOVA>]) throws(EngineError) -> Int {
        try requireIOTLB()
        var removed = 0
        for r in ranges { removed += iotlb.invalidate(r) }
        counters.invalidations += UInt64(ranges.count)
        return removed
    }

    /// Removes every entry; returns how many.
    public func flushIOTLB() throws(EngineError) -> Int {
        try requireIOTLB()
        counters.invalidations += 1
        return iotlb.flush()
    }

    /// A pure look-up: posts no miss, counts nothing.
    public func translate(_ iova: IOVA, access: Permissions, size: UInt64) throws(EngineError) -> Translation {
        try requireIOTLB()
        return iotlb.translate(iova, access: access, size: size)
    }

    /// Entries overlapping `range` (all when nil), sorted by IOVA.
    public func entries(overlapping range: AddressRange<IOVA>?) throws(EngineError) -> [IOTLBEntry] {
        try requireIOTLB()
        return iotlb.entries(overlapping: range)
    }

    /// A snapshot of the counters.
    public func stats() -> IOTLBStats {
        var s = counters
        s.entries = iotlb.count
        s.maxEntries = iotlb.maxEntries
        return s
    }
}

extension Device {
    /// One datapath round over the device's queues; true when it did work.
    func poll() -> Bool { false }

    /// Called when the device leaves its worker (deletion, shutdown).
    func detach() {}
}
