// A lock around a value, on pthreads.
import Glibc
import CPlatform

/// A value behind a pthread mutex. Used instead of the standard library's
/// `Mutex` because ThreadSanitizer understands pthread locks (it does not see
/// the futex calls `Mutex` makes on Linux, and reports false races).
public final class Locked<Value>: @unchecked Sendable {
    // Internal but usable from inlinable code: `withLock` is inlined into callers.
    // SAFETY: allocated once, freed in deinit: a pthread mutex must not move,
    // and the value is only touched with the mutex held (no run-time
    // exclusivity check needed, or possible across threads).
    @usableFromInline let mutex: UnsafeMutablePointer<pthread_mutex_t>
    @usableFromInline let value: UnsafeMutablePointer<Value>

    public init(_ value: Value) {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        self.value = .allocate(capacity: 1)
        self.value.initialize(to: value)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        value.deinitialize(count: 1)
        value.deallocate()
    }

    /// Runs `body` with the value, holding the lock.
    @inlinable @inline(__always)
    public func withLock<T, E: Error>(_ body: (inout Value) throws(E) -> T) throws(E) -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value.pointee)
    }

    /// The same, but spinning on `trylock` for up to `spins` tries before it
    /// sleeps: for a lock two busy threads share for microseconds (a guest
    /// IOMMU's table, read by a datapath's miss), where a futex sleep and
    /// wake-up would cost more than the wait.
    @inlinable @inline(__always)
    public func withLockSpinning<T, E: Error>(spins: Int = 4096, _ body: (inout Value) throws(E) -> T) throws(E) -> T {
        var tries = 0
        while pthread_mutex_trylock(mutex) != 0 {
            tries += 1
            if tries >= spins {
                pthread_mutex_lock(mutex)
                break
            }
            CPlatform_spin_hint()
        }
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value.pointee)
    }
}
