// What clients configured, kept beside the engine so that it can be exported
// (GET /v1/config), written to the state file after every change
// (--state-dir) and loaded at start-up (--state-dir, --config). Devices with
// their creation options, the memory tables and vrings set over HTTP, and the
// built-in guest's workload. Not the IOTLB: it is soft state that misses refill.
import Glibc
import Guest
import IOTLB
import JSON
import Logging
import Platform
import Vhost

/// One device as clients configured it: what the state file keeps of it.
struct ConfiguredDevice: Sendable {
    var config: DeviceConfig
    var memTable: [MemoryRegion]?
    var vrings: [Int: VringConfig] = [:]
    var workload: WorkloadConfig?
}

/// The configuration document's name and version (its first two members).
public enum ConfigFormat {
    /// The document's `format`.
    public static let name = "iotlbd-config"
    /// The document's `version`: the one this daemon reads and writes.
    public static let version = 1
    /// The state file's name inside --state-dir.
    public static let stateFileName = "config.json"
}

/// The configuration clients made and the state file it is written to. The
/// devices registry holds it (each device's record beside its lifecycle) and
/// numbers its changes; a change returns a ticket (`changed`), the state file
/// is written on the saver's own thread (`StateSaver`), and `whenSaved` runs
/// what must wait for the disk.
public final class ConfigStore: Sendable {
    /// Where the configuration is read from: its version and the devices' records, in creation order.
    typealias Source = @Sendable () -> (version: UInt64, devices: [ConfiguredDevice])
    private let source = Locked<Source?>(nil)
    private let paused = Locked(false)
    /// The state file, nil without --state-dir.
    public let stateFile: String?
    private let saver: StateSaver?

    /// A store writing to `stateFile` after each change (nil: kept in memory only).
    public init(stateFile: String?, logger: Logger) {
        self.stateFile = stateFile
        let source = self.source
        saver = stateFile.map { path in
            StateSaver(path: path, logger: logger) {
                let (version, devices) = source.withLock { $0 }?() ?? (0, [])
                let doc = Self.document(devices)
                return (version, { doc.serialized() + [10] })
            }
        }
    }

    /// Reads the configuration from `source` (the devices registry) from now on.
    func attach(_ source: @escaping Source) { self.source.withLock { $0 = source } }

    private var current: (version: UInt64, devices: [ConfiguredDevice]) { source.withLock { $0 }?() ?? (0, []) }

    // MARK: Changes (in memory at once; `whenSaved` waits for the state file)

    /// The configuration changed to `version` (nil: nothing recorded changed):
    /// the saver writes it; the ticket names it.
    func changed(_ version: UInt64?) -> SaveTicket {
        guard let version else { return .none }
        if !paused.withLock({ $0 }) { saver?.changed(version) }
        return SaveTicket(version: version)
    }

    /// Runs `body` once the state file holds the change `ticket` names: at once
    /// without --state-dir, while paused, or when it does already; else on the
    /// saver's thread. Never on the caller's thread after a wait.
    public func whenSaved(_ ticket: SaveTicket, _ body: @escaping @Sendable () -> Void) {
        guard let saver, !paused.withLock({ $0 }) else { return body() }
        saver.whenSaved(ticket, body)
    }

    /// Holds writes back (while a configuration is loaded); `resume` writes once when asked.
    public func pause() { paused.withLock { $0 = true } }

    /// Lets writes through again; `write`: writes the state file now, on the
    /// caller's thread (start-up, before anything listens).
    public func resume(write: Bool) throws(StartupError) {
        paused.withLock { $0 = false }
        let (version, devices) = current
        if write, let stateFile {
            do throws(StartupError) { try Self.writeAtomically(Self.document(devices).serialized() + [10], to: stateFile) } catch {
                throw error
            }
        }
        saver?.markSaved(version)
    }

    /// Writes what is not saved yet and stops the saver's thread (the daemon stops).
    public func stop() { saver?.stop() }

    /// The whole configuration, as GET /v1/config answers and the state file holds.
    public var document: JSON { Self.document(current.devices) }

    static func document(_ devices: [ConfiguredDevice]) -> JSON {
        ["format": .string(ConfigFormat.name), "version": .count(ConfigFormat.version),
         "devices": .array(devices.map(render))]
    }

