// Decoding what is particular to this contract: permissions and IOVA ranges.
import HTTP
import IOTLB
import JSON

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

extension FieldReader {
    /// A required permission: "ro"/"wo"/"rw" or 1/2/3.
    mutating func perm(_ key: String) throws(APIError) -> Permissions {
        try parsePerm(required(key), field: pathOf(key))
    }
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
