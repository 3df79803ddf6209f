import ControlPlane
import Foundation
import Testing

/// Every route the server serves is in api/openapi.yaml, with its method.
@Suite struct OpenAPITests {
    /// (method, path) pairs the document declares, read from its `paths:` block.
    func documented() throws -> Set<String> {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("api/openapi.yaml")
        let text = try String(contentsOf: url, encoding: .utf8)
        var out: Set<String> = []
        var path: String?
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("components:") { break }
            if line.hasPrefix("  /"), line.hasSuffix(":") { path = String(line.dropFirst(2).dropLast()) }
            for m in ["get", "put", "post", "delete"] where line == "    \(m):" {
                if let path { out.insert("\(m.uppercased()) \(path)") }
            }
        }
        return out
    }

    @Test func everyServedRouteIsDocumented() throws {
        let d = try LiveDaemon()
        let served = Set(d.daemon.controlPlane.router.table.map { "\($0.method) \($0.pattern)" } + ["GET /metrics"])
        let doc = try documented()
        #expect(served.subtracting(doc).isEmpty, "undocumented: \(served.subtracting(doc).sorted())")
        #expect(doc.subtracting(served).isEmpty, "documented but not served: \(doc.subtracting(served).sorted())")
    }
}
