import IOTLB

/// Who answers IOTLB misses.
public enum TranslatorKind: String, Sendable, CaseIterable {
    /// The in-process vIOMMU walks the guest IOMMU and posts updates.
    case builtin
    /// Misses wait for an orchestrator long-polling them.
    case external
}

// Here, not in VhostUser: it is part of a device's configuration, which the engine holds.
/// Which side of a vhost-user socket listens.
public enum VhostUserMode: String, Sendable, CaseIterable {
    /// The daemon listens; front-ends connect (one at a time).
    case server
    /// The front-end listens; the daemon connects, and reconnects with a
    /// bounded back-off whenever the connection is lost or was never there.
    case client
}

/// What a device is created with. Immutable for the device's life.
public struct DeviceConfig: Sendable, Equatable {
    /// Unique name.
    public var id: String
    /// Number of virtqueues (even index RX, odd TX).
    public var queues: Int
    /// Whether the device IOTLB is on (VIRTIO_F_ACCESS_PLATFORM).
    public var iotlb: Bool
    /// IOTLB capacity before FIFO replacement.
    public var iotlbMaxEntries: Int
    /// Where TX frames go and RX frames come from.
    public var port: PortConfig
    /// Who answers misses.
    public var translator: TranslatorKind
    /// The Unix socket a vhost-user front-end connects to; nil for a device
    /// the HTTP API (or the built-in guest) sets up.
    public var vhostUserSocket: String?
    /// Who listens on `vhostUserSocket`.
    public var vhostUserMode: VhostUserMode

    public init(id: String, queues: Int = 2, iotlb: Bool = true, iotlbMaxEntries: Int = 2048,
                port: PortConfig = .loopback, translator: TranslatorKind = .builtin, vhostUserSocket: String? = nil,
                vhostUserMode: VhostUserMode = .server) {
        self.id = id
        self.vhostUserSocket = vhostUserSocket
        self.vhostUserMode = vhostUserMode
        self.queues = queues
        self.iotlb = iotlb
        self.iotlbMaxEntries = iotlbMaxEntries
        self.port = port
        self.translator = translator
    }

    /// The most queues a device may have.
    public static let maxQueues = 64

    /// Queue pairs (RX and TX): one TAP queue, one peer wire each.
    public var queuePairs: Int { Swift.max(1, queues / 2) }
}

/// Engine-wide limits, from the command line.
public struct EngineLimits: Sendable {
    /// Most regions in a memory table.
    public var maxMemRegions = MemoryTable.defaultMaxRegions
    /// Most bytes of guest memory one device may map.
    public var maxGuestMemory: UInt64 = 8 << 30
    /// Whether to try explicit huge pages for guest memory.
    public var hugePages = true
    /// Test only (IOTLBD_TEST_UNLOGGED_RX_BUFFERS=1 at start-up): RX buffer
    /// writes are not dirty-logged, so a migration test can show that its
    /// memory comparison catches a missing log write. Never for real use.
    public var unloggedRXBuffersForTests = false
    public init() {}
}
