// A lock around a value, on pthreads.
import Glibc

/// A value behind a pthread mutex. Used instead of the standard library's
/// `Mutex` because ThreadSanitizer understands pthread locks (it does not see
/// the futex calls `Mutex` makes on Linux, and reports false races).
public final class Locked<Value>: @unchecked Sendable {
    // Visible to inlined `withLock` only (as it was when this lived in the engine).
    @usableFromInline var mutex = pthread_mutex_t()
    @usableFromInline var value: Value

    public init(_ value: Value) {
        self.value = value
        pthread_mutex_init(&mutex, nil)
    }

    deinit { pthread_mutex_destroy(&mutex) }

    /// Runs `body` with the value, holding the lock.
    @inlinable @inline(__always)
    public func withLock<T, E: Error>(_ body: (inout Value) throws(E) -> T) throws(E) -> T {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body(&value)
    }
}
