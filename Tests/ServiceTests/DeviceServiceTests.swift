// The devices service on its own, without HTTP: a device's parts come and go together.
import Glibc
import Guest
import JSON
import Logging
import Platform
import Service
import Testing
import Vhost

/// The vhost-user socket directory of this test process (made once).
let testSocketDirectory: String = {
    let dir = "/tmp/iotlbd-service-tests-\(getpid())"
    mkdir(dir, 0o700)
    return dir
}()

@Suite struct DeviceServiceTests {
    /// The devices service over a fresh engine, recording in memory only.
    final class Fixture: Sendable {
        let engine = Engine(datapathThreads: 1)
        let store = ConfigStore(stateFile: nil, logger: Logger(label: "service-tests"))
        let devices: DeviceService

        init() {
            devices = DeviceService(engine: engine, store: store,
                              sockets: VhostUserSockets(resolvedDirectory: testSocketDirectory),
                              logger: Logger(label: "service-tests"))
        }

        deinit {
            devices.shutdown()
            engine.shutdown()
        }

        /// Starts a guest sending until stopped and waits until it runs.
        func startWorkload(on d: DeviceParts) throws(DeviceServiceError) -> Workload {
            try devices.startWorkloadAndWait(WorkloadConfig(), on: d)
        }

        /// Deletes `id` and waits until the engine dropped it.
        func delete(_ id: String) throws(DeviceServiceError) {
            let gone = WakeSignal()
            let result = Locked<Result<Void, DeviceServiceError>?>(nil)
            try devices.delete(id) { r in
                result.withLock { $0 = r }
                gone.signal()
            }
            #expect(gone.wait(timeoutNanos: 10_000_000_000), "delete of \(id) did not finish")
            #expect(result.withLock { (try? $0?.get()) != nil })
        }

        /// The device ids the configuration records.
        var recorded: [String] {
            guard case .array(let list)? = store.document["devices"] else { return [] }
            return list.compactMap { if case .string(let id)? = $0["id"] { id } else { nil } }
        }
    }

    static func socketPath(_ tag: String) -> String { "\(testSocketDirectory)/devices-\(tag).sock" }

    @Test func deleteTearsDownEveryPart() throws {
        let f = Fixture()
        let guest = try f.devices.create(DeviceConfig(id: "g"))
        let workload = try f.startWorkload(on: guest)
        #expect(workload.stats.state == .running)
        let path = Self.socketPath("delete")
        let front = try f.devices.create(DeviceConfig(id: "vu", vhostUserSocket: path))
        #expect(front.frontEnd != nil && access(path, F_OK) == 0)
        #expect(f.recorded == ["g", "vu"])
        // A poll waiting on the device's misses is answered when it goes.
        let closed = Locked(false)
        let waiter = guest.handle.missLog.poll(after: .max - 1, limit: 1) { a in
            if case .closed = a { closed.withLock { $0 = true } }
        }

        try f.delete("g")
        #expect(workload.stats.state == .stopped)
        #expect(f.devices.device("g") == nil && f.engine.device("g") == nil)
        #expect(waiter.isFinished && closed.withLock { $0 })
        try f.delete("vu")
        #expect(access(path, F_OK) != 0, "the socket goes with its device")
        #expect(f.devices.device("vu") == nil && f.engine.device("vu") == nil)
        #expect(f.recorded.isEmpty && f.devices.all().isEmpty)

        #expect(throws: DeviceServiceError.self) { try f.delete("g") }
        // A stale reference cannot start a guest on a deleted device.
        #expect(throws: DeviceServiceError.self) { _ = try f.startWorkload(on: guest) }
    }

    @Test func oneWorkloadAtATimeAndStopForgetsIt() throws {
        let f = Fixture()
        let d = try f.devices.create(DeviceConfig(id: "w"))
        let w = try f.startWorkload(on: d)
        do throws(DeviceServiceError) {
            _ = try f.startWorkload(on: d)
            Issue.record("a second workload started")
        } catch {
            guard case .workloadBusy("w") = error else { throw error }
        }
        let stopped = WakeSignal()
        try f.devices.stopWorkload(on: d) { r in
            #expect((try? r.get())?.1.state == .stopped)
            stopped.signal()
        }
        #expect(stopped.wait(timeoutNanos: 10_000_000_000))
        #expect(w.stats.state == .stopped && d.workload == nil)
        #expect(throws: DeviceServiceError.self) { try f.devices.stopWorkload(on: d) { _ in } }
        // The device is free again.
        #expect(try f.startWorkload(on: d).stats.state == .running)
    }

    @Test func shutdownStopsDevicesOfEveryKind() throws {
        let f = Fixture()
        _ = try f.devices.create(DeviceConfig(id: "plain"))
        let guest = try f.devices.create(DeviceConfig(id: "guest"))
        let workload = try f.startWorkload(on: guest)
        let path = Self.socketPath("shutdown")
        _ = try f.devices.create(DeviceConfig(id: "vu", vhostUserSocket: path))
        let client = Self.socketPath("client")
        _ = try f.devices.create(DeviceConfig(id: "vuc", vhostUserSocket: client, vhostUserMode: .client))

        f.devices.shutdown()
        #expect(workload.stats.state == .stopped && guest.workload == nil)
        #expect(access(path, F_OK) != 0, "a server socket is removed")
        do throws(DeviceServiceError) {
            _ = try f.devices.create(DeviceConfig(id: "late"))
            Issue.record("a device was created after shutdown")
        } catch {
            guard case .engine(.unavailable) = error else { throw error }
        }
        #expect(f.engine.device("late") == nil)
    }

    @Test func refusalsSayWhatWasRefusedAndChangeNothing() throws {
        let f = Fixture()
        let taken = Self.socketPath("taken")
        _ = try f.devices.create(DeviceConfig(id: "a", vhostUserSocket: taken))
        func refusal(_ c: DeviceConfig) -> DeviceServiceError? {
            do throws(DeviceServiceError) { _ = try f.devices.create(c) } catch { return error }
            return nil
        }
        guard case .exists(let id)? = refusal(DeviceConfig(id: "a")) else {
            Issue.record("a duplicate id was not refused")
            return
        }
        #expect(id == "a")
        guard case .socketTaken(let path, let by)? = refusal(DeviceConfig(id: "b", vhostUserSocket: taken)) else {
            Issue.record("a socket in use was not refused")
            return
        }
        #expect(path == taken && by == "a")
        guard case .socketRefused(let why)? = refusal(DeviceConfig(id: "c", vhostUserSocket: "/nonexistent-dir/x.sock")) else {
            Issue.record("a socket outside the directory was not refused")
            return
        }
        #expect(why.contains("does not exist"), "\(why)")
        #expect(f.engine.device("b") == nil && f.engine.device("c") == nil)
        #expect(f.recorded == ["a"])
    }
}
