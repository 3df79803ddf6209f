// The vhost-user session's rings: applied to the device once complete,
// started and enabled; all stopped when the front-end leaves.
import IOTLB
import Vhost

extension VhostUserSession {
    /// Applies ring `i` to the device when it is complete, started and enabled;
    /// stops it on the device otherwise.
    func syncRing(_ i: Int) throws {
        let r = rings[i]
        let enabled = r.enabled ?? (features & VhostUserFeature.protocolFeatures == 0)
        guard r.started, enabled, r.addressed, r.num > 0, memory != nil else {
            stopRing(i)
            return
        }
        let c = VringConfig(num: r.num, descAddr: ringAddress(r.desc), availAddr: ringAddress(r.avail),
                            usedAddr: ringAddress(r.used), enabled: true,
                            eventIdx: features & VhostUserFeature.eventIdx != 0,
                            lastAvailIdx: r.baseFresh ? r.base : nil,
                            packed: features & VhostUserFeature.ringPacked != 0, logAddr: r.logAddr,
                            inOrder: features & VhostUserFeature.inOrder != 0)
        let call = r.callFD, kicks = r.kickFD >= 0
        let result = handle.performSync { d -> Result<VringSnapshot, EngineError> in
            guard let d else { return .failure(.notFound("device gone")) }
            do throws(EngineError) {
                let s = try d.setVring(i, c)
                d.setNotifiers(i, call: call, kicks: kicks)
                return .success(s)
            } catch { return .failure(error) }
        }
        rings[i].baseFresh = false
        if case .failure(let e) = result { throw Refused("vring \(i): \(e)") }
        rings[i].applied = true
    }

    /// Stops ring `i` on the device if it runs there (GET_VRING_BASE, a ring
    /// disabled or made incomplete). Where it stopped becomes its base:
    /// GET_VRING_BASE answers it, and a restart resumes there. Returns that
    /// position (`vringBase`; 0 when the device is gone), nil when the ring
    /// did not run.
    @discardableResult
    func stopRing(_ i: Int) -> UInt32? {
        guard rings[i].applied else { return nil }
        let stopped = handle.performSync { d -> UInt32? in
            d?.setNotifiers(i, call: -1, kicks: false)
            return d?.disableVring(i)
        }
        rings[i].applied = false
        guard let stopped else { return 0 }
        rings[i].base = UInt16(truncatingIfNeeded: stopped)
        rings[i].baseFresh = true
        return stopped
    }

    /// The device's address for a ring address from the front-end. Without a
    /// vIOMMU these are the front-end's user addresses; with the device IOTLB
    /// on they become guest-physical addresses, which the identity translator
    /// maps as IOVAs (the seed's "DPDK in the guest, fixed mappings").
    func ringAddress(_ a: UInt64) -> UInt64 {
        guard config.iotlb, !frontEndIOMMU, let t = memory?.table, let hit = t.lookup(uaddr: UserAddr(a)) else { return a }
        return t.regions[hit.region].guestPhysAddr.uncheckedAdd(hit.offset).raw  // inside the region
    }

    func stopAllRings() {
        handle.performSync { d in
            for i in 0..<(d?.queues.count ?? 0) {
                d?.setNotifiers(i, call: -1, kicks: false)
                d?.disableVring(i)
            }
        }
        for i in rings.indices {
            closeFD(&rings[i].kickFD)
            closeFD(&rings[i].callFD)
            closeFD(&rings[i].errFD)
            rings[i] = Ring()
        }
    }

    /// The front-end left: rings stop, memory goes, every descriptor closes.
    func teardown() {
        stopAllRings()
        handle.performSync {
            $0?.install(memory: nil)
            $0?.setNet(NetSettings(headerBytes: 0))
        }
        memory = nil
        closeFD(&backendFD)
        dropLog()
    }
}
