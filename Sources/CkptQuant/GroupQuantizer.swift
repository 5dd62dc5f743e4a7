import CkptCore
#if canImport(Glibc)
import Glibc
#endif

/// Scale and offset of one group: `w = scale*q + offset` on the affine grid (offset is the bias), and
/// `w = (q - offset)*scale` on the zero-point grids (offset is the integer zero code).
public struct GroupParameters: Sendable, Equatable {
    public var scale: Float
    public var offset: Float
}

/// Quantizes one group of weights: picks the parameters with the configured method, writes the codes, and
/// returns the squared and largest absolute error of the stored result. Scalar arithmetic is ordered as the
/// reference quantizers order it (MLX's CPU kernel, compressed-tensors' torch ops), so RTN codes match them bit
/// for bit.
struct GroupQuantizer {
    let settings: QuantizationSettings
    let levels: Int  // 2^bits - 1
    let maxCode: Float
    let half: Float  // 2^(bits-1), the symmetric grid's zero code and the signed-code offset

    init(_ settings: QuantizationSettings) {
        self.settings = settings
        levels = (1 << settings.bits) - 1
        maxCode = Float(levels)
        half = Float(1 << (settings.bits - 1))
    }

    /// Round half to even without a library call; only used where the result is clamped to the code range
    /// afterwards, so the 2^22 limit of the trick cannot matter.
    @inline(__always) static func rint(_ x: Float) -> Float { (x + 12582912) - 12582912 }
    @inline(__always) static func clamp(_ x: Float, _ lo: Float, _ hi: Float) -> Float { x < lo ? lo : (x > hi ? hi : x) }

    /// The value a stored scale/bias really has once written in the scale dtype.
    @inline(__always) func stored(_ x: Float) -> Float {
        switch settings.scaleType {
        case .f16: FloatBits.f16ToF32(FloatBits.f32ToF16(x))
        case .bf16: FloatBits.bf16ToF32(FloatBits.f32ToBF16(x))
        default: x
        }
    }

    // MARK: parameters from a range

    /// The grid's own min–max rule applied to `[lo, hi]`, in float32, exactly as the reference computes it.
    @inline(__always) func rangeParameters(lo: Float, hi: Float) -> GroupParameters {
        switch settings.grid {
        case .mlxAffine:
            // mlx/backend/cpu/quantized.cpp: the edge of larger magnitude lands on a code; 0.0 becomes exact.
            let useMin = abs(lo) > abs(hi)
            var scale = max((hi - lo) / maxCode, 1e-7)
            if !useMin { scale = -scale }
            let edge = useMin ? lo : hi
            let q0 = (edge / scale).rounded(.toNearestOrEven)
            if q0 != 0 { return GroupParameters(scale: edge / q0, offset: edge) }
            return GroupParameters(scale: scale, offset: 0)
        case .integerZeroPoint:
            // compressed-tensors calculate_qparams: widen to include 0, integer zero point in the signed range.
            let lo0 = min(lo, 0), hi0 = max(hi, 0)
            var scale = (hi0 - lo0) / maxCode
            let signedMin = -half
            var zero = signedMin - lo0 / scale
            if scale == 0 {
                scale = Float.ulpOfOne
                zero = 0
            }
            zero = Self.clamp(zero, signedMin, half - 1).rounded(.toNearestOrEven)
            return GroupParameters(scale: scale, offset: zero + half)
        case .symmetric:
            let absMax = max(abs(min(lo, 0)), abs(max(hi, 0)))
            var scale = absMax / (maxCode / 2)
            if scale == 0 { scale = Float.ulpOfOne }
            return GroupParameters(scale: scale, offset: half)
        }
    }

    /// The parameters as written (scale and bias rounded to the scale dtype; zero codes are integers already).
    @inline(__always) func storedParameters(_ p: GroupParameters) -> GroupParameters {
        settings.grid == .mlxAffine
            ? GroupParameters(scale: stored(p.scale), offset: stored(p.offset))
            : GroupParameters(scale: stored(p.scale), offset: p.offset)
    }

    // MARK: codes

