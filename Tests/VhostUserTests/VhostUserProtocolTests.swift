// The vhost-user codec against the byte layouts of vhost-user.rst and
// <linux/vhost_types.h>.
import Testing
@testable import VhostUser

@Suite("vhost-user codec")
struct VhostUserProtocolTests {
    @Test("header: request, flags, size, little endian, 12 bytes")
    func header() {
        let h = VhostUserHeader(request: VhostUserRequest.getVringBase.rawValue,
                                flags: VhostUserHeader.version | VhostUserHeader.needReplyFlag, size: 8)
        #expect(h.bytes == [11, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0])
        #expect(VhostUserHeader(h.bytes) == h)
        #expect(h.needsReply)
        #expect(VhostUserRequest.getVringBase.hasReply && !VhostUserRequest.setVringBase.hasReply)
        #expect(VhostUserRequest(rawValue: 22) == .iotlbMsg)
        #expect(VhostUserRequest(rawValue: 41) == nil)
    }

    @Test("struct vhost_iotlb_msg: iova, size, uaddr, perm, type, padded to 32 bytes")
    func iotlbMessage() throws {
        let m = VhostIOTLBMessage(iova: 0x1122_3344_5566_7788, size: 0x1000, uaddr: 0x7f00_0000_0000, perm: 3, kind: .update)
        let b = m.bytes
        #expect(b.count == 32)
        #expect(Array(b[0..<8]) == [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11])
        #expect(b[24] == 3 && b[25] == 2)
        #expect(VhostIOTLBMessage(b) == m)
        #expect(VhostIOTLBMessage(Array(b.prefix(25))) == nil, "a short payload is refused")
    }

    @Test("payload reader stops at the end instead of reading past it")
    func reader() {
        var w = PayloadWriter()
        w.u32(7); w.u64(.max); w.u8(1)
        var r = PayloadReader(w.bytes)
        #expect(r.u32() == 7)
        #expect(r.u64() == .max)
        #expect(r.u64() == nil)
        #expect(r.u8() == 1)
        #expect(r.u8() == nil)
    }
}
