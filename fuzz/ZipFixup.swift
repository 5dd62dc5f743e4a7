// Structure-aware help for the NPZ target: after libFuzzer mutates a zip, rewrite each member's CRC-32 (central
// directory and local header) to match its mutated contents, so mutations get past the CRC check and reach the
// .npy parsing, byte swapping and transposing that `load()` does behind it. Only half of the mutations are fixed
// up, so the CRC-mismatch paths stay covered. Only linked into fuzz-npz (see run.sh).
import CCkptZlib
import CFuzzerHooks

@_cdecl("LLVMFuzzerCustomMutator")
public func fuzzCustomMutator(_ data: UnsafeMutablePointer<UInt8>, _ size: Int, _ maxSize: Int, _ seed: UInt32) -> Int {
    let newSize = LLVMFuzzerMutate(data, size, maxSize)
    if seed & 1 == 0 {
        zipFixCRCs(UnsafeMutableRawBufferPointer(start: data, count: newSize))
    }
    return newSize
}

private func le16(_ b: UnsafeMutableRawBufferPointer, _ at: Int) -> Int {
    Int(b[at]) | Int(b[at + 1]) << 8
}
private func le32(_ b: UnsafeMutableRawBufferPointer, _ at: Int) -> Int {
    le16(b, at) | le16(b, at + 2) << 16
}
private func put32(_ b: UnsafeMutableRawBufferPointer, _ at: Int, _ v: UInt32) {
    for i in 0..<4 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) }
}

/// Recomputes every member's CRC-32 in place. Best effort: anything that does not parse is left alone.
func zipFixCRCs(_ b: UnsafeMutableRawBufferPointer) {
    let n = b.count
    guard n >= 22 else { return }
    // Last end-of-central-directory record.
    var eocd = n - 22
    while eocd >= 0 && le32(b, eocd) != 0x0605_4B50 { eocd -= 1 }
    guard eocd >= 0 else { return }
    let entries = le16(b, eocd + 10)
    var position = le32(b, eocd + 16)
    for _ in 0..<entries {
        guard position >= 0, position + 46 <= n, le32(b, position) == 0x0201_4B50 else { return }
        let method = le16(b, position + 10)
        let compressed = le32(b, position + 20)
        let uncompressed = le32(b, position + 24)
        let nameLength = le16(b, position + 28), extraLength = le16(b, position + 30), commentLength = le16(b, position + 32)
        let local = le32(b, position + 42)
        defer { position += 46 + nameLength + extraLength + commentLength }
        guard local + 30 <= n, le32(b, local) == 0x0403_4B50 else { continue }
        let start = local + 30 + le16(b, local + 26) + le16(b, local + 28)
        guard start <= n, compressed <= n - start else { continue }
        let raw = UnsafeRawBufferPointer(rebasing: b[start..<start + compressed])
        let crc: UInt32?
        switch method {
        case 0: crc = crcOf(raw)
        case 8: crc = uncompressed <= 1 << 22 ? inflatedCRC(raw, expected: uncompressed) : nil
        default: crc = nil
        }
        guard let crc else { continue }
        put32(b, position + 16, crc)
        put32(b, local + 14, crc)
    }
}

private func crcOf(_ raw: UnsafeRawBufferPointer) -> UInt32 {
    guard let base = raw.baseAddress, raw.count > 0 else { return 0 }
    return UInt32(crc32_z(0, base.assumingMemoryBound(to: Bytef.self), raw.count))
}

/// CRC-32 of the first `expected` bytes raw-inflated from `raw`, or nil when it does not inflate that far.
private func inflatedCRC(_ raw: UnsafeRawBufferPointer, expected: Int) -> UInt32? {
    let output = UnsafeMutablePointer<UInt8>.allocate(capacity: max(expected, 1))
    defer { output.deallocate() }
    // Heap-allocated: zlib keeps a pointer back to the stream and checks it on every call.
    let stream = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
    stream.initialize(to: z_stream())
    defer { stream.deallocate() }
    guard ckpt_inflateInit2(stream, -MAX_WBITS) == Z_OK else { return nil }
    defer { inflateEnd(stream) }
    stream.pointee.next_in = UnsafeMutablePointer(mutating: raw.baseAddress?.assumingMemoryBound(to: Bytef.self))
    stream.pointee.avail_in = UInt32(raw.count)
    stream.pointee.next_out = output
    stream.pointee.avail_out = UInt32(expected)
    let status = inflate(stream, Z_FINISH)
    guard status == Z_STREAM_END || status == Z_OK || status == Z_BUF_ERROR, Int(stream.pointee.total_out) == expected else { return nil }
    return crcOf(UnsafeRawBufferPointer(start: output, count: expected))
}
