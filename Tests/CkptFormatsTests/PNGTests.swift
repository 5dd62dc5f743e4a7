import CCkptZlib
import CkptCore
import CkptFormats
import Testing

/// PNG files written by Pillow (and, where Pillow cannot write them, by the small encoder in
/// fixtures/png/generate.py, checked by Pillow reading them back) decode to the pixels recorded beside them; malformed
/// files built here fail with the rule they break.
@Suite("PNG")
struct PNGTests {
    struct Fixture: CustomTestStringConvertible, Sendable {
        let json: JSONValue
        var file: String { json["file"].flatMap { if case .string(let s) = $0 { s } else { nil } } ?? "?" }
        var expected: String { json["expected"].flatMap { if case .string(let s) = $0 { s } else { nil } } ?? "?" }
        func int(_ key: String) -> Int { json[key]?.unsignedInteger.map(Int.init) ?? -1 }
        var testDescription: String { file }
    }

    static let fixtures: [Fixture] = {
        guard let manifest = try? Support.parseJSON(file: Support.fixture("png/manifest.json")),
            case .array(let files)? = manifest["files"]
        else { return [] }
        return files.map { Fixture(json: $0) }
    }()

    @Test("the fixtures cover every colour type and bit depth, all five filters, Adam7 and split IDAT")
    func coverage() {
        #expect(Self.fixtures.count >= 21)
        let combinations = Set(Self.fixtures.map { [$0.int("color_type"), $0.int("bit_depth")] })
        let all: Set<[Int]> = [[0, 1], [0, 2], [0, 4], [0, 8], [0, 16], [2, 8], [2, 16], [3, 1], [3, 2], [3, 4], [3, 8], [4, 8], [4, 16], [6, 8], [6, 16]]
        #expect(combinations == all)
        var filters = Set<Int>()
        for fixture in Self.fixtures {
            if case .array(let used)? = fixture.json["filters"] { filters.formUnion(used.compactMap { $0.unsignedInteger.map(Int.init) }) }
        }
        #expect(filters == [0, 1, 2, 3, 4])
        #expect(Self.fixtures.contains { $0.json["interlaced"] == .bool(true) })
        #expect(Self.fixtures.contains { $0.int("idat_chunks") > 1 })
    }

