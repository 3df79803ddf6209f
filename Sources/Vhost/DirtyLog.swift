// The dirty log of live migration (VHOST_F_LOG_ALL): a bitmap the front-end
// shares, one bit per 4 KiB guest-physical page, bit `p % 8` of byte `p / 8`
// for page `p` (the same bits as QEMU's array of u64 chunks, little endian).
// The device sets the bit of every page it writes, after the write, with an
// atomic OR (the front-end clears bits while it copies pages); the front-end
// copies the pages whose bits it finds set. A bit past the log's size is never
// set: a write there fails its queue instead (CVE-2019-14835 was a kernel log
// write past its array, driven by a guest's chain).
import CRingAtomics
import Glibc
import Platform

/// A mapped dirty log. Unmapped when the last holder lets go: the device
/// holds it while logging, so no datapath write reaches an unmapped log.
public final class DirtyLog: @unchecked Sendable {
    /// Bytes of guest-physical memory one bit covers (VHOST_LOG_PAGE).
    public static let pageSize: UInt64 = 4096
    /// The largest log accepted: 1 GiB of bits covers 32 TiB of guest memory.
    public static let maxBytes: UInt64 = 1 << 30

    /// The log's first byte. SAFETY: mapped in init, unmapped in deinit only.
    let base: UnsafeMutableRawPointer
    /// The log's size in bytes (8 pages a byte).
    public let size: UInt64
    private let mapBase: UnsafeMutableRawPointer
    private let mapLength: Int

    /// Pages the log covers.
    public var pages: UInt64 { size * 8 }

    /// Maps `size` bytes at `offset` of the front-end's file `fd`
    /// (VHOST_USER_SET_LOG_BASE with LOG_SHMFD). The mapping starts at offset 0,
    /// as hugetlbfs wants; a log that ends past the file is refused (a touch
    /// there would raise SIGBUS in the datapath). The descriptor stays the caller's.
    public init(fd: Int32, size: UInt64, offset: UInt64) throws(SystemCallError) {
        let (end, wrapped) = size.addingReportingOverflow(offset)
        guard size > 0, size <= DirtyLog.maxBytes, !wrapped, end <= UInt64(Int.max) else {
            throw SystemCallError(call: "mmap (log of \(size) bytes at offset \(offset))", errno: EINVAL)
        }
        var st = stat()
        try syscall("fstat") { fstat(fd, &st) }
        if st.st_mode & S_IFMT == S_IFREG && UInt64(st.st_size) < end {
            throw SystemCallError(call: "mmap (the log ends past the end of its file)", errno: EINVAL)
        }
        let p = try mapShared(Int(end), fd: fd, call: "mmap (dirty log)")
        mapBase = p
        mapLength = Int(end)
        base = p + Int(offset)
        self.size = size
    }

    /// A log of `bytes` in anonymous memory (tests, the benchmark, a device the
    /// HTTP API drives): zeroed.
    public init(bytes: Int) throws(SystemCallError) {
        guard bytes > 0, UInt64(bytes) <= DirtyLog.maxBytes else {
            throw SystemCallError(call: "mmap (log of \(bytes) bytes)", errno: EINVAL)
        }
        let p = try mapShared(bytes, flags: MAP_ANONYMOUS, call: "mmap (dirty log)")
        mapBase = p
        mapLength = bytes
        base = p
        size = UInt64(bytes)
    }

    deinit { munmap(mapBase, mapLength) }

    /// The bytes a log needs to cover guest-physical memory up to `lastGPA`.
    public static func bytes(covering lastGPA: UInt64) -> Int { Int(lastGPA / pageSize / 8) + 1 }

    /// Whether page `page`'s bit is set.
    public func isDirty(page: UInt64) -> Bool {
        page < pages && base.load(fromByteOffset: Int(page >> 3), as: UInt8.self) & (1 << (page & 7)) != 0
    }

    /// The pages whose bits are set, in order.
    public func dirtyPages() -> [UInt64] {
        var out: [UInt64] = []
        for i in 0..<Int(size) {
            let b = base.load(fromByteOffset: i, as: UInt8.self)
            if b == 0 { continue }
            for k in 0..<8 where b & (1 << k) != 0 { out.append(UInt64(i) * 8 + UInt64(k)) }
        }
        return out
    }

    /// Clears every bit (what a front-end does as it copies).
    public func clear() { base.initializeMemory(as: UInt8.self, repeating: 0, count: Int(size)) }
}

/// What a device's dirty logging shows readers.
public struct DirtyLogSnapshot: Sendable, Equatable {
    /// VHOST_F_LOG_ALL is on (the front-end migrates).
    public var enabled = false
    /// Logging is on but no log is mapped yet: the queues wait.
    public var waiting = false
    /// The mapped log's size in bytes (0: none).
    public var size: UInt64 = 0
    /// Page bits this device set that were clear: pages it made dirty.
    public var pagesLogged: UInt64 = 0
    /// Writes refused because their page lies past the log (each failed its queue).
    public var faults: UInt64 = 0
    /// The last such refusal.
    public var lastFault: String?
    public init() {}
}

/// The device's logging state, behind a pointer as `Device.Mutable`.
/// SAFETY: touched by the device's worker only.
struct DirtyLogState {
    /// VHOST_F_LOG_ALL negotiated.
    var enabled = false
    /// The mapped log's first byte and the pages it covers (nil, 0: none).
    var base: UnsafeMutableRawPointer?
    var pages: UInt64 = 0
    /// Test-only (IOTLBD_TEST_UNLOGGED_RX_BUFFERS): RX buffer writes go unlogged,
    /// to show that the migration test catches a missing log write.
    var skipBuffers = false
    var pagesLogged: UInt64 = 0
    var faults: UInt64 = 0
    var lastFault: String?
    /// The log object itself, kept while the pointers above point into it.
    var log: DirtyLog?
    /// Bits set since the last flush, by 64-page word of the log: writes of a
    /// batch touch few pages again and again, so a flush before the used index
    /// is published costs an atomic OR per word, not one per write.
    /// SAFETY: allocated with the device (`cacheSize` entries), freed with it.
    var cache: UnsafeMutablePointer<(word: UInt64, bits: UInt64)>
    var cached = 0
    static let cacheSize = 8
}
