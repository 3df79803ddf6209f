// Brute force: failed authentications are rate-limited per peer address with a
// token bucket. Each failure takes one token from its peer's bucket (`burst`
// tokens, refilled at `burst` per `period`); a peer with an empty bucket gets
// 429 `rate_limited` with Retry-After for every request whose credential would
// have to be checked (a bearer token, or no credential), without it being
// checked, so guessing goes no faster than the refill. A request on a
// connection with a verified client certificate and no token is never limited:
// a certificate cannot be guessed.
//
// Requests that authenticate pay one relaxed atomic load while no peer has
// failed (the table is empty), else one short lock; nothing is recorded for them.
import Platform
import Synchronization

/// Per-peer buckets of allowed authentication failures.
public final class FailureLimiter: Sendable {
    /// Failures allowed in a burst.
    public let burst: Double
    /// Seconds in which a drained bucket fills again.
    public let period: Double
    private struct Bucket {
        var tokens: Double
        var at: UInt64
    }
    private let buckets = Locked<[String: Bucket]>([:])
    private let tracked = Atomic<Int>(0)
    /// Peers remembered at most; past it, full buckets are dropped first, then the oldest.
    static let maxPeers = 10_000

    /// `burst` failures, refilled over `period` seconds.
    public init(burst: Int = 10, period: Double = 60) {
        self.burst = Double(max(1, burst))
        self.period = max(0.001, period)
    }

    private var rate: Double { burst / period }

    private func refilled(_ b: Bucket, now: UInt64) -> Bucket {
        Bucket(tokens: min(burst, b.tokens + Double(now &- b.at) / 1e9 * rate), at: now)
    }

    /// Seconds until `peer` may try again (at least 1); nil when it may now.
    public func retryAfter(_ peer: String) -> Int? {
        guard tracked.load(ordering: .relaxed) > 0 else { return nil }
        let now = monotonicNanos()
        return buckets.withLock { table -> Int? in
            guard let b = table[peer] else { return nil }
            let r = refilled(b, now: now)
            if r.tokens >= burst {  // forgiven: forget the peer
                table[peer] = nil
                tracked.store(table.count, ordering: .relaxed)
            }
            guard r.tokens < 1 else { return nil }
            return max(1, Int(((1 - r.tokens) / rate).rounded(.up)))
        }
    }

    /// Takes one token from `peer`'s bucket.
    public func failed(_ peer: String) {
        let now = monotonicNanos()
        buckets.withLock { table in
            var b = table[peer].map { refilled($0, now: now) } ?? Bucket(tokens: burst, at: now)
            b.tokens = max(0, b.tokens - 1)
            table[peer] = b
            if table.count > FailureLimiter.maxPeers { prune(&table, now: now) }
            tracked.store(table.count, ordering: .relaxed)
        }
    }

    private func prune(_ table: inout [String: Bucket], now: UInt64) {
        table = table.filter { refilled($0.value, now: now).tokens < burst }
        if table.count > FailureLimiter.maxPeers {
            let keep = table.sorted { $0.value.at > $1.value.at }.prefix(FailureLimiter.maxPeers / 2)
            table = Dictionary(uniqueKeysWithValues: keep.map { ($0.key, $0.value) })
        }
    }
}