    /// Codes for `w` under `p`, in the reference's operation order.
    @inline(__always) func code(_ w: Float, _ p: GroupParameters) -> Float {
        switch settings.grid {
        case .mlxAffine:
            return Self.clamp(Self.rint((w - p.offset) / p.scale), 0, maxCode)
        case .integerZeroPoint, .symmetric:
            // x/scale + zero (signed), clamp to the signed range, round; then shift to unsigned.
            let signedZero = p.offset - half
            return Self.rint(Self.clamp(w / p.scale + signedZero, -half, half - 1)) + half
        }
    }

    @inline(__always) func value(_ q: Float, _ p: GroupParameters) -> Float {
        settings.grid == .mlxAffine ? q * p.scale + p.offset : (q - p.offset) * p.scale
    }

    // MARK: one group

    /// Quantizes `n` weights into `codes`; returns the stored parameters and the error statistics.
    func quantize(
        _ w: UnsafePointer<Float>, _ n: Int, codes: UnsafeMutablePointer<UInt8>, scratch: UnsafeMutablePointer<Float>
    ) -> (GroupParameters, squaredError: Double, maxError: Float) {
        let (coding, result) = parameters(w, n, scratch: scratch)
        let (squared, largest) = encode(w, n, coding: coding, stored: result, codes: codes)
        return (result, squared, largest)
    }

    /// The configured method's parameters for `n` weights: `coding` gives the codes, `stored` (as written) the
    /// values.
    ///
    /// `importance` (one non-negative weight per value, or nil for equal weights) makes MSE and HQQ minimise the
    /// importance-weighted error instead: GPTQ passes each column's `1/U_jj²`, the cost it assigns a rounding
    /// error in that column. RTN's range is the same either way.
    @inline(__always)
    func parameters(
        _ w: UnsafePointer<Float>, _ n: Int, importance: UnsafePointer<Float>? = nil, scratch: UnsafeMutablePointer<Float>
    ) -> (coding: GroupParameters, stored: GroupParameters) {
        var lo = w[0], hi = w[0]
        for j in 1..<n {
            lo = min(lo, w[j])
            hi = max(hi, w[j])
        }
        // Codes come from `coding`; errors are those of the values as written (`stored`, then the weight dtype).
        // RTN codes with the float32 parameters and only then stores them, as MLX does; the searches return
        // parameters already in stored precision.
        let coding: GroupParameters
        switch settings.method {
        case .rtn:
            coding = rangeParameters(lo: lo, hi: hi)
        case .mse:
            coding = clippingSearch(w, n, lo: lo, hi: hi, importance: importance)
        case .hqq:
            switch settings.grid {
            case .mlxAffine: coding = halfQuadraticAffine(w, n, lo: lo, hi: hi, importance: importance)
            case .integerZeroPoint: coding = halfQuadraticZero(w, n, lo: lo, hi: hi, importance: importance, scratch: scratch)
            case .symmetric: coding = halfQuadraticScale(w, n, lo: lo, hi: hi, scratch: scratch)
            }
        }
        return (coding, storedParameters(coding))
    }

    /// Codes under `coding` and the error statistics of the values as written: eight lanes at a time when the
    /// group allows, else one weight at a time (the same operations).
    @inline(__always)
    func encode(
        _ w: UnsafePointer<Float>, _ n: Int, coding: GroupParameters, stored result: GroupParameters, codes: UnsafeMutablePointer<UInt8>
    ) -> (squared: Double, largest: Float) {
        if n % 8 == 0 { return encode8(w, n, coding: coding, stored: result, codes: codes) }
        var squared: Double = 0
        var largest: Float = 0
        for j in 0..<n {
            let q = code(w[j], coding)
            codes[j] = UInt8(q)
            let d = abs(w[j] - stored(value(q, result)))  // as written: rounded to the weight dtype
            squared += Double(d * d)
            largest = max(largest, d)
        }
        return (squared, largest)
    }

    // MARK: the code rule, eight lanes at a time

