// Frames the built-in guest sends: a 12-byte virtio-net header, then a
// payload whose every 8-byte word depends on the frame's sequence number and
// position, so loss, duplication, reordering and corruption all show.

/// Writes and checks test frames.
enum Frame {
    /// The virtio-net header (virtio 1.x, with MRG_RXBUF's num_buffers): zeros here.
    static let headerBytes = 12

    @inline(__always)
    static func word(_ seq: UInt64, _ k: Int) -> UInt64 {
        ((seq &<< 20) | UInt64(k)) ^ 0xA5C3_5A3C_96E1_0F87
    }

    /// Writes frame `seq` with `payload` bytes at `p` (header first).
    /// SAFETY: `p` is a buffer slot of the guest's memory, at least
    /// `headerBytes + payload` long (the workload sizes slots so).
    static func write(_ p: UnsafeMutableRawPointer, seq: UInt64, payload: Int) {
        p.initializeMemory(as: UInt8.self, repeating: 0, count: headerBytes)
        let body = p + headerBytes
        let words = payload / 8
        for k in 0..<words { body.storeBytes(of: word(seq, k), toByteOffset: 8 * k, as: UInt64.self) }
        var tail = word(seq, words)
        for i in 0..<(payload % 8) {
            body.storeBytes(of: UInt8(truncatingIfNeeded: tail), toByteOffset: 8 * words + i, as: UInt8.self)
            tail >>= 8
        }
    }

    /// Whether `length` bytes at `p` are exactly frame `seq` with `payload` bytes.
    /// SAFETY: `p` is a buffer slot of at least `headerBytes + payload` bytes;
    /// nothing is read unless `length` (the device's word) is exactly that.
    static func verify(_ p: UnsafeRawPointer, length: Int, seq: UInt64, payload: Int) -> Bool {
        guard length == headerBytes + payload else { return false }
        for i in 0..<headerBytes where p.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
        let body = p + headerBytes
        let words = payload / 8
        for k in 0..<words where body.loadUnaligned(fromByteOffset: 8 * k, as: UInt64.self) != word(seq, k) {
            return false
        }
        var tail = word(seq, words)
        for i in 0..<(payload % 8) {
            if body.load(fromByteOffset: 8 * words + i, as: UInt8.self) != UInt8(truncatingIfNeeded: tail) { return false }
            tail >>= 8
        }
        return true
    }
}
