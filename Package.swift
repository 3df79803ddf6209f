// swift-tools-version:6.0
import PackageDescription

// The commit a build comes from, for iotlbd_build_info (nil outside a git checkout).
let commit = Context.gitInformation.map { String($0.currentCommit.prefix(12)) } ?? "unknown"

let package = Package(
    name: "vhost-iotlb",
    products: [
        .executable(name: "iotlbd", targets: ["iotlbd"]),
        .executable(name: "iotlb-bench", targets: ["iotlb-bench"]),
        .library(name: "IOTLB", targets: ["IOTLB"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        // Data structures only: the device IOTLB and the memory table. No dependencies.
        // No unsafe flags: other packages depend on this library by version. Its
        // mutable state sits behind a pointer (see IOTLB.State), so exclusivity
        // checking costs the look-up path nothing.
        .target(name: "IOTLB"),
        // OS plumbing, nothing of vhost: threads, locks, the monotonic clock, errno as typed errors.
        .target(name: "Platform", dependencies: ["CPlatform"]),
        // eventfd and ppoll, which Swift's Glibc module does not offer.
        .target(name: "CPlatform"),
        // The vhost engine: guest memory, accessors, virtqueues, devices, datapath workers.
        // No socket code: transports (HTTP, vhost-user) drive it through commands.
        // No unsafe flags: the datapath's state sits behind pointers (see VirtQueue.Mutable).
        .target(name: "Vhost", dependencies: ["IOTLB", "Platform", "Ports", "CRingAtomics", "CFaultGuard"]),
        // Where frames go: TAP interfaces and the wires between peer devices. No
        // vhost knowledge: the datapath reads and writes frames through it.
        .target(name: "Ports", dependencies: ["Platform", "CTap", "CRingAtomics"]),
        // The TAP ioctls of <linux/if_tun.h>, whose macros and struct ifreq do not import,
        // and batched TAP writes through io_uring (Debian's liburing).
        .target(name: "CTap", linkerSettings: [.linkedLibrary("uring")]),
        // A SIGBUS handler for guest memory a front-end passed as a file (it may shrink it).
        .target(name: "CFaultGuard"),
        // Acquire/release on ring indices in guest memory (header-only C).
        .target(name: "CRingAtomics"),
        // Unix sockets with descriptors passed by SCM_RIGHTS (vhost-user), whose CMSG macros Swift cannot import.
        .target(name: "CUnixSocket"),
        // The vhost-user transport: listener/connector, sessions, the message codec. Drives
        // the engine through `performSync`, as HTTP does. Control path: no unsafe flags.
        .target(name: "VhostUser", dependencies: ["Vhost", "IOTLB", "Platform", "Ports", "CUnixSocket"]),
        // The built-in guest: ring driver, guest IOMMU, traffic generator, translator.
        .target(name: "Guest", dependencies: ["IOTLB", "Platform", "Vhost", "CRingAtomics"]),
        // C interop, confined: a shim to start libmicrohttpd and to give its connections
        // reloadable TLS credentials (GnuTLS, which Debian's libmicrohttpd is built with),
        // and jansson's header.
        .target(name: "CMicroHTTPD", linkerSettings: [.linkedLibrary("microhttpd"), .linkedLibrary("gnutls")]),
        .systemLibrary(name: "CJansson", pkgConfig: "jansson",
                       providers: [.apt(["libjansson-dev"])]),
        // The build's git commit, defined from the manifest (Swift -D takes no values).
        .target(name: "CBuildInfo", cSettings: [.define("IOTLBD_COMMIT", to: "\"\(commit)\"")]),
        // JSON values: parsed by jansson, written in Swift. The only target that imports CJansson.
        .target(name: "JSON", dependencies: ["CJansson"]),
        // The HTTP transport: libmicrohttpd behind Request/Response/Reply, the router,
        // the contract's error body and request field decoding. Nothing of vhost.
        .target(name: "HTTP", dependencies: ["JSON", "Platform", "CMicroHTTPD", "CUnixSocket"]),
        // The devices service: a device's parts (engine device, vhost-user front-end, miss
        // logger, built-in guest) made and dropped together; the configuration store and
        // its state file; where vhost-user sockets may live. No HTTP.
        .target(name: "Service", dependencies: [
            "IOTLB", "Platform", "Vhost", "Ports", "VhostUser", "Guest", "JSON",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Prometheus text exposition from plain snapshots, and the process's own figures (/proc).
        .target(name: "Metrics", dependencies: ["Platform", "Vhost", "VhostUser", "Guest"]),
        // The thin layer between HTTP and the service: routes, parsing and rendering,
        // long-poll deadlines, authentication, /metrics gathering, the daemon's assembly.
        .target(name: "ControlPlane", dependencies: [
            "IOTLB", "Platform", "Vhost", "VhostUser", "Guest", "JSON", "HTTP", "Service", "Metrics", "CBuildInfo",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // A blocking loopback HTTP client for the tests and the benchmark (not the daemon).
        .target(name: "HTTPClient", dependencies: ["JSON"]),
        .executableTarget(name: "iotlbd", dependencies: [
            "ControlPlane", "HTTP", "Service", "Vhost", "IOTLB", "Platform",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Counts allocations and retain/release per thread; linked into the benchmark only.
        .target(name: "CBenchCounters", linkerSettings: [.linkedLibrary("dl")]),
        .executableTarget(name: "iotlb-bench", dependencies: [
            "ControlPlane", "HTTP", "HTTPClient", "JSON", "Guest", "Vhost", "IOTLB", "Platform", "CBenchCounters",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // Helpers shared by the test targets.
        .target(name: "TestSupport", path: "Tests/TestSupport"),
        .testTarget(name: "IOTLBTests", dependencies: ["IOTLB", "TestSupport"]),
        .testTarget(name: "JSONTests", dependencies: ["JSON"]),
        .testTarget(name: "HTTPTests", dependencies: ["HTTP", "JSON"]),
        .testTarget(name: "ServiceTests", dependencies: [
            "Service", "JSON", "Vhost", "Guest", "Platform", .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "MetricsTests", dependencies: ["Metrics"]),
        // Routes in-process, and the daemon over live sockets (vhost-user front-ends included).
        .testTarget(name: "ControlPlaneTests", dependencies: ["ControlPlane", "HTTP", "HTTPClient", "JSON", "Service", "IOTLB", "Platform", "Vhost", "VhostUser", "Guest", "TestSupport", "CUnixSocket"]),
        .testTarget(name: "VhostTests", dependencies: ["Vhost", "IOTLB", "Platform", "Ports", "Guest", "CRingAtomics"]),
        .testTarget(name: "VhostUserTests", dependencies: ["VhostUser"]),
    ],
    swiftLanguageModes: [.v6]
)
