// A wake-up signal on a pthread mutex and condition, timed on the monotonic clock.
import Glibc

/// A mutex with a condition: a thread sleeps in `wait(timeoutNanos:)` until `signal()`.
public final class WakeSignal: @unchecked Sendable {
    // SAFETY: allocated once, freed in deinit (pthread objects must not move);
    // `pending` is only touched with the mutex held.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private let flag = UnsafeMutablePointer<Bool>.allocate(capacity: 1)
    private var pending: Bool { get { flag.pointee } set { flag.pointee = newValue } }

    public init() {
        flag.initialize(to: false)
        mutex.initialize(to: pthread_mutex_t())
        cond.initialize(to: pthread_cond_t())
        pthread_mutex_init(mutex, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
        flag.deallocate()
    }

    /// Wakes the waiter (or makes its next wait return at once).
    public func signal() {
        pthread_mutex_lock(mutex)
        pending = true
        pthread_cond_signal(cond)
        pthread_mutex_unlock(mutex)
    }

    /// Sleeps until signalled or `timeoutNanos` pass; returns whether it was signalled.
    @discardableResult
    public func wait(timeoutNanos: UInt64) -> Bool {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        if !pending {
            var ts = timespec()
            clock_gettime(CLOCK_MONOTONIC, &ts)
            let total = UInt64(ts.tv_nsec) + timeoutNanos
            ts.tv_sec += Int(total / 1_000_000_000)
            ts.tv_nsec = Int(total % 1_000_000_000)
            while !pending {
                if pthread_cond_timedwait(cond, mutex, &ts) == ETIMEDOUT { break }
            }
        }
        let was = pending
        pending = false
        return was
    }
}
