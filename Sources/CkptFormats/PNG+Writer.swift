import CCkptZlib
import CkptCore

extension PNG {
    /// The most bytes one IDAT chunk carries; longer image data is split over several chunks.
    static let maximumChunkData = 1 << 23

    /// Encodes an 8-bit grey (1 channel) or RGB (3 channels) image as a PNG: IHDR (bit depth 8, colour type 0 or 2,
    /// not interlaced), the scanlines with filter type 0 (none) deflated by the package's parallel deflater
    /// inside a zlib stream (RFC 1950 header, Adler-32 trailer), split into IDAT chunks of at most 8 MiB, and IEND;
    /// every chunk carries its CRC-32. Refuses an image with no pixels or larger than ``maximumDimension``.
    public static func encode(_ image: DecodedImage) throws(CkptError) -> [UInt8] {
        try encode(image, chunkSize: maximumChunkData)
    }

    /// ``encode(_:)`` with IDAT chunks of at most `chunkSize` bytes.
    static func encode(_ image: DecodedImage, chunkSize: Int) throws(CkptError) -> [UInt8] {
        guard image.width >= 1, image.height >= 1 else {
            throw CkptError(.invalidArgument, "a PNG needs at least 1×1 pixels (got \(image.width)×\(image.height))")
        }
        guard image.width <= maximumDimension, image.height <= maximumDimension else {
            throw CkptError(.tooLarge, "\(image.width)×\(image.height) exceeds the \(maximumDimension)-pixel side PNG images are limited to")
        }
        // Raw scanlines: a filter byte (0) before each row.
        let rowBytes = image.width * image.channels
        var raw: [UInt8] = []
        raw.reserveCapacity(image.height * (1 + rowBytes))
        for y in 0..<image.height {
            raw.append(0)
            raw.append(contentsOf: image.pixels[(y * rowBytes)..<((y + 1) * rowBytes)])
        }
        // zlib stream: CMF 0x78 (deflate, 32 KiB window), FLG 0x9C (default level, check bits), raw deflate, Adler-32.
        var stream: [UInt8] = [0x78, 0x9C]
        let deflater = try ParallelDeflater()
        let append = { (chunk: UnsafeRawBufferPointer) throws(CkptError) in stream.append(contentsOf: chunk) }
        try raw.withBytes { (bytes: UnsafeRawBufferPointer) throws(CkptError) in try deflater.compress(bytes, append) }
        try deflater.finish(append)
        let adler = raw.withUnsafeBytes { bytes in
            UInt32(adler32_z(adler32_z(0, nil, 0), bytes.baseAddress!.assumingMemoryBound(to: Bytef.self), bytes.count))
        }
        appendBigEndian(adler, to: &stream)

        var file = signature
        var header: [UInt8] = []
        appendBigEndian(UInt32(image.width), to: &header)
        appendBigEndian(UInt32(image.height), to: &header)
        header += [8, image.channels == 3 ? 2 : 0, 0, 0, 0]  // depth, colour type, compression, filter, interlace
        appendChunk("IHDR", header, to: &file)
        var start = 0
        repeat {
            let end = min(stream.count, start + chunkSize)
            appendChunk("IDAT", stream[start..<end], to: &file)
            start = end
        } while start < stream.count
        appendChunk("IEND", [], to: &file)
        return file
    }

    /// Writes ``encode(_:)``'s bytes to `path` atomically (a temporary file renamed into place), refusing to
    /// overwrite one of `inputs`.
    public static func write(_ image: DecodedImage, to path: String, inputs: [FileIdentity] = []) throws(CkptError) {
        let bytes: [UInt8]
        do { bytes = try encode(image) } catch { throw error.at(path: path) }
        var file = try OutputFile(path: path, inputs: inputs)
        try file.write(bytes)
        try file.commit()
    }

    private static func appendBigEndian(_ value: UInt32, to bytes: inout [UInt8]) {
        bytes += [UInt8(value >> 24), UInt8((value >> 16) & 0xFF), UInt8((value >> 8) & 0xFF), UInt8(value & 0xFF)]
    }

    /// Length, type, data and the CRC-32 of type + data.
    private static func appendChunk<Data: Collection<UInt8>>(_ type: String, _ data: Data, to file: inout [UInt8]) {
        appendBigEndian(UInt32(data.count), to: &file)
        let typeAndData = Array(type.utf8) + Array(data)
        file += typeAndData
        appendBigEndian(typeAndData.withUnsafeBytes { CRC32.checksum($0) }, to: &file)
    }
}
