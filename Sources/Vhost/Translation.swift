// Address translation for the datapath, one translator per address space:
// IOVA through the IOTLB, or (IOTLB off, the no-IOMMU baseline) guest-physical
// and user addresses through the memory table; then to a host pointer. A range
// spanning several mappings becomes several segments; callers loop. Failures
// are values.
import IOTLB

/// Which space a datapath address is in: a constant of each address type,
/// which the datapath tests where the spaces differ (counting IOTLB hits).
public enum AddressSpace: Sendable {
    /// Translated through the device IOTLB.
    case iova
    /// Translated through the memory table by guest-physical address.
    case guestPhys
    /// Translated through the memory table by user address.
    case user
}

/// An address of any of the three spaces, kept typed: what a fault names.
public enum AnyAddress: Equatable, Sendable, CustomStringConvertible {
    case iova(IOVA)
    case guestPhys(GuestPhysAddr)
    case user(UserAddr)

    /// The space and the address, as fault messages write them: "IOVA 0x1000",
    /// "guest-physical address 0x1000", "user address 0x1000".
    public var description: String {
        switch self {
        case .iova(let a): "IOVA \(a)"
        case .guestPhys(let a): "guest-physical address \(a)"
        case .user(let a): "user address \(a)"
        }
    }
}

/// Why an access could not be made.
public enum AccessFault: Error, Equatable, Sendable, CustomStringConvertible {
    /// No IOTLB entry holds `iova` (the first unmapped byte).
    case miss(iova: IOVA, perm: Permissions)
    /// The entry holding `iova` lacks `perm`.
    case denied(iova: IOVA, perm: Permissions)
    /// IOTLB off: a guest-physical or user address no memory region holds.
    case notInMemoryTable(AnyAddress)
    /// IOTLB on: the entry holding `iova` points at `uaddr`, which no memory
    /// region holds. Verify-on-update keeps every entry backed, so this is a bug.
    case unbacked(iova: IOVA, uaddr: UserAddr)
    /// An access of `length` bytes from `start` would pass 2^64-1 (the chain
    /// rules and `VringConfig.problem()` refuse such ranges before).
    case wraps(start: AnyAddress, length: Int)

    /// Why the queue failed, naming the address in its own space.
    public var description: String {
        switch self {
        case .miss(let iova, let perm): "IOTLB miss: no entry holds IOVA \(iova) (\(perm))"
        case .denied(let iova, let perm): "access failure: \(perm) access to iova \(iova) denied by the IOTLB entry"
        case .notInMemoryTable(let a): "\(a) is not in the memory table"
        case .unbacked(let iova, let uaddr):
            "IOVA \(iova) maps to user address \(uaddr), which is not in the memory table"
        case .wraps(let start, let length): "\(length) bytes from \(start) pass 2^64-1"
        }
    }
}

/// One contiguous piece of host memory.
public struct Segment {
    public var host: UnsafeMutableRawPointer
    public var length: Int
    /// The guest-physical address of `host` (contiguous over `length`): what
    /// the dirty log is indexed by. Unused, it costs nothing once inlined.
    public var gpa: UInt64
}

/// The last translation made, kept for the next access near it: one IOTLB
/// entry intersected with one memory region. Valid only while neither the
/// IOTLB nor the memory table has lost anything since (generations).
struct TranslationCache {
    var first: UInt64 = 1
    var last: UInt64 = 0          // first > last: empty
    // SAFETY: points into the device's guest memory; used only while
    // `generation` equals the device's translation generation, which moves
    // when an IOTLB entry leaves or the memory table (and its mapping) goes.
    var host: UnsafeMutableRawPointer? = nil  // host address of `first`
    var gpa: UInt64 = 0                       // guest-physical address of `first`
    var perm: Permissions = []
    var generation: UInt64 = .max

    mutating func clear() { first = 1; last = 0 }

