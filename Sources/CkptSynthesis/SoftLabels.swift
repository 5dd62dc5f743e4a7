#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A soft classification target (SARDFQ's Soft-Label learning): `T = softmax(Z)` over C classes, where Z is 0
/// except for a few target classes whose logits are drawn from U(5, 10). With one target at logit 7.5 among 1000
/// classes the target class gets probability 0.64.
public struct SoftLabels: Sendable, Equatable {
    /// One target class and its logit in Z.
    public struct Target: Sendable, Equatable {
        public var label: Int
        public var logit: Double

        public init(label: Int, logit: Double) {
            self.label = label
            self.logit = logit
        }
    }

    /// The number of classes C.
    public let classes: Int
    /// The classes with a non-zero logit in Z (distinct).
    public let targets: [Target]

    /// The range the target logits are drawn from (ε1 = 5, ε2 = 10).
    public static let logitRange: ClosedRange<Double> = 5...10

    public init(classes: Int, targets: [Target]) {
        precondition(classes > 0, "no classes")
        precondition(targets.allSatisfy { (0..<classes).contains($0.label) }, "target class out of range")
        precondition(Set(targets.map(\.label)).count == targets.count, "target classes repeat")
        self.classes = classes
        self.targets = targets
    }

    /// T = softmax(Z), computed in F64 and rounded to `T`.
    public func distribution<F: SynthesisFloat>(as _: F.Type) -> [F] {
        let top = max(0, targets.map(\.logit).max() ?? 0)
        var z = [Double](repeating: exp(-top), count: classes)
        for t in targets { z[t.label] = exp(t.logit - top) }
        let total = z.reduce(0, +)
        return z.map { F($0 / total) }
    }

    /// One image's targets from the stream (seed, image, ``SynthesisRandom/Purpose/labels``, step): `1 + regions`
    /// distinct classes, the first for the whole image and one per MSR region. The whole image's target holds all
    /// of them, each with its own logit ~ U(5, 10) (the image carries every region's semantics); region r's target
    /// holds only its class, with another U(5, 10) draw. Draw them once per image (step 0) to keep them fixed.
    /// A head with fewer than `1 + regions` classes repeats classes (drawn independently) among the regions.
    public static func draw(seed: UInt64, image: Int, classes: Int, regions: Int, step: Int = 0) -> (image: SoftLabels, regions: [SoftLabels]) {
        precondition(regions >= 0 && classes >= 1, "need at least one class")
        var random = SynthesisRandom(seed: seed, image: image, purpose: .labels, step: step)
        let labels = classes >= 1 + regions
            ? random.distinct(1 + regions, in: 0...(classes - 1)) : (0...regions).map { _ in random.int(in: 0...(classes - 1)) }
        let whole = labels.map { Target(label: $0, logit: random.uniform(logitRange.lowerBound, logitRange.upperBound)) }
        let parts = labels.dropFirst().map {
            SoftLabels(classes: classes, targets: [Target(label: $0, logit: random.uniform(logitRange.lowerBound, logitRange.upperBound))])
        }
        return (SoftLabels(classes: classes, targets: whole), parts)
    }

    /// Soft cross-entropy `L = −Σ_c T_c log softmax(z)_c` of `logits` against the distribution `target` (both C
    /// entries), through a stable log-sum-exp. Adds `weight · ∂L/∂z = weight · (ΣT · softmax(z) − T)` into
    /// `gradient` (`softmax(z) − T` when T sums to 1). Returns L (unweighted).
    @inlinable
    public static func crossEntropy<F: SynthesisFloat>(
        logits: UnsafeBufferPointer<F>, target: UnsafeBufferPointer<F>, weight: F, addingInto gradient: UnsafeMutableBufferPointer<F>
    ) -> F {
        precondition(!logits.isEmpty && target.count == logits.count && gradient.count == logits.count, "logits, target and gradient differ in length")
        var top = logits[0]
        for z in logits { top = max(top, z) }
        var sum: F = 0
        for z in logits { sum += F.exp(z - top) }
        let logSumExp = top + F.log(sum)
        var loss: F = 0
        var mass: F = 0
        for c in 0..<logits.count {
            loss += target[c] * (logSumExp - logits[c])
            mass += target[c]
        }
        for c in 0..<logits.count {
            gradient[c] += weight * (mass * F.exp(logits[c] - logSumExp) - target[c])
        }
        return loss
    }

    /// Plain cross-entropy against the one-hot target `label` (PSAQ-ViT's loss): the special case T = e_label of
    /// ``crossEntropy(logits:target:weight:addingInto:)``.
    @inlinable
    public static func crossEntropy<F: SynthesisFloat>(
        logits: UnsafeBufferPointer<F>, label: Int, weight: F, addingInto gradient: UnsafeMutableBufferPointer<F>
    ) -> F {
        precondition((0..<logits.count).contains(label), "label \(label) out of range")
        var oneHot = [F](repeating: 0, count: logits.count)
        oneHot[label] = 1
        return oneHot.withUnsafeBufferPointer { crossEntropy(logits: logits, target: $0, weight: weight, addingInto: gradient) }
    }
}
