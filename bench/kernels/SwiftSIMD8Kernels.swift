/// The Swift `SIMD8<Float>` kernels ckpt used before the C kernels (commit cc3fb67), copied whole (helpers included, so
/// they inline as they did inside CkptKernels) as the benchmark's baseline. Not used by ckpt.
enum SwiftSIMD8Kernels {
    typealias V = SIMD8<Float>

    @inline(__always)
    static func load(_ p: UnsafePointer<Float>) -> V { UnsafeRawPointer(p).loadUnaligned(as: V.self) }

    @inline(__always)
    static func store(_ v: V, _ p: UnsafeMutablePointer<Float>) { UnsafeMutableRawPointer(p).storeBytes(of: v, as: V.self) }

    // The standard library's pointwiseMin/Max and clamped(…) are generic calls here, not inlined vector ops.
    @inline(__always)
    static func maximum(_ a: V, _ b: V) -> V { a.replacing(with: b, where: a .< b) }

    @inline(__always)
    static func minimum(_ a: V, _ b: V) -> V { a.replacing(with: b, where: b .< a) }

    /// e^x for 8 lanes: 2^k · p(r) with k = round(x·log2 e), r = x − k·ln 2 (two-part ln 2), p a degree-6 Taylor
    /// polynomial (|r| ≤ ln2/2, so the truncation error is ≤ 1.3e-7 relative). Inputs are clamped to
    /// [−87.3, 88.7]; below that the result is ~1e-38 instead of a denormal or zero, which no caller can tell apart.
    @inline(__always)
    static func exp(_ x: V) -> V {
        let magic: Float = 12_582_912  // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits
        let xc = minimum(maximum(x, V(repeating: -87.3)), V(repeating: 88.7))
        let shifted = xc * 1.442_695_04 + magic
        let k = shifted - magic
        var r = xc - k * 0.693_145_75  // ln 2 high part (exact in k·hi for |k| < 2^11)
        r = r - k * 1.428_606_8e-6  // ln 2 low part
        var p = V(repeating: 1.0 / 720)
        p = p * r + 1.0 / 120
        p = p * r + 1.0 / 24
        p = p * r + 1.0 / 6
        p = p * r + 0.5
        p = p * r + 1
        p = p * r + 1
        let kBits = unsafeBitCast(shifted, to: SIMD8<UInt32>.self) &- magic.bitPattern
        let scale = unsafeBitCast((kBits &+ 127) &<< 23, to: V.self)
        return p * scale
    }

    /// GELU with the exact erf form, x·Φ(x), Φ(x) = erfc(−x/√2)/2. erfc(z) for z = |x|/√2 ≥ 0 comes from the
    /// Chebyshev fit of Numerical Recipes' `erfcc`, t·exp(−z² + P(t)) with t = 1/(1 + z/2), whose error is below
    /// 1.2e-7 *relative* for every z, so both Φ(x) = 1 − q/2 (x ≥ 0) and the far negative tail q/2 stay accurate.
    @inline(__always)
    static func gelu(_ x: V) -> V {
        let magnitude = unsafeBitCast(unsafeBitCast(x, to: SIMD8<UInt32>.self) & 0x7FFF_FFFF, to: V.self)
        let z = magnitude * 0.707_106_78
        let t = 1 / (1 + 0.5 * z)
        var p = V(repeating: 0.170_872_77)
        p = p * t - 0.822_152_23
        p = p * t + 1.488_515_87
        p = p * t - 1.135_203_98
        p = p * t + 0.278_868_07
        p = p * t - 0.186_288_06
        p = p * t + 0.096_784_18
        p = p * t + 0.374_091_96
        p = p * t + 1.000_023_68
        p = p * t - 1.265_512_23
        let q = t * exp(p - z * z)
        let phi = (0.5 * q).replacing(with: 1 - 0.5 * q, where: x .>= 0)
        return x * phi
    }

    /// y[i] = gelu(y[i] + bias[i % width]) over `rows` rows of `width` values (the fc1 bias fused into GELU). With
    /// `output`, `y` keeps the pre-activation y + bias (what the backward pass needs) and the GELU goes to `output`.
    static func biasGELU(
        _ y: UnsafeMutablePointer<Float>, rows: Int, width: Int, bias: UnsafePointer<Float>, output: UnsafeMutablePointer<Float>? = nil
    ) {
        let vectorEnd = width & ~7
        for r in 0..<rows {
            let row = y + r * width
            let out = (output ?? y) + r * width
            var i = 0
            while i < vectorEnd {
                let pre = load(row + i) + load(bias + i)
                if output != nil { store(pre, row + i) }
                store(gelu(pre), out + i)
                i += 8
            }
            while i < width {  // tail: pad one vector with zeros
                var lane = V.zero
                lane[0] = row[i] + bias[i]
                if output != nil { row[i] = lane[0] }
                out[i] = gelu(lane)[0]
                i += 1
            }
        }
    }

