import ControlPlane
import Foundation
import JSON
import Testing

/// The built-in guest through HTTP: every page size × mapping × IOTLB on/off.
@Suite struct WorkloadRouteTests {
    struct Combo: CustomStringConvertible, Sendable {
        var page: String
        var mapping: String
        var iotlb: Bool
        var description: String { "\(page)/\(mapping)/iotlb \(iotlb ? "on" : "off")" }
    }

    static let combos: [Combo] = ["4k", "2m", "1g"].flatMap { p in
        ["static", "dynamic"].flatMap { m in [true, false].map { Combo(page: p, mapping: m, iotlb: $0) } }
    }

    /// Waits for the workload to reach `done`; returns its final figures.
    func runToEnd(_ d: LiveDaemon, _ id: String, timeout: Double = 60) throws -> JSON {
        let deadline = Date().addingTimeInterval(timeout)
        var w = try d.expect(200, "GET", "/v1/devices/\(id)/workload")
        while w["state"] != "done" && Date() < deadline {
            usleep(20_000)
            w = try d.expect(200, "GET", "/v1/devices/\(id)/workload")
        }
        #expect(w["state"] == "done", "\(w.text)")
        return try d.expect(200, "DELETE", "/v1/devices/\(id)/workload")
    }

    @Test(arguments: combos)
    func everyCombinationVerifiesEveryByte(_ c: Combo) throws {
        let d = try LiveDaemon()
        let frames = c.mapping == "dynamic" ? 3000 : 20000
        try d.expect(201, "POST", "/v1/devices", #"{"id":"w","iotlb":\#(c.iotlb)}"#)
        let started = try d.expect(200, "PUT", "/v1/devices/w/workload",
                                   #"{"packet_size":64,"page_size":"\#(c.page)","mapping":"\#(c.mapping)","packets":\#(frames),"ring_size":64}"#)
        #expect(started["state"] == "running" || started["state"] == "done")
        let final = try runToEnd(d, "w")
        #expect(final["received"] == .int(Int64(frames)) && final["sent"] == .int(Int64(frames)), "\(c): \(final.text)")
        #expect(final["verify_errors"] == 0, "\(c): \(final.text)")
        let stats = try d.expect(200, "GET", "/v1/devices/w/iotlb/stats")
        if c.iotlb {
            guard case .double(let rate)? = stats["hit_rate"] else { Issue.record("no hit rate"); return }
            if c.mapping == "static" {
                #expect(rate >= 0.99, "\(c): hit rate \(rate)")
                #expect(final["invalidations"] == 0)
            } else {
                #expect(final["invalidations"] != 0, "\(c): dynamic mappings must invalidate")
                #expect(stats["invalidations"] != 0)
            }
        } else {
            #expect(stats["hits"] == 0 && stats["misses"] == 0)
        }
    }

    @Test func largeFramesAndEagerDynamic() throws {
        let d = try LiveDaemon()
        try d.expect(201, "POST", "/v1/devices", #"{"id":"e"}"#)
        try d.expect(200, "PUT", "/v1/devices/e/workload",
                     #"{"packet_size":9000,"page_size":"4k","mapping":"dynamic","packets":2000,"ring_size":32,"eager":true}"#)
        let final = try runToEnd(d, "e")
        #expect(final["received"] == 2000 && final["verify_errors"] == 0, "\(final.text)")
        #expect(final["eager_updates"] != 0)
        // Eager pushes mean the rings aside, buffers do not miss.
        let stats = try d.expect(200, "GET", "/v1/devices/e/iotlb/stats")
        guard case .int(let misses)? = stats["misses"] else { Issue.record("no misses"); return }
        #expect(misses < 20, "\(stats.text)")
    }

    @Test("an eager push the device refuses is counted, not dropped")
    func refusedEagerPushesAreCounted() throws {
        let d = try LiveDaemon()
        // Moving the memory table gives the device other memory: the guest's pushes then name user addresses
        // no longer backed and are refused, but the device's queues fail on the moved rings at once. So a push
        // follows the move only when the guest held buffers it got back (free, or awaiting an invalidation)
        // at that instant, not when every buffer was posted: most moves. Each attempt is a fresh device.
        var w: JSON = .null
        var counted = false
        for attempt in 1...6 where !counted {
            let id = "e\(attempt)"
            try d.expect(201, "POST", "/v1/devices", #"{"id":"\#(id)"}"#)
            try d.expect(200, "PUT", "/v1/devices/\(id)/workload",
                         #"{"page_size":"4k","mapping":"dynamic","ring_size":32,"eager":true}"#)
            #expect(try eventually { try d.expect(200, "GET", "/v1/devices/\(id)/workload")["received"] != 0 })
            w = try d.expect(200, "GET", "/v1/devices/\(id)/workload")
            #expect(w["eager_update_failures"] == 0 && w["invalidation_failures"] == 0, "\(w.text)")
            let region = try #require(d.expect(200, "GET", "/v1/devices/\(id)/mem-table")["regions"]?[0])
            let size = region["memory_size"]!.text
            try d.expect(200, "PUT", "/v1/devices/\(id)/mem-table",
                         #"{"regions":[{"guest_phys_addr":"0x0","memory_size":\#(size),"userspace_addr":"0x7e0000000000"}]}"#)
            counted = try eventually(2) {
                w = try d.expect(200, "GET", "/v1/devices/\(id)/workload")
                return (w["eager_update_failures"]?.intValue ?? 0) > 0
            }
            try d.expect(200, "DELETE", "/v1/devices/\(id)/workload")
            try d.expect(204, "DELETE", "/v1/devices/\(id)")
        }
        #expect(counted, "no refused push counted after 6 moves; last: \(w.text)")
    }

    @Test func externalTranslatorAnsweredOverHTTP() throws {
        let d = try LiveDaemon()
        try d.expect(201, "POST", "/v1/devices", #"{"id":"x","translator":"external"}"#)
        try d.expect(200, "PUT", "/v1/devices/x/workload",
                     #"{"packet_size":64,"page_size":"4k","mapping":"dynamic","packets":500,"ring_size":16}"#)
        // The orchestrator: long-poll misses, ask the guest IOMMU, answer with an update.
        var cursor: Int64 = 0
        var answered = 0
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline {
            if try d.expect(200, "GET", "/v1/devices/x/workload")["state"] == "done" { break }
            let polled = try d.expect(200, "GET", "/v1/devices/x/iotlb/misses?after=\(cursor)&timeout_ms=200")
            guard case .array(let misses)? = polled["misses"] else { continue }
            for m in misses {
                guard case .int(let seq)? = m["seq"], case .string(let iova)? = m["iova"] else { continue }
                cursor = max(cursor, seq)
                let page = try d.call("GET", "/v1/devices/x/guest-iommu/translate?iova=\(iova)")
                guard page.status == 200 else { continue }
                let p = page.json
                let body: JSON = ["iova": p["iova"]!, "size": p["size"]!, "uaddr": p["uaddr"]!, "perm": p["perm"]!]
                let r = try d.client.request("POST", "/v1/devices/x/iotlb/updates", json: body)
                #expect(r.status == 200, "\(r.text)")
                answered += 1
            }
        }
        let final = try runToEnd(d, "x", timeout: 5)
        #expect(final["received"] == 500 && final["verify_errors"] == 0, "\(final.text)")
        #expect(answered > 10)
        #expect(final["translator_answers"] == 0)
    }

    @Test func workloadRefusalsAndGuestIOMMUView() throws {
        let d = try LiveDaemon()
        try d.expect(201, "POST", "/v1/devices", #"{"id":"r"}"#)
        try d.expectError(404, "not_found", "GET", "/v1/devices/r/workload")
        try d.expectError(404, "not_found", "DELETE", "/v1/devices/r/workload")
        try d.expectError(404, "not_found", "GET", "/v1/devices/r/guest-iommu/translate?iova=0")
        try d.expectError(400, "invalid_field", field: "packet_size", "PUT", "/v1/devices/r/workload", #"{"packet_size":63}"#)
        try d.expectError(400, "invalid_field", field: "page_size", "PUT", "/v1/devices/r/workload", #"{"page_size":"16k"}"#)
        try d.expectError(400, "invalid_field", field: "mapping", "PUT", "/v1/devices/r/workload", #"{"mapping":"lazy"}"#)
        try d.expectError(400, "invalid_field", field: "ring_size", "PUT", "/v1/devices/r/workload", #"{"ring_size":100}"#)
        try d.expectError(400, "unknown_field", field: "speed", "PUT", "/v1/devices/r/workload", #"{"speed":1}"#)
        try d.expect(200, "PUT", "/v1/devices/r/workload", #"{"page_size":"2m"}"#)
        try d.expectError(409, "conflict", "PUT", "/v1/devices/r/workload", "{}")
        // The guest IOMMU maps its rings and buffers at 0x1000000000 + GPA, in 2 MiB pages clipped to memory.
        let v = try d.expect(200, "GET", "/v1/devices/r/guest-iommu/translate?iova=0x1000000010")
        #expect(v["iova"] == "0x1000000000" && v["gpa"] == "0x0" && v["uaddr"] == "0x7f0000000000" && v["size"] == "0x200000")
        try d.expectError(404, "not_found", field: "iova", "GET", "/v1/devices/r/guest-iommu/translate?iova=0x10")
        let w = try d.expect(200, "GET", "/v1/devices/r/workload")
        #expect(w["state"] == "running")
        let stopped = try d.expect(200, "DELETE", "/v1/devices/r/workload")
        #expect(stopped["state"] == "stopped" && stopped["verify_errors"] == 0)
        // Deleting a device with a running workload stops it first.
        try d.expect(200, "PUT", "/v1/devices/r/workload", "{}")
        try d.expect(204, "DELETE", "/v1/devices/r")
    }
}
