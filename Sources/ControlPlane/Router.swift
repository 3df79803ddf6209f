// Routes by method and path pattern ("/v1/devices/{id}/vrings/{n}").

/// A handler: a request in, a reply out; a thrown APIError becomes its error body.
public typealias Handler = @Sendable (Request) throws(APIError) -> Reply

/// Method + path pattern → handler.
public struct Router: Sendable {
    private struct Route: Sendable {
        let method: String
        let pattern: String
        let segments: [Substring]
        let handler: Handler
    }
    private var routes: [Route] = []

    public init() {}

    /// Adds a route; `{name}` segments capture into `Request.params`.
    public mutating func on(_ method: String, _ pattern: String, _ handler: @escaping Handler) {
        routes.append(Route(method: method, pattern: pattern, segments: pattern.split(separator: "/"), handler: handler))
    }
    public mutating func get(_ p: String, _ h: @escaping Handler) { on("GET", p, h) }
    public mutating func post(_ p: String, _ h: @escaping Handler) { on("POST", p, h) }
    public mutating func put(_ p: String, _ h: @escaping Handler) { on("PUT", p, h) }
    public mutating func delete(_ p: String, _ h: @escaping Handler) { on("DELETE", p, h) }

    /// Every (method, pattern) served, for the OpenAPI completeness test.
    public var table: [(method: String, pattern: String)] { routes.map { ($0.method, $0.pattern) } }

    private static func match(_ segments: [Substring], _ path: [Substring]) -> [String: String]? {
        guard segments.count == path.count else { return nil }
        var params: [String: String] = [:]
        for (s, p) in zip(segments, path) {
            if s.first == "{" && s.last == "}" {
                params[String(s.dropFirst().dropLast())] = String(p)
            } else if s != p {
                return nil
            }
        }
        return params
    }

    /// The pattern that serves `request` (for metrics labels), or nil.
    public func pattern(for request: Request) -> String? {
        let path = request.path.split(separator: "/")
        return routes.first { $0.method == request.method && Router.match($0.segments, path) != nil }?.pattern
    }

    /// Dispatches: 404 `not_found` for an unknown path, 405 for a known path with another method.
    public func route(_ request: Request) -> Reply {
        let path = request.path.split(separator: "/")
        var allowed: [String] = []
        for r in routes {
            guard let params = Router.match(r.segments, path) else { continue }
            guard r.method == request.method || (r.method == "GET" && request.method == "HEAD") else {
                allowed.append(r.method)
                continue
            }
            var req = request
            req.params = params
            do { return try r.handler(req) } catch { return .now(.error(error)) }
        }
        if !allowed.isEmpty {
            var resp = Response.error(APIError(405, "method_not_allowed",
                                               "\(request.method) is not allowed here; allowed: \(allowed.joined(separator: ", "))"))
            resp.headers.append(("Allow", allowed.joined(separator: ", ")))
            return .now(resp)
        }
        return .now(.error(.notFound("no route for \(request.path)")))
    }
}
