// Starting and stopping a device's built-in guest.
import Guest
import Platform
import Vhost

extension DeviceService {
    /// Starts a built-in guest on `d`. Refused at once when one is starting or
    /// running there; `done` gets the workload once its memory, rings and
    /// mappings are set up, or why they could not be (on the guest's thread).
    /// The configuration records it when it started.
    public func startWorkload(_ c: WorkloadConfig, on d: DeviceParts,
                       then done: @escaping @Sendable (Result<Workload, DeviceServiceError>) -> Void) throws(DeviceServiceError) {
        let id = d.id
        let refusal = d.workloadSlot.withLock { s -> DeviceServiceError? in
            if s.deleted { return .notFound(id: id) }
            if s.starting || s.current?.stats.state.isActive == true { return .workloadBusy(id: id) }
            s.starting = true
            return nil
        }
        if let refusal { throw refusal }
        let (store, registry, teardown) = (self.store, self.registry, self.teardown)
        Workload.start(c, on: d.handle) { result in
            switch result {
            case .success(let w):
                let (previous, kept) = d.workloadSlot.withLock { s -> (Workload?, Bool) in
                    s.starting = false
                    guard !s.deleted else { return (nil, false) }
                    defer { s.current = w }
                    return (s.current, true)
                }
                _ = previous?.stop()  // finished already: its figures give way to the new one's
                guard kept else {
                    // The device went meanwhile. This is the guest's own thread, which cannot join itself.
                    teardown.run { _ = w.stop() }
                    return done(.failure(.notFound(id: id)))
                }
                store.whenSaved(store.changed(registry.record(id) { $0.workload = c })) { done(.success(w)) }
            case .failure(let e):
                d.workloadSlot.withLock { $0.starting = false }
                switch e {
                case .engine(let ee): done(.failure(.engine(ee)))
                case .unsuitable(let why): done(.failure(.workloadUnsuitable(why)))
                }
            }
        }
    }

    /// Stops `d`'s built-in guest and forgets it; `done` gets it with its final
    /// figures. Refused at once when it has none. Joins the guest's thread on
    /// the teardown thread, not the caller's.
    public func stopWorkload(on d: DeviceParts,
                      then done: @escaping @Sendable (Result<(Workload, WorkloadStats), DeviceServiceError>) -> Void) throws(DeviceServiceError) {
        let id = d.id
        guard d.workload != nil else { throw .noWorkload(id: id) }
        let (store, registry) = (self.store, self.registry)
        teardown.run {
            let taken = d.workloadSlot.withLock { s -> Workload? in
                defer { s.current = nil }
                return s.current
            }
            guard let w = taken else { return done(.failure(.noWorkload(id: id))) }
            let final = w.stop()
            store.whenSaved(store.changed(registry.record(id) { $0.workload = nil })) { done(.success((w, final))) }
        }
    }

    /// Starts a built-in guest on `d` and waits until it is set up (start-up
    /// only: a configuration's workloads, before the server listens).
    public func startWorkloadAndWait(_ c: WorkloadConfig, on d: DeviceParts) throws(DeviceServiceError) -> Workload {
        let outcome = Locked<Result<Workload, DeviceServiceError>?>(nil)
        let ready = WakeSignal()
        try startWorkload(c, on: d) { r in
            outcome.withLock { $0 = r }
            ready.signal()
        }
        while true {
            if let r = outcome.withLock({ $0 }) { return try r.get() }
            ready.wait(timeoutNanos: 100_000_000)
        }
    }
}
