import ControlPlane
import Foundation
import Testing

/// Small IOTLBs never stall: a working set (rings and 2 × 256 in-flight
/// buffers, each in its own 4 KiB IOVA page) far larger than the IOTLB still
/// moves frames in every one-second window, every byte verified.
@Suite struct PressureTests {
    struct Case: CustomStringConvertible, Sendable {
        var entries: Int
        var packet: Int
        var description: String { "\(entries) entries, \(packet) B" }
    }

    static let cases = [16, 64, 256].flatMap { e in [64, 1500].map { Case(entries: e, packet: $0) } }

    func received(_ d: LiveDaemon) throws -> Int64 {
        let w = try d.expect(200, "GET", "/v1/devices/p/workload")
        #expect(w["verify_errors"] == 0, "\(w.text)")
        #expect(w["state"] == "running", "\(w.text)")
        guard case .int(let n)? = w["received"] else { return -1 }
        return n
    }

    @Test(arguments: cases)
    func dynamicMappingsMoveFramesEverySecond(_ c: Case) throws {
        let d = try LiveDaemon()
        try d.expect(201, "POST", "/v1/devices", #"{"id":"p","iotlb_max_entries":\#(c.entries)}"#)
        try d.expect(200, "PUT", "/v1/devices/p/workload",
                     #"{"packet_size":\#(c.packet),"page_size":"4k","mapping":"dynamic","ring_size":256}"#)
        var last = try received(d)
        var perWindow: [Int64] = []
        for _ in 0..<3 {
            Thread.sleep(forTimeInterval: 1)
            let now = try received(d)
            perWindow.append(now - last)
            last = now
        }
        #expect(perWindow.allSatisfy { $0 > 0 }, "\(c): frames per 1 s window \(perWindow)")
        let stats = try d.expect(200, "GET", "/v1/devices/p/iotlb/stats")
        guard case .int(let entries)? = stats["entries"], case .int(let evictions)? = stats["evictions"] else {
            Issue.record("no stats"); return
        }
        #expect(entries <= c.entries, "\(c): \(stats.text)")
        #expect(evictions > 0, "\(c): the working set must outgrow the IOTLB: \(stats.text)")
        #expect(stats["pending_misses"] == 0 || stats["access_failures"] == 0, "\(c): \(stats.text)")
        let final = try d.expect(200, "DELETE", "/v1/devices/p/workload")
        #expect(final["verify_errors"] == 0, "\(c): \(final.text)")
    }
}
