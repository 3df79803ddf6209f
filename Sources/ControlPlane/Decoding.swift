// Reading request fields with their paths, so every refusal names the field
// at fault ("entries[3].uaddr"). Unknown members are refused, not ignored.
import IOTLB
import JSON

/// Parses a contract number: a JSON integer >= 0, or a string of "0x" hex or
/// decimal digits, up to 2^64-1.
func parseNumber(_ v: JSON, field: String) throws(APIError) -> UInt64 {
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
func parseNumber(text s: String) -> UInt64? {
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

/// Parses "ro"/"wo"/"rw" or 1/2/3.
func parsePerm(_ v: JSON, field: String) throws(APIError) -> Permissions {
    switch v {
    case .string(let s):
        if let p = Permissions(name: s) { return p }
    case .int(let i) where (1...3).contains(i):
        return Permissions(rawValue: UInt8(i))
    default: break
    }
    throw .invalidField(field, "perm must be \"ro\", \"wo\", \"rw\" (or 1, 2, 3)")
}

/// Reads the members of one JSON object, tracking which were used.
struct FieldReader {
    let path: String
    private let members: [(String, JSON)]
    private var used: Set<String> = []

    /// `value` must be an object; `path` names it ("" for the body).
    init(_ value: JSON, path: String = "") throws(APIError) {
        guard case .object(let m) = value else {
            throw .invalidField(path.isEmpty ? "body" : path, "expected an object, got \(value.kindName)")
        }
        self.path = path
        self.members = m
    }

    func pathOf(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    mutating func value(_ key: String) -> JSON? {
        used.insert(key)
        return members.first { $0.0 == key }?.1
    }

    mutating func required(_ key: String) throws(APIError) -> JSON {
        guard let v = value(key) else { throw .invalidField(pathOf(key), "missing required field \"\(key)\"") }
        return v
    }

    mutating func number(_ key: String) throws(APIError) -> UInt64 {
        try parseNumber(required(key), field: pathOf(key))
    }

    mutating func optionalNumber(_ key: String) throws(APIError) -> UInt64? {
        guard let v = value(key) else { return nil }
        return try parseNumber(v, field: pathOf(key))
    }

    mutating func int(_ key: String, default d: Int, in range: ClosedRange<Int>) throws(APIError) -> Int {
        guard let v = value(key) else { return d }
        var whole = v
        if case .double(let x) = v, x.rounded(.towardZero) == x, abs(x) < 1e15 { whole = .int(Int64(x)) }
        guard case .int(let i) = whole, range.contains(Int(clamping: i)) else {
            throw .invalidField(pathOf(key), "expected an integer in \(range.lowerBound)...\(range.upperBound)")
        }
        return Int(i)
    }

    mutating func bool(_ key: String, default d: Bool) throws(APIError) -> Bool {
        guard let v = value(key) else { return d }
        guard case .bool(let b) = v else { throw .invalidField(pathOf(key), "expected true or false, got \(v.kindName)") }
        return b
    }

    mutating func string(_ key: String) throws(APIError) -> String? {
        guard let v = value(key) else { return nil }
        guard case .string(let s) = v else { throw .invalidField(pathOf(key), "expected a string, got \(v.kindName)") }
        return s
    }

    /// One of `E`'s raw values.
    mutating func choice<E: RawRepresentable & CaseIterable>(_ key: String, default d: E) throws(APIError) -> E
    where E.RawValue == String {
        guard let s = try string(key) else { return d }
        guard let e = E(rawValue: s) else {
            throw .invalidField(pathOf(key), "must be one of " + E.allCases.map { "\"\($0.rawValue)\"" }.joined(separator: ", "))
        }
        return e
    }

    mutating func perm(_ key: String) throws(APIError) -> Permissions {
        try parsePerm(required(key), field: pathOf(key))
    }

    /// Refuses members that were never asked for.
    func finish() throws(APIError) {
        if let extra = members.first(where: { !used.contains($0.0) }) { throw .unknownField(pathOf(extra.0)) }
    }
}

/// `{"<key>":[…]}` or a single object: the array's elements with their paths.
func entriesOf(_ body: JSON, key: String) throws(APIError) -> [(JSON, String)] {
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

/// A closed IOVA range from `iova` and `size` members; size 0 or a wrap is `range_overflow`.
func readRange(_ r: inout FieldReader) throws(APIError) -> AddressRange<IOVA> {
    let iova = try r.number("iova")
    let size = try r.number("size")
    guard let range = AddressRange(start: IOVA(iova), size: size) else {
        throw APIError(422, "range_overflow", size == 0 ? "size must be at least 1" : "iova+size passes 2^64-1",
                       field: r.pathOf("size"))
    }
    return range
}
