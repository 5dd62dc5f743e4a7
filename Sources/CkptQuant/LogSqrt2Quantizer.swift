import CkptCore

/// RepQ-ViT's log√2 quantizer for post-softmax probabilities (its `LogSqrt2Quantizer`):
///
///     q = clamp(round(−2·log2(x/Δ)), 0, 2^b − 1)
///     x̂ = 2^(−⌈q/2⌉) · (1 + (q mod 2)(√2 − 1)) · Δ,   and x̂ = 0 where the unclamped q ≥ 2^b
///
/// so the levels are Δ, Δ/√2, Δ/2, Δ/(2√2), … (a factor √2 apart), and values below the last level's half-step
/// become 0. Values above Δ clamp to q = 0 (x̂ = Δ).
///
/// **The code is computed exactly** (our choice): `r = x/Δ` is a float32 division as in the reference, but
/// `round(−2·log2 r)` is read off r's exponent and mantissa — `q = −2e − [m ≥ 2^¼] − [m ≥ 2^¾]` for
/// `r = m·2^e`, `m ∈ [1, 2)` — instead of from an approximate float32 `log2`. The thresholds are irrational, so
/// there are no ties; the reference's `log2` (≈1 ulp) can round the other way only where `−2·log2 r` lies within
/// about 1e-6 of a half-integer. The value is then computed as torch does: `(2^−⌈q/2⌉ · f) · Δ` in float32 with
/// `f = 1 + float32(√2 − 1)` for odd q.
///
/// **Inputs are probabilities (our choice):** 0 gives x̂ = 0 (the reference masks it too), a negative value gives
/// 0 (the reference gives NaN), and calibration refuses negative values.
public struct LogSqrt2Quantizer: Sendable, Equatable {
    public static let supportedBits = 2...8

    public let bits: Int
    /// Δ: the largest level (x̂ = Δ for q = 0).
    public let scale: Float

    public init(bits: Int, scale: Float) throws(CkptError) {
        guard Self.supportedBits.contains(bits) else {
            throw CkptError(.invalidArgument, "log√2 quantizer: \(bits) bits is not in 2…8")
        }
        guard scale.isFinite && scale > 0 else {
            throw CkptError(.invalidArgument, "log√2 quantizer: scale is \(scale); the scale is positive and finite")
        }
        self.bits = bits
        self.scale = scale
    }

    /// 2^¼ and 2^¾ rounded up to float32: for a float m, `m ≥ 2^¼` exactly when `m ≥ lowThreshold`.
    static let lowThreshold = Float(bitPattern: 0x3F98_37F1)   // 1.18920720 > 2^¼ = 1.18920711…
    static let highThreshold = Float(bitPattern: 0x3FD7_44FD)  // 1.68179286 > 2^¾ = 1.68179283…
    /// The reference's odd-code factor: `(q % 2)·(√2 − 1) + 1` in float32.
    static let oddFactor = Float(1) + Float(2.0.squareRoot() - 1)
    /// `2^−⌈q/2⌉ · (odd ? f : 1)` for q = 0…255, as float32 products (subnormal from q = 251).
    static let levelTable: [Float] = (0..<256).map { q in
        Float(sign: .plus, exponent: -((q + 1) / 2), significand: 1) * (q % 2 == 1 ? oddFactor : 1)
    }

    // MARK: codes

    /// The unclamped code `round(−2·log2 r)` of `r = x/Δ > 0` (exact; see the type's notes). Nil for r ≤ 0 or NaN.
    static func unclampedCode(_ r: Float) -> Int? {
        guard r > 0 else { return nil }
        guard r.isFinite else { return Int.min }  // −2·log2(+inf) = −inf: clamps to 0
        var x = r, shift = 0
        if x < Float.leastNormalMagnitude {
            x *= 0x1p64
            shift = 64
        }
        let bits = x.bitPattern
        let e = Int((bits >> 23) & 0xFF) - 127 - shift
        let m = Float(bitPattern: (bits & 0x7F_FFFF) | 0x3F80_0000)
        return -2 * e - (m >= lowThreshold ? 1 : 0) - (m >= highThreshold ? 1 : 0)
    }

    /// The clamped code of `x`, or nil where x̂ = 0 (x ≤ 0, or the unclamped code is 2^b or more).
    public func code(_ x: Float) -> Int? {
        guard let q = Self.unclampedCode(x / scale), q < 1 << bits else { return nil }
        return max(q, 0)
    }

    /// x̂ of one value.
    @inline(__always) public func fakeQuantized(_ x: Float) -> Float {
        guard let q = code(x) else { return 0 }
        return Self.levelTable[q] * scale
    }

    // MARK: calibration

