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

    /// An empty table.
    public init() {}

    /// Adds a route; `{name}` segments capture into `Request.params`.
    public mutating func on(_ method: String, _ pattern: String, _ handler: @escaping Handler) {
        routes.append(Route(method: method, pattern: pattern, segments: pattern.split(separator: "/"), handler: handler))
    }
    /// `on("GET", …)`; a GET route serves HEAD too.
    public mutating func get(_ p: String, _ h: @escaping Handler) { on("GET", p, h) }
    /// `on("POST", …)`.
    public mutating func post(_ p: String, _ h: @escaping Handler) { on("POST", p, h) }
    /// `on("PUT", …)`.
    public mutating func put(_ p: String, _ h: @escaping Handler) { on("PUT", p, h) }
    /// `on("DELETE", …)`.
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

    /// What serves one request, found by a single pass over the routes.
    public struct Match: Sendable {
        /// The pattern of the route serving the request with its own method (for
        /// metrics labels); nil for no route, a 405, or HEAD served by GET.
        public let pattern: String?
        /// The path parameters of the route serving the request (`{id}` → "nic0"), also for HEAD.
        public let params: [String: String]
        fileprivate let run: @Sendable () -> Reply

        /// Runs the handler (a thrown APIError becomes its error body), or answers
        /// 404 `not_found` for an unknown path, 405 for a known path with another method.
        public func reply() -> Reply { run() }
    }

    /// Finds the route serving `request` without running it (so that the
    /// caller may refuse first, e.g. on authentication).
    public func match(_ request: Request) -> Match {
        let path = request.path.split(separator: "/")
        var allowed: [String] = []
        for r in routes {
            guard let params = Router.match(r.segments, path) else { continue }
            guard r.method == request.method || (r.method == "GET" && request.method == "HEAD") else {
                allowed.append(r.method)
                continue
            }
            var withParams = request
            withParams.params = params
            let (req, handler) = (withParams, r.handler)
            return Match(pattern: r.method == request.method ? r.pattern : nil, params: params) {
                do throws(APIError) { return try handler(req) } catch { return .now(.error(error)) }
            }
        }
        if !allowed.isEmpty {
            var resp = Response.error(APIError(405, "method_not_allowed",
                                               "\(request.method) is not allowed here; allowed: \(allowed.joined(separator: ", "))"))
            resp.headers.append(("Allow", allowed.joined(separator: ", ")))
            let answer = resp
            return Match(pattern: nil, params: [:]) { .now(answer) }
        }
        return Match(pattern: nil, params: [:]) { .now(.error(.notFound("no route for \(request.path)"))) }
    }

    /// Dispatches: `match(request).reply()`.
    public func route(_ request: Request) -> Reply { match(request).reply() }
}
