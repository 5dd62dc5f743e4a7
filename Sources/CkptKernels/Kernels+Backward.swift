import CCkptKernels

/// The reverse of the element-wise and row-wise kernels: gradients with respect to each kernel's input, given the
/// gradient with respect to its output and what the forward pass saved. Dispatched to the C kernels with the
/// forward ones, which share every approximation with ``geluDerivative(_:)`` and the forward helpers.
extension Kernels {
    /// GELU′(x) = Φ(x) + x·φ(x) for the exact erf form, φ(x) = e^(−x²/2)/√(2π); Φ from ``normalCDF(_:)``, as in ``gelu(_:)``.
    @inline(__always)
    package static func geluDerivative(_ x: V) -> V {
        let cdf = normalCDF(x)
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
