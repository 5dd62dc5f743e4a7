import CCkptZlib
import CkptCore
import Dispatch

/// CRC-32 (the zip/PNG polynomial) via zlib.
public enum CRC32 {
    public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return crc }
        return UInt32(crc32_z(UInt(crc), base.assumingMemoryBound(to: Bytef.self), bytes.count))
    }
}

/// Raw deflate (zip method 8) on every core, the way pigz does it: the input is cut into 1 MiB blocks, each block
/// is compressed by its own zlib stream ending in a sync flush (byte-aligned, not final), and the last block of
/// the member ends with Z_FINISH. The concatenation is one valid deflate stream that any inflater reads; the only
/// cost is that no block can refer back into the previous one (negligible for tensor data).
final class ParallelDeflater {
    private let blockSize = 1 << 20
    private let batchBlocks = max(2, Parallel.coreCount * 2)
    private let level: Int32
    private let pending: UnsafeMutableRawPointer
    private var pendingCount = 0
    /// deflate's worst-case expansion of one block, plus room for the flush markers.
    private var outputBound: Int { blockSize + blockSize / 1000 + 1024 }
    private let outputs: UnsafeMutableRawPointer

    init(level: Int32 = Z_DEFAULT_COMPRESSION) throws(CkptError) {
        self.level = level
        let pending = try LargeAllocation.allocate(blockSize * batchBlocks)
        do {
            outputs = try LargeAllocation.allocate((blockSize + blockSize / 1000 + 1024) * batchBlocks)
        } catch {
            LargeAllocation.deallocate(pending, count: blockSize * batchBlocks)
            throw error
        }
        self.pending = pending
    }

    deinit {
        LargeAllocation.deallocate(pending, count: blockSize * batchBlocks)
        LargeAllocation.deallocate(outputs, count: outputBound * batchBlocks)
    }

    /// Buffers `input`, compressing and emitting whole batches of blocks as they fill.
    func compress(_ input: UnsafeRawBufferPointer, _ sink: (UnsafeRawBufferPointer) throws(CkptError) -> Void) throws(CkptError) {
        var offset = 0
        let capacity = blockSize * batchBlocks
        while offset < input.count {
            let n = min(capacity - pendingCount, input.count - offset)
            (pending + pendingCount).copyMemory(from: input.baseAddress! + offset, byteCount: n)
            pendingCount += n
            offset += n
            // Keep the last batch back until `finish`, so the final block can be marked final.
            if pendingCount == capacity && offset < input.count { try flush(final: false, sink) }
        }
    }

    /// Compresses what is buffered and ends the stream.
    func finish(_ sink: (UnsafeRawBufferPointer) throws(CkptError) -> Void) throws(CkptError) {
        try flush(final: true, sink)
    }

    private func flush(final: Bool, _ sink: (UnsafeRawBufferPointer) throws(CkptError) -> Void) throws(CkptError) {
        let blocks = max(1, (pendingCount + blockSize - 1) / blockSize)
        let bound = outputBound
        let sizes = UnsafeMutableBufferPointer<Int>.allocate(capacity: blocks)
        defer { sizes.deallocate() }
        sizes.initialize(repeating: -1)
        nonisolated(unsafe) let input = UnsafeRawPointer(pending), output = outputs, produced = sizes
        let total = pendingCount, blockSize = self.blockSize, level = self.level
        DispatchQueue.concurrentPerform(iterations: blocks) { i in
            let start = i * blockSize
            let count = max(0, min(blockSize, total - start))
            let last = final && i == blocks - 1
            produced[i] = ParallelDeflater.deflateBlock(
                input + start, count, into: output + i * bound, capacity: bound, level: level, finish: last)
        }
        for i in 0..<blocks {
            guard sizes[i] >= 0 else { throw CkptError(.io, "zlib deflate failed") }
            try sink(UnsafeRawBufferPointer(start: outputs + i * bound, count: sizes[i]))
        }
        pendingCount = 0
    }

    /// Compresses one block with a fresh raw-deflate stream; returns the compressed size, or -1 on failure.
    private static func deflateBlock(
        _ input: UnsafeRawPointer, _ count: Int, into output: UnsafeMutableRawPointer, capacity: Int, level: Int32, finish: Bool
    ) -> Int {
        // zlib keeps a pointer back to its z_stream: use one address for the stream's whole life.
        let stream = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
        stream.initialize(to: z_stream())
        defer { stream.deallocate() }
        // Raw deflate (windowBits -15): zip members carry no zlib header.
        guard ckpt_deflateInit2(stream, level, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY) == Z_OK else { return -1 }
        defer { deflateEnd(stream) }
        stream.pointee.next_in = UnsafeMutablePointer(mutating: input.assumingMemoryBound(to: Bytef.self))
        stream.pointee.avail_in = UInt32(count)
        stream.pointee.next_out = output.assumingMemoryBound(to: Bytef.self)
        stream.pointee.avail_out = UInt32(capacity)
        let status = deflate(stream, finish ? Z_FINISH : Z_SYNC_FLUSH)
        let done = finish ? status == Z_STREAM_END : (status == Z_OK && stream.pointee.avail_in == 0)
        return done ? capacity - Int(stream.pointee.avail_out) : -1
    }
}

/// Inflates a raw-deflate zip member into a caller-sized buffer, never writing past it.
enum RawInflate {
    /// Inflates `input` into `output`, which holds exactly the size the zip entry declares.
    /// - Returns: the number of bytes produced: all of `output` when the stream ended exactly there. Throws
    ///   `inflateOverrun` when the stream has more data than declared, `zipFormat` on corrupt data or a stream
    ///   shorter than declared.
    /// With `prefixOnly`, stops quietly once `output` is full (used to peek at an .npy header).
    /// With `zlibWrapped`, `input` is a zlib stream (RFC 1950: 2-byte header, Adler-32 trailer, which zlib checks)
    /// instead of raw deflate: PNG's IDAT data.
    static func inflate(
        _ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer, prefixOnly: Bool = false, zlibWrapped: Bool = false
    ) throws(CkptError) -> Int {
        let stream = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
        stream.initialize(to: z_stream())
        defer { stream.deallocate() }
        guard ckpt_inflateInit2(stream, zlibWrapped ? MAX_WBITS : -MAX_WBITS) == Z_OK else {
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
