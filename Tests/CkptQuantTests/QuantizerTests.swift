import CkptCore
import CkptFormats
@testable import CkptQuant
import Testing

/// Checks the quantizers against what the real libraries computed for the same weights
/// (`fixtures/quant/reference.npz`, made by `fixtures/quant/generate.py` with mlx 0.32.4 and compressed-tensors 0.20.0).
@Suite("Quantizers vs mlx / compressed-tensors")
struct QuantizerTests {
    static let root: String = {
        var path = #filePath
        for _ in 0..<3 { path = FilePaths.directory(of: path) }
        return path
    }()

    static let reference: [String: TensorEntry] = {
        let checkpoint = try! Checkpoint.open(root + "/fixtures/quant/reference.npz")
        return Dictionary(uniqueKeysWithValues: checkpoint.tensors.map { ($0.name, $0) })
    }()

    static func floats(_ name: String) throws -> [Float] {
        let entry = try #require(reference[name], "missing \(name)")
        var values = [Float](repeating: 0, count: entry.shape.elements)
        try values.withUnsafeMutableBufferPointer { try entry.decodeFloats(into: $0.baseAddress!) }
        return values
    }

    static func words(_ name: String) throws -> [UInt32] {
        let entry = try #require(reference[name], "missing \(name)")
        let bytes = try entry.load()
        return bytes.withUnsafeBytes { raw in (0..<entry.shape.elements).map { raw.loadUnaligned(fromByteOffset: $0 * 4, as: UInt32.self) } }
    }

    static let weights = try! floats("weights")
    static let rows = 8, cols = 128

    static func quantize(_ settings: QuantizationSettings) -> QuantizedMatrix {
        weights.withUnsafeBufferPointer { QuantizedMatrix.quantize($0.baseAddress!, rows: rows, cols: cols, settings: settings) }
    }

    @Test("RTN on the MLX grid equals mlx.core.quantize", arguments: [2, 3, 4, 5, 6, 8], [32, 64, 128])
    func mlxRTN(bits: Int, group: Int) throws {
        let m = Self.quantize(QuantizationSettings(bits: bits, groupSize: group, method: .rtn, grid: .mlxAffine))
        #expect(m.words == (try Self.words("mlx_b\(bits)_g\(group)_words")))
        #expect(m.scales == (try Self.floats("mlx_b\(bits)_g\(group)_scales")))
        #expect(m.offsets == (try Self.floats("mlx_b\(bits)_g\(group)_biases")))
    }

    static let compressedTensorsCases: [(bits: Int, symmetric: Bool, group: Int)] =
        [2, 3, 4, 8].flatMap { b in [true, false].flatMap { s in [32, 0].map { (b, s, $0) } } }

