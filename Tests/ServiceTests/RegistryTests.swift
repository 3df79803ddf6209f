// The devices registry under concurrent creates and deletes of the same ids
// and the same vhost-user sockets: one truth for a device's lifecycle.
import Glibc
import Guest
import JSON
import Logging
import Platform
import Service
import Testing
import Vhost

/// Callbacks still owed, and a way to wait until none is.
final class Outstanding: Sendable {
    private let count = Locked(0)
    private let zero = WakeSignal()

    func begin() { count.withLock { $0 += 1 } }
    func end() {
        if count.withLock({ c -> Bool in c -= 1; return c == 0 }) { zero.signal() }
    }
    /// Waits until every callback came; false after `seconds`.
    func wait(seconds: Double = 60) -> Bool {
        let until = monotonicNanos() + UInt64(seconds * 1e9)
        while count.withLock({ $0 }) > 0 {
            guard monotonicNanos() < until else { return false }
            zero.wait(timeoutNanos: 50_000_000)
        }
        return true
    }
}

@Suite struct RegistryTests {
    typealias Fixture = DeviceServiceTests.Fixture

    /// Creates without waiting; `result` gets the outcome (thrown at once or called back).
    static func create(_ f: Fixture, _ c: DeviceConfig, _ owed: Outstanding,
                       _ result: @escaping @Sendable (Result<DeviceParts, DeviceServiceError>) -> Void) {
        create(f.devices, c, owed, result)
    }

    static func create(_ devices: DeviceService, _ c: DeviceConfig, _ owed: Outstanding,
                       _ result: @escaping @Sendable (Result<DeviceParts, DeviceServiceError>) -> Void) {
        owed.begin()
        do throws(DeviceServiceError) {
            try devices.create(c) { r in
                result(r)
                owed.end()
            }
        } catch {
            result(.failure(error))
            owed.end()
        }
    }

    /// Deletes without waiting; `result` gets the outcome.
    static func delete(_ f: Fixture, _ id: String, _ owed: Outstanding,
                       _ result: @escaping @Sendable (Result<Void, DeviceServiceError>) -> Void) {
        owed.begin()
        do throws(DeviceServiceError) {
            try f.devices.delete(id) { r in
                result(r)
                owed.end()
            }
        } catch {
            result(.failure(error))
            owed.end()
        }
    }

    @Test("a create of an id being deleted waits until it is gone, then succeeds (no 409)")
    func createWaitsForDeletion() throws {
        let f = Fixture()
        let path = DeviceServiceTests.socketPath("again")
        let first = try f.devices.create(DeviceConfig(id: "again", vhostUserSocket: path))
        _ = try f.startWorkload(on: first)  // stopping it makes the teardown take a while
        let owed = Outstanding()
        let order = Locked<[String]>([])
        Self.delete(f, "again", owed) { r in
            #expect((try? r.get()) != nil)
            order.withLock { $0.append("deleted") }
        }
        #expect(f.devices.device("again") == nil, "a device being deleted is not found")
        #expect(f.devices.all().isEmpty)
        Self.create(f, DeviceConfig(id: "again", vhostUserSocket: path), owed) { r in
            switch r {
            case .success(let d): #expect(d !== first)
            case .failure(let e): Issue.record("the create after a delete was refused: \(e)")
            }
            order.withLock { $0.append("created") }
        }
        #expect(owed.wait())
        #expect(order.withLock { $0 } == ["deleted", "created"])
        #expect(f.devices.lifecycle("again") == .running)
        #expect(f.recorded == ["again"])
        #expect(access(path, F_OK) == 0, "the new device serves the socket")
        try f.delete("again")
        #expect(f.devices.lifecycle("again") == nil)
    }

    @Test("concurrent creates on one socket: one wins, the others are refused as taken")
    func concurrentCreatesOnOneSocket() throws {
        let f = Fixture()
        let path = DeviceServiceTests.socketPath("race")
        let outcomes = Locked<[Result<DeviceParts, DeviceServiceError>]>([])
        let owed = Outstanding()
        let threads = (0..<8).map { i in
            startThread(name: "create-\(i)") {
                Self.create(f, DeviceConfig(id: "race\(i)", vhostUserSocket: path), owed) { r in outcomes.withLock { $0.append(r) } }
            }
        }
        for t in threads { pthread_join(t, nil) }
        #expect(owed.wait())
        let all = outcomes.withLock { $0 }
        let won = all.compactMap { try? $0.get() }
        #expect(won.count == 1, "\(all)")
        for case .failure(let e) in all {
            guard case .socketTaken(let p, _) = e else {
                Issue.record("refused otherwise than as taken: \(e)")
                continue
            }
            #expect(p == path)
        }
        #expect(f.devices.all().map(\.id) == won.map(\.id))
    }

