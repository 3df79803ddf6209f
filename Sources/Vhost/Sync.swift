// Threads and a wake-up signal, on pthreads: the datapath owns its threads.
import Glibc

/// A mutex with a condition: a thread sleeps in `wait(timeoutNanos:)` until `signal()`.
public final class WakeSignal: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var cond = pthread_cond_t()
    private var pending = false

    public init() {
        pthread_mutex_init(&mutex, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(&cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(&cond)
        pthread_mutex_destroy(&mutex)
    }

    /// Wakes the waiter (or makes its next wait return at once).
    public func signal() {
        pthread_mutex_lock(&mutex)
        pending = true
        pthread_cond_signal(&cond)
        pthread_mutex_unlock(&mutex)
    }

    /// Sleeps until signalled or `timeoutNanos` pass; returns whether it was signalled.
    @discardableResult
    public func wait(timeoutNanos: UInt64) -> Bool {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        if !pending {
            var ts = timespec()
            clock_gettime(CLOCK_MONOTONIC, &ts)
            let total = UInt64(ts.tv_nsec) + timeoutNanos
            ts.tv_sec += Int(total / 1_000_000_000)
            ts.tv_nsec = Int(total % 1_000_000_000)
            while !pending {
                if pthread_cond_timedwait(&cond, &mutex, &ts) == ETIMEDOUT { break }
            }
        }
        let was = pending
        pending = false
        return was
    }
}

/// Monotonic time in nanoseconds.
@inline(__always)
public func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

private final class ThreadBody {
    let run: () -> Void
    init(_ run: @escaping () -> Void) { self.run = run }
}

/// Starts a thread nobody joins: its resources go when it ends.
public func startDetachedThread(name: String, _ body: @escaping @Sendable () -> Void) {
    pthread_detach(startThread(name: name, body))
}

/// Starts a joinable pthread named `name` (its first 15 bytes: what `top -H`,
/// `perf` and debuggers show, e.g. datapath-0).
public func startThread(name: String, _ body: @escaping @Sendable () -> Void) -> pthread_t {
    var thread = pthread_t()
    let comm = Array(name.utf8.prefix(15))
    let box = Unmanaged.passRetained(ThreadBody {
        // pthread_setname_np is hidden behind _GNU_SOURCE; the file is the same knob.
        let fd = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
        if fd >= 0 {
            _ = comm.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
        }
        body()
    }).toOpaque()
    let rc = pthread_create(&thread, nil, { arg in
        let body = Unmanaged<ThreadBody>.fromOpaque(arg!).takeRetainedValue()
        body.run()
        return nil
    }, box)
    precondition(rc == 0, "pthread_create failed: \(rc)")
    return thread
}

/// A value behind a pthread mutex. Used instead of the standard library's
/// `Mutex` because ThreadSanitizer understands pthread locks (it does not see
/// the futex calls `Mutex` makes on Linux, and reports false races).
public final class Locked<Value>: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var value: Value

    public init(_ value: Value) {
        self.value = value
        pthread_mutex_init(&mutex, nil)
    }

    deinit { pthread_mutex_destroy(&mutex) }

    /// Runs `body` with the value, holding the lock.
    @inline(__always)
    public func withLock<T, E: Error>(_ body: (inout Value) throws(E) -> T) throws(E) -> T {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body(&value)
    }
}
