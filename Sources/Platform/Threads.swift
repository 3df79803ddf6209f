// Threads on pthreads: the datapath owns its threads, named so tools can tell them apart.
import Glibc

private final class ThreadBody {
    let run: () -> Void
    init(_ run: @escaping () -> Void) { self.run = run }
}

/// Starts a joinable pthread named `name` (its first 15 bytes: what `top -H`,
/// `perf` and debuggers show, e.g. datapath-0).
public func startThread(name: String, _ body: @escaping @Sendable () -> Void) -> pthread_t {
    var thread = pthread_t()
    let comm = Array(name.utf8.prefix(15))
    // SAFETY: retained once here, taken (released) once by the new thread.
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