    /// RepQ-ViT's search: for each percentile p, `Δ = quantile(x, p)`; keep the Δ with the least
    /// `mean((x − x̂)²)`. A candidate Δ ≤ 0 is skipped (the reference's score is NaN there: 0/0 at the zeros that
    /// make such a quantile); with none left, Δ = max(x), the reference's initial value, or 1 for all-zero data.
    /// One scratch copy of `x` (4 bytes per value, checked against the memory budget). Throws `nonFinite` for
    /// NaN/±Inf and `invalidArgument` for negative values, no values or unsupported bits.
    public static func calibrate(
        _ x: UnsafeBufferPointer<Float>, bits: Int, percentiles: [Double] = PercentileSearch.percentiles
    ) throws(CkptError) -> (quantizer: LogSqrt2Quantizer, choice: PercentileSearch.Choice) {
        guard supportedBits.contains(bits) else { throw CkptError(.invalidArgument, "log√2 quantizer: \(bits) bits is not in 2…8") }
        try PercentileSearch.check(percentiles)
        try PercentileSearch.checkFinite(x, "log√2 quantizer calibration")
        var largest: Float = 0
        for (i, v) in x.enumerated() {
            guard v >= 0 else { throw CkptError(.invalidArgument, "log√2 quantizer calibration: value \(i) is \(v); probabilities are not negative") }
            largest = max(largest, v)
        }
        let bytes = try PercentileSearch.scratchBytes(x.count)
        let raw = try LargeAllocation.allocate(bytes)
        defer { LargeAllocation.deallocate(raw, count: bytes) }
        let scratch = raw.bindMemory(to: Float.self, capacity: x.count)
        scratch.initialize(from: x.baseAddress!, count: x.count)
        let values = UnsafeMutableBufferPointer(start: scratch, count: x.count)
        let candidates = Quantile.linear(inPlace: values, percentiles)
        var best: (LogSqrt2Quantizer, PercentileSearch.Choice)?
        for (percentile, delta) in zip(percentiles, candidates) where delta > 0 {
            let quantizer = try LogSqrt2Quantizer(bits: bits, scale: delta)
            let squares = PercentileSearch.sum(scratch, x.count, { v in
                let d = v - quantizer.fakeQuantized8(v)
                return d * d
            }, { v in
                let d = v - quantizer.fakeQuantized(v)
                return d * d
            })
            let mse = squares / Double(x.count)
            if best == nil || mse < best!.1.meanSquaredError {
                best = (quantizer, PercentileSearch.Choice(percentile: percentile, meanSquaredError: mse))
            }
        }
        if let best { return best }
        let fallback = try LogSqrt2Quantizer(bits: bits, scale: largest > 0 ? largest : 1)
        var squares: Double = 0
        for v in x { let d = v - fallback.fakeQuantized(v); squares += Double(d * d) }
        return (fallback, PercentileSearch.Choice(percentile: 1, meanSquaredError: squares / Double(x.count)))
    }

    // MARK: fake quantization

    /// Writes x̂ for every value of `x` into `y` (same count; `y` may be `x`), eight lanes at a time, split across
    /// cores.
    public func fakeQuantize(_ x: UnsafeBufferPointer<Float>, into y: UnsafeMutableBufferPointer<Float>) throws(CkptError) {
        guard x.count == y.count else { throw CkptError(.shapeMismatch, "log√2 quantizer: \(x.count) inputs, \(y.count) outputs") }
        guard let input = x.baseAddress, let output = y.baseAddress else { return }
        nonisolated(unsafe) let (source, target) = (input, output)
        let quantizer = self
        Parallel.forEachChunk(count: x.count, minimumChunk: 1 << 16, alignment: 8) { range in
            let rawIn = UnsafeRawPointer(source), rawOut = UnsafeMutableRawPointer(target)
            var j = range.lowerBound
            while j + 8 <= range.upperBound {
                let v = rawIn.loadUnaligned(fromByteOffset: j * 4, as: SIMD8<Float>.self)
                rawOut.storeBytes(of: quantizer.fakeQuantized8(v), toByteOffset: j * 4, as: SIMD8<Float>.self)
                j += 8
            }
            while j < range.upperBound {
                target[j] = quantizer.fakeQuantized(source[j])
                j += 1
            }
        }
    }

    /// ``fakeQuantize(_:into:)`` in place.
    public func fakeQuantize(_ x: UnsafeMutableBufferPointer<Float>) throws(CkptError) {
        try fakeQuantize(UnsafeBufferPointer(x), into: x)
    }

    /// Eight values: the code from the exponent and mantissa bits in vector lanes (lanes whose ratio is not a
    /// positive normal float take the scalar path), then the level from ``levelTable``.
    @inline(__always) func fakeQuantized8(_ x: SIMD8<Float>) -> SIMD8<Float> {
        typealias V = SIMD8<Float>
        let r = x / V(repeating: scale)
        let ordinary = r .>= V(repeating: .leastNormalMagnitude) .& r .<= V(repeating: .greatestFiniteMagnitude)
        let pattern = unsafeBitCast(r, to: SIMD8<UInt32>.self)
        // The biased exponent as a float (OR'd into the mantissa of 2^23), then q = −2(E − 127) − [m ≥ 2^¼] − [m ≥ 2^¾].
        let exponent = unsafeBitCast(((pattern &>> 23) & 0xFF) | 0x4B00_0000, to: V.self) - 8_388_608
        let m = unsafeBitCast((pattern & 0x7F_FFFF) | 0x3F80_0000, to: V.self)
        var q = V(repeating: 254) - 2 * exponent
        q = q.replacing(with: q - 1, where: m .>= V(repeating: Self.lowThreshold))
        q = q.replacing(with: q - 1, where: m .>= V(repeating: Self.highThreshold))
        let levels = Float(1 << bits)
        var result = V()
        for lane in 0..<8 {
            if !ordinary[lane] {
                result[lane] = fakeQuantized(x[lane])
            } else if q[lane] >= levels {
                result[lane] = 0
            } else {
                result[lane] = Self.levelTable[Int(max(q[lane], 0))] * scale
            }
        }
        return result
    }
}
