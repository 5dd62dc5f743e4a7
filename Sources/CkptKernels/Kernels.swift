import CCkptKernels

/// The element-wise and row-wise kernels of the ViT forward and backward passes. The row kernels (bias + GELU,
/// LayerNorm, softmax, bias rows and their backward) run in C (`CCkptKernels`), compiled for baseline x86-64, AVX2
/// and AVX-512 and dispatched once at run time from CPUID (see ``Kernels/ISA``); every level gives bit-identical
/// results. The `SIMD8<Float>` helpers here (`exp`, `gelu`, `geluDerivative`) are the same approximations for Swift
/// callers that work on vectors of their own (libm's `expf`/`erff` are scalar calls and would cost as much as the
/// GEMMs around them).
package enum Kernels {
    package typealias V = SIMD8<Float>

    @inline(__always)
    package static func load(_ p: UnsafePointer<Float>) -> V { UnsafeRawPointer(p).loadUnaligned(as: V.self) }

    @inline(__always)
    package static func store(_ v: V, _ p: UnsafeMutablePointer<Float>) { UnsafeMutableRawPointer(p).storeBytes(of: v, as: V.self) }

    // The standard library's pointwiseMin/Max and clamped(…) are generic calls here, not inlined vector ops.
    @inline(__always)
    package static func maximum(_ a: V, _ b: V) -> V { a.replacing(with: b, where: a .< b) }

    @inline(__always)
    package static func minimum(_ a: V, _ b: V) -> V { a.replacing(with: b, where: b .< a) }

    /// e^x for 8 lanes: 2^k · p(r) with k = round(x·log2 e), r = x − k·ln 2 (two-part ln 2), p a degree-6 Taylor
    /// polynomial (|r| ≤ ln2/2, so the truncation error is ≤ 1.3e-7 relative). Inputs are clamped to
    /// [−87.3, 88.7]; below that the result is ~1e-38 instead of a denormal or zero, which no caller can tell apart.
    @inline(__always)
    package static func exp(_ x: V) -> V {
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

    /// Φ(x) = erfc(−x/√2)/2, the standard normal CDF. erfc(z) for z = |x|/√2 ≥ 0 comes from the Chebyshev fit of
    /// Numerical Recipes' `erfcc`, t·exp(−z² + P(t)) with t = 1/(1 + z/2), whose error is below 1.2e-7 *relative*
    /// for every z, so both Φ(x) = 1 − q/2 (x ≥ 0) and the far negative tail q/2 stay accurate. Shared by
    /// ``gelu(_:)`` and ``geluDerivative(_:)``.
    @inline(__always)
    package static func normalCDF(_ x: V) -> V {
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
        return (0.5 * q).replacing(with: 1 - 0.5 * q, where: x .>= 0)
    }

    /// GELU with the exact erf form, x·Φ(x) (``normalCDF(_:)``).
    @inline(__always)
    package static func gelu(_ x: V) -> V {
        x * normalCDF(x)
    }

    /// y[i] = gelu(y[i] + bias[i % width]) over `rows` rows of `width` values (the fc1 bias fused into GELU). With
    /// `output`, `y` keeps the pre-activation y + bias (what the backward pass needs) and the GELU goes to `output`.
    package static func biasGELU(
        _ y: UnsafeMutablePointer<Float>, rows: Int, width: Int, bias: UnsafePointer<Float>, output: UnsafeMutablePointer<Float>? = nil
    ) {
        ckpt_bias_gelu(y, rows, width, bias, output)
    }

    /// Per-row LayerNorm over `width` values: y = (x − μ)/√(σ² + ε)·γ + β, two-pass in F32 with 16-lane partial
    /// sums folded in a fixed tree (the same order of error as a pairwise sum at these widths). With `statistics`,
    /// each row's μ and 1/√(σ² + ε) are stored there as [rows × 2] for the backward pass.
    package static func layerNorm(
        _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, rows: Int, width: Int,
        gamma: UnsafePointer<Float>, beta: UnsafePointer<Float>, eps: Float, statistics: UnsafeMutablePointer<Float>? = nil
    ) {
        ckpt_layer_norm(x, y, rows, width, gamma, beta, eps, statistics)
    }

    /// Row-wise softmax in place over `rows` rows of `width` values with leading dimension `stride`; the row maximum
    /// is subtracted first so no exponent overflows.
    package static func softmaxRows(_ s: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int) {
        ckpt_softmax_rows(s, rows, width, stride)
    }

    /// Copies `bias` into each of `rows` rows of `y` (leading dimension `stride`), so a following sgemm with
    /// β = 1 adds the product to it.
    package static func fillRows(_ y: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int, with bias: UnsafePointer<Float>) {
        for r in 0..<rows { (y + r * stride).update(from: bias, count: width) }
    }

    /// y[r] += bias for each row.
    package static func addRows(_ y: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int, bias: UnsafePointer<Float>) {
        ckpt_add_rows(y, rows, width, stride, bias)
    }
}
