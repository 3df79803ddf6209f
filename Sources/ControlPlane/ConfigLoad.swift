// Loading a configuration at start-up, before the HTTP server opens: the
// state file of --state-dir when there is one, else --config FILE. The whole
// document is checked first (a damaged or foreign file changes nothing and is
// never overwritten), then applied as the HTTP requests would be: devices,
// memory tables, vrings, workloads. Any refusal stops the start-up with the
// file and the field at fault.
import Glibc
import Guest
import HTTP
import IOTLB
import JSON
import Platform
import Service
import Vhost

/// One device of a configuration document, checked.
struct LoadedDevice {
    var config: DeviceConfig
    var memTable: [MemoryRegion]?
    var vrings: [(Int, VringConfig)]
    var workload: WorkloadConfig?
}

extension ControlPlane {
    /// Loads the state file (when --state-dir has one) or `configFile`. With
    /// --state-dir and a configuration from elsewhere, the state file is then
    /// written. Throws, naming the file and the field, on anything refused.
    public func loadConfiguration(configFile: String?) throws(StartupError) {
        var source: String?
        var bytes: [UInt8]?
        if let dir = settings.stateDirectory {
            if mkdir(dir, 0o700) != 0 && errno != EEXIST {
                throw StartupError("--state-dir \(dir): \(String(cString: strerror(errno)))")
            }
            guard access(dir, W_OK | X_OK) == 0 else {
                throw StartupError("--state-dir \(dir): not a writable directory (\(String(cString: strerror(errno))))")
            }
        }
        if let stateFile = store.stateFile, let b = try Self.read(stateFile) {
            (source, bytes) = (stateFile, b)
        } else if let configFile {
            guard let b = try Self.read(configFile) else { throw StartupError("--config \(configFile): no such file") }
            (source, bytes) = (configFile, b)
        }
        guard let source, let bytes else { return }
        let what = source == store.stateFile ? "state file" : "configuration file"
        func refuse(_ e: APIError) -> StartupError {
            StartupError("\(what) \(source) refused" + (e.field.map { ", field \($0)" } ?? "") + ": \(e.message)"
                         + (source == store.stateFile ? " (the file is left as it is)" : ""))
        }
        let devices: [LoadedDevice]
        do throws(APIError) { devices = try Self.parseConfiguration(bytes, settings: settings) } catch { throw refuse(error) }
        store.pause()
        do throws(APIError) {
            for (i, d) in devices.enumerated() { try apply(d, at: "devices[\(i)].") }
        } catch {
            throw refuse(error)
        }
        try store.resume(write: source != store.stateFile)
        logger.info("configuration loaded", metadata: ["file": "\(source)", "devices": "\(devices.count)"])
    }

    /// The bytes of `path`, nil when it does not exist.
    private static func read(_ path: String) throws(StartupError) -> [UInt8]? {
        do throws(SystemCallError) { return try readWholeFile(path) } catch { throw StartupError(error.description) }
    }

    /// Checks a whole configuration document.
    static func parseConfiguration(_ bytes: [UInt8], settings: ControlPlaneSettings) throws(APIError) -> [LoadedDevice] {
        let doc: JSON
        do throws(JSONSyntaxError) { doc = try JSON.parse(bytes) } catch {
            throw APIError(400, "bad_json", "not JSON: \(error.message) at line \(error.line), column \(error.column)")
        }
        var f = try FieldReader(doc)
        guard case .string(ConfigFormat.name) = try f.required("format") else {
            throw .invalidField("format", "expected \"\(ConfigFormat.name)\": this is not an iotlbd configuration")
        }
        guard case .int(Int64(ConfigFormat.version)) = try f.required("version") else {
            throw .invalidField("version", "this iotlbd reads version \(ConfigFormat.version)")
        }
        guard case .array(let items) = try f.required("devices") else {
            throw .invalidField("devices", "expected an array of devices")
        }
        try f.finish()
        var out: [LoadedDevice] = []
        var ids: Set<String> = []
        for (i, item) in items.enumerated() {
            let path = "devices[\(i)]"
            let config = try parseDeviceConfig(item, path: path, settings: settings,
                                               ignoring: ["mem_table", "vrings", "workload"])
            guard !config.id.isEmpty else { throw .invalidField(path + ".id", "missing required field \"id\"") }
            guard ids.insert(config.id).inserted else { throw .invalidField(path + ".id", "device \(config.id) twice") }
            var d = LoadedDevice(config: config, vrings: [])
            if let m = item["mem_table"], m != .null {
                d.memTable = try parseRegions(m, path: path + ".mem_table")
            }
            if let v = item["vrings"] {
                guard case .array(let rings) = v else { throw .invalidField(path + ".vrings", "expected an array of vrings") }
                for (j, ring) in rings.enumerated() {
                    let rp = "\(path).vrings[\(j)]"
                    guard case .int(let n)? = ring["index"], (0..<Int64(config.queues)).contains(n) else {
                        throw .invalidField(rp + ".index", "expected a vring index in 0...\(config.queues - 1)")
                    }
                    guard !d.vrings.contains(where: { $0.0 == Int(n) }) else { throw .invalidField(rp + ".index", "vring \(n) twice") }
                    d.vrings.append((Int(n), try parseVring(ring, path: rp, ignoring: ["index"])))
                }
            }
            if let w = item["workload"], w != .null { d.workload = try parseWorkload(w, path: path + ".workload") }
            if config.vhostUserSocket != nil && (d.memTable != nil || !d.vrings.isEmpty || d.workload != nil) {
                throw .invalidField(path + ".vhost_user", "a vhost-user device's memory table and vrings come from its front-end")
            }
            out.append(d)
        }
        return out
    }

    /// Creates one loaded device and sets what it had; `field` prefixes refusals.
    private func apply(_ d: LoadedDevice, at field: String) throws(APIError) {
        let managed: DeviceParts
        do throws(DeviceServiceError) { managed = try devices.create(d.config) } catch { throw APIError(error, fieldPrefix: field) }
        func prefixed(_ e: APIError, _ sub: String) -> APIError {
            var a = e
            a.field = field + sub + (a.field.map { "." + $0 } ?? "")
            return a
        }
        // As the routes set them (recorded by the devices service), waited for here: start-up.
        if let regions = d.memTable {
            let r = Self.wait { done in devices.setMemTable(regions, on: managed, then: done) }
            if case .failure(let e) = r { throw prefixed(APIError(e), "mem_table") }
        }
        for (i, (n, c)) in d.vrings.enumerated() {
            let r = Self.wait { done in devices.setVring(n, c, on: managed, then: done) }
            if case .failure(let e) = r { throw prefixed(APIError(e), "vrings[\(i)]") }
        }
        if let w = d.workload {
            do throws(DeviceServiceError) { _ = try devices.startWorkloadAndWait(w, on: managed) } catch {
                throw prefixed(APIError(error), "workload")
            }
        }
    }

    /// Calls `call` and waits for the result it calls back with (start-up only).
    private static func wait<T: Sendable>(_ call: (@escaping @Sendable (T) -> Void) -> Void) -> T {
        let box = Locked<T?>(nil)
        let ready = WakeSignal()
        call { v in
            box.withLock { $0 = v }
            ready.signal()
        }
        while true {
            if let v = box.withLock({ $0 }) { return v }
            ready.wait(timeoutNanos: 100_000_000)
        }
    }
}
