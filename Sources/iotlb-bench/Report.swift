// Progress lines, tables, and the machine-readable report (--json FILE).
import ArgumentParser
import Foundation
import Glibc
import JSON

/// Writes a progress line to stderr, overwriting the previous one.
func progress(_ s: String) {
    FileHandle.standardError.write(Data(("\r\u{1B}[2K" + s).utf8))
}

func progressDone() { FileHandle.standardError.write(Data("\n".utf8)) }

/// A Markdown table.
func table(_ header: [String], _ rows: [[String]]) -> String {
    var out = "| " + header.joined(separator: " | ") + " |\n"
    out += "|" + header.map { _ in "---:" }.joined(separator: "|") + "|\n"
    for r in rows { out += "| " + r.joined(separator: " | ") + " |\n" }
    return out
}

func fmt(_ v: Double, _ digits: Int = 2) -> String {
    var s = String(format: "%.\(digits)f", v)
    if s == "-0.00" { s = "0.00" }
    return s
}

func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    guard !s.isEmpty else { return 0 }
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

func sleepSeconds(_ s: Double) { usleep(UInt32(s * 1_000_000)) }

// MARK: - Machine-readable output

/// `--json FILE`, shared by every subcommand (`@OptionGroup var output: ReportOptions`).
struct ReportOptions: ParsableArguments {
    @Option(name: .customLong("json"),
            help: ArgumentHelp("Also write the results as JSON to FILE (schema \(Report.schema)); '-' prints the JSON to stdout instead of the table.",
                               valueName: "FILE"))
    var path: String?
}

/// What one subcommand measured, for scripts and charts: every measured run as a
/// flat row (the parameters that identify it plus its figures), per-configuration
/// summaries (what the Markdown table shows), and where and how it was measured.
///
///     {"schema": "iotlb-bench/1", "benchmark": "datapath",
///      "meta": {"date", "duration_s", "command", "argv", "build", "host": {…}, "parameters": {…}},
///      "rows": [{"benchmark": "datapath", …}, …],
///      "summary": [{"benchmark": "datapath", …}, …]}
///
/// A new subcommand makes one `Report(benchmark:parameters:)`, calls `row(_:)` per
/// measurement and `summary(_:)` per configuration, and ends with `emit(table:to:)`.
/// Readers find rows by `benchmark` and by key, so adding keys does not break them.
struct Report {
    static let schema = "iotlb-bench/1"

    let benchmark: String
    /// The subcommand's options, as given or defaulted.
    var parameters: [(String, JSON)]
    private(set) var rows: [JSON] = []
    private(set) var summaries: [JSON] = []
    private let started = Date()

    init(benchmark: String, parameters: [(String, JSON)]) {
        self.benchmark = benchmark
        self.parameters = parameters
    }

    /// One measured run: identifying parameters first, then its figures.
    mutating func row(_ fields: [(String, JSON)]) { rows.append(.object([("benchmark", .string(benchmark))] + fields)) }

    /// One configuration's figures over its runs (medians, ratios, totals).
    mutating func summary(_ fields: [(String, JSON)]) {
        summaries.append(.object([("benchmark", .string(benchmark))] + fields))
    }

    /// The whole report.
    var document: JSON {
        let meta: JSON = .object([
            ("date", .string(ISO8601DateFormatter().string(from: started))),
            ("duration_s", .double((Date().timeIntervalSince(started) * 10).rounded() / 10)),
            ("command", .string(CommandLine.arguments.map(shellQuoted).joined(separator: " "))),
            ("argv", .array(CommandLine.arguments.map { .string($0) })),
            ("build", .string(buildConfiguration)),
            ("host", Report.host),
            ("parameters", .object(parameters)),
        ])
        return .object([("schema", .string(Report.schema)), ("benchmark", .string(benchmark)), ("meta", meta),
                        ("rows", .array(rows)), ("summary", .array(summaries))])
    }

    /// The Markdown table to stdout, and the JSON where `--json` says ('-': stdout, instead of the table).
    func emit(table: String, to options: ReportOptions) throws {
        guard let path = options.path else { return print(table, terminator: table.hasSuffix("\n") ? "" : "\n") }
        let text = Report.layout(document)
        if path == "-" { return print(text, terminator: "") }
        print(table, terminator: table.hasSuffix("\n") ? "" : "\n")
        let url = URL(fileURLWithPath: path)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try Data(text.utf8).write(to: url, options: .atomic)
        FileHandle.standardError.write(Data("wrote \(path)\n".utf8))
    }

    /// One top-level member per line and one row per line: small diffs when results are committed.
    static func layout(_ doc: JSON) -> String {
        guard case .object(let members) = doc else { return doc.text + "\n" }
        let lines = members.map { key, value -> String in
            let k = JSON.string(key).text + ": "
            if case .array(let items) = value, !items.isEmpty {
                return k + "[\n" + items.map { "  " + $0.text }.joined(separator: ",\n") + "\n]"
            }
            return k + value.text
        }
        return "{\n" + lines.joined(separator: ",\n") + "\n}\n"
    }

    private var buildConfiguration: String {
        #if DEBUG
            "debug"
        #else
            "release"
        #endif
    }

    /// Where it ran: enough to tell two machines (or two placements) apart.
    static var host: JSON {
        var u = utsname()
        uname(&u)
        func field(_ t: Any) -> String {
            withUnsafeBytes(of: t) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        }
        func firstValue(in path: String, key: String) -> String? {
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
            for line in text.split(separator: "\n") where line.hasPrefix(key) {
                let rest = line.dropFirst(key.count).drop { $0 == " " || $0 == "\t" || $0 == ":" || $0 == "=" }
                return rest.trimmingCharacters(in: CharacterSet(charactersIn: "\" "))
            }
            return nil
        }
        return .object([
            ("hostname", .string(field(u.nodename))),
            ("cores", .count(ProcessInfo.processInfo.activeProcessorCount)),
            ("cpu", firstValue(in: "/proc/cpuinfo", key: "model name").map { .string($0) } ?? .null),
            ("kernel", .string(field(u.release))),
            ("machine", .string(field(u.machine))),
            ("os", firstValue(in: "/etc/os-release", key: "PRETTY_NAME").map { .string($0) } ?? .null),
            ("memory_bytes", .count(ProcessInfo.processInfo.physicalMemory)),
        ])
    }
}

/// `s` as a shell word (quoted only when it has to be).
func shellQuoted(_ s: String) -> String {
    let plain = CharacterSet(charactersIn: "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=,:@%+")
    if !s.isEmpty, s.unicodeScalars.allSatisfy(plain.contains) { return s }
    return "'" + s.replacingOccurrences(of: "'", with: #"'\''"#) + "'"
}
