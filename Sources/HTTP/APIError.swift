// The contract's error answer: every non-2xx body is one of these.
import JSON

/// An error answer: status, code, message and (when one field is at fault) its path.
public struct APIError: Error, Equatable, Sendable {
    /// The HTTP status (4xx, or 503).
    public var status: Int
    /// The contract's code: `invalid_field`, `not_found`, ….
    public var code: String
    /// What went wrong, for people.
    public var message: String
    /// The field at fault, as a path like `entries[3].uaddr`.
    public var field: String?

    /// An answer with `status`, the contract's `code`, a message for people and, when one field is at fault, its path.
    public init(_ status: Int, _ code: String, _ message: String, field: String? = nil) {
        self.status = status
        self.code = code
        self.message = message
        self.field = field
    }

    /// `{"error":{"code","message","field"?}}`
    public var body: JSON {
        var inner: [(String, JSON)] = [("code", .string(code)), ("message", .string(message))]
        if let field { inner.append(("field", .string(field))) }
        return .object([("error", .object(inner))])
    }

    /// 400 `invalid_field`: `field` (a path like `entries[3].uaddr`) is at fault.
    public static func invalidField(_ field: String, _ message: String) -> APIError {
        APIError(400, "invalid_field", message, field: field)
    }
    /// 400 `unknown_field`: the request has a member (or query argument) the route does not take.
    public static func unknownField(_ field: String) -> APIError {
        APIError(400, "unknown_field", "unknown field \"\(field)\"", field: field)
    }
    /// 404 `not_found`.
    public static func notFound(_ message: String) -> APIError { APIError(404, "not_found", message) }
    /// 503 `unavailable`: the daemon is stopping.
    public static let unavailable = APIError(503, "unavailable", "the daemon is shutting down")
}
