import Glibc
import Guest
import IOTLB
import Testing
import Platform
@testable import Vhost

/// A hand-laid guest: one device with RX (vq 0) and TX (vq 1) rings written
/// straight into guest memory, as Firecracker's queue tests do.
final class FakeGuest: @unchecked Sendable {
    static let uaddrBase: UInt64 = 0x7f00_0000_0000
    /// IOVAs are guest-physical + this, so an IOVA used as a GPA (or back) misses.
    static let iovaOffset: UInt64 = 0x40_0000_0000
    static let memSize: UInt64 = 16 << 20

    let engine: Engine
    let handle: DeviceHandle
    let memory: GuestPhysicalMemory
    let iotlb: Bool
    let rx: SplitRingDriver
    let tx: SplitRingDriver
    let num = 16

    init(iotlb: Bool = true, port: PortConfig = .loopback, maxEntries: Int = 2048) throws {
        self.iotlb = iotlb
        engine = Engine(datapathThreads: 1)
        handle = try engine.createDevice(DeviceConfig(id: "t", iotlb: iotlb, iotlbMaxEntries: maxEntries,
                                                       port: port, translator: .external))
        let region = MemoryRegion(guestPhysAddr: GuestPhysAddr(0), memorySize: FakeGuest.memSize,
                                  userspaceAddr: UserAddr(FakeGuest.uaddrBase))
        let mem = handle.performSync { d -> Result<GuestMemory, EngineError> in
            do throws(EngineError) { _ = try d!.setMemTable([region]); return .success(d!.memory!) } catch { return .failure(error) }
        }
        memory = GuestPhysicalMemory(try mem.get())
        rx = SplitRingDriver(memory: memory, layout: .consecutive(num: num, at: GuestPhysAddr(0x10000)))
        tx = SplitRingDriver(memory: memory, layout: .consecutive(num: num, at: GuestPhysAddr(0x20000)))
    }

    deinit { engine.shutdown() }

    /// What a descriptor names for guest-physical `gpa`.
    func dma(_ gpa: UInt64) -> UInt64 { iotlb ? gpa + FakeGuest.iovaOffset : gpa }
    /// What a vring address names for guest-physical `gpa`.
    func ringAddr(_ gpa: GuestPhysAddr) -> UInt64 { iotlb ? gpa.raw + FakeGuest.iovaOffset : gpa.raw + FakeGuest.uaddrBase }

    /// Maps guest-physical [gpa, gpa+size) at its IOVA with `perm`.
    @discardableResult
    func map(_ gpa: UInt64, _ size: UInt64, _ perm: Permissions = .readWrite) throws -> UpdateReport {
        let e = IOTLBEntry(range: AddressRange(start: IOVA(gpa + FakeGuest.iovaOffset), size: size)!,
                           uaddr: UserAddr(FakeGuest.uaddrBase + gpa), perm: perm)
        return try handle.performSync { d -> Result<UpdateReport, EngineError> in
            do throws(EngineError) { return .success(try d!.updateIOTLB([e])) } catch { return .failure(error) }
        }.get()
    }

    func unmap(_ gpa: UInt64, _ size: UInt64) throws {
        let r = AddressRange(start: IOVA(gpa + FakeGuest.iovaOffset), size: size)!
        _ = try handle.performSync { d -> Result<Int, EngineError> in
            do throws(EngineError) { return .success(try d!.invalidateIOTLB([r])) } catch { return .failure(error) }
        }.get()
    }

    /// Sets vring `n` to the layout of `driver`.
    @discardableResult
    func setVring(_ n: Int, _ driver: SplitRingDriver, eventIdx: Bool = false) throws -> VringSnapshot {
        let l = driver.layout
        let c = VringConfig(num: l.num, descAddr: ringAddr(l.descGPA), availAddr: ringAddr(l.availGPA),
                            usedAddr: ringAddr(l.usedGPA), eventIdx: eventIdx)
        return try handle.performSync { d -> Result<VringSnapshot, EngineError> in
            do throws(EngineError) { return .success(try d!.setVring(n, c)) } catch { return .failure(error) }
        }.get()
    }

    func vring(_ n: Int) -> VringSnapshot {
        handle.performSync { d in try! d!.vring(n) }
    }

    func stats() -> IOTLBStats { handle.performSync { $0!.stats() } }

    /// Waits (up to 2 s) for the device to return an element on `driver`.
    func waitUsed(_ driver: SplitRingDriver, timeout: Double = 2) -> UsedElement? {
        let deadline = monotonicNanos() + UInt64(timeout * 1e9)
        while monotonicNanos() < deadline {
            if let u = driver.takeUsed() { return u }
            usleep(200)
        }
        return nil
    }

    /// Waits until `condition` holds on the device (checked on its worker).
    func waitFor(_ what: String, timeout: Double = 2, _ condition: @escaping @Sendable (Device) -> Bool) -> Bool {
        let deadline = monotonicNanos() + UInt64(timeout * 1e9)
        while monotonicNanos() < deadline {
            if handle.performSync({ condition($0!) }) { return true }
            usleep(200)
        }
        Issue.record("timed out waiting for \(what)")
        return false
    }

    /// Fills guest memory at `gpa` with `bytes`.
    func write(_ gpa: UInt64, _ bytes: [UInt8]) {
        memory.at(GuestPhysAddr(gpa), bytes.count).copyMemory(from: bytes, byteCount: bytes.count)
    }

    func read(_ gpa: UInt64, _ count: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: memory.at(GuestPhysAddr(gpa), count), count: count))
    }

    /// A payload whose bytes depend on `seed` and position.
    static func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) }
    }
}
