import CkptCore

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

    /// Squared error of quantizing the group under `p` (already in stored precision).
    func squaredError(_ w: UnsafePointer<Float>, _ n: Int, _ p: GroupParameters) -> Float {
        var sum: Float = 0
        for j in 0..<n {
            let d = w[j] - value(code(w[j], p), p)
            sum += d * d
        }
        return sum
    }

    // MARK: one group

    /// Quantizes `n` weights into `codes`; returns the stored parameters and the error statistics.
    func quantize(
        _ w: UnsafePointer<Float>, _ n: Int, codes: UnsafeMutablePointer<UInt8>, scratch: UnsafeMutablePointer<Float>
    ) -> (GroupParameters, squaredError: Double, maxError: Float) {
        var lo = w[0], hi = w[0]
        for j in 1..<n {
            lo = min(lo, w[j])
            hi = max(hi, w[j])
        }
        let p: GroupParameters
        switch settings.method {
        case .rtn:
            // MLX computes codes with the float32 parameters and only then stores them in the weight dtype.
            let exact = rangeParameters(lo: lo, hi: hi)
            let result = storedParameters(exact)
            var squared: Double = 0
            var largest: Float = 0
            for j in 0..<n {
                let q = code(w[j], exact)
                codes[j] = UInt8(q)
                let d = abs(w[j] - value(q, result))
                squared += Double(d * d)
                largest = max(largest, d)
            }
            return (result, squared, largest)
        case .mse:
            p = clippingSearch(w, n, lo: lo, hi: hi)
        case .hqq:
            p = settings.grid == .symmetric
                ? halfQuadraticScale(w, n, lo: lo, hi: hi, scratch: scratch)
                : halfQuadraticZero(w, n, lo: lo, hi: hi, scratch: scratch)
        }
        var squared: Double = 0
        var largest: Float = 0
        for j in 0..<n {
            let q = code(w[j], p)
            codes[j] = UInt8(q)
            let d = abs(w[j] - value(q, p))
            squared += Double(d * d)
            largest = max(largest, d)
        }
        return (p, squared, largest)
    }

    // MARK: MSE clipping search

    /// Shrink factors tried: 1.00, 0.98, … 0.40 (the unclipped range first, so the search is never worse than RTN).
    static let clippingFactors: [Float] = (0...30).map { 1 - Float($0) * 0.02 }

    func clippingSearch(_ w: UnsafePointer<Float>, _ n: Int, lo: Float, hi: Float) -> GroupParameters {
        var best = storedParameters(rangeParameters(lo: lo, hi: hi))
        var bestError = squaredError(w, n, best)
        for alpha in Self.clippingFactors.dropFirst() {
            let candidate = storedParameters(rangeParameters(lo: lo * alpha, hi: hi * alpha))
            let error = squaredError(w, n, candidate)
            if error < bestError {
                bestError = error
                best = candidate
            }
        }
        return best
    }

    // MARK: HQQ

    static let hqqP: Float = 0.7
    static let hqqBeta: Float = 10
    static let hqqKappa: Float = 1.01
    static let hqqIterations = 20

    /// HQQ (mobiusml/hqq `optimize_weights_proximal`): fixed min–max scale, zero point from half-quadratic
    /// splitting with an Lp shrinkage of the error; stops when the mean absolute error stops falling.
    func halfQuadraticZero(_ w: UnsafePointer<Float>, _ n: Int, lo: Float, hi: Float, scratch: UnsafeMutablePointer<Float>) -> GroupParameters {
        guard hi > lo else { return storedParameters(rangeParameters(lo: lo, hi: hi)) }
        let sigma = maxCode / (hi - lo)  // inverse scale, as HQQ keeps it
        var zero = -lo * sigma
        var bestZero = zero
        var bestError = Float.infinity
        var beta = Self.hqqBeta
        for _ in 0..<Self.hqqIterations {
            var absError: Float = 0
            var zeroSum: Float = 0
            for j in 0..<n {
                let q = Self.clamp(Self.rint(w[j] * sigma + zero), 0, maxCode)
                let r = (q - zero) / sigma
                let e = w[j] - r
                let a = abs(e)
                absError += a
                let shrunk = max(0, a - FastMath.powNegative03(a) / beta)
                let we = e < 0 ? -shrunk : shrunk
                zeroSum += q - (w[j] - we) * sigma
            }
            absError /= Float(n)
            guard absError < bestError else { break }
            bestError = absError
            bestZero = zero
            zero = zeroSum / Float(n)
            beta *= Self.hqqKappa
        }
        let scale = 1 / sigma
        switch settings.grid {
        case .mlxAffine:
            return storedParameters(GroupParameters(scale: scale, offset: -bestZero * scale))
        default:
            return storedParameters(GroupParameters(scale: scale, offset: Self.clamp(bestZero.rounded(.toNearestOrEven), 0, maxCode)))
        }
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

/// Approximations used inside iterative searches, where a relative error of 1e-4 is immaterial.
enum FastMath {
    /// `x^(-0.3)` for x ≥ 0 (HQQ's `|e|^(p-1)` with p = 0.7); +inf at 0, as the reference's pow gives.
    @inline(__always) static func powNegative03(_ x: Float) -> Float {
        guard x > 0 else { return .infinity }
        return exp2(-0.3 * log2(x))
    }

    /// log2 for positive normal floats: exponent plus a polynomial in the mantissa.
    @inline(__always) static func log2(_ x: Float) -> Float {
        let bits = x.bitPattern
        let exponent = Float(Int32(bitPattern: (bits >> 23) & 0xFF) - 127)
        let m = Float(bitPattern: (bits & 0x7F_FFFF) | 0x3F80_0000)  // [1, 2)
        // Minimax-style fit of log2(m) on [1, 2) (max error ~1e-4).
        let t = m - 1
        let poly = t * (1.4425449 + t * (-0.7181452 + t * (0.4575485 + t * (-0.2779042 + t * (0.121797 + t * -0.0258411)))))
        return exponent + poly
    }

    /// 2^x for moderate x: integer part into the exponent, polynomial for the fraction.
    @inline(__always) static func exp2(_ x: Float) -> Float {
        let clamped = min(max(x, -126), 126)
        let floorValue = GroupQuantizer.rint(clamped - 0.5)
        let f = clamped - floorValue  // [0, 1]
        let poly = 1 + f * (0.6931472 + f * (0.2402265 + f * (0.0555041 + f * (0.0096181 + f * 0.0013333))))
        let scale = Float(bitPattern: UInt32(Int32(floorValue) + 127) << 23)
        return poly * scale
    }
}
