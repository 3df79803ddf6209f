// A device's miss logger: one log line per access failure, one per miss storm.
import Logging
import Platform
import Vhost

/// Logs a device's access failures, and its miss storms (more than
/// `stormPerSecond` misses in a second) at most every 10 s.
final class MissLogger: Sendable {
    static let stormPerSecond = 1000

    private let device: String
    private let logger: Logger
    private let window = Locked<(start: UInt64, count: Int, lastWarned: UInt64)>((0, 0, 0))

    init(device: String, logger: Logger) {
        self.device = device
        self.logger = logger
    }

    /// Observes `log` (events arrive on the completion thread, never the datapath's).
    func watch(_ log: MissLog) {
        log.observe { [self] e in self.observe(e) }
    }

    private func observe(_ e: MissEvent) {
        if e.kind == .accessFail {
            logger.warning("access failure: vq stopped until its vring is set again",
                           metadata: ["device": "\(device)", "vq": "\(e.vq)", "iova": "\(e.iova)", "perm": "\(e.perm)"])
            return
        }
        let storm = window.withLock { w -> Int? in
            if e.postedAt - w.start > 1_000_000_000 { w.start = e.postedAt; w.count = 0 }
            w.count += 1
            guard w.count == Self.stormPerSecond, e.postedAt - w.lastWarned > 10_000_000_000 else { return nil }
            w.lastWarned = e.postedAt
            return w.count
        }
        if let n = storm {
            logger.warning("miss storm: \(n)+ IOTLB misses in a second", metadata: ["device": "\(device)", "last_iova": "\(e.iova)"])
        }
    }
}
