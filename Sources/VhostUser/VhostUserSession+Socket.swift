// The vhost-user session's socket: whole messages in, replies out.
import CUnixSocket
import Glibc

extension VhostUserSession {
    // MARK: Socket

    func readExactly(_ buf: inout [UInt8], from start: Int) throws(VhostUserProtocolError) {
        var at = start
        while at < buf.count {
            // SAFETY: at < buf.count: recv writes at most the count-at bytes left in buf.
            let n = buf.withUnsafeMutableBytes { recv(conn, $0.baseAddress! + at, $0.count - at, 0) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw VhostUserProtocolError("the front-end closed the socket mid-message") }
            at += n
        }
    }

    func send(_ request: UInt32, _ payload: [UInt8]) throws(VhostUserProtocolError) {
        let head = VhostUserHeader(request: request, flags: VhostUserHeader.version | VhostUserHeader.replyFlag,
                                   size: UInt32(payload.count))
        let bytes = head.bytes + payload
        let n = bytes.withUnsafeBytes { cunixsock_send(conn, $0.baseAddress, $0.count, nil, 0) }
        guard n == bytes.count else { throw VhostUserProtocolError("reply not sent: \(String(cString: strerror(errno)))") }
    }

    func sendAck(_ request: UInt32, ok: Bool) throws(VhostUserProtocolError) {
        var w = PayloadWriter()
        w.u64(ok ? 0 : 1)
        try send(request, w.bytes)
    }
}
