// A host TAP interface, as vhost-net attaches to one (Firecracker's tap.rs is
// the model): queues opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (and
// IFF_MULTI_QUEUE for more than one), the virtio-net header size and the
// offloads set from what the guest negotiated. No vhost knowledge here: the
// datapath reads and writes frames through `TapQueue`.
import CTap
import Glibc
import Platform

/// Why a TAP interface could not be opened or set up.
public struct TapError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public let errno: Int32
    init(_ what: String, errno: Int32) {
        self.errno = errno
        self.description = "\(what): \(String(cString: strerror(errno)))"
    }
}

/// One open queue of a TAP interface: a non-blocking descriptor.
public struct TapQueue: Sendable {
    public let fd: Int32
    public init(fd: Int32) { self.fd = fd }
}

/// A TAP interface the daemon holds queues of.
public final class TapInterface: @unchecked Sendable {
    /// The interface's name as the kernel has it.
    public let name: String
    /// Whether the daemon created it (it then goes away with the last queue).
    public let created: Bool
    /// One descriptor per queue pair of the device.
    public let queues: [TapQueue]
    // SAFETY (@unchecked): immutable after init; the descriptors are closed once, in deinit.

    /// Longest interface name (IFNAMSIZ - 1).
    public static let maxNameLength = 15

