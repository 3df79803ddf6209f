// The JSON value on its own: jansson's parser, the Swift writer, the literals.
import JSON
import Testing

@Suite struct JSONTests {
    @Test func parsesKeepingOrderAndWritesCompactly() throws {
        let v = try JSON.parse(Array(#"{"b": 1, "a": [true, null, 2.5, "x"]}"#.utf8))
        #expect(v == ["b": 1, "a": [true, .null, .double(2.5), "x"]])
        #expect(v.text == #"{"b":1,"a":[true,null,2.5,"x"]}"#)
        #expect(v["a"]?.kindName == "array" && v["missing"] == nil)
    }

    @Test func objectsCompareInOrder() {
        #expect(JSON(dictionaryLiteral: ("a", 1), ("b", 2)) != JSON(dictionaryLiteral: ("b", 2), ("a", 1)))
    }

    @Test func refusesDuplicateKeysAndSaysWhere() {
        do throws(JSONSyntaxError) {
            _ = try JSON.parse(Array("{\"a\":1,\n\"a\":2}".utf8))
            Issue.record("a duplicate key was accepted")
        } catch {
            #expect(error.line == 2 && error.message.contains("duplicate"), "\(error)")
        }
    }

    @Test func tooBigAnIntegerSaysHowToSendIt() {
        do throws(JSONSyntaxError) {
            _ = try JSON.parse(Array(#"{"iova":18446744073709551615}"#.utf8))
            Issue.record("an integer past 2^63-1 was accepted")
        } catch {
            #expect(error.message.contains("travel as strings"), "\(error)")
        }
    }

    @Test func escapesWhatStringsMustEscape() {
        let s: JSON = .string("q\"b\\n\nt\tc\u{1}é")
        #expect(s.text == #""q\"b\\n\nt\tc\u0001é""#)
        #expect((try? JSON.parse(s.serialized())) == s)
    }

    @Test func addressesAreLowercaseHexAndCountersIntegers() {
        #expect(JSON.hex(0xDEAD_BEEF) == "0xdeadbeef" && JSON.hex(0) == "0x0")
        #expect(JSON.count(UInt64.max) == .int(Int64.max))
        #expect(JSON.double(.infinity).text == "null")
    }
}
