import Glibc
import Guest
import IOTLB
import Testing
@testable import Vhost

/// A loopback device with the IOTLB on, driven synchronously (no worker), whose
/// memory table puts guest-physical and user addresses crosswise: region 0 is
/// GPA [0, 8 MiB) at the user addresses of [8, 16) MiB, region 1 is GPA
/// [1 GiB, 1 GiB + 8 MiB) at the user addresses of [0, 8) MiB. IOVAs are
/// mapped page by page to any GPA (`map`), so an IOVA, its user address and
/// its GPA all differ, and a GPA taken from the user address (or the IOVA)
/// sets the wrong bit.
final class LogRig {
    static let uaddrBase: UInt64 = 0x7f00_0000_0000
    static let regionSize: UInt64 = 8 << 20
    static let highGPA: UInt64 = 1 << 30
    /// Where IOVAs start (nowhere near a GPA).
    static let iovaBase: UInt64 = 0x55_0000_0000

    let device: Device
    let memory: GuestPhysicalMemory
    let num = 16
    private var nextIOVA = LogRig.iovaBase

    init(logBytes: Int? = nil, net: Bool = true) throws {
        device = Device(config: DeviceConfig(id: "log", queues: 2, iotlb: true, port: .loopback, translator: .external),
                        limits: EngineLimits(), missLog: MissLog())
        _ = try device.setMemTable([
            MemoryRegion(guestPhysAddr: GuestPhysAddr(0), memorySize: LogRig.regionSize,
                         userspaceAddr: UserAddr(LogRig.uaddrBase + LogRig.regionSize)),
            MemoryRegion(guestPhysAddr: GuestPhysAddr(LogRig.highGPA), memorySize: LogRig.regionSize,
                         userspaceAddr: UserAddr(LogRig.uaddrBase)),
        ])
        memory = GuestPhysicalMemory(device.memory!)
        if net { device.setNet(NetSettings(headerBytes: 12, mergeableRX: true)) }
        log = try DirtyLog(bytes: logBytes ?? DirtyLog.bytes(covering: LogRig.highGPA + LogRig.regionSize - 1))
    }

    let log: DirtyLog

    /// The user address backing guest-physical `gpa`.
    static func uaddr(_ gpa: UInt64) -> UInt64 {
        gpa >= highGPA ? uaddrBase + (gpa - highGPA) : uaddrBase + regionSize + gpa
    }

    /// Maps a fresh IOVA range onto the guest-physical pages `gpas` (each 4 KiB,
    /// in order), so the range is contiguous in IOVA and not necessarily in GPA.
    func map(_ gpas: [UInt64], perm: Permissions = .readWrite) throws -> UInt64 {
        let first = nextIOVA
        for g in gpas {
            _ = try device.updateIOTLB([IOTLBEntry(range: AddressRange(start: IOVA(nextIOVA), size: 4096)!,
                                                   uaddr: UserAddr(LogRig.uaddr(g)), perm: perm)])
            nextIOVA += 4096
        }
        nextIOVA += 1 << 20  // a gap before the next range
        return first
    }

    /// Maps `[gpa, gpa+bytes)` (page aligned) contiguously.
    func map(gpa: UInt64, bytes: UInt64, perm: Permissions = .readWrite) throws -> UInt64 {
        try map(stride(from: gpa, to: gpa + bytes, by: 4096).map { $0 }, perm: perm)
    }

    /// Logging on with this rig's log.
    func startLogging() {
        device.setDirtyLog(log)
        device.setLogging(true)
    }

    func run(rounds: Int = 4) { for _ in 0..<rounds where !device.poll() { break } }

    /// The dirty pages, as guest-physical page numbers.
    var dirty: Set<UInt64> { Set(log.dirtyPages()) }

    static func page(_ gpa: UInt64) -> UInt64 { gpa >> 12 }

    func write(_ gpa: UInt64, _ bytes: [UInt8]) {
        memory.at(GuestPhysAddr(gpa), bytes.count).copyMemory(from: bytes, byteCount: bytes.count)
    }

    func read(_ gpa: UInt64, _ count: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: memory.at(GuestPhysAddr(gpa), count), count: count))
    }

    func vring(_ n: Int) -> VringSnapshot { try! device.vring(n) }

    static func frame(_ n: Int, seed: UInt8) -> [UInt8] {
        [UInt8](repeating: 0, count: 12) + (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ Int(seed)) }
    }
}

/// A split ring laid at `gpa` (desc, avail, then used on the next page), its
/// IOVAs mapped page by page through `rig` (`usedPages`: where the used
/// ring's pages go, when not after the rest).
final class LoggedSplitRing {
    let driver: SplitRingDriver
    let config: VringConfig

    init(_ rig: LogRig, at gpa: UInt64, usedAt usedGPA: UInt64? = nil, usedPages: [UInt64]? = nil, logUsed: Bool = true) throws {
        let num = rig.num
        let used = usedGPA ?? gpa + 0x1000
        let layout = RingLayout(num: num, descGPA: GuestPhysAddr(gpa), availGPA: GuestPhysAddr(gpa + 0x800),
                                usedGPA: GuestPhysAddr(used))
        driver = SplitRingDriver(memory: rig.memory, layout: layout)
        let ringIOVA = try rig.map(gpa: gpa, bytes: 0x1000)
        let pages = usedPages ?? [used & ~4095]
        let usedIOVA = try rig.map(pages) + (used & 4095)
        config = VringConfig(num: num, descAddr: ringIOVA, availAddr: ringIOVA + 0x800, usedAddr: usedIOVA,
                             logAddr: logUsed ? usedIOVA : nil)
    }
}
