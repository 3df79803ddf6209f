// Address translation for the datapath: IOVA through the IOTLB, or (IOTLB
// off, the no-IOMMU baseline) guest-physical and user addresses through the
// memory table; then to a host pointer. A range spanning several mappings
// becomes several segments; callers loop. Failures are values.
import IOTLB

/// Which space a datapath address is in.
public enum AddressSpace: Sendable {
    /// Translated through the device IOTLB.
    case iova
    /// Translated through the memory table by guest-physical address.
    case guestPhys
    /// Translated through the memory table by user address.
    case user
}

/// Why an access could not be made.
public enum AccessFault: Equatable, Sendable {
    /// No IOTLB entry holds `iova` (the first unmapped byte).
    case miss(iova: IOVA, perm: Permissions)
    /// The entry holding `iova` lacks `perm`.
    case denied(iova: IOVA, perm: Permissions)
    /// Without an IOTLB: the address is not in the memory table.
    case badAddress(UInt64, AddressSpace)
}

/// One contiguous piece of host memory.
public struct Segment {
    public var host: UnsafeMutableRawPointer
    public var length: Int
}

/// The last translation made, kept for the next access near it: one IOTLB
/// entry intersected with one memory region. Valid only while neither the
/// IOTLB nor the memory table has lost anything since (generations).
struct TranslationCache {
    var first: UInt64 = 1
    var last: UInt64 = 0          // first > last: empty
    var host: UnsafeMutableRawPointer? = nil  // host address of `first`
    var perm: Permissions = []
    var generation: UInt64 = .max

    mutating func clear() { first = 1; last = 0 }
}

/// A segment or a fault: what one translation step gives.
enum SegmentResult {
    case ok(Segment)
    case fault(AccessFault)
}

extension Device {
    /// A tag that changes whenever a cached translation may have gone stale:
    /// an IOTLB entry left, or the memory table was replaced.
    @inline(__always)
    var translationGeneration: UInt64 { iotlb.generation &+ (memoryGeneration << 40) }

    /// Host memory for up to `length` (>= 1) bytes at `addr`, needing `access`.
    @inline(__always)
    func segment(_ addr: UInt64, _ length: Int, _ access: Permissions, _ space: AddressSpace,
                 _ cache: inout TranslationCache, _ vq: VirtQueue) -> SegmentResult {
        if addr >= cache.first && addr <= cache.last && cache.generation == translationGeneration
            && cache.perm.contains(access) {
            if space == .iova { counters.hits &+= 1; vq.hits &+= 1 }
            let leftMinusOne = cache.last &- addr
            let n = UInt64(length &- 1) <= leftMinusOne ? length : Int(leftMinusOne &+ 1)
            return .ok(Segment(host: cache.host! + Int(addr &- cache.first), length: n))
        }
        return slowSegment(addr, length, access, space, &cache, vq)
    }

    @inline(never)
    func slowSegment(_ addr: UInt64, _ length: Int, _ access: Permissions, _ space: AddressSpace,
                     _ cache: inout TranslationCache, _ vq: VirtQueue) -> SegmentResult {
        guard regions.count > 0 else {
            if space == .iova { counters.misses &+= 1; vq.misses &+= 1; return .fault(.miss(iova: IOVA(addr), perm: access)) }
            return .fault(.badAddress(addr, space))
        }
        var lo: UInt64, hi: UInt64, host: UnsafeMutableRawPointer, perm: Permissions
        switch space {
        case .iova:
            guard let e = iotlb.entry(containing: IOVA(addr)) else {
                counters.misses &+= 1; vq.misses &+= 1
                return .fault(.miss(iova: IOVA(addr), perm: access))
            }
            guard e.perm.contains(access) else { return .fault(.denied(iova: IOVA(addr), perm: access)) }
            counters.hits &+= 1; vq.hits &+= 1
            let uaddr = e.uaddr.raw &+ (addr &- e.range.first.raw)
            // Verify-on-update keeps every entry backed; a miss here would be a bug, reported as a bad address.
            guard let span = regions.find(uaddr, user: true) else { return .fault(.badAddress(addr, space)) }
            // The IOVAs where this entry and this region overlap.
            lo = addr &- min(uaddr &- span.first, addr &- e.range.first.raw)
            hi = addr &+ min(span.last &- uaddr, e.range.last.raw &- addr)
            host = span.host + Int(uaddr &- span.first) - Int(addr &- lo)
            perm = e.perm
        case .guestPhys, .user:
            guard let span = regions.find(addr, user: space == .user) else { return .fault(.badAddress(addr, space)) }
            lo = span.first
            hi = span.last
            host = span.host
            perm = .readWrite
        }
        cache = TranslationCache(first: lo, last: hi, host: host, perm: perm, generation: translationGeneration)
        let leftMinusOne = hi &- addr
        let n = UInt64(length &- 1) <= leftMinusOne ? length : Int(leftMinusOne &+ 1)
        return .ok(Segment(host: host + Int(addr &- lo), length: n))
    }

    /// Translates `[addr, addr+length)` piece by piece with `access`, calling
    /// `body(segment, offset)` for each; the first fault stops the walk.
    @inline(__always)
    func walkSegments(_ addr: UInt64, _ length: Int, _ access: Permissions, _ space: AddressSpace,
                      _ cache: inout TranslationCache, _ vq: VirtQueue,
                      _ body: (Segment, Int) -> Void) -> AccessFault? {
        var done = 0
        while done < length {
            let (a, o) = addr.addingReportingOverflow(UInt64(done))
            if o { return .badAddress(addr, space) }
            switch segment(a, length - done, access, space, &cache, vq) {
            case .fault(let f): return f
            case .ok(let s):
                body(s, done)
                done += s.length
            }
        }
        return nil
    }

    /// Copies `length` bytes of guest memory at `addr` to `dst`.
    func copyFromGuest(_ addr: UInt64, _ dst: UnsafeMutableRawPointer, _ length: Int, _ space: AddressSpace,
                       _ cache: inout TranslationCache, _ vq: VirtQueue) -> AccessFault? {
        walkSegments(addr, length, .read, space, &cache, vq) { s, done in
            (dst + done).copyMemory(from: s.host, byteCount: s.length)
        }
    }

    /// Copies `length` bytes from `src` into guest memory at `addr`.
    func copyToGuest(_ addr: UInt64, _ src: UnsafeRawPointer, _ length: Int, _ space: AddressSpace,
                     _ cache: inout TranslationCache, _ vq: VirtQueue) -> AccessFault? {
        walkSegments(addr, length, .write, space, &cache, vq) { s, done in
            s.host.copyMemory(from: src + done, byteCount: s.length)
        }
    }

    /// Checks that all of `[addr, addr+length)` translates with `access`;
    /// returns the host pointer when it is one contiguous piece.
    func checkRange(_ addr: UInt64, _ length: Int, _ access: Permissions, _ space: AddressSpace,
                    _ vq: VirtQueue) -> (contiguous: UnsafeMutableRawPointer?, fault: AccessFault?) {
        var cache = TranslationCache()
        var first: UnsafeMutableRawPointer?
        let fault = walkSegments(addr, length, access, space, &cache, vq) { s, done in
            if done == 0 && s.length == length { first = s.host }
        }
        return fault.map { (nil, $0) } ?? (first, nil)
    }
}