    /// ``code(_:_:)`` on the affine grid for eight weights, with per-lane parameters: clamp(rint((x − bias)/scale)).
    /// The one place the eight-lane paths (codes, the clipping search, HQQ) take it from, so they agree bit for bit.
    @inline(__always)
    static func affineCodes8(_ x: SIMD8<Float>, scale: SIMD8<Float>, offset: SIMD8<Float>, maxCode: SIMD8<Float>) -> SIMD8<Float> {
        let magic = SIMD8<Float>(repeating: 12582912)
        var q = (((x - offset) / scale) + magic) - magic
        q = q.replacing(with: 0, where: q .< 0)
        return q.replacing(with: maxCode, where: q .> maxCode)
    }

    /// ``code(_:_:)`` on the zero-point grids for eight weights: x/scale + signed zero, clamped to the signed range,
    /// rounded, shifted by `half` to the unsigned code.
    @inline(__always)
    static func zeroPointCodes8(_ x: SIMD8<Float>, scale: SIMD8<Float>, signedZero: SIMD8<Float>, half: SIMD8<Float>) -> SIMD8<Float> {
        let magic = SIMD8<Float>(repeating: 12582912), low = -half, high = half - 1
        var t = x / scale + signedZero
        t = t.replacing(with: low, where: t .< low)
        t = t.replacing(with: high, where: t .> high)
        return ((t + magic) - magic) + half
    }

    // MARK: codes and errors, eight lanes at a time

    /// The codes of `n` weights (a multiple of 8) under `coding`, and Σ d² and max d of the values as written
    /// (`stored` parameters, then the weight dtype's rounding). The same operations in the same order as
    /// ``code(_:_:)``/``value(_:_:)`` per lane, so the codes are those of the scalar path bit for bit; only the
    /// error sum is accumulated in float lanes (per group) instead of one double chain.
    @inline(__always)
    func encode8(
        _ w: UnsafePointer<Float>, _ n: Int, coding c: GroupParameters, stored s: GroupParameters, codes: UnsafeMutablePointer<UInt8>
    ) -> (squared: Double, largest: Float) {
        typealias V = SIMD8<Float>
        let top = V(repeating: maxCode), integerBias = V(repeating: 8388608)
        let raw = UnsafeRawPointer(w)
        let affine = settings.grid == .mlxAffine
        let codeScale = V(repeating: c.scale), codeOffset = V(repeating: c.offset)
        let signedZero = V(repeating: c.offset - half), halfV = V(repeating: half)
        let valueScale = V(repeating: s.scale), valueOffset = V(repeating: s.offset)
        let rounding = settings.scaleType
        var squares = V(), largest = V()
        var j = 0
        while j < n {
            let x = raw.loadUnaligned(fromByteOffset: j * 4, as: V.self)
            let q: V
            var v: V
            if affine {
                q = Self.affineCodes8(x, scale: codeScale, offset: codeOffset, maxCode: top)
                v = q * valueScale + valueOffset
            } else {
                q = Self.zeroPointCodes8(x, scale: codeScale, signedZero: signedZero, half: halfV)
                v = (q - valueOffset) * valueScale
            }
            // q is a whole number in [0, 255]: adding 2^23 puts it in the low mantissa bits.
            let bits = unsafeBitCast(q + integerBias, to: SIMD8<UInt32>.self)
            for lane in 0..<8 { codes[j + lane] = UInt8(truncatingIfNeeded: bits[lane]) }
            switch rounding {
            case .f16: for lane in 0..<8 { v[lane] = FloatBits.f16ToF32(FloatBits.f32ToF16(v[lane])) }
            case .bf16: for lane in 0..<8 { v[lane] = FloatBits.bf16ToF32(FloatBits.f32ToBF16(v[lane])) }
            default: break
            }
            var d = x - v
            d = d.replacing(with: -d, where: d .< 0)
            squares += d * d
            largest = largest.replacing(with: d, where: d .> largest)
            j += 8
        }
        return (Double(squares.sum()), largest.max())
    }

    // MARK: MSE clipping search

    /// Shrink factors tried: 1.00, 0.98, … 0.40 (the unclipped range first, so the search is never worse than RTN).
    static let clippingFactors: [Float] = (0...30).map { 1 - Float($0) * 0.02 }

