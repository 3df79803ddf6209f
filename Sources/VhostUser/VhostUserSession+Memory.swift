// The vhost-user session's memory side: the front-end's memory table (mapped
// from the files it passes), its IOTLB messages (a vIOMMU front-end), and the
// device's misses (sent to that front-end, or answered here by identity).
import CUnixSocket
import Glibc
import IOTLB
import Vhost

extension VhostUserSession {
    func setMemTable(_ r: inout PayloadReader, _ fds: inout [Int32]) throws {
        guard let n = r.u32(), r.u32() != nil else { throw VhostUserProtocolError("SET_MEM_TABLE: payload too short") }
        let live = fds.filter { $0 >= 0 }
        guard n >= 1, Int(n) <= 8, live.count == Int(n) else {
            throw VhostUserProtocolError("SET_MEM_TABLE: \(n) regions with \(live.count) file descriptors")
        }
        var regions: [VhostUserMemoryRegion] = []
        for _ in 0..<n {
            guard let gpa = r.u64(), let size = r.u64(), let ua = r.u64(), let off = r.u64() else {
                throw VhostUserProtocolError("SET_MEM_TABLE: payload too short")
            }
            regions.append(VhostUserMemoryRegion(guestPhysAddr: gpa, memorySize: size, userspaceAddr: ua, mmapOffset: off))
        }
        let table = try MemoryTable(regions: regions.map(\.region), maxRegions: backend.limits.maxMemRegions,
                                    maxTotalBytes: backend.limits.maxGuestMemory)
        let mem = try GuestMemory(table: table, files: zip(live, regions).map { ($0, $1.mmapOffset) })
        // The mappings hold the memory now; the descriptors are closed by the caller.
        // Without a front-end vIOMMU the identity translator answers misses on
        // the worker itself (no round trip through the miss log and this thread).
        var identity: MissResolver?
        if config.iotlb && !frontEndIOMMU && config.translator == .builtin {
            let status = backend
            identity = MissResolver { iova, _, _, out in
                guard out.count > 0, let e = VhostUserSession.identityEntry(for: iova, in: table) else { return 0 }
                status.updateStatus { $0.identityUpdates += 1 }
                out[0] = e
                return 1
            }
        }
        let resolver = identity
        handle.performSync { d in
            d?.install(memory: mem)
            d?.missResolver = resolver
        }
        memory = mem
        for i in rings.indices { try syncRing(i) }
    }

    func applyIOTLB(_ m: VhostIOTLBMessage) throws {
        guard config.iotlb else { throw Refused("IOTLB_MSG on a device created with \"iotlb\": false") }
        switch VhostIOTLBMessage.Kind(rawValue: m.kind) {
        case .update:
            guard let range = AddressRange(start: IOVA(m.iova), size: m.size) else {
                throw Refused("IOTLB update: size 0 or iova+size past 2^64")
            }
            let entry = IOTLBEntry(range: range, uaddr: UserAddr(m.uaddr), perm: Permissions(rawValue: m.perm & 3))
            let result = handle.performSync { d -> Result<UpdateReport, EngineError> in
                guard let d else { return .failure(.notFound("device gone")) }
                do throws(EngineError) { return .success(try d.updateIOTLB([entry])) } catch { return .failure(error) }
            }
            if case .failure(let e) = result { throw Refused("IOTLB update: \(e)") }
        case .invalidate:
            guard let range = AddressRange(start: IOVA(m.iova), size: m.size) else {
                throw Refused("IOTLB invalidation: size 0 or iova+size past 2^64")
            }
            let result = handle.performSync { d -> Result<Int, EngineError> in
                guard let d else { return .failure(.notFound("device gone")) }
                do throws(EngineError) { return .success(try d.invalidateIOTLB([range])) } catch { return .failure(error) }
            }
            if case .failure(let e) = result { throw Refused("IOTLB invalidation: \(e)") }
        default:
            throw Refused("IOTLB message type \(m.kind) is not for a backend")
        }
    }

    // MARK: Misses

    /// New misses: sent to a front-end with a vIOMMU over the backend channel;
    /// without one (and with the built-in translator) answered here by
    /// identity, IOVA = guest-physical address, 2 MiB at a time clipped to the region.
    ///
    /// The miss log, not the observer's event, says what to send: the observer
    /// only wakes this thread, and the log gives what is still outstanding past
    /// the cursor (a miss resolved meanwhile is not sent). The cursor passes a
    /// miss only once it was sent, so a miss whose send failed (counted) or
    /// that came before the front-end gave its channel is sent again:
    /// `missesUnsent` makes the loop try again within 50 ms while the channel
    /// is full; a broken channel is closed and the misses go on the next.
    func answerMisses() {
        guard case .events(let events, let last) = handle.missLog.events(after: missCursor, limit: 256) else { return }
        missesUnsent = false
        guard frontEndIOMMU else {
            missCursor = last
            return answerByIdentity(events.filter { $0.kind == .miss })
        }
        guard backendFD >= 0 else { return }  // sent once the front-end gives its channel
        var sent: UInt64 = 0
        defer { if sent > 0 { backend.updateStatus { $0.missesForwarded += sent } } }
        for e in events {
            if e.kind == .miss {
                let m = VhostIOTLBMessage(iova: e.iova.raw, size: 1, uaddr: 0, perm: e.perm.rawValue, kind: .miss)
                let head = VhostUserHeader(request: VhostUserBackendRequest.iotlbMsg.rawValue, size: UInt32(m.bytes.count))
                let bytes = head.bytes + m.bytes
                let n = bytes.withUnsafeBytes { cunixsock_send_nowait(backendFD, $0.baseAddress, $0.count) }
                guard n == bytes.count else {
                    let full = n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)
                    backend.updateStatus { $0.missSendFailures += 1 }
                    if full { missesUnsent = true } else { closeFD(&backendFD) }  // broken, or a part sent: the stream is lost
                    return
                }
                sent += 1
            }
            missCursor = e.seq
        }
        missCursor = max(missCursor, last)
    }

    private func answerByIdentity(_ misses: [MissEvent]) {
        guard !misses.isEmpty, config.translator == .builtin, let table = memory?.table else { return }
        var entries: [IOTLBEntry] = []
        for e in misses {
            if let entry = Self.identityEntry(for: e.iova, in: table), !entries.contains(entry) { entries.append(entry) }
        }
        if entries.isEmpty { return }
        let batch = entries
        let applied = handle.performSync { d -> Int in
            // The table may have changed meanwhile: only entries it still backs.
            guard let d, d.memTable == table else { return 0 }
            return (try? d.updateIOTLB(batch))?.applied ?? 0
        }
        backend.updateStatus { $0.identityUpdates += UInt64(applied) }
    }

    /// The identity mapping around `iova`: its 2 MiB page as a guest-physical
    /// range, clipped to the region holding it, read-write.
    static func identityEntry(for iova: IOVA, in table: MemoryTable) -> IOTLBEntry? {
        let first = iova.raw & ~UInt64((2 << 20) - 1)  // aligned: first + 2 MiB - 1 cannot wrap
        let page = AddressRange(first: IOVA(first), last: IOVA(first + ((2 << 20) - 1)))
        return table.iotlbEntry(mapping: page, toGPA: GuestPhysAddr(first), around: iova, perm: .readWrite)
    }
}
