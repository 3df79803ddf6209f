// The built-in guest ("l2fwd in the guest" of the seed benchmark): on its own
// thread it lays RX/TX rings and buffers in guest memory, maps them in its
// IOMMU (static or dynamic), sends frames on TX, refills RX, and verifies
// every byte that comes back through the device's loopback.
import Glibc
import Platform
import Synchronization
import IOTLB
import Vhost

/// Why a workload could not start.
public enum WorkloadError: Error, Equatable, Sendable {
    case engine(EngineError)
    case unsuitable(String)
}

/// One running built-in guest, bound to one device's queues 0 (RX) and 1 (TX).
public final class Workload: @unchecked Sendable {
    /// What it was asked to do.
    public let config: WorkloadConfig
    /// The device it drives.
    public let handle: DeviceHandle
    /// Its IOMMU (nil with the device IOTLB off: no IOMMU, addresses are guest-physical).
    public private(set) var iommu: GuestIOMMU?
    /// Guest memory, as the guest sees it.
    public private(set) var memory: GuestPhysicalMemory?

    /// Static mappings (and rings): IOVA = guest-physical address + this (1 GiB aligned, so pages line up).
    public static let iovaBase: UInt64 = 0x10_0000_0000
    /// Dynamic mappings: each buffer slot has its own IOVA window from here, as
    /// a Linux guest's IOVA allocator hands every dma_map its own range.
    public static let dynamicIOVABase: UInt64 = 0x100_0000_0000
    /// The user address the daemon gives a workload's memory when the device has none.
    public static let uaddrBase: UInt64 = 0x7f00_0000_0000

    private let stopFlag = Atomic<Bool>(false)
    private let published = Locked(WorkloadStats())
    private var thread: pthread_t?
    private var translator: BuiltinTranslator?
    private let startResult = Locked<Result<Void, WorkloadError>?>(nil)
    private let started = WakeSignal()

    private init(config: WorkloadConfig, handle: DeviceHandle) {
        self.config = config
        self.handle = handle
    }

    /// Sets up memory, rings and mappings on a new guest thread and starts
    /// traffic; `ready` runs once set-up succeeded or failed.
    public static func start(_ config: WorkloadConfig, on handle: DeviceHandle,
                             ready: @escaping @Sendable (Result<Workload, WorkloadError>) -> Void) {
        let w = Workload(config: config, handle: handle)
        w.thread = startThread(name: "guest") {
            do throws(WorkloadError) {
                let run = try w.setUp()
                w.published.withLock { $0.state = .running }
                ready(.success(w))
                run.loop()
                w.finishStats(run, state: w.stopFlag.load(ordering: .acquiring) ? .stopped : .done)
            } catch {
                w.published.withLock { $0.state = .failed; $0.error = "\(error)" }
                ready(.failure(error))
            }
            if w.translator != nil { handle.performSync { $0?.missResolver = nil } }
            handle.performSync { $0?.invalidationMailbox = nil }
        }
    }

    /// Stops the guest thread (and its translator) and returns the final figures.
    public func stop() -> WorkloadStats {
        stopFlag.store(true, ordering: .releasing)
        if let t = thread { pthread_join(t, nil) }
        thread = nil
        return stats
    }

    /// The latest published figures.
    public var stats: WorkloadStats {
        var s = published.withLock { $0 }
        s.translatorAnswers = translator?.answered.load(ordering: .relaxed) ?? 0
        return s
    }

    private func finishStats(_ run: GuestRun, state: WorkloadState) {
        run.publish(final: true)
        published.withLock { $0.state = state }
    }

    // MARK: Set-up

    private func setUp() throws(WorkloadError) -> GuestRun {
        let c = config
        let slot = c.slotBytes
        let ringLayoutSize = RingLayout.consecutive(num: c.ringSize, at: GuestPhysAddr(0)).span
        let ringsBytes = (ringLayoutSize + 4095) & ~4095
        let need = 2 * ringsBytes + 2 * UInt64(c.ringSize) * UInt64(slot)
        // A memory table if the device has none: one region at GPA 0, 2 MiB-rounded, at least 16 MiB.
        let size = max(16 << 20, (need + (2 << 20) - 1) & ~((2 << 20) - 1))
        let region = MemoryRegion(guestPhysAddr: GuestPhysAddr(0), memorySize: size, userspaceAddr: UserAddr(Workload.uaddrBase))
        // It checks every frame it gets back: only its own loopback (or nothing, into the sink) gives them.
        guard [.loopback, .sink].contains(handle.config.port.kind) else {
            throw .unsuitable("the built-in guest runs on a loopback or sink port; this device's port is \(handle.config.port.kind.rawValue)")
        }
        let got = handle.performSync { d -> Result<(GuestMemory, DeviceConfig), WorkloadError> in
            guard let d else { return .failure(.engine(.notFound("device gone"))) }
            if d.memTable == nil {
                do throws(EngineError) { _ = try d.setMemTable([region]) } catch { return .failure(.engine(error)) }
            }
            return .success((d.memory!, d.config))
        }
        let (mem, device) = try got.get()
        guard device.queues >= 2 else { throw .unsuitable("the device needs at least 2 queues (RX 0, TX 1)") }
        let table = mem.table
        // Lay everything in the first region large enough.
        guard let base = table.regions.first(where: { $0.memorySize >= need + 4096 }) else {
            throw .unsuitable("no memory region holds the workload's \(need) bytes of rings and buffers")
        }
        let gpa0 = (base.guestPhysAddr.raw + 4095) & ~4095
        let guestMemory = GuestPhysicalMemory(mem)
        memory = guestMemory
        let iommu = device.iotlb ? GuestIOMMU(pageSize: c.pageSize) : nil
        self.iommu = iommu
        let rxBuffers = gpa0 + 2 * ringsBytes
        let txBuffers = rxBuffers + UInt64(c.ringSize) * UInt64(slot)
        // Dynamic mappings invalidate all the time: through a mailbox the worker polls, not commands.
        let mailbox = device.iotlb && c.mapping == .dynamic ? InvalidationMailbox(capacity: 4 * c.ringSize) : nil
        if let mailbox { handle.performSync { $0?.invalidationMailbox = mailbox } }
        let run = GuestRun(workload: self, memory: guestMemory, table: table, iotlb: device.iotlb, iommu: iommu,
                           rxRing: RingLayout.consecutive(num: c.ringSize, at: GuestPhysAddr(gpa0)),
                           txRing: RingLayout.consecutive(num: c.ringSize, at: GuestPhysAddr(gpa0 + ringsBytes)),
                           rxBuffers: GuestPhysAddr(rxBuffers), txBuffers: GuestPhysAddr(txBuffers), mailbox: mailbox)
        published.withLock { $0.guestMemoryBytes = table.totalBytes }
        if device.iotlb && device.translator == .builtin, let iommu {
            let t = BuiltinTranslator(iommu: iommu, table: table)
            translator = t
            let resolver = t.resolver
            handle.performSync { $0?.missResolver = resolver }
        }
        try run.mapStatic()
        try run.setVrings()
        return run
    }

    var stopping: Bool { stopFlag.load(ordering: .relaxed) }
    func publish(_ s: WorkloadStats) {
        published.withLock { p in
            let state = p.state == .starting ? .running : p.state
            let mem = p.guestMemoryBytes
            p = s
            p.state = state
            p.guestMemoryBytes = mem
        }
    }
}
