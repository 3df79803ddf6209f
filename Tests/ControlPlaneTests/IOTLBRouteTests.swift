import ControlPlane
import JSON
import Testing

@Suite struct IOTLBRouteTests {
    let map = #"{"iova":"0x1000","size":"0x2000","uaddr":"0x7f0000010000","perm":"rw"}"#

    /// `limit` and the `after` cursor page through the entries; every entry once, in order.
    @Test func entriesPageWithLimitAndCursor() throws {
        let d = try LiveDaemon()
        try d.deviceWithMemory("p")
        // 10 entries of 0x2000 bytes at 0x10000, 0x13000, ... (gaps between them).
        let items = (0..<10).map { i in
            #"{"iova":"0x\#(String(0x10000 + i * 0x3000, radix: 16))","size":"0x2000","uaddr":"0x7f0000010000","perm":"rw"}"#
        }
        try d.expect(200, "POST", "/v1/devices/p/iotlb/updates", #"{"entries":[\#(items.joined(separator: ","))]}"#)
        let all = try d.expect(200, "GET", "/v1/devices/p/iotlb/entries")
        #expect(all["next"] == nil)
        func list(_ j: JSON) -> [JSON] { if case .array(let a)? = j["entries"] { a } else { [] } }
        var pages: [[JSON]] = []
        var cursor: JSON? = nil
        repeat {
            let after = cursor.map { if case .string(let s) = $0 { "&after=\(s)" } else { "" } } ?? ""
            let page = try d.expect(200, "GET", "/v1/devices/p/iotlb/entries?limit=3\(after)")
            pages.append(list(page))
            cursor = page["next"]
        } while cursor != nil && pages.count < 10
        #expect(pages.map(\.count) == [3, 3, 3, 1])
        #expect(pages.flatMap { $0 } == list(all))
        // A cursor inside an entry skips that entry (it was on the page before).
        #expect(list(try d.expect(200, "GET", "/v1/devices/p/iotlb/entries?after=0x10001&limit=1")).first?["iova"] == "0x13000")
        // With a range: the cursor narrows it.
        let ranged = try d.expect(200, "GET", "/v1/devices/p/iotlb/entries?iova=0x13000&size=0x9000&limit=2")
        #expect(list(ranged).map { $0["iova"] } == ["0x13000", "0x16000"] && ranged["next"] == "0x16000")
        #expect(list(try d.expect(200, "GET", "/v1/devices/p/iotlb/entries?iova=0x13000&size=0x9000&after=0x16000"))
                .map { $0["iova"] } == ["0x19000"])
        #expect(list(try d.expect(200, "GET", "/v1/devices/p/iotlb/entries?after=0xffffffffffffffff")).isEmpty)
        try d.expectError(400, "invalid_field", field: "limit", "GET", "/v1/devices/p/iotlb/entries?limit=0")
        try d.expectError(400, "invalid_field", field: "limit", "GET", "/v1/devices/p/iotlb/entries?limit=65537")
        try d.expectError(400, "invalid_field", field: "after", "GET", "/v1/devices/p/iotlb/entries?after=x")
    }

