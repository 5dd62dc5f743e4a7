import CkptSynthesis
import Testing

@Suite("AttentionPrior: Gaussian-mixture priors and the APA loss")
struct AttentionPriorTests {
    static func loss<T: SynthesisFloat>(_ row: [T], _ prior: [T], weight: T) -> (T, [T]) {
        var g = [T](repeating: 0, count: row.count)
        let l = row.withUnsafeBufferPointer { r in
            prior.withUnsafeBufferPointer { p in g.withUnsafeMutableBufferPointer { AttentionPrior.loss(attentionRow: r, prior: p, weight: weight, addingInto: $0) } }
        }
        return (l, g)
    }

    static func fixturePrior() throws -> AttentionPrior {
        let c = try Reference.doubles("apa_components")
        let components = (0..<(c.count / 4)).map { AttentionPrior.Component(row: c[4 * $0], column: c[4 * $0 + 1], sigma: c[4 * $0 + 2], weight: c[4 * $0 + 3]) }
        return AttentionPrior(grid: 4, components: components)
    }

    @Test("the mixture equals numpy's evaluation of the same components")
    func mixture() throws {
        let prior = try Self.fixturePrior()
        #expect(Reference.maxError(prior.probabilities, try Reference.doubles("apa_prior")) < 1e-15)
    }

    @Test("loss and gradient equal torch autograd (CLS→CLS entry 0)")
    func torch() throws {
        let row = try Reference.doubles("apa_row")
        let prior = try Self.fixturePrior().probabilities
        let (l, g) = Self.loss(row, prior, weight: 1.0)
        #expect(abs(l - (try Reference.scalar("apa_loss"))) < 1e-16)
        #expect(Reference.maxError(g, try Reference.doubles("apa_grad")) < 1e-14)
        #expect(g[0] == 0)
        let (lf, gf) = Self.loss(row.map(Float.init), prior.map(Float.init), weight: 1)
        #expect(abs(Double(lf) - l) / l < 1e-5)
        #expect(Reference.maxError(gf.map(Double.init), g) < 1e-6)
    }

    @Test("the weighted gradient equals central differences (F64), unnormalised rows included")
    func finiteDifferences() {
        let grid = 3
        let row = Reference.values(grid * grid + 1, seed: 41).map { 0.2 + abs($0) }  // positive, sum ≠ 1
        let prior = AttentionPrior.random(seed: 1, image: 0, block: 0, head: 0, grid: grid).probabilities
        let weight = 1.3
        var g = [Double](repeating: 0.5, count: row.count)  // adds into what is there
        _ = row.withUnsafeBufferPointer { r in
            prior.withUnsafeBufferPointer { p in g.withUnsafeMutableBufferPointer { AttentionPrior.loss(attentionRow: r, prior: p, weight: weight, addingInto: $0) } }
        }
        let numerical = Reference.numericalGradient(row) { weight * Self.loss($0, prior, weight: 0).0 }
        #expect(Reference.maxError(g.map { $0 - 0.5 }, numerical) < 1e-9)
        #expect(abs(numerical[0]) < 1e-9)
    }

    @Test("random priors: 1…5 components inside the grid, σ in [1, 4]·g/14, weights and prior sum to 1")
    func random() {
        var counts = Set<Int>()
        for image in 0..<40 {
            for (block, head) in [(6, 0), (11, 5)] {
                let p = AttentionPrior.random(seed: 99, image: image, block: block, head: head, grid: 14)
                counts.insert(p.components.count)
                #expect((1...5).contains(p.components.count))
                #expect(p.components.allSatisfy { (0...13).contains($0.row) && (0...13).contains($0.column) && (1...4).contains($0.sigma) })
                #expect(abs(p.components.reduce(0) { $0 + $1.weight } - 1) < 1e-12)
                #expect(p.probabilities.count == 196 && p.probabilities.allSatisfy { $0 > 0 })
                #expect(abs(p.probabilities.reduce(0, +) - 1) < 1e-12)
                #expect(p == AttentionPrior.random(seed: 99, image: image, block: block, head: head, grid: 14))
            }
        }
        #expect(counts == Set(1...5))
        let small = AttentionPrior.random(seed: 99, image: 0, block: 0, head: 0, grid: 7)
        #expect(small.components.allSatisfy { (0.5...2).contains($0.sigma) })
        #expect(AttentionPrior.random(seed: 99, image: 0, block: 0, head: 1, grid: 14) != AttentionPrior.random(seed: 99, image: 0, block: 0, head: 0, grid: 14))
        #expect(AttentionPrior.random(seed: 99, image: 0, block: 1, head: 0, grid: 14) != AttentionPrior.random(seed: 99, image: 0, block: 0, head: 0, grid: 14))
    }

    @Test("SARDFQ block weights: l/L on the deeper half (2l ≥ L), 0 before")
    func blockWeights() {
        let w12 = AttentionPrior.blockWeights(blocks: 12)
        let expected12: [Double] = (1...12).map { $0 >= 6 ? Double($0) / 12 : 0 }
        #expect(w12 == expected12 && w12[4] == 0 && w12[5] == 0.5 && w12[11] == 1)
        let expected5: [Double] = [0, 0, 0.6, 0.8, 1]
        #expect(AttentionPrior.blockWeights(blocks: 5) == expected5)
        #expect(AttentionPrior.blockWeights(blocks: 1) == [1])
    }
}
