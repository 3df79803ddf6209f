// A burst of frames for a TAP, written with one system call (io_uring) where
// the kernel and the sandbox allow it, else one writev each. Each frame's
// pieces point into guest memory; every write has completed when `run`
// returns, so no translation is used after the datapath moves on.
import CTap
import Glibc

/// Frames gathered for one TAP queue and written together.
public final class TapBurst {
    /// Frames per burst.
    public static let capacity = 32
    /// Pieces one frame of a burst may have (a frame with more goes alone).
    public static let piecesPerFrame = 64

    // SAFETY: allocated once here, freed in deinit; used by one thread (the
    // datapath worker that owns the device).
    private let ring: OpaquePointer?
    private let iovs: UnsafeMutablePointer<iovec>
    private let results: UnsafeMutablePointer<Int32>
    /// Set once a write could not be made without waiting (RWF_NOWAIT unsupported): frames go one by one.
    private let refusedNoWait: UnsafeMutablePointer<Bool>

    /// Why io_uring is not used (nil when it is): the datapath writes frame by frame then.
    public let fallback: String?

    public init() {
        iovs = .allocate(capacity: Self.capacity * Self.piecesPerFrame)
        results = .allocate(capacity: Self.capacity)
        results.initialize(repeating: 0, count: Self.capacity)
        refusedNoWait = .allocate(capacity: 1)
        refusedNoWait.initialize(to: false)
        let r = CTap_ring_new(UInt32(Self.capacity))
        ring = r
        fallback = r == nil ? "io_uring: \(String(cString: strerror(errno)))" : nil
    }

    deinit {
        CTap_ring_free(ring)
        iovs.deallocate()
        results.deallocate()
        refusedNoWait.deallocate()
    }

    /// Whether frames go out in bursts (io_uring) rather than one by one.
    @inline(__always) public var batched: Bool { ring != nil && !refusedNoWait.pointee }

    /// The pieces of frame `slot` (`piecesPerFrame` of room).
    @inline(__always)
    public func pieces(_ slot: Int) -> UnsafeMutablePointer<iovec> {
        // SAFETY: slot < capacity (callers count frames per burst), so the piecesPerFrame iovecs fit in iovs.
        iovs + slot * Self.piecesPerFrame
    }

    /// Queues frame `slot` (`count` pieces) for `queue`, as write number `index` of the burst.
    @inline(__always)
    public func queue(_ queue: TapQueue, slot: Int, count: Int, index: Int) {
        let ok = CTap_ring_writev(ring, queue.fd, pieces(slot), Int32(count), UInt32(index))
        precondition(ok == 0, "more writes queued than the ring holds")
    }

    /// Writes the `count` frames queued, in order, and waits for them all (then
    /// `result` tells each one's outcome).
    @inline(__always)
    public func run(_ count: Int) {
        let n = CTap_ring_run(ring, results, UInt32(count))
        if n < 0 { for i in 0..<count { results[i] = n } }
    }

    /// What write `i` of the last `run` did.
    @inline(__always)
    public func result(_ i: Int) -> FrameIO {
        let v = Int(results[i])  // SAFETY: i < the count run(), <= capacity, results' size
        if v >= 0 { return .done(v) }
        if v == -Int(EOPNOTSUPP) {
            // This file cannot write without waiting: from now on, frame by frame (this one goes again).
            refusedNoWait.pointee = true
            return .cancelled
        }
        return FrameIO.from(-1, Int32(-v))
    }
}

/// Which TAP queues have frames to read, learnt from io_uring completions
/// (shared memory) instead of an empty read() per poll round; where io_uring
/// is refused, every queue counts as readable (and is simply tried).
public final class TapReadiness {
    // SAFETY: allocated once here, freed in deinit; one thread (the owning worker) uses it.
    private let poller: OpaquePointer?
    private let flags: UnsafeMutablePointer<UInt8>
    private let count: Int

    public init(_ queues: [TapQueue]) {
        count = queues.count
        flags = .allocate(capacity: max(count, 1))
        flags.initialize(repeating: 1, count: max(count, 1))  // each queue is tried once at first
        poller = queues.map(\.fd).withUnsafeBufferPointer { CTap_poller_new($0.baseAddress, UInt32($0.count)) }
    }

    deinit {
        CTap_poller_free(poller)
        flags.deallocate()
    }

    /// Takes in what became readable since the last look (no system call unless a poll must be re-armed).
    @inline(__always)
    public func refresh() {
        if let poller { _ = CTap_poller_reap(poller, flags) }
    }

    /// Whether queue `i` may hold a frame.
    // SAFETY (both): i < the queue count, flags' size (one per TAP queue of the port).
    @inline(__always) public func mayRead(_ i: Int) -> Bool { poller == nil || flags[i] != 0 }

    /// Queue `i` read empty (EAGAIN): it waits for the next completion.
    @inline(__always) public func drained(_ i: Int) { if poller != nil { flags[i] = 0 } }
}
