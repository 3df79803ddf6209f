// JSON values: parsed by jansson (this target is the only one that imports it), written in Swift.
import CJansson

/// A JSON document as a Swift value. Objects keep their keys' order.
public enum JSON: Equatable, Sendable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSON])
    case object([(String, JSON)])

    /// Equal values; objects compare member by member, in order.
    public static func == (a: JSON, b: JSON) -> Bool {
        switch (a, b) {
        case (.null, .null): true
        case let (.bool(x), .bool(y)): x == y
        case let (.int(x), .int(y)): x == y
        case let (.double(x), .double(y)): x == y
        case let (.string(x), .string(y)): x == y
        case let (.array(x), .array(y)): x == y
        case let (.object(x), .object(y)): x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: false
        }
    }

    /// The member `key` of an object.
    public subscript(key: String) -> JSON? {
        if case .object(let pairs) = self { return pairs.first { $0.0 == key }?.1 }
        return nil
    }

    /// The kind of value, for error messages.
    public var kindName: String {
        switch self {
        case .null: "null"
        case .bool: "boolean"
        case .int: "integer"
        case .double: "number with a fraction"
        case .string: "string"
        case .array: "array"
        case .object: "object"
        }
    }
}

/// A body that is not JSON: where and why.
public struct JSONSyntaxError: Error, Equatable, Sendable {
    /// jansson's reason.
    public var message: String
    /// Where, 1-based.
    public var line: Int
    /// Where in the line, 1-based.
    public var column: Int
}

extension JSON {
    /// Parses `bytes` (one object or array, duplicate keys refused).
    public static func parse(_ bytes: [UInt8]) throws(JSONSyntaxError) -> JSON {
        var err = json_error_t()
        let flags = Int(JSON_REJECT_DUPLICATES) | Int(JSON_DECODE_ANY)
        // SAFETY: jansson hands back one reference, dropped (json_decref) once
        // the tree is converted; nothing keeps a json_t past this function.
        let root: UnsafeMutablePointer<json_t>? = bytes.withUnsafeBytes { buf in
            json_loadb(buf.baseAddress?.assumingMemoryBound(to: CChar.self), buf.count, flags, &err)
        }
        guard let root else {
            var text = withUnsafeBytes(of: err.text) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if text.contains("too big integer") {
                text += " (integers above 2^63-1 travel as strings, e.g. \"0xffffffffffffffff\")"
            }
            throw JSONSyntaxError(message: text, line: Int(err.line), column: Int(err.column))
        }
        defer { json_decref(root) }
        return convert(root)
    }

    private static func convert(_ v: UnsafeMutablePointer<json_t>) -> JSON {
        switch v.pointee.type {
        case JSON_OBJECT:
            var pairs: [(String, JSON)] = []
            var it = json_object_iter(v)
            while let i = it {
                let key = String(cString: json_object_iter_key(i))
                pairs.append((key, convert(json_object_iter_value(i))))
                it = json_object_iter_next(v, i)
            }
            return .object(pairs)
        case JSON_ARRAY:
            return .array((0..<json_array_size(v)).map { convert(json_array_get(v, $0)) })
        case JSON_STRING:
            let len = json_string_length(v)
            let p = UnsafeRawPointer(json_string_value(v)!)
            return .string(String(decoding: UnsafeRawBufferPointer(start: p, count: len), as: UTF8.self))
        case JSON_INTEGER: return .int(Int64(json_integer_value(v)))
        case JSON_REAL: return .double(json_real_value(v))
        case JSON_TRUE: return .bool(true)
        case JSON_FALSE: return .bool(false)
        default: return .null
        }
    }
}

extension JSON {
    /// Compact UTF-8 text.
    public func serialized() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(256)
        write(to: &out)
        return out
    }

    /// Compact text as a String.
    public var text: String { String(decoding: serialized(), as: UTF8.self) }

    private func write(to out: inout [UInt8]) {
        switch self {
        case .null: out.append(contentsOf: "null".utf8)
        case .bool(let b): out.append(contentsOf: (b ? "true" : "false").utf8)
        case .int(let i): out.append(contentsOf: String(i).utf8)
        case .double(let d): out.append(contentsOf: (d.isFinite ? "\(d)" : "null").utf8)
        case .string(let s): JSON.writeString(s, to: &out)
        case .array(let a):
            out.append(UInt8(ascii: "["))
            for (i, v) in a.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                v.write(to: &out)
            }
            out.append(UInt8(ascii: "]"))
        case .object(let pairs):
            out.append(UInt8(ascii: "{"))
            for (i, (k, v)) in pairs.enumerated() {
                if i > 0 { out.append(UInt8(ascii: ",")) }
                JSON.writeString(k, to: &out)
                out.append(UInt8(ascii: ":"))
                v.write(to: &out)
            }
            out.append(UInt8(ascii: "}"))
        }
    }

    private static func writeString(_ s: String, to out: inout [UInt8]) {
        let hex = Array("0123456789abcdef".utf8)
        out.append(UInt8(ascii: "\""))
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "\""): out.append(contentsOf: [92, 34])
            case UInt8(ascii: "\\"): out.append(contentsOf: [92, 92])
            case 0x0A: out.append(contentsOf: [92, UInt8(ascii: "n")])
            case 0x0D: out.append(contentsOf: [92, UInt8(ascii: "r")])
            case 0x09: out.append(contentsOf: [92, UInt8(ascii: "t")])
            case 0..<0x20:
                out.append(contentsOf: [92, UInt8(ascii: "u"), 48, 48, hex[Int(b >> 4)], hex[Int(b & 15)]])
            default: out.append(b)
            }
        }
        out.append(UInt8(ascii: "\""))
    }
}

/// Builds response objects: `["a": .int(1)]` keeps order.
extension JSON: ExpressibleByDictionaryLiteral, ExpressibleByArrayLiteral, ExpressibleByStringLiteral,
                ExpressibleByIntegerLiteral, ExpressibleByBooleanLiteral {
    /// An object, members in the order written.
    public init(dictionaryLiteral elements: (String, JSON)...) { self = .object(elements) }
    /// An array.
    public init(arrayLiteral elements: JSON...) { self = .array(elements) }
    /// A string.
    public init(stringLiteral value: String) { self = .string(value) }
    /// An integer.
    public init(integerLiteral value: Int64) { self = .int(value) }
    /// A boolean.
    public init(booleanLiteral value: Bool) { self = .bool(value) }

    /// An address or size: lowercase "0x…" hex, as the contract writes them.
    public static func hex(_ v: UInt64) -> JSON { .string("0x" + String(v, radix: 16)) }
    /// A counter.
    public static func count<I: BinaryInteger>(_ v: I) -> JSON { .int(Int64(clamping: v)) }
}
