// The daemon: an engine, its control plane, and the HTTP server(s), started and
// stopped together. Tests start one on an ephemeral port.
import Vhost
import Logging
import HTTP
import Service

/// Everything `iotlbd` runs.
public final class Daemon: Sendable {
    /// The engine.
    public let engine: Engine
    /// The routes.
    public let controlPlane: ControlPlane
    /// The HTTP server (the first listener).
    public let server: HTTPServer
    /// Further listeners (--also-listen), serving the same routes.
    public let extraServers: [HTTPServer]

    /// Builds (does not start) a daemon listening as `options` says, and as each of `alsoListen`.
    public init(server options: ServerOptions, alsoListen: [ServerOptions] = [],
                settings: ControlPlaneSettings = ControlPlaneSettings(),
                datapathThreads: Int = 1, limits: EngineLimits = EngineLimits(),
                logger: Logger = Logger(label: "iotlbd")) {
        engine = Engine(datapathThreads: datapathThreads, limits: limits)
        let cp = ControlPlane(engine: engine, settings: settings, logger: logger)
        controlPlane = cp
        let handshakeFailed: @Sendable (String) -> Void = { _ in cp.authCounters.failure("tls_handshake") }
        server = HTTPServer(options: options, onHandshakeFailure: handshakeFailed) { cp.respond($0) }
        extraServers = alsoListen.map { HTTPServer(options: $0, onHandshakeFailure: handshakeFailed) { cp.respond($0) } }
    }

    /// Loads the configuration (the state file of --state-dir, else
    /// `configFile`), then starts serving. Nothing listens when loading fails.
    public func start(configFile: String? = nil) throws(ServerStartError) {
        do throws(StartupError) { try controlPlane.loadConfiguration(configFile: configFile) } catch {
            controlPlane.shutdownDevices()  // what a refused configuration half-made goes, sockets too
            throw ServerStartError(description: error.description)
        }
        var started: [HTTPServer] = []
        for s in [server] + extraServers {
            do throws(ServerStartError) { try s.start() } catch {
                for t in started { t.stop() }
                controlPlane.shutdownDevices()  // the loaded devices' sockets go too
                throw error
            }
            started.append(s)
        }
        noteCertificate()
    }

    private func noteCertificate() {
        let notAfter = ([server] + extraServers).compactMap(\.tlsNotAfter).min()
        controlPlane.certificateNotAfter.withLock { $0 = notAfter }
    }

    /// SIGHUP: re-reads the token and certificate-scope files and every TLS
    /// listener's certificate, key and client CA, and reopens the audit log.
    /// What fails to load keeps what was in force; the refusals are returned.
    public func reload() -> [String] {
        var refusals: [String] = []
        do throws(CredentialsError) { try controlPlane.credentials.reload() } catch { refusals.append(error.description) }
        for s in [server] + extraServers {
            do throws(ServerStartError) { try s.reloadTLS() } catch { refusals.append(error.description) }
        }
        noteCertificate()
        controlPlane.settings.audit?.reopen()
        controlPlane.authCounters.reload(refusals.isEmpty ? "ok" : "failed")
        return refusals
    }

    /// The bound port of the first listener.
    public var port: UInt16 { server.port }

    /// Stops the workers (answering every queued command), then the servers.
    public func stop() {
        controlPlane.shutdownDevices()
        engine.shutdown()
        controlPlane.stop()
        server.stop()
        for s in extraServers { s.stop() }
        controlPlane.settings.audit?.stop()
    }
}
