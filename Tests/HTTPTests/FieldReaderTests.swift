// Request field decoding: contract numbers, paths in refusals, unknown members.
import HTTP
import JSON
import Testing

@Suite struct FieldReaderTests {
    @Test func contractNumbers() throws {
        #expect(try parseNumber(.int(4096), field: "f") == 4096)
        #expect(try parseNumber("0xFFFFFFFFFFFFFFFF", field: "f") == .max)
        #expect(try parseNumber("18446744073709551615", field: "f") == .max)
        #expect(try parseNumber(.double(4096), field: "f") == 4096)
        #expect(parseNumber(text: "0x") == nil && parseNumber(text: "0x10000000000000000") == nil)
        #expect(parseNumber(text: "-1") == nil && parseNumber(text: "") == nil)
        #expect(throws: APIError.invalidField("f", "must be >= 0")) { try parseNumber(.int(-1), field: "f") }
        #expect(throws: APIError.self) { try parseNumber(.double(0.5), field: "f") }
    }

    @Test func refusalsNameTheFieldByItsPath() throws {
        var f = try FieldReader(["n": "zz", "ok": true], path: "entries[3]")
        #expect(throws: APIError.self) { try f.number("n") }
        do throws(APIError) { _ = try f.number("n") } catch { #expect(error.field == "entries[3].n") }
        do throws(APIError) { _ = try f.required("gone") } catch {
            #expect(error == .invalidField("entries[3].gone", "missing required field \"gone\""))
        }
        #expect(try f.bool("ok", default: false))
        #expect(try f.int("absent", default: 7, in: 1...9) == 7)
    }

    @Test func unknownMembersAreRefused() throws {
        var f = try FieldReader(["a": 1, "b": 2])
        _ = f.value("a")
        #expect(throws: APIError.unknownField("b")) { try f.finish() }
        _ = f.value("b")
        try f.finish()
        #expect(throws: APIError.invalidField("body", "expected an object, got array")) { try FieldReader([1]) }
    }

    @Test func entriesOrOneEntry() throws {
        let many = try entriesOf(["entries": [["a": 1], ["a": 2]]], key: "entries")
        #expect(many.map(\.1) == ["entries[0]", "entries[1]"])
        let one = try entriesOf(["a": 1], key: "entries")
        #expect(one.count == 1 && one[0].1 == "")
        #expect(throws: APIError.unknownField("x")) { try entriesOf(["entries": [], "x": 1], key: "entries") }
    }

    @Test func theErrorBody() {
        #expect(APIError(422, "range_overflow", "too far", field: "size").body.text
                == #"{"error":{"code":"range_overflow","message":"too far","field":"size"}}"#)
        #expect(APIError.notFound("gone").body.text == #"{"error":{"code":"not_found","message":"gone"}}"#)
    }
}