    @Test("ckpt decodes each fixture to the pixels Pillow decodes (16-bit: the documented rounding)", arguments: fixtures)
    func fixture(_ fixture: Fixture) throws {
        let path = Support.fixture("png/" + fixture.file)
        let image = try PNG.decode(path: path)
        let width = fixture.int("width"), height = fixture.int("height"), channels = fixture.int("channels")
        #expect(image.width == width && image.height == height && image.channels == channels)
        let expected = try Checkpoint.open(Support.fixture("png/" + fixture.expected)).tensors[0]
        #expect(expected.dtype == .u8)
        #expect(expected.shape.dims == (channels == 1 ? [height, width] : [height, width, 3]))
        let pixels = try expected.load().withUnsafeBytes { Array($0) }
        #expect(image.pixels == pixels)
        // The in-memory entry point gives the same image.
        let bytes = try Support.read(path)
        let again = try bytes.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try PNG.decode(bytes: raw, path: fixture.file) }
        #expect(again == image)
    }

    // MARK: - Hand-built files

    static func be32(_ v: Int) -> [UInt8] { [24, 16, 8, 0].map { UInt8(truncatingIfNeeded: v >> $0) } }

    static func chunk(_ type: String, _ data: [UInt8], crc: UInt32? = nil) -> [UInt8] {
        let body = Array(type.utf8) + data
        return be32(data.count) + body + be32(Int(crc ?? Support.crc32(body)))
    }

    static func ihdr(
        width: Int, height: Int, depth: UInt8 = 8, colour: UInt8 = 0, compression: UInt8 = 0, filter: UInt8 = 0, interlace: UInt8 = 0
    ) -> [UInt8] {
        chunk("IHDR", be32(width) + be32(height) + [depth, colour, compression, filter, interlace])
    }

    /// A zlib stream (header + deflate + Adler-32), as PNG's IDAT carries it.
    static func zlib(_ raw: [UInt8]) -> [UInt8] {
        var size = compressBound(uLong(raw.count))
        var out = [UInt8](repeating: 0, count: Int(size))
        let status = out.withUnsafeMutableBufferPointer { dest in
            raw.withUnsafeBufferPointer { src in compress2(dest.baseAddress, &size, src.baseAddress, uLong(raw.count), 9) }
        }
        precondition(status == Z_OK)
        return Array(out.prefix(Int(size)))
    }

    static func png(_ chunks: [UInt8]..., iend: Bool = true) -> [UInt8] {
        PNG.signature + chunks.flatMap { $0 } + (iend ? chunk("IEND", []) : [])
    }

    /// A 2×2 8-bit grey image, rows filtered with None: pixels 10, 20 / 30, 40.
    static let greyRows: [UInt8] = [0, 10, 20, 0, 30, 40]
    static let grey = png(ihdr(width: 2, height: 2), chunk("IDAT", zlib(greyRows)))

    static func failure(_ bytes: [UInt8], name: String = "bad.png") -> CkptError? {
        do {
            _ = try bytes.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try PNG.decode(bytes: raw, path: name) }
            return nil
        } catch {
            return error
        }
    }

    static func decode(_ bytes: [UInt8]) throws -> DecodedImage {
        try bytes.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try PNG.decode(bytes: raw, path: "test.png") }
    }

    @Test("a minimal hand-built file decodes; ancillary chunks and bytes after IEND are skipped")
    func minimal() throws {
        #expect(try Self.decode(Self.grey) == DecodedImage(width: 2, height: 2, channels: 1, pixels: [10, 20, 30, 40]))
        let decorated = Self.png(
            Self.ihdr(width: 2, height: 2), Self.chunk("gAMA", Self.be32(45455)), Self.chunk("zzZz", [1, 2, 3]),
            Self.chunk("IDAT", Array(Self.zlib(Self.greyRows).prefix(3))), Self.chunk("IDAT", []),
            Self.chunk("IDAT", Array(Self.zlib(Self.greyRows).dropFirst(3))), Self.chunk("tEXt", Array("k\0v".utf8)))
        #expect(try Self.decode(decorated + [0xDE, 0xAD]).pixels == [10, 20, 30, 40])
    }

    @Test("1×1 images of every colour type: channel policy, alpha dropped, 16-bit rounding, sub-byte grey scaling")
    func policy() throws {
        func one(_ depth: UInt8, _ colour: UInt8, _ samples: [UInt8], palette: [UInt8]? = nil) throws -> [UInt8] {
            var chunks = [Self.ihdr(width: 1, height: 1, depth: depth, colour: colour)]
            if let palette { chunks.append(Self.chunk("PLTE", palette)) }
            chunks.append(Self.chunk("IDAT", Self.zlib([0] + samples)))
            return try Self.decode(PNG.signature + chunks.flatMap { $0 } + Self.chunk("IEND", [])).pixels
        }
        #expect(try one(1, 0, [0x80]) == [255])
        #expect(try one(2, 0, [0x80]) == [170])  // 2 × 85
        #expect(try one(4, 0, [0x70]) == [119])  // 7 × 17
        #expect(try one(16, 0, [0x00, 0x80]) == [0])  // 128 / 257 = 0.498
        #expect(try one(16, 0, [0x00, 0x81]) == [1])  // 129 / 257 = 0.502
        #expect(try one(16, 0, [0xFF, 0x7F]) == [255])  // 65407 / 257 = 254.5
        #expect(try one(16, 0, [0x80, 0x80]) == [128])  // 257 × 128 is exact
        #expect(try one(8, 4, [77, 3]) == [77])
        #expect(try one(16, 4, [0x12, 0x34, 0xFF, 0xFF]) == [18])  // 4660 / 257 = 18.13
        #expect(try one(8, 2, [1, 2, 3]) == [1, 2, 3])
        #expect(try one(16, 2, [0xFF, 0xFF, 0, 0, 0x01, 0x01]) == [255, 0, 1])
        #expect(try one(8, 6, [4, 5, 6, 0]) == [4, 5, 6])  // alpha 0: not composited
        #expect(try one(16, 6, [0, 0, 0xFF, 0xFF, 0x7F, 0xFF, 0, 0]) == [0, 255, 127])
        #expect(try one(4, 3, [0x10], palette: [9, 9, 9, 7, 8, 9]) == [7, 8, 9])
        #expect(try one(8, 3, [0], palette: [1, 2, 3]) == [1, 2, 3])
    }

    // MARK: - Malformed files

    struct Case: CustomTestStringConvertible, Sendable {
        let name: String
        let bytes: [UInt8]
        let code: CkptError.Code
        let rule: String
        var testDescription: String { name }
    }

    static let malformed: [Case] = {
        let idat = chunk("IDAT", zlib(greyRows))
        var cases: [Case] = []
        func add(_ name: String, _ bytes: [UInt8], _ code: CkptError.Code, _ rule: String) {
            cases.append(Case(name: name, bytes: bytes, code: code, rule: rule))
        }
        var badSignature = grey
        badSignature[1] = 0x51
        add("bad signature", badSignature, .badMagic, "PNG signature")
        add("empty file", [], .badMagic, "PNG signature")
        var badIDATCRC = grey
        badIDATCRC[8 + 25 + 8 + 2] ^= 0x01  // a data byte of IDAT
        add("corrupted IDAT data (CRC mismatch)", badIDATCRC, .crcMismatch, "chunk 'IDAT' at offset 33: stored CRC-32")
        var badIHDRCRC = grey
        badIHDRCRC[8 + 21] ^= 0xFF  // IHDR's CRC field
        add("corrupted IHDR CRC", badIHDRCRC, .crcMismatch, "chunk 'IHDR' at offset 8: stored CRC-32")
        add("truncated inside IDAT", Array(grey.prefix(grey.count - 15)), .shortData, "chunk 'IDAT' at offset 33 needs")
        add("truncated inside a chunk header", Array(grey.prefix(grey.count - 6)), .shortData, "the file ends inside the chunk")
        add("missing IEND", png(ihdr(width: 2, height: 2), idat, iend: false), .shortData, "without an IEND chunk")
        add("IHDR not first", png(chunk("gAMA", be32(45455)), ihdr(width: 2, height: 2), idat), .invalidHeader, "the first chunk is 'gAMA'; PNG requires IHDR first")
        add("IHDR of 12 bytes", png(chunk("IHDR", be32(2) + be32(2) + [8, 0, 0, 0]), idat), .invalidHeader, "IHDR is 12 bytes; PNG defines it as 13")
        add("zero width", png(ihdr(width: 0, height: 2), idat), .invalidHeader, "both sides must be at least 1")
        add("huge declared width", png(ihdr(width: 0x7FFF_FFFF, height: 1), idat), .tooLarge, "each side must be at most 16384")
        add("over 64 Mi pixels", png(ihdr(width: 16384, height: 4097), idat), .tooLarge, "over the limit of 67108864")
        add("8192² RGBA16 from 18 bytes of IDAT", png(ihdr(width: 8192, height: 8192, depth: 16, colour: 6), idat), .tooLarge, "maximum ratio of 1032:1")
        add("colour type 1", png(ihdr(width: 2, height: 2, colour: 1), idat), .invalidHeader, "colour type 1; PNG defines 0, 2, 3, 4 and 6")
        add("4-bit truecolour", png(ihdr(width: 2, height: 2, depth: 4, colour: 2), idat), .invalidHeader, "bit depth 4 with colour type 2 (truecolour); PNG allows 8, 16")
        add("16-bit palette", png(ihdr(width: 2, height: 2, depth: 16, colour: 3), idat), .invalidHeader, "bit depth 16 with colour type 3")
        add("compression method 1", png(ihdr(width: 2, height: 2, compression: 1), idat), .invalidHeader, "compression method 1; PNG defines only 0")
        add("filter method 1", png(ihdr(width: 2, height: 2, filter: 1), idat), .invalidHeader, "filter method 1; PNG defines only 0")
        add("interlace method 2", png(ihdr(width: 2, height: 2, interlace: 2), idat), .invalidHeader, "interlace method 2")
        add("palette image without PLTE", png(ihdr(width: 2, height: 2, colour: 3), chunk("IDAT", zlib([0, 0, 0, 0, 0, 0]))), .invalidHeader, "has no PLTE chunk")
        add(
            "palette index out of range",
            png(ihdr(width: 2, height: 2, colour: 3), chunk("PLTE", [1, 2, 3, 4, 5, 6]), chunk("IDAT", zlib([0, 0, 1, 0, 1, 2]))),
            .invalidData, "pixel (1, 1) uses palette index 2 but PLTE has 2 entries")
        add("PLTE of 5 bytes", png(ihdr(width: 2, height: 2, colour: 3), chunk("PLTE", [1, 2, 3, 4, 5]), idat), .invalidHeader, "PLTE is 5 bytes")
        add("PLTE in a grey image", png(ihdr(width: 2, height: 2), chunk("PLTE", [1, 2, 3]), idat), .invalidHeader, "PNG forbids a palette there")
        add("PLTE after IDAT", png(ihdr(width: 2, height: 2, colour: 2), idat, chunk("PLTE", [1, 2, 3])), .invalidHeader, "comes after IDAT")
        add(
            "IDAT chunks not consecutive",
            png(ihdr(width: 2, height: 2), chunk("IDAT", Array(zlib(greyRows).prefix(4))), chunk("tEXt", [0x61, 0, 0x62]), chunk("IDAT", Array(zlib(greyRows).dropFirst(4)))),
            .invalidHeader, "IDAT chunks must be consecutive")
        add("no IDAT", png(ihdr(width: 2, height: 2)), .invalidHeader, "before any IDAT chunk")
        add("unknown critical chunk", png(ihdr(width: 2, height: 2), chunk("CkPt", [1]), idat), .invalidHeader, "unknown critical chunk 'CkPt'")
        add("chunk type not letters", png(ihdr(width: 2, height: 2), chunk("ab1d", []), idat), .invalidHeader, "chunk type 'ab1d' at offset 33 is not four ASCII letters")
        add("a second IHDR", png(ihdr(width: 2, height: 2), ihdr(width: 2, height: 2), idat), .invalidHeader, "a second IHDR")
        add("non-empty IEND", png(ihdr(width: 2, height: 2), idat, chunk("IEND", [0]), iend: false), .invalidHeader, "it must be empty")
        add("bad filter byte", png(ihdr(width: 2, height: 2), chunk("IDAT", zlib([0, 10, 20, 5, 30, 40]))), .invalidData, "row 1 has filter type 5; PNG defines 0 to 4")
        add(
            "bad filter byte in an Adam7 pass",
            png(ihdr(width: 2, height: 2, interlace: 1), chunk("IDAT", zlib([0, 1, 0, 2, 9, 3, 4]))),
            .invalidData, "row 0 of Adam7 pass 7 has filter type 9")
        add("IDAT inflates short", png(ihdr(width: 2, height: 2), chunk("IDAT", zlib(Array(greyRows.dropLast())))), .shortData, "IDAT data inflates to fewer than the 6 bytes that IHDR implies")
        add("IDAT inflates long", png(ihdr(width: 2, height: 2), chunk("IDAT", zlib(greyRows + [7]))), .inflateOverrun, "IDAT data inflates past the 6 bytes")
        add("IDAT stream cut short", png(ihdr(width: 2, height: 2), chunk("IDAT", Array(zlib(greyRows).dropLast(5)))), .shortData, "fewer than the 6 bytes")
        var badAdler = zlib(greyRows)
        badAdler[badAdler.count - 1] ^= 0x01
        add("Adler-32 mismatch", png(ihdr(width: 2, height: 2), chunk("IDAT", badAdler)), .invalidData, "corrupt zlib data")
        add("raw deflate without zlib header", png(ihdr(width: 2, height: 2), chunk("IDAT", Array(zlib(greyRows).dropFirst(2)))), .invalidData, "corrupt zlib data")
        return cases
    }()

    @Test("malformed files fail with the rule they break, naming the file", arguments: malformed)
    func malformedFile(_ input: Case) throws {
        let error = try #require(Self.failure(input.bytes, name: "bad.png"), "\(input.name) decoded")
        #expect(error.code == input.code, "\(error)")
        #expect(error.path == "bad.png")
        #expect(error.description.hasPrefix("bad.png: "))
        #expect(error.message.contains(input.rule), "\(error)")
    }

    @Test("every truncation of a real file fails cleanly")
    func everyTruncation() throws {
        let bytes = try Support.read(Support.fixture("png/hand_adam7_rgb8.png"))
        for length in 0..<bytes.count {
            let error = Self.failure(Array(bytes.prefix(length)))
            #expect(error?.code == (length < 8 ? .badMagic : .shortData), "length \(length): \(String(describing: error))")
        }
    }

    @Test("every single-bit flip of a real file is caught or harmless")
    func bitFlips() throws {
        let bytes = try Support.read(Support.fixture("png/palette4.png"))
        let reference = try Self.decode(bytes)
        for index in 0..<bytes.count {
            var copy = bytes
            copy[index] ^= 0x10
            if let error = Self.failure(copy) {
                #expect([.badMagic, .crcMismatch, .shortData, .invalidHeader, .tooLarge].contains(error.code), "byte \(index): \(error)")
            } else {
                #expect(try Self.decode(copy) == reference, "byte \(index) changed the pixels without an error")
            }
        }
    }

    @Test("a missing file is reported with its path")
    func missingFile() {
        do {
            _ = try PNG.decode(path: "/nonexistent/ckpt.png")
            Issue.record("decoded a missing file")
        } catch {
            #expect(error.code == .notFound && error.path == "/nonexistent/ckpt.png", "\(error)")
        }
    }
}
