// One helper for system calls: retries EINTR and turns errno into a typed error.
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
