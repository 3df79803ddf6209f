import ControlPlane
import Dispatch
import Foundation
import HTTPClient
import Testing

/// What operators' dashboards and alerts read from /metrics beyond the IOTLB counters.
@Suite struct MetricsTests {
    /// The value of the sample `name{labels}` (labels as written), or nil.
    func sample(_ text: String, _ series: String) -> Double? {
        for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
            return Double(line.dropFirst(series.count + 1))
        }
        return nil
    }

    @Test func waitingQueueBuildInfoProcessAndLongPolls() throws {
        let d = try LiveDaemon()
        try d.deviceWithMemory("w", extra: #","translator":"external""#)
        // Rings nobody mapped: queue 1 waits for the translation from the moment it is set.
        let v = try d.expect(200, "PUT", "/v1/devices/w/vrings/1",
                             #"{"num":16,"desc_addr":"0x40010000","avail_addr":"0x40011000","used_addr":"0x40012000"}"#)
        #expect(v["state"] == "waiting_iotlb")
        // A long-poll parked on another device (no events there).
        try d.expect(201, "POST", "/v1/devices", #"{"id":"lp","translator":"external"}"#)
        let parked = DispatchSemaphore(value: 0)
        let port = d.daemon.port
        DispatchQueue.global().async {
            _ = try? HTTPClient(port: port).request("GET", "/v1/devices/lp/iotlb/misses?timeout_ms=30000")
            parked.signal()
        }
        var text = ""
        for _ in 0..<100 {  // until the poll is parked (the machine may be busy)
            text = try d.call("GET", "/metrics").text
            if sample(text, "iotlbd_http_long_polls_waiting") == 1 { break }
            Thread.sleep(forTimeInterval: 0.05)
        }
        let waited = try #require(sample(text, #"iotlbd_vq_waiting_seconds{device="w",vq="1"}"#))
        #expect(waited > 0 && waited < 60)
        Thread.sleep(forTimeInterval: 0.2)
        let later = try #require(sample(try d.call("GET", "/metrics").text, #"iotlbd_vq_waiting_seconds{device="w",vq="1"}"#))
        #expect(later >= waited + 0.2)
        #expect(sample(text, #"iotlbd_vq_waiting_seconds{device="w",vq="0"}"#) == 0)
        #expect(sample(text, "iotlbd_http_long_polls_waiting") == 1)
        #expect(text.contains(#"iotlbd_build_info{version="\#(BuildInfo.version)",commit=""#))
        #expect(try #require(sample(text, "process_open_fds")) > 3.0)
        #expect(try #require(sample(text, "process_resident_memory_bytes")) > 1e6)
        #expect(try #require(sample(text, "process_cpu_seconds_total")) > 0.0)
        let start = try #require(sample(text, "process_start_time_seconds"))
        #expect(abs(start - Date().timeIntervalSince1970) < 3600)
        #expect(try #require(sample(text, "process_max_fds")) >= 1024.0)
        // Mapped: the queue runs and no longer counts as waiting.
        try d.expect(200, "POST", "/v1/devices/w/iotlb/updates",
                     #"{"iova":"0x40010000","size":"0x3000","uaddr":"0x7f0000010000","perm":"rw"}"#)
        let after = try d.call("GET", "/metrics").text
        #expect(sample(after, #"iotlbd_vq_waiting_seconds{device="w",vq="1"}"#) == 0)
        // Deleting its device releases the poll.
        try d.expect(204, "DELETE", "/v1/devices/lp")
        parked.wait()
        #expect(sample(try d.call("GET", "/metrics").text, "iotlbd_http_long_polls_waiting") == 0)
    }
}
