import CkptCore

/// RepQ-ViT's scale reparameterisation of a post-LayerNorm activation (`test_quant.py`, "Scale
/// reparameterization"): the per-channel quantizer `(Δ_c, zp_c)` of a LayerNorm's output becomes one per-tensor
/// quantizer `(Δ̃, zp̃)` by folding the per-channel differences into the LayerNorm's affine parameters and the
/// Linear layer(s) that read its output (q, k, v or the fused qkv after `norm1`; fc1 after `norm2`):
///
///     Δ̃ = mean_c Δ_c      zp̃ = mean_c zp_c  (rounded half to even: see below)
///     min_c = −zp_c·Δ_c   miñ = −zp̃·Δ̃     r_c = Δ_c/Δ̃     b_c = min_c/r_c − miñ
///     γ ← γ/r             β ← β/r − b
///     W[:, c] ← W[:, c]·r_c                bias ← bias + W'·b   (W' the rescaled weight; a missing bias is 0)
///
/// **The fold is exact.** LN'(x)_c = LN(x)_c/r_c − b_c, so `W'·LN'(x) + bias' = W·LN(x) + bias` for every input.
///
/// **What quantization gains.** With the integer zero point used here, per-tensor quantization of LN'(x) with
/// `(Δ̃, zp̃)` gives, channel by channel, *the same integer codes* as per-channel quantization of LN(x) with
/// `(Δ_c, zp_c)`, and dequantized values related by the same map: `Q̃(LN'(x))_c = Q_c(LN(x)_c)/r_c − b_c`. (Both
/// codes are `clamp(round((y − min_c)/Δ_c), 0, 2^b − 1)` once the integer zero points are taken out of the
/// rounding.) Hence `W'·Q̃(LN'(x)) + bias' = W·Q(LN(x)) + bias`: the folded model with per-tensor activation
/// quantization computes what the original model computes with per-channel activation quantization.
///
/// **Rounding zp̃ (our choice).** RepQ-ViT sets `zp̃ = torch.mean(zp_c)` unrounded, a fractional zero point: its
/// per-tensor grid is then shifted by the fraction against the per-channel one, so the codes above agree only
/// approximately, and the zero point has no integer code. ckpt rounds the mean half to even (`torch.round`) by
/// default, which keeps the equality exact and the side file integral; `roundsZeroPoint: false` reproduces
/// RepQ-ViT.
///
/// Generic over the scalar so the fold can be checked in Double; the model path uses Float. All products and
/// quotients are those of the formulas above in `Scalar`; the mean and the `W'·b` sums are accumulated in Double.
/// RepQ-ViT then re-initialises the weight quantizers of the rescaled Linears and calibrates again: the caller's
/// part.
public struct LayerNormReparameterization<Scalar: BinaryFloatingPoint & Sendable>: Sendable {
    /// A Linear layer reading the LayerNorm's output: weight `[out × in]` row-major, `in` = the LayerNorm's width.
    public struct Linear: Sendable, Equatable {
        public var weight: [Scalar]
        public var bias: [Scalar]?

        public init(weight: [Scalar], bias: [Scalar]?) {
            self.weight = weight
            self.bias = bias
        }
    }

    /// The per-tensor quantizer of the new LayerNorm output.
    public let scale: Scalar
    public let zeroPoint: Scalar
    /// r_c and b_c.
    public let ratios: [Scalar]
    public let shifts: [Scalar]
    /// γ/r and β/r − b.
    public let gamma: [Scalar]
    public let beta: [Scalar]
    /// The rescaled Linears, in the order given; each has a bias now.
    public let linears: [Linear]