    @Test("create/delete storm on the same ids and sockets: every answer is one of the contract's, nothing leaks")
    func storm() throws {
        let f = Fixture()
        let ids = ["s0", "s1", "s2"]
        let sockets = [DeviceServiceTests.socketPath("storm-a"), DeviceServiceTests.socketPath("storm-b")]
        let owed = Outstanding()
        let unexpected = Locked<[String]>([])
        let counts = Locked<[String: Int]>([:])
        @Sendable func count(_ what: String) { counts.withLock { $0[what, default: 0] += 1 } }
        let threads = (0..<4).map { t in
            startThread(name: "storm-\(t)") {
                var rng = UInt64(t + 1) &* 0x9E37_79B9_7F4A_7C15
                func next(_ n: Int) -> Int {
                    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
                    return Int(rng % UInt64(n))
                }
                for _ in 0..<100 {
                    let id = ids[next(ids.count)]
                    if next(2) == 0 {
                        let socket = next(3) == 0 ? nil : sockets[next(sockets.count)]
                        Self.create(f, DeviceConfig(id: id, vhostUserSocket: socket), owed) { r in
                            switch r {
                            case .success: count("created")
                            case .failure(.exists): count("exists")
                            case .failure(.socketTaken): count("socket taken")
                            case .failure(let e): unexpected.withLock { $0.append("create \(id): \(e)") }
                            }
                        }
                    } else {
                        Self.delete(f, id, owed) { r in
                            switch r {
                            case .success: count("deleted")
                            case .failure(.notFound): count("not found")
                            case .failure(let e): unexpected.withLock { $0.append("delete \(id): \(e)") }
                            }
                        }
                    }
                    if next(4) == 0 { usleep(UInt32(next(2000))) }
                }
            }
        }
        for t in threads { pthread_join(t, nil) }
        #expect(owed.wait(), "a create or delete never answered")
        #expect(unexpected.withLock { $0 } == [])
        let c = counts.withLock { $0 }
        #expect(c["created", default: 0] > 0 && c["deleted", default: 0] > 0, "\(c)")
        // What runs is consistent everywhere: listed, recorded, served.
        let running = f.devices.all().map(\.id)
        #expect(Set(running).count == running.count)
        #expect(f.recorded.sorted() == running.sorted())
        for d in f.devices.all() {
            #expect(f.engine.device(d.id) != nil)
            if let s = d.config.vhostUserSocket { #expect(access(s, F_OK) == 0) }
        }
        let served = f.devices.all().compactMap(\.config.vhostUserSocket)
        #expect(Set(served).count == served.count, "two devices on one socket: \(served)")
        for id in running { try f.delete(id) }
        #expect(f.devices.all().isEmpty && f.recorded.isEmpty)
        for id in ids { #expect(f.engine.device(id) == nil && f.devices.lifecycle(id) == nil) }
        for s in sockets { #expect(access(s, F_OK) != 0, "\(s) outlived its device") }
    }
}

@Suite struct StateFileTests {
    @Test("with a state file, every change answers once the file holds it; concurrent changes are coalesced in order")
    func answersComeAfterTheFileHoldsTheChange() throws {
        let dir = "/tmp/iotlbd-state-tests-\(getpid())"
        mkdir(dir, 0o700)
        let file = dir + "/config.json"
        unlink(file)
        let logger = Logger(label: "service-tests")
        let engine = Engine(datapathThreads: 1)
        let store = ConfigStore(stateFile: file, logger: logger)
        let devices = DeviceService(engine: engine, store: store, sockets: VhostUserSockets(resolvedDirectory: testSocketDirectory),
                              logger: logger)
        defer {
            devices.shutdown()
            engine.shutdown()
            store.stop()
        }
        @Sendable func saved() -> [String] {
            guard let bytes = try? readWholeFile(file), let doc = try? JSON.parse(bytes),
                  case .array(let list)? = doc["devices"] else { return [] }
            return list.compactMap { if case .string(let id)? = $0["id"] { id } else { nil } }
        }
        let owed = Outstanding()
        let late = Locked<[String]>([])
        let threads = (0..<4).map { t in
            startThread(name: "state-\(t)") {
                for i in 0..<10 {
                    let id = "f\(t)-\(i)"
                    RegistryTests.create(devices, DeviceConfig(id: id), owed) { r in
                        #expect((try? r.get()) != nil)
                        if !saved().contains(id) { late.withLock { $0.append(id) } }
                    }
                }
            }
        }
        for t in threads { pthread_join(t, nil) }
        #expect(owed.wait())
        #expect(late.withLock { $0 } == [], "answered before the state file held them")
        #expect(saved().count == 40)
        #expect(saved() == devices.all().map(\.id), "the file lists the devices in creation order")
        // A delete, too, answers once the file no longer holds the device.
        let gone = Locked<Bool?>(nil)
        owed.begin()
        try devices.delete("f0-0") { _ in
            gone.withLock { $0 = !saved().contains("f0-0") }
            owed.end()
        }
        #expect(owed.wait())
        #expect(gone.withLock { $0 } == true)
    }
}
