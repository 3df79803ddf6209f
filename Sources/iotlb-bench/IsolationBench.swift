// Isolation: a dashboard that loops a large read must not slow another
// device's traffic on the same datapath thread. One device holds 2048 IOTLB
// entries and no traffic; another, on the same (single) worker, runs the
// built-in guest. A client loops `GET …/iotlb/entries` (all 2048) or, as the
// reference, `GET /healthz`, alternately; the guest's Mpps is compared.
import ArgumentParser
import ControlPlane
import Foundation
import HTTP
import HTTPClient
import Synchronization

struct IsolationBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "isolation",
        abstract: "Datapath Mpps while a client loops GET …/iotlb/entries (2048) vs GET /healthz, alternated.")

    @Option(help: "Seconds measured per run.") var seconds = 1.5
    @Option(help: "Runs per side (healthz, entries alternately).") var repeats = 5
    @Option(help: "Payload size of the built-in guest's frames.") var packetSize = 64
    @OptionGroup var output: ReportOptions

    func run() throws {
        var options = ServerOptions()
        options.port = 0
        let daemon = Daemon(server: options, datapathThreads: 1)
        try daemon.start()
        defer { daemon.stop() }
        let c = HTTPClient(port: daemon.port)
        func ok(_ a: HTTPClient.Answer, _ what: String) throws {
            guard (200..<300).contains(a.status) else { throw ValidationError("\(what) answered \(a.status): \(a.text)") }
        }
        // The idle device with a full IOTLB.
        try ok(c.request("POST", "/v1/devices", text: #"{"id":"idle","translator":"external"}"#), "create idle")
        try ok(c.request("PUT", "/v1/devices/idle/mem-table",
                         text: #"{"regions":[{"guest_phys_addr":0,"memory_size":"0x40000000","userspace_addr":"0x7f0000000000"}]}"#),
               "mem-table")
        for batch in 0..<2 {
            let entries = (0..<1024).map { i -> String in
                let iova = UInt64(batch * 1024 + i) << 12
                return #"{"iova":"0x\#(String(iova, radix: 16))","size":4096,"uaddr":"0x\#(String(0x7f00_0000_0000 + iova, radix: 16))","perm":"rw"}"#
            }
            try ok(c.request("POST", "/v1/devices/idle/iotlb/updates", text: #"{"entries":[\#(entries.joined(separator: ","))]}"#),
                   "updates")
        }
        // The busy device, on the same worker (there is one).
        try ok(c.request("POST", "/v1/devices", text: #"{"id":"busy"}"#), "create busy")
        try ok(c.request("PUT", "/v1/devices/busy/workload",
                         text: #"{"packet_size":\#(packetSize),"page_size":"2m","mapping":"static"}"#), "workload")
        sleepSeconds(0.5)
        let port = daemon.port
        var runs: [String: [(mpps: Double, rps: Double)]] = [:]
        var report = Report(benchmark: "isolation", parameters: [
            ("seconds", .double(seconds)), ("repeats", .count(repeats)), ("packet_size", .count(packetSize)),
            ("idle_device_entries", .count(2048)), ("datapath_threads", .count(1))])
        let sides = ["/healthz", "/v1/devices/idle/iotlb/entries"]
        for round in 0..<repeats {
            for path in sides {
                progress("isolation: round \(round + 1)/\(repeats), client looping \(path) …")
                let stop = Atomic<Bool>(false)
                let served = Atomic<Int>(0)
                let finished = DispatchSemaphore(value: 0)
                Thread.detachNewThread {
                    let client = HTTPClient(port: port)
                    while !stop.load(ordering: .relaxed) {
                        if let a = try? client.request("GET", path), a.status == 200 { served.add(1, ordering: .relaxed) }
                    }
                    finished.signal()
                }
                sleepSeconds(0.2)
                let w0 = try workload(c), n0 = served.load(ordering: .relaxed), t0 = Date()
                sleepSeconds(seconds)
                let w1 = try workload(c), n1 = served.load(ordering: .relaxed), dt = Date().timeIntervalSince(t0)
                stop.store(true, ordering: .relaxed)
                finished.wait()
                let mpps = (w1.elapsed - w0.elapsed) > 0 ? Double(w1.received - w0.received) / (w1.elapsed - w0.elapsed) / 1e6 : 0
                runs[path, default: []].append((mpps, Double(n1 - n0) / dt))
                report.row([("round", .count(round)), ("client_loops", .string(path)), ("mpps", .double(mpps)),
                            ("requests_per_s", .double(Double(n1 - n0) / dt))])
                progress("isolation: round \(round + 1)/\(repeats), \(path): \(fmt(mpps)) Mpps, \(fmt(Double(n1 - n0) / dt, 0)) req/s")
            }
        }
        progressDone()
        let h = runs[sides[0]] ?? [], e = runs[sides[1]] ?? []
        let ratios = zip(e, h).map { $1.mpps > 0 ? $0.mpps / $1.mpps : 0 }
        report.summary([("healthz_mpps_median", .double(median(h.map(\.mpps)))),
                        ("entries_mpps_median", .double(median(e.map(\.mpps)))),
                        ("healthz_requests_per_s_median", .double(median(h.map(\.rps)))),
                        ("entries_requests_per_s_median", .double(median(e.map(\.rps)))),
                        ("ratios", .array(ratios.map { .double($0) })), ("ratio_median", .double(median(ratios)))])
        try report.emit(table: table(["client loops", "datapath Mpps (median)", "requests/s (median)"], [
            ["GET /healthz", fmt(median(h.map(\.mpps)), 3), fmt(median(h.map(\.rps)), 0)],
            ["GET …/iotlb/entries (2048)", fmt(median(e.map(\.mpps)), 3), fmt(median(e.map(\.rps)), 0)],
        ]) + "\nentries / healthz, per round: \(ratios.map { fmt($0, 3) }.joined(separator: ", ")); median \(fmt(median(ratios), 3))\n",
            to: output)
    }

    private func workload(_ c: HTTPClient) throws -> (received: UInt64, elapsed: Double) {
        let w = try c.request("GET", "/v1/devices/busy/workload").json
        guard case .int(let r)? = w["received"] else { throw ValidationError("no workload figures: \(w.text)") }
        let elapsed: Double
        switch w["elapsed_s"] ?? w["elapsed"] {
        case .double(let v)?: elapsed = v
        case .int(let v)?: elapsed = Double(v)
        default: throw ValidationError("no elapsed time in \(w.text)")
        }
        return (UInt64(r), elapsed)
    }
}
