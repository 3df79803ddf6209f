// The control plane: the routes over the devices service and the engine, authentication
// (Authorization.swift), the audit trail, and request counts.
import IOTLB
import Vhost
import Guest
import Logging
import JSON
import HTTP
import Service
import Metrics
import Platform

/// Settings of the HTTP/JSON control plane.
public struct ControlPlaneSettings: Sendable {
    /// One bearer token with scope admin (as a bare --token-file); ignored when `credentials` is set.
    public var token: String?
    /// Tokens and certificate subjects with their scopes (--token-file, --tls-client-scopes).
    public var credentials: Credentials?
    /// /metrics needs scope read (--metrics-auth).
    public var metricsAuth = false
    /// Where state-changing requests are recorded; nil: nowhere.
    public var audit: AuditLog?
    /// Failed authentications allowed per peer address, and in how many seconds they refill.
    public var failureLimit = (burst: 10, seconds: 60.0)
    /// Default IOTLB size for devices that do not name one.
    public var iotlbMaxEntries = 2048
    /// Where vhost-user sockets may live and how they are made; nil: the
    /// default directory (`VhostUserSockets.defaultDirectory`), made if missing.
    public var vhostUserSockets: VhostUserSockets?
    /// --state-dir: the configuration is kept in `<dir>/config.json`.
    public var stateDirectory: String?
    /// No token, 2048 entries, the default socket directory, no state directory.
    /// --tap-create: a TAP port may make its interface when it does not exist.
    public var tapCreate = false
    public init() {}
}

/// The routes of the contract over one engine.
public final class ControlPlane: Sendable {
    /// The engine the routes drive.
    public let engine: Engine
    /// The settings given.
    public let settings: ControlPlaneSettings
    let logger: Logger
    /// The route table (built once).
    public let router: Router
    let timer = LongPollTimer()
    /// The devices and their parts (front-ends, built-in guests, miss loggers).
    let devices: DeviceService
    let requests = RequestCounter()
    /// What clients configured (GET /v1/config, the state file).
    let store: ConfigStore
    /// Where vhost-user sockets may live.
    public let sockets: VhostUserSockets
    /// The credentials in force (reloaded on SIGHUP by `iotlbd`).
    public let credentials: Credentials
    /// Failed authentications by reason, 403s, 429s, reloads.
    public let authCounters = AuthCounters()
    let limiter: FailureLimiter
    /// The TLS certificate's expiry (seconds since the epoch) for /metrics; set by whoever starts TLS listeners.
    public let certificateNotAfter = Locked<Int64?>(nil)

    /// The routes over `engine` (no configuration loaded yet: see `loadConfiguration`).
    public init(engine: Engine, settings: ControlPlaneSettings, logger: Logger = Logger(label: "iotlbd")) {
        self.engine = engine
        self.settings = settings
        self.logger = logger
        credentials = settings.credentials ?? Credentials(settings.token.map { CredentialSet(adminToken: $0) } ?? CredentialSet())
        limiter = FailureLimiter(burst: settings.failureLimit.burst, period: settings.failureLimit.seconds)
        let sockets = settings.vhostUserSockets
            ?? (try? VhostUserSockets.prepare(directory: nil, group: nil))
            ?? VhostUserSockets(resolvedDirectory: VhostUserSockets.defaultDirectory())
        self.sockets = sockets
        let store = ConfigStore(stateFile: settings.stateDirectory.map { ($0.hasSuffix("/") ? $0 : $0 + "/") + ConfigFormat.stateFileName },
                                logger: logger)
        self.store = store
        let devices = DeviceService(engine: engine, store: store, sockets: sockets, logger: logger, tapCreate: settings.tapCreate)
        self.devices = devices
        var r = Router()
        ControlPlane.addRoutes(to: &r, devices: devices, settings: settings, timer: timer, store: store)
        self.router = r
    }

    /// The whole configuration, as `GET /v1/config` answers it.
    public var configuration: JSON { store.document }

    /// The state file (`<--state-dir>/config.json`), nil without --state-dir.
    public var stateFile: String? { store.stateFile }