    /// Folds the per-channel quantizer `(scales, zeroPoints)` of a LayerNorm output of width D = `gamma.count`
    /// into the LayerNorm (`gamma`, `beta`) and the Linears that read it. Refuses mismatched sizes
    /// (`shapeMismatch`) and scales that are not positive and finite or zero points that are not finite
    /// (`invalidArgument`).
    public init(
        scales: [Scalar], zeroPoints: [Scalar], gamma: [Scalar], beta: [Scalar], linears: [Linear], roundsZeroPoint: Bool = true
    ) throws(CkptError) {
        let width = gamma.count
        guard width > 0, scales.count == width, zeroPoints.count == width, beta.count == width else {
            throw CkptError(.shapeMismatch, "LayerNorm fold: \(scales.count) scales, \(zeroPoints.count) zero points, \(gamma.count) γ and \(beta.count) β")
        }
        for (c, s) in scales.enumerated() where !(s.isFinite && s > 0) {
            throw CkptError(.invalidArgument, "LayerNorm fold: scale of channel \(c) is \(Double(s)); scales are positive and finite")
        }
        for (c, z) in zeroPoints.enumerated() where !z.isFinite {
            throw CkptError(.invalidArgument, "LayerNorm fold: zero point of channel \(c) is \(Double(z))")
        }
        for (i, linear) in linears.enumerated() {
            guard !linear.weight.isEmpty, linear.weight.count % width == 0 else {
                throw CkptError(.shapeMismatch, "LayerNorm fold: Linear \(i) has \(linear.weight.count) weights, not a multiple of the width \(width)")
            }
            if let bias = linear.bias, bias.count != linear.weight.count / width {
                throw CkptError(.shapeMismatch, "LayerNorm fold: Linear \(i) has \(bias.count) biases for \(linear.weight.count / width) outputs")
            }
        }
        let meanScale = Scalar(scales.reduce(0.0) { $0 + Double($1) } / Double(width))
        var meanZero = Scalar(zeroPoints.reduce(0.0) { $0 + Double($1) } / Double(width))
        if roundsZeroPoint { meanZero = meanZero.rounded(.toNearestOrEven) }
        let targetMin = -meanZero * meanScale
        var ratios = [Scalar](), shifts = [Scalar]()
        ratios.reserveCapacity(width)
        shifts.reserveCapacity(width)
        for c in 0..<width {
            let r = scales[c] / meanScale
            ratios.append(r)
            shifts.append((-zeroPoints[c] * scales[c]) / r - targetMin)
        }
        scale = meanScale
        zeroPoint = meanZero
        self.ratios = ratios
        self.shifts = shifts
        self.gamma = (0..<width).map { gamma[$0] / ratios[$0] }
        self.beta = (0..<width).map { beta[$0] / ratios[$0] - shifts[$0] }
        self.linears = linears.map { linear in
            let outputs = linear.weight.count / width
            var weight = linear.weight
            var bias = linear.bias ?? [Scalar](repeating: 0, count: outputs)
            for o in 0..<outputs {
                var sum: Double = 0
                for c in 0..<width {
                    weight[o * width + c] *= ratios[c]
                    sum += Double(weight[o * width + c]) * Double(shifts[c])
                }
                bias[o] += Scalar(sum)
            }
            return Linear(weight: weight, bias: bias)
        }
    }
}

extension LayerNormReparameterization where Scalar == Float {
    /// The fold of a per-column ``UniformQuantizer`` (as calibrated on the LayerNorm output).
    public init(inputQuantizer: UniformQuantizer, gamma: [Float], beta: [Float], linears: [Linear], roundsZeroPoint: Bool = true) throws(CkptError) {
        guard inputQuantizer.granularity == .perColumn else {
            throw CkptError(.invalidArgument, "LayerNorm fold: the input quantizer is \(inputQuantizer.granularity.rawValue)-wise, not per column")
        }
        try self.init(
            scales: inputQuantizer.scales, zeroPoints: inputQuantizer.zeroPoints, gamma: gamma, beta: beta, linears: linears,
            roundsZeroPoint: roundsZeroPoint)
    }

    /// The per-tensor quantizer `(Δ̃, zp̃)` that replaces the per-channel one, at `bits`.
    public func inputQuantizer(bits: Int) throws(CkptError) -> UniformQuantizer {
        try UniformQuantizer(bits: bits, scale: scale, zeroPoint: zeroPoint)
    }
}
