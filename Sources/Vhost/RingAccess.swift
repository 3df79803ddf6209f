// Ring field access for the split ring (virtio 1.x, 2.7) and the ring-side
// parts both layouts share: loads and stores of ring fields, descriptors, used
// elements, the used index and notifications. After a successful prefetch of
// the round (`prepareRings`) an area that maps to one contiguous host range is
// reached through its host pointer; otherwise through the accessors.
import Glibc
import IOTLB
import CRingAtomics

extension VringConfig {
    /// The descriptor table, avail and used rings as addresses of `R`, the
    /// space the device reads them in (IOVAs, or user addresses without IOTLB).
    @inline(__always)
    func areas<R: Address>(_: R.Type) -> (desc: R, avail: R, used: R) { (R(descAddr), R(availAddr), R(usedAddr)) }
}

/// `offset` bytes into a ring area: `problem()` refused any ring passing 2^64-1.
@inline(__always)
func ringField<R: Address>(_ base: R, _ offset: Int) -> R { base.uncheckedAdd(UInt64(offset)) }

extension Device {
    @inline(__always)
    func ringLoad16<R: TranslatedAddress>(_ vq: VirtQueue, _ host: UnsafeMutableRawPointer?, _ base: R, _ offset: Int,
                                          acquire: Bool = false) -> UInt16 {
        if let host {
            // SAFETY: prepareRings checked the whole area maps to this host range; offset+2 <= its size.
            let p = host + offset
            return UInt16(littleEndian: acquire ? CRingAtomics_load_acquire_u16(p) : p.loadUnaligned(as: UInt16.self))
        }
        var v: UInt16 = 0
        _ = withUnsafeMutableBytes(of: &v) {
            copyFromGuest(ringField(base, offset), $0.baseAddress!, 2, &vq.ringCache.pointee, vq)
        }
        if acquire { CRingAtomics_fence_acquire() }
        return UInt16(littleEndian: v)
    }

    @inline(__always)
    func ringStore16<R: TranslatedAddress>(_ vq: VirtQueue, _ host: UnsafeMutableRawPointer?, _ base: R, _ offset: Int,
                                           _ value: UInt16, release: Bool = false) {
        if let host {
            // SAFETY: prepareRings checked the whole area maps to this host range; offset+2 <= its size.
            let p = host + offset
            if release { CRingAtomics_store_release_u16(p, value.littleEndian) } else {
                p.storeBytes(of: value.littleEndian, toByteOffset: 0, as: UInt16.self)
            }
            return
        }
        if release { CRingAtomics_fence_release() }
        var v = value.littleEndian
        _ = withUnsafeBytes(of: &v) {
            copyToGuest(ringField(base, offset), $0.baseAddress!, 2, &vq.ringCache.pointee, vq)
        }
    }

    /// Descriptor `i` of the queue's table (`i` < num).
    @inline(__always)
    func descriptor<R: TranslatedAddress>(_ vq: VirtQueue, _ i: UInt16, _: R.Type) -> Descriptor {
        // SAFETY: i < num (the walker checks), and prepareRings mapped the table's 16·num bytes here.
        if let host = vq.descHost { return Descriptor.decode(host + SplitRing.descriptor(Int(i))) }
        // The ring was checked whole this round (prepareRings); were it not to
        // translate, an empty descriptor reads as nothing rather than garbage.
        let at = ringField(R(vq.config!.descAddr), SplitRing.descriptor(Int(i)))
        return (try? readDescriptor(at, &vq.ringCache.pointee, vq, Descriptor.decode).get()) ?? Descriptor(addr: 0, len: 0)
    }

    /// A TX chain at `head` sent (`sent` bytes): its used element written (not
    /// yet published), the avail position moved past it, the queue's figures counted.
    @inline(__always)
    func handBackTX<R: TranslatedAddress>(_ tx: VirtQueue, head: UInt16, sent: Int, _: R.Type) {
        putUsed(tx, id: head, len: 0, R.self)
        tx.lastAvailIdx &+= 1
        tx.chains &+= 1
        tx.bytes &+= UInt64(sent)
    }

