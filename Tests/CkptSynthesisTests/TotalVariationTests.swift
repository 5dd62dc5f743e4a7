import CkptSynthesis
import Testing

@Suite("TotalVariation: PSAQ-ViT's four-norm prior")
struct TotalVariationTests {
    static func evaluate<T: SynthesisFloat>(_ x: [T], _ c: Int, _ h: Int, _ w: Int, weight: T) -> (T, [T]) {
        var g = [T](repeating: 0, count: x.count)
        let r = x.withUnsafeBufferPointer { src in
            g.withUnsafeMutableBufferPointer { TotalVariation.valueAndGradient(of: src, channels: c, height: h, width: w, weight: weight, addingInto: $0) }
        }
        return (r, g)
    }

    @Test("value and gradient equal torch autograd")
    func torch() throws {
        let x = try Reference.doubles("tv_image")
        let (r, g) = Self.evaluate(x, 3, 6, 5, weight: 1.0)
        #expect(abs(r - (try Reference.scalar("tv_value"))) < 1e-12)
        #expect(Reference.maxError(g, try Reference.doubles("tv_grad")) < 1e-13)
        #expect(x.withUnsafeBufferPointer { TotalVariation.value(of: $0, channels: 3, height: 6, width: 5) } == r)
        // Float path: the same value to F32 rounding.
        let (rf, gf) = Self.evaluate(x.map(Float.init), 3, 6, 5, weight: 1)
        #expect(abs(Double(rf) - r) / r < 1e-6)
        #expect(Reference.maxError(gf.map(Double.init), g) < 1e-6)
    }

    @Test("the weighted gradient equals central differences (F64)", arguments: [(2, 5, 4), (1, 1, 6), (3, 7, 1), (1, 2, 2)])
    func finiteDifferences(shape: (Int, Int, Int)) {
        let (c, h, w) = shape
        let x = Reference.values(c * h * w, seed: 31, scale: 2)
        let weight = 0.7
        let (_, g) = Self.evaluate(x, c, h, w, weight: weight)
        let numerical = Reference.numericalGradient(x) { p in weight * p.withUnsafeBufferPointer { TotalVariation.value(of: $0, channels: c, height: h, width: w) } }
        #expect(Reference.maxError(g, numerical) < 1e-8)
        #expect(g.contains { $0 != 0 })
    }

    @Test("a flat image has R = 0 and no gradient (not NaN)")
    func flat() {
        let (r, g) = Self.evaluate([Float](repeating: 0.3, count: 3 * 4 * 4), 3, 4, 4, weight: 1)
        #expect(r == 0)
        #expect(g.allSatisfy { $0 == 0 })
    }
}
