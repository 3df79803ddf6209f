// Dirty logging's commands: what a vhost-user front-end that migrates sets
// (VHOST_F_LOG_ALL, SET_LOG_BASE), and what readers see of it.
extension Device {
    /// VHOST_F_LOG_ALL on or off (SET_FEATURES, at any time): the rings are
    /// prepared again, for the datapath of the new mode, before the next round.
    public func setLogging(_ on: Bool) {
        guard logState.pointee.enabled != on else { return }
        logState.pointee.enabled = on
        for vq in queues { vq.dropTranslations() }
    }

    /// The log to set bits in (SET_LOG_BASE), or none. The previous one is
    /// released here, on the worker, so no round uses it afterwards; a front-end
    /// may unmap it once this returned.
    public func setDirtyLog(_ log: DirtyLog?) {
        logFlush()
        logState.pointee.log = log
        logState.pointee.base = log?.base
        logState.pointee.pages = log?.pages ?? 0
        for vq in queues { vq.dropTranslations() }
    }

    /// Whether logging is on, what it logged, and its faults.
    public func dirtyLogSnapshot() -> DirtyLogSnapshot {
        let s = logState.pointee
        var d = DirtyLogSnapshot()
        d.enabled = s.enabled
        d.waiting = s.enabled && s.base == nil
        d.size = s.log?.size ?? 0
        d.pagesLogged = s.pagesLogged
        d.faults = s.faults
        d.lastFault = s.lastFault
        return d
    }
}

extension VirtQueue {
    /// What GET_VRING_BASE answers: the avail position; for a packed ring the
    /// used position in bits 16-31 too, as QEMU encodes a packed queue's state
    /// (virtio_queue_packed_get_last_avail_idx).
    var vringBase: UInt32 {
        config?.packed == true ? UInt32(availPosition) | UInt32(usedPosition) << 16 : UInt32(availPosition)
    }
}
