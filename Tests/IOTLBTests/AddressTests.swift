import IOTLB
import Testing

/// The address types' arithmetic: overflow is a value (nil), never a wrap.
@Suite struct AddressTests {
    @Test func checkedArithmetic() {
        #expect(IOVA(.max - 1).checkedAdd(1) == IOVA(.max))
        #expect(IOVA(.max).checkedAdd(1) == nil)
        #expect(UserAddr(0x1000).checkedSub(0x1000) == UserAddr(0))
        #expect(UserAddr(0x1000).checkedSub(0x1001) == nil)
        #expect(GuestPhysAddr(0x3000).checkedOffset(from: GuestPhysAddr(0x1000)) == 0x2000)
        #expect(GuestPhysAddr(0x1000).checkedOffset(from: GuestPhysAddr(0x3000)) == nil)
    }

    @Test func uncheckedInsideARange() {
        let r = AddressRange(start: IOVA(.max - 0xfff), size: 0x1000)!
        #expect(r.first.uncheckedAdd(0xfff) == r.last)
        #expect(r.last.uncheckedSub(0xfff) == r.first)
        #expect(r.last.uncheckedOffset(from: r.first) == r.sizeMinusOne)
        #expect(r.size == 0x1000)
    }
}