    static func render(_ d: ConfiguredDevice) -> JSON {
        let c = d.config
        var pairs: [(String, JSON)] = [
            ("id", .string(c.id)), ("queues", .count(c.queues)), ("iotlb", .bool(c.iotlb)),
            ("iotlb_max_entries", .count(c.iotlbMaxEntries)),
        ]
        // "backend" says loopback or sink, as before; a TAP or peer port is written whole.
        switch c.port {
        case .tap, .peer: pairs.append(("port", .object(JSON.portConfig(c.port))))
        case .loopback, .sink: pairs.append(("backend", .string(c.port.kind.rawValue)))
        }
        pairs.append(("translator", .string(c.translator.rawValue)))
        if let s = c.vhostUserSocket {
            pairs.append(("vhost_user", ["socket": .string(s), "mode": .string(c.vhostUserMode.rawValue)]))
        }
        pairs.append(("mem_table", d.memTable.map { .object([("regions", .array($0.map(JSON.region)))]) } ?? .null))
        pairs.append(("vrings", .array(d.vrings.keys.sorted().map { n in
            let v = d.vrings[n]!
            var p: [(String, JSON)] = [("index", .count(n)), ("num", .count(v.num)), ("desc_addr", .hex(v.descAddr)),
                                       ("avail_addr", .hex(v.availAddr)), ("used_addr", .hex(v.usedAddr)),
                                       ("enabled", .bool(v.enabled)), ("event_idx", .bool(v.eventIdx))]
            if let b = v.lastAvailIdx { p.append(("last_avail_idx", .count(b))) }
            if v.packed { p.append(("packed", .bool(true))) }
            if v.inOrder { p.append(("in_order", .bool(true))) }
            return .object(p)
        })))
        if let w = d.workload {
            pairs.append(("workload", ["packet_size": .count(w.packetSize), "page_size": .string(w.pageSize.rawValue),
                                       "mapping": .string(w.mapping.rawValue), "packets": .count(w.packets),
                                       "ring_size": .count(w.ringSize), "eager": .bool(w.eager)]))
        }
        return .object(pairs)
    }

    // MARK: The file

    /// Writes `bytes` to a temporary file beside `path`, fsyncs it, renames it
    /// over `path` and fsyncs the directory: a crash leaves the old file or the
    /// new one, never a part.
    static func writeAtomically(_ bytes: [UInt8], to path: String) throws(StartupError) {
        let dir = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        let tmp = path + ".tmp"
        do throws(SystemCallError) {
            let fd = try syscall("cannot write \(tmp)") { open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600) }
            do throws(SystemCallError) {
                defer { close(fd) }
                try writeAll(fd, bytes, "cannot write \(tmp)")
                try syscall("cannot fsync \(tmp)") { fsync(fd) }
            } catch {
                unlink(tmp)
                throw error
            }
            do throws(SystemCallError) { try syscall("cannot rename \(tmp) to \(path)") { rename(tmp, path) } } catch {
                unlink(tmp)
                throw error
            }
        } catch {
            throw StartupError(error.description)
        }
        // Makes the rename durable; a directory that cannot be opened is left as it is.
        if let dfd = try? syscall("open \(dir)", { open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }) {
            _ = fsync(dfd)
            close(dfd)
        }
    }
}

extension JSON {
    /// A memory region as the contract writes it, in answers and in the state file alike.
    public static func region(_ r: MemoryRegion) -> JSON {
        ["guest_phys_addr": .hex(r.guestPhysAddr.raw), "memory_size": .hex(r.memorySize),
         "userspace_addr": .hex(r.userspaceAddr.raw)]
    }
}

extension JSON {
    /// A port's configuration (`type` and its target), as requests give it
    /// and the configuration document keeps it.
    public static func portConfig(_ p: PortConfig) -> [(String, JSON)] {
        switch p {
        case .loopback, .sink: [("type", .string(p.kind.rawValue))]
        case .tap(let name): [("type", "tap"), ("name", .string(name))]
        case .peer(let other): [("type", "peer"), ("device", .string(other))]
        }
    }
}