    @Test func updateTranslateInvalidateFlush() throws {
        let d = try LiveDaemon()
        try d.deviceWithMemory("t")
        let one = try d.expect(200, "POST", "/v1/devices/t/iotlb/updates", map)
        #expect(one == ["applied": 1, "evicted": 0, "replaced": 0, "entries": 1, "resolved_misses": 0])
        let batch = try d.expect(200, "POST", "/v1/devices/t/iotlb/updates", #"""
            {"entries":[{"iova":"0x10000","size":4096,"uaddr":"0x7f0000020000","perm":"ro"},
                        {"iova":"0x20000","size":4096,"uaddr":"0x7f0000030000","perm":2},
                        {"iova":"0x2000","size":4096,"uaddr":"0x7f0000040000","perm":"rw"}]}
            """#)
        #expect(batch["applied"] == 3 && batch["replaced"] == 1 && batch["entries"] == 3)
        #expect(try d.expect(200, "GET", "/v1/devices/t/iotlb/entries") == ["entries": [
            ["iova": "0x2000", "size": "0x1000", "uaddr": "0x7f0000040000", "perm": "rw"],
            ["iova": "0x10000", "size": "0x1000", "uaddr": "0x7f0000020000", "perm": "ro"],
            ["iova": "0x20000", "size": "0x1000", "uaddr": "0x7f0000030000", "perm": "wo"]]])
        #expect(try d.expect(200, "GET", "/v1/devices/t/iotlb/translate?iova=0x10010&perm=ro") ==
                ["iova": "0x10010", "uaddr": "0x7f0000020010", "size": "0xff0", "perm": "ro"])
        #expect(try d.expect(200, "GET", "/v1/devices/t/iotlb/translate?iova=0x10010&perm=ro&size=16")["size"] == "0x10")
        try d.expectError(403, "access_denied", "GET", "/v1/devices/t/iotlb/translate?iova=0x10010&perm=wo")
        try d.expectError(403, "access_denied", "GET", "/v1/devices/t/iotlb/translate?iova=0x20000&perm=rw")
        try d.expectError(404, "iotlb_miss", "GET", "/v1/devices/t/iotlb/translate?iova=0x1000&perm=ro")
        #expect(try d.expect(200, "GET", "/v1/devices/t/iotlb/entries?iova=0xffff&size=2")["entries"] ==
                [["iova": "0x10000", "size": "0x1000", "uaddr": "0x7f0000020000", "perm": "ro"]])
        #expect(try d.expect(200, "GET", "/v1/devices/t/iotlb/entries?iova=0x10001")["entries"]
                .map { if case .array(let a) = $0 { a.count } else { -1 } } == 2)
        let inv = try d.expect(200, "POST", "/v1/devices/t/iotlb/invalidations", #"{"iova":"0x10fff","size":"0x10002"}"#)
        #expect(inv == ["removed": 2, "entries": 1])
        try d.expectError(404, "iotlb_miss", "GET", "/v1/devices/t/iotlb/translate?iova=0x20000&perm=wo")
        #expect(try d.expect(200, "POST", "/v1/devices/t/iotlb/invalidations",
                             #"{"entries":[{"iova":0,"size":1}]}"#) == ["removed": 0, "entries": 1])
        let stats = try d.expect(200, "GET", "/v1/devices/t/iotlb/stats")
        #expect(stats["entries"] == 1 && stats["max_entries"] == 2048 && stats["updates"] == 4)
        #expect(stats["invalidations"] == 2 && stats["evictions"] == 0)
        for key in ["hits", "misses", "hit_rate", "access_failures", "pending_misses", "miss_resolution_us", "vqs"] {
            #expect(stats[key] != nil, "stats lacks \(key)")
        }
        #expect(try d.expect(200, "DELETE", "/v1/devices/t/iotlb") == ["removed": 1, "entries": 0])
        #expect(try d.expect(200, "GET", "/v1/devices/t/iotlb/entries") == ["entries": []])
    }

    @Test func wholeSpaceAndTopOfSpace() throws {
        let d = try LiveDaemon()
        try d.expect(201, "POST", "/v1/devices", #"{"id":"w"}"#)
        try d.expect(200, "PUT", "/v1/devices/w/mem-table",
                     #"{"regions":[{"guest_phys_addr":0,"memory_size":4096,"userspace_addr":"0xfffffffffffff000"}]}"#)
        try d.expect(200, "POST", "/v1/devices/w/iotlb/updates",
                     #"{"iova":"0xfffffffffffff000","size":4096,"uaddr":"18446744073709547520","perm":"rw"}"#)
        #expect(try d.expect(200, "GET", "/v1/devices/w/iotlb/translate?iova=0xffffffffffffffff&perm=rw") ==
                ["iova": "0xffffffffffffffff", "uaddr": "0xffffffffffffffff", "size": "0x1", "perm": "rw"])
        #expect(try d.expect(200, "POST", "/v1/devices/w/iotlb/invalidations",
                             #"{"iova":"0xffffffffffffffff","size":1}"#)["removed"] == 1)
    }

    @Test func fifoEvictionThroughHTTP() throws {
        let d = try LiveDaemon()
        try d.deviceWithMemory("f", extra: #","iotlb_max_entries":2"#)
        for i in 0..<3 {
            let r = try d.expect(200, "POST", "/v1/devices/f/iotlb/updates",
                                 #"{"iova":\#(i * 4096),"size":4096,"uaddr":"0x7f0000000000","perm":"ro"}"#)
            #expect(r["evicted"] == (i == 2 ? 1 : 0))
        }
        try d.expectError(404, "iotlb_miss", "GET", "/v1/devices/f/iotlb/translate?iova=0&perm=ro")
        #expect(try d.expect(200, "GET", "/v1/devices/f/iotlb/stats")["evictions"] == 1)
    }

    @Test func refusedUpdatesChangeNothing() throws {
        let d = try LiveDaemon()
        try d.expect(201, "POST", "/v1/devices", #"{"id":"n"}"#)
        try d.expectError(409, "no_mem_table", "POST", "/v1/devices/n/iotlb/updates", map)
        try d.deviceWithMemory("r")
        try d.expect(200, "POST", "/v1/devices/r/iotlb/updates", map)
        let before = try d.snapshot("r")
        let u = "/v1/devices/r/iotlb/updates"
        func e(_ iova: String = "0", _ size: String = "4096", _ uaddr: String = "\"0x7f0000000000\"", _ perm: String = "\"rw\"") -> String {
            #"{"iova":\#(iova),"size":\#(size),"uaddr":\#(uaddr),"perm":\#(perm)}"#
        }
        // All or nothing: the first entry is fine, the second is not backed.
        try d.expectError(422, "uaddr_not_mapped", field: "entries[1].uaddr", "POST", u,
                          #"{"entries":[\#(e()),\#(e("8192", "4096", "\"0x7f0040000000\""))]}"#)
        try d.expectError(422, "uaddr_not_mapped", field: "uaddr", "POST", u, e("0", "4096", "\"0x7f003ffff001\""))
        try d.expectError(422, "range_overflow", field: "entries[0].size", "POST", u, #"{"entries":[\#(e("0", "0"))]}"#)
        try d.expectError(422, "range_overflow", field: "size", "POST", u, e("\"0xffffffffffffffff\"", "2"))
        try d.expectError(422, "range_overflow", field: "uaddr", "POST", u, e("0", "2", "\"0xffffffffffffffff\""))
        // Checked once, by the engine, before anything else about the device.
        try d.expectError(422, "range_overflow", field: "entries[1].uaddr", "POST", u,
                          #"{"entries":[\#(e()),\#(e("8192", "2", "\"0xffffffffffffffff\""))]}"#)
        try d.expect(201, "POST", "/v1/devices", #"{"id":"bare"}"#)
        try d.expectError(422, "range_overflow", field: "uaddr", "POST", "/v1/devices/bare/iotlb/updates",
                          e("0", "2", "\"0xffffffffffffffff\""))
        try d.expectError(409, "no_mem_table", "POST", "/v1/devices/bare/iotlb/updates", e())
        try d.expect(204, "DELETE", "/v1/devices/bare")
        try d.expectError(400, "invalid_field", field: "iova", "POST", u, e("-1"))
        try d.expectError(400, "invalid_field", field: "iova", "POST", u, e("1.5"))
        try d.expectError(400, "invalid_field", field: "iova", "POST", u, e("\"0x10000000000000000\""))
        try d.expectError(400, "invalid_field", field: "iova", "POST", u, e("\"18446744073709551616\""))
        try d.expectError(400, "invalid_field", field: "iova", "POST", u, e("\"0x\""))
        try d.expectError(400, "invalid_field", field: "iova", "POST", u, e("\"+5\""))
        try d.expectError(400, "invalid_field", field: "iova", "POST", u, e("\"12abc\""))
        try d.expectError(400, "invalid_field", field: "iova", "POST", u, e("true"))
        try d.expectError(400, "invalid_field", field: "perm", "POST", u, e("0", "1", "0", "\"x\""))
        try d.expectError(400, "invalid_field", field: "perm", "POST", u, e("0", "1", "0", "4"))
        try d.expectError(400, "invalid_field", field: "entries[2].perm", "POST", u,
                          #"{"entries":[\#(e()),\#(e()),{"iova":0,"size":1,"uaddr":0}]}"#)
        try d.expectError(400, "unknown_field", field: "entries[0].flags", "POST", u,
                          #"{"entries":[{"iova":0,"size":1,"uaddr":0,"perm":"ro","flags":0}]}"#)
        try d.expectError(400, "unknown_field", field: "extra", "POST", u, #"{"entries":[],"extra":1}"#)
        try d.expectError(400, "invalid_field", field: "entries", "POST", u, #"{"entries":5}"#)
        try d.expectError(400, "bad_json", "POST", u, #"{"iova":18446744073709551615,"size":1,"uaddr":0,"perm":"ro"}"#)
        try d.expectError(400, "bad_json", "POST", u, "not json")
        let inv = "/v1/devices/r/iotlb/invalidations"
        try d.expectError(422, "range_overflow", field: "size", "POST", inv, #"{"iova":0,"size":0}"#)
        try d.expectError(422, "range_overflow", field: "entries[1].size", "POST", inv,
                          #"{"entries":[{"iova":0,"size":4096},{"iova":"0xffffffffffffffff","size":2}]}"#)
        try d.expectError(400, "unknown_field", field: "uaddr", "POST", inv, #"{"iova":0,"size":1,"uaddr":0}"#)
        try d.expectError(400, "unknown_field", field: "iov", "GET", "/v1/devices/r/iotlb/entries?iov=1")
        try d.expectError(400, "invalid_field", field: "iova", "GET", "/v1/devices/r/iotlb/entries?iova=zz")
        try d.expectError(422, "range_overflow", field: "size", "GET", "/v1/devices/r/iotlb/entries?iova=1&size=0")
        try d.expectError(400, "invalid_field", field: "iova", "GET", "/v1/devices/r/iotlb/translate?perm=ro")
        try d.expectError(400, "invalid_field", field: "perm", "GET", "/v1/devices/r/iotlb/translate?iova=0")
        try d.expectError(400, "invalid_field", field: "perm", "GET", "/v1/devices/r/iotlb/translate?iova=0&perm=rx")
        try d.expectError(404, "not_found", "POST", "/v1/devices/zz/iotlb/updates", map)
        try d.expectError(404, "not_found", "GET", "/v1/devices/zz/iotlb/stats")
        #expect(try d.snapshot("r") == before)
    }

    @Test func iotlbOffDeviceRefusesIOTLBRoutes() throws {
        let d = try LiveDaemon()
        try d.deviceWithMemory("off", extra: #","iotlb":false"#)
        let before = try d.snapshot("off")
        try d.expectError(409, "conflict", "POST", "/v1/devices/off/iotlb/updates", map)
        try d.expectError(409, "conflict", "DELETE", "/v1/devices/off/iotlb")
        #expect(try d.snapshot("off") == before)
    }

    @Test func memTableReplacementFlushesIOTLB() throws {
        let d = try LiveDaemon()
        try d.deviceWithMemory("x")
        try d.expect(200, "POST", "/v1/devices/x/iotlb/updates", map)
        try d.expect(200, "PUT", "/v1/devices/x/mem-table",
                     #"{"regions":[{"guest_phys_addr":0,"memory_size":"0x100000","userspace_addr":"0x7f0000000000"}]}"#)
        #expect(try d.expect(200, "GET", "/v1/devices/x/iotlb/entries") == ["entries": []])
    }
}