    func clippingSearch(_ w: UnsafePointer<Float>, _ n: Int, lo: Float, hi: Float, importance: UnsafePointer<Float>? = nil) -> GroupParameters {
        // Eight candidates at a time, one per lane: each lane's sum runs over the values in the scalar order, so
        // every candidate's error (and thus the choice) is bit for bit the sequential scalar sum of its squared errors.
        let candidates = Self.clippingFactors.map { storedParameters(rangeParameters(lo: lo * $0, hi: hi * $0)) }
        var best = candidates[0]
        var bestError = Float.infinity
        var first = 0
        while first < candidates.count {
            var scales = SIMD8<Float>(repeating: 1), offsets = SIMD8<Float>()
            let count = min(8, candidates.count - first)
            for lane in 0..<8 {
                let p = candidates[first + min(lane, count - 1)]
                scales[lane] = p.scale
                offsets[lane] = p.offset
            }
            let errors = candidateErrors(w, n, scales: scales, offsets: offsets, importance: importance)
            for lane in 0..<count where errors[lane] < bestError {
                bestError = errors[lane]
                best = candidates[first + lane]
            }
            first += count
        }
        return best
    }

    /// The (importance-weighted) squared error of the group under eight parameter sets, lane k for set k: the
    /// operations of ``code(_:_:)`` and ``value(_:_:)`` per lane, in their order, summed over `j` in order.
    @inline(__always)
    func candidateErrors(
        _ w: UnsafePointer<Float>, _ n: Int, scales: SIMD8<Float>, offsets: SIMD8<Float>, importance: UnsafePointer<Float>?
    ) -> SIMD8<Float> {
        typealias V = SIMD8<Float>
        let top = V(repeating: maxCode), signedZero = offsets - half, halfV = V(repeating: half)
        var sums = V()
        if settings.grid == .mlxAffine {
            for j in 0..<n {
                let x = V(repeating: w[j])
                let q = Self.affineCodes8(x, scale: scales, offset: offsets, maxCode: top)
                let d = x - (q * scales + offsets)
                if let importance { sums += V(repeating: importance[j]) * d * d } else { sums += d * d }
            }
        } else {
            for j in 0..<n {
                let x = V(repeating: w[j])
                let q = Self.zeroPointCodes8(x, scale: scales, signedZero: signedZero, half: halfV)
                let d = x - (q - offsets) * scales
                if let importance { sums += V(repeating: importance[j]) * d * d } else { sums += d * d }
            }
        }
        return sums
    }

    // MARK: HQQ

    static let hqqP: Float = 0.7
    static let hqqBeta: Float = 10
    static let hqqKappa: Float = 1.01
    static let hqqIterations = 20

    /// The sum of a group's importance weights; `n` when unweighted (every weight counts 1).
    static func totalWeight(_ importance: UnsafePointer<Float>?, _ n: Int) -> Float {
        guard let importance else { return Float(n) }
        var total: Float = 0
        for i in 0..<n { total += importance[i] }
        return total
    }

