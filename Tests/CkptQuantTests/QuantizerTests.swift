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

    @Test("MSE never has more squared error than RTN on the same grid; HQQ lowers its start's mean |error|",
          arguments: [QuantGrid.mlxAffine, .integerZeroPoint, .symmetric], [2, 3, 4])
    func searchMethods(grid: QuantGrid, bits: Int) {
        let rtn = Self.quantize(QuantizationSettings(bits: bits, groupSize: 32, method: .rtn, grid: grid))
        let mse = Self.quantize(QuantizationSettings(bits: bits, groupSize: 32, method: .mse, grid: grid))
        let hqq = Self.quantize(QuantizationSettings(bits: bits, groupSize: 32, method: .hqq, grid: grid))
        #expect(mse.errorEnergy <= rtn.errorEnergy * (1 + 1e-6))
        #expect(mse.errorEnergy < rtn.errorEnergy, "the clipping search should find something better than min-max here")
        // HQQ only ever keeps an iterate that lowers the group's mean |error| below its start: RTN's own
        // parameters on the affine and symmetric grids, the min–max scale with the nearest integer zero code on the
        // integer-zero grid.
        var restored = [Float](repeating: 0, count: Self.rows * Self.cols)
        restored.withUnsafeMutableBufferPointer { hqq.dequantize(into: $0.baseAddress!) }
        let levels = Float((1 << bits) - 1)
        var lowered = 0
        for group in 0..<(Self.rows * Self.cols / 32) {
            let w = Self.weights[group * 32..<(group + 1) * 32]
            let hqqError = zip(w, restored[group * 32..<(group + 1) * 32]).reduce(Float(0)) { $0 + abs($1.0 - $1.1) }
            var startError: Float = 0
            if grid != .integerZeroPoint {
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
            // ...and never worse than RTN's parameters, which the integer-zero grid also falls back to.
            var r = [Float](repeating: 0, count: Self.rows * Self.cols)
            r.withUnsafeMutableBufferPointer { rtn.dequantize(into: $0.baseAddress!) }
            let rtnError = zip(w, r[group * 32..<(group + 1) * 32]).reduce(Float(0)) { $0 + abs($1.0 - $1.1) }
            #expect(hqqError <= rtnError * (1 + 1e-4) + 1e-9, "group \(group)")
            if hqqError < startError * (1 - 1e-3) { lowered += 1 }
        }
        if grid == .integerZeroPoint {
            #expect(hqq.offsets.allSatisfy { $0 == $0.rounded() && $0 >= 0 && $0 < Float(1 << bits) })
        }
        if grid == .mlxAffine {
            // Both parameters are free there: the splitting should improve on min–max in most groups.
            #expect(lowered * 2 > Self.rows * Self.cols / 32, "HQQ lowered the mean |error| in \(lowered) groups")
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

    static func temporaryDirectory() -> String {
        var template = Array("/tmp/ckpt-test-XXXXXX".utf8CString)
        return template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
    }

    /// A `[rows, cols]` tensor of `values` stored as `dtype` in a safetensors file, planned for quantization.
    static func planned(_ values: [Float], rows: Int, cols: Int, dtype: DType) throws -> PlannedTensor {
        var bytes = [UInt8](repeating: 0, count: values.count * dtype.byteWidth!)
        values.withUnsafeBytes { src in
            bytes.withUnsafeMutableBytes { DTypeConversion.convert(from: .f32, to: dtype, count: values.count, source: src.baseAddress!, destination: $0.baseAddress!) }
        }
        let path = temporaryDirectory() + "/w.safetensors"
        try SafeTensors.write([try OutputTensor.bytes(name: "m.weight", dtype: dtype, shape: Shape([rows, cols]), bytes)], metadata: [:], to: path)
        let entry = try Checkpoint.open(path).tensors[0]
        return PlannedTensor(entry: entry, kind: .linear, rows: rows, cols: cols, keptReason: nil)
    }

    static func pseudoRandom(_ count: Int) -> [Float] {
        var state: UInt32 = 12345
        return (0..<count).map { (_: Int) -> Float in
            state = state &* 1_664_525 &+ 1_013_904_223
            let uniform = Float(state >> 8) / Float(1 << 24) - 0.5
            return uniform * uniform * uniform * 8  // heavy-ish tails, like trained weights
        }
    }

    static let streamingCases: [(rows: Int, cols: Int, settings: QuantizationSettings)] = [
        // 1.2 M values: two chunks, the second partial; F16 input goes through the staging buffer.
        (600, 2048, QuantizationSettings(bits: 4, groupSize: 64, method: .rtn, grid: .mlxAffine)),
        (48, 384, QuantizationSettings(bits: 3, groupSize: 32, method: .hqq, grid: .integerZeroPoint)),
        (40, 320, QuantizationSettings(bits: 5, groupSize: nil, method: .mse, grid: .symmetric)),
    ]

    @Test("the streaming quantizer gives QuantizedMatrix's codes, scales, offsets, values and statistics, bit for bit",
          arguments: streamingCases, [DType.f32, .f16])
    func streaming(_ c: (rows: Int, cols: Int, settings: QuantizationSettings), dtype: DType) throws {
        var settings = c.settings
        settings.scaleType = dtype
        let item = try Self.planned(Self.pseudoRandom(c.rows * c.cols), rows: c.rows, cols: c.cols, dtype: dtype)
        var decoded = [Float](repeating: 0, count: c.rows * c.cols)
        try decoded.withUnsafeMutableBufferPointer { try item.entry.decodeFloats(into: $0.baseAddress!) }
        let matrix = decoded.withUnsafeBufferPointer { QuantizedMatrix.quantize($0.baseAddress!, rows: c.rows, cols: c.cols, settings: settings) }
        var restored = [Float](repeating: 0, count: decoded.count)
        restored.withUnsafeMutableBufferPointer { matrix.dequantize(into: $0.baseAddress!) }

        let quantizer = StreamingQuantizer()
        var words: [UInt32] = [], scales: [Float] = [], offsets: [Float] = [], values: [Float] = []
        var next = 0
        let packed = try quantizer.quantize(item, settings: settings, output: .packed) { (chunk: StreamingQuantizer.Chunk) throws(CkptError) in
            #expect(chunk.rows.lowerBound == next && chunk.values == nil)
            next = chunk.rows.upperBound
            words += UnsafeBufferPointer(start: chunk.words!, count: chunk.rows.count * matrix.wordsPerRow)
            scales += UnsafeBufferPointer(start: chunk.scales, count: chunk.rows.count * matrix.groups)
            offsets += UnsafeBufferPointer(start: chunk.offsets, count: chunk.rows.count * matrix.groups)
        }
        #expect(next == c.rows)
        #expect(words == matrix.words && scales == matrix.scales && offsets == matrix.offsets)
        #expect(packed.signalEnergy == matrix.signalEnergy && packed.errorEnergy == matrix.errorEnergy && packed.maxError == matrix.maxError)
        let dequantized = try quantizer.quantize(item, settings: settings, output: .dequantized) { (chunk: StreamingQuantizer.Chunk) throws(CkptError) in
            #expect(chunk.words == nil)
            values += UnsafeBufferPointer(start: chunk.values!, count: chunk.rows.count * c.cols)
        }
        #expect(values.map(\.bitPattern) == restored.map(\.bitPattern))
        #expect(dequantized.errorEnergy == matrix.errorEnergy)
    }

    @Test("the streaming quantizer names the first NaN/Inf element, before emitting the chunk that holds it")
    func streamingNonFinite() throws {
        let rows = 600, cols = 2048
        var weights = Self.pseudoRandom(rows * cols)
        let first = 520 * cols + 17  // the second chunk (512 rows each)
        weights[first + 3 * cols] = .nan
        weights[first] = -.infinity
        let item = try Self.planned(weights, rows: rows, cols: cols, dtype: .f32)
        var emitted: [Range<Int>] = []
        let error = #expect(throws: CkptError.self) {
            _ = try StreamingQuantizer().quantize(item, settings: QuantizationSettings(bits: 4, groupSize: 64, method: .rtn, grid: .mlxAffine),
                                                  output: .packed) { (chunk: StreamingQuantizer.Chunk) throws(CkptError) in emitted.append(chunk.rows) }
        }
        #expect(error?.code == .nonFinite && error?.tensor == "m.weight")
        #expect(error?.message.hasPrefix("element \(first) is -inf;") == true)
        #expect(emitted == [0..<512])
    }

    @Test("importance weights: equal ones give the plain parameters; a heavy one fits that value better, never worse",
          arguments: [QuantMethod.mse, .hqq])
    func importanceWeightedParameters(method: QuantMethod) {
        let quantizer = GroupQuantizer(QuantizationSettings(bits: 3, groupSize: 64, method: method, grid: .mlxAffine))
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: 64)
        defer { scratch.deallocate() }
        var worse = 0, better = 0
        for row in 0..<Self.rows {
            for start in stride(from: 0, to: Self.cols, by: 64) {
                Self.weights.withUnsafeBufferPointer { all in
                    let w = all.baseAddress! + row * Self.cols + start
                    let plain = quantizer.parameters(w, 64, scratch: scratch).stored
                    let equal = [Float](repeating: 3, count: 64)
                    let same = equal.withUnsafeBufferPointer { quantizer.parameters(w, 64, importance: $0.baseAddress!, scratch: scratch).stored }
                    // Scaling every weight by 3 scales every sum: the same parameters up to float rounding.
                    #expect(abs(same.scale - plain.scale) <= 1e-5 * abs(plain.scale) && abs(same.offset - plain.offset) <= 1e-5 * max(abs(plain.offset), abs(plain.scale)))
                    // The value farthest from the plain grid gets 10⁴ times the weight of the others.
                    func error(_ j: Int, _ p: GroupParameters) -> Float { abs(w[j] - quantizer.value(quantizer.code(w[j], p), p)) }
                    let target = (0..<64).max { error($0, plain) < error($1, plain) }!
                    var heavy = [Float](repeating: 1, count: 64)
                    heavy[target] = 10_000
                    let fitted = heavy.withUnsafeBufferPointer { quantizer.parameters(w, 64, importance: $0.baseAddress!, scratch: scratch).stored }
                    if error(target, fitted) > error(target, plain) { worse += 1 }
                    if error(target, fitted) < error(target, plain) { better += 1 }
                }
            }
        }
        #expect(worse == 0)
        #expect(better >= Self.rows, "the heavy value's error fell in \(better) of \(2 * Self.rows) groups")
    }

    @Test("MSE's eight-candidate error lanes equal the scalar per-candidate sums bit for bit (every grid, weighted or not)",
          arguments: [QuantGrid.mlxAffine, .integerZeroPoint, .symmetric])
    func candidateErrorLanes(grid: QuantGrid) {
        let quantizer = GroupQuantizer(QuantizationSettings(bits: 3, groupSize: 64, method: .mse, grid: grid))
        let importance: [Float] = (0..<64).map { Float(1 + ($0 * 37) % 11) / 4 }
        var checked = 0
        for group in 0..<Self.rows * Self.cols / 64 {
            Self.weights.withUnsafeBufferPointer { all in
                let w = all.baseAddress! + group * 64
                var lo = w[0], hi = w[0]
                for j in 0..<64 { lo = min(lo, w[j]); hi = max(hi, w[j]) }
                for first in stride(from: 0, to: GroupQuantizer.clippingFactors.count, by: 8) {
                    let factors = (first..<first + 8).map { GroupQuantizer.clippingFactors[min($0, GroupQuantizer.clippingFactors.count - 1)] }
                    let candidates = factors.map { quantizer.storedParameters(quantizer.rangeParameters(lo: lo * $0, hi: hi * $0)) }
                    let scales = SIMD8<Float>(candidates.map(\.scale)), offsets = SIMD8<Float>(candidates.map(\.offset))
                    let plain = quantizer.candidateErrors(w, 64, scales: scales, offsets: offsets, importance: nil)
                    let weighted = importance.withUnsafeBufferPointer {
                        quantizer.candidateErrors(w, 64, scales: scales, offsets: offsets, importance: $0.baseAddress!)
                    }
                    for (lane, p) in candidates.enumerated() {
                        var sum: Float = 0, weightedSum: Float = 0
                        for j in 0..<64 {
                            let d = w[j] - quantizer.value(quantizer.code(w[j], p), p)
                            sum += d * d
                            weightedSum += importance[j] * d * d
                        }
                        #expect(plain[lane].bitPattern == sum.bitPattern, "lane \(lane): \(plain[lane]) vs \(sum)")
                        #expect(weighted[lane].bitPattern == weightedSum.bitPattern, "lane \(lane): \(weighted[lane]) vs \(weightedSum)")
                        checked += 1
                    }
                }
            }
        }
        #expect(checked == 32 * Self.rows * Self.cols / 64)
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
