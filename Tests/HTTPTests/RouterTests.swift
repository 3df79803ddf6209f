// The router on its own: patterns, parameters, 404 and 405, HEAD, one match per request.
import HTTP
import JSON
import Testing

@Suite struct RouterTests {
    static func router() -> Router {
        var r = Router()
        r.get("/v1/things") { _ in .json(200, ["things": []]) }
        r.post("/v1/things") { _ in .json(201, ["made": true]) }
        r.get("/v1/things/{id}/parts/{n}") { req in .json(200, ["id": .string(req.params["id"] ?? ""), "n": .string(req.params["n"] ?? "")]) }
        r.delete("/v1/things/{id}") { req throws(APIError) in throw .notFound("thing \(req.params["id"] ?? "") not found") }
        return r
    }

    static func answer(_ reply: Reply) -> Response? {
        if case .now(let r) = reply { return r }
        return nil
    }

    @Test func capturesParameters() throws {
        let r = try #require(Self.answer(Self.router().route(Request(method: "GET", path: "/v1/things/t1/parts/3"))))
        #expect(r.status == 200 && String(decoding: r.body, as: UTF8.self) == "{\"id\":\"t1\",\"n\":\"3\"}\n")
    }

    @Test func aThrownRefusalIsItsErrorBody() throws {
        let r = try #require(Self.answer(Self.router().route(Request(method: "DELETE", path: "/v1/things/t9"))))
        #expect(r.status == 404)
        #expect(String(decoding: r.body, as: UTF8.self) == #"{"error":{"code":"not_found","message":"thing t9 not found"}}"# + "\n")
    }

    @Test func unknownPathsAndMethods() throws {
        let router = Self.router()
        let none = try #require(Self.answer(router.route(Request(method: "GET", path: "/v1/nothing"))))
        #expect(none.status == 404)
        let wrong = try #require(Self.answer(router.route(Request(method: "PUT", path: "/v1/things"))))
        #expect(wrong.status == 405 && wrong.headers.contains { $0 == ("Allow", "GET, POST") })
    }

    @Test func matchNamesThePatternAndRunsOnlyWhenAsked() throws {
        var r = Router()
        nonisolated(unsafe) var runs = 0
        r.get("/v1/x/{id}") { _ in runs += 1; return .json(200, [:]) }
        let m = r.match(Request(method: "GET", path: "/v1/x/7"))
        #expect(m.pattern == "/v1/x/{id}" && runs == 0)
        #expect(Self.answer(m.reply())?.status == 200 && runs == 1)
        // HEAD is served by the GET route; its label is not the GET route's.
        let head = r.match(Request(method: "HEAD", path: "/v1/x/7"))
        #expect(head.pattern == nil && Self.answer(head.reply())?.status == 200)
        #expect(r.match(Request(method: "POST", path: "/v1/x/7")).pattern == nil)
        #expect(r.match(Request(method: "GET", path: "/v1/y")).pattern == nil)
    }

    @Test func requestBodiesAndQueries() {
        var req = Request(method: "POST", path: "/", query: [("a", "1"), ("b", "2"), ("a", "3")], body: Array("{\"k\":".utf8))
        #expect(req.query("a") == "1")
        #expect(throws: APIError.self) { try req.allowOnly(["a"]) }
        do throws(APIError) {
            _ = try req.json()
            Issue.record("a broken body parsed")
        } catch {
            #expect(error.code == "bad_json" && error.message.contains("at line 1, column"))
        }
        req.body = []
        #expect(throws: APIError(400, "bad_json", "the request needs a JSON body")) { try req.json() }
    }
}
