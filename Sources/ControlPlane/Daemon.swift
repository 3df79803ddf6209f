// The daemon: an engine, its control plane, and the HTTP server, started and
// stopped together. Tests start one on an ephemeral port.
import Vhost
import Logging

/// Everything `iotlbd` runs.
public final class Daemon: Sendable {
    /// The engine.
    public let engine: Engine
    /// The routes.
    public let controlPlane: ControlPlane
    /// The HTTP server.
    public let server: HTTPServer

    /// Builds (does not start) a daemon.
    public init(server options: ServerOptions, settings: ControlPlaneSettings = ControlPlaneSettings(),
                datapathThreads: Int = 1, limits: EngineLimits = EngineLimits(),
                logger: Logger = Logger(label: "iotlbd")) {
        engine = Engine(datapathThreads: datapathThreads, limits: limits)
        let cp = ControlPlane(engine: engine, settings: settings, logger: logger)
        controlPlane = cp
        server = HTTPServer(options: options) { cp.respond($0) }
    }

    /// Starts serving.
    public func start() throws(ServerStartError) { try server.start() }

    /// The bound port.
    public var port: UInt16 { server.port }

    /// Stops the workers (answering every queued command), then the server.
    public func stop() {
        controlPlane.stopWorkloads()
        engine.shutdown()
        controlPlane.stop()
        server.stop()
    }
}