    /// Whether `a` lies in this translation's range (current or not).
    @inline(__always)
    func holds(_ a: UInt64) -> Bool { a >= first && a <= last }

    /// Whether this translation answers for `a` with `access` while the
    /// device's translation generation is `generation`.
    @inline(__always)
    func answers(_ a: UInt64, _ access: Permissions, generation now: UInt64) -> Bool {
        holds(a) && generation == now && perm.contains(access)
    }
}

/// A segment or a fault: what one translation step gives.
enum SegmentResult {
    case ok(Segment)
    case fault(AccessFault)
}

/// An address space the datapath translates through, one type each: `IOVA`
/// through the device IOTLB, then the memory table; `GuestPhysAddr` and
/// `UserAddr` through the memory table alone (the no-IOMMU baseline). The
/// datapath is generic over the spaces of its rings and buffers (see
/// `DeviceSpaces`), as vm-memory layers `IommuMemory` over `GuestMemory`:
/// an address never changes space, and no per-access tag is checked.
protocol TranslatedAddress: Address {
    /// The space's name in faults and metrics.
    static var space: AddressSpace { get }
    /// The widest piece around `addr` that maps to one contiguous host range
    /// with one permission: `[lo, hi]` in this space, the host address of
    /// `lo`, its guest-physical address, the permission; or why there is none.
    /// Counts IOTLB hits and misses.
    static func piece(_ addr: Self, _ access: Permissions, on device: Device, _ vq: VirtQueue) -> PieceResult<Self>
    /// Whether the datapath logs its writes through addresses of this type
    /// (dirty logging, see `Logged`): a constant, so the unlogged datapath
    /// carries no test for it.
    static var logs: Bool { get }
}

extension TranslatedAddress {
    static var logs: Bool { false }
}

/// What `TranslatedAddress.piece` finds: `[lo, hi]` in space `A`.
enum PieceResult<A: Address> {
    case piece(lo: A, hi: A, host: UnsafeMutableRawPointer, gpa: UInt64, perm: Permissions)
    case fault(AccessFault)
}

extension TranslatedAddress {
    /// This address, tagged with its space for a fault.
    var tagged: AnyAddress {
        switch Self.space {
        case .iova: .iova(IOVA(raw))
        case .guestPhys: .guestPhys(GuestPhysAddr(raw))
        case .user: .user(UserAddr(raw))
        }
    }
}

extension IOVA: TranslatedAddress {
    static var space: AddressSpace { .iova }

    static func piece(_ addr: IOVA, _ access: Permissions, on device: Device, _ vq: VirtQueue) -> PieceResult<IOVA> {
        // The IOTLB's own look-up (as `GET …/iotlb/translate` makes it): the
        // entry, its permission and where the address lands.
        switch device.iotlb.lookup(addr, access: access) {
        case .miss:
            device.counters.misses &+= 1; vq.misses &+= 1
            return .fault(.miss(iova: addr, perm: access))
        case .denied:
            return .fault(.denied(iova: addr, perm: access))
        case .mapped(let e, let uaddr):
            device.counters.hits &+= 1; vq.hits &+= 1
            // Verify-on-update keeps every entry backed; a miss here would be a bug.
            guard let span = device.regions.find(uaddr) else { return .fault(.unbacked(iova: addr, uaddr: uaddr)) }
            // The IOVAs where this entry and this region overlap: as far back
            // from addr, and as far ahead, as both reach. addr lies in the
            // entry and uaddr in the span, so no offset is negative and lo, hi
            // stay inside the entry's range.
            let into = uaddr.uncheckedOffset(from: span.first)
            let back = min(into, addr.uncheckedOffset(from: e.range.first))
            let ahead = min(span.last.uncheckedOffset(from: uaddr), e.range.last.uncheckedOffset(from: addr))
            return .piece(lo: addr.uncheckedSub(back), hi: addr.uncheckedAdd(ahead),
                          host: span.host + Int(into &- back), gpa: span.gpa.uncheckedAdd(into &- back).raw, perm: e.perm)
        }
    }
}