    /// HQQ (mobiusml/hqq `optimize_weights_proximal`): fixed min–max scale, zero point from half-quadratic
    /// splitting with an Lp shrinkage of the error; stops when the mean absolute error stops falling.
    func halfQuadraticZero(
        _ w: UnsafePointer<Float>, _ n: Int, lo: Float, hi: Float, importance: UnsafePointer<Float>? = nil, scratch: UnsafeMutablePointer<Float>
    ) -> GroupParameters {
        guard hi > lo else { return storedParameters(rangeParameters(lo: lo, hi: hi)) }
        let sigma = maxCode / (hi - lo)  // inverse scale, as HQQ keeps it
        var zero = Self.clamp(Self.rint(-lo * sigma), 0, maxCode)
        var bestZero = zero
        var bestError = Float.infinity
        var beta = Self.hqqBeta
        // With importance weights both terms of the splitting are weighted alike, so the shrinkage is unchanged
        // and the zero update becomes the weighted mean.
        let totalImportance = Self.totalWeight(importance, n)
        guard totalImportance > 0 else { return storedParameters(rangeParameters(lo: lo, hi: hi)) }
        for _ in 0..<Self.hqqIterations {
            let (absSum, zeroSum) = if let importance {
                Self.hqqStep(w, n, importance: importance, sigma: sigma, zero: zero, beta: beta, maxCode: maxCode)
            } else if n % 8 == 0 {
                Self.hqqStep8(w, n, sigma: sigma, zero: zero, beta: beta, maxCode: maxCode)
            } else {
                Self.hqqStep(w, n, sigma: sigma, zero: zero, beta: beta, maxCode: maxCode)
            }
            let absError = absSum / totalImportance
            guard absError < bestError else { break }
            bestError = absError
            bestZero = zero
            // The zero point stays an integer code, so w = 0 is exactly representable: a continuous zero point
            // leaves every near-zero weight of the group off by the same amount, a bias that inputs with a
            // non-zero mean turn into a systematic output shift (measured on DINOv2: KL 0.60 vs 0.45 at W4 g64).
            zero = Self.clamp(Self.rint(zeroSum / totalImportance), 0, maxCode)
            guard zero != bestZero else { break }
            beta *= Self.hqqKappa
        }
        let scale = 1 / sigma
        switch settings.grid {
        case .mlxAffine:
            return storedParameters(GroupParameters(scale: scale, offset: -bestZero * scale))
        default:
            // HQQ's min–max scale spans [min, max], compressed-tensors' own rule [min(min, 0), max(max, 0)]: for a
            // one-signed group the integer zero code clamps to the range's end and the grid then misses the far
            // end, so a fit can end worse than RTN. Keep RTN's parameters when they are closer.
            let fitted = storedParameters(GroupParameters(scale: scale, offset: bestZero))
            let rtn = storedParameters(rangeParameters(lo: lo, hi: hi))
            return meanAbsoluteError(w, n, rtn, importance: importance) < meanAbsoluteError(w, n, fitted, importance: importance) ? rtn : fitted
        }
    }

    /// Σ ω|w − value(code(w))| under `p` (ω = 1 without importance weights).
    func meanAbsoluteError(_ w: UnsafePointer<Float>, _ n: Int, _ p: GroupParameters, importance: UnsafePointer<Float>?) -> Float {
        var total: Float = 0
        for j in 0..<n { total += (importance?[j] ?? 1) * abs(w[j] - value(code(w[j], p), p)) }
        return total
    }

    /// HQQ on the affine grid, where the stored bias can be any float: the same half-quadratic splitting with
    /// both parameters free. Each iteration takes the codes of the current `(scale, bias)`, shrinks the error
    /// `W_e = shrink_p(W − W_r, β)`, and refits `(scale, bias)` as the (importance-weighted) least squares of the
    /// shrunk target `W − W_e` onto the codes. It starts from MLX's min–max parameters and keeps the iterate with
    /// the least mean |error| (weighted), so it never ends worse than that start.
    func halfQuadraticAffine(_ w: UnsafePointer<Float>, _ n: Int, lo: Float, hi: Float, importance: UnsafePointer<Float>? = nil) -> GroupParameters {
        let start = rangeParameters(lo: lo, hi: hi)
        guard hi > lo else { return storedParameters(start) }
        let totalImportance = Self.totalWeight(importance, n)
        guard totalImportance > 0 else { return storedParameters(start) }
        var current = start, best = start
        var bestError = Float.infinity
        var beta = Self.hqqBeta
        for iteration in 0..<Self.hqqIterations {
            let sums = n % 8 == 0
                ? Self.hqqAffineStep8(w, n, importance: importance, current, beta: beta, threshold: Self.hqqShrinkThreshold[iteration], maxCode: maxCode)
                : Self.hqqAffineStep(w, n, importance: importance, current, beta: beta, threshold: Self.hqqShrinkThreshold[iteration], maxCode: maxCode)
            let absError = sums.absError / totalImportance
            guard absError < bestError else { break }
            bestError = absError
            best = current
            // Weighted least squares of target t on codes q: scale = (Σω·Σωqt − Σωq·Σωt) / (Σω·Σωq² − (Σωq)²).
            let determinant = totalImportance * sums.qq - sums.q * sums.q
            guard determinant > 1e-12 * totalImportance * sums.qq else { break }  // all codes equal: nothing to fit
            let scale = (totalImportance * sums.qt - sums.q * sums.t) / determinant
            guard scale.isFinite, scale != 0 else { break }
            let next = GroupParameters(scale: scale, offset: (sums.t - scale * sums.q) / totalImportance)
            // Unchanged parameters with no error shrunk: the next iteration would repeat this one exactly (β only
            // enters through the shrinkage) and stop, so stop now.
            if next == current && !sums.shrunk { break }
            current = next
            beta *= Self.hqqKappa
        }
        return storedParameters(best)
    }

