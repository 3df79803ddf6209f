// Control plane: the real HTTP server on loopback.
import ArgumentParser
import ControlPlane
import Foundation
import HTTP
import HTTPClient
import IOTLB
import JSON
import Vhost

struct ControlBench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "control",
                                                    abstract: "Update entries/s by batch size; miss round trip over HTTP.")

    @Option(help: "Batch sizes of updates.") var batches = "1,64,1024"
    @Option(help: "Seconds per batch size.") var seconds = 1.5
    @Option(help: "Miss round trips to make.") var roundTrips = 2000
    @OptionGroup var output: ReportOptions

    func run() throws {
        var options = ServerOptions()
        options.port = 0
        let daemon = Daemon(server: options)
        try daemon.start()
        defer { daemon.stop() }
        let c = HTTPClient(port: daemon.port)
        _ = try c.request("POST", "/v1/devices", text: #"{"id":"b","translator":"external"}"#)
        _ = try c.request("PUT", "/v1/devices/b/mem-table",
                          text: #"{"regions":[{"guest_phys_addr":0,"memory_size":"0x40000000","userspace_addr":"0x7f0000000000"}]}"#)
        let batchList = batches.split(separator: ",").compactMap { Int($0) }
        var report = Report(benchmark: "control", parameters: [
            ("batches", .array(batchList.map { .count($0) })), ("seconds", .double(seconds)), ("round_trips", .count(roundTrips)),
        ])
        var rows: [[String]] = []
        for n in batchList {
            progress("control: updates in batches of \(n) …")
            // A few different bodies, so the table keeps changing (and FIFO-evicting).
            let bodies: [[UInt8]] = (0..<8).map { v in
                let entries = (0..<n).map { i -> String in
                    let iova = UInt64((v * n + i) % 4096) << 12
                    return #"{"iova":"0x\#(String(iova, radix: 16))","size":4096,"uaddr":"0x\#(String(0x7f00_0000_0000 + iova, radix: 16))","perm":"rw"}"#
                }
                return Array(#"{"entries":[\#(entries.joined(separator: ","))]}"#.utf8)
            }
            var sent = 0, requests = 0
            let t0 = Date()
            while Date().timeIntervalSince(t0) < seconds {
                let a = try c.request("POST", "/v1/devices/b/iotlb/updates", body: bodies[requests % bodies.count])
                guard a.status == 200 else { throw ValidationError("update answered \(a.status): \(a.text)") }
                sent += n
                requests += 1
            }
            let dt = Date().timeIntervalSince(t0)
            rows.append(["updates, batch \(n)", fmt(Double(sent) / dt, 0) + " entries/s", fmt(Double(requests) / dt, 0) + " req/s"])
            report.row([("what", "updates"), ("batch", .count(n)), ("seconds", .double(dt)), ("entries", .count(sent)),
                        ("requests", .count(requests)), ("entries_per_s", .double(Double(sent) / dt)),
                        ("requests_per_s", .double(Double(requests) / dt))])
        }
        let rt = try missRoundTrips(c, count: roundTrips)
        rows.append(["miss round trip (posted → resolved, on the device)", "p50 \(rt.p50) µs", "p99 \(rt.p99) µs"])
        rows.append(["miss round trip (long-poll answered → update answered, client)", "p50 \(fmt(rt.clientP50, 1)) µs",
                     "p99 \(fmt(rt.clientP99, 1)) µs"])
        report.row([("what", "miss_round_trip"), ("count", .count(rt.count)), ("device_p50_us", .count(rt.p50)),
                    ("device_p99_us", .count(rt.p99)), ("client_p50_us", .double(rt.clientP50)),
                    ("client_p99_us", .double(rt.clientP99))])
        progressDone()
        try report.emit(table: table(["what", "rate / p50", "p99"], rows), to: output)
    }

    /// An orchestrator loop: invalidate the TX rings' mapping, the device posts a
    /// miss, the long-poll returns it, the update resolves it.
    func missRoundTrips(_ c: HTTPClient, count: Int) throws -> (p50: Int, p99: Int, clientP50: Double, clientP99: Double, count: Int) {
        let map = #"{"iova":"0x800000","size":"0x4000","uaddr":"0x7f0000800000","perm":"rw"}"#
        _ = try c.request("POST", "/v1/devices/b/iotlb/updates", text: map)
        _ = try c.request("PUT", "/v1/devices/b/vrings/1",
                          text: #"{"num":256,"desc_addr":"0x800000","avail_addr":"0x801000","used_addr":"0x802000"}"#)
        var cursor: Int64 = 0
        var client: [Double] = []
        for i in 0..<count {
            if i % 100 == 0 { progress("control: miss round trips \(i)/\(count) …") }
            _ = try c.request("POST", "/v1/devices/b/iotlb/invalidations", text: #"{"iova":"0x800000","size":"0x4000"}"#)
            var got = false
            while !got {
                let a = try c.request("GET", "/v1/devices/b/iotlb/misses?after=\(cursor)&timeout_ms=1000")
                guard case .array(let m)? = a.json["misses"], let last = m.last, case .int(let seq)? = last["seq"] else { continue }
                cursor = seq
                let t0 = Date()
                _ = try c.request("POST", "/v1/devices/b/iotlb/updates", text: map)
                client.append(Date().timeIntervalSince(t0) * 1e6)
                got = true
            }
        }
        let s = try c.request("GET", "/v1/devices/b/iotlb/stats").json["miss_resolution_us"]
        func int(_ j: JSON?) -> Int { if case .int(let v)? = j { Int(v) } else { 0 } }
        let sorted = client.sorted()
        return (int(s?["p50"]), int(s?["p99"]), sorted[sorted.count / 2], sorted[min(sorted.count - 1, sorted.count * 99 / 100)],
                int(s?["count"]))
    }
}
