// The exposition on its own, from plain values: no engine, no HTTP.
import Metrics
import Testing

@Suite struct ExpositionTests {
    @Test func familiesHaveHelpAndTypeAndRequestsAreSorted() {
        let requests = RequestCounter()
        requests.count(route: "/v1/devices", method: "POST", status: 201)
        requests.count(route: "/healthz", method: "GET", status: 200)
        requests.count(route: "/healthz", method: "GET", status: 200)
        #expect(requests.all.map(\.route) == ["/healthz", "/v1/devices"] && requests.all[0].n == 2)
        let text = Exposition.render([], longPollsWaiting: 3, requests: requests, build: ("1.2.3", "ab\"c"))
        let lines = text.split(separator: "\n").map(String.init)
        #expect(lines.contains("iotlbd_devices 0"))
        #expect(lines.contains("iotlbd_http_long_polls_waiting 3"))
        #expect(lines.contains(#"iotlbd_http_requests_total{route="/healthz",method="GET",status="200"} 2"#))
        #expect(lines.contains(#"iotlbd_build_info{version="1.2.3",commit="ab\"c"} 1"#), "label values are escaped")
        // Every sample's family was announced with HELP and TYPE before it.
        var announced: Set<String> = []
        for line in lines {
            if line.hasPrefix("# TYPE ") { announced.insert(String(line.split(separator: " ")[2])) }
            if line.hasPrefix("#") { continue }
            let name = String(line.prefix { $0 != "{" && $0 != " " })
            let family = ["_bucket", "_sum", "_count"].reduce(name) { n, s in
                n.hasSuffix(s) && announced.contains(String(n.dropLast(s.count))) ? String(n.dropLast(s.count)) : n
            }
            #expect(announced.contains(family), "\(line)")
        }
        #expect(lines.contains { $0.hasPrefix("process_open_fds ") })
    }
}
