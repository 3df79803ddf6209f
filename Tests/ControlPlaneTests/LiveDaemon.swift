import ControlPlane
import Glibc
import HTTP
import HTTPClient
import JSON
import Service
import Testing
import Vhost

/// The vhost-user socket directory of this test process (made once).
let testSocketDirectory: String = {
    let dir = "/tmp/iotlbd-tests-\(getpid())"
    mkdir(dir, 0o700)
    return dir
}()

/// A real daemon on an ephemeral loopback port, with a client.
final class LiveDaemon {
    let daemon: Daemon
    let client: HTTPClient

    /// `sockets`: the vhost-user directory (default `testSocketDirectory`);
    /// `stateDirectory`, `configFile`: as --state-dir and --config.
    init(token: String? = nil, maxBodyBytes: Int = 8 << 20, maxConnections: Int = 1024,
         limits: EngineLimits = EngineLimits(), sockets: VhostUserSockets? = nil, stateDirectory: String? = nil,
         configFile: String? = nil) throws {
        var options = ServerOptions()
        options.port = 0
        options.maxBodyBytes = maxBodyBytes
        options.maxConnections = maxConnections
        var settings = ControlPlaneSettings()
        settings.token = token
        settings.vhostUserSockets = sockets ?? VhostUserSockets(resolvedDirectory: testSocketDirectory)
        settings.stateDirectory = stateDirectory
        daemon = Daemon(server: options, settings: settings, limits: limits)
        do { try daemon.start(configFile: configFile) } catch {
            daemon.stop()
            throw error
        }
        client = HTTPClient(port: daemon.port)
        if let token { client.defaultHeaders = [("Authorization", "Bearer \(token)")] }
    }

    deinit { daemon.stop() }

    @discardableResult
    func call(_ method: String, _ path: String, _ body: String? = nil) throws -> HTTPClient.Answer {
        try client.request(method, path, body: body.map { Array($0.utf8) })
    }

    /// Calls and checks the status; returns the JSON body.
    @discardableResult
    func expect(_ status: Int, _ method: String, _ path: String, _ body: String? = nil,
                sourceLocation: SourceLocation = #_sourceLocation) throws -> JSON {
        let a = try call(method, path, body)
        #expect(a.status == status, "\(method) \(path) → \(a.status) \(a.text)", sourceLocation: sourceLocation)
        if a.status >= 400 {
            #expect(a.headers["content-type"] == "application/json", sourceLocation: sourceLocation)
        }
        return a.json
    }

    /// Expects an error answer with `code` (and `field` when given).
    func expectError(_ status: Int, _ code: String, field: String? = nil, _ method: String, _ path: String,
                     _ body: String? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let j = try expect(status, method, path, body, sourceLocation: sourceLocation)
        #expect(j["error"]?["code"] == .string(code), "\(j.text)", sourceLocation: sourceLocation)
        #expect(j["error"]?["message"] != nil, sourceLocation: sourceLocation)
        if let field {
            #expect(j["error"]?["field"] == .string(field), "\(j.text)", sourceLocation: sourceLocation)
        }
    }

    /// Everything observable about a device, to prove a refused request changed nothing.
    func snapshot(_ id: String) throws -> String {
        let parts = try ["/v1/devices/\(id)", "/v1/devices/\(id)/iotlb/entries", "/v1/devices/\(id)/iotlb/stats"]
            .map { try call("GET", $0).text }
        return parts.joined(separator: "\n") + (try call("GET", "/v1/devices").text)
    }

    /// Creates `id` with a 1 GiB memory table at GPA 0 / uaddr 0x7f00_0000_0000.
    func deviceWithMemory(_ id: String, extra: String = "") throws {
        try expect(201, "POST", "/v1/devices", #"{"id":"\#(id)"\#(extra)}"#)
        try expect(200, "PUT", "/v1/devices/\(id)/mem-table",
                   #"{"regions":[{"guest_phys_addr":0,"memory_size":"0x40000000","userspace_addr":"0x7f0000000000"}]}"#)
    }
}
