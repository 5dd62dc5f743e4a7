import CCkptZlib
import CkptCore

/// CRC-32 (the zip/PNG polynomial) via zlib.
public enum CRC32 {
    public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return crc }
        return UInt32(crc32_z(UInt(crc), base.assumingMemoryBound(to: Bytef.self), bytes.count))
    }
}

/// A raw-deflate (zip method 8) stream. Owns the heap-allocated z_stream (zlib keeps a pointer back to it, so it
/// must not move) and ends it in `deinit`.
struct RawDeflater: ~Copyable {
    private let stream: UnsafeMutablePointer<z_stream>
    private let output: UnsafeMutablePointer<UInt8>
    private static let outputCapacity = 1 << 18

    init(level: Int32 = Z_DEFAULT_COMPRESSION) throws(CkptError) {
        let stream = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
        stream.initialize(to: z_stream())
        // windowBits -15: raw deflate, no zlib header, as zip requires.
        let status = ckpt_deflateInit2(stream, level, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY)
        guard status == Z_OK else {
            stream.deallocate()
            throw CkptError(.io, "zlib deflateInit2 failed", cause: "zlib status \(status)")
        }
        self.stream = stream
        self.output = UnsafeMutablePointer<UInt8>.allocate(capacity: RawDeflater.outputCapacity)
    }

    deinit {
        deflateEnd(stream)
        stream.deallocate()
        output.deallocate()
    }

    /// Compresses `input` (or finishes the stream when `finish`), handing compressed bytes to `sink`.
    func compress(_ input: UnsafeRawBufferPointer, finish: Bool, _ sink: (UnsafeRawBufferPointer) throws(CkptError) -> Void) throws(CkptError) {
        var remaining = input
        repeat {
            // avail_in is 32-bit: feed at most 1 GiB at a time.
            let feed = min(remaining.count, 1 << 30)
            stream.pointee.next_in = UnsafeMutablePointer(mutating: remaining.baseAddress?.assumingMemoryBound(to: Bytef.self))
            stream.pointee.avail_in = UInt32(feed)
            let last = finish && feed == remaining.count
            while true {
                stream.pointee.next_out = output
                stream.pointee.avail_out = UInt32(RawDeflater.outputCapacity)
                let status = deflate(stream, last ? Z_FINISH : Z_NO_FLUSH)
                guard status == Z_OK || status == Z_STREAM_END || status == Z_BUF_ERROR else {
                    throw CkptError(.io, "zlib deflate failed", cause: "zlib status \(status)")
                }
                let produced = RawDeflater.outputCapacity - Int(stream.pointee.avail_out)
                if produced > 0 { try sink(UnsafeRawBufferPointer(start: output, count: produced)) }
                if last ? status == Z_STREAM_END : (stream.pointee.avail_in == 0 && stream.pointee.avail_out > 0) { break }
            }
            remaining = feed == remaining.count ? UnsafeRawBufferPointer(start: nil, count: 0) : UnsafeRawBufferPointer(rebasing: remaining[feed...])
        } while remaining.count > 0
    }
}

/// Inflates a raw-deflate zip member into a caller-sized buffer, never writing past it.
enum RawInflate {
    enum Outcome { case complete, truncated }

    /// Inflates `input` into `output`, which holds exactly the size the zip entry declares.
    /// - Returns: `.complete` when the stream ended exactly at the end of `output`. Throws `inflateOverrun` when
    ///   the stream has more data than declared, `zipFormat` on corrupt data or a stream shorter than declared.
    /// With `prefixOnly`, stops quietly once `output` is full (used to peek at an .npy header).
    static func inflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer, prefixOnly: Bool = false) throws(CkptError) -> Int {
        let stream = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
        stream.initialize(to: z_stream())
        defer { stream.deallocate() }
        guard ckpt_inflateInit2(stream, -MAX_WBITS) == Z_OK else {
            throw CkptError(.io, "zlib inflateInit2 failed")
        }
        defer { inflateEnd(stream) }
        var consumed = 0
        var produced = 0
        while true {
            let feed = min(input.count - consumed, 1 << 30)
            let room = min(output.count - produced, 1 << 30)
            stream.pointee.next_in = UnsafeMutablePointer(mutating: input.baseAddress.map { ($0 + consumed).assumingMemoryBound(to: Bytef.self) })
            stream.pointee.avail_in = UInt32(feed)
            var scratch: UInt8 = 0
            let status: Int32 = withUnsafeMutablePointer(to: &scratch) { scratchPointer in
                if room > 0 {
                    stream.pointee.next_out = (output.baseAddress! + produced).assumingMemoryBound(to: Bytef.self)
                    stream.pointee.avail_out = UInt32(room)
                } else {
                    // Output full: probe with one byte to learn whether the stream holds more than declared.
                    stream.pointee.next_out = scratchPointer
                    stream.pointee.avail_out = 1
                }
                return CCkptZlib.inflate(stream, Z_NO_FLUSH)
            }
            consumed += feed - Int(stream.pointee.avail_in)
            if room > 0 {
                produced += room - Int(stream.pointee.avail_out)
            } else if stream.pointee.avail_out == 0 {
                throw CkptError(.inflateOverrun, "member inflates past its declared size of \(output.count) bytes")
            }
            if prefixOnly && produced == output.count { return produced }
            switch status {
            case Z_STREAM_END:
                guard produced == output.count else {
                    throw CkptError(.zipFormat, "member inflates to \(produced) bytes but declares \(output.count)")
                }
                return produced
            case Z_OK:
                continue
            case Z_BUF_ERROR:
                // No progress was possible with output room available: the input ran out mid-stream.
                throw CkptError(.zipFormat, "deflate stream ends early: \(produced) of \(output.count) bytes")
            default:
                let message = stream.pointee.msg.map { String(cString: $0) } ?? "status \(status)"
                throw CkptError(.zipFormat, "corrupt deflate data", cause: message)
            }
        }
    }
}
