import CkptCore
import CkptFormats
@testable import CkptQuant
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// RepQ-ViT's activation quantizers against what torch computed for the same tensors
/// (`fixtures/quant/activation_reference.npz`, made by `fixtures/quant/activation_reference.py` with torch 2.13 CPU).
@Suite("RepQ-ViT activation quantizers vs torch")
struct ActivationQuantizerTests {
    static let reference: [String: TensorEntry] = {
        let checkpoint = try! Checkpoint.open(QuantizerTests.root + "/fixtures/quant/activation_reference.npz")
        return Dictionary(uniqueKeysWithValues: checkpoint.tensors.map { ($0.name, $0) })
    }()

    static func floats(_ name: String) throws -> [Float] {
        let entry = try #require(reference[name], "missing \(name)")
        var values = [Float](repeating: 0, count: entry.shape.elements)
        try values.withUnsafeMutableBufferPointer { try entry.decodeFloats(into: $0.baseAddress!) }
        return values
    }

    static let quantiles: [Double] = PercentileSearch.percentiles.flatMap { [$0, 1 - $0] } + [0.5, 0.25, 0.9]
    static let lnRows = 300, lnColumns = 24, weightRows = 16, weightColumns = 96

    /// Indices where two float arrays differ bit for bit (NaN never expected).
    static func differences(_ a: [Float], _ b: [Float]) -> [Int] {
        precondition(a.count == b.count)
        return a.indices.filter { a[$0] != b[$0] }
    }

    // MARK: quantiles

    @Test("quantile by selection equals torch.quantile and np.percentile bit for bit",
          arguments: ["gauss", "gelu", "softmax", "ln", "w"])
    func quantilesMatchTorch(name: String) throws {
        let x = try Self.floats("x_\(name)")
        let torch = try x.withUnsafeBufferPointer { try Quantile.linear($0, Self.quantiles) }
        #expect(torch == (try Self.floats("quantile_\(name)")))
        let numpy = try x.withUnsafeBufferPointer { try Quantile.linear($0, Self.quantiles, rule: .numpy) }
        #expect(numpy == (try Self.floats("percentile_\(name)")))
    }

    @Test("quantiles of one, two and seven values (duplicates) equal torch.quantile", arguments: [1, 2, 7])
    func tinyQuantiles(n: Int) throws {
        let x = Array(try Self.floats("x_tiny").prefix(n))
        let found = try x.withUnsafeBufferPointer { try Quantile.linear($0, Self.quantiles) }
        #expect(found == (try Self.floats("quantile_tiny\(n)")))
    }

    /// Inputs that defeat naive pivots (sorted, reversed, organ pipe, all equal, few distinct) and a large random one.
    static let selectionCases: [String] = ["random", "sorted", "reversed", "organ", "equal", "fewDistinct", "sawtooth"]

    @Test("introselect equals the sorted array at every wanted rank", arguments: selectionCases)
    func selectionMatchesSort(pattern: String) throws {
        let n = pattern == "random" ? 1_500_001 : 200_003
        var generator = SplitMix(seed: 77)
        let x: [Float] = (0..<n).map { i in
            switch pattern {
            case "random": Float(generator.normal()) * (generator.next() % 100 == 0 ? 30 : 1)
            case "sorted": Float(i)
            case "reversed": Float(n - i)
            case "organ": Float(min(i, n - i))
            case "equal": 0.25
            case "fewDistinct": Float(generator.next() % 5)
            default: Float(i % 1000)
            }
        }
        let sorted = x.sorted()
        let qs = Self.quantiles + [0, 1, 0.123456, 0.999_999]
        let found = try x.withUnsafeBufferPointer { try Quantile.linear($0, qs) }
        for (q, value) in zip(qs, found) {
            let p = Quantile.Position(q: q, count: n, rule: .torch)
            #expect(value == p.interpolate(sorted[p.below], sorted[p.above]), "q \(q)")
        }
        // The raw order statistics, at ranks spread over the whole range.
        var copy = x
        let ranks = [0, 1, 17, n / 3, n / 2, n / 2 + 1, n - 2, n - 1]
        let statistics = copy.withUnsafeMutableBufferPointer { Quantile.orderStatistics($0, ranks: ranks) }
        #expect(statistics == ranks.map { sorted[$0] })
        #expect(copy.sorted() == sorted, "selection permutes, never changes, the values")
    }

