import CkptSynthesis
import Testing

@Suite("PatchSimilarityEntropy: PSAQ-ViT's PSE loss")
struct PatchSimilarityEntropyTests {
    static func loss<T: SynthesisFloat>(_ o: [T], tokens: Int, width: Int, heads: Int, weight: T, range: ClosedRange<T>? = nil) -> (T, [T]) {
        var g = [T](repeating: 0, count: o.count)
        let l = o.withUnsafeBufferPointer { src in
            g.withUnsafeMutableBufferPointer {
                PatchSimilarityEntropy.loss(headOutputs: src, tokens: tokens, width: width, heads: heads, weight: weight, addingInto: $0, evaluationRange: range)
            }
        }
        return (l, g)
    }

    @Test("loss and gradient equal the torch reference (points detached), F64 and F32")
    func torch() throws {
        let o = try Reference.doubles("pse_input")
        let (l, g) = Self.loss(o, tokens: 17, width: 8, heads: 2, weight: 1.0)
        let expected = try Reference.scalar("pse_loss")
        #expect(abs(l - expected) < 1e-10)
        let reference = try Reference.doubles("pse_grad")
        #expect(Reference.maxError(g, reference) < 1e-10)
        // The same points as torch's min/max: passing its range changes nothing.
        let range = try Reference.doubles("pse_range")
        #expect(abs(Self.loss(o, tokens: 17, width: 8, heads: 2, weight: 1.0, range: range[0]...range[1]).0 - l) < 1e-12)
        let (lf, gf) = Self.loss(o.map(Float.init), tokens: 17, width: 8, heads: 2, weight: 1)
        let scale = reference.map(abs).max()!
        // F32: S is rounded to ~1e-7 near 1, against a kernel bandwidth of 0.01.
        #expect(abs(Double(lf) - expected) / abs(expected) < 1e-4, "F32 loss \(lf) vs \(expected)")
        let worst = zip(gf, reference).map { abs(Double($0) - $1) }.max()!
        #expect(worst < 1e-3 * scale, "F32 gradient off by \(worst) of \(scale)")
        // The CLS row gets nothing; every head of a column gets the same share.
        #expect(g[0..<8].allSatisfy { $0 == 0 })
        for row in 1..<17 { for k in 0..<4 { #expect(g[row * 8 + k] == g[row * 8 + 4 + k]) } }
    }

    /// Patch rows near one direction, so the similarities sit within a few bandwidths of each other.
    static func clustered(tokens: Int, width: Int, seed: UInt64, spread: Double) -> [Double] {
        let base = Reference.values(width, seed: seed)
        let noise = Reference.values(tokens * width, seed: seed + 1, scale: spread)
        return (0..<(tokens * width)).map { base[$0 % width] + noise[$0] }
    }

    @Test("the weighted gradient equals central differences with the points held fixed (F64)", arguments: [(10, 6, 3, 0.2), (17, 8, 2, 0.12), (5, 4, 1, 0.3)])
    func finiteDifferences(c: (tokens: Int, width: Int, heads: Int, spread: Double)) {
        let o = Self.clustered(tokens: c.tokens, width: c.width, seed: 71, spread: c.spread)
        // The points of the unperturbed input, held fixed as the gradient assumes.
        var lowest = Double.infinity, highest = -Double.infinity
        let hd = c.width / c.heads
        let a = (1..<c.tokens).map { t in (0..<hd).map { k in (0..<c.heads).reduce(0.0) { $0 + o[t * c.width + $1 * hd + k] } / Double(c.heads) } }
        for x in a { for y in a {
            let s = Reference.dot(x, y) / (Reference.dot(x, x) * Reference.dot(y, y)).squareRoot()
            lowest = min(lowest, s)
            highest = max(highest, s)
        } }
        let range = lowest...highest
        let weight = 0.8
        let (_, g) = Self.loss(o, tokens: c.tokens, width: c.width, heads: c.heads, weight: weight, range: range)
        let numerical = Reference.numericalGradient(o, step: 1e-7) { weight * Self.loss($0, tokens: c.tokens, width: c.width, heads: c.heads, weight: 0, range: range).0 }
        let scale = numerical.map(abs).max()!
        #expect(scale > 1e-3)
        #expect(zip(g, numerical).allSatisfy { abs($0 - $1) < 1e-6 * scale }, "max |Δ| \(zip(g, numerical).map { abs($0 - $1) }.max()!) of \(scale)")
    }

    @Test("identical patch rows: S is all ones, the loss is finite and the gradient 0")
    func degenerate() {
        let o = (0..<(5 * 4)).map { Float($0 % 4) + 1 }
        let (l, g) = Self.loss(o, tokens: 5, width: 4, heads: 2, weight: 1)
        #expect(l.isFinite && l == 0)
        #expect(g.allSatisfy { $0 == 0 })
    }
}
