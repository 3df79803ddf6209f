// Progress lines, tables, JSON.
import ControlPlane
import Foundation
import Glibc

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
