@testable import ControlPlane
import Dispatch
import HTTP
import Platform
import Service
import Testing
import Vhost

/// Scopes, the credential files, the failure limiter and the audit line, in-process
/// (integration/test_remote.py drives the same over TLS with real certificates).
@Suite struct AccessTests {
    @Test func tokenFileLinesAndTheBareTokenOfOld() throws {
        let bare = try CredentialSet.parseTokens("  s3cret\n", file: "t")
        #expect(bare.count == 1 && bare[0].0 == "s3cret" && bare[0].1.scope == .admin && bare[0].1.name == "token")
        let lines = try CredentialSet.parseTokens("# who\nr0 read dashboard\n\nt0\ttranslate orch1\na0 admin ops\n", file: "t")
        #expect(lines.map { "\($0.1.name):\($0.1.scope)" } == ["dashboard:read", "orch1:translate", "ops:admin"])
        #expect(throws: CredentialsError.self) { try CredentialSet.parseTokens("r0 read\n", file: "t") }
        #expect(throws: CredentialsError.self) { try CredentialSet.parseTokens("r0 write x\n", file: "t") }
        #expect(throws: CredentialsError.self) { try CredentialSet.parseTokens("r0 read x\nr0 admin y\n", file: "t") }
        #expect(throws: CredentialsError.self) { try CredentialSet.parseTokens("# nothing\n", file: "t") }
    }

    @Test func subjectsKeepTheirSpaces() throws {
        let s = try CredentialSet.parseSubjects("CN=orch1,O=vhost-iotlb tests translate orch1\nCN=prom read prometheus\n", file: "s")
        #expect(s["CN=orch1,O=vhost-iotlb tests"]?.scope == .translate)
        #expect(s["CN=prom"]?.name == "prometheus")
        #expect(throws: CredentialsError.self) { try CredentialSet.parseSubjects("CN=x read\n", file: "s") }
    }

    @Test func routesNeedTheScopesTheDocumentSays() {
        func needed(_ m: String, _ p: String) -> Scope? {
            Scope.needed(method: m, path: p.replacingOccurrences("{id}", "d"), pattern: p, metricsAuth: false)
        }
        #expect(needed("GET", "/healthz") == nil)
        #expect(needed("GET", "/metrics") == nil)
        #expect(Scope.needed(method: "GET", path: "/metrics", pattern: nil, metricsAuth: true) == .read)
        #expect(needed("GET", "/v1/devices/{id}/iotlb/misses") == .read)
        #expect(needed("POST", "/v1/devices/{id}/iotlb/updates") == .translate)
        #expect(needed("DELETE", "/v1/devices/{id}/iotlb") == .translate)
        #expect(needed("DELETE", "/v1/devices/{id}") == .admin)
        #expect(needed("GET", "/v1/config") == .admin)
        #expect(Scope.read < .translate && .translate < .admin)
    }

    @Test func scopesAnswer403NamingTheScopeAndTokensAreCheckedFirst() throws {
        let engine = Engine(datapathThreads: 1)
        var settings = ControlPlaneSettings()
        settings.credentials = Credentials(try CredentialSet(tokenText: "r0 read dash\nt0 translate orch\n"))
        settings.vhostUserSockets = VhostUserSockets(resolvedDirectory: testSocketDirectory)
        let cp = ControlPlane(engine: engine, settings: settings)
        defer {
            cp.shutdownDevices()
            engine.shutdown()
            cp.stop()
        }
        func call(_ method: String, _ path: String, _ body: String = "", token: String? = nil) -> (Int, String) {
            let req = Request(method: method, path: path, headers: token.map { ["authorization": "Bearer " + $0] } ?? [:],
                              body: Array(body.utf8))
            let box = Locked<Response?>(nil)
            switch cp.respond(req) {
            case .now(let r): box.withLock { $0 = r }
            case .later(let start), .deferred(let start):
                let done = DispatchSemaphore(value: 0)
                start { r in box.withLock { $0 = r }; done.signal() }
                _ = done.wait(timeout: .now() + 30)
            }
            let r = box.withLock { $0 } ?? Response(status: 599)
            return (r.status, String(decoding: r.body, as: UTF8.self))
        }
        let update = #"{"iova":0,"size":4096,"uaddr":0,"perm":"rw"}"#
        let r = call("POST", "/v1/devices/x/iotlb/updates", update, token: "r0")
        #expect(r.0 == 403 && r.1.contains("needs scope translate") && r.1.contains(#""code":"forbidden""#))
        #expect(call("POST", "/v1/devices/x/iotlb/updates", update, token: "t0").0 == 404)
        #expect(call("DELETE", "/v1/devices/x", token: "t0").1.contains("needs scope admin"))
        #expect(call("GET", "/v1/devices", token: "nope").0 == 401)
        #expect(call("GET", "/v1/devices").0 == 401)
        #expect(cp.authCounters.failures["bad_token"] == 1 && cp.authCounters.failures["missing_credentials"] == 1)
    }

    @Test func failuresPastTheBurstWaitForTheRefill() {
        let l = FailureLimiter(burst: 2, period: 3600)
        #expect(l.retryAfter("a") == nil)
        l.failed("a")
        #expect(l.retryAfter("a") == nil)
        l.failed("a")
        #expect((l.retryAfter("a") ?? 0) > 1000)  // one token refills in 1800 s
        #expect(l.retryAfter("b") == nil, "per peer")
    }
}

extension String {
    func replacingOccurrences(_ a: String, _ b: String) -> String {
        split(separator: a, omittingEmptySubsequences: false).joined(separator: b)
    }
}
