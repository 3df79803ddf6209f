// The monotonic clock, for intervals and deadlines (never wall time).
import Glibc

/// Monotonic time in nanoseconds. Inlinable: the datapath reads it per batch.
@inlinable @inline(__always)
public func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// Monotonic time in milliseconds (back-offs and time-outs of the control path).
@inlinable
public func monotonicMillis() -> Int { Int(monotonicNanos() / 1_000_000) }
