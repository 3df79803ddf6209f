// The vhost-user session's side of live migration: the dirty log a migrating
// front-end shares (SET_LOG_BASE with LOG_SHMFD, SET_LOG_FD), and the
// announcement a destination asks for (SEND_RARP). VHOST_F_LOG_ALL itself
// arrives with SET_FEATURES and VHOST_VRING_F_LOG with SET_VRING_ADDR
// (VhostUserSession.swift); the device does the logging (Vhost/Datapath+Log.swift).
import Glibc
import Platform
import Vhost

extension VhostUserSession {
    /// SET_VRING_ADDR's flag: log_guest_addr is valid, the used ring is logged there.
    static let vringFLog: UInt32 = 1 << 0

    /// SET_LOG_BASE: maps the log at its offset and size (struct
    /// vhost_user_log: u64 mmap_size, u64 mmap_offset; the descriptor rides
    /// along), gives it to the device, and replies once the device writes only
    /// to the new log (QEMU unmaps the old one then). A log that cannot be
    /// mapped ends the connection: carrying on would let pages go unlogged.
    func setLogBase(_ r: inout PayloadReader, _ fds: inout [Int32]) throws(VhostUserProtocolError) -> [UInt8] {
        guard let size = r.u64(), let offset = r.u64() else { throw VhostUserProtocolError("SET_LOG_BASE: payload too short") }
        guard let at = fds.firstIndex(where: { $0 >= 0 }) else {
            throw VhostUserProtocolError("SET_LOG_BASE without a file descriptor (LOG_SHMFD)")
        }
        let log: DirtyLog
        do throws(SystemCallError) { log = try DirtyLog(fd: fds[at], size: size, offset: offset) } catch {
            throw VhostUserProtocolError("SET_LOG_BASE: \(error)")
        }
        handle.performSync { $0?.setDirtyLog(log) }
        dirtyLog = log  // the descriptor is closed by the caller; the mapping stays
        backend.log("vhost-user: dirty log of \(size) bytes (guest memory below 0x\(String(log.pages << 12, radix: 16)))")
        // QEMU reads a reply header and expects no payload (as DPDK answers).
        return []
    }

    /// SEND_RARP: the guest's MAC in the first 6 bytes of a u64.
    func sendRARP(_ r: inout PayloadReader) throws {
        guard protocolFeatures & VhostUserProtocolFeature.rarp != 0 else {
            throw Refused("SEND_RARP without the RARP protocol feature")
        }
        guard let v = r.u64() else { throw VhostUserProtocolError("SEND_RARP: payload too short") }
        let mac = (0..<6).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) }
        handle.performSync { $0?.announce(mac: mac) }
        backend.updateStatus { $0.announcements += 1 }
    }

    /// The front-end left: logging stops and the log goes.
    func dropLog() {
        handle.performSync { d in
            d?.setLogging(false)
            d?.setDirtyLog(nil)
        }
        dirtyLog = nil
        closeFD(&logFD)
    }

    /// What GET_VRING_BASE answers for a ring that never ran: the base it was
    /// given; a packed ring's used position is its avail position (nothing in flight).
    func neverRunBase(_ base: UInt16) -> UInt32 {
        features & VhostUserFeature.ringPacked != 0 ? UInt32(base) | UInt32(base) << 16 : UInt32(base)
    }
}
