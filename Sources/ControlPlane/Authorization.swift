// Who may do what: every request but /healthz is authenticated (client
// certificate, bearer token) and checked against the scope its route needs;
// failures are counted by reason and rate-limited per peer (FailureLimiter).
//
// In order:
// 1. A listener with --tls-client-ca requires a verified client certificate
//    (401 no_client_cert, untrusted_cert, expired_cert, …).
// 2. Routes open to anyone (/metrics without --metrics-auth) stop here.
// 3. With --token-file, a request carrying `Authorization: Bearer …` is who
//    its token says (401 bad_token); a peer over its failure budget gets 429
//    before its token is looked at.
// 4. Else a verified certificate is who --tls-client-scopes says (401
//    unknown_subject), or, without that file, admin named by its subject.
// 5. Else, with --token-file, 401 missing_credentials; without, admin ("-").
// Then a credential below the route's scope gets 403 `forbidden` naming it.
import HTTP
import Metrics

extension ControlPlane {
    /// The identity a request acts as, or the refusal to answer with.
    func authorize(_ request: Request, pattern: String?) -> Result<Identity, RefusedRequest> {
        let needed = Scope.needed(method: request.method, path: request.path, pattern: pattern,
                                  metricsAuth: settings.metricsAuth)
        let anyone = Identity(name: "-", scope: .admin, via: "none")
        if request.path == "/healthz" { return .success(anyone) }
        let peer = request.peer.address
        if let cert = request.peer.certificate, cert.status != .verified {
            let (reason, message) = switch cert.status {
            case .missing: ("no_client_cert", "this listener requires a client certificate (--tls-client-ca)")
            case .untrusted: ("untrusted_cert", "the client certificate is not signed by a CA of --tls-client-ca")
            case .expired: ("expired_cert", "the client certificate has expired")
            case .notYetValid: ("not_yet_valid_cert", "the client certificate is not valid yet")
            default: ("invalid_cert", "the client certificate was refused (signature, key usage or revocation)")
            }
            return .failure(failed(reason, message, peer: peer))
        }
        guard let needed else { return .success(anyone) }
        let set = credentials.set
        func allowed(_ id: Identity) -> Result<Identity, RefusedRequest> {
            guard id.scope >= needed else {
                authCounters.forbidden(needed: needed.description)
                return .failure(RefusedRequest(response: forbidden(id, needs: needed, request), identity: id))
            }
            return .success(id)
        }
        if set.hasTokens, let header = request.headers["authorization"] {
            if let retry = limiter.retryAfter(peer) { return .failure(limited(peer, retry)) }
            guard let id = set.identity(authorization: header) else {
                return .failure(failed("bad_token", "the bearer token is not one of --token-file's", peer: peer))
            }
            return allowed(id)
        }
        if let cert = request.peer.certificate {
            guard let subjects = set.subjects else { return allowed(Identity(name: cert.subject, scope: .admin, via: "certificate")) }
            guard let id = subjects[cert.subject] else {
                return .failure(failed("unknown_subject", "certificate subject \"\(cert.subject)\" is not in --tls-client-scopes", peer: peer))
            }
            return allowed(id)
        }
        if set.hasTokens {
            if let retry = limiter.retryAfter(peer) { return .failure(limited(peer, retry)) }
            return .failure(failed("missing_credentials", "missing bearer token: send Authorization: Bearer TOKEN", peer: peer))
        }
        return .success(anyone)
    }

    private func failed(_ reason: String, _ message: String, peer: String) -> RefusedRequest {
        authCounters.failure(reason)
        limiter.failed(peer)
        var resp = Response.error(APIError(401, "unauthorized", message))
        resp.headers.append(("WWW-Authenticate", "Bearer"))
        return RefusedRequest(response: resp, identity: nil, reason: reason)
    }

    private func limited(_ peer: String, _ seconds: Int) -> RefusedRequest {
        authCounters.rateLimited()
        var resp = Response.error(APIError(429, "rate_limited",
                                           "too many failed authentications from \(peer.isEmpty ? "this peer" : peer); retry in \(seconds) s"))
        resp.headers.append(("Retry-After", "\(seconds)"))
        return RefusedRequest(response: resp, identity: nil, reason: "rate_limited")
    }
}

/// A request refused before its handler: the answer, and who it was (for the audit line).
struct RefusedRequest: Error {
    let response: Response
    let identity: Identity?
    var reason: String?
}
