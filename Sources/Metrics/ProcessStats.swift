// The Prometheus process-collector figures (process_cpu_seconds_total and
// friends), read from /proc/self the way client libraries do, so dashboards
// and alerts written for any exporter work unchanged.
import Glibc
import Platform

/// The process's resource use at one moment.
struct ProcessStats {
    var cpuSeconds: Double?
    var residentBytes: Double?
    var virtualBytes: Double?
    var startTimeSeconds: Double?
    var openFDs: Int?
    var maxFDs: Double?

    static func read() -> ProcessStats {
        var s = ProcessStats()
        // /proc/self/stat: fields after the parenthesised command name (which may hold spaces).
        if let stat = readText("/proc/self/stat"), let close = stat.utf8.lastIndex(of: UInt8(ascii: ")")) {
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
            let page = Double(sysconf(Int32(_SC_PAGESIZE)))
            // fields[0] is field 3 (state): field n sits at n - 3.
            func field(_ n: Int) -> Double? { fields.count > n - 3 ? Double(fields[n - 3]) : nil }
            if let u = field(14), let k = field(15), ticks > 0 { s.cpuSeconds = (u + k) / ticks }
            s.virtualBytes = field(23)
            s.residentBytes = field(24).map { $0 * page }
            // Field 22 counts from boot: now (wall clock) less the time since then. No
            // /proc/stat needed, which a sandbox (ProcSubset=pid) may hide.
            if let start = field(22), ticks > 0 {
                var wall = timespec(), boot = timespec()
                clock_gettime(CLOCK_REALTIME, &wall)
                clock_gettime(CLOCK_BOOTTIME, &boot)
                func seconds(_ t: timespec) -> Double { Double(t.tv_sec) + Double(t.tv_nsec) / 1e9 }
                s.startTimeSeconds = seconds(wall) - (seconds(boot) - start / ticks)
            }
        }
        s.openFDs = countEntries("/proc/self/fd")
        var lim = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &lim) == 0 { s.maxFDs = Double(lim.rlim_cur) }
        return s
    }

    func write(to w: inout MetricsWriter) {
        func one(_ name: String, _ type: String, _ help: String, _ v: Double?) {
            guard let v else { return }
            w.family(name, type, help, [([], MetricsWriter.number(v))])
        }
        one("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", cpuSeconds)
        one("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", residentBytes)
        one("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", virtualBytes)
        one("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", startTimeSeconds)
        one("process_open_fds", "gauge", "Number of open file descriptors.", openFDs.map(Double.init))
        one("process_max_fds", "gauge", "Maximum number of open file descriptors.", maxFDs)
    }

    /// A small /proc file's text.
    private static func readText(_ path: String) -> String? {
        guard let bytes = (try? readWholeFile(path)) ?? nil else { return nil }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Entries of a directory, less "." and ".." (and the descriptor opendir itself holds).
    private static func countEntries(_ path: String) -> Int? {
        guard let dir = opendir(path) else { return nil }
        var n = 0
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { Array($0.prefix { $0 != 0 }) }
            if name != [46] && name != [46, 46] { n += 1 }
        }
        closedir(dir)
        return n - 1
    }
}
