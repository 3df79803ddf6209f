import Glibc
import IOTLB
import Ports
import Testing
@testable import Vhost

/// SEND_RARP's announcement goes where the guest's frames go: out of a TAP
/// (behind the virtio-net header the TAP was set up with), onto a peer's wire.
@Suite("Announcing a migrated guest (RARP)")
struct AnnounceTests {
    let mac: [UInt8] = [0x52, 0x54, 0x00, 0x01, 0x02, 0x03]

    @Test("a TAP port sends one RARP broadcast from the guest's MAC, behind a zero 12-byte header")
    func outOfTheTap() throws {
        let rig = try PortRig()
        rig.device.announce(mac: mac)
        rig.run()
        let frame = try #require(rig.hostRead())
        #expect(frame == [UInt8](repeating: 0, count: 12) + Device.rarpFrame(mac: mac))
        #expect(Array(frame[12..<18]) == [UInt8](repeating: 0xff, count: 6) && Array(frame[18..<24]) == mac)
        #expect(frame[24] == 0x80 && frame[25] == 0x35)  // ETH_P_RARP
        #expect(rig.hostRead() == nil, "once")
        #expect(rig.device.announcements == 1)
    }

    @Test("a loopback device without RX buffers keeps the announcement until one is offered")
    func waitsForABuffer() throws {
        let rig = try PortRig(port: .loopback)
        rig.device.announce(mac: mac)
        rig.run()
        #expect(rig.device.announcements == 0)
        let at = rig.offerRX(1, size: 2048)
        rig.run()
        #expect(rig.device.announcements == 1)
        let used = try #require(rig.rx.takeUsed())
        #expect(used.len == 72)
        #expect(Array(rig.read(at[used.id]!, 72)[12...]) == Device.rarpFrame(mac: mac))
    }
}
