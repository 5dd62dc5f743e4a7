import CkptCore
import CkptFormats
@testable import CkptQuant
import Testing

/// GPTQ against llm-compressor 0.14.0.1's `quantize_weight` (fixtures/quant/reference.npz), and the properties that
/// make it GPTQ: no Gram information gives plain rounding, and a correlated Gram gives a smaller output error.
@Suite("GPTQ error compensation")
struct GPTQTests {
    static let rows = QuantizerTests.rows, cols = QuantizerTests.cols
    static let weights = QuantizerTests.weights
    static let gram = try! QuantizerTests.floats("gptq_gram")

    /// Codes, stored parameters and the dequantized values of `weights` under GPTQ.
    static func run(_ gptq: GPTQ, _ settings: QuantizationSettings, source: GPTQ.ParameterSource = .updatedWeights)
        -> (codes: [UInt8], scales: [Float], offsets: [Float], values: [Float]) {
        let groupSize = settings.groupSize ?? cols
        let groups = cols / groupSize
        var codes = [UInt8](repeating: 0, count: rows * cols)
        var scales = [Float](repeating: 0, count: rows * groups), offsets = scales
        weights.withUnsafeBufferPointer { w in
            gptq.quantize(w.baseAddress!, rows: rows, settings: settings, source: source,
                          codes: &codes, scales: &scales, offsets: &offsets)
        }
        let quantizer = GroupQuantizer(settings)
        let values = (0..<rows * cols).map { k in
            let g = (k / cols) * groups + (k % cols) / groupSize
            return quantizer.value(Float(codes[k]), GroupParameters(scale: scales[g], offset: offsets[g]))
        }
        return (codes, scales, offsets, values)
    }

    /// Σ_rows (w − ŵ)ᵀ H (w − ŵ): the squared output error over the inputs H was formed from.
    static func outputError(_ values: [Float]) -> Double {
        var total = 0.0
        for r in 0..<rows {
            let d = (0..<cols).map { Double(weights[r * cols + $0] - values[r * cols + $0]) }
            for i in 0..<cols {
                var s = 0.0
                for j in 0..<cols { s += Double(gram[i * cols + j]) * d[j] }
                total += d[i] * s
            }
        }
        return total
    }

    static let gridCases: [(QuantMethod, QuantGrid, Int?)] = [
        (.rtn, .mlxAffine, 32), (.mse, .mlxAffine, 64), (.hqq, .mlxAffine, 128), (.rtn, .integerZeroPoint, 32),
        (.hqq, .integerZeroPoint, nil), (.rtn, .symmetric, nil), (.hqq, .symmetric, 32),
    ]

    @Test("a Gram matrix without correlations leaves every error in its column: plain rounding, code for code",
          arguments: gridCases)
    func identityGramIsPlainRounding(_ c: (QuantMethod, QuantGrid, Int?)) throws {
        let settings = QuantizationSettings(bits: 4, groupSize: c.2, method: c.0, grid: c.1)
        var identity = [Float](repeating: 0, count: Self.cols * Self.cols)
        for j in 0..<Self.cols { identity[j * Self.cols + j] = 2.5 }
        let gptq = try GPTQ(gram: identity, size: Self.cols, tensor: "w", path: "test")
        let plain = QuantizerTests.quantize(settings)
        var decoded = [Float](repeating: 0, count: Self.rows * Self.cols)
        plain.dequantize(into: &decoded)
        let result = Self.run(gptq, settings)
        #expect(result.scales == plain.scales)
        #expect(result.offsets == plain.offsets)
        #expect(result.values == decoded)
    }

    static let referenceCases: [(bits: Int, symmetric: Bool, group: Int?)] = [(4, false, 32), (4, true, 32), (3, false, nil)]

