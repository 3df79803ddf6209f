// The server's request and response types: what handlers see. No C here.
import JSON

/// An HTTP request, body fully read.
public struct Request: Sendable {
    /// "GET", "POST", …
    public var method: String
    /// The path, without the query.
    public var path: String
    /// Query arguments in arrival order.
    public var query: [(String, String)]
    /// Headers by lowercase name.
    public var headers: [String: String]
    /// The body, fully read.
    public var body: [UInt8]
    /// Path parameters filled in by the router (`{id}` → "demo0").
    public var params: [String: String] = [:]
    /// Who sent it: address, TLS, client certificate (set by the server).
    public var peer = Peer()

    /// A request as the server (or an in-process test) hands it to a responder.
    public init(method: String, path: String, query: [(String, String)] = [], headers: [String: String] = [:],
                body: [UInt8] = []) {
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
    }

    /// The first query argument named `name`.
    public func query(_ name: String) -> String? { query.first { $0.0 == name }?.1 }

    /// The body as JSON; an empty or malformed body is `bad_json`.
    public func json() throws(APIError) -> JSON {
        guard !body.isEmpty else { throw APIError(400, "bad_json", "the request needs a JSON body") }
        do { return try JSON.parse(body) } catch {
            throw APIError(400, "bad_json", "\(error.message) at line \(error.line), column \(error.column)")
        }
    }

    /// Refuses query arguments outside `allowed`.
    public func allowOnly(_ allowed: Set<String>) throws(APIError) {
        if let bad = query.first(where: { !allowed.contains($0.0) }) { throw APIError.unknownField(bad.0) }
    }
}

/// An HTTP response.
public struct Response: Sendable {
    /// The HTTP status.
    public var status: Int
    /// Headers in the order sent.
    public var headers: [(String, String)]
    /// The body.
    public var body: [UInt8]

    /// A response with `status`, `headers` and `body`.
    public init(status: Int, headers: [(String, String)] = [], body: [UInt8] = []) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    /// A JSON answer.
    public static func json(_ status: Int, _ value: JSON) -> Response {
        Response(status: status, headers: [("Content-Type", "application/json")], body: value.serialized() + [10])
    }

    /// The contract's error body.
    public static func error(_ e: APIError) -> Response { .json(e.status, e.body) }

    /// 204, no body.
    public static let noContent = Response(status: 204)
}

/// What a handler gives back: an answer now, or one it will deliver later
/// (a command applied by a datapath worker, a long-poll), exactly once.
public enum Reply: Sendable {
    case now(Response)
    /// A command for a datapath worker: usually done within microseconds, so
    /// the server waits a moment before it suspends the connection.
    case later(@Sendable (_ complete: @escaping @Sendable (Response) -> Void) -> Void)
    /// A long wait (long-poll, stopping a guest): the connection is suspended at once.
    case deferred(@Sendable (_ complete: @escaping @Sendable (Response) -> Void) -> Void)

    /// A JSON answer now.
    public static func json(_ status: Int, _ value: JSON) -> Reply { .now(.json(status, value)) }
}
