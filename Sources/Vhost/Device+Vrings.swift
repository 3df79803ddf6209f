// A device's queues as the control path sets them: vrings configured,
// stopped (GET_VRING_BASE), their notifiers, and the kick suppression the
// worker asks of drivers. On the device's worker, as the rest of the device.
import CRingAtomics

extension Device {
    /// Each queue's state and counters.
    public func vrings() -> [VringSnapshot] { queues.map(\.snapshot) }

    /// Sets (or re-sets) vring `index`: drops its outstanding event, restarts it
    /// from `lastAvailIdx`, and checks its rings at once when enabled.
    public func setVring(_ index: Int, _ c: VringConfig) throws(EngineError) -> VringSnapshot {
        guard index >= 0 && index < queues.count else {
            throw .notFound("vring \(index) not found: the device has \(queues.count) queues")
        }
        if let (field, why) = c.problem() { throw .invalidField(field: field, message: why) }
        let vq = queues[index]
        if let p = vq.pending { missLog.remove(seq: p.seq) }
        vq.pending = nil
        vq.failure = nil
        let same = vq.config.map { $0.sameRing(as: c) } ?? false
        vq.config = c
        if let base = c.lastAvailIdx {
            vq.lastAvailIdx = c.packed ? base & 0x7fff : base
            vq.availWrap = !c.packed || base & 0x8000 != 0
        } else if !same {
            vq.lastAvailIdx = 0
            vq.availWrap = true
        }  // else: the same ring again (re-enabled, or recovering): carry on where it stopped
        vq.needsUsedInit = true
        vq.dropTranslations()
        vq.state = c.enabled ? .running : .disabled
        repinRings()
        if c.enabled && memory != nil { prepareRings(vq) }
        return vq.snapshot
    }

    /// Stops queue `index` (vhost-user GET_VRING_BASE, or a disabled ring):
    /// drops its outstanding event; returns where it stopped (`vringBase`:
    /// the avail position, and a packed ring's used position in bits 16-31).
    /// Between rounds, so nothing is half done: every used entry is published.
    @discardableResult
    public func disableVring(_ index: Int) -> UInt32 {
        let vq = queues[index]
        if let p = vq.pending { missLog.remove(seq: p.seq) }
        vq.pending = nil
        vq.failure = nil
        vq.state = .disabled
        vq.config?.enabled = false
        vq.dropTranslations()
        repinRings()
        return vq.vringBase
    }

    /// A vhost-user front-end's eventfds for queue `index`: `call` is signalled
    /// when used buffers are published and the driver did not suppress it (-1:
    /// none); with `kicks`, the driver kicks while the worker sleeps and is asked
    /// not to while it polls (VRING_USED_F_NO_NOTIFY, as vhost_disable_notify).
    public func setNotifiers(_ index: Int, call: Int32, kicks: Bool) {
        sendOwedNotifications(pairOf: index)
        let vq = queues[index]
        vq.callFD = call
        vq.driverKicks = kicks
        if kicks && vq.state == .running && vq.ringsReady { writeUsedFlags(vq) }
    }

    /// The number of the datapath worker that owns the device (-1 before it is placed).
    public var workerIndex: Int { owner.map { $0._withUnsafeGuaranteedRef { $0.index } } ?? -1 }

    /// Asks drivers that kick to do so (before the worker sleeps) or not to
    /// (while it polls): the used ring's flags. Then a full fence, so a buffer
    /// posted before the driver saw the flag is found by the next poll.
    func setKickNotification(_ wanted: Bool) {
        guard kicksWanted != wanted else { return }
        kicksWanted = wanted
        for vq in queues where vq.driverKicks && vq.state == .running && vq.ringsReady {
            writeUsedFlags(vq)
        }
        CRingAtomics_fence_seq_cst()
    }

    /// The queue `index`.
    public func vring(_ index: Int) throws(EngineError) -> VringSnapshot {
        guard index >= 0 && index < queues.count else {
            throw .notFound("vring \(index) not found: the device has \(queues.count) queues")
        }
        return queues[index].snapshot
    }
}
