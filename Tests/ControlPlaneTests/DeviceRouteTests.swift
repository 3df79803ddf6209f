import ControlPlane
import Glibc
import HTTPClient
import JSON
import Platform
import Testing

@Suite struct DeviceRouteTests {
    @Test func healthAndUnknownRoutes() throws {
        let d = try LiveDaemon()
        #expect(try d.expect(200, "GET", "/healthz") == ["status": "ok"])
        try d.expectError(404, "not_found", "GET", "/v1/nothing")
        try d.expectError(405, "method_not_allowed", "PATCH", "/v1/devices")
        #expect(try d.call("PATCH", "/healthz").headers["allow"] == "GET")
    }

    @Test func createListGetDelete() throws {
        let d = try LiveDaemon()
        let created = try d.expect(201, "POST", "/v1/devices", "{}")
        #expect(created["id"] == "dev0")
        #expect(created["queues"] == 2 && created["iotlb"] == true && created["iotlb_max_entries"] == 2048)
        #expect(created["backend"] == "loopback" && created["translator"] == "builtin")
        #expect(created["mem_table"] == .null)
        guard case .array(let vrings)? = created["vrings"] else { Issue.record("no vrings"); return }
        #expect(vrings.map { $0["index"] } == [0, 1] && vrings.allSatisfy { $0["state"] == "disabled" })
        let custom = try d.expect(201, "POST", "/v1/devices",
                                  #"{"id":"nic-1","queues":4,"iotlb":false,"iotlb_max_entries":16,"backend":"sink","translator":"external"}"#)
        #expect(custom["queues"] == 4 && custom["iotlb"] == false && custom["iotlb_max_entries"] == 16)
        #expect(custom["backend"] == "sink" && custom["translator"] == "external")
        try d.expect(201, "POST", "/v1/devices", "")  // an empty body means all defaults
        let list = try d.expect(200, "GET", "/v1/devices")
        guard case .array(let devices)? = list["devices"] else { Issue.record("no list"); return }
        #expect(devices.map { $0["id"] } == ["dev0", "nic-1", "dev1"])
        #expect(try d.expect(200, "GET", "/v1/devices/nic-1")["translator"] == "external")
        try d.expect(204, "DELETE", "/v1/devices/nic-1")
        try d.expectError(404, "not_found", "GET", "/v1/devices/nic-1")
        try d.expectError(404, "not_found", "DELETE", "/v1/devices/nic-1")
    }

    @Test("POST of an id being deleted waits until it is gone and creates it: no 409")
    func createAfterDeleteOfTheSameId() throws {
        let d = try LiveDaemon()
        for round in 0..<5 {
            try d.expect(201, "POST", "/v1/devices", #"{"id":"again"}"#)
            try d.expect(200, "PUT", "/v1/devices/again/workload", #"{"mapping":"dynamic"}"#)
            let port = d.daemon.port
            let deleted = Locked<Int?>(nil)
            let t = startThread(name: "delete") {
                let status = (try? HTTPClient(port: port).request("DELETE", "/v1/devices/again"))?.status
                deleted.withLock { $0 = status }
            }
            // Gone from the list at once; its id comes free once the guest stopped.
            #expect(eventually { (try? d.call("GET", "/v1/devices/again"))?.status == 404 })
            let created = try d.call("POST", "/v1/devices", #"{"id":"again"}"#)
            #expect(created.status == 201, "round \(round): \(created.text)")
            pthread_join(t, nil)
            #expect(deleted.withLock { $0 } == 204)
            try d.expect(204, "DELETE", "/v1/devices/again")
        }
    }

    @Test func createRefusalsChangeNothing() throws {
        let d = try LiveDaemon()
        try d.expect(201, "POST", "/v1/devices", #"{"id":"a"}"#)
        let before = try d.snapshot("a")
        try d.expectError(409, "conflict", "POST", "/v1/devices", #"{"id":"a"}"#)
        try d.expectError(400, "invalid_field", field: "id", "POST", "/v1/devices", #"{"id":"no spaces"}"#)
        try d.expectError(400, "invalid_field", field: "id", "POST", "/v1/devices", #"{"id":7}"#)
        try d.expectError(400, "invalid_field", field: "queues", "POST", "/v1/devices", #"{"queues":0}"#)
        try d.expectError(400, "invalid_field", field: "queues", "POST", "/v1/devices", #"{"queues":"2"}"#)
        try d.expectError(400, "invalid_field", field: "iotlb", "POST", "/v1/devices", #"{"iotlb":1}"#)
        try d.expectError(400, "invalid_field", field: "iotlb_max_entries", "POST", "/v1/devices", #"{"iotlb_max_entries":0}"#)
        try d.expectError(400, "invalid_field", field: "backend", "POST", "/v1/devices", #"{"backend":"tap"}"#)
        try d.expectError(400, "invalid_field", field: "translator", "POST", "/v1/devices", #"{"translator":"qemu"}"#)
        try d.expectError(400, "unknown_field", field: "colour", "POST", "/v1/devices", #"{"colour":"red"}"#)
        try d.expectError(400, "invalid_field", field: "body", "POST", "/v1/devices", #"[1,2]"#)
        try d.expectError(400, "bad_json", "POST", "/v1/devices", #"{"id":"#)
        try d.expectError(400, "bad_json", "POST", "/v1/devices", #"{"id":"x","id":"y"}"#)
        #expect(try d.snapshot("a") == before)
    }

    @Test func badJSONSaysWhere() throws {
        let d = try LiveDaemon()
        let j = try d.expect(400, "POST", "/v1/devices", "{\n  \"id\": \"x\",\n  oops\n}")
        guard case .string(let m)? = j["error"]?["message"] else { Issue.record("no message"); return }
        #expect(m.contains("line 3"), "\(m)")
    }

    @Test func memTableSetGetAndRefusals() throws {
        let d = try LiveDaemon()
        try d.expect(201, "POST", "/v1/devices", #"{"id":"m"}"#)
        try d.expectError(409, "no_mem_table", "GET", "/v1/devices/m/mem-table")
        let table = #"{"regions":[{"guest_phys_addr":"0x100000","memory_size":4096,"userspace_addr":"0x7f0000000000"},{"guest_phys_addr":0,"memory_size":"8192","userspace_addr":"0x7f0000100000"}]}"#
        let set = try d.expect(200, "PUT", "/v1/devices/m/mem-table", table)
        let want: JSON = ["regions": [
            ["guest_phys_addr": "0x100000", "memory_size": "0x1000", "userspace_addr": "0x7f0000000000"],
            ["guest_phys_addr": "0x0", "memory_size": "0x2000", "userspace_addr": "0x7f0000100000"]]]
        #expect(set == want)
        #expect(try d.expect(200, "GET", "/v1/devices/m/mem-table") == want)
        #expect(try d.expect(200, "GET", "/v1/devices/m")["mem_table"] == want)
        let before = try d.snapshot("m")
        func region(_ g: String, _ s: String, _ u: String) -> String {
            #"{"guest_phys_addr":\#(g),"memory_size":\#(s),"userspace_addr":\#(u)}"#
        }
        try d.expectError(422, "invalid_mem_table", field: "regions[1].guest_phys_addr", "PUT", "/v1/devices/m/mem-table",
                          #"{"regions":[\#(region("0", "8192", "0")),\#(region("4096", "1", "65536"))]}"#)
        try d.expectError(422, "invalid_mem_table", field: "regions[1].userspace_addr", "PUT", "/v1/devices/m/mem-table",
                          #"{"regions":[\#(region("0", "8192", "0")),\#(region("65536", "1", "4095"))]}"#)
        try d.expectError(422, "invalid_mem_table", field: "regions", "PUT", "/v1/devices/m/mem-table", #"{"regions":[]}"#)
        let many = (0..<65).map { region("\($0 * 4096)", "4096", "\($0 * 4096)") }.joined(separator: ",")
        try d.expectError(422, "invalid_mem_table", field: "regions", "PUT", "/v1/devices/m/mem-table", #"{"regions":[\#(many)]}"#)
        try d.expectError(422, "range_overflow", field: "regions[0].memory_size", "PUT", "/v1/devices/m/mem-table",
                          #"{"regions":[\#(region("0", "0", "0"))]}"#)
        try d.expectError(422, "range_overflow", field: "regions[0].memory_size", "PUT", "/v1/devices/m/mem-table",
                          #"{"regions":[\#(region("\"0xffffffffffffffff\"", "2", "0"))]}"#)
        try d.expectError(422, "invalid_mem_table", field: "regions", "PUT", "/v1/devices/m/mem-table",
                          #"{"regions":[\#(region("0", "\"0x400000000000\"", "0"))]}"#)
        try d.expectError(400, "invalid_field", field: "regions[0].memory_size", "PUT", "/v1/devices/m/mem-table",
                          #"{"regions":[\#(region("0", "-1", "0"))]}"#)
        try d.expectError(400, "invalid_field", field: "regions[0].userspace_addr", "PUT", "/v1/devices/m/mem-table",
                          #"{"regions":[{"guest_phys_addr":0,"memory_size":1}]}"#)
        try d.expectError(400, "unknown_field", field: "regions[0].flags", "PUT", "/v1/devices/m/mem-table",
                          #"{"regions":[{"guest_phys_addr":0,"memory_size":1,"userspace_addr":0,"flags":1}]}"#)
        try d.expectError(400, "invalid_field", field: "regions", "PUT", "/v1/devices/m/mem-table", #"{"regions":{}}"#)
        try d.expectError(400, "bad_json", "PUT", "/v1/devices/m/mem-table", "")
        try d.expectError(404, "not_found", "PUT", "/v1/devices/none/mem-table", table)
        #expect(try d.snapshot("m") == before)
        #expect(try d.expect(200, "GET", "/v1/devices/m/mem-table") == want)
    }

    @Test func authGuardsV1Only() throws {
        let d = try LiveDaemon(token: "s3cret")
        let anon = HTTPClient(port: d.daemon.port)
        #expect(try anon.request("GET", "/healthz").status == 200)
        let denied = try anon.request("GET", "/v1/devices")
        #expect(denied.status == 401 && denied.json["error"]?["code"] == "unauthorized")
        #expect(try anon.request("POST", "/v1/devices", text: "{}", ).status == 401)
        let wrong = try anon.request("GET", "/v1/devices", headers: [("Authorization", "Bearer s3creT")])
        #expect(wrong.status == 401)
        #expect(try d.call("GET", "/v1/devices").status == 200)
        #expect(try d.call("GET", "/v1/devices").json == ["devices": []])
    }

    @Test func bodyLimit() throws {
        let d = try LiveDaemon(maxBodyBytes: 2048)
        try d.expect(201, "POST", "/v1/devices", #"{"id":"b"}"#)
        let before = try d.snapshot("b")
        let big = #"{"entries":["# + Array(repeating: #"{"iova":0,"size":1,"uaddr":0,"perm":"rw"}"#, count: 100)
            .joined(separator: ",") + "]}"
        try d.expectError(413, "payload_too_large", "POST", "/v1/devices/b/iotlb/updates", big)
        #expect(try d.snapshot("b") == before)
    }

    @Test func connectionLimitAnswers503() throws {
        let d = try LiveDaemon(maxConnections: 1)
        let holder = HTTPClient(port: d.daemon.port)
        #expect(try holder.request("GET", "/healthz").status == 200)  // keeps its connection open
        let other = HTTPClient(port: d.daemon.port)
        let a = try other.request("GET", "/healthz")
        #expect(a.status == 503 && a.json["error"]?["code"] == "unavailable")
        holder.close()
    }
}
