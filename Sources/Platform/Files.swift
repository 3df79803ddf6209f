// Small files whole: reading the state file, a configuration, a token, /proc; writing all of a buffer.
import Glibc

/// The bytes of `path`, nil when it does not exist. Refusals read
/// "cannot read PATH: <strerror>".
public func readWholeFile(_ path: String) throws(SystemCallError) -> [UInt8]? {
    let what = "cannot read \(path)"
    let fd: Int32
    do throws(SystemCallError) { fd = try syscall(what) { open(path, O_RDONLY | O_CLOEXEC) } } catch {
        if error.errno == ENOENT { return nil }
        throw error
    }
    defer { close(fd) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = try syscall(what) { buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) } }
        if n == 0 { return out }
        out.append(contentsOf: buf[0..<n])
    }
}

/// Writes all of `bytes` to `fd`, retrying EINTR and short writes; a failure
/// reads "`what`: <strerror>" (a write of nothing at all: EIO).
public func writeAll(_ fd: Int32, _ bytes: [UInt8], _ what: String) throws(SystemCallError) {
    var at = 0
    while at < bytes.count {
        // SAFETY: at < bytes.count: write reads at most the count-at bytes left.
        let n = try syscall(what) { bytes.withUnsafeBytes { write(fd, $0.baseAddress! + at, $0.count - at) } }
        guard n > 0 else { throw SystemCallError(call: what, errno: EIO) }
        at += n
    }
}