    /// Sums of one affine HQQ iteration: Σω|e|, Σωq, Σωq², Σωt, Σωqt with q the codes, e the error and t the shrunk
    /// target of each weight (ω = 1 without importance weights).
    typealias AffineSums = (absError: Float, q: Float, qq: Float, t: Float, qt: Float, shrunk: Bool)

    @inline(__always)
    static func hqqAffineStep(
        _ w: UnsafePointer<Float>, _ n: Int, importance: UnsafePointer<Float>?, _ p: GroupParameters, beta: Float, threshold: Float,
        maxCode: Float
    ) -> AffineSums {
        var sums: AffineSums = (0, 0, 0, 0, 0, false)
        let inverseBeta = 1 / beta
        for j in 0..<n {
            let q = clamp(rint((w[j] - p.offset) / p.scale), 0, maxCode)
            let e = w[j] - (q * p.scale + p.offset)
            let a = abs(e)
            let shrunk = a <= threshold ? 0 : max(0, a - FastMath.powNegative03(a) * inverseBeta)
            if shrunk > 0 { sums.shrunk = true }
            let t = w[j] - (e < 0 ? -shrunk : shrunk)
            let weight = importance?[j] ?? 1
            sums.absError += weight * a
            sums.q += weight * q
            sums.qq += weight * q * q
            sums.t += weight * t
            sums.qt += weight * q * t
        }
        return sums
    }

    /// `β^(−1/(2−p))` for iteration k's β = 10·1.01^k (≈ 0.17): the shrinkage `|e| − |e|^(p−1)/β` is ≤ 0 exactly
    /// when `|e|` is at most this, so eight errors all below it need no power (at weights of order 0.02, every one).
    static let hqqShrinkThreshold: [Float] = (0..<hqqIterations).map { k in
        Float(pow(Double(hqqBeta) * pow(Double(hqqKappa), Double(k)), -1 / (2 - Double(hqqP))))
    }

    /// The same iteration eight lanes at a time.
    @inline(__always)
    static func hqqAffineStep8(
        _ w: UnsafePointer<Float>, _ n: Int, importance: UnsafePointer<Float>?, _ p: GroupParameters, beta: Float, threshold: Float,
        maxCode: Float
    ) -> AffineSums {
        typealias V = SIMD8<Float>
        var absError = V(), sq = V(), sqq = V(), st = V(), sqt = V()
        var anyShrunk = false
        // Codes by division, as ``code(_:_:)`` computes them. A multiplication by the reciprocal was 3 % faster
        // but flips near-ties, and through GPTQ's later columns that moved W4 g64 on DINOv2 by 1.4 points.
        let scale = V(repeating: p.scale), offset = V(repeating: p.offset), top = V(repeating: maxCode)
        let inverseBeta = V(repeating: 1 / beta), limit = V(repeating: threshold)
        let raw = UnsafeRawPointer(w), weights = importance.map(UnsafeRawPointer.init)
        var j = 0
        while j < n {
            let x = raw.loadUnaligned(fromByteOffset: j * 4, as: V.self)
            let q = affineCodes8(x, scale: scale, offset: offset, maxCode: top)
            let e = x - (q * scale + offset)
            let a = e.replacing(with: -e, where: e .< 0)
            var t = x
            if any(a .> limit) {
                var shrunk = a - FastMath.powNegative03(a) * inverseBeta
                shrunk = shrunk.replacing(with: 0, where: shrunk .< 0 .| a .<= limit)
                t = x - shrunk.replacing(with: -shrunk, where: e .< 0)
                if any(shrunk .> 0) { anyShrunk = true }
            }
            if let weights {
                let weight = weights.loadUnaligned(fromByteOffset: j * 4, as: V.self)
                absError += weight * a
                let wq = weight * q
                sq += wq
                sqq += wq * q
                st += weight * t
                sqt += wq * t
            } else {
                absError += a
                sq += q
                sqq += q * q
                st += t
                sqt += q * t
            }
            j += 8
        }
        return (absError.sum(), sq.sum(), sqq.sum(), st.sum(), sqt.sum(), anyShrunk)
    }

