import CkptSynthesis
import Testing

@Suite("SoftLabels: soft targets and cross-entropy")
struct SoftLabelsTests {
    static func crossEntropy<T: SynthesisFloat>(_ z: [T], _ target: [T], weight: T) -> (T, [T]) {
        var g = [T](repeating: 0, count: z.count)
        let l = z.withUnsafeBufferPointer { zz in
            target.withUnsafeBufferPointer { t in g.withUnsafeMutableBufferPointer { SoftLabels.crossEntropy(logits: zz, target: t, weight: weight, addingInto: $0) } }
        }
        return (l, g)
    }

    static let fixtureLabels = SoftLabels(classes: 10, targets: [.init(label: 3, logit: 7.25), .init(label: 8, logit: 5.5)])

    @Test("the target is torch.softmax(Z)")
    func distribution() throws {
        #expect(Reference.maxError(Self.fixtureLabels.distribution(as: Double.self), try Reference.doubles("sce_target")) < 1e-15)
        // The reference notes' confidence figures: one target at 7.5 among 1000 classes gets 0.644.
        let one = SoftLabels(classes: 1000, targets: [.init(label: 17, logit: 7.5)]).distribution(as: Double.self)
        #expect(abs(one[17] - 0.644) < 5e-4)
    }

    @Test("soft and one-hot cross-entropy equal torch (log_softmax, F.cross_entropy) with autograd gradients")
    func torch() throws {
        let z = try Reference.doubles("sce_logits")
        let target = Self.fixtureLabels.distribution(as: Double.self)
        let (l, g) = Self.crossEntropy(z, target, weight: 1.0)
        #expect(abs(l - (try Reference.scalar("sce_loss"))) < 1e-13)
        #expect(Reference.maxError(g, try Reference.doubles("sce_grad")) < 1e-15)
        var oneHot = [Double](repeating: 0, count: z.count)
        let ce = z.withUnsafeBufferPointer { zz in oneHot.withUnsafeMutableBufferPointer { SoftLabels.crossEntropy(logits: zz, label: 6, weight: 1, addingInto: $0) } }
        #expect(abs(ce - (try Reference.scalar("ce_loss"))) < 1e-13)
        #expect(Reference.maxError(oneHot, try Reference.doubles("ce_grad")) < 1e-15)
        let (lf, gf) = Self.crossEntropy(z.map(Float.init), target.map(Float.init), weight: 1)
        #expect(abs(Double(lf) - l) / l < 1e-5)
        #expect(Reference.maxError(gf.map(Double.init), g) < 1e-6)
    }

    @Test("the weighted gradient equals central differences (F64)")
    func finiteDifferences() {
        let z = Reference.values(12, seed: 51, scale: 4)
        let target = SoftLabels(classes: 12, targets: [.init(label: 0, logit: 6), .init(label: 7, logit: 9.5), .init(label: 11, logit: 5)]).distribution(as: Double.self)
        let (_, g) = Self.crossEntropy(z, target, weight: 0.6)
        let numerical = Reference.numericalGradient(z) { 0.6 * Self.crossEntropy($0, target, weight: 0).0 }
        #expect(Reference.maxError(g, numerical) < 1e-9)
    }

    @Test("large logits stay finite (log-sum-exp)")
    func stable() {
        let (l, g) = Self.crossEntropy([Float(1000), -1000, 0, 88], [0, 0.5, 0.5, 0], weight: 1)
        #expect(l.isFinite && g.allSatisfy(\.isFinite))
        #expect(abs(l - 1500) < 1e-3)
    }

    @Test("drawn targets: distinct classes, logits in U(5, 10), the image target holds every region class")
    func draw() {
        var sizes = Set<Int>()
        for image in 0..<50 {
            let (whole, regions) = SoftLabels.draw(seed: 4, image: image, classes: 1000, regions: 4)
            #expect(whole.targets.count == 5 && regions.count == 4)
            #expect(Set(whole.targets.map(\.label)).count == 5)
            #expect(whole.targets.allSatisfy { (0..<1000).contains($0.label) && (5...10).contains($0.logit) })
            for (r, region) in regions.enumerated() {
                #expect(region.targets.count == 1 && region.targets[0].label == whole.targets[1 + r].label)
                #expect((5...10).contains(region.targets[0].logit) && region.targets[0].logit != whole.targets[1 + r].logit)
            }
            let t = whole.distribution(as: Double.self)
            #expect(abs(t.reduce(0, +) - 1) < 1e-12)
            let (again, _) = SoftLabels.draw(seed: 4, image: image, classes: 1000, regions: 4)
            #expect(again == whole)
            sizes.insert(whole.targets[0].label)
        }
        #expect(sizes.count > 40)
        let (single, none) = SoftLabels.draw(seed: 4, image: 0, classes: 3, regions: 0)
        #expect(single.targets.count == 1 && none.isEmpty)
    }
}
