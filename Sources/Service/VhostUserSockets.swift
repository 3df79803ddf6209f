// Where vhost-user sockets may live (--vhost-user-dir) and how they are made
// (--vhost-user-group). A socket path from a client is taken relative to the
// directory, its parent resolved (`..`, symlinks) and refused unless it lies
// inside: an HTTP client must not make the daemon create, replace or connect
// to sockets elsewhere on the host.
import Glibc

/// Why the daemon refused to start: a message for the operator.
public struct StartupError: Error, CustomStringConvertible, Sendable {
    /// What is wrong, for the operator.
    public let description: String
    /// A refusal saying `description`.
    public init(_ description: String) { self.description = description }
}

/// The vhost-user socket directory and the permissions of sockets made there.
public struct VhostUserSockets: Sendable {
    /// The directory, as a real path (no symlinks, no `..`).
    public let directory: String
    /// The group server-mode sockets get; nil keeps the daemon's.
    public let group: gid_t?
    /// 0600, or 0660 with a group.
    public var permissions: mode_t { group == nil ? 0o600 : 0o660 }

    /// Uses `directory` as it is (tests; `prepare` for the daemon).
    public init(resolvedDirectory directory: String, group: gid_t? = nil) {
        self.directory = directory
        self.group = group
    }

    /// The default directory: `$RUNTIME_DIRECTORY` (systemd's RuntimeDirectory=,
    /// its first entry), else `/run/iotlbd` for root, else
    /// `$XDG_RUNTIME_DIR/iotlbd`, else `${TMPDIR:-/tmp}/iotlbd-<uid>`.
    public static func defaultDirectory() -> String {
        func env(_ k: String) -> String? { getenv(k).map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } }
        if let r = env("RUNTIME_DIRECTORY") { return String(r.split(separator: ":").first ?? Substring(r)) }
        if geteuid() == 0 && access("/run", W_OK) == 0 { return "/run/iotlbd" }
        if let x = env("XDG_RUNTIME_DIR") { return x + "/iotlbd" }
        return (env("TMPDIR") ?? "/tmp") + "/iotlbd-\(getuid())"
    }

    /// Makes `directory` when missing (mode 0755; 0700 for the per-user default
    /// in a shared temporary directory, which must then be ours and closed to
    /// others), resolves it, and looks `group` up (a name or a number).
    public static func prepare(directory: String?, group: String?) throws(StartupError) -> VhostUserSockets {
        let chosen = directory ?? defaultDirectory()
        let private_ = directory == nil && geteuid() != 0 && getenv("RUNTIME_DIRECTORY") == nil
        if mkdir(chosen, private_ ? 0o700 : 0o755) != 0 && errno != EEXIST {
            throw StartupError("cannot create the vhost-user directory \(chosen): \(String(cString: strerror(errno)))"
                               + (directory == nil ? " (choose one with --vhost-user-dir)" : ""))
        }
        var st = stat()
        if private_ && (lstat(chosen, &st) != 0 || st.st_mode & S_IFMT != S_IFDIR || st.st_uid != getuid()
                        || st.st_mode & 0o022 != 0) {
            throw StartupError("the vhost-user directory \(chosen) is not a directory of this user closed to others"
                               + " (choose one with --vhost-user-dir)")
        }
        guard let real = realPath(chosen), stat(real, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
            throw StartupError("--vhost-user-dir \(chosen) is not a directory")
        }
        var gid: gid_t?
        if let group {
            if let n = UInt32(group) {
                gid = n
            } else if let g = getgrnam(group) {
                gid = g.pointee.gr_gid
            } else {
                throw StartupError("--vhost-user-group \(group): no such group")
            }
        }
        return VhostUserSockets(resolvedDirectory: real, group: gid)
    }

    /// The absolute path a client's `socket` stands for, or `.socketRefused`
    /// saying why: relative paths are taken in the directory; the parent must
    /// exist and resolve inside it; the name itself must not be a symlink.
    public func resolve(_ socket: String) throws(DeviceServiceError) -> String {
        guard !socket.isEmpty, !socket.utf8.contains(0) else {
            throw .socketRefused("a socket path of 1 to 107 bytes")
        }
        let full = socket.hasPrefix("/") ? socket : directory + "/" + socket
        var parent = "/", name = full
        if let slash = full.lastIndex(of: "/") {
            parent = slash == full.startIndex ? "/" : String(full[..<slash])
            name = String(full[full.index(after: slash)...])
        }
        guard !name.isEmpty, name != ".", name != ".." else {
            throw .socketRefused("\(socket) names a directory, not a socket")
        }
        guard let realParent = Self.realPath(parent) else {
            throw .socketRefused("the directory of \(socket) does not exist")
        }
        let inside = directory == "/" || realParent == directory || realParent.hasPrefix(directory + "/")
        guard inside else {
            throw .socketRefused("\(socket) is outside the vhost-user directory \(directory) (--vhost-user-dir);"
                                + " give a path inside it, or a name relative to it")
        }
        let path = realParent == "/" ? "/" + name : realParent + "/" + name
        var st = stat()
        if lstat(path, &st) == 0 && st.st_mode & S_IFMT == S_IFLNK {
            throw .socketRefused("\(path) is a symbolic link")
        }
        guard path.utf8.count <= 107 else {
            throw .socketRefused("\(path) is longer than a socket path may be (107 bytes)")
        }
        return path
    }

    static func realPath(_ p: String) -> String? {
        guard let r = realpath(p, nil) else { return nil }
        defer { free(r) }
        return String(cString: r)
    }
}
