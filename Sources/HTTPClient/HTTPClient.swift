// A small blocking HTTP/1.1 client for loopback: the tests and the benchmark
// talk to a live daemon with it. Keep-alive, Content-Length bodies only (what
// our server sends). Not part of the daemon: its own target, in no product.
import JSON
import Glibc

/// One keep-alive connection to a server on this machine.
public final class HTTPClient {
    /// What came back.
    public struct Answer: Sendable {
        public var status: Int
        public var headers: [String: String]
        public var body: [UInt8]
        /// The body as JSON (`.null` when it is not JSON).
        public var json: JSON { (try? JSON.parse(body)) ?? .null }
        /// The body as text.
        public var text: String { String(decoding: body, as: UTF8.self) }
    }

    /// A transport failure.
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    private let host: String
    private let port: UInt16
    private var fd: Int32 = -1
    private var buffer: [UInt8] = []
    /// Headers sent with every request (e.g. Authorization).
    public var defaultHeaders: [(String, String)] = []

    public init(host: String = "127.0.0.1", port: UInt16) {
        self.host = host
        self.port = port
    }

    deinit { close() }

    /// Drops the connection (the next request opens a new one).
    public func close() {
        if fd >= 0 { Glibc.close(fd) }
        fd = -1
        buffer = []
    }

    private func connect() throws(Failure) {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: \(errno)") }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        inet_pton(AF_INET, host, &addr.sin_addr)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        if rc != 0 {
            let e = errno
            close()
            throw Failure(description: "connect to \(host):\(port): \(String(cString: strerror(e)))")
        }
    }

    /// Sends one request and reads its answer.
    public func request(_ method: String, _ path: String, body: [UInt8]? = nil,
                        headers: [(String, String)] = []) throws(Failure) -> Answer {
        for attempt in 0..<2 {
            if fd < 0 { try connect() }
            var head = "\(method) \(path) HTTP/1.1\r\nHost: \(host)\r\n"
            for (k, v) in defaultHeaders + headers { head += "\(k): \(v)\r\n" }
            if let body { head += "Content-Type: application/json\r\nContent-Length: \(body.count)\r\n" }
            head += "\r\n"
            let bytes = Array(head.utf8) + (body ?? [])
            do {
                try sendAll(bytes)
                return try readAnswer(method: method)
            } catch {
                close()
                // A kept-alive connection the server closed meanwhile: retry once on a new one.
                if attempt == 1 { throw error }
            }
        }
        throw Failure(description: "unreachable")
    }

    /// Sends a JSON body.
    public func request(_ method: String, _ path: String, json: JSON) throws(Failure) -> Answer {
        try request(method, path, body: json.serialized())
    }

    /// Sends a text body as is.
    public func request(_ method: String, _ path: String, text: String) throws(Failure) -> Answer {
        try request(method, path, body: Array(text.utf8))
    }

    private func sendAll(_ bytes: [UInt8]) throws(Failure) {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw Failure(description: "send: \(String(cString: strerror(errno)))")
            }
            off += n
        }
    }

    private func fill() throws(Failure) {
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n > 0 { buffer.append(contentsOf: chunk[0..<n]); return }
            if n < 0 && errno == EINTR { continue }
            throw Failure(description: n == 0 ? "connection closed" : "recv: \(String(cString: strerror(errno)))")
        }
    }

    private func readAnswer(method: String) throws(Failure) -> Answer {
        let crlf2: [UInt8] = [13, 10, 13, 10]
        var headEnd: Int?
        while headEnd == nil {
            if buffer.count >= 4 {
                headEnd = (0...(buffer.count - 4)).first { buffer[$0..<$0 + 4].elementsEqual(crlf2) }
            }
            if headEnd == nil { try fill() }
        }
        let head = String(decoding: buffer[0..<headEnd!], as: UTF8.self)
        buffer.removeFirst(headEnd! + 4)
        var lines = head.split(separator: "\r\n", omittingEmptySubsequences: false)
        let statusLine = lines.removeFirst().split(separator: " ")
        guard statusLine.count >= 2, let status = Int(statusLine[1]) else {
            throw Failure(description: "bad status line")
        }
        var headers: [String: String] = [:]
        for l in lines {
            guard let c = l.firstIndex(of: ":") else { continue }
            headers[l[..<c].lowercased()] = String(l[l.index(after: c)...].drop { $0 == " " })
        }
        var length = Int(headers["content-length"] ?? "0") ?? 0
        if method == "HEAD" || status == 204 || status == 304 { length = 0 }
        while buffer.count < length { try fill() }
        let body = Array(buffer[0..<length])
        buffer.removeFirst(length)
        if headers["connection"]?.lowercased() == "close" { close() }
        return Answer(status: status, headers: headers, body: body)
    }
}
