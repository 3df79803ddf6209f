// Credentials: the token file and the certificate subjects file, parsed,
// checked, and re-read on SIGHUP (a file that fails to parse keeps the old set).
//
// --token-file: one credential per line, `TOKEN SCOPE NAME`; `#` starts a
// comment line; a file whose only line is a bare token keeps the old meaning
// (that token, scope admin, name "token").
// --tls-client-scopes: one certificate per line, `SUBJECT SCOPE NAME`, where
// SUBJECT is the certificate's subject as RFC 4514 writes it (what
// `openssl x509 -noout -subject -nameopt RFC2253` prints after "subject="),
// spaces allowed: the last two words of the line are the scope and the name.
import HTTP
import Platform

/// Why a credentials file was refused.
public struct CredentialsError: Error, CustomStringConvertible {
    /// The file, the line and what is wrong with it.
    public let description: String
}

/// The credentials in force: tokens and certificate subjects with their scopes.
public struct CredentialSet: Sendable {
    /// "Bearer TOKEN" (what the Authorization header holds) → who.
    var tokens: [(header: [UInt8], identity: Identity)] = []
    /// Certificate subject → who; nil: any verified certificate is admin, named by its subject.
    var subjects: [String: Identity]?

    /// No credentials: authentication off (unless a listener asks for client certificates).
    public init() {}

    /// One token with scope admin, named "token" (what a bare token file means).
    public init(adminToken: String) {
        tokens = [(Array(("Bearer " + adminToken).utf8), Identity(name: "token", scope: .admin, via: "token"))]
    }

    /// The tokens of a token file's text.
    public init(tokenText: String, file: String = "-") throws(CredentialsError) {
        tokens = try CredentialSet.parseTokens(tokenText, file: file).map { (Array(("Bearer " + $0.0).utf8), $0.1) }
    }

    /// The credentials of a token file's text (see the top of this file).
    public static func parseTokens(_ text: String, file: String) throws(CredentialsError) -> [(String, Identity)] {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).enumerated()
            .map { ($0.offset + 1, $0.element.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" })) }
            .filter { !$0.1.isEmpty && !$0.1[0].hasPrefix("#") }
        if lines.count == 1, lines[0].1.count == 1 {
            return [(String(lines[0].1[0]), Identity(name: "token", scope: .admin, via: "token"))]
        }
        guard !lines.isEmpty else { throw CredentialsError(description: "--token-file \(file) holds no token") }
        var out: [(String, Identity)] = []
        for (n, words) in lines {
            guard words.count == 3 else {
                throw CredentialsError(description: "--token-file \(file) line \(n): expected `TOKEN SCOPE NAME` (scope read, translate or admin)")
            }
            let (token, scope, name) = (String(words[0]), String(words[1]), String(words[2]))
            guard let s = Scope(name: scope) else {
                throw CredentialsError(description: "--token-file \(file) line \(n): unknown scope \"\(scope)\" (read, translate or admin)")
            }
            guard !out.contains(where: { $0.0 == token }) else {
                throw CredentialsError(description: "--token-file \(file) line \(n): the token of \"\(name)\" is given twice")
            }
            out.append((token, Identity(name: name, scope: s, via: "token")))
        }
        return out
    }

    /// The subjects of a certificate scopes file's text (see the top of this file).
    public static func parseSubjects(_ text: String, file: String) throws(CredentialsError) -> [String: Identity] {
        var out: [String: Identity] = [:]
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(" \t\r")
            if line.isEmpty || line.hasPrefix("#") { continue }
            var words = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard words.count >= 3, let name = words.popLast().map(String.init), let scope = words.popLast().map(String.init) else {
                throw CredentialsError(description: "--tls-client-scopes \(file) line \(i + 1): expected `SUBJECT SCOPE NAME`")
            }
            guard let s = Scope(name: scope) else {
                throw CredentialsError(description: "--tls-client-scopes \(file) line \(i + 1): unknown scope \"\(scope)\" (read, translate or admin)")
            }
            let subject = words.joined(separator: " ")
            guard out[subject] == nil else {
                throw CredentialsError(description: "--tls-client-scopes \(file) line \(i + 1): subject \"\(subject)\" is given twice")
            }
            out[subject] = Identity(name: name, scope: s, via: "certificate")
        }
        return out
    }

    /// The identity whose token `authorization` (the header's value) carries, nil for none.
    /// Compares with every token, each without an early exit: the time taken
    /// says nothing about how much of a token matched.
    func identity(authorization: String) -> Identity? {
        let given = Array(authorization.utf8)
        var found: Identity?
        for t in tokens where constantTimeEqual(given, t.header) { found = t.identity }
        return found
    }

    /// Whether any token is configured.
    var hasTokens: Bool { !tokens.isEmpty }
}

/// The credentials in force, and the files they are re-read from.
public final class Credentials: Sendable {
    /// --token-file.
    public let tokenFile: String?
    /// --tls-client-scopes.
    public let subjectsFile: String?
    private let current: Locked<CredentialSet>

    /// Credentials read from the files (refused as the start-up would be).
    public init(tokenFile: String?, subjectsFile: String?) throws(CredentialsError) {
        self.tokenFile = tokenFile
        self.subjectsFile = subjectsFile
        current = Locked(try Credentials.read(tokenFile: tokenFile, subjectsFile: subjectsFile))
    }

    /// Fixed credentials (tests, in-process daemons).
    public init(_ set: CredentialSet) {
        tokenFile = nil
        subjectsFile = nil
        current = Locked(set)
    }

    /// The set in force now.
    public var set: CredentialSet { current.withLock { $0 } }

    /// Re-reads both files; on any refusal the set in force stays.
    public func reload() throws(CredentialsError) {
        let fresh = try Credentials.read(tokenFile: tokenFile, subjectsFile: subjectsFile)
        current.withLock { $0 = fresh }
    }

    /// A summary for the log: how many tokens and subjects, never a secret.
    public var summary: String {
        let s = set
        return "\(s.tokens.count) token(s), " + (s.subjects.map { "\($0.count) certificate subject(s)" } ?? "any verified certificate admin")
    }

    private static func read(tokenFile: String?, subjectsFile: String?) throws(CredentialsError) -> CredentialSet {
        var set = CredentialSet()
        if let tokenFile {
            let text = try readText(tokenFile, flag: "--token-file")
            set.tokens = try CredentialSet(tokenText: text, file: tokenFile).tokens
        }
        if let subjectsFile {
            set.subjects = try CredentialSet.parseSubjects(try readText(subjectsFile, flag: "--tls-client-scopes"), file: subjectsFile)
        }
        return set
    }

    private static func readText(_ path: String, flag: String) throws(CredentialsError) -> String {
        let bytes: [UInt8]?
        do { bytes = try readWholeFile(path) } catch { throw CredentialsError(description: "\(flag) \(error.description)") }
        guard let bytes else { throw CredentialsError(description: "\(flag) \(path): no such file") }
        return String(decoding: bytes, as: UTF8.self)
    }
}

extension Substring {
    func trimmingCharacters(_ set: String) -> Substring {
        var s = self
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return s
    }
}
