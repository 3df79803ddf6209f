// Routes in-process: ControlPlane.respond called directly, no socket, no HTTP
// server. What goes over a live socket is in the other suites of this target.
@testable import ControlPlane
import Dispatch
import HTTP
import JSON
import Platform
import Service
import Testing
import Vhost

@Suite struct RouteTests {
    /// A control plane over a fresh engine; `token` as --token-file.
    final class Fixture {
        let engine = Engine(datapathThreads: 1)
        let controlPlane: ControlPlane

        init(token: String? = nil) {
            var settings = ControlPlaneSettings()
            settings.token = token
            settings.vhostUserSockets = VhostUserSockets(resolvedDirectory: testSocketDirectory)
            controlPlane = ControlPlane(engine: engine, settings: settings)
        }

        deinit {
            controlPlane.shutdownDevices()
            engine.shutdown()
            controlPlane.stop()
        }

        /// The response to `method path` with `body`, waiting for a deferred reply.
        func call(_ method: String, _ path: String, _ body: String? = nil, query: [(String, String)] = [],
                  headers: [String: String] = [:]) -> Response {
            let request = Request(method: method, path: path, query: query, headers: headers,
                                  body: body.map { Array($0.utf8) } ?? [])
            switch controlPlane.respond(request) {
            case .now(let r): return r
            case .later(let start), .deferred(let start):
                let box = Locked<Response?>(nil)
                let done = DispatchSemaphore(value: 0)
                start { r in
                    box.withLock { $0 = r }
                    done.signal()
                }
                _ = done.wait(timeout: .now() + 30)
                return box.withLock { $0 } ?? Response(status: 599)
            }
        }
    }

    static func text(_ r: Response) -> String { String(decoding: r.body, as: UTF8.self) }

    @Test func healthzAnswersAtOnceWithItsBytes() {
        let f = Fixture()
        guard case .now(let r) = f.controlPlane.respond(Request(method: "GET", path: "/healthz")) else {
            Issue.record("/healthz was not answered at once")
            return
        }
        #expect(r.status == 200)
        #expect(r.headers.contains { $0 == ("Content-Type", "application/json") })
        #expect(Self.text(r) == "{\"status\":\"ok\"}\n")
    }

