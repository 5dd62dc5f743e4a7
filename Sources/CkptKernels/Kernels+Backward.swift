/// The reverse of the element-wise and row-wise kernels: gradients with respect to each kernel's input, given the
/// gradient with respect to its output and what the forward pass saved. Written on the same `SIMD8<Float>`
/// primitives as the forward kernels, so forward and backward agree on every approximation.
extension Kernels {
    /// GELU′(x) = Φ(x) + x·φ(x) for the exact erf form, φ(x) = e^(−x²/2)/√(2π); Φ from the same erfc fit as ``gelu(_:)``.
    @inline(__always)
    package static func geluDerivative(_ x: V) -> V {
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
    package static func geluBackward(_ dy: UnsafeMutablePointer<Float>, preActivation x: UnsafePointer<Float>, count: Int) {
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
    package static func softmaxBackward(_ dp: UnsafeMutablePointer<Float>, probabilities p: UnsafePointer<Float>, rows: Int, width: Int, stride: Int) {
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
    package static func layerNormBackward(
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
