// iotlbd: the vhost engine with a device IOTLB, behind an HTTP/JSON control plane.
import ArgumentParser
import ControlPlane
import Glibc
import HTTP
import IOTLB
import Logging
import Platform
import Service
import Vhost

struct IOTLBDaemon: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "iotlbd",
        abstract: "A userspace vhost engine with a device IOTLB, driven over HTTP/JSON.",
        discussion: """
            Devices, memory tables, vrings and IOTLB mappings are managed over HTTP \
            (see api/openapi.yaml). Misses are long-polled at \
            /v1/devices/{id}/iotlb/misses and answered with POST …/iotlb/updates. \
            A device created with "vhost_user":{"socket":PATH} serves that Unix socket \
            as a vhost-user backend for DPDK virtio-user or QEMU ("mode":"client": \
            connects to the front-end's socket instead, and reconnects); socket paths \
            must lie in --vhost-user-dir. With --state-dir the configuration (devices, \
            memory tables, vrings, workloads; not the IOTLB) survives restarts; \
            GET /v1/config exports it and --config loads one. \
            SIGTERM or SIGINT stops workloads, drops vhost-user front-ends (removing \
            their sockets), releases long-polls and exits 0. SIGHUP re-reads --token-file, \
            --tls-client-scopes and the TLS files (connections in flight keep theirs) and \
            reopens --audit-log; a file that fails to load keeps what was in force.
            """,
        version: "\(BuildInfo.version) (commit \(BuildInfo.commit))")

    @Option(name: .long, help: ArgumentHelp(
        "Where the HTTP API listens: HOST:PORT ([::1]:PORT for IPv6; port 0 picks one), or unix:PATH for a Unix socket (mode 0660). Given twice, the last wins.",
        valueName: "address"))
    var listen = "127.0.0.1:8080"

    @Option(name: .long, help: ArgumentHelp(
        "A further listener for the same API, as --listen (repeatable): e.g. --listen unix:/run/iotlbd/api.sock --also-listen 127.0.0.1:8080.",
        valueName: "address"))
    var alsoListen: [String] = []

    @Option(name: .long, help: ArgumentHelp(
        "Keep the configuration (devices, memory tables, vrings, workloads; not the IOTLB) in DIR/config.json, written atomically after every change and loaded at start-up.",
        valueName: "dir"))
    var stateDir: String?

    @Option(name: .long, help: ArgumentHelp(
        "Load this configuration (a GET /v1/config document) at start-up; with --state-dir, only when the state directory holds none yet.",
        valueName: "file"))
    var config: String?

    @Option(name: .long, help: ArgumentHelp(
        "The directory vhost-user socket paths must lie in; relative paths are taken in it. Default: $RUNTIME_DIRECTORY, else /run/iotlbd as root, else $XDG_RUNTIME_DIR/iotlbd, else /tmp/iotlbd-UID.",
        valueName: "dir"))
    var vhostUserDir: String?

    @Option(name: .long, help: ArgumentHelp(
        "Make server-mode vhost-user sockets 0660 and owned by this group (name or number) instead of 0600.",
        valueName: "group"))
    var vhostUserGroup: String?

    @Flag(name: .long, help: "Let a TAP port make its interface when it does not exist (needs CAP_NET_ADMIN; the interface is left down and goes with the device). Without it, a TAP port attaches only to an interface the operator made: `ip tuntap add NAME mode tap multi_queue vnet_hdr user USER`.")
    var tapCreate = false

    @Option(name: .long, help: ArgumentHelp(
        "Bearer tokens, one per line: TOKEN SCOPE NAME (scope read, translate or admin; NAME is what the audit trail shows). A file holding one bare token gives it scope admin. Every request but /healthz (and /metrics, unless --metrics-auth) then needs a credential.",
        valueName: "file"))
    var tokenFile: String?

    @Option(name: .long, help: ArgumentHelp("Serve TCP listeners over TLS (1.2 and 1.3) with this certificate chain (PEM).", valueName: "file"))
    var tlsCert: String?

    @Option(name: .long, help: ArgumentHelp("The private key of --tls-cert (PEM); refused when others may read it.", valueName: "file"))
    var tlsKey: String?

    @Option(name: .long, help: ArgumentHelp(
        "Require a client certificate signed by one of these CAs (PEM) on TLS listeners, for every request but /healthz.",
        valueName: "file"))
    var tlsClientCa: String?

    @Option(name: .long, help: ArgumentHelp(
        "Client certificate subjects with their scopes, one per line: SUBJECT SCOPE NAME (SUBJECT as RFC 4514 writes it, e.g. CN=orch1,O=Example). Without it any certificate --tls-client-ca verifies has scope admin.",
        valueName: "file"))
    var tlsClientScopes: String?

    @Flag(name: .long, help: "/metrics needs a credential with scope read (else it is open; with --tls-client-ca a client certificate is still needed).")
    var metricsAuth = false

    @Option(name: .long, help: ArgumentHelp(
        "Where state-changing requests are recorded, one JSON line each: a file (appended, fsync'ed by a writer thread), - for stderr, or none. Default: stderr when --token-file or --tls-client-ca is given, else none.",
        valueName: "file"))
    var auditLog: String?

    @Option(name: .long, help: ArgumentHelp(
        "Failed authentications allowed per peer address, as N/SECONDS: N at once, refilled over SECONDS; past it 429 with Retry-After.",
        valueName: "n/seconds"))
    var authFailureLimit = "10/60"

    @Flag(name: .long, help: "Create device demo0 with a looping built-in guest so live figures show at once.")
    var demo = false

    @Option(name: .long, help: "Default IOTLB size per device before FIFO replacement (1...\(IOTLB.entriesCeiling)).")
    var iotlbMaxEntries = 2048

    @Option(name: .long, help: "Datapath threads; each owns a share of the devices.")
    var datapathThreads = 1

    @Option(name: .long, help: "Largest request body in bytes; larger gets 413.")
    var maxBodyBytes = 8 << 20

    @Option(name: .long, help: "Most regions in one memory table.")
    var maxMemRegions = 64

    @Option(name: .long, help: "Most guest memory one device may map, in bytes (K/M/G suffixes allowed).")
    var maxGuestMemory = "8G"

    @Option(name: .long, help: "Connections served at once; more get a JSON 503.")
    var maxConnections = 1024

    @Option(name: .long, help: "HTTP worker threads.")
    var httpThreads = 2

    @Option(name: .long, help: "Seconds an idle or half-sent connection may stay open.")
    var requestTimeout = 30

    @Option(name: .long, help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel = "info"

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical")
        }
        guard (1...IOTLB.entriesCeiling).contains(iotlbMaxEntries) else {
            throw ValidationError("--iotlb-max-entries must be in 1...\(IOTLB.entriesCeiling)")
        }
        guard (1...64).contains(datapathThreads) else { throw ValidationError("--datapath-threads must be in 1...64") }
        guard maxBodyBytes >= 1024 else { throw ValidationError("--max-body-bytes must be at least 1024") }
        guard (1...4096).contains(maxMemRegions) else { throw ValidationError("--max-mem-regions must be in 1...4096") }
        guard parseBytes(maxGuestMemory) != nil else { throw ValidationError("--max-guest-memory: e.g. 8G, 512M, 1073741824") }
        guard (1...100_000).contains(maxConnections) else { throw ValidationError("--max-connections must be in 1...100000") }
        guard (1...64).contains(httpThreads) else { throw ValidationError("--http-threads must be in 1...64") }
        guard (1...3600).contains(requestTimeout) else { throw ValidationError("--request-timeout must be in 1...3600") }
        for (flag, a) in [("--listen", listen)] + alsoListen.map({ ("--also-listen", $0) }) where parseListen(a) == nil {
            throw ValidationError("\(flag) \(a): expected HOST:PORT (e.g. 127.0.0.1:8080) or unix:PATH (an absolute path of at most 107 bytes)")
        }
        guard (tlsCert == nil) == (tlsKey == nil) else { throw ValidationError("--tls-cert and --tls-key go together") }
        guard tlsCert != nil || (tlsClientCa == nil && tlsClientScopes == nil) else {
            throw ValidationError("--tls-client-ca and --tls-client-scopes need --tls-cert and --tls-key")
        }
        guard tlsClientScopes == nil || tlsClientCa != nil else { throw ValidationError("--tls-client-scopes needs --tls-client-ca") }
        guard parseFailureLimit(authFailureLimit) != nil else {
            throw ValidationError("--auth-failure-limit: expected N/SECONDS, e.g. 10/60 (N ≥ 1, SECONDS > 0)")
        }
    }

    func run() throws {
        let level = Logger.Level(rawValue: logLevel)!
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "iotlbd")

        // Signals are taken by sigwait below, so every thread must block them.
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGHUP)
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        signal(SIGPIPE, SIG_IGN)

        var settings = ControlPlaneSettings()
        settings.iotlbMaxEntries = iotlbMaxEntries
        do throws(CredentialsError) {
            settings.credentials = try Credentials(tokenFile: tokenFile, subjectsFile: tlsClientScopes)
        } catch {
            logger.critical("\(error.description)")
            throw ExitCode(1)
        }
        settings.metricsAuth = metricsAuth
        settings.failureLimit = parseFailureLimit(authFailureLimit)!
        let audit = auditLog ?? (tokenFile != nil || tlsClientCa != nil ? "-" : "none")
        if audit != "none" {
            do { settings.audit = try AuditLog(path: audit == "-" ? nil : audit) } catch {
                logger.critical("\(error.description)")
                throw ExitCode(1)
            }
        }
        var limits = EngineLimits()
        limits.maxMemRegions = maxMemRegions
        limits.maxGuestMemory = parseBytes(maxGuestMemory)!
        // Test only: RX buffer writes go unlogged while migrating, so the migration
        // test can show its memory comparison catches a missing log write.
        if getenv("IOTLBD_TEST_UNLOGGED_RX_BUFFERS").map({ String(cString: $0) }) == "1" {
            limits.unloggedRXBuffersForTests = true
            logger.warning("IOTLBD_TEST_UNLOGGED_RX_BUFFERS=1: RX buffers are not dirty-logged (test only; live migration loses data)")
        }
        do {
            settings.vhostUserSockets = try VhostUserSockets.prepare(directory: vhostUserDir, group: vhostUserGroup)
        } catch {
            logger.critical("\(error.description)")
            throw ExitCode(1)
        }
        settings.stateDirectory = stateDir
        settings.tapCreate = tapCreate
        func serverOptions(_ address: String) -> ServerOptions {
            var options = parseListen(address)!
            options.maxBodyBytes = maxBodyBytes
            options.maxConnections = maxConnections
            options.threads = httpThreads
            options.connectionTimeout = requestTimeout
            if options.unixPath == nil, let tlsCert, let tlsKey {
                options.tls = TLSFiles(certificate: tlsCert, key: tlsKey, clientCA: tlsClientCa)
            }
            return options
        }
        let options = serverOptions(listen)

        let daemon = Daemon(server: options, alsoListen: alsoListen.map(serverOptions), settings: settings,
                            datapathThreads: datapathThreads, limits: limits, logger: logger)
        do { try daemon.start(configFile: config) } catch {
            logger.critical("\(error.description)")
            throw ExitCode(1)
        }
        func shown(_ s: HTTPServer) -> String {
            var o = s.options
            o.port = s.port
            return o.address
        }
        logger.info("listening", metadata: ["address": "\(([daemon.server] + daemon.extraServers).map(shown).joined(separator: ", "))",
                                            "datapath_threads": "\(datapathThreads)",
                                            "vhost_user_dir": "\(daemon.controlPlane.sockets.directory)",
                                            "state_file": "\(daemon.controlPlane.stateFile ?? "-")",
                                            "auth": "\(daemon.controlPlane.credentials.summary)",
                                            "audit": "\(audit == "-" ? "stderr" : audit)"])
        if demo {
            var plain = daemon.server.options
            (plain.port, plain.tls) = (daemon.server.port, nil)
            let base = options.unixPath != nil ? "--unix-socket \(options.unixPath!) http://localhost"
                : (options.tls == nil ? "http://" : "https://") + plain.address
            daemon.controlPlane.startDemo { result in
                switch result {
                case .success(let id):
                    logger.info("demo running: curl -s \(base)/v1/devices/\(id)/iotlb/stats",
                                metadata: ["device": "\(id)"])
                case .failure(let e):
                    logger.error("demo failed: \(e.message)")
                }
            }
        }
        var caught: Int32 = 0
        while sigwait(&signals, &caught) == 0, caught == SIGHUP {
            let refusals = daemon.reload()
            for r in refusals { logger.error("reload refused, the previous one stays in force: \(r)") }
            if refusals.isEmpty { logger.info("reloaded", metadata: ["auth": "\(daemon.controlPlane.credentials.summary)"]) }
        }
        logger.info("stopping", metadata: ["signal": "\(caught == SIGTERM ? "SIGTERM" : "SIGINT")"])
        daemon.stop()
        logger.info("stopped")
    }
}

