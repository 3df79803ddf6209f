// Scopes: what a credential may do, and what each route needs. The table is
// the one api/openapi.yaml documents per operation (integration/test_remote.py
// checks every route against it).
import HTTP

/// What a credential may do. Each scope includes the ones below it.
public enum Scope: Int, Comparable, Sendable, CaseIterable, CustomStringConvertible {
    /// GET routes (devices, IOTLB entries and stats, vrings, workloads), the
    /// miss long-poll, and /metrics with --metrics-auth.
    case read = 1
    /// And IOTLB updates, invalidations and flushes: an orchestrator answering misses.
    case translate = 2
    /// And everything else: devices, memory tables, vrings, workloads, the configuration.
    case admin = 3

    /// "read", "translate", "admin".
    public var description: String {
        switch self {
        case .read: "read"
        case .translate: "translate"
        case .admin: "admin"
        }
    }

    /// The scope named `name`, nil for anything else.
    public init?(name: String) {
        guard let s = Scope.allCases.first(where: { $0.description == name }) else { return nil }
        self = s
    }

    public static func < (a: Scope, b: Scope) -> Bool { a.rawValue < b.rawValue }

    /// The scope a request needs: nil for routes open to anyone (/healthz, and
    /// /metrics unless `metricsAuth`). `pattern` is the matched route's (nil: no route).
    public static func needed(method: String, path: String, pattern: String?, metricsAuth: Bool) -> Scope? {
        if path == "/healthz" { return nil }
        if path == "/metrics" { return metricsAuth ? .read : nil }
        guard let pattern else { return .read }  // 404 / 405 answers: any credential
        switch (method, pattern) {
        case ("GET", "/v1/config"), ("HEAD", "/v1/config"): return .admin  // the whole configuration
        case ("GET", _), ("HEAD", _): return .read
        case ("POST", "/v1/devices/{id}/iotlb/updates"), ("POST", "/v1/devices/{id}/iotlb/invalidations"),
             ("DELETE", "/v1/devices/{id}/iotlb"):
            return .translate
        default: return .admin
        }
    }
}

/// Who a request was authenticated as.
public struct Identity: Sendable, Equatable {
    /// The credential's name (a token file's third field, a certificate's
    /// name in the subjects file or its subject); never a secret.
    public var name: String
    /// What it may do.
    public var scope: Scope
    /// "token", "certificate", or "none" (authentication off).
    public var via: String
}

/// A refused request: 403 `forbidden`, naming the scope needed.
func forbidden(_ identity: Identity, needs scope: Scope, _ request: Request) -> Response {
    Response.error(APIError(403, "forbidden",
                            "\(request.method) \(request.path) needs scope \(scope); credential \"\(identity.name)\" has scope \(identity.scope)"))
}