    @Test("RTN on the compressed-tensors grids equals calculate_qparams + quantize + pack_to_int32",
          arguments: compressedTensorsCases)
    func compressedTensorsRTN(_ c: (bits: Int, symmetric: Bool, group: Int)) throws {
        let (bits, symmetric, group) = c
        let m = Self.quantize(QuantizationSettings(
            bits: bits, groupSize: group == 0 ? nil : group, method: .rtn, grid: symmetric ? .symmetric : .integerZeroPoint))
        let key = "ct_b\(bits)_\(symmetric ? "sym" : "asym")_\(group == 0 ? "channel" : "g32")"
        #expect(m.words == (try Self.words(key + "_packed")))
        #expect(m.scales == (try Self.floats(key + "_scale")))
        if !symmetric {
            // compressed-tensors packs zero points along the output dimension: unpack one column per group.
            let packed = try Self.words(key + "_zero_point")
            let zpWords = BitPacking.wordCount(codes: Self.rows, bits: bits)
            for g in 0..<m.groups {
                let column = (0..<zpWords).map { packed[$0 * m.groups + g] }
                var codes = [UInt8](repeating: 0, count: Self.rows)
                column.withUnsafeBufferPointer { c in codes.withUnsafeMutableBufferPointer { BitPacking.unpack(c.baseAddress!, count: Self.rows, bits: bits, into: $0.baseAddress!) } }
                for r in 0..<Self.rows { #expect(Float(codes[r]) == m.offsets[r * m.groups + g], "row \(r) group \(g)") }
            }
        }
    }

    @Test("bit packing round-trips every width and straddles words LSB-first", arguments: 1...8)
    func packing(bits: Int) {
        let count = 77
        let codes = (0..<count).map { UInt8(($0 * 37 + 11) % (1 << bits)) }
        var words = [UInt32](repeating: 0xFFFF_FFFF, count: BitPacking.wordCount(codes: count, bits: bits))
        codes.withUnsafeBufferPointer { c in words.withUnsafeMutableBufferPointer { BitPacking.pack(c.baseAddress!, count: count, bits: bits, into: $0.baseAddress!) } }
        var back = [UInt8](repeating: 0, count: count)
        words.withUnsafeBufferPointer { w in back.withUnsafeMutableBufferPointer { BitPacking.unpack(w.baseAddress!, count: count, bits: bits, into: $0.baseAddress!) } }
        #expect(back == codes)
        // Element j sits at bit j*bits of the word stream.
        for j in [0, 5, count - 1] {
            let bit = j * bits
            let stream = UInt64(words[bit / 32]) | (bit / 32 + 1 < words.count ? UInt64(words[bit / 32 + 1]) << 32 : 0)
            #expect(UInt8((stream >> UInt64(bit % 32)) & UInt64((1 << bits) - 1)) == codes[j])
        }
        // Padding bits after the last code are zero.
        let used = count * bits % 32
        if used != 0 { #expect(words.last! >> UInt32(used) == 0) }
    }

    @Test("MSE never has more squared error than RTN on the same grid; HQQ stays on integer zero codes",
          arguments: [QuantGrid.mlxAffine, .integerZeroPoint, .symmetric], [2, 3, 4])
    func searchMethods(grid: QuantGrid, bits: Int) {
        let rtn = Self.quantize(QuantizationSettings(bits: bits, groupSize: 32, method: .rtn, grid: grid))
        let mse = Self.quantize(QuantizationSettings(bits: bits, groupSize: 32, method: .mse, grid: grid))
        let hqq = Self.quantize(QuantizationSettings(bits: bits, groupSize: 32, method: .hqq, grid: grid))
        #expect(mse.errorEnergy <= rtn.errorEnergy * (1 + 1e-6))
        #expect(mse.errorEnergy < rtn.errorEnergy, "the clipping search should find something better than min-max here")
        // HQQ only ever keeps an iterate that lowers the group's mean |error| below its start: the min–max scale
        // with the nearest integer zero code (for the symmetric grid, RTN's own parameters).
        var restored = [Float](repeating: 0, count: Self.rows * Self.cols)
        restored.withUnsafeMutableBufferPointer { hqq.dequantize(into: $0.baseAddress!) }
        let levels = Float((1 << bits) - 1)
        for group in 0..<(Self.rows * Self.cols / 32) {
            let w = Self.weights[group * 32..<(group + 1) * 32]
            let hqqError = zip(w, restored[group * 32..<(group + 1) * 32]).reduce(Float(0)) { $0 + abs($1.0 - $1.1) }
            var startError: Float = 0
            if grid == .symmetric {
                var r = [Float](repeating: 0, count: Self.rows * Self.cols)
                r.withUnsafeMutableBufferPointer { rtn.dequantize(into: $0.baseAddress!) }
                startError = zip(w, r[group * 32..<(group + 1) * 32]).reduce(Float(0)) { $0 + abs($1.0 - $1.1) }
            } else {
                let lo = w.min()!, hi = w.max()!
                guard hi > lo else { continue }
                let sigma = levels / (hi - lo)
                let z = (-lo * sigma).rounded(.toNearestOrEven)
                for x in w {
                    let q = min(max((x * sigma + z).rounded(.toNearestOrEven), 0), levels)
                    startError += abs(x - (q - z) / sigma)
                }
            }
            // Stored scales/biases are exact in F32; allow for float summation order only.
            #expect(hqqError <= startError * (1 + 1e-4) + 1e-9, "group \(group)")
        }
        if grid == .integerZeroPoint {
            #expect(hqq.offsets.allSatisfy { $0 == $0.rounded() && $0 >= 0 && $0 < Float(1 << bits) })
        }
        if grid == .mlxAffine {
            // Zero codes are integers, so w = 0 dequantizes to (almost) exactly 0: bias/scale is an integer.
            for (s, b) in zip(hqq.scales, hqq.offsets) where s != 0 {
                let z = -b / s
                #expect(abs(z - z.rounded()) < 1e-3)
            }
        }
    }

    @Test("the reported error statistics are those of the dequantized matrix")
    func statistics() {
        let m = Self.quantize(QuantizationSettings(bits: 3, groupSize: 64, method: .hqq, grid: .mlxAffine))
        var restored = [Float](repeating: 0, count: Self.rows * Self.cols)
        restored.withUnsafeMutableBufferPointer { m.dequantize(into: $0.baseAddress!) }
        var noise: Double = 0, signal: Double = 0
        var largest: Float = 0
        for (w, r) in zip(Self.weights, restored) {
            noise += Double((w - r) * (w - r))
            signal += Double(w * w)
            largest = max(largest, abs(w - r))
        }
        #expect(abs(m.errorEnergy - noise) <= 1e-6 * noise)
        #expect(abs(m.signalEnergy - signal) <= 1e-9 * signal)
        #expect(m.maxError == largest)
    }

    @Test("x^-0.3 approximation used by HQQ is within 2e-5 relative of libm", arguments: [1e-30, 1e-7, 3e-3, 0.5, 1, 7.25, 1e4] as [Float])
    func fastPow(x: Float) {
        let exact = Float(pow(Double(x), -0.3))
        #expect(abs(FastMath.powNegative03(x) - exact) <= 2e-5 * exact)
        let lanes = FastMath.powNegative03(SIMD8<Float>(repeating: x))
        #expect(abs(lanes[3] - exact) <= 2e-5 * exact)
        #expect(FastMath.powNegative03(0) == .infinity)
    }
}

#if canImport(Glibc)
import Glibc
#endif