/// "10/60" → (burst 10, refilled over 60 s).
func parseFailureLimit(_ s: String) -> (burst: Int, seconds: Double)? {
    let parts = s.split(separator: "/")
    guard parts.count == 2, let n = Int(parts[0]), n >= 1, let t = Double(parts[1]), t > 0, t.isFinite else { return nil }
    return (n, t)
}

/// "8G", "512M", "4096" → bytes.
func parseBytes(_ s: String) -> UInt64? {
    let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
    var digits = Substring(s.uppercased())
    var scale: UInt64 = 1
    if let last = digits.last, let u = units[last] {
        scale = u
        digits = digits.dropLast()
    }
    guard let n = UInt64(digits) else { return nil }
    let (v, o) = n.multipliedReportingOverflow(by: scale)
    return o ? nil : v
}

/// "127.0.0.1:8080", "[::1]:8080" or "unix:/run/iotlbd/api.sock" → where to listen.
func parseListen(_ s: String) -> ServerOptions? {
    var o = ServerOptions()
    if s.hasPrefix("unix:") {
        let path = String(s.dropFirst(5))
        guard path.hasPrefix("/"), path.utf8.count <= 107, path.count > 1 else { return nil }
        o.unixPath = path
        return o
    }
    guard let (host, port) = splitHostPort(s) else { return nil }
    (o.host, o.port) = (host, port)
    return o
}

/// "127.0.0.1:8080", "[::1]:8080", "localhost:0" → (host, port).
func splitHostPort(_ s: String) -> (String, UInt16)? {
    guard let colon = s.lastIndex(of: ":"), let port = UInt16(s[s.index(after: colon)...]) else { return nil }
    var host = String(s[..<colon])
    if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    return host.isEmpty ? nil : (host, port)
}

IOTLBDaemon.main()
