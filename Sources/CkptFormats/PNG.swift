import CkptCore

/// An 8-bit image, row-major HWC: `pixels[(y * width + x) * channels + c]`.
public struct DecodedImage: Sendable, Equatable {
    public let width: Int
    public let height: Int
    /// 1 (grey) or 3 (RGB).
    public let channels: Int
    /// `height × width × channels` bytes.
    public var pixels: [UInt8]

    public init(width: Int, height: Int, channels: Int, pixels: [UInt8]) {
        precondition(width >= 0 && height >= 0 && (channels == 1 || channels == 3), "bad image geometry")
        precondition(pixels.count == width * height * channels, "pixel count does not match the geometry")
        self.width = width
        self.height = height
        self.channels = channels
        self.pixels = pixels
    }
}

/// PNG images (W3C PNG 3rd edition / RFC 2083): every standard colour type and bit depth, the five filter types,
/// Adam7 interlacing, IDAT split over any number of chunks. The result is always 8-bit: grey and grey+alpha give
/// 1 channel; truecolour, truecolour+alpha and palette images give 3 (RGB). Alpha is dropped, not composited
/// onto a background; `tRNS` is ignored. 16-bit samples are rounded to 8 bits (`(v·255 + 32767) / 65535`, which is
/// `round(v / 257)`); 1/2/4-bit grey is scaled to 0…255 (`v · 255 / (2^depth − 1)`). See formats/png.md.
public enum PNG {
    public static let signature: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]
    /// The largest width or height accepted.
    public static let maximumDimension = 16_384
    /// The largest width × height accepted (64 Mi pixels).
    public static let maximumPixels = 64 << 20
    /// Deflate's maximum compression ratio (https://www.zlib.net/zlib_tech.html), as for npz members.
    static let maximumInflateRatio = 1032

    /// The IHDR fields, validated.
    public struct Header: Sendable, Equatable {
        public let width: Int
        public let height: Int
        public let bitDepth: Int
        /// 0 grey, 2 truecolour, 3 palette, 4 grey + alpha, 6 truecolour + alpha.
        public let colorType: Int
        public let interlaced: Bool

        var samplesPerPixel: Int {
            switch colorType {
            case 2: 3
            case 4: 2
            case 6: 4
            default: 1
            }
        }
        var bitsPerPixel: Int { samplesPerPixel * bitDepth }
        /// The filter's byte distance to the corresponding byte of the pixel on the left (at least 1).
        var filterStride: Int { max(1, bitsPerPixel / 8) }
        func rowBytes(width: Int) -> Int { (width * bitsPerPixel + 7) / 8 }
        /// The channels of the decoded image.
        public var outputChannels: Int { colorType == 0 || colorType == 4 ? 1 : 3 }

        var colorName: String { PNG.colorName(colorType) }
        var summary: String { "\(width)×\(height), \(bitDepth)-bit \(colorName)\(interlaced ? ", Adam7" : "")" }
    }

    /// Decodes the PNG file at `path`, which is memory-mapped for the duration of the call. The caller's limits
    /// (at most ``maximumDimension`` and ``maximumPixels``) are checked from IHDR before anything is inflated.
    public static func decode(
        path: String, maximumSide: Int = maximumDimension, maximumPixels: Int = maximumPixels
    ) throws(CkptError) -> DecodedImage {
        let storage: ByteStorage
        do { storage = try ByteStorage(mapping: path) } catch { throw error.at(path: path) }
        return try storage.withUnsafeBytes { (bytes: UnsafeRawBufferPointer) throws(CkptError) in
            try decode(bytes: bytes, path: path, maximumSide: maximumSide, maximumPixels: maximumPixels)
        }
    }

    /// Decodes a PNG held in memory; `path` names it in errors.
    public static func decode(
        bytes: UnsafeRawBufferPointer, path: String, maximumSide: Int = maximumDimension, maximumPixels: Int = maximumPixels
    ) throws(CkptError) -> DecodedImage {
        do throws(CkptError) {
            let layout = try readChunks(bytes)
            let header = layout.header
            guard header.width <= maximumSide, header.height <= maximumSide else {
                throw CkptError(.tooLarge, "image is \(header.width)×\(header.height); at most \(maximumSide) per side")
            }
            guard header.width * header.height <= maximumPixels else {
                throw CkptError(.tooLarge, "image is \(header.width)×\(header.height) = \(header.width * header.height) pixels; at most \(maximumPixels)")
            }
            return try decodePixels(bytes, layout)
        } catch {
            throw error.at(path: path)
        }
    }

    /// Reads and validates only the chunk sequence and IHDR (no inflation).
    public static func header(bytes: UnsafeRawBufferPointer, path: String) throws(CkptError) -> Header {
        do { return try readChunks(bytes).header } catch { throw error.at(path: path) }
    }

    // MARK: - Chunks

    struct Layout {
        let header: Header
        /// PLTE entries as RGB triples (empty unless the file has a PLTE chunk).
        let palette: [UInt8]
        /// The data ranges of the IDAT chunks, in file order.
        let idat: [Range<Int>]
    }

    static func be32(_ bytes: UnsafeRawBufferPointer, _ offset: Int) -> UInt32 {
        UInt32(bytes[offset]) << 24 | UInt32(bytes[offset + 1]) << 16 | UInt32(bytes[offset + 2]) << 8 | UInt32(bytes[offset + 3])
    }

    /// A chunk type as text: its four characters, with anything outside printable ASCII as `\xNN`.
    static func typeName(_ bytes: UnsafeRawBufferPointer, _ offset: Int) -> String {
        var name = ""
        for byte in bytes[offset..<offset + 4] {
            if byte >= 0x20 && byte < 0x7F {
                name.unicodeScalars.append(Unicode.Scalar(byte))
            } else {
                name += "\\x" + hex(UInt32(byte), digits: 2)
            }
        }
        return name
    }

    static func hex(_ value: UInt32, digits: Int) -> String {
        let text = String(value, radix: 16, uppercase: true)
        return String(repeating: "0", count: max(0, digits - text.count)) + text
    }

    static func colorName(_ type: Int) -> String {
        switch type {
        case 0: "grey"
        case 2: "truecolour"
        case 3: "palette"
        case 4: "grey + alpha"
        case 6: "truecolour + alpha"
        default: "colour type \(type)"
        }
    }

    /// Walks the chunks from the signature to IEND, checking every CRC and the critical-chunk rules.
    static func readChunks(_ bytes: UnsafeRawBufferPointer) throws(CkptError) -> Layout {
        guard bytes.count >= 8, zip(bytes.prefix(8), signature).allSatisfy({ $0 == $1 }) else {
            throw CkptError(.badMagic, "does not start with the PNG signature 89 50 4E 47 0D 0A 1A 0A")
        }
        var offset = 8
        var header: Header?
        var palette: [UInt8]?
        var idat: [Range<Int>] = []
        var idatClosed = false  // a chunk other than IDAT followed the first IDAT
        while true {
            guard offset < bytes.count else {
                throw CkptError(.shortData, "the file ends after \(bytes.count) bytes without an IEND chunk")
            }
            guard bytes.count - offset >= 12 else {
                throw CkptError(.shortData, "the file ends inside the chunk at offset \(offset): \(bytes.count - offset) bytes left, a chunk takes at least 12")
            }
            let length = Int(be32(bytes, offset))
            let name = typeName(bytes, offset + 4)
            guard length <= 0x7FFF_FFFF else {
                throw CkptError(.invalidHeader, "chunk '\(name)' at offset \(offset) declares \(length) bytes; PNG limits a chunk to 2^31 − 1")
            }
            guard bytes[offset + 4..<offset + 8].allSatisfy({ ($0 | 0x20) >= 0x61 && ($0 | 0x20) <= 0x7A }) else {
                throw CkptError(.invalidHeader, "chunk type '\(name)' at offset \(offset) is not four ASCII letters")
            }
            let dataStart = offset + 8
            guard bytes.count - dataStart - 4 >= length else {
                throw CkptError(
                    .shortData,
                    "chunk '\(name)' at offset \(offset) needs \(length + 12) bytes but the file ends \(bytes.count - offset) bytes after its start")
            }
            let data = dataStart..<dataStart + length
            let stored = be32(bytes, data.upperBound)
            let computed = CRC32.checksum(UnsafeRawBufferPointer(rebasing: bytes[offset + 4..<data.upperBound]))
            guard stored == computed else {
                throw CkptError(
                    .crcMismatch,
                    "chunk '\(name)' at offset \(offset): stored CRC-32 is 0x\(hex(stored, digits: 8)) but its type and data give 0x\(hex(computed, digits: 8))")
            }
            let critical = bytes[offset + 4] & 0x20 == 0
            if !idat.isEmpty && name != "IDAT" { idatClosed = true }

            guard let ihdr = header else {
                guard name == "IHDR" else {
                    throw CkptError(.invalidHeader, "the first chunk is '\(name)'; PNG requires IHDR first")
                }
                header = try parseHeader(UnsafeRawBufferPointer(rebasing: bytes[data]))
                offset = data.upperBound + 4
                continue
            }
            switch name {
            case "IHDR":
                throw CkptError(.invalidHeader, "a second IHDR chunk at offset \(offset)")
            case "PLTE":
                guard palette == nil else { throw CkptError(.invalidHeader, "a second PLTE chunk at offset \(offset)") }
                guard idat.isEmpty else { throw CkptError(.invalidHeader, "PLTE at offset \(offset) comes after IDAT; it must precede it") }
                guard ihdr.colorType != 0 && ihdr.colorType != 4 else {
                    throw CkptError(.invalidHeader, "PLTE at offset \(offset) in a \(ihdr.colorName) image; PNG forbids a palette there")
                }
                guard length > 0, length <= 768, length % 3 == 0 else {
                    throw CkptError(.invalidHeader, "PLTE is \(length) bytes; it must hold 1 to 256 RGB entries (a multiple of 3 bytes)")
                }
                palette = Array(UnsafeRawBufferPointer(rebasing: bytes[data]))
            case "IDAT":
                guard !idatClosed else {
                    throw CkptError(.invalidHeader, "IDAT at offset \(offset) after another chunk ended the IDAT sequence; IDAT chunks must be consecutive")
                }
                if idat.isEmpty && ihdr.colorType == 3 && palette == nil {
                    throw CkptError(.invalidHeader, "palette image (colour type 3) has no PLTE chunk before its first IDAT")
                }
                idat.append(data)
            case "IEND":
                guard !idat.isEmpty else { throw CkptError(.invalidHeader, "IEND at offset \(offset) before any IDAT chunk: no image data") }
                guard length == 0 else { throw CkptError(.invalidHeader, "IEND at offset \(offset) holds \(length) data bytes; it must be empty") }
                // Anything after IEND is ignored, as libpng and Pillow do.
                return Layout(header: ihdr, palette: palette ?? [], idat: idat)
            default:
                // Ancillary chunks (lowercase first letter: tRNS, gAMA, tEXt, …) are skipped once their CRC checks out.
                guard !critical else {
                    throw CkptError(.invalidHeader, "unknown critical chunk '\(name)' at offset \(offset); the image cannot be decoded without it")
                }
            }
            offset = data.upperBound + 4
        }
    }

    /// The bit depths PNG allows for each colour type.
    static func allowedDepths(_ colorType: Int) -> [Int]? {
        switch colorType {
        case 0: [1, 2, 4, 8, 16]
        case 2, 4, 6: [8, 16]
        case 3: [1, 2, 4, 8]
        default: nil
        }
    }

    /// Validates IHDR, including the size bounds, before anything is allocated for pixels.
    static func parseHeader(_ data: UnsafeRawBufferPointer) throws(CkptError) -> Header {
        guard data.count == 13 else {
            throw CkptError(.invalidHeader, "IHDR is \(data.count) bytes; PNG defines it as 13")
        }
        let width = Int(be32(data, 0)), height = Int(be32(data, 4))
        guard width > 0, height > 0 else {
            throw CkptError(.invalidHeader, "IHDR declares \(width) × \(height) pixels; both sides must be at least 1")
        }
        guard width <= maximumDimension, height <= maximumDimension else {
            throw CkptError(.tooLarge, "IHDR declares \(width) × \(height) pixels; each side must be at most \(maximumDimension)")
        }
        guard width * height <= maximumPixels else {
            throw CkptError(.tooLarge, "IHDR declares \(width) × \(height) = \(width * height) pixels, over the limit of \(maximumPixels) (64 Mi)")
        }
        let depth = Int(data[8]), colorType = Int(data[9])
        guard let depths = allowedDepths(colorType) else {
            throw CkptError(.invalidHeader, "IHDR colour type \(colorType); PNG defines 0, 2, 3, 4 and 6")
        }
        guard depths.contains(depth) else {
            throw CkptError(
                .invalidHeader,
                "IHDR bit depth \(depth) with colour type \(colorType) (\(colorName(colorType))); PNG allows \(depths.map(String.init).joined(separator: ", "))")
        }
        guard data[10] == 0 else {
            throw CkptError(.invalidHeader, "IHDR compression method \(data[10]); PNG defines only 0 (zlib deflate)")
        }
        guard data[11] == 0 else {
            throw CkptError(.invalidHeader, "IHDR filter method \(data[11]); PNG defines only 0 (adaptive, five filter types)")
        }
        guard data[12] <= 1 else {
            throw CkptError(.invalidHeader, "IHDR interlace method \(data[12]); PNG defines 0 (none) and 1 (Adam7)")
        }
        return Header(width: width, height: height, bitDepth: depth, colorType: colorType, interlaced: data[12] == 1)
    }

    // MARK: - Pixels

    /// One reduced image: where its pixels land in the full image.
    struct Pass {
        let x0, y0, dx, dy: Int
        let width, height: Int
    }

    static func passes(_ header: Header) -> [Pass] {
        let grid: [(Int, Int, Int, Int)] = header.interlaced
            ? [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
            : [(0, 0, 1, 1)]
        return grid.map { x0, y0, dx, dy in
            Pass(
                x0: x0, y0: y0, dx: dx, dy: dy,
                width: header.width > x0 ? (header.width - x0 + dx - 1) / dx : 0,
                height: header.height > y0 ? (header.height - y0 + dy - 1) / dy : 0)
        }
    }

    /// Bytes of filtered data the image needs: each non-empty pass row is a filter byte plus its packed samples.
    static func filteredSize(_ header: Header, _ passes: [Pass]) -> Int {
        passes.reduce(0) { total, pass in
            pass.width == 0 || pass.height == 0 ? total : total + pass.height * (1 + header.rowBytes(width: pass.width))
        }
    }

    static func decodePixels(_ bytes: UnsafeRawBufferPointer, _ layout: Layout) throws(CkptError) -> DecodedImage {
        let header = layout.header
        let passes = passes(header)
        let rawSize = filteredSize(header, passes)
        let compressedSize = layout.idat.reduce(0) { $0 + $1.count }
        guard rawSize <= compressedSize * maximumInflateRatio + 64 else {
            throw CkptError(
                .tooLarge,
                "IDAT holds \(compressedSize) bytes but the image (\(header.summary)) needs \(rawSize) bytes, more than deflate's maximum ratio of \(maximumInflateRatio):1 can produce")
        }
        var compressed: [UInt8] = []
        compressed.reserveCapacity(compressedSize)
        for range in layout.idat { compressed.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[range])) }

        var raw = [UInt8](repeating: 0, count: rawSize)
        var failure: CkptError?
        compressed.withUnsafeBytes { input in
            raw.withUnsafeMutableBytes { output in
                do throws(CkptError) {
                    _ = try RawInflate.inflate(input, into: output, zlibWrapped: true)
                } catch {
                    failure = error
                }
            }
        }
        if let failure {
            let needs = "the \(rawSize) bytes that IHDR implies (\(header.summary), filter bytes included)"
            switch failure.code {
            case .inflateOverrun: throw CkptError(.inflateOverrun, "IDAT data inflates past \(needs)")
            case .zipFormat where failure.cause != nil: throw CkptError(.invalidData, "IDAT holds corrupt zlib data", cause: failure.cause)
            case .zipFormat: throw CkptError(.shortData, "IDAT data inflates to fewer than \(needs), or its zlib stream is cut short", cause: failure.message)
            default: throw failure
            }
        }

        let channels = header.outputChannels
        var pixels = [UInt8](repeating: 0, count: header.width * header.height * channels)
        raw.withUnsafeMutableBufferPointer { raw in
            pixels.withUnsafeMutableBufferPointer { out in
                var offset = 0
                for (index, pass) in passes.enumerated() where pass.width > 0 && pass.height > 0 {
                    let rowBytes = header.rowBytes(width: pass.width)
                    for y in 0..<pass.height {
                        let row = raw.baseAddress! + offset + 1
                        let prior: UnsafePointer<UInt8>? = y == 0 ? nil : UnsafePointer(row - (rowBytes + 1))
                        let filter = raw[offset]
                        guard unfilter(filter, row: row, prior: prior, count: rowBytes, stride: header.filterStride) else {
                            let place = header.interlaced ? "row \(y) of Adam7 pass \(index + 1)" : "row \(y)"
                            failure = CkptError(.invalidData, "\(place) has filter type \(filter); PNG defines 0 to 4")
                            return
                        }
                        if let error = emit(UnsafePointer(row), y: y, pass: pass, header: header, palette: layout.palette, into: out) {
                            failure = error
                            return
                        }
                        offset += rowBytes + 1
                    }
                }
            }
        }
        if let failure { throw failure }
        return DecodedImage(width: header.width, height: header.height, channels: channels, pixels: pixels)
    }

    /// Reverses one row's filter in place. `prior` is the previous row of the same pass, already unfiltered (nil
    /// for a pass's first row, which filters against zeros). Returns false for an unknown filter type.
    static func unfilter(_ type: UInt8, row: UnsafeMutablePointer<UInt8>, prior: UnsafePointer<UInt8>?, count: Int, stride: Int) -> Bool {
        switch type {
        case 0:
            break
        case 1:  // Sub
            if count > stride { for i in stride..<count { row[i] &+= row[i - stride] } }
        case 2:  // Up
            if let prior { for i in 0..<count { row[i] &+= prior[i] } }
        case 3:  // Average
            for i in 0..<count {
                let left = i >= stride ? Int(row[i - stride]) : 0
                let up = prior.map { Int($0[i]) } ?? 0
                row[i] &+= UInt8(truncatingIfNeeded: (left + up) >> 1)
            }
        case 4:  // Paeth
            for i in 0..<count {
                let a = i >= stride ? Int(row[i - stride]) : 0
                let b = prior.map { Int($0[i]) } ?? 0
                let c = i >= stride ? (prior.map { Int($0[i - stride]) } ?? 0) : 0
                let p = a + b - c
                let pa = abs(p - a), pb = abs(p - b), pc = abs(p - c)
                let predictor = pa <= pb && pa <= pc ? a : (pb <= pc ? b : c)
                row[i] &+= UInt8(truncatingIfNeeded: predictor)
            }
        default:
            return false
        }
        return true
    }

    /// 16 → 8 bits, rounded to nearest: round(v · 255 / 65535) = round(v / 257). No ties exist.
    @inline(__always)
    static func reduce16(_ high: UInt8, _ low: UInt8) -> UInt8 {
        let v = UInt32(high) << 8 | UInt32(low)
        return UInt8((v * 255 + 32767) / 65535)
    }

    /// Writes one unfiltered pass row into the output image; returns an error for a palette index out of range.
    static func emit(
        _ row: UnsafePointer<UInt8>, y: Int, pass: Pass, header: Header, palette: [UInt8], into out: UnsafeMutableBufferPointer<UInt8>
    ) -> CkptError? {
        let depth = header.bitDepth
        let channels = header.outputChannels
        let outY = pass.y0 + y * pass.dy
        let outRow = out.baseAddress! + outY * header.width * channels
        let samples = header.samplesPerPixel
        if header.colorType == 3 {
            let entries = palette.count / 3
            return palette.withUnsafeBufferPointer { table -> CkptError? in
                for x in 0..<pass.width {
                    let index = Int(depth == 8 ? row[x] : packedSample(row, x, depth))
                    let outX = pass.x0 + x * pass.dx
                    guard index < entries else {
                        return CkptError(.invalidData, "pixel (\(outX), \(outY)) uses palette index \(index) but PLTE has \(entries) entries")
                    }
                    let o = outRow + outX * 3
                    o[0] = table[index * 3]
                    o[1] = table[index * 3 + 1]
                    o[2] = table[index * 3 + 2]
                }
                return nil
            }
        }
        switch depth {
        case 1, 2, 4:  // grey only
            let scale = 255 / ((1 << depth) - 1)  // 255, 85, 17: exact
            for x in 0..<pass.width {
                outRow[pass.x0 + x * pass.dx] = UInt8(Int(packedSample(row, x, depth)) * scale)
            }
        case 8:
            for x in 0..<pass.width {
                let o = outRow + (pass.x0 + x * pass.dx) * channels
                for c in 0..<channels { o[c] = row[x * samples + c] }  // alpha, the last sample, is dropped
            }
        default:  // 16
            for x in 0..<pass.width {
                let o = outRow + (pass.x0 + x * pass.dx) * channels
                for c in 0..<channels {
                    let s = 2 * (x * samples + c)
                    o[c] = reduce16(row[s], row[s + 1])
                }
            }
        }
        return nil
    }

    /// The `x`th sample of a row packed at 1, 2 or 4 bits, most significant bits first.
    @inline(__always)
    static func packedSample(_ row: UnsafePointer<UInt8>, _ x: Int, _ depth: Int) -> UInt8 {
        let bit = x * depth
        let shift = 8 - depth - (bit & 7)
        return (row[bit >> 3] >> UInt8(shift)) & UInt8((1 << depth) - 1)
    }
}
