// Misses forwarded to a front-end with a vIOMMU when sending fails: a lost
// send is counted and the miss is sent again. Part of the serialized
// "vhost-user backend" suite (VhostUserTests.swift).
import Glibc
import JSON
import Testing
@testable import VhostUser

extension VhostUserTests {
    @Test("a miss whose send to the front-end failed is counted and sent again on the front-end's next channel")
    func lostMissIsSentAgain() throws {
        let d = try LiveDaemon()
        let path = Self.socketPath("lost-miss")
        try d.expect(201, "POST", "/v1/devices", #"{"id":"vu","translator":"external","vhost_user":{"socket":"\#(path)"}}"#)
        let fe = try VhostUserFrontEnd(path: path, gpa: 0, uaddr: 0x7f00_0000_0000)
        _ = try fe.negotiate(features: Self.plainFeatures | VhostUserFeature.accessPlatform,
                             protocol: VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.backendReq)
        // A backend channel nobody reads any more: sending on it fails (EPIPE).
        var broken: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &broken) == 0)
        close(broken[0])
        try fe.send(.setBackendReqFD, fds: [broken[1]])
        close(broken[1])
        #expect(try fe.setMemTable() == 0)
        let shift: UInt64 = 0x1_0000_0000
        _ = try Traffic(fe, ringAddress: { $0 + shift }, address: { $0 + shift })  // the rings miss at once
        let failures = { try d.expect(200, "GET", "/v1/devices/vu")["vhost_user"]?["miss_send_failures"]?.intValue ?? 0 }
        #expect(try eventually { try failures() >= 1 }, "the failed send is counted")
        let polled = try d.expect(200, "GET", "/v1/devices/vu/iotlb/misses?after=0&timeout_ms=2000")
        guard case .array(let outstanding)? = polled["misses"], !outstanding.isEmpty else {
            Issue.record("no outstanding miss: \(polled.text)")
            return
        }
        #expect(try d.expect(200, "GET", "/v1/devices/vu")["vhost_user"]?["misses_forwarded"] == .int(0))

        // The front-end's next channel gets every outstanding miss.
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        defer { close(pair[0]) }
        try fe.send(.setBackendReqFD, fds: [pair[1]])
        close(pair[1])
        var received: [JSON] = []
        for _ in outstanding {
            let (header, payload) = try VhostUserFrontEnd.readMessage(pair[0])
            #expect(header.request == VhostUserBackendRequest.iotlbMsg.rawValue)
            let miss = try #require(VhostIOTLBMessage(payload))
            #expect(miss.kind == VhostIOTLBMessage.Kind.miss.rawValue)
            received.append(.hex(miss.iova))
        }
        #expect(received == outstanding.map { $0["iova"] ?? .null })
        // The session counts its sends after the batch (one status update), so
        // the messages can be read here before the count moves: wait for it.
        let forwarded = { try d.expect(200, "GET", "/v1/devices/vu")["vhost_user"]?["misses_forwarded"] }
        let counted = try eventually { try forwarded() == .int(Int64(outstanding.count)) }
        #expect(counted, "misses_forwarded is \(String(describing: try? forwarded())), not \(outstanding.count)")
        #expect(try failures() == 1, "one failed send: the broken channel was dropped, not retried")
    }
}
