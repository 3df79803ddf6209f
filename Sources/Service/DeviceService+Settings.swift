// What clients set on a device that the configuration records: its memory
// table and vrings (over HTTP). Applied by the device's worker, recorded, and
// answered once the state file holds the change; nothing here waits on a
// thread: the worker's completion records, the saver's thread answers.
import IOTLB
import Vhost

extension DeviceService {
    /// Replaces `d`'s memory table; `done` gets it (or the engine's refusal)
    /// once the state file holds it.
    public func setMemTable(_ regions: [MemoryRegion], on d: DeviceParts,
                            then done: @escaping @Sendable (Result<MemoryTable, EngineError>) -> Void) {
        let (store, registry, id) = (self.store, self.registry, d.id)
        d.handle.perform({ dev -> Result<MemoryTable, EngineError> in
            guard let dev else { return .failure(.notFound("device \(id) not found")) }
            do throws(EngineError) { return .success(try dev.setMemTable(regions)) } catch { return .failure(error) }
        }, then: { result in
            guard case .success = result else { return done(result) }
            store.whenSaved(store.changed(registry.record(id) { $0.memTable = regions })) { done(result) }
        })
    }

    /// Sets vring `n` of `d`; `done` gets its state (or the engine's refusal)
    /// once the state file holds it.
    public func setVring(_ n: Int, _ c: VringConfig, on d: DeviceParts,
                         then done: @escaping @Sendable (Result<VringSnapshot, EngineError>) -> Void) {
        let (store, registry, id) = (self.store, self.registry, d.id)
        d.handle.perform({ dev -> Result<VringSnapshot, EngineError> in
            guard let dev else { return .failure(.notFound("device \(id) not found")) }
            do throws(EngineError) { return .success(try dev.setVring(n, c)) } catch { return .failure(error) }
        }, then: { result in
            guard case .success = result else { return done(result) }
            store.whenSaved(store.changed(registry.record(id) { $0.vrings[n] = c })) { done(result) }
        })
    }
}