    @Test("with the observer's parameters, GPTQ gives llm-compressor's quantize_weight values", arguments: referenceCases)
    func matchesLLMCompressor(_ c: (bits: Int, symmetric: Bool, group: Int?)) throws {
        let settings = QuantizationSettings(bits: c.bits, groupSize: c.group, method: .rtn, grid: c.symmetric ? .symmetric : .integerZeroPoint)
        let reference = try QuantizerTests.floats("gptq_b\(c.bits)_\(c.symmetric ? "sym" : "asym")_\(c.group == nil ? "channel" : "g32")")
        let gptq = try GPTQ(gram: Self.gram, size: Self.cols, tensor: "w", path: "test")
        let ours = Self.run(gptq, settings, source: .originalWeights)
        // The factor is computed in F64 here and in F32 there, so a weight within rounding noise of a decision
        // boundary may take the other code, and the rest of its row then differs slightly: most values are equal
        // and the output error is the same to within a percent.
        let equal = zip(ours.values, reference).filter { $0 == $1 }.count
        #expect(Double(equal) >= 0.95 * Double(reference.count), "\(equal) of \(reference.count) values equal")
        let (a, b) = (Self.outputError(ours.values), Self.outputError(reference))
        #expect(abs(a - b) <= 0.01 * b, "output error \(a) vs llm-compressor \(b)")
        // And both are far below plain rounding's.
        var plain = [Float](repeating: 0, count: Self.rows * Self.cols)
        QuantizerTests.quantize(settings).dequantize(into: &plain)
        #expect(a < 0.9 * Self.outputError(plain))
    }

    static let actOrderCases: [(bits: Int, group: Int?)] = [(4, 32), (3, nil)]

    @Test("act-order with the observer's parameters gives llm-compressor's actorder=\"weight\" values", arguments: actOrderCases)
    func matchesLLMCompressorActOrder(_ c: (bits: Int, group: Int?)) throws {
        let settings = QuantizationSettings(bits: c.bits, groupSize: c.group, method: .rtn, grid: .integerZeroPoint)
        let reference = try QuantizerTests.floats("gptq_b\(c.bits)_asym_\(c.group == nil ? "channel" : "g32")_actorder")
        let gptq = try GPTQ(gram: Self.gram, size: Self.cols, actOrder: true, tensor: "w", path: "test")
        #expect(gptq.actOrder)
        let ours = Self.run(gptq, settings, source: .originalWeights)
        // The column visited first (the largest input) is rounded before any update: equal code for code.
        let first = (0..<Self.cols).max { Self.gram[$0 * Self.cols + $0] < Self.gram[$1 * Self.cols + $1] }!
        #expect((0..<Self.rows).allSatisfy { ours.values[$0 * Self.cols + first] == reference[$0 * Self.cols + first] })
        let (a, b) = (Self.outputError(ours.values), Self.outputError(reference))
        #expect(abs(a - b) <= 0.01 * b, "output error \(a) vs llm-compressor \(b)")
        // And it is another rounding than the plain column order's (about 5 % apart in output error here).
        let plain = Self.outputError(Self.run(try GPTQ(gram: Self.gram, size: Self.cols, tensor: "w", path: "test"), settings, source: .originalWeights).values)
        #expect(abs(a - plain) > 0.02 * plain, "act-order \(a) vs plain order \(plain)")
    }

    @Test("parameters from the updated weights (the default) beat plain rounding on every method", arguments: [QuantMethod.rtn, .mse, .hqq])
    func reducesOutputError(method: QuantMethod) throws {
        let settings = QuantizationSettings(bits: 4, groupSize: 32, method: method, grid: .mlxAffine)
        let gptq = try GPTQ(gram: Self.gram, size: Self.cols, tensor: "w", path: "test")
        var plain = [Float](repeating: 0, count: Self.rows * Self.cols)
        QuantizerTests.quantize(settings).dequantize(into: &plain)
        let (compensated, rounded) = (Self.outputError(Self.run(gptq, settings).values), Self.outputError(plain))
        #expect(compensated < 0.9 * rounded, "GPTQ \(compensated) vs plain \(rounded)")
    }

    @Test("a Gram matrix that is not positive definite is an error naming the tensor")
    func rejectsIndefiniteGram() {
        var gram = [Float](repeating: 0, count: 4)
        gram[0] = 1; gram[3] = -50  // diagonal 1 and −50: no damping of 1 % of the mean makes it definite
        #expect(throws: CkptError.self) { try GPTQ(gram: gram, size: 2, tensor: "blocks.0.mlp.fc1.weight", path: "model") }
        do { _ = try GPTQ(gram: gram, size: 2, tensor: "blocks.0.mlp.fc1.weight", path: "model") } catch {
            #expect(error.tensor == "blocks.0.mlp.fc1.weight")
        }
    }
}
