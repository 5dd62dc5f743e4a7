// Structure-aware help for the PNG target: after libFuzzer mutates a file, recompute the CRC-32 of every chunk
// (over its type and data) for half of the mutations, so mutated IHDR/PLTE/IDAT contents get past the CRC check
// into the header rules, inflate and unfiltering; the other half keep the CRC-mismatch path covered. The same
// pattern as ZipFixup.swift (npz). Before that, the zlib stream's Adler-32 trailer (split over the IDAT chunks) is
// rewritten to match what the stream inflates to, so mutated stored (level 0) deflate blocks reach the filters. Only linked into fuzz-png (see run.sh).
import CCkptZlib
import CFuzzerHooks

@_cdecl("LLVMFuzzerCustomMutator")
public func fuzzCustomMutator(_ data: UnsafeMutablePointer<UInt8>, _ size: Int, _ maxSize: Int, _ seed: UInt32) -> Int {
    let newSize = LLVMFuzzerMutate(data, size, maxSize)
    if seed & 1 == 0 {
        let b = UnsafeMutableRawBufferPointer(start: data, count: newSize)
        pngFixAdler(b)
        pngFixCRCs(b)
    }
    return newSize
}

/// Walks the chunks after the 8-byte signature (whatever the signature holds) and rewrites each complete chunk's
/// CRC. Stops at the first chunk that runs past the end. Best effort, never reads outside `b`.
func pngFixCRCs(_ b: UnsafeMutableRawBufferPointer) {
    var offset = 8
    while b.count - offset >= 12 {
        let length = Int(b[offset]) << 24 | Int(b[offset + 1]) << 16 | Int(b[offset + 2]) << 8 | Int(b[offset + 3])
        guard length <= b.count - offset - 12 else { return }
        let covered = UnsafeRawBufferPointer(rebasing: b[offset + 4..<offset + 8 + length])
        let crc = UInt32(crc32_z(0, covered.baseAddress!.assumingMemoryBound(to: Bytef.self), covered.count))
        let at = offset + 8 + length
        b[at] = UInt8(truncatingIfNeeded: crc >> 24)
        b[at + 1] = UInt8(truncatingIfNeeded: crc >> 16)
        b[at + 2] = UInt8(truncatingIfNeeded: crc >> 8)
        b[at + 3] = UInt8(truncatingIfNeeded: crc)
        offset = at + 4
    }
}

/// The data ranges of the chunks named IDAT, in file order (complete chunks only).
private func idatRanges(_ b: UnsafeMutableRawBufferPointer) -> [Range<Int>] {
    var ranges: [Range<Int>] = []
    var offset = 8
    while b.count - offset >= 12 {
        let length = Int(b[offset]) << 24 | Int(b[offset + 1]) << 16 | Int(b[offset + 2]) << 8 | Int(b[offset + 3])
        guard length <= b.count - offset - 12 else { break }
        if b[offset + 4] == 0x49 && b[offset + 5] == 0x44 && b[offset + 6] == 0x41 && b[offset + 7] == 0x54 {
            ranges.append(offset + 8..<offset + 8 + length)
        }
        offset += 12 + length
    }
    return ranges
}

/// Inflate output buffer, allocated once (1 MiB: a stream that inflates further is left alone).
nonisolated(unsafe) private let adlerScratch = UnsafeMutableBufferPointer<UInt8>.allocate(capacity: 1 << 20)

/// Raw-inflates the concatenated IDAT data after its 2-byte zlib header and, when the deflate stream ends with
/// 4 bytes to spare, writes the Adler-32 of the output there (big-endian, spread back over the chunks).
func pngFixAdler(_ b: UnsafeMutableRawBufferPointer) {
    let ranges = idatRanges(b)
    var stream: [UInt8] = []
    for range in ranges { stream += UnsafeRawBufferPointer(rebasing: b[range]) }
    guard stream.count >= 6 else { return }
    let output = adlerScratch
    let z = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
    z.initialize(to: z_stream())
    defer { z.deallocate() }
    guard ckpt_inflateInit2(z, -MAX_WBITS) == Z_OK else { return }
    defer { inflateEnd(z) }
    let (status, consumed, produced): (Int32, Int, Int) = stream.withUnsafeMutableBufferPointer { input in
        do {
            let out = output
            z.pointee.next_in = input.baseAddress! + 2
            z.pointee.avail_in = UInt32(input.count - 2)
            z.pointee.next_out = out.baseAddress!
            z.pointee.avail_out = UInt32(out.count)
            let status = inflate(z, Z_FINISH)
            return (status, Int(z.pointee.total_in), Int(z.pointee.total_out))
        }
    }
    guard status == Z_STREAM_END, 2 + consumed + 4 <= stream.count else { return }
    let adler = UInt32(adler32_z(1, output.baseAddress!, produced))
    // Byte k of the stream lives in the chunk whose range covers it.
    for k in 0..<4 {
        var position = 2 + consumed + k
        for range in ranges {
            if position < range.count {
                b[range.lowerBound + position] = UInt8(truncatingIfNeeded: adler >> (24 - 8 * UInt32(k)))
                break
            }
            position -= range.count
        }
    }
}
