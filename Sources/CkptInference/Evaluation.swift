import CkptCore

/// Classification metrics over logits, and the agreement between a model and a reference model — the figures
/// every compression report quotes.
public struct Evaluation: Sendable {
    public let count: Int
    public let classes: Int
    public let predictions: [Int]
    public let correct: Int
    /// confusion[true][predicted]
    public let confusion: [[Int]]
    public var accuracy: Double { count == 0 ? 0 : Double(correct) / Double(count) }

    /// `labels` must lie in 0..<classes.
    public init(logits: [Float], labels: [Int], classes: Int, source: String) throws(CkptError) {
        precondition(logits.count == labels.count * classes)
        guard !labels.isEmpty else {
            throw CkptError(.invalidData, "no images to evaluate: an accuracy of 0 of 0 images means nothing", path: source)
        }
        try MemoryBudget.require(
            try CheckedSize.product([classes, classes, MemoryLayout<Int>.stride], "confusion matrix"),
            for: "the \(classes) × \(classes) confusion matrix", path: source)
        count = labels.count
        self.classes = classes
        var confusion = [[Int]](repeating: [Int](repeating: 0, count: classes), count: classes)
        var predictions: [Int] = []
        predictions.reserveCapacity(count)
        var correct = 0
        for (i, label) in labels.enumerated() {
            guard label >= 0, label < classes else {
                throw CkptError(.invalidData, "label \(label) of image \(i) is outside the head's \(classes) classes", path: source, tensor: "labels")
            }
            let p = Self.argmax(logits, row: i, width: classes)
            predictions.append(p)
            confusion[label][p] += 1
            if p == label { correct += 1 }
        }
        self.predictions = predictions
        self.correct = correct
        self.confusion = confusion
    }

    /// Index of the largest logit (the first on ties, as numpy's argmax).
    public static func argmax(_ logits: [Float], row: Int, width: Int) -> Int {
        var best = 0
        for j in 1..<max(width, 1) where logits[row * width + j] > logits[row * width + best] { best = j }
        return best
    }

    /// The k largest logits of one row, best first.
    public static func topK(_ logits: [Float], row: Int, width: Int, k: Int) -> [(index: Int, logit: Float, probability: Double)] {
        let values = Array(logits[(row * width)..<((row + 1) * width)])
        let logProbabilities = ReferenceComparison.logSoftmax(logits, row: row, width: width)
        return values.enumerated().sorted { $0.element > $1.element || ($0.element == $1.element && $0.offset < $1.offset) }
            .prefix(k).map { ($0.offset, $0.element, exp(logProbabilities[$0.offset])) }
    }
}

/// How closely a model follows a reference model on the same images.
public struct ReferenceComparison: Sendable {
    public let count: Int
    /// Images whose top-1 class is the same under both models.
    public let agreeing: Int
    public var agreement: Double { count == 0 ? 0 : Double(agreeing) / Double(count) }
    /// KL(p_reference ‖ p_model) of the softmax distributions, mean and max over images (nats).
    public let meanKL: Double
    public let maxKL: Double
    /// Cosine similarity of the final-norm CLS features, mean and min over images.
    public let meanCosine: Double
    public let minCosine: Double

    public init(logits: [Float], referenceLogits: [Float], features: [Float], referenceFeatures: [Float], count: Int, classes: Int, dim: Int) {
        self.count = count
        var agreeing = 0
        var klSum = 0.0, klMax = 0.0, cosSum = 0.0, cosMin = Double.infinity
        for i in 0..<count {
            if Evaluation.argmax(logits, row: i, width: classes) == Evaluation.argmax(referenceLogits, row: i, width: classes) { agreeing += 1 }
            let p = Self.logSoftmax(referenceLogits, row: i, width: classes)
            let q = Self.logSoftmax(logits, row: i, width: classes)
            var kl = 0.0
            for j in 0..<classes { kl += exp(p[j]) * (p[j] - q[j]) }
            kl = max(kl, 0)
            klSum += kl
            klMax = max(klMax, kl)
            var dot = 0.0, a2 = 0.0, b2 = 0.0
            for j in 0..<dim {
                let a = Double(features[i * dim + j]), b = Double(referenceFeatures[i * dim + j])
                dot += a * b
                a2 += a * a
                b2 += b * b
            }
            let cosine = a2 > 0 && b2 > 0 ? dot / (a2.squareRoot() * b2.squareRoot()) : (a2 == b2 ? 1 : 0)
            cosSum += cosine
            cosMin = min(cosMin, cosine)
        }
        self.agreeing = agreeing
        meanKL = count == 0 ? 0 : klSum / Double(count)
        maxKL = klMax
        meanCosine = count == 0 ? 0 : cosSum / Double(count)
        minCosine = count == 0 ? 0 : cosMin
    }

    static func logSoftmax(_ logits: [Float], row: Int, width: Int) -> [Double] {
        let values = (0..<width).map { Double(logits[row * width + $0]) }
        let maximum = values.max() ?? 0
        let logSum = log(values.reduce(0.0) { $0 + exp($1 - maximum) }) + maximum
        return values.map { $0 - logSum }
    }
}

#if canImport(Glibc)
import Glibc
#endif