    /// Per-row LayerNorm over `width` values: y = (x − μ)/√(σ² + ε)·γ + β, two-pass in F32 with 8-lane partial
    /// sums (the same order of error as a pairwise sum at these widths). With `statistics`, each row's μ and
    /// 1/√(σ² + ε) are stored there as [rows × 2] for the backward pass.
    static func layerNorm(
        _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, rows: Int, width: Int,
        gamma: UnsafePointer<Float>, beta: UnsafePointer<Float>, eps: Float, statistics: UnsafeMutablePointer<Float>? = nil
    ) {
        let vectorEnd = width & ~7
        let inverseWidth = 1 / Float(width)
        for r in 0..<rows {
            let row = x + r * width
            let out = y + r * width
            var acc = V.zero
            var i = 0
            while i < vectorEnd { acc += load(row + i); i += 8 }
            var sum = acc.sum()
            while i < width { sum += row[i]; i += 1 }
            let mean = sum * inverseWidth
            var acc2 = V.zero
            i = 0
            while i < vectorEnd { let d = load(row + i) - mean; acc2 += d * d; i += 8 }
            var squares = acc2.sum()
            while i < width { let d = row[i] - mean; squares += d * d; i += 1 }
            let inverseStd = 1 / (squares * inverseWidth + eps).squareRoot()
            if let statistics {
                statistics[2 * r] = mean
                statistics[2 * r + 1] = inverseStd
            }
            i = 0
            while i < vectorEnd {
                store((load(row + i) - mean) * inverseStd * load(gamma + i) + load(beta + i), out + i)
                i += 8
            }
            while i < width { out[i] = (row[i] - mean) * inverseStd * gamma[i] + beta[i]; i += 1 }
        }
    }

    /// Row-wise softmax in place over `rows` rows of `width` values with leading dimension `stride`; the row maximum
    /// is subtracted first so no exponent overflows.
    static func softmaxRows(_ s: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int) {
        let vectorEnd = width & ~7
        for r in 0..<rows {
            let row = s + r * stride
            var maxV = V(repeating: -.infinity)
            var i = 0
            while i < vectorEnd { maxV = maximum(maxV, load(row + i)); i += 8 }
            var maximum = maxV.max()
            while i < width { maximum = Swift.max(maximum, row[i]); i += 1 }
            var sumV = V.zero
            i = 0
            while i < vectorEnd {
                let e = exp(load(row + i) - maximum)
                store(e, row + i)
                sumV += e
                i += 8
            }
            var sum = sumV.sum()
            while i < width {
                var lane = V.zero
                lane[0] = row[i] - maximum
                let e = exp(lane)[0]
                row[i] = e
                sum += e
                i += 1
            }
            let inverse = 1 / sum
            i = 0
            while i < vectorEnd { store(load(row + i) * inverse, row + i); i += 8 }
            while i < width { row[i] *= inverse; i += 1 }
        }
    }

    /// Copies `bias` into each of `rows` rows of `y` (leading dimension `stride`), so a following sgemm with
    /// β = 1 adds the product to it.
    static func fillRows(_ y: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int, with bias: UnsafePointer<Float>) {
        for r in 0..<rows { (y + r * stride).update(from: bias, count: width) }
    }

    /// y[r] += bias for each row.
    static func addRows(_ y: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int, bias: UnsafePointer<Float>) {
        let vectorEnd = width & ~7
        for r in 0..<rows {
            let row = y + r * stride
            var i = 0
            while i < vectorEnd { store(load(row + i) + load(bias + i), row + i); i += 8 }
            while i < width { row[i] += bias[i]; i += 1 }
        }
    }
}
extension SwiftSIMD8Kernels {
    /// GELU′(x) = Φ(x) + x·φ(x) for the exact erf form, φ(x) = e^(−x²/2)/√(2π); Φ from the same erfc fit as ``gelu(_:)``.
    @inline(__always)
    static func geluDerivative(_ x: V) -> V {
        let magnitude = unsafeBitCast(unsafeBitCast(x, to: SIMD8<UInt32>.self) & 0x7FFF_FFFF, to: V.self)
        let z = magnitude * 0.707_106_78
        let t = 1 / (1 + 0.5 * z)
        var p = V(repeating: 0.170_872_77)
        p = p * t - 0.822_152_23
        p = p * t + 1.488_515_87
        p = p * t - 1.135_203_98
        p = p * t + 0.278_868_07
        p = p * t - 0.186_288_06
        p = p * t + 0.096_784_18
        p = p * t + 0.374_091_96
        p = p * t + 1.000_023_68
        p = p * t - 1.265_512_23
        let q = t * exp(p - z * z)
        let cdf = (0.5 * q).replacing(with: 1 - 0.5 * q, where: x .>= 0)
        let density = exp(-0.5 * x * x) * 0.398_942_28
        return cdf + x * density
    }

