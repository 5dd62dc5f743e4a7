import CkptCore
import CkptFormats
import CkptSynthesis
import Testing

@Suite("ContactSheet: tiling, denormalisation, downscale")
struct ContactSheetTests {
    static let mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225]

    /// Normalised images whose pixel (n, c, y, x) denormalises to the byte value `code(n, c, y, x)`.
    static func code(_ n: Int, _ c: Int, _ y: Int, _ x: Int) -> Int { (n * 37 + c * 11 + y * 5 + x * 3) % 256 }

    static func images(count: Int, height: Int, width: Int) -> [Float] {
        var out: [Float] = []
        for n in 0..<count { for c in 0..<3 { for y in 0..<height { for x in 0..<width {
            out.append(Float((Double(code(n, c, y, x)) / 255 - mean[c]) / std[c]))
        } } } }
        return out
    }

    @Test("tiles sit in a ⌈√N⌉-column grid with 2-pixel borders, each pixel denormalised and rounded back to its byte")
    func layout() throws {
        let (n, h, w) = (5, 4, 6)
        let sheet = try Self.images(count: n, height: h, width: w).withUnsafeBufferPointer {
            try ContactSheet.render(images: $0, count: n, height: h, width: w, mean: Self.mean, std: Self.std)
        }
        #expect(sheet.channels == 3)
        #expect(sheet.width == 3 * w + 4 * 2 && sheet.height == 2 * h + 3 * 2)
        var inTile = [Bool](repeating: false, count: sheet.width * sheet.height)
        for i in 0..<n {
            let oy = 2 + (i / 3) * (h + 2), ox = 2 + (i % 3) * (w + 2)
            for y in 0..<h { for x in 0..<w {
                inTile[(oy + y) * sheet.width + ox + x] = true
                for c in 0..<3 { #expect(Int(sheet.pixels[((oy + y) * sheet.width + ox + x) * 3 + c]) == Self.code(i, c, y, x)) }
            } }
        }
        // Borders and the unused sixth cell are black.
        for p in 0..<(sheet.width * sheet.height) where !inTile[p] { #expect(sheet.pixels[(p * 3)..<(p * 3 + 3)].allSatisfy { $0 == 0 }) }
    }

    @Test("values outside [0, 1] clamp to 0 and 255; ties round up; downscale averages blocks")
    func clampRoundDownscale() throws {
        // One grey image 4 × 4 with mean 0, std 1: values are pixel intensities directly.
        var image = [Float](repeating: 0.5, count: 16)
        image[0] = -3; image[1] = 7; image[2] = Float(0.5 / 255); image[3] = 1
        let full = try image.withUnsafeBufferPointer { try ContactSheet.render(images: $0, count: 1, height: 4, width: 4, mean: [0], std: [1]) }
        #expect(full.channels == 1 && full.width == 8 && full.height == 8)
        #expect(Array(full.pixels[(2 * 8 + 2)..<(2 * 8 + 6)]) == [0, 255, 1, 255])
        #expect(full.pixels[3 * 8 + 2] == 128)  // 127.5 rounds up
        let half = try image.withUnsafeBufferPointer {
            try ContactSheet.render(images: $0, count: 1, height: 4, width: 4, mean: [0], std: [1], downscale: 2)
        }
        #expect(half.width == 6 && half.height == 6)
        // Block (0,0): clamp(−3)=0, clamp(7)=1, 0.5, 0.5 → 0.5 → 128; block (0,1): 0.5/255, 1, 0.5, 0.5 → 0.50049 → 128.
        #expect(half.pixels[2 * 6 + 2] == 128 && half.pixels[2 * 6 + 3] == 128)
        #expect(half.pixels[3 * 6 + 3] == 128)
    }

    @Test("bad geometry or normalisation is refused")
    func refusals() {
        let image = [Float](repeating: 0, count: 12)
        image.withUnsafeBufferPointer { buffer in
            #expect(throws: CkptError.self) { try ContactSheet.render(images: buffer, count: 2, height: 2, width: 2, mean: [0, 0, 0], std: [1, 1, 1]) }
            #expect(throws: CkptError.self) { try ContactSheet.render(images: buffer, count: 1, height: 2, width: 2, mean: [0, 0, 0], std: [1, 0, 1]) }
            #expect(throws: CkptError.self) { try ContactSheet.render(images: buffer, count: 1, height: 2, width: 2, mean: [0, 0, 0], std: [1, 1, 1], downscale: 3) }
            #expect(throws: CkptError.self) { try ContactSheet.render(images: buffer, count: 1, height: 2, width: 2, mean: [0, 0], std: [1, 1]) }
        }
    }
}
