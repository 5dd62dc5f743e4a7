import CkptSynthesis
import Testing

@Suite("Augmentation: jitter + flip and its adjoint")
struct AugmentationTests {
    @Test("apply equals torch.roll then torch.flip")
    func torchRollFlip() throws {
        let image = try Reference.doubles("augment_image")
        let cases = try Reference.doubles("augment_cases")
        for i in 0..<(cases.count / 3) {
            let a = Augmentation(dy: Int(cases[3 * i]), dx: Int(cases[3 * i + 1]), flip: cases[3 * i + 2] != 0)
            var out = [Double](repeating: .nan, count: image.count)
            image.withUnsafeBufferPointer { src in out.withUnsafeMutableBufferPointer { a.apply(src, into: $0, channels: 3, height: 5, width: 7) } }
            #expect(out == (try Reference.doubles("augment_\(i)")), "case \(a)")
            // Float path: the same permutation.
            let f = image.map(Float.init)
            var outF = [Float](repeating: .nan, count: f.count)
            f.withUnsafeBufferPointer { src in outF.withUnsafeMutableBufferPointer { a.apply(src, into: $0, channels: 3, height: 5, width: 7) } }
            #expect(outF == out.map(Float.init))
        }
    }

    static let cases = [Augmentation(dy: 2, dx: -3, flip: true), Augmentation(dy: -13, dx: 9, flip: false), .none, Augmentation(dy: 4, dx: 4, flip: true)]

    @Test("adjoint: ⟨A x, y⟩ = ⟨x, Aᵀ y⟩, and central differences of ⟨A x, y⟩ give Aᵀ y", arguments: cases)
    func adjoint(a: Augmentation) {
        let (c, h, w) = (2, 6, 5)
        let x = Reference.values(c * h * w, seed: 21), y = Reference.values(c * h * w, seed: 22)
        func forward(_ x: [Double]) -> [Double] {
            var out = [Double](repeating: 0, count: x.count)
            x.withUnsafeBufferPointer { src in out.withUnsafeMutableBufferPointer { a.apply(src, into: $0, channels: c, height: h, width: w) } }
            return out
        }
        var back = [Double](repeating: 0.25, count: x.count)  // adds into what is there
        y.withUnsafeBufferPointer { g in back.withUnsafeMutableBufferPointer { a.addAdjoint(g, into: $0, channels: c, height: h, width: w) } }
        let transposed = back.map { $0 - 0.25 }
        #expect(abs(Reference.dot(forward(x), y) - Reference.dot(x, transposed)) < 1e-12)
        let numerical = Reference.numericalGradient(x, step: 0.5) { Reference.dot(forward($0), y) }  // linear: exact but for rounding
        #expect(Reference.maxError(numerical, transposed) < 1e-13)
        // A permutation: the adjoint undoes it.
        var undone = [Double](repeating: 0, count: x.count)
        forward(x).withUnsafeBufferPointer { g in undone.withUnsafeMutableBufferPointer { a.addAdjoint(g, into: $0, channels: c, height: h, width: w) } }
        #expect(undone == x)
    }

    @Test("random draws: one offset for both axes within the limit, flips both ways, reproducible")
    func random() {
        var offsets = Set<Int>(), flips = Set<Bool>()
        for step in 0..<400 {
            let a = Augmentation.random(seed: 7, image: 3, step: step, limit: 15)
            #expect(a.dy == a.dx && abs(a.dy) <= 15)
            #expect(a == Augmentation.random(seed: 7, image: 3, step: step, limit: 15))
            offsets.insert(a.dy)
            flips.insert(a.flip)
        }
        #expect(offsets == Set(-15...15))
        #expect(flips == [true, false])
    }
}