    @Test func createReadAndRefuseADevice() throws {
        let f = Fixture()
        let created = f.call("POST", "/v1/devices", #"{"id":"r0","queues":2}"#)
        #expect(created.status == 201, "\(Self.text(created))")
        let j = try JSON.parse(created.body)
        #expect(j["id"] == "r0" && j["queues"] == .int(2) && j["mem_table"] == .null)
        let listed = try JSON.parse(f.call("GET", "/v1/devices").body)
        #expect(listed["devices"] == .array([["id": "r0", "queues": 2, "iotlb": true, "iotlb_max_entries": 2048,
                                               "backend": "loopback", "translator": "builtin",
                                               "port": ["type": "loopback"]]]))
        let dup = f.call("POST", "/v1/devices", #"{"id":"r0"}"#)
        #expect(dup.status == 409)
        #expect(Self.text(dup) == #"{"error":{"code":"conflict","message":"device r0 exists"}}"# + "\n")
        #expect(f.call("DELETE", "/v1/devices/r0").status == 204)
    }

    @Test func errorsOfTheContract() {
        let f = Fixture()
        let missing = f.call("GET", "/v1/devices/nope/iotlb/stats")
        #expect(missing.status == 404)
        #expect(Self.text(missing) == #"{"error":{"code":"not_found","message":"device nope not found"}}"# + "\n")
        let noRoute = f.call("GET", "/v2/whatever")
        #expect(noRoute.status == 404 && Self.text(noRoute).contains("no route for /v2/whatever"))
        let wrongMethod = f.call("PATCH", "/v1/devices")
        #expect(wrongMethod.status == 405)
        #expect(wrongMethod.headers.contains { $0 == ("Allow", "POST, GET") })
        let badJSON = f.call("POST", "/v1/devices", "{\"id\":")
        #expect(badJSON.status == 400 && Self.text(badJSON).contains(#""code":"bad_json""#))
        #expect(Self.text(badJSON).contains("at line 1, column"))
        let unknown = f.call("POST", "/v1/devices", #"{"id":"x","colour":"blue"}"#)
        #expect(Self.text(unknown) == #"{"error":{"code":"unknown_field","message":"unknown field \"colour\"","field":"colour"}}"# + "\n")
        _ = f.call("POST", "/v1/devices", #"{"id":"m"}"#)
        let noTable = f.call("POST", "/v1/devices/m/iotlb/updates", #"{"iova":0,"size":4096,"uaddr":0,"perm":"rw"}"#)
        #expect(noTable.status == 409 && Self.text(noTable).contains(#""code":"no_mem_table""#))
        let wrap = f.call("GET", "/v1/devices/m/iotlb/translate", query: [("iova", "0"), ("perm", "ro"), ("size", "0")])
        #expect(wrap.status == 422 && Self.text(wrap).contains(#""field":"size""#))
    }

    @Test func authenticationComesBeforeRouting() {
        let f = Fixture(token: "s3cret")
        let refused = f.call("GET", "/v1/nowhere")
        #expect(refused.status == 401)
        #expect(refused.headers.contains { $0 == ("WWW-Authenticate", "Bearer") })
        #expect(f.call("GET", "/v1/devices", headers: ["authorization": "Bearer s3cret"]).status == 200)
        #expect(f.call("GET", "/healthz").status == 200, "/healthz stays open")
    }

    @Test func eachRequestIsCountedOnceByItsPattern() {
        let f = Fixture()
        _ = f.call("POST", "/v1/devices", #"{"id":"c0"}"#)
        _ = f.call("GET", "/v1/devices/c0/iotlb/stats")
        _ = f.call("GET", "/v1/devices/c0/iotlb/stats")
        _ = f.call("HEAD", "/healthz")
        _ = f.call("PATCH", "/v1/devices")
        let text = Self.text(f.call("GET", "/metrics"))
        func count(_ labels: String) -> String? {
            text.split(separator: "\n").first { $0.hasPrefix("iotlbd_http_requests_total{\(labels)} ") }
                .map { String($0.split(separator: " ").last!) }
        }
        #expect(count(#"route="/v1/devices",method="POST",status="201""#) == "1")
        #expect(count(#"route="/v1/devices/{id}/iotlb/stats",method="GET",status="200""#) == "2")
        // HEAD is served by the GET route but labelled as before: unmatched; so is a 405.
        #expect(count(#"route="unmatched",method="HEAD",status="200""#) == "1")
        #expect(count(#"route="unmatched",method="other",status="405""#) == "1")
    }

    @Test func serviceRefusalsMapToTheAnswersOfTheContract() throws {
        let f = Fixture()
        let devices = f.controlPlane.devices
        let taken = "\(testSocketDirectory)/routes-taken.sock"
        _ = try devices.create(DeviceConfig(id: "a", vhostUserSocket: taken))
        func refusal(_ c: DeviceConfig) -> DeviceServiceError? {
            do throws(DeviceServiceError) { _ = try devices.create(c) } catch { return error }
            return nil
        }
        let dup = try #require(refusal(DeviceConfig(id: "a")))
        #expect(APIError(dup) == APIError(409, "conflict", "device a exists"))
        #expect(APIError(dup, fieldPrefix: "devices[1].") == APIError(409, "conflict", "device a exists", field: "devices[1].id"))
        let inUse = try #require(refusal(DeviceConfig(id: "b", vhostUserSocket: taken)))
        #expect(APIError(inUse) == APIError(409, "conflict", "device a uses \(taken)", field: "vhost_user.socket"))
        let outside = try #require(refusal(DeviceConfig(id: "c", vhostUserSocket: "/nonexistent-dir/x.sock")))
        #expect(APIError(outside).code == "invalid_field" && APIError(outside).field == "vhost_user.socket")
        #expect(APIError(DeviceServiceError.workloadBusy(id: "w"))
                == APIError(409, "conflict", "a workload is already running on w; DELETE it first"))
        #expect(APIError(DeviceServiceError.engine(.unavailable)) == .unavailable)
    }
}