    /// Opens `queues` queues of `name`: attaches to an interface the operator
    /// made (`ip tuntap add NAME mode tap multi_queue vnet_hdr user U`), or,
    /// with `create`, creates it when it does not exist and the process may
    /// (CAP_NET_ADMIN): it is then left down, as the kernel makes it, for the
    /// operator to address or bridge and set up, and goes with the last queue.
    /// Nothing stays open when it throws.
    public init(name: String, queues: Int, create: Bool = false) throws(TapError) {
        precondition(queues >= 1)
        var fds: [Int32] = []
        var made: Int32 = 0
        var actual = [CChar](repeating: 0, count: 16)
        for i in 0..<queues {
            var c: Int32 = 0
            let mayCreate: Int32 = create && i == 0 ? 1 : 0
            var fd = CTap_open(name, queues > 1 ? 1 : 0, mayCreate, &c, &actual)
            // One queue of an interface made multi_queue (`ip tuntap … multi_queue`) needs the flag too.
            if fd < 0 && errno == EINVAL && queues == 1 { fd = CTap_open(name, 1, mayCreate, &c, &actual) }
            if fd < 0 {
                let e = errno
                for f in fds { close(f) }
                throw TapError(Self.explain(name, e, queue: i, of: queues), errno: e)
            }
            if i == 0 { made = c }
            fds.append(fd)
        }
        self.name = String(decoding: actual.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        self.created = made != 0
        self.queues = fds.map { TapQueue(fd: $0) }
        // One the daemon made goes with it (not persistent).
        if created { _ = CTap_set_persist(fds[0], 0) }
        // The 12-byte header (with num_buffers) until a front-end says otherwise: the
        // kernel's default is the 10-byte legacy one, which a device set up over HTTP
        // (frames without a header, 12 zero bytes added) must not get.
        try setHeaderSize(VirtioNetHeader.size)
    }

    /// Queues handed over as open descriptors: a TAP a manager opened (as
    /// libvirt hands QEMU `tap,fds=`), or anything that carries one frame per
    /// read and per write (a SOCK_SEQPACKET pair, in tests). Made non-blocking;
    /// closed with the interface.
    public init(adopting fds: [Int32], name: String) {
        precondition(!fds.isEmpty)
        for fd in fds { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
        self.name = name
        self.created = false
        self.queues = fds.map { TapQueue(fd: $0) }
    }

    deinit {
        for q in queues { close(q.fd) }
    }

    private static func explain(_ name: String, _ e: Int32, queue: Int, of count: Int) -> String {
        let what = "cannot open TAP \(name)" + (count > 1 ? " (queue \(queue + 1) of \(count))" : "")
        switch e {
        case ENODEV:
            return what + ": no such interface (make it with `ip tuntap add \(name) mode tap multi_queue vnet_hdr user <daemon user>`,"
                + " or start iotlbd with --tap-create to let it make TAPs)"
        case EPERM:
            return what + " (it does not exist and creating it needs CAP_NET_ADMIN, or it belongs to another user;"
                + " make it with `ip tuntap add \(name) mode tap multi_queue vnet_hdr user <daemon user>`)"
        case EINVAL:
            return what + " (a single-queue TAP cannot take several queues, or the name is not valid;"
                + " make it with `ip tuntap add \(name) mode tap multi_queue vnet_hdr`)"
        case EBUSY:
            return what + " (another process holds the interface with other flags; it needs tap, no_pi, vnet_hdr"
                + (count > 1 ? ", multi_queue)" : ")")
        default:
            return what
        }
    }

    /// The virtio-net header size in front of every frame both ways (10 or 12).
    public func setHeaderSize(_ bytes: Int) throws(TapError) {
        for q in queues where CTap_set_vnet_hdr_size(q.fd, Int32(bytes)) < 0 {
            throw TapError("TUNSETVNETHDRSZ \(bytes) on \(name)", errno: errno)
        }
    }

    /// What the kernel may hand the guest (TUNSETOFFLOAD): checksum and TSO
    /// bits from the guest's GUEST_* features. When the kernel refuses a
    /// combination, it falls back to fewer (as QEMU's tap_fd_set_offload):
    /// without ECN, then checksum alone, then none. Returns what was set.
    @discardableResult
    public func setOffloads(_ wanted: TapOffloads) -> TapOffloads {
        var tries = [wanted]
        if wanted.contains(.tsoECN) { tries.append(wanted.subtracting(.tsoECN)) }
        if wanted.contains(.checksum) { tries.append(.checksum) }
        tries.append([])
        for t in tries where queues.allSatisfy({ CTap_set_offload($0.fd, UInt32(t.rawValue)) == 0 }) { return t }
        return []
    }

    /// The interface's state: nil when it is gone (deleted under us).
    public func linkState() -> (up: Bool, running: Bool)? {
        let f = CTap_get_flags(name)
        if f < 0 { return nil }
        return (f & CTap_flag_up() != 0, f & CTap_flag_running() != 0)
    }

    /// The interface's MTU, nil when it cannot be read.
    public var mtu: Int? {
        let m = CTap_get_mtu(name)
        return m < 0 ? nil : Int(m)
    }

    /// Sets the interface's MTU (needs CAP_NET_ADMIN; an attached TAP usually refuses).
    public func setMTU(_ mtu: Int) throws(TapError) {
        if CTap_set_mtu(name, Int32(mtu)) < 0 { throw TapError("SIOCSIFMTU \(mtu) on \(name)", errno: errno) }
    }
}

/// The offloads a TAP may hand the guest (TUN_F_*).
public struct TapOffloads: OptionSet, Sendable, Hashable {
    public let rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }
    public static let checksum = TapOffloads(rawValue: Int(CTAP_F_CSUM))
    public static let tso4 = TapOffloads(rawValue: Int(CTAP_F_TSO4))
    public static let tso6 = TapOffloads(rawValue: Int(CTAP_F_TSO6))
    public static let tsoECN = TapOffloads(rawValue: Int(CTAP_F_TSO_ECN))
}

/// What one non-blocking frame transfer did.
public enum FrameIO: Equatable, Sendable {
    /// The frame moved: its length in bytes (header included).
    case done(Int)
    /// The queue is full (write) or empty (read): try again later.
    case wouldBlock
    /// The interface is down (EIO): the frame cannot move.
    case down
    /// The interface is gone (deleted): nothing will move again on this queue.
    case gone
    /// The kernel refused this frame (EINVAL: a header it does not accept, a bad length).
    case refused
    /// Another error, its errno.
    case failed(Int32)

    static func from(_ n: Int, _ e: Int32) -> FrameIO {
        if n >= 0 { return .done(n) }
        switch e {
        case EAGAIN, ENOBUFS: return .wouldBlock
        case EIO: return .down
        case EBADFD, ENXIO, ENODEV, EPIPE: return .gone
        case EINVAL, EMSGSIZE: return .refused
        default: return .failed(e)
        }
    }
}

extension TapQueue {
    /// Writes one frame gathered from `count` pieces (header first). One system call, no allocation.
    @inline(__always)
    public func write(_ iov: UnsafePointer<iovec>, count: Int) -> FrameIO {
        while true {
            let n = writev(fd, iov, Int32(count))
            if n < 0 && errno == EINTR { continue }
            return FrameIO.from(n, errno)
        }
    }

    /// Reads one frame (header first) into `buffer`; a frame longer than the
    /// buffer is cut to it (the caller sees a full buffer and drops it).
    @inline(__always)
    public func read(into buffer: UnsafeMutableRawPointer, capacity: Int) -> FrameIO {
        while true {
            let n = Glibc.read(fd, buffer, capacity)
            if n < 0 && errno == EINTR { continue }
            return FrameIO.from(n, errno)
        }
    }
}