    /// Creates device `demo0` with a looping built-in guest (64 B frames,
    /// 2 MiB pages, static mappings) so figures move at once. The demo is not
    /// recorded in the configuration: a restart with --demo makes it again.
    public func startDemo(then done: @escaping @Sendable (Result<String, APIError>) -> Void) {
        var c = WorkloadConfig()
        c.packetSize = 64
        c.pageSize = .m2
        c.mapping = .static
        do throws(DeviceServiceError) {
            let d = try devices.create(DeviceConfig(id: "demo0", iotlbMaxEntries: settings.iotlbMaxEntries), persist: false)
            try devices.startWorkload(c, on: d) { result in done(result.map { _ in d.id }.mapError { APIError($0) }) }
        } catch {
            done(.failure(APIError(error)))
        }
    }

    /// Stops the built-in guests and drops vhost-user front-ends (before the
    /// engine stops the devices); no device is created after.
    public func shutdownDevices() { devices.shutdown() }

    /// Answers every waiting long-poll and stops the timer thread, then the
    /// state file's saver (after it wrote what is left).
    public func stop() {
        timer.stop()
        store.stop()
    }

    /// Answers one request: authentication and scope, then routing; a
    /// state-changing one leaves an audit line once answered.
    public func respond(_ request: Request) -> Reply {
        let started = monotonicNanos()
        // Matched once: the pattern labels the count, the match runs once authorized.
        let match = router.match(request)
        // Counted by route pattern (not path: ids would make labels unbounded).
        let route = match.pattern ?? (request.path == "/metrics" ? "/metrics" : "unmatched")
        let method = ["GET", "HEAD", "POST", "PUT", "DELETE"].contains(request.method) ? request.method : "other"
        let counter = requests
        let reply: Reply
        let who: Identity?
        switch authorize(request, pattern: match.pattern) {
        case .success(let id):
            (reply, who) = (authorizedReply(request, match), id)
        case .failure(let refused):
            (reply, who) = (.now(refused.response), refused.identity)
        }
        let audit = settings.audit.flatMap { log -> (@Sendable (Int) -> Void)? in
            guard request.method != "GET", request.method != "HEAD" else { return nil }
            return { status in log.record(auditLine(request, match, who, status: status, started: started)) }
        }
        let answered: @Sendable (Response) -> Void = { r in
            counter.count(route: route, method: method, status: r.status)
            audit?(r.status)
        }
        switch reply {
        case .now(let r):
            answered(r)
            return reply
        case .later(let start):
            return .later { complete in
                start { r in
                    answered(r)
                    complete(r)
                }
            }
        case .deferred(let start):
            return .deferred { complete in
                start { r in
                    answered(r)
                    complete(r)
                }
            }
        }
    }

    private func authorizedReply(_ request: Request, _ match: Router.Match) -> Reply {
        if request.path == "/metrics" {
            guard request.method == "GET" || request.method == "HEAD" else {
                var resp = Response.error(APIError(405, "method_not_allowed", "\(request.method) is not allowed here; allowed: GET"))
                resp.headers.append(("Allow", "GET"))
                return .now(resp)
            }
            return .later { complete in self.metrics(complete: complete) }
        }
        return match.reply()
    }
}

/// Compares without an early exit, so timing does not reveal how much matched.
func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    var diff = UInt8(truncatingIfNeeded: a.count ^ b.count)
    for i in 0..<max(a.count, b.count) {
        diff |= (i < a.count ? a[i] : 0) ^ (i < b.count ? b[i] : 0)
    }
    return diff == 0
}

extension DeviceHandle {
    /// Runs `op` on the device's worker and answers with `render` of its
    /// result, or with the engine's refusal.
    func reply<T: Sendable>(_ op: @escaping @Sendable (Device) throws(EngineError) -> T,
                            paths: [String] = [],
                            render: @escaping @Sendable (T) -> Response) -> Reply {
        let id = config.id
        return .later { complete in
            self.perform({ device -> Result<T, EngineError> in
                guard let device else { return .failure(.notFound("device \(id) not found")) }
                do throws(EngineError) { return .success(try op(device)) } catch { return .failure(error) }
            }, then: { result in
                switch result {
                case .success(let v): complete(render(v))
                case .failure(let e): complete(.error(APIError(e, paths: paths)))
                }
            })
        }
    }
}

extension DeviceService {
    /// The device named by the request's `{id}`, or 404.
    func device(for request: Request) throws(APIError) -> DeviceParts {
        let id = request.params["id"] ?? ""
        guard let d = device(id) else { throw .notFound("device \(id) not found") }
        return d
    }

    /// The engine's device named by the request's `{id}`, or 404.
    func handle(for request: Request) throws(APIError) -> DeviceHandle { try device(for: request).handle }
}
