// The control plane: routes over the engine, authentication, and the server.
import IOTLB
import Vhost
import Logging

/// Settings of the HTTP/JSON control plane.
public struct ControlPlaneSettings: Sendable {
    /// Bearer token every /v1 request must carry; nil disables auth.
    public var token: String?
    /// Default IOTLB size for devices that do not name one.
    public var iotlbMaxEntries = 2048
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

    public init(engine: Engine, settings: ControlPlaneSettings, logger: Logger = Logger(label: "iotlbd")) {
        self.engine = engine
        self.settings = settings
        self.logger = logger
        var r = Router()
        ControlPlane.addRoutes(to: &r, engine: engine, settings: settings, logger: logger, timer: timer)
        self.router = r
    }

    /// Answers every waiting long-poll and stops the timer thread.
    public func stop() { timer.stop() }

    /// Answers one request: authentication, then routing.
    public func respond(_ request: Request) -> Reply {
        if let token = settings.token, request.path.hasPrefix("/v1") {
            let given = request.headers["authorization"] ?? ""
            guard constantTimeEqual(Array(given.utf8), Array(("Bearer " + token).utf8)) else {
                var resp = Response.error(APIError(401, "unauthorized", "missing or wrong bearer token"))
                resp.headers.append(("WWW-Authenticate", "Bearer"))
                return .now(resp)
            }
        }
        return router.route(request)
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

extension Engine {
    /// The device named by the request's `{id}`, or 404.
    func device(for request: Request) throws(APIError) -> DeviceHandle {
        let id = request.params["id"] ?? ""
        guard let h = device(id) else { throw .notFound("device \(id) not found") }
        return h
    }
}