    /// dy[i] *= GELU′(x[i]) over `rows` × `width` values: the gradient at the GELU's input from the gradient at its
    /// output, in place; `x` is the saved pre-activation.
    static func geluBackward(_ dy: UnsafeMutablePointer<Float>, preActivation x: UnsafePointer<Float>, count: Int) {
        let vectorEnd = count & ~7
        var i = 0
        while i < vectorEnd {
            store(load(dy + i) * geluDerivative(load(x + i)), dy + i)
            i += 8
        }
        while i < count {
            var lane = V.zero
            lane[0] = x[i]
            dy[i] *= geluDerivative(lane)[0]
            i += 1
        }
    }

    /// Softmax backward in place, row by row: dS = P ⊙ (dP − Σⱼ dPⱼ·Pⱼ), with `dp` the gradient at the
    /// probabilities `p` (rows of `width`, leading dimension `stride` for both).
    static func softmaxBackward(_ dp: UnsafeMutablePointer<Float>, probabilities p: UnsafePointer<Float>, rows: Int, width: Int, stride: Int) {
        let vectorEnd = width & ~7
        for r in 0..<rows {
            let g = dp + r * stride, prob = p + r * stride
            var acc = V.zero
            var i = 0
            while i < vectorEnd { acc += load(g + i) * load(prob + i); i += 8 }
            var dot = acc.sum()
            while i < width { dot += g[i] * prob[i]; i += 1 }
            i = 0
            while i < vectorEnd { store(load(prob + i) * (load(g + i) - dot), g + i); i += 8 }
            while i < width { g[i] = prob[i] * (g[i] - dot); i += 1 }
        }
    }

    /// LayerNorm backward, per row: with x̂ = (x − μ)·r (r = 1/√(σ² + ε), both from `statistics` [rows × 2] saved
    /// by ``layerNorm(_:_:rows:width:gamma:beta:eps:statistics:)``) and g = dy ⊙ γ,
    /// dx += r·(g − mean(g) − x̂·mean(g ⊙ x̂)). Accumulates into `dx` (the residual stream's gradient).
    static func layerNormBackward(
        _ dy: UnsafePointer<Float>, input x: UnsafePointer<Float>, statistics: UnsafePointer<Float>, gamma: UnsafePointer<Float>,
        rows: Int, width: Int, accumulatingInto dx: UnsafeMutablePointer<Float>
    ) {
        let vectorEnd = width & ~7
        let inverseWidth = 1 / Float(width)
        for r in 0..<rows {
            let g = dy + r * width, row = x + r * width, out = dx + r * width
            let mean = statistics[2 * r], inverseStd = statistics[2 * r + 1]
            var sumG = V.zero, sumGX = V.zero
            var i = 0
            while i < vectorEnd {
                let gi = load(g + i) * load(gamma + i)
                let xi = (load(row + i) - mean) * inverseStd
                sumG += gi
                sumGX += gi * xi
                i += 8
            }
            var meanG = sumG.sum(), meanGX = sumGX.sum()
            while i < width {
                let gi = g[i] * gamma[i]
                meanG += gi
                meanGX += gi * (row[i] - mean) * inverseStd
                i += 1
            }
            meanG *= inverseWidth
            meanGX *= inverseWidth
            i = 0
            while i < vectorEnd {
                let gi = load(g + i) * load(gamma + i)
                let xi = (load(row + i) - mean) * inverseStd
                store(load(out + i) + inverseStd * (gi - meanG - xi * meanGX), out + i)
                i += 8
            }
            while i < width {
                let gi = g[i] * gamma[i]
                let xi = (row[i] - mean) * inverseStd
                out[i] += inverseStd * (gi - meanG - xi * meanGX)
                i += 1
            }
        }
    }
}