    /// One HQQ iteration over the group: Σ ω|W − W_r| and Σ ω(W_q − (W − W_e)σ) for the zero update, with ω the
    /// importance weights (1 without them).
    @inline(__always)
    static func hqqStep(
        _ w: UnsafePointer<Float>, _ n: Int, importance: UnsafePointer<Float>? = nil, sigma: Float, zero: Float, beta: Float, maxCode: Float
    ) -> (Float, Float) {
        var absError: Float = 0
        var zeroSum: Float = 0
        let inverseSigma = 1 / sigma, inverseBeta = 1 / beta
        for j in 0..<n {
            let q = clamp(rint(w[j] * sigma + zero), 0, maxCode)
            let e = w[j] - (q - zero) * inverseSigma
            let a = abs(e)
            let weight = importance?[j] ?? 1
            absError += weight * a
            let shrunk = max(0, a - FastMath.powNegative03(a) * inverseBeta)
            let we = e < 0 ? -shrunk : shrunk
            zeroSum += weight * (q - (w[j] - we) * sigma)
        }
        return (absError, zeroSum)
    }

    /// The same iteration eight lanes at a time (group sizes are multiples of 8).
    @inline(__always)
    static func hqqStep8(_ w: UnsafePointer<Float>, _ n: Int, sigma: Float, zero: Float, beta: Float, maxCode: Float) -> (Float, Float) {
        typealias V = SIMD8<Float>
        var absError = V(), zeroSum = V()
        let s = V(repeating: sigma), z = V(repeating: zero), top = V(repeating: maxCode)
        let inverseSigma = V(repeating: 1 / sigma), inverseBeta = V(repeating: 1 / beta), magic = V(repeating: 12582912)
        let raw = UnsafeRawPointer(w)
        var j = 0
        while j < n {
            let x = raw.loadUnaligned(fromByteOffset: j * 4, as: V.self)
            var q = ((x * s + z) + magic) - magic
            q = q.replacing(with: 0, where: q .< 0)
            q = q.replacing(with: top, where: q .> top)
            let e = x - (q - z) * inverseSigma
            let a = e.replacing(with: -e, where: e .< 0)
            absError += a
            var shrunk = a - FastMath.powNegative03(a) * inverseBeta
            shrunk = shrunk.replacing(with: 0, where: shrunk .< 0)
            let we = shrunk.replacing(with: -shrunk, where: e .< 0)
            zeroSum += q - (x - we) * s
            j += 8
        }
        return (absError.sum(), zeroSum.sum())
    }

    /// The symmetric grid fixes the zero code, so the same splitting optimises the scale instead (least squares
    /// of the shrunk target onto the codes).
    func halfQuadraticScale(_ w: UnsafePointer<Float>, _ n: Int, lo: Float, hi: Float, scratch: UnsafeMutablePointer<Float>) -> GroupParameters {
        let start = rangeParameters(lo: lo, hi: hi)
        guard start.scale > Float.ulpOfOne else { return storedParameters(start) }
        var scale = start.scale
        var bestScale = scale
        var bestError = Float.infinity
        var beta = Self.hqqBeta
        for _ in 0..<Self.hqqIterations {
            var absError: Float = 0
            var numerator: Float = 0, denominator: Float = 0
            let p = GroupParameters(scale: scale, offset: half)
            for j in 0..<n {
                let c = code(w[j], p) - half
                let e = w[j] - c * scale
                let a = abs(e)
                absError += a
                let shrunk = max(0, a - FastMath.powNegative03(a) / beta)
                let target = w[j] - (e < 0 ? -shrunk : shrunk)
                numerator += target * c
                denominator += c * c
            }
            absError /= Float(n)
            guard absError < bestError else { break }
            bestError = absError
            bestScale = scale
            guard denominator > 0, numerator > 0 else { break }
            scale = numerator / denominator
            beta *= Self.hqqKappa
        }
        return storedParameters(GroupParameters(scale: bestScale, offset: half))
    }
}

