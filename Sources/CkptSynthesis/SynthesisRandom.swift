#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A counter-based deterministic random stream: SplitMix64 started from a hash of the key
/// (seed, image, purpose, step, index).
///
/// The stream for a key depends on nothing else: not on how many images are synthesised, which shard an image
/// falls in, which machine runs it, or which other streams were drawn before. Image k of a shard therefore draws
/// exactly what image k of a full run draws, provided both use the same global image index and seed. Every draw a
/// synthesis makes should come from a stream keyed by what it is for (``Purpose``), the step it belongs to, and
/// an `index` that tells apart several draws of one purpose in one step (a block × head, a region).
public struct SynthesisRandom: Sendable {
    /// What a stream is drawn for. Distinct purposes give unrelated streams; callers may define their own
    /// values beyond the predefined ones.
    public struct Purpose: RawRepresentable, Hashable, Sendable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }

        /// The Gaussian noise an image starts from.
        public static let initialNoise = Purpose(rawValue: 1)
        /// The jitter offsets and the flip of one step (``Augmentation``).
        public static let augmentation = Purpose(rawValue: 2)
        /// One attention-prior mixture per (block, head) (``AttentionPrior``).
        public static let attentionPrior = Purpose(rawValue: 3)
        /// The target classes and their logits (``SoftLabels``).
        public static let labels = Purpose(rawValue: 4)
        /// The MSR cells picked in one step (``RegionCrop``).
        public static let regions = Purpose(rawValue: 5)
    }

    @usableFromInline var state: UInt64

    /// The stream for one key. `image` is the image's index in the whole run (not within a shard); `step` the
    /// optimisation step (0 for draws made once per image); `index` separates several streams of one purpose and step.
    public init(seed: UInt64, image: Int, purpose: Purpose, step: Int = 0, index: Int = 0) {
        var h = SynthesisRandom.mix(seed &+ 0x9E37_79B9_7F4A_7C15)
        h = SynthesisRandom.mix(h ^ (UInt64(bitPattern: Int64(image)) &* 0xD1B5_4A32_D192_ED03))
        h = SynthesisRandom.mix(h ^ (purpose.rawValue &* 0xAEF1_7502_108E_F2D9))
        h = SynthesisRandom.mix(h ^ (UInt64(bitPattern: Int64(step)) &* 0x9FB2_1C65_1E98_DF25))
        h = SynthesisRandom.mix(h ^ (UInt64(bitPattern: Int64(index)) &* 0xC2B2_AE3D_27D4_EB4F))
        state = h
    }

    /// SplitMix64's output function (Stafford's variant 13): a bijective 64-bit avalanche.
    @inlinable @inline(__always)
    static func mix(_ x: UInt64) -> UInt64 {
        var z = x
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// The next 64 random bits (SplitMix64).
    @inlinable @inline(__always)
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        return SynthesisRandom.mix(state)
    }

    /// Uniform in the open interval (0, 1): 53 random bits, offset by half a step, so 0 and 1 never occur.
    @inlinable @inline(__always)
    public mutating func uniform() -> Double {
        (Double(next() >> 11) + 0.5) * 0x1p-53
    }

    /// Uniform in (`lower`, `upper`).
    @inlinable
    public mutating func uniform(_ lower: Double, _ upper: Double) -> Double {
        lower + (upper - lower) * uniform()
    }

    /// Uniform over the integers of `range`, without modulo bias (Lemire's multiply-and-reject).
    @inlinable
    public mutating func int(in range: ClosedRange<Int>) -> Int {
        let span = UInt64(bitPattern: Int64(range.upperBound) &- Int64(range.lowerBound)) &+ 1
        if span == 0 { return Int(truncatingIfNeeded: next()) }  // the whole 64-bit range
        while true {
            let product = next().multipliedFullWidth(by: span)
            // Reject the low part's first (2⁶⁴ mod span) values: every outcome then has the same number of preimages.
            if product.low >= (0 &- span) % span {
                return range.lowerBound &+ Int(truncatingIfNeeded: product.high)
            }
        }
    }

    /// A standard normal draw (Box–Muller, cosine branch; two uniforms per draw).
    @inlinable
    public mutating func normal() -> Double {
        let r = (-2 * log(uniform())).squareRoot()
        return r * cos(2 * Double.pi * uniform())
    }

    /// Fills `buffer` with standard normal draws, both Box–Muller branches per pair of uniforms (the last odd
    /// element uses the cosine branch alone). The values depend only on the stream and the buffer's length.
    @inlinable
    public mutating func fillNormal<T: SynthesisFloat>(_ buffer: UnsafeMutableBufferPointer<T>) {
        var i = 0
        while i + 1 < buffer.count {
            let r = (-2 * log(uniform())).squareRoot()
            let angle = 2 * Double.pi * uniform()
            buffer[i] = T(r * cos(angle))
            buffer[i + 1] = T(r * sin(angle))
            i += 2
        }
        if i < buffer.count { buffer[i] = T(normal()) }
    }

    /// A draw of an Exponential(1) variable, −log U.
    @inlinable
    public mutating func exponential() -> Double {
        -log(uniform())
    }

    /// Weights drawn from the flat Dirichlet(1, …, 1) over `count` categories: normalised Exponential(1) draws.
    /// They are positive and sum to 1 (to rounding).
    public mutating func dirichlet(count: Int) -> [Double] {
        precondition(count > 0, "a Dirichlet draw needs at least one category")
        var weights = (0..<count).map { _ in exponential() }
        let total = weights.reduce(0, +)
        for i in weights.indices { weights[i] /= total }
        return weights
    }

    /// `count` distinct integers of `range` in the order drawn (a partial Fisher–Yates shuffle).
    public mutating func distinct(_ count: Int, in range: ClosedRange<Int>) -> [Int] {
        var pool = Array(range)
        precondition(count >= 0 && count <= pool.count, "cannot draw \(count) distinct values from \(range)")
        for i in 0..<count { pool.swapAt(i, int(in: i...(pool.count - 1))) }
        return Array(pool[0..<count])
    }
}
