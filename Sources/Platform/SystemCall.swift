// System calls on the control path go through these: `syscall` retries EINTR and
// turns errno into a typed error; `mapShared` does the same for mmap. The
// per-packet calls (TAP reads and writes, eventfd kicks) stay direct.
import Glibc

/// A system call failed; `errno` says why.
public struct SystemCallError: Error, CustomStringConvertible, Sendable {
    /// The call that failed (with what it was for, when that helps).
    public let call: String
    /// Its errno.
    public let errno: Int32
    public init(call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }
    public var description: String { "\(call): \(String(cString: strerror(errno)))" }
}

/// Calls `body` until it stops failing with EINTR; turns -1 into a typed error.
@discardableResult
public func syscall<T: FixedWidthInteger>(_ name: String, _ body: () -> T) throws(SystemCallError) -> T {
    while true {
        let r = body()
        if r != -1 { return r }
        if errno != EINTR { throw SystemCallError(call: name, errno: errno) }
    }
}

/// `mmap` of `length` read-write bytes (shared), as a typed error when it
/// fails: `call` names it ("mmap (dirty log)", say). `fd` -1 with
/// MAP_ANONYMOUS in `flags` for anonymous memory.
public func mapShared(_ length: Int, flags: Int32 = 0, fd: Int32 = -1, offset: Int = 0,
                      call: String = "mmap") throws(SystemCallError) -> UnsafeMutableRawPointer {
    guard let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED | flags, fd, off_t(offset)), p != MAP_FAILED else {
        throw SystemCallError(call: call, errno: errno)
    }
    return p
}
