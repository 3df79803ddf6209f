// Reading request fields with their paths, so every refusal names the field
// at fault ("entries[3].uaddr"). Unknown members are refused, not ignored.
import JSON

/// Parses a contract number: a JSON integer >= 0, or a string of "0x" hex or
/// decimal digits, up to 2^64-1.
public func parseNumber(_ v: JSON, field: String) throws(APIError) -> UInt64 {
    switch v {
    case .int(let i):
        guard i >= 0 else { throw .invalidField(field, "must be >= 0") }
        return UInt64(i)
    case .double(let d) where d >= 0 && d <= 9_007_199_254_740_992 && d.rounded(.towardZero) == d:
        // 4096.0 is an integer to JSON Schema; beyond 2^53 a double is not exact, so not accepted.
        return UInt64(d)
    case .string(let s):
        guard let n = parseNumber(text: s) else {
            throw .invalidField(field, "\"\(s.prefix(40))\" is not a number: use \"0x…\" hex or decimal digits, up to 2^64-1")
        }
        return n
    default:
        throw .invalidField(field, "expected an integer or a \"0x…\" string, got \(v.kindName)")
    }
}

/// "0x…" hex (1-16 digits) or decimal digits, up to 2^64-1; nil otherwise.
public func parseNumber(text s: String) -> UInt64? {
    let u = Array(s.utf8)
    if u.count > 2, u[0] == UInt8(ascii: "0"), u[1] == UInt8(ascii: "x") || u[1] == UInt8(ascii: "X") {
        guard u[2...].allSatisfy(isHexDigit) else { return nil }
        return UInt64(String(decoding: u[2...], as: UTF8.self), radix: 16)
    }
    guard !u.isEmpty, u.allSatisfy({ $0 >= 48 && $0 <= 57 }) else { return nil }
    return UInt64(s, radix: 10)
}

private func isHexDigit(_ c: UInt8) -> Bool {
    (c >= 48 && c <= 57) || (c >= 97 && c <= 102) || (c >= 65 && c <= 70)
}

/// Reads the members of one JSON object, tracking which were used.
public struct FieldReader {
    /// The object's path ("" for the body).
    public let path: String
    private let members: [(String, JSON)]
    private var used: Set<String> = []

    /// `value` must be an object; `path` names it ("" for the body).
    public init(_ value: JSON, path: String = "") throws(APIError) {
        guard case .object(let m) = value else {
            throw .invalidField(path.isEmpty ? "body" : path, "expected an object, got \(value.kindName)")
        }
        self.path = path
        self.members = m
    }

    /// The path of member `key`, for refusals.
    public func pathOf(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    /// Member `key`, marked as used; nil when absent.
    public mutating func value(_ key: String) -> JSON? {
        used.insert(key)
        return members.first { $0.0 == key }?.1
    }

    /// Member `key`, or `invalid_field` when absent.
    public mutating func required(_ key: String) throws(APIError) -> JSON {
        guard let v = value(key) else { throw .invalidField(pathOf(key), "missing required field \"\(key)\"") }
        return v
    }

    /// A required contract number.
    public mutating func number(_ key: String) throws(APIError) -> UInt64 {
        try parseNumber(required(key), field: pathOf(key))
    }

    /// A contract number, nil when absent.
    public mutating func optionalNumber(_ key: String) throws(APIError) -> UInt64? {
        guard let v = value(key) else { return nil }
        return try parseNumber(v, field: pathOf(key))
    }

    /// An integer in `range`, `d` when absent (a whole double counts).
    public mutating func int(_ key: String, default d: Int, in range: ClosedRange<Int>) throws(APIError) -> Int {
        guard let v = value(key) else { return d }
        var whole = v
        if case .double(let x) = v, x.rounded(.towardZero) == x, abs(x) < 1e15 { whole = .int(Int64(x)) }
        guard case .int(let i) = whole, range.contains(Int(clamping: i)) else {
            throw .invalidField(pathOf(key), "expected an integer in \(range.lowerBound)...\(range.upperBound)")
        }
        return Int(i)
    }

    /// A boolean, `d` when absent.
    public mutating func bool(_ key: String, default d: Bool) throws(APIError) -> Bool {
        guard let v = value(key) else { return d }
        guard case .bool(let b) = v else { throw .invalidField(pathOf(key), "expected true or false, got \(v.kindName)") }
        return b
    }

    /// A string, nil when absent.
    public mutating func string(_ key: String) throws(APIError) -> String? {
        guard let v = value(key) else { return nil }
        guard case .string(let s) = v else { throw .invalidField(pathOf(key), "expected a string, got \(v.kindName)") }
        return s
    }

    /// One of `E`'s raw values.
    public mutating func choice<E: RawRepresentable & CaseIterable>(_ key: String, default d: E) throws(APIError) -> E
    where E.RawValue == String {
        guard let s = try string(key) else { return d }
        guard let e = E(rawValue: s) else {
            throw .invalidField(pathOf(key), "must be one of " + E.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", "))
        }
        return e
    }

    /// Refuses members that were never asked for.
    public func finish() throws(APIError) {
        if let extra = members.first(where: { !used.contains($0.0) }) { throw .unknownField(pathOf(extra.0)) }
    }
}

/// `{"<key>":[…]}` or a single object: the array's elements with their paths.
public func entriesOf(_ body: JSON, key: String) throws(APIError) -> [(JSON, String)] {
    if case .object(let m) = body, m.count == 1, m[0].0 == key {
        guard case .array(let items) = m[0].1 else { throw .invalidField(key, "expected an array") }
        return items.enumerated().map { ($0.element, "\(key)[\($0.offset)]") }
    }
    if case .object(let m) = body, m.contains(where: { $0.0 == key }) {
        let extra = m.first { $0.0 != key }!.0
        throw .unknownField(extra)
    }
    return [(body, "")]
}
