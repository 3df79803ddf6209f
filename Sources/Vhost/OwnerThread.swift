// Thread confinement, checked. A device and its queues belong to one datapath
// thread (README, "Threads"); their `Mutable` accessors assert it in debug
// builds. Release builds compile the check and the recorded thread away.
import Glibc

/// The thread allowed to touch a device's or a queue's mutable state, once a
/// worker has adopted it. Unset (a device driven synchronously by a test, or
/// not yet placed) means anyone may: such a device has one user anyway.
struct OwnerThread {
    #if DEBUG
    private var thread: pthread_t?
    #endif

    /// Records the calling thread as the owner (a worker adopting a device).
    @inline(__always)
    mutating func adopt() {
        #if DEBUG
        thread = pthread_self()
        #endif
    }

    /// Asserts that the caller is the owner, when there is one. Debug builds only.
    @inline(__always)
    func check() {
        #if DEBUG
        if let t = thread {
            assert(pthread_equal(t, pthread_self()) != 0, "a device's datapath state touched off its worker thread")
        }
        #endif
    }
}
