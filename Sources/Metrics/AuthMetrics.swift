// The remote-control figures: failed authentications by reason, requests
// refused for their scope or rate-limited, the audit writer, the TLS
// certificate and reloads. Counted where they happen (request threads: one
// short lock, only on refusals), rendered per scrape.
import Platform

/// Counters of the authentication and audit paths.
public final class AuthCounters: Sendable {
    private struct State {
        var failures: [String: UInt64] = [:]
        var forbidden: [String: UInt64] = [:]
        var rateLimited: UInt64 = 0
        var reloads: [String: UInt64] = [:]
    }
    private let state = Locked(State())

    /// Nothing counted yet.
    public init() {}

    /// A failed authentication (401, or a failed TLS handshake), by reason:
    /// `missing_credentials`, `bad_token`, `no_client_cert`, `untrusted_cert`,
    /// `expired_cert`, `not_yet_valid_cert`, `invalid_cert`, `unknown_subject`, `tls_handshake`.
    public func failure(_ reason: String) { state.withLock { $0.failures[reason, default: 0] += 1 } }
    /// A request refused (403) for want of `scope`.
    public func forbidden(needed scope: String) { state.withLock { $0.forbidden[scope, default: 0] += 1 } }
    /// A request refused (429) because its peer failed too often.
    public func rateLimited() { state.withLock { $0.rateLimited += 1 } }
    /// A reload (SIGHUP) of credentials, `ok` or `failed`.
    public func reload(_ result: String) { state.withLock { $0.reloads[result, default: 0] += 1 } }

    /// Failed authentications by reason (for tests and the scrape).
    public var failures: [String: UInt64] { state.withLock { $0.failures } }

    /// The families, in exposition format. `auditDropped`: audit lines lost to
    /// a full queue; `auditPending`: lines not yet written; `certificateNotAfter`:
    /// the TLS certificate's expiry (seconds since the epoch), nil without TLS.
    public func exposition(auditDropped: UInt64, auditPending: Int, certificateNotAfter: Int64?) -> String {
        let s = state.withLock { $0 }
        var w = MetricsWriter()
        let reasons = ["missing_credentials", "bad_token", "no_client_cert", "untrusted_cert", "expired_cert",
                       "not_yet_valid_cert", "invalid_cert", "unknown_subject", "tls_handshake"]
        let allReasons = reasons + s.failures.keys.filter { !reasons.contains($0) }.sorted()
        w.family("iotlbd_auth_failures_total", "counter",
                 "Failed authentications (401s and failed TLS handshakes), by reason.",
                 allReasons.map { ([("reason", $0)], "\(s.failures[$0] ?? 0)") })
        w.family("iotlbd_auth_rate_limited_total", "counter",
                 "Requests refused with 429 because their peer address failed to authenticate too often.",
                 [([], "\(s.rateLimited)")])
        w.family("iotlbd_auth_forbidden_total", "counter",
                 "Requests refused with 403: the credential lacked the scope the route needs, by scope needed.",
                 ["read", "translate", "admin"].map { ([("needed", $0)], "\(s.forbidden[$0] ?? 0)") })
        w.family("iotlbd_credential_reloads_total", "counter",
                 "Reloads of tokens, certificate scopes and TLS files (SIGHUP), by result.",
                 ["ok", "failed"].map { ([("result", $0)], "\(s.reloads[$0] ?? 0)") })
        w.family("iotlbd_audit_lines_dropped_total", "counter",
                 "Audit lines lost because the writer fell behind (queue full).", [([], "\(auditDropped)")])
        w.family("iotlbd_audit_lines_pending", "gauge", "Audit lines queued, not yet written.", [([], "\(auditPending)")])
        if let certificateNotAfter {
            w.family("iotlbd_tls_certificate_not_after_seconds", "gauge",
                     "The TLS certificate's expiry, seconds since the epoch.", [([], "\(certificateNotAfter)")])
        }
        return w.text
    }
}
