import CCkptKernels

/// The reverse of the element-wise and row-wise kernels: gradients with respect to each kernel's input, given the
/// gradient with respect to its output and what the forward pass saved. Dispatched to the C kernels with the
/// forward ones, which share every approximation with ``geluDerivative(_:)`` and the forward helpers.
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
        ckpt_gelu_backward(dy, x, count)
    }

    /// Softmax backward in place, row by row: dS = P ⊙ (dP − Σⱼ dPⱼ·Pⱼ), with `dp` the gradient at the
    /// probabilities `p` (rows of `width`, leading dimension `stride` for both).
    package static func softmaxBackward(_ dp: UnsafeMutablePointer<Float>, probabilities p: UnsafePointer<Float>, rows: Int, width: Int, stride: Int) {
        ckpt_softmax_backward(dp, p, rows, width, stride)
    }

    /// LayerNorm backward, per row: with x̂ = (x − μ)·r (r = 1/√(σ² + ε), both from `statistics` [rows × 2] saved
    /// by ``layerNorm(_:_:rows:width:gamma:beta:eps:statistics:)``) and g = dy ⊙ γ,
    /// dx += r·(g − mean(g) − x̂·mean(g ⊙ x̂)). Accumulates into `dx` (the residual stream's gradient).
    package static func layerNormBackward(
        _ dy: UnsafePointer<Float>, input x: UnsafePointer<Float>, statistics: UnsafePointer<Float>, gamma: UnsafePointer<Float>,
        rows: Int, width: Int, accumulatingInto dx: UnsafeMutablePointer<Float>
    ) {
        ckpt_layer_norm_backward(dy, x, statistics, gamma, rows, width, dx)
    }
}
