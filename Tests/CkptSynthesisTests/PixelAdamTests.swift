import CkptCore
import CkptSynthesis
import Testing

@Suite("PixelAdam, learning-rate schedule and pixel box vs torch.optim.Adam")
struct PixelAdamTests {
    /// Runs the fixture's 5 steps (PSAQ schedule: base 0.2, warm-up 2, round of 5) and compares every step.
    func run(prefix: String, beta1: Double, beta2: Double, box: PixelBox?) throws {
        var pixels = try Reference.floats(prefix + "_init")
        let gradients = try Reference.floats(prefix + "_grads")
        let expected = try Reference.floats(prefix + "_after")
        let rates = try Reference.doubles(prefix + "_rates")
        let count = pixels.count
        let schedule = try LearningRateSchedule(base: 0.2, warmup: 2, total: 5)
        var adam = try PixelAdam(count: count, beta1: beta1, beta2: beta2, epsilon: 1e-8)
        for t in 0..<5 {
            #expect(schedule.rate(at: t) == rates[t])
            let g = Array(gradients[(t * count)..<((t + 1) * count)])
            pixels.withUnsafeMutableBufferPointer { p in
                g.withUnsafeBufferPointer { adam.step(p, gradient: $0, learningRate: schedule.rate(at: t), box: box, planeSize: 16) }
            }
            let want = Array(expected[(t * count)..<((t + 1) * count)])
            let error = Reference.maxError(pixels, want)
            #expect(error <= 2e-7, "step \(t): error \(error)")
        }
        #expect(adam.steps == 5)
    }

    @Test("PSAQ-ViT's betas (0.5, 0.9) with the ImageNet clip after every step")
    func psaq() throws {
        try run(prefix: "adam", beta1: 0.5, beta2: 0.9, box: .imageNet)
    }

    @Test("betas (0.9, 0.999), no clip (torch's other lerp branch)")
    func defaults() throws {
        try run(prefix: "adam_b09", beta1: 0.9, beta2: 0.999, box: nil)
    }

    @Test("PSAQ-ViT's schedule: warm-up to 0.2 over 100 iterations, then a half cosine over 400")
    func schedule() throws {
        let s = try LearningRateSchedule(base: 0.2, warmup: 100, total: 500)
        #expect(abs(s.rate(at: 0) - 0.002) < 1e-15)
        #expect(abs(s.rate(at: 99) - 0.2) < 1e-15)
        #expect(abs(s.rate(at: 100) - 0.2) < 1e-15)
        #expect(abs(s.rate(at: 300) - 0.1) < 1e-15)
        #expect(s.rate(at: 499) > 0 && s.rate(at: 499) < 1e-5)
        #expect(throws: CkptError.self) { try LearningRateSchedule(base: 0.2, warmup: 5, total: 5) }
        #expect(throws: CkptError.self) { try LearningRateSchedule(base: -1, warmup: 0, total: 5) }
        #expect(throws: CkptError.self) { try PixelAdam(count: 4, beta1: 1) }
    }

    @Test("the box is (0 − mean)/std … (1 − mean)/std per channel, and clamping keeps other values")
    func box() throws {
        let b = PixelBox.imageNet
        #expect(b.lower == [Float(-0.485 / 0.229), Float(-0.456 / 0.224), Float(-0.406 / 0.225)])
        #expect(b.upper == [Float(0.515 / 0.229), Float(0.544 / 0.224), Float(0.594 / 0.225)])
        #expect(PixelBox.inception.lower == [-1, -1, -1] && PixelBox.inception.upper == [1, 1, 1])
        var pixels: [Float] = [-9, 0.5, 9, -9, 0.5, 9, -9, 0.5, 9, -9, 0.5, 9, -9, 0.5, 9, -9, 0.5, 9]  // 2 images, 3 planes of 3
        pixels.withUnsafeMutableBufferPointer { b.clamp($0, planeSize: 3) }
        for plane in 0..<6 {
            #expect(pixels[plane * 3] == b.lower[plane % 3] && pixels[plane * 3 + 1] == 0.5 && pixels[plane * 3 + 2] == b.upper[plane % 3])
        }
        #expect(throws: CkptError.self) { try PixelBox(mean: [0.5], std: [0]) }
    }

    @Test("one optimiser over two images equals one per image")
    func perImage() throws {
        let a = Reference.values(48, seed: 1, scale: 2).map(Float.init), b = Reference.values(48, seed: 2, scale: 2).map(Float.init)
        let ga = Reference.values(48, seed: 3).map(Float.init), gb = Reference.values(48, seed: 4).map(Float.init)
        var both = a + b
        var oneA = a, oneB = b
        var adamBoth = try PixelAdam(count: 96), adamA = try PixelAdam(count: 48), adamB = try PixelAdam(count: 48)
        for _ in 0..<3 {
            both.withUnsafeMutableBufferPointer { p in (ga + gb).withUnsafeBufferPointer { adamBoth.step(p, gradient: $0, learningRate: 0.2, box: .imageNet, planeSize: 16) } }
            oneA.withUnsafeMutableBufferPointer { p in ga.withUnsafeBufferPointer { adamA.step(p, gradient: $0, learningRate: 0.2, box: .imageNet, planeSize: 16) } }
            oneB.withUnsafeMutableBufferPointer { p in gb.withUnsafeBufferPointer { adamB.step(p, gradient: $0, learningRate: 0.2, box: .imageNet, planeSize: 16) } }
        }
        #expect(both == oneA + oneB)
        #expect(both != a + b)
    }
}