    /// Writes used element `(id, len)` at the queue's current used index (not yet published).
    @inline(__always)
    func putUsed<R: TranslatedAddress>(_ vq: VirtQueue, id: UInt16, len: UInt32, _: R.Type) {
        let slot = Int(vq.usedIdx) & (vq.config!.num - 1)
        let offset = SplitRing.usedElement(slot)
        if let host = vq.usedHost {
            // SAFETY: slot < num, so offset+8 <= 4+8·num, inside the used area prepareRings mapped here.
            (host + offset).storeBytes(of: UInt32(id).littleEndian, as: UInt32.self)
            (host + offset + 4).storeBytes(of: len.littleEndian, as: UInt32.self)
        } else {
            var elem = (UInt32(id).littleEndian, len.littleEndian)
            _ = withUnsafeBytes(of: &elem) {
                copyToGuest(ringField(R(vq.config!.usedAddr), offset), $0.baseAddress!, 8, &vq.ringCache.pointee, vq)
            }
        }
        if R.logs { logUsed(vq, offset, 8) }
        vq.usedIdx &+= 1
    }

    /// Publishes the used index (release: elements first) and, with EVENT_IDX,
    /// decides whether the driver asked to be notified.
    func publishUsed<R: TranslatedAddress>(_ vq: VirtQueue, from old: UInt16, _: R.Type) {
        guard let c = vq.config else { return }
        if R.logs { logFlush() }  // logging: the bits of what the entries hand over (the index's: next flush)
        let ring = c.areas(R.self)
        ringStore16(vq, vq.usedHost, ring.used, SplitRing.usedIdx, vq.usedIdx, release: true)
        if R.logs { logUsed(vq, SplitRing.usedIdx, 2) }
        if c.eventIdx {
            ringStore16(vq, vq.usedHost, ring.used, SplitRing.availEvent(num: c.num), vq.lastAvailIdx)
            if R.logs { logUsed(vq, SplitRing.availEvent(num: c.num), 2) }
            CRingAtomics_fence_seq_cst()
            let usedEvent = ringLoad16(vq, vq.availHost, ring.avail, SplitRing.usedEvent(num: c.num))
            // vring_need_event: notify when used_event lies in (old, new].
            if vq.usedIdx &- usedEvent &- 1 < vq.usedIdx &- old { notify(vq) }
        } else {
            let flags = ringLoad16(vq, vq.availHost, ring.avail, SplitRing.availFlags)
            if flags & 1 == 0 { notify(vq) }  // VRING_AVAIL_F_NO_INTERRUPT clear
        }
    }

    /// The driver asked to hear of used buffers: count it, and signal its call
    /// eventfd when it gave one (polling drivers suppress this, so it is rare).
    @inline(__always)
    func notify(_ vq: VirtQueue) {
        vq.notifications &+= 1
        if vq.callFD >= 0 {
            var one: UInt64 = 1
            _ = write(vq.callFD, &one, 8)
        }
    }

    /// VRING_USED_F_NO_NOTIFY while the worker polls, clear when it wants kicks.
    func writeUsedFlags(_ vq: VirtQueue) {
        switch logMode {
        case .off:
            if config.iotlb { writeUsedFlags(vq, ThroughIOTLB.Ring.self) } else { writeUsedFlags(vq, ThroughMemoryTable.Ring.self) }
        case .on:
            if config.iotlb { writeUsedFlags(vq, LoggedIOTLB.Ring.self) } else { writeUsedFlags(vq, LoggedMemoryTable.Ring.self) }
        case .waiting:
            break  // nothing is written unlogged; preparing the ring once the log comes writes them
        }
    }

    func writeUsedFlags<R: TranslatedAddress>(_ vq: VirtQueue, _: R.Type) {
        defer { if R.logs { logFlush() } }
        if let c = vq.config, c.packed {
            // The device's event suppression area: notifications wanted or not.
            ringStore16(vq, vq.usedHost, c.areas(R.self).used, PackedRing.eventFlags,
                        kicksWanted ? PackedRing.eventEnable : PackedRing.eventDisable)
            if R.logs { logUsed(vq, PackedRing.eventFlags, 2) }
            return
        }
        guard let c = vq.config else { return }
        if c.eventIdx {
            // vhost_enable_notify: avail_event at the next entry asks for a kick when one is added.
            if kicksWanted {
                ringStore16(vq, vq.usedHost, c.areas(R.self).used, SplitRing.availEvent(num: c.num), vq.lastAvailIdx)
                if R.logs { logUsed(vq, SplitRing.availEvent(num: c.num), 2) }
            }
            return
        }
        ringStore16(vq, vq.usedHost, c.areas(R.self).used, SplitRing.usedFlags, kicksWanted ? 0 : 1)
        if R.logs { logUsed(vq, SplitRing.usedFlags, 2) }
    }
}
