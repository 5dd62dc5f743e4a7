@testable import CkptSynthesis
import Testing

@Suite("SynthesisRandom: counter-based streams")
struct SynthesisRandomTests {
    @Test("the generator core is SplitMix64 (first outputs from state 0)")
    func splitMix64() {
        var random = SynthesisRandom(seed: 0, image: 0, purpose: .initialNoise)
        random.state = 0
        #expect(random.next() == 0xE220_A839_7B1D_CDAF)
        #expect(random.next() == 0x6E78_9E6A_A1B9_65F4)
    }

    /// What image `image` draws in a run, for every kind of draw a synthesis makes.
    static func draws(seed: UInt64, image: Int) -> [Double] {
        var out: [Double] = []
        var noise = [Float](repeating: 0, count: 7)
        var random = SynthesisRandom(seed: seed, image: image, purpose: .initialNoise)
        noise.withUnsafeMutableBufferPointer { random.fillNormal($0) }
        out += noise.map(Double.init)
        for step in [0, 1, 499] {
            let a = Augmentation.random(seed: seed, image: image, step: step, limit: 30)
            out += [Double(a.dy), Double(a.dx), a.flip ? 1 : 0]
            out += RegionCrop.randomCells(seed: seed, image: image, step: step).map(Double.init)
        }
        let prior = AttentionPrior.random(seed: seed, image: image, block: 7, head: 2, grid: 14)
        out += prior.probabilities
        let labels = SoftLabels.draw(seed: seed, image: image, classes: 1000, regions: 4)
        out += labels.image.targets.flatMap { [Double($0.label), $0.logit] }
        return out
    }

    @Test("image k draws the same alone, among other images, and in any order (sharding)")
    func shardIndependence() {
        let seed: UInt64 = 0xC0FFEE
        let alone = Self.draws(seed: seed, image: 5)
        // A full run of 8 images, interleaving other purposes between them, and a shard 4..<8 in reverse order.
        var full: [[Double]] = []
        for image in 0..<8 {
            var other = SynthesisRandom(seed: seed, image: image, purpose: .labels, step: 3)
            _ = other.next()
            full.append(Self.draws(seed: seed, image: image))
        }
        let shard = (4..<8).reversed().map { Self.draws(seed: seed, image: $0) }
        #expect(full[5] == alone)
        #expect(shard[2] == alone)
        #expect(full[4] != alone)
        #expect(Self.draws(seed: seed + 1, image: 5) != alone)
    }

    @Test("every part of the key changes the stream")
    func keyParts() {
        func first(_ r: SynthesisRandom) -> UInt64 { var r = r; return r.next() }
        let base = first(SynthesisRandom(seed: 1, image: 2, purpose: .regions, step: 3, index: 4))
        let variants = [
            first(SynthesisRandom(seed: 2, image: 2, purpose: .regions, step: 3, index: 4)),
            first(SynthesisRandom(seed: 1, image: 3, purpose: .regions, step: 3, index: 4)),
            first(SynthesisRandom(seed: 1, image: 2, purpose: .labels, step: 3, index: 4)),
            first(SynthesisRandom(seed: 1, image: 2, purpose: .regions, step: 4, index: 4)),
            first(SynthesisRandom(seed: 1, image: 2, purpose: .regions, step: 3, index: 5)),
            first(SynthesisRandom(seed: 1, image: -2, purpose: .regions, step: 3, index: 4)),
        ]
        #expect(Set(variants + [base]).count == 7)
        #expect(first(SynthesisRandom(seed: 1, image: 2, purpose: .regions, step: 3, index: 4)) == base)
    }

    @Test("uniform draws lie in the open interval (0, 1) with mean ½")
    func uniform() {
        var random = SynthesisRandom(seed: 9, image: 0, purpose: .initialNoise)
        let n = 200_000
        var low = 1.0, high = 0.0, sum = 0.0
        for _ in 0..<n {
            let u = random.uniform()
            low = min(low, u)
            high = max(high, u)
            sum += u
        }
        #expect(low > 0 && high < 1)
        #expect(abs(sum / Double(n) - 0.5) < 0.003)
    }

    @Test("integers cover a closed range evenly", arguments: [-3...3, 1...5, 7...7, -30...30])
    func integers(range: ClosedRange<Int>) {
        var random = SynthesisRandom(seed: 11, image: 4, purpose: .augmentation)
        var counts = [Int: Int]()
        let n = 20_000 * range.count
        for _ in 0..<n { counts[random.int(in: range), default: 0] += 1 }
        #expect(Set(counts.keys) == Set(range))
        // Every value within 6 standard deviations of n/k.
        let expected = Double(n) / Double(range.count)
        let sd = (expected * (1 - 1 / Double(range.count))).squareRoot()
        #expect(counts.values.allSatisfy { abs(Double($0) - expected) <= 6 * sd + 1e-9 })
    }

    @Test("normal draws have mean 0 and variance 1 (single and buffered)")
    func normal() {
        var random = SynthesisRandom(seed: 5, image: 1, purpose: .initialNoise)
        let n = 100_000
        var single = [Double](repeating: 0, count: n)
        for i in 0..<n { single[i] = random.normal() }
        var buffered = [Double](repeating: 0, count: n + 1)  // odd length: the last value from the cosine branch alone
        buffered.withUnsafeMutableBufferPointer { random.fillNormal($0) }
        for values in [single, buffered] {
            let mean = values.reduce(0, +) / Double(values.count)
            let variance = values.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(values.count)
            #expect(abs(mean) < 0.015)
            #expect(abs(variance - 1) < 0.02)
            // Fourth moment 3: Box–Muller gives Gaussian tails, not a uniform's.
            let kurtosis = values.reduce(0) { $0 + pow4($1 - mean) } / Double(values.count) / (variance * variance)
            #expect(abs(kurtosis - 3) < 0.1)
        }
    }

    func pow4(_ x: Double) -> Double { x * x * x * x }

    @Test("Dirichlet(1) weights are positive, sum to 1 and average 1/k")
    func dirichlet() {
        var random = SynthesisRandom(seed: 2, image: 0, purpose: .attentionPrior)
        let k = 4, n = 20_000
        var means = [Double](repeating: 0, count: k)
        for _ in 0..<n {
            let w = random.dirichlet(count: k)
            #expect(w.count == k)
            #expect(w.allSatisfy { $0 > 0 })
            #expect(abs(w.reduce(0, +) - 1) < 1e-12)
            for i in 0..<k { means[i] += w[i] / Double(n) }
        }
        #expect(means.allSatisfy { abs($0 - 0.25) < 0.01 })
        #expect(random.dirichlet(count: 1) == [1])
    }

    @Test("distinct draws are distinct, in range, and reach every value")
    func distinct() {
        var random = SynthesisRandom(seed: 3, image: 0, purpose: .labels)
        var seen = Set<Int>()
        for _ in 0..<200 {
            let d = random.distinct(5, in: 10...19)
            #expect(d.count == 5 && Set(d).count == 5 && d.allSatisfy { (10...19).contains($0) })
            seen.formUnion(d)
        }
        #expect(seen == Set(10...19))
        #expect(Set(random.distinct(10, in: 10...19)) == Set(10...19))
    }
}
