#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CkptCore

/// Adam on a flat buffer of pixels, step for step what `torch.optim.Adam` (single-tensor path, no AMSGrad, no
/// weight decay) computes in F32, followed by the projection into the valid pixel box.
///
/// Each element's update depends only on its own pixel, gradient and moments, so one optimiser over a whole shard
/// and one per image give bit-identical images. The moments `m`, `v` and the step count are owned here.
public struct PixelAdam: Sendable {
    public let beta1: Double
    public let beta2: Double
    public let epsilon: Double
    /// Updates applied so far (the `t` of the bias corrections; the next update uses `steps + 1`).
    public private(set) var steps = 0
    /// First moments, one per pixel.
    public private(set) var m: [Float]
    /// Second moments, one per pixel.
    public private(set) var v: [Float]

    /// An optimiser for `count` pixels with zero moments. PSAQ-ViT uses β = (0.5, 0.9), ε = 1e-8 (the defaults).
    public init(count: Int, beta1: Double = 0.5, beta2: Double = 0.9, epsilon: Double = 1e-8) throws(CkptError) {
        guard count >= 0 else { throw CkptError(.invalidArgument, "negative pixel count \(count)") }
        guard (0..<1).contains(beta1), (0..<1).contains(beta2), epsilon.isFinite, epsilon > 0 else {
            throw CkptError(.invalidArgument, "Adam needs betas in [0, 1) and a positive epsilon (got \(beta1), \(beta2), \(epsilon))")
        }
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        m = [Float](repeating: 0, count: count)
        v = [Float](repeating: 0, count: count)
    }

    /// One Adam update of `pixels` (minimising: the step goes against `gradient`) at `learningRate`, then, when
    /// `box` is given, every channel clamped into it (`pixels` laid out `[N, C, H·W]` with `planeSize` = H·W).
    ///
    /// The arithmetic follows torch's: `m ← lerp(m, g, 1−β1)`, `v ← β2·v + (1−β2)·g·g`,
    /// `x ← x − (lr/(1−β1ᵗ))·m / (√v/√(1−β2ᵗ) + ε)`, the scalar factors in F64 and rounded to F32 once.
    public mutating func step(
        _ pixels: UnsafeMutableBufferPointer<Float>, gradient: UnsafeBufferPointer<Float>, learningRate: Double,
        box: PixelBox? = nil, planeSize: Int = 1
    ) {
        precondition(pixels.count == m.count && gradient.count == m.count, "Adam was made for \(m.count) pixels")
        steps += 1
        let t = Double(steps)
        let weight = Float(1 - beta1)
        let lerpLow = abs(weight) < 0.5
        let complement = 1 - weight
        let b2 = Float(beta2), oneMinusB2 = Float(1 - beta2)
        let stepSize = Float(-(learningRate / (1 - pow(beta1, t))))
        let correction2 = Float((1 - pow(beta2, t)).squareRoot())
        let eps = Float(epsilon)
        m.withUnsafeMutableBufferPointer { m in
            v.withUnsafeMutableBufferPointer { v in
                for i in 0..<pixels.count {
                    let g = gradient[i]
                    // torch's lerp: the form chosen by |weight| keeps it exact at both ends.
                    m[i] = lerpLow ? m[i] + weight * (g - m[i]) : g - (g - m[i]) * complement
                    v[i] = v[i] * b2 + oneMinusB2 * g * g
                    let denominator = v[i].squareRoot() / correction2 + eps
                    pixels[i] = pixels[i] + stepSize * m[i] / denominator
                }
            }
        }
        if let box { box.clamp(pixels, planeSize: planeSize) }
    }
}