/// Approximations used inside iterative searches, where a relative error of 1e-5 is immaterial. Scalar and
/// 8-lane versions compute the same polynomials.
enum FastMath {
    typealias V = SIMD8<Float>

    /// `x^(-0.3)` for x ≥ 0 (HQQ's `|e|^(p-1)` with p = 0.7); +inf at 0, as the reference's pow gives.
    @inline(__always) static func powNegative03(_ x: Float) -> Float {
        guard x > 0 else { return .infinity }
        return exp2(-0.3 * log2(x))
    }

    @inline(__always) static func powNegative03(_ x: V) -> V {
        let r = exp2(-0.3 * log2(x))
        return r.replacing(with: .infinity, where: x .<= 0)
    }

    // Least-squares fits on [0, 1): log2(1+t) ≈ t·P(t) (max error 4.4e-6), 2^f ≈ 1 + f·Q(f) (relative 1.4e-7).
    /// log2 for positive normal floats: exponent plus the mantissa polynomial.
    @inline(__always) static func log2(_ x: Float) -> Float {
        let bits = x.bitPattern
        let exponent = Float(Int32(bitPattern: (bits >> 23) & 0xFF) - 127)
        let m = Float(bitPattern: (bits & 0x7F_FFFF) | 0x3F80_0000)
        return exponent + (m - 1) * (1.4425170 + (m - 1) * (-0.7178984 + (m - 1) * (0.4568942 + (m - 1) * (-0.2773651 + (m - 1) * (0.1219141 + (m - 1) * -0.0260663)))))
    }

    /// Only bit casts and float arithmetic: SIMD int/float conversions are generic calls, not vector instructions.
    @inline(__always) static func log2(_ x: V) -> V {
        let bits = unsafeBitCast(x, to: SIMD8<UInt32>.self)
        // The biased exponent as a float: OR it into the mantissa of 2^23 and subtract 2^23 (+ the bias 127).
        let exponent = unsafeBitCast((bits &>> 23) | 0x4B00_0000, to: V.self) - 8_388_735
        let t = unsafeBitCast((bits & 0x7F_FFFF) | 0x3F80_0000, to: V.self) - 1
        let c1 = V(repeating: 1.4425170), c2 = V(repeating: -0.7178984), c3 = V(repeating: 0.4568942)
        let c4 = V(repeating: -0.2773651), c5 = V(repeating: 0.1219141), c6 = V(repeating: -0.0260663)
        return exponent + t * (c1 + t * (c2 + t * (c3 + t * (c4 + t * (c5 + t * c6)))))
    }

    /// 2^x for moderate x: integer part into the exponent, polynomial for the fraction.
    @inline(__always) static func exp2(_ x: Float) -> Float {
        let clamped = min(max(x, -126), 126)
        let floorValue = GroupQuantizer.rint(clamped - 0.5)
        let f = clamped - floorValue
        let poly = 1 + f * (0.6931527 + f * (0.2401532 + f * (0.0558282 + f * (0.0089890 + f * 0.0018766))))
        return poly * Float(bitPattern: UInt32(Int32(floorValue) + 127) << 23)
    }

    @inline(__always) static func exp2(_ x: V) -> V {
        var clamped = x.replacing(with: -126, where: x .< -126)
        clamped = clamped.replacing(with: 126, where: clamped .> 126)
        let magic: Float = 12_582_912
        let shifted = (clamped - 0.5) + magic  // floor(x) held in the low mantissa bits
        let floorValue = shifted - magic
        let f = clamped - floorValue
        let q1 = V(repeating: 0.6931527), q2 = V(repeating: 0.2401532), q3 = V(repeating: 0.0558282)
        let q4 = V(repeating: 0.0089890), q5 = V(repeating: 0.0018766)
        let poly = 1 + f * (q1 + f * (q2 + f * (q3 + f * (q4 + f * q5))))
        let kBits = unsafeBitCast(shifted, to: SIMD8<UInt32>.self) &- magic.bitPattern
        return poly * unsafeBitCast((kBits &+ 127) &<< 23, to: V.self)
    }
}