    @Test("above 2^24 values the quantile follows np.percentile, as RepQ-ViT's fallback does")
    func ruleSwitch() {
        #expect(Quantile.Rule.repQViT(count: 1 << 24) == .torch)
        #expect(Quantile.Rule.repQViT(count: (1 << 24) + 1) == .numpy)
        // The float32 rank of torch is coarse for large n: at n − 1 = 12,632,031 its ulp is 1, so the weight is 0.
        let coarse = Quantile.Position(q: 0.9999, count: 12_632_032, rule: .torch)
        #expect(coarse.weight == 0 && coarse.below == coarse.above)
        let fine = Quantile.Position(q: 0.9999, count: 12_632_032, rule: .numpy)
        #expect(fine.weight > 0 && fine.above == fine.below + 1)
    }

    // MARK: uniform quantizer

    @Test("per-tensor percentile search equals RepQ-ViT in torch: percentile, Δ, zp and every fake-quant value",
          arguments: ["gauss", "gelu"], [4, 6, 8])
    func uniformPerTensor(name: String, bits: Int) throws {
        let x = try Self.floats("x_\(name)")
        let key = "uq_\(name)_b\(bits)"
        let (quantizer, choice) = try x.withUnsafeBufferPointer { try UniformQuantizer.calibrate($0, bits: bits) }
        #expect(Float(choice.percentile) == (try Self.floats(key + "_pct"))[0])
        #expect(quantizer.scales == (try Self.floats(key + "_scale")))
        #expect(quantizer.zeroPoints == (try Self.floats(key + "_zero")))
        let scores = try Self.floats(key + "_scores")
        let best = Double(scores.min()!)
        #expect(abs(choice.meanSquaredError - best) <= 1e-5 * best, "ours \(choice.meanSquaredError), torch \(best)")
        var fake = [Float](repeating: .nan, count: x.count)
        try x.withUnsafeBufferPointer { input in try fake.withUnsafeMutableBufferPointer { try quantizer.fakeQuantize(input, into: $0) } }
        #expect(Self.differences(fake, try Self.floats(key + "_fake")).isEmpty)
    }

    @Test("per-column search (post-LayerNorm activations, channels last) equals RepQ-ViT in torch", arguments: [4, 6, 8])
    func uniformPerColumn(bits: Int) throws {
        let x = try Self.floats("x_ln")
        let key = "uqc_ln_b\(bits)"
        let (quantizer, choices) = try x.withUnsafeBufferPointer {
            try UniformQuantizer.calibrate($0, rows: Self.lnRows, columns: Self.lnColumns, bits: bits, granularity: .perColumn)
        }
        #expect(choices.map { Float($0.percentile) } == (try Self.floats(key + "_pct")))
        #expect(quantizer.scales == (try Self.floats(key + "_scale")))
        #expect(quantizer.zeroPoints == (try Self.floats(key + "_zero")))
        var fake = x
        try fake.withUnsafeMutableBufferPointer { try quantizer.fakeQuantize($0) }
        #expect(Self.differences(fake, try Self.floats(key + "_fake")).isEmpty)
    }

    @Test("per-row search (weights, channel_wise) equals RepQ-ViT in torch", arguments: [4, 6, 8])
    func uniformPerRow(bits: Int) throws {
        let w = try Self.floats("x_w")
        let key = "uqr_w_b\(bits)"
        let (quantizer, choices) = try w.withUnsafeBufferPointer {
            try UniformQuantizer.calibrate($0, rows: Self.weightRows, columns: Self.weightColumns, bits: bits, granularity: .perRow)
        }
        #expect(choices.map { Float($0.percentile) } == (try Self.floats(key + "_pct")))
        #expect(quantizer.scales == (try Self.floats(key + "_scale")))
        #expect(quantizer.zeroPoints == (try Self.floats(key + "_zero")))
        var fake = w
        try fake.withUnsafeMutableBufferPointer { try quantizer.fakeQuantize($0) }
        #expect(Self.differences(fake, try Self.floats(key + "_fake")).isEmpty)
    }