extension GuestPhysAddr: TranslatedAddress {
    static var space: AddressSpace { .guestPhys }

    static func piece(_ addr: GuestPhysAddr, _ access: Permissions, on device: Device, _ vq: VirtQueue)
        -> PieceResult<GuestPhysAddr> {
        guard let span = device.regions.find(addr) else { return .fault(.notInMemoryTable(.guestPhys(addr))) }
        return .piece(lo: span.first, hi: span.last, host: span.host, gpa: span.gpa.raw, perm: .readWrite)
    }
}

extension UserAddr: TranslatedAddress {
    static var space: AddressSpace { .user }

    static func piece(_ addr: UserAddr, _ access: Permissions, on device: Device, _ vq: VirtQueue) -> PieceResult<UserAddr> {
        guard let span = device.regions.find(addr) else { return .fault(.notInMemoryTable(.user(addr))) }
        return .piece(lo: span.first, hi: span.last, host: span.host, gpa: span.gpa.raw, perm: .readWrite)
    }
}

/// The spaces a device's rings and buffers live in, chosen once per device:
/// the datapath is specialized for each pair.
protocol DeviceSpaces {
    associatedtype Ring: TranslatedAddress
    associatedtype Buffer: TranslatedAddress
}

/// IOTLB on: rings and buffers are IOVAs.
enum ThroughIOTLB: DeviceSpaces {
    typealias Ring = IOVA
    typealias Buffer = IOVA
}

/// IOTLB off: rings at the front-end's user addresses, buffers at guest-physical ones.
enum ThroughMemoryTable: DeviceSpaces {
    typealias Ring = UserAddr
    typealias Buffer = GuestPhysAddr
}

extension Device {
    /// A tag that changes whenever a cached translation may have gone stale:
    /// an IOTLB entry left, or the memory table was replaced.
    @inline(__always)
    var translationGeneration: UInt64 { iotlb.generation &+ (memoryGeneration << 40) }

    /// Host memory for up to `length` (>= 1) bytes at `addr`, needing `access`.
    @inline(__always)
    func segment<A: TranslatedAddress>(_ addr: A, _ length: Int, _ access: Permissions,
                                       _ cache: inout TranslationCache, _ vq: VirtQueue) -> SegmentResult {
        let a = addr.raw
        if cache.answers(a, access, generation: translationGeneration) {
            if A.space == .iova { counters.hits &+= 1; vq.hits &+= 1 }
            let leftMinusOne = cache.last &- a
            let n = UInt64(length &- 1) <= leftMinusOne ? length : Int(leftMinusOne &+ 1)
            return .ok(Segment(host: cache.host! + Int(a &- cache.first), length: n, gpa: cache.gpa &+ (a &- cache.first)))
        }
        return slowSegment(addr, length, access, &cache, vq)
    }

    @inline(never)
    func slowSegment<A: TranslatedAddress>(_ addr: A, _ length: Int, _ access: Permissions,
                                           _ cache: inout TranslationCache, _ vq: VirtQueue) -> SegmentResult {
        guard regions.count > 0 else {
            if A.space == .iova {
                counters.misses &+= 1; vq.misses &+= 1
                return .fault(.miss(iova: IOVA(addr.raw), perm: access))
            }
            return .fault(.notInMemoryTable(addr.tagged))
        }
        switch A.piece(addr, access, on: self, vq) {
        case .fault(let f): return .fault(f)
        case .piece(let lo, let hi, let host, let gpa, let perm):
            cache = TranslationCache(first: lo.raw, last: hi.raw, host: host, gpa: gpa, perm: perm,
                                     generation: translationGeneration)
            // addr lies in [lo, hi]: piece() found it there.
            let leftMinusOne = hi.uncheckedOffset(from: addr)
            let n = UInt64(length &- 1) <= leftMinusOne ? length : Int(leftMinusOne &+ 1)
            let into = addr.uncheckedOffset(from: lo)
            return .ok(Segment(host: host + Int(into), length: n, gpa: gpa &+ into))
        }
    }

