import ControlPlane
import HTTPClient
import Platform
import Synchronization
import Dispatch
import Foundation
import Guest
import IOTLB
import Testing
import Vhost
import JSON

/// Vrings, misses and long-polls through HTTP. Rings live at GPA 0x10000 (RX) and
/// 0x20000 (TX); IOVA = GPA + 0x4000_0000; user address = GPA + 0x7f0000000000.
@Suite struct MissRouteTests {
    static let off: UInt64 = 0x4000_0000

    func setUp(_ d: LiveDaemon, id: String = "q") throws -> (GuestPhysicalMemory, SplitRingDriver, SplitRingDriver) {
        try d.deviceWithMemory(id, extra: #","translator":"external""#)
        let h = try #require(d.daemon.engine.device(id))
        let mem = GuestPhysicalMemory(h.performSync { $0!.memory! })
        let rx = SplitRingDriver(memory: mem, layout: .consecutive(num: 16, at: GuestPhysAddr(0x10000)))
        let tx = SplitRingDriver(memory: mem, layout: .consecutive(num: 16, at: GuestPhysAddr(0x20000)))
        return (mem, rx, tx)
    }

    func vringBody(_ r: SplitRingDriver, extra: String = "") -> String {
        let l = r.layout
        return #"{"num":16,"desc_addr":"\#(hexText(l.descGPA.raw + Self.off))","avail_addr":"\#(hexText(l.availGPA.raw + Self.off))","used_addr":"\#(hexText(l.usedGPA.raw + Self.off))"\#(extra)}"#
    }

    func hexText(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

    @discardableResult
    func map(_ d: LiveDaemon, _ id: String, _ gpa: UInt64, _ size: UInt64, _ perm: String = "rw") throws -> JSON {
        try d.expect(200, "POST", "/v1/devices/\(id)/iotlb/updates",
                     #"{"iova":"\#(hexText(gpa + Self.off))","size":"\#(hexText(size))","uaddr":"\#(hexText(gpa + 0x7f0000000000))","perm":"\#(perm)"}"#)
    }

    func misses(_ j: JSON) -> [JSON] {
        if case .array(let a)? = j["misses"] { return a }
        return []
    }

    /// An answer that the same batch evicts leaves the queue waiting: its miss
    /// comes back with a fresh seq, so a reader asking past its last seq sees it.
    @Test func missEvictedByItsOwnAnswerIsAnnouncedAgain() throws {
        let d = try LiveDaemon()
        try d.deviceWithMemory("r", extra: #","translator":"external","iotlb_max_entries":2"#)
        let desc: UInt64 = 0x20000
        let v = try d.expect(200, "PUT", "/v1/devices/r/vrings/1",
                             #"{"num":16,"desc_addr":"\#(hexText(desc + Self.off))","avail_addr":"\#(hexText(desc + 0x1000 + Self.off))","used_addr":"\#(hexText(desc + 0x2000 + Self.off))"}"#)
        #expect(v["state"] == "waiting_iotlb")
        let first = misses(try d.expect(200, "GET", "/v1/devices/r/iotlb/misses?after=0&timeout_ms=1000"))
        #expect(first.count == 1 && first[0]["iova"] == .string(hexText(desc + Self.off)))
        guard case .int(let seq)? = first.first?["seq"] else { Issue.record("no seq"); return }
        // The answer first, then two unrelated entries: FIFO (2 entries) evicts the answer.
        let answer = #"{"iova":"\#(hexText(desc + Self.off))","size":"0x3000","uaddr":"\#(hexText(desc + 0x7f0000000000))","perm":"rw"}"#
        let rep = try d.expect(200, "POST", "/v1/devices/r/iotlb/updates", #"""
            {"entries":[\#(answer),
              {"iova":"0x900000000","size":4096,"uaddr":"0x7f0000100000","perm":"rw"},
              {"iova":"0x900001000","size":4096,"uaddr":"0x7f0000101000","perm":"rw"}]}
            """#)
        #expect(rep["resolved_misses"] == 0 && rep["evicted"] == 1)
        #expect(try d.expect(200, "GET", "/v1/devices/r/vrings/1")["state"] == "waiting_iotlb")
        let again = misses(try d.expect(200, "GET", "/v1/devices/r/iotlb/misses?after=\(seq)&timeout_ms=1000"))
        #expect(again.count == 1 && again[0]["iova"] == .string(hexText(desc + Self.off)) && again[0]["vq"] == 1)
        if case .int(let s2)? = again.first?["seq"] { #expect(s2 > seq) } else { Issue.record("no fresh seq") }
        #expect(try d.expect(200, "GET", "/v1/devices/r/iotlb/stats")["reannounced_misses"] == 1)
        // Only the fresh event is outstanding (readers may see a miss twice, never two at once).
        #expect(misses(try d.expect(200, "GET", "/v1/devices/r/iotlb/misses")).count == 1)
        // Answered alone, it resolves; the log empties.
        #expect(try d.expect(200, "POST", "/v1/devices/r/iotlb/updates", answer)["resolved_misses"] == 1)
        #expect(try d.expect(200, "GET", "/v1/devices/r/vrings/1")["state"] == "running")
        #expect(misses(try d.expect(200, "GET", "/v1/devices/r/iotlb/misses")).isEmpty)
    }

    /// An update that evicts entries but does not name a waiting queue's IOVA
    /// cannot have lost its answer: the miss is not sent again (a duplicate the
    /// front-end might walk after the guest unmapped the buffer).
    @Test func unrelatedEvictionDoesNotAnnounceAgain() throws {
        let d = try LiveDaemon()
        try d.deviceWithMemory("u", extra: #","translator":"external","iotlb_max_entries":1"#)
        let desc: UInt64 = 0x20000
        _ = try d.expect(200, "PUT", "/v1/devices/u/vrings/1",
                         #"{"num":16,"desc_addr":"\#(hexText(desc + Self.off))","avail_addr":"\#(hexText(desc + 0x1000 + Self.off))","used_addr":"\#(hexText(desc + 0x2000 + Self.off))"}"#)
        let first = misses(try d.expect(200, "GET", "/v1/devices/u/iotlb/misses?after=0&timeout_ms=1000"))
        guard case .int(let seq)? = first.first?["seq"] else { Issue.record("no miss"); return }
        let rep = try d.expect(200, "POST", "/v1/devices/u/iotlb/updates", #"""
            {"entries":[{"iova":"0x900000000","size":4096,"uaddr":"0x7f0000100000","perm":"rw"},
                        {"iova":"0x900001000","size":4096,"uaddr":"0x7f0000101000","perm":"rw"}]}
            """#)
        #expect(rep["evicted"] == 1 && rep["resolved_misses"] == 0)
        #expect(misses(try d.expect(200, "GET", "/v1/devices/u/iotlb/misses?after=\(seq)&timeout_ms=200")).isEmpty)
        #expect(try d.expect(200, "GET", "/v1/devices/u/iotlb/stats")["reannounced_misses"] == 0)
        #expect(try d.expect(200, "GET", "/v1/devices/u/vrings/1")["state"] == "waiting_iotlb")
    }

    @Test func vringValidation() throws {
        let d = try LiveDaemon()
        try d.deviceWithMemory("v")
        let before = try d.snapshot("v")
        let ok = #""desc_addr":4096,"avail_addr":8192,"used_addr":12288"#
        try d.expectError(400, "invalid_field", field: "num", "PUT", "/v1/devices/v/vrings/0", #"{"num":3,\#(ok)}"#)
        try d.expectError(400, "invalid_field", field: "num", "PUT", "/v1/devices/v/vrings/0", #"{"num":65536,\#(ok)}"#)
        try d.expectError(400, "invalid_field", field: "num", "PUT", "/v1/devices/v/vrings/0", #"{"num":0,\#(ok)}"#)
        try d.expectError(400, "invalid_field", field: "desc_addr", "PUT", "/v1/devices/v/vrings/0",
                          #"{"num":8,"desc_addr":8,"avail_addr":8192,"used_addr":12288}"#)
        try d.expectError(400, "invalid_field", field: "avail_addr", "PUT", "/v1/devices/v/vrings/0",
                          #"{"num":8,"desc_addr":4096,"avail_addr":8193,"used_addr":12288}"#)
        try d.expectError(400, "invalid_field", field: "used_addr", "PUT", "/v1/devices/v/vrings/0",
                          #"{"num":8,"desc_addr":4096,"avail_addr":8192,"used_addr":12290}"#)
        try d.expectError(400, "invalid_field", field: "used_addr", "PUT", "/v1/devices/v/vrings/0",
                          #"{"num":8,"desc_addr":4096,"avail_addr":8192,"used_addr":"0xfffffffffffffff0"}"#)
        try d.expectError(400, "invalid_field", field: "enabled", "PUT", "/v1/devices/v/vrings/0", #"{"num":8,\#(ok),"enabled":"yes"}"#)
        try d.expectError(400, "invalid_field", field: "in_order", "PUT", "/v1/devices/v/vrings/0", #"{"num":8,\#(ok),"in_order":1}"#)
        try d.expectError(400, "unknown_field", field: "size", "PUT", "/v1/devices/v/vrings/0", #"{"num":8,\#(ok),"size":1}"#)
        try d.expectError(404, "not_found", "PUT", "/v1/devices/v/vrings/2", #"{"num":8,\#(ok)}"#)
        try d.expectError(404, "not_found", "GET", "/v1/devices/v/vrings/x")
        try d.expectError(404, "not_found", "GET", "/v1/devices/v/vrings/-1")
        #expect(try d.snapshot("v") == before)
        let v = try d.expect(200, "GET", "/v1/devices/v/vrings/1")
        #expect(v["state"] == "disabled" && v["index"] == 1 && v["num"] == 0)
        let set = try d.expect(200, "PUT", "/v1/devices/v/vrings/0", #"{"num":8,\#(ok),"enabled":false}"#)
        #expect(set["state"] == "disabled" && set["num"] == 8 && set["desc_addr"] == "0x1000" && set["in_order"] == false)
        #expect(try d.expect(200, "PUT", "/v1/devices/v/vrings/0", #"{"num":8,\#(ok),"enabled":false,"in_order":true}"#)["in_order"] == true)
    }

    @Test func missesResolvedByUpdatesThroughHTTP() throws {
        let d = try LiveDaemon()
        let (_, rx, tx) = try setUp(d)
        #expect(try d.expect(200, "PUT", "/v1/devices/q/vrings/0", vringBody(rx))["state"] == "waiting_iotlb")
        let v1 = try d.expect(200, "PUT", "/v1/devices/q/vrings/1", vringBody(tx))
        #expect(v1["state"] == "waiting_iotlb")
        #expect(v1["pending_miss"]?["iova"] == .string(hexText(0x20000 + Self.off)))
        let polled = try d.expect(200, "GET", "/v1/devices/q/iotlb/misses")
        let evs = misses(polled)
        #expect(evs.count == 2)
        #expect(evs.map { $0["vq"] } == [0, 1] && evs.map { $0["type"] } == ["miss", "miss"])
        #expect(evs.map { $0["perm"] } == ["ro", "ro"] && evs.map { $0["device"] } == ["q", "q"])
        #expect(evs[0]["iova"] == .string(hexText(0x10000 + Self.off)))
        #expect(polled["last_seq"] == evs[1]["seq"])
        #expect(try d.expect(200, "GET", "/v1/devices/q/iotlb/stats")["pending_misses"] == 2)
        // The cursor: nothing after the last seq; limit 1 gives the first.
        #expect(misses(try d.expect(200, "GET", "/v1/devices/q/iotlb/misses?after=\(evs[1]["seq"]!.text)")).isEmpty)
        #expect(misses(try d.expect(200, "GET", "/v1/devices/q/iotlb/misses?limit=1")).count == 1)
        // A read-only update covering TX's desc table resolves TX's miss (it needs ro).
        let r = try map(d, "q", 0x20000, 0x1000, "ro")
        #expect(r["resolved_misses"] == 1)
        try map(d, "q", 0x10000, 0x20000)  // everything else, rings and RX
        try map(d, "q", 0x100000, 0x100000)
        let deadline = Date().addingTimeInterval(2)
        while Date() < deadline, try d.expect(200, "GET", "/v1/devices/q/iotlb/stats")["pending_misses"] != 0 {
            usleep(1000)
        }
        #expect(try d.expect(200, "GET", "/v1/devices/q/vrings/0")["state"] == "running")
        #expect(try d.expect(200, "GET", "/v1/devices/q/vrings/1")["state"] == "running")
        let stats = try d.expect(200, "GET", "/v1/devices/q/iotlb/stats")
        #expect(stats["miss_resolution_us"]?["count"] != 0)
        guard case .array(let vqs)? = stats["vqs"] else { Issue.record("no vqs"); return }
        #expect(vqs.count == 2 && vqs[1]["misses"] != 0)
    }

    @Test func longPollTimesOutAndWakes() throws {
        let d = try LiveDaemon()
        let (_, rx, _) = try setUp(d)
        let t0 = Date()
        let empty = try d.expect(200, "GET", "/v1/devices/q/iotlb/misses?timeout_ms=300")
        #expect(Date().timeIntervalSince(t0) >= 0.29)
        #expect(misses(empty).isEmpty && empty["last_seq"] == 0)
        // A waiter is woken by the miss a vring set posts.
        let port = d.daemon.port
        let got = Locked<(JSON, Double)?>(nil)
        let done = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            let c = HTTPClient(port: port)
            let start = Date()
            let a = try? c.request("GET", "/v1/devices/q/iotlb/misses?timeout_ms=20000")
            got.withLock { $0 = (a?.json ?? .null, Date().timeIntervalSince(start)) }
            done.signal()
        }
        usleep(200_000)
        try d.expect(200, "PUT", "/v1/devices/q/vrings/0", vringBody(rx))
        #expect(done.wait(timeout: .now() + 5) == .success)
        let (j, took) = try #require(got.withLock { $0 })
        #expect(misses(j).count == 1 && took < 5)
    }

    @Test func hundredsOfWaitersWokenByOneMiss() throws {
        let d = try LiveDaemon()
        let (_, rx, _) = try setUp(d)
        let n = 200
        let port = d.daemon.port
        let answered = Locked(0)
        let group = DispatchGroup()
        for _ in 0..<n {
            group.enter()
            Thread.detachNewThread {
                let c = HTTPClient(port: port)
                if let a = try? c.request("GET", "/v1/devices/q/iotlb/misses?timeout_ms=30000"), a.status == 200,
                   case .array(let m)? = a.json["misses"], m.count == 1 {
                    answered.withLock { $0 += 1 }
                }
                group.leave()
            }
        }
        // Wait until every poller is parked on the daemon.
        let deadline = Date().addingTimeInterval(10)
        while d.daemon.server.suspendedConnections < n && Date() < deadline { usleep(5000) }
        #expect(d.daemon.server.suspendedConnections == n)
        try d.expect(200, "PUT", "/v1/devices/q/vrings/0", vringBody(rx))
        #expect(group.wait(timeout: .now() + 10) == .success)
        #expect(answered.withLock { $0 } == n)
    }

    @Test func deletingTheDeviceReleasesWaiters() throws {
        let d = try LiveDaemon()
        _ = try setUp(d)
        let port = d.daemon.port
        let status = Locked<Int?>(nil)
        let done = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            let a = try? HTTPClient(port: port).request("GET", "/v1/devices/q/iotlb/misses?timeout_ms=30000")
            status.withLock { $0 = a?.status }
            done.signal()
        }
        usleep(200_000)
        try d.expect(204, "DELETE", "/v1/devices/q")
        #expect(done.wait(timeout: .now() + 5) == .success)
        #expect(status.withLock { $0 } == 404)
    }

    @Test func accessFailureAndRecoveryThroughHTTP() throws {
        let d = try LiveDaemon()
        let (_, rx, tx) = try setUp(d)
        let used = tx.layout.usedGPA.raw
        try map(d, "q", 0, used)
        try map(d, "q", used, 0x1000, "ro")
        try map(d, "q", used + 0x1000, 0x400000)
        try d.expect(200, "PUT", "/v1/devices/q/vrings/0", vringBody(rx))
        let v = try d.expect(200, "PUT", "/v1/devices/q/vrings/1", vringBody(tx))
        #expect(v["state"] == "failed" && v["pending_miss"]?["type"] == "access_fail")
        let evs = misses(try d.expect(200, "GET", "/v1/devices/q/iotlb/misses"))
        #expect(evs.count == 1 && evs[0]["type"] == "access_fail" && evs[0]["perm"] == "wo" && evs[0]["vq"] == 1)
        #expect(try d.expect(200, "GET", "/v1/devices/q/iotlb/stats")["access_failures"] == 1)
        #expect(try d.expect(200, "GET", "/v1/devices/q/vrings/0")["state"] == "running")
        try map(d, "q", used, 0x1000, "rw")
        #expect(try d.expect(200, "PUT", "/v1/devices/q/vrings/1", vringBody(tx))["state"] == "running")
        #expect(misses(try d.expect(200, "GET", "/v1/devices/q/iotlb/misses")).isEmpty)
    }

    @Test func longPollArgumentsAreChecked() throws {
        let d = try LiveDaemon()
        try d.expect(201, "POST", "/v1/devices", #"{"id":"a"}"#)
        try d.expectError(400, "invalid_field", field: "timeout_ms", "GET", "/v1/devices/a/iotlb/misses?timeout_ms=60001")
        try d.expectError(400, "invalid_field", field: "limit", "GET", "/v1/devices/a/iotlb/misses?limit=0")
        try d.expectError(400, "invalid_field", field: "after", "GET", "/v1/devices/a/iotlb/misses?after=-1")
        try d.expectError(400, "unknown_field", field: "since", "GET", "/v1/devices/a/iotlb/misses?since=1")
        try d.expectError(404, "not_found", "GET", "/v1/devices/b/iotlb/misses")
    }
}
