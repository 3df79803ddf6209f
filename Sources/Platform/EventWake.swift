// A wake-up signal on an eventfd, so that a sleeping thread can also wake for
// other descriptors (a datapath worker's TAP queues) in the same ppoll.
import CPlatform
import Glibc

/// An eventfd a thread sleeps on in `wait`, with any other descriptors it watches.
public final class EventWake: @unchecked Sendable {
    // SAFETY (@unchecked): the descriptor is created once and closed in deinit;
    // write and ppoll on it are thread-safe.
    public let fd: Int32

    public init() {
        fd = CPlatform_eventfd()
        precondition(fd >= 0, "eventfd: \(String(cString: strerror(errno)))")
    }

    deinit { close(fd) }

    /// Wakes the waiter (or makes its next wait return at once).
    public func signal() {
        var one: UInt64 = 1
        _ = write(fd, &one, 8)
    }

    /// Sleeps until signalled, one of `fds[1..<count]` is ready, or
    /// `timeoutNanos` pass. `fds[0]` is filled in with this signal's own
    /// descriptor; the caller fills the rest. Returns whether it was signalled.
    @discardableResult
    public func wait(timeoutNanos: UInt64, fds: UnsafeMutablePointer<pollfd>, count: Int) -> Bool {
        fds[0] = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        _ = CPlatform_ppoll(fds, UInt(count), timeoutNanos)
        guard fds[0].revents != 0 else { return false }
        var v: UInt64 = 0
        _ = read(fd, &v, 8)
        return true
    }
}