    /// Translates `[addr, addr+length)` piece by piece with `access`, calling
    /// `body(segment, offset)` for each; the first fault stops the walk.
    @inline(__always)
    func walkSegments<A: TranslatedAddress>(_ addr: A, _ length: Int, _ access: Permissions,
                                            _ cache: inout TranslationCache, _ vq: VirtQueue,
                                            _ body: (Segment, Int) -> Void) -> AccessFault? {
        var done = 0
        while done < length {
            guard let a = addr.checkedAdd(UInt64(done)) else { return .wraps(start: addr.tagged, length: length) }
            switch segment(a, length - done, access, &cache, vq) {
            case .fault(let f): return f
            case .ok(let s):
                body(s, done)
                done += s.length
            }
        }
        return nil
    }

    /// Copies `length` bytes of guest memory at `addr` to `dst`.
    func copyFromGuest<A: TranslatedAddress>(_ addr: A, _ dst: UnsafeMutableRawPointer, _ length: Int,
                                             _ cache: inout TranslationCache, _ vq: VirtQueue) -> AccessFault? {
        walkSegments(addr, length, .read, &cache, vq) { s, done in
            // SAFETY: the segment is s.length mapped bytes of one region; done+s.length <= length, dst's size.
            (dst + done).copyMemory(from: s.host, byteCount: s.length)
        }
    }

    /// Reads the 16-byte descriptor at `addr` through the accessors (an indirect
    /// table's entry, or a ring slot without one contiguous host mapping) and
    /// decodes it with `decode` (split or packed layout).
    @inline(__always)
    func readDescriptor<A: TranslatedAddress, D>(_ addr: A, _ cache: inout TranslationCache, _ vq: VirtQueue,
                                                 _ decode: (UnsafeRawPointer) -> D) -> Result<D, AccessFault> {
        withUnsafeTemporaryAllocation(byteCount: 16, alignment: 8) { buf -> Result<D, AccessFault> in
            if let fault = copyFromGuest(addr, buf.baseAddress!, 16, &cache, vq) { return .failure(fault) }
            // SAFETY: buf is the 16 bytes just copied in full (no fault).
            return .success(decode(UnsafeRawPointer(buf.baseAddress!)))
        }
    }

    /// Copies `length` bytes from `src` into guest memory at `addr`.
    func copyToGuest<A: TranslatedAddress>(_ addr: A, _ src: UnsafeRawPointer, _ length: Int,
                                           _ cache: inout TranslationCache, _ vq: VirtQueue) -> AccessFault? {
        walkSegments(addr, length, .write, &cache, vq) { s, done in
            // SAFETY: the segment is s.length mapped writable bytes; done+s.length <= length, src's size.
            s.host.copyMemory(from: src + done, byteCount: s.length)
        }
    }

    /// Checks that all of `[addr, addr+length)` translates with `access`;
    /// returns the host pointer when it is one contiguous piece, and the
    /// guest-physical address of `addr` when the range is contiguous there.
    func checkRange<A: TranslatedAddress>(_ addr: A, _ length: Int, _ access: Permissions, _ vq: VirtQueue)
        -> (contiguous: UnsafeMutableRawPointer?, gpa: UInt64?, fault: AccessFault?) {
        var cache = TranslationCache()
        var first: UnsafeMutableRawPointer?
        var gpa: UInt64?, nextGPA: UInt64 = 0
        let fault = walkSegments(addr, length, access, &cache, vq) { s, done in
            if done == 0 {
                gpa = s.gpa
                if s.length == length { first = s.host }
            } else if s.gpa != nextGPA {
                gpa = nil
            }
            nextGPA = s.gpa &+ UInt64(s.length)
        }
        return fault.map { (nil, nil, $0) } ?? (first, gpa, nil)
    }
}
