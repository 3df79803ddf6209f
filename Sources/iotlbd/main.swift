// iotlbd: the vhost engine with a device IOTLB, behind an HTTP/JSON control plane.
import ArgumentParser
import ControlPlane
import Glibc
import IOTLB
import Logging
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
            as a vhost-user backend for DPDK virtio-user or QEMU. \
            SIGTERM or SIGINT stops workloads, drops vhost-user front-ends (removing \
            their sockets), releases long-polls and exits 0.
            """,
        version: "\(BuildInfo.version) (commit \(BuildInfo.commit))")

    @Option(name: .long, help: "Address and port to listen on (HOST:PORT; [::1]:PORT for IPv6; port 0 picks one).")
    var listen = "127.0.0.1:8080"

    @Option(name: .long, help: "File holding a bearer token required on every /v1 request (/healthz and /metrics stay open).")
    var tokenFile: String?

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
        guard splitHostPort(listen) != nil else { throw ValidationError("--listen must be HOST:PORT, e.g. 127.0.0.1:8080") }
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
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        signal(SIGPIPE, SIG_IGN)

        var settings = ControlPlaneSettings()
        settings.iotlbMaxEntries = iotlbMaxEntries
        if let tokenFile {
            guard let text = try? readFile(tokenFile) else { throw ValidationError("cannot read --token-file \(tokenFile)") }
            let token = text.trimmingWhitespace()
            guard !token.isEmpty else { throw ValidationError("--token-file \(tokenFile) is empty") }
            settings.token = token
        }
        var limits = EngineLimits()
        limits.maxMemRegions = maxMemRegions
        limits.maxGuestMemory = parseBytes(maxGuestMemory)!
        var options = ServerOptions()
        (options.host, options.port) = splitHostPort(listen)!
        options.maxBodyBytes = maxBodyBytes
        options.maxConnections = maxConnections
        options.threads = httpThreads
        options.connectionTimeout = requestTimeout

        let daemon = Daemon(server: options, settings: settings, datapathThreads: datapathThreads,
                            limits: limits, logger: logger)
        do { try daemon.start() } catch {
            logger.critical("\(error.description)")
            throw ExitCode(1)
        }
        logger.info("listening", metadata: ["address": "\(options.host):\(daemon.port)",
                                            "datapath_threads": "\(datapathThreads)",
                                            "auth": "\(settings.token == nil ? "off" : "bearer")"])
        if demo {
            let base = "http://\(options.host):\(daemon.port)"
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
        sigwait(&signals, &caught)
        logger.info("stopping", metadata: ["signal": "\(caught == SIGTERM ? "SIGTERM" : "SIGINT")"])
        daemon.stop()
        logger.info("stopped")
    }
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

/// "127.0.0.1:8080", "[::1]:8080", "localhost:0" → (host, port).
func splitHostPort(_ s: String) -> (String, UInt16)? {
    guard let colon = s.lastIndex(of: ":"), let port = UInt16(s[s.index(after: colon)...]) else { return nil }
    var host = String(s[..<colon])
    if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    return host.isEmpty ? nil : (host, port)
}

func readFile(_ path: String) throws -> String {
    guard let f = fopen(path, "r") else { throw ExitCode(1) }
    defer { fclose(f) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = fread(&buf, 1, buf.count, f)
        if n <= 0 { break }
        out.append(contentsOf: buf[0..<n])
    }
    return String(decoding: out, as: UTF8.self)
}

extension String {
    /// Without leading and trailing white space (a token file usually ends in a newline).
    func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s = s.dropFirst() }
        while let l = s.last, l.isWhitespace { s = s.dropLast() }
        return String(s)
    }
}

IOTLBDaemon.main()
