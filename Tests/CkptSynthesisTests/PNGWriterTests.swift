import CkptCore
@testable import CkptFormats
import CkptSynthesis
import Foundation
import Testing

@Suite("PNG writer")
struct PNGWriterTests {
    static func temporaryDirectory() -> String {
        var template = Array("/tmp/ckpt-synthesis-test-XXXXXX".utf8CString)
        return template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
    }

    static func noise(width: Int, height: Int, channels: Int, seed: UInt64) -> DecodedImage {
        var random = SynthesisRandom(seed: seed, image: 0, purpose: .initialNoise)
        // Half noise, half smooth gradient: both compressible and incompressible runs.
        let pixels = (0..<(width * height * channels)).map { i in i % 7 < 3 ? UInt8(truncatingIfNeeded: random.next()) : UInt8((i / channels) % width % 256) }
        return DecodedImage(width: width, height: height, channels: channels, pixels: pixels)
    }

    static let images: [DecodedImage] = [
        noise(width: 37, height: 23, channels: 3, seed: 1),
        noise(width: 1, height: 1, channels: 3, seed: 2),
        noise(width: 64, height: 5, channels: 1, seed: 3),
        noise(width: 300, height: 200, channels: 3, seed: 4),
    ]

    @Test("written PNGs decode (PNG.decode) to the same pixels", arguments: images)
    func roundTrip(image: DecodedImage) throws {
        let path = Self.temporaryDirectory() + "/out.png"
        try PNG.write(image, to: path)
        #expect(try PNG.decode(path: path) == image)
        let header = try PNG.decode(path: path)
        #expect(header.channels == image.channels)
    }

    @Test("image data split over many IDAT chunks decodes the same; the stream is zlib-wrapped with CRCs")
    func chunks() throws {
        let image = Self.noise(width: 50, height: 40, channels: 3, seed: 5)
        let bytes = try PNG.encode(image, chunkSize: 100)
        var types: [String] = []
        var offset = 8
        while offset < bytes.count {
            let length = bytes[offset..<(offset + 4)].reduce(0) { $0 << 8 | Int($1) }
            types.append(String(decoding: bytes[(offset + 4)..<(offset + 8)], as: UTF8.self))
            let crc = bytes[(offset + 8 + length)..<(offset + 12 + length)].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            #expect(Array(bytes[(offset + 4)..<(offset + 8 + length)]).withUnsafeBytes { CRC32.checksum($0) } == crc)
            if types.count == 2 { #expect(bytes[offset + 8] == 0x78 && bytes[offset + 9] == 0x9C) }
            offset += 12 + length
        }
        #expect(types.first == "IHDR" && types.last == "IEND" && types.filter { $0 == "IDAT" }.count > 10)
        let decoded = try bytes.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try PNG.decode(bytes: raw, path: "chunks.png") }
        #expect(decoded == image)
    }

    @Test("a contact sheet written as PNG reads back the same; empty images are refused")
    func contactSheet() throws {
        let values = Reference.values(4 * 3 * 9 * 7, seed: 81, scale: 2.5).map(Float.init)
        let sheet = try values.withUnsafeBufferPointer {
            try ContactSheet.render(images: $0, count: 4, height: 9, width: 7, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5], columns: 4)
        }
        let path = Self.temporaryDirectory() + "/sheet.png"
        try PNG.write(sheet, to: path)
        #expect(try PNG.decode(path: path) == sheet)
        #expect(throws: CkptError.self) { try PNG.encode(DecodedImage(width: 0, height: 3, channels: 1, pixels: [])) }
        #expect(throws: CkptError.self) { try PNG.write(sheet, to: FilePaths.directory(of: path)) }
    }

    static let python = Reference.root + "/.venv/bin/python"

    @Test("Pillow opens the written PNGs and reads the same mode, size and pixels",
          .enabled(if: FileManager.default.isExecutableFile(atPath: python), "needs the project venv with Pillow"))
    func pillow() throws {
        for image in [Self.images[0], Self.images[2]] {
            let path = Self.temporaryDirectory() + "/pillow.png"
            try PNG.write(image, to: path)
            let process = Process()
            process.executableURL = URL(fileURLWithPath: Self.python)
            let script = "import sys; from PIL import Image; im = Image.open(sys.argv[1]); im.load(); "
                + "sys.stdout.write(im.mode + ' ' + str(im.size[0]) + ' ' + str(im.size[1]) + ' ' + im.tobytes().hex())"
            process.arguments = ["-c", script, path]
            let out = Pipe()
            process.standardOutput = out
            try process.run()
            let data = out.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            #expect(process.terminationStatus == 0)
            let fields = String(decoding: data, as: UTF8.self).split(separator: " ")
            try #require(fields.count == 4)
            #expect(fields[0] == (image.channels == 3 ? "RGB" : "L"))
            #expect(fields[1] == "\(image.width)" && fields[2] == "\(image.height)")
            #expect(fields[3] == image.pixels.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined())
        }
    }
}