    @Test("integer codes: decode(encode(x)) is the fake-quant value, the SIMD path equals the scalar one, ties round to even")
    func codesAndLanes() throws {
        var generator = SplitMix(seed: 5)
        // 13 columns: rows straddle the eight-lane blocks; values far outside the range and exact half-steps included.
        let rows = 11, columns = 13
        var x = (0..<(rows * columns)).map { _ in Float(generator.normal()) * 3 }
        x[5] = 1e9; x[6] = -1e9; x[7] = 3e7
        let quantizer = try UniformQuantizer(
            bits: 4, granularity: .perColumn, scales: (0..<columns).map { 0.25 + Float($0) * 0.125 }, zeroPoints: (0..<columns).map { Float($0 % 16) })
        x[0] = 0.125      // x/Δ = 0.5: rounds to 0
        x[1] = 3 * 0.375 / 2  // x/Δ = 1.5 in column 1: rounds to 2
        var codes = [UInt8](repeating: 0, count: x.count)
        try x.withUnsafeBufferPointer { input in try codes.withUnsafeMutableBufferPointer { try quantizer.encode(input, into: $0) } }
        var decoded = [Float](repeating: 0, count: x.count)
        try codes.withUnsafeBufferPointer { c in try decoded.withUnsafeMutableBufferPointer { try quantizer.decode(c, into: $0) } }
        var fake = x
        try fake.withUnsafeMutableBufferPointer { try quantizer.fakeQuantize($0) }
        #expect(decoded == fake)
        #expect(x.indices.allSatisfy { fake[$0] == quantizer.fakeQuantized(x[$0], channel: $0 % columns) })
        #expect(codes[0] == 0 + 0 && codes[1] == 2 + 1)
        #expect(codes.allSatisfy { $0 <= 15 })
        // Full-range rounding: beyond 2^22 the add-and-subtract trick would be wrong; torch's round is exact there.
        for t: Float in [4_194_304.5, 4_194_305.5, -4_194_305.5, 8_388_609, 3.0e7, 0.5, 1.5, 2.5, -0.5, -2.5] {
            #expect(UniformQuantizer.roundHalfEven(t) == t.rounded(.toNearestOrEven), "\(t)")
            let lanes = UniformQuantizer.roundHalfEven8(SIMD8<Float>(repeating: t))
            #expect(lanes[3] == t.rounded(.toNearestOrEven), "\(t)")
        }
        // A narrow range far from zero: zp ≈ −2.6e7, so x/Δ is beyond 2^23; the values still land on the grid.
        let far = try UniformQuantizer(bits: 8, scale: 1.0 / 25_600, zeroPoint: -25_600_000)
        #expect(far.fakeQuantized(1000.005) == (Self.roundTorch(1000.005 / far.scales[0]) + far.zeroPoints[0] - far.zeroPoints[0]) * far.scales[0])
        // A fractional zero point (RepQ-ViT's unrounded fold) fake-quantizes but has no integer codes.
        let fractional = try UniformQuantizer(bits: 4, scale: 0.5, zeroPoint: 7.25)
        #expect(throws: CkptError.self) {
            try [Float(1)].withUnsafeBufferPointer { input in try codes.withUnsafeMutableBufferPointer { try fractional.encode(input, into: UnsafeMutableBufferPointer(rebasing: $0[0..<1])) } }
        }
    }

    static func roundTorch(_ x: Float) -> Float { x.rounded(.toNearestOrEven) }

    @Test("degenerate ranges give a usable grid, never NaN (constant tensor, all zeros, a constant channel)")
    func degenerateRanges() throws {
        for (value, bits) in [(Float(2.5), 4), (-0.75, 8), (0, 4), (Float.leastNormalMagnitude / 64, 6)] {
            let x = [Float](repeating: value, count: 100)
            let (quantizer, choice) = try x.withUnsafeBufferPointer { try UniformQuantizer.calibrate($0, bits: bits) }
            #expect(quantizer.scales[0].isFinite && quantizer.scales[0] > 0 && quantizer.zeroPoints[0].isFinite)
            let restored = quantizer.fakeQuantized(value)
            #expect(abs(restored - value) <= abs(value) * 2e-7 + 1e-38, "\(value) → \(restored)")
            #expect(choice.meanSquaredError.isFinite)
        }
        // Column 2 is constant; the other columns are unaffected by it.
        var generator = SplitMix(seed: 9)
        var x = (0..<(50 * 4)).map { _ in Float(generator.normal()) }
        for r in 0..<50 { x[r * 4 + 2] = 4 }
        let (quantizer, _) = try x.withUnsafeBufferPointer {
            try UniformQuantizer.calibrate($0, rows: 50, columns: 4, bits: 4, granularity: .perColumn)
        }
        #expect(quantizer.fakeQuantized(4, channel: 2) == 4)
        #expect(quantizer.zeroPoints[2] == 0 && quantizer.scales[2] == Float(4) / 15)
        // The same bounds as parameters directly: 0 stays exact, and hi < lo never yields a negative Δ.
        #expect(UniformQuantizer.parameters(bits: 4, lo: 0, hi: 0) == (1, 0))
        let inverted = UniformQuantizer.parameters(bits: 4, lo: 1, hi: -1)
        #expect(inverted.scale > 0)
    }

    @Test("calibration refuses NaN, ±Inf, no values, shape mismatches and bits outside 2…8")
    func uniformRefusals() throws {
        for bad in [Float.nan, .infinity, -.infinity] {
            let x: [Float] = [1, 2, bad, 4]
            #expect(throws: CkptError.self) { try x.withUnsafeBufferPointer { _ = try UniformQuantizer.calibrate($0, bits: 4) } }
            #expect(throws: CkptError.self) { try x.withUnsafeBufferPointer { _ = try LogSqrt2Quantizer.calibrate($0, bits: 4) } }
        }
        do {
            _ = try [Float(1), .nan].withUnsafeBufferPointer { try UniformQuantizer.calibrate($0, bits: 4) }
            Issue.record("NaN accepted")
        } catch let error as CkptError {
            #expect(error.code == .nonFinite && error.message.contains("value 1"))
        }
        #expect(throws: CkptError.self) { try [Float]().withUnsafeBufferPointer { _ = try UniformQuantizer.calibrate($0, bits: 4) } }
        #expect(throws: CkptError.self) { try [Float](repeating: 1, count: 6).withUnsafeBufferPointer { _ = try UniformQuantizer.calibrate($0, rows: 4, columns: 2, bits: 4, granularity: .perRow) } }
        for bits in [1, 9] {
            #expect(throws: CkptError.self) { try [Float(1), 2].withUnsafeBufferPointer { _ = try UniformQuantizer.calibrate($0, bits: bits) } }
            #expect(throws: CkptError.self) { _ = try UniformQuantizer(bits: bits, scale: 1, zeroPoint: 0) }
            #expect(throws: CkptError.self) { _ = try LogSqrt2Quantizer(bits: bits, scale: 1) }
        }
        #expect(throws: CkptError.self) { _ = try UniformQuantizer(bits: 4, scale: 0, zeroPoint: 0) }
        #expect(throws: CkptError.self) { _ = try UniformQuantizer(bits: 4, granularity: .perTensor, scales: [1, 2], zeroPoints: [0, 0]) }
        #expect(throws: CkptError.self) { try [Float(-0.1), 0.5].withUnsafeBufferPointer { _ = try LogSqrt2Quantizer.calibrate($0, bits: 4) } }
        let q = try UniformQuantizer(bits: 4, granularity: .perColumn, scales: [1, 1, 1], zeroPoints: [0, 0, 0])
        var y = [Float](repeating: 0, count: 4)
        #expect(throws: CkptError.self) { try y.withUnsafeMutableBufferPointer { try q.fakeQuantize($0) } }
    }

    // MARK: log√2 quantizer

    /// Where torch's float32 log2 may round the other way than the exact code: −2·log2(x/Δ) within 1e-5 of a
    /// half-integer (x/Δ computed in float32 as both do).
    static func nearLogThreshold(_ x: Float, scale: Float) -> Bool {
        let r = x / scale
        guard r > 0 else { return false }
        let t = -2 * log2(Double(r))
        return abs((t - t.rounded(.down)) - 0.5) < 1e-5
    }

    @Test("log√2 on a fixed grid equals torch except where torch's log2 sits on a rounding threshold", arguments: [4, 6, 8])
    func logSqrt2Grid(bits: Int) throws {
        let x = try Self.floats("x_loggrid")
        let quantizer = try LogSqrt2Quantizer(bits: bits, scale: 0.7)
        var fake = x
        try fake.withUnsafeMutableBufferPointer { try quantizer.fakeQuantize($0) }
        let expected = try Self.floats("lq_grid_b\(bits)_fake")
        let differing = Self.differences(fake, expected)
        #expect(differing.allSatisfy { Self.nearLogThreshold(x[$0], scale: 0.7) }, "\(differing.prefix(5).map { (x[$0], fake[$0], expected[$0]) })")
        #expect(differing.count <= 2)
        // The grid spans every code, both clamps and the zero mask.
        let codes = Set(x.compactMap { quantizer.code($0) })
        #expect(codes.count == 1 << bits)
        #expect(fake.contains(0) && fake.contains(0.7))
        #expect(x.indices.allSatisfy { fake[$0] == quantizer.fakeQuantized(x[$0]) })
    }

    @Test("log√2 percentile search on softmax rows equals RepQ-ViT in torch", arguments: [4, 6, 8])
    func logSqrt2Search(bits: Int) throws {
        let p = try Self.floats("x_softmax")
        let key = "lq_softmax_b\(bits)"
        let (quantizer, choice) = try p.withUnsafeBufferPointer { try LogSqrt2Quantizer.calibrate($0, bits: bits) }
        #expect(Float(choice.percentile) == (try Self.floats(key + "_pct"))[0])
        #expect(quantizer.scale == (try Self.floats(key + "_scale"))[0])
        let best = Double(try Self.floats(key + "_scores").min()!)
        #expect(abs(choice.meanSquaredError - best) <= 1e-4 * best)
        var fake = p
        try fake.withUnsafeMutableBufferPointer { try quantizer.fakeQuantize($0) }
        let differing = Self.differences(fake, try Self.floats(key + "_fake"))
        #expect(differing.allSatisfy { Self.nearLogThreshold(p[$0], scale: quantizer.scale) })
    }

    @Test("log√2 thresholds are 2^¼ and 2^¾ rounded up; levels are Δ·2^(−q/2); zero and negatives give 0")
    func logSqrt2Levels() throws {
        #expect(Double(LogSqrt2Quantizer.lowThreshold) > pow(2, 0.25) && Double(LogSqrt2Quantizer.lowThreshold.nextDown) < pow(2, 0.25))
        #expect(Double(LogSqrt2Quantizer.highThreshold) > pow(2, 0.75) && Double(LogSqrt2Quantizer.highThreshold.nextDown) < pow(2, 0.75))
        let q = try LogSqrt2Quantizer(bits: 4, scale: 1)
        for code in 0..<16 {
            let level = q.fakeQuantized(Float(pow(2, -Double(code) / 2)))
            #expect(abs(Double(level) - pow(2, -Double(code) / 2)) <= 1e-7 * pow(2, -Double(code) / 2), "code \(code)")
        }
        #expect(q.fakeQuantized(0) == 0 && q.fakeQuantized(-0.5) == 0 && q.fakeQuantized(5) == 1)
        // Unclamped code 16 = 2^b: masked to 0; just above the 15.5 threshold, code 15.
        #expect(q.fakeQuantized(Float(pow(2, -8.0))) == 0)
        #expect(q.code(Float(pow(2, -15.4 / 2))) == 15)
        // Subnormal ratios (8 bits reaches 2^−127.5) take the exact path too.
        let q8 = try LogSqrt2Quantizer(bits: 8, scale: 1)
        #expect(q8.code(Float(pow(2, -254.6 / 2))) == 255)
        #expect(q8.code(Float(pow(2, -256.0 / 2))) == nil)
        // All-zero probabilities: Δ falls back to 1 and everything restores to 0.
        let (zeros, _) = try [Float](repeating: 0, count: 40).withUnsafeBufferPointer { try LogSqrt2Quantizer.calibrate($0, bits: 4) }
        #expect(zeros.scale == 1 && zeros.fakeQuantized(0) == 0)
    }

    // MARK: LayerNorm fold

    @Test("the LayerNorm fold equals test_quant.py's in torch (RepQ-ViT's fractional and our rounded zero point)",
          arguments: [4, 8], [false, true])
    func foldMatchesTorch(bits: Int, rounded: Bool) throws {
        let key = "fold_\(rounded ? "round" : "repq")_b\(bits)_"
        let w1 = try Self.floats("x_fold_w1"), w2 = try Self.floats("x_fold_w2")
        let fold = try LayerNormReparameterization<Float>(
            scales: try Self.floats("uqc_ln_b\(bits)_scale"), zeroPoints: try Self.floats("uqc_ln_b\(bits)_zero"),
            gamma: try Self.floats("x_ln_gamma"), beta: try Self.floats("x_ln_beta"),
            linears: [.init(weight: w1, bias: try Self.floats("x_fold_b1")), .init(weight: w2, bias: nil)], roundsZeroPoint: rounded)
        // Δ̃ is a float32 mean (torch sums pairwise, we in double): a few ulps apart at most, and so is all that
        // divides by it. The W'·b sums are accumulated in another order: 1e-5 of the bias scale.
        func close(_ ours: [Float], _ name: String, relative: Float = 4e-7, absolute: Float = 0) throws {
            let theirs = try Self.floats(key + name)
            #expect(ours.count == theirs.count)
            let scale = theirs.map(abs).max() ?? 1
            for i in ours.indices where abs(ours[i] - theirs[i]) > relative * abs(theirs[i]) + absolute * scale {
                Issue.record("\(name)[\(i)]: \(ours[i]) vs torch \(theirs[i])")
                return
            }
        }
        try close([fold.scale], "scale")
        try close([fold.zeroPoint], "zero")
        if rounded { #expect(fold.zeroPoint == fold.zeroPoint.rounded()) } else { #expect(fold.zeroPoint != fold.zeroPoint.rounded()) }
        try close(fold.gamma, "gamma")
        try close(fold.beta, "beta", relative: 1e-6, absolute: 1e-6)
        try close(fold.linears[0].weight, "w1")
        try close(fold.linears[1].weight, "w2")
        try close(fold.linears[0].bias!, "b1", relative: 1e-5, absolute: 1e-5)
        try close(fold.linears[1].bias!, "b2", relative: 1e-5, absolute: 1e-5)
    }

    /// LayerNorm over the last dimension (eps 1e-6), in the scalar type.
    static func layerNorm<T: BinaryFloatingPoint>(_ x: [T], columns: Int, gamma: [T], beta: [T]) -> [T] {
        var y = x
        for r in 0..<(x.count / columns) {
            let row = x[(r * columns)..<((r + 1) * columns)]
            let mean = row.reduce(0, +) / T(columns)
            let variance = row.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / T(columns)
            let inverse = 1 / T(Double(variance + T(1e-6)).squareRoot())
            for c in 0..<columns { y[r * columns + c] = (x[r * columns + c] - mean) * inverse * gamma[c] + beta[c] }
        }
        return y
    }

    /// `y·Wᵀ + bias` for row-major y `[rows × in]`, W `[out × in]`, accumulated in the scalar type.
    static func linear<T: BinaryFloatingPoint>(_ y: [T], columns: Int, _ l: LayerNormReparameterization<T>.Linear) -> [T] {
        let outputs = l.weight.count / columns, rows = y.count / columns
        var out = [T](repeating: 0, count: rows * outputs)
        for r in 0..<rows {
            for o in 0..<outputs {
                var s: T = l.bias?[o] ?? 0
                for c in 0..<columns { s += y[r * columns + c] * l.weight[o * columns + c] }
                out[r * outputs + o] = s
            }
        }
        return out
    }

    /// RepQ-ViT's uniform fake quantization in the scalar type: the code and the value.
    static func quantize<T: BinaryFloatingPoint>(_ x: T, scale: T, zero: T, bits: Int) -> (code: T, value: T) {
        let q = min(max((x / scale).rounded(.toNearestOrEven) + zero, 0), T((1 << bits) - 1))
        return (q, (q - zero) * scale)
    }

    struct FoldCase<T: BinaryFloatingPoint & Sendable> {
        let x: [T], gamma: [T], beta: [T], scales: [T], zeros: [T], linears: [LayerNormReparameterization<T>.Linear]
        static var columns: Int { 16 }
        static var rows: Int { 64 }

        /// A LayerNorm input with uneven channels, its γ/β, the per-channel quantizer calibrated by
        /// ``UniformQuantizer`` on the LayerNorm output (4 bits), and a qkv-like Linear with bias and one without.
        static func make(_ convert: (Double) -> T) throws -> FoldCase<T> {
            var generator = SplitMix(seed: 31)
            let spread = (0..<columns).map { _ in 0.3 + 3 * generator.uniform() }
            let x = (0..<(rows * columns)).map { i in convert(generator.normal() * spread[i % columns] + (i % columns == 3 ? 20 : 0)) }
            let gamma = (0..<columns).map { c in convert(c == 5 ? 6 : 0.2 + 2 * generator.uniform()) }
            let beta = (0..<columns).map { _ in convert(generator.normal() * 0.5) }
            let ln = ActivationQuantizerTests.layerNorm(x, columns: columns, gamma: gamma, beta: beta).map { Float($0) }
            let (quantizer, _) = try ln.withUnsafeBufferPointer {
                try UniformQuantizer.calibrate($0, rows: rows, columns: columns, bits: 4, granularity: .perColumn)
            }
            let w1 = (0..<(3 * columns * columns)).map { _ in convert(generator.normal() * 0.3) }
            let b1 = (0..<(3 * columns)).map { _ in convert(generator.normal() * 0.1) }
            let w2 = (0..<(2 * columns * columns)).map { _ in convert(generator.normal() * 0.3) }
            return FoldCase(x: x, gamma: gamma, beta: beta, scales: quantizer.scales.map { convert(Double($0)) },
                            zeros: quantizer.zeroPoints.map { convert(Double($0)) },
                            linears: [.init(weight: w1, bias: b1), .init(weight: w2, bias: nil)])
        }
    }

    /// Checks the fold on `c`: returns the largest relative errors (unquantized outputs, quantized outputs) and
    /// the code mismatches (index, y/Δ_c − zp... as its distance from a half-step).
    static func foldErrors<T: BinaryFloatingPoint & Sendable>(
        _ c: FoldCase<T>, rounded: Bool
    ) throws -> (plain: Double, quantized: Double, codeMismatches: [Double], valueError: Double) {
        let columns = FoldCase<T>.columns
        let fold = try LayerNormReparameterization<T>(
            scales: c.scales, zeroPoints: c.zeros, gamma: c.gamma, beta: c.beta, linears: c.linears, roundsZeroPoint: rounded)
        let y = layerNorm(c.x, columns: columns, gamma: c.gamma, beta: c.beta)
        let folded = layerNorm(c.x, columns: columns, gamma: fold.gamma, beta: fold.beta)
        var plain = 0.0, quantized = 0.0, valueError = 0.0
        var mismatches: [Double] = []
        var qy = y, qFolded = folded
        for i in y.indices {
            let ch = i % columns
            let perChannel = quantize(y[i], scale: c.scales[ch], zero: c.zeros[ch], bits: 4)
            let perTensor = quantize(folded[i], scale: fold.scale, zero: fold.zeroPoint, bits: 4)
            qy[i] = perChannel.value
            qFolded[i] = perTensor.value
            if perChannel.code != perTensor.code {
                let t = Double(y[i] / c.scales[ch])
                mismatches.append(abs(t - t.rounded(.down) - 0.5))
            }
            // Q̃(LN'(x))_c = Q_c(LN(x)_c)/r_c − b_c
            let mapped = Double(perChannel.value / fold.ratios[ch] - fold.shifts[ch])
            valueError = max(valueError, abs(Double(perTensor.value) - mapped) / max(abs(mapped), Double(fold.scale)))
        }
        for (k, original) in c.linears.enumerated() {
            let reference = linear(y, columns: columns, original), ours = linear(folded, columns: columns, fold.linears[k])
            let referenceQ = linear(qy, columns: columns, original), oursQ = linear(qFolded, columns: columns, fold.linears[k])
            let norm = reference.map { abs(Double($0)) }.max()!
            for i in reference.indices {
                plain = max(plain, abs(Double(ours[i] - reference[i])) / norm)
                quantized = max(quantized, abs(Double(oursQ[i] - referenceQ[i])) / norm)
            }
        }
        return (plain, quantized, mismatches, valueError)
    }

    @Test("the fold is exact in Double: same Linear outputs, and per-tensor (Δ̃, zp̃) quantization of LN'(x) is per-channel quantization of LN(x)")
    func foldIsExactInDouble() throws {
        let c = try FoldCase<Double>.make { $0 }
        let e = try Self.foldErrors(c, rounded: true)
        #expect(e.plain < 1e-12, "unquantized outputs differ by \(e.plain)")
        #expect(e.codeMismatches.isEmpty, "codes differ at \(e.codeMismatches.count) values")
        #expect(e.valueError < 1e-12)
        #expect(e.quantized < 1e-12, "quantized outputs differ by \(e.quantized)")
        // RepQ-ViT's unrounded zp̃ keeps the unquantized fold exact but shifts the per-tensor grid by its fraction:
        // the codes, and so the quantized outputs, no longer agree.
        let repq = try Self.foldErrors(c, rounded: false)
        #expect(repq.plain < 1e-12)
        #expect(repq.codeMismatches.count > 0 && repq.quantized > 1e-3)
    }

    @Test("the fold in Float: outputs within 2e-6 of their scale, quantized values within 1e-5; codes equal except within 1e-4 of a half-step")
    func foldInFloat() throws {
        let c = try FoldCase<Float>.make { Float($0) }
        let e = try Self.foldErrors(c, rounded: true)
        #expect(e.plain < 2e-6, "unquantized outputs differ by \(e.plain)")
        #expect(e.codeMismatches.allSatisfy { $0 < 1e-4 }, "\(e.codeMismatches)")
        #expect(e.codeMismatches.count <= 2)
        if e.codeMismatches.isEmpty {
            #expect(e.quantized < 2e-6, "quantized outputs differ by \(e.quantized)")
            #expect(e.valueError < 1e-5)
        }
    }

    @Test("the fold refuses mismatched widths, bad scales and a per-tensor quantizer")
    func foldRefusals() throws {
        #expect(throws: CkptError.self) { _ = try LayerNormReparameterization<Float>(scales: [1, 1], zeroPoints: [0], gamma: [1, 1], beta: [0, 0], linears: []) }
        #expect(throws: CkptError.self) { _ = try LayerNormReparameterization<Float>(scales: [1, 0], zeroPoints: [0, 0], gamma: [1, 1], beta: [0, 0], linears: []) }
        #expect(throws: CkptError.self) {
            _ = try LayerNormReparameterization<Float>(scales: [1, 1], zeroPoints: [0, 0], gamma: [1, 1], beta: [0, 0], linears: [.init(weight: [1, 2, 3], bias: nil)])
        }
        #expect(throws: CkptError.self) {
            _ = try LayerNormReparameterization<Float>(scales: [1, 1], zeroPoints: [0, 0], gamma: [1, 1], beta: [0, 0], linears: [.init(weight: [1, 2], bias: [0, 0])])
        }
        #expect(throws: CkptError.self) {
            _ = try LayerNormReparameterization(inputQuantizer: try UniformQuantizer(bits: 4, scale: 1, zeroPoint: 0), gamma: [1], beta: [0], linears: [])
        }
    }
}

/// A small deterministic generator for test data.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func uniform() -> Double { Double(next() >> 11) / Double(1 << 53) }
    mutating func normal() -> Double {
        let u = max(uniform(), 1e-300), v = uniform()
        return (-2 * log(u)).squareRoot() * cos(2 * .pi * v)
    }
}
