/// PSAQ-ViT's patch-similarity entropy (PSE) loss for one block of one image.
///
/// Input: `O` [t × D], the attention heads' outputs (`attn @ v`, before the output projection), heads concatenated
/// along D (head h in columns h·hd ..< (h+1)·hd, hd = D/H). Then, as PSAQ-ViT computes it:
/// 1. average the heads, `Aᵢ = (1/H) Σ_h O[i, h·hd ..< (h+1)·hd]`, and drop the CLS row: n = t − 1 patch rows;
/// 2. the cosine-similarity matrix `S = [Aᵢ·Aⱼ / (‖Aᵢ‖‖Aⱼ‖)]`, n × n, diagonal included (norms clamped at 1e-8 as
///    `torch.cosine_similarity`);
/// 3. a Gaussian kernel density estimate of the n² entries of S with bandwidth h = 0.01,
///    `p̂(y) = 1/(n²·h·√(2π)) Σ exp(−(y − S_ij)²/(2h²))`: the normalisation of PSAQ-ViT's `utils/kde.py`
///    (`GaussianKernel`: coefficient `1/√(2π h²)`, mean over the samples), which is the standard one;
/// 4. p̂ at 10 points `y_k` evenly spaced between min(S) and max(S) (as `torch.linspace`), and the differential
///    entropy `H = −∫ p̂ log(p̂ + 1e-4)` by the trapezoid rule, with `p̂ + 1e-4` in both factors as PSAQ-ViT writes
///    it: `f = −(p̂ + 1e-4)·log(p̂ + 1e-4)`;
/// 5. loss = −H.
///
/// The evaluation points are constants of the gradient (detached: PSAQ-ViT takes min and max with `.item()`),
/// so the gradient is that of the loss with the points held fixed. PSAQ-ViT takes min and max over the whole batch
/// and averages the entropies over it; here both are per image, so images never couple (sum the per-image losses
/// and divide by the batch size to reproduce the batch mean when all images share min and max).
public enum PatchSimilarityEntropy {
    /// The kernel bandwidth h.
    public static let bandwidth = 0.01
    /// The number of evaluation points.
    public static let points = 10
    /// The offset inside the entropy's logarithm.
    public static let logOffset = 1e-4

    /// The loss of one block; adds `weight · ∂loss/∂O` into `gradient` ([t × D]; the CLS row gets 0). With
    /// `evaluationRange` the points span that range instead of min(S)…max(S) (for checking the gradient with fixed
    /// points). Returns the loss (unweighted).
    @inlinable
    public static func loss<T: SynthesisFloat>(
        headOutputs o: UnsafeBufferPointer<T>, tokens t: Int, width d: Int, heads: Int, weight: T,
        addingInto gradient: UnsafeMutableBufferPointer<T>, evaluationRange: ClosedRange<T>? = nil
    ) -> T {
        precondition(t >= 2 && heads > 0 && d % heads == 0, "need at least one patch token and D divisible by the heads")
        precondition(o.count == t * d && gradient.count == t * d, "head outputs are not [\(t) × \(d)]")
        let n = t - 1, hd = d / heads
        // 1. Head mean of the patch rows, unit rows Â and the norms.
        var unit = [T](repeating: 0, count: n * hd)
        var norm = [T](repeating: 0, count: n)
        var clamped = [Bool](repeating: false, count: n)
        let inverseHeads = 1 / T(heads)
        for i in 0..<n {
            let row = (1 + i) * d
            var squares: T = 0
            for k in 0..<hd {
                var sum: T = 0
                for h in 0..<heads { sum += o[row + h * hd + k] }
                let a = sum * inverseHeads
                unit[i * hd + k] = a
                squares += a * a
            }
            var r = squares.squareRoot()
            if r < T(1e-8) { r = T(1e-8); clamped[i] = true }
            norm[i] = r
            for k in 0..<hd { unit[i * hd + k] /= r }
        }
        // 2. S = Â Âᵀ.
        var s = [T](repeating: 0, count: n * n)
        for i in 0..<n {
            for j in i..<n {
                var dot: T = 0
                for k in 0..<hd { dot += unit[i * hd + k] * unit[j * hd + k] }
                s[i * n + j] = dot
                s[j * n + i] = dot
            }
        }
        // 3–4. The evaluation points (constants), the density and the entropy.
        let lower = evaluationRange?.lowerBound ?? s.min()!
        let upper = evaluationRange?.upperBound ?? s.max()!
        let y = linspace(lower, upper, points)
        let h = T(bandwidth), variance = h * h
        let coefficient = 1 / ((2 * T.pi * variance).squareRoot() * T(n * n))
        var p = [T](repeating: 0, count: points)
        for k in 0..<points {
            var sum: T = 0
            for v in s {
                let u = y[k] - v
                sum += T.exp(-u * u / (2 * variance))
            }
            p[k] = coefficient * sum
        }
        let offset = T(logOffset)
        var entropy: T = 0
        for k in 0..<(points - 1) {
            let f0 = -(p[k] + offset) * T.log(p[k] + offset)
            let f1 = -(p[k + 1] + offset) * T.log(p[k + 1] + offset)
            entropy += (y[k + 1] - y[k]) * (f0 + f1) / 2
        }
        // Backward. ∂loss/∂p_k = w_k (log(p_k + 1e-4) + 1), w_k the trapezoid weights.
        var dp = [T](repeating: 0, count: points)
        for k in 0..<points {
            var w: T = 0
            if k + 1 < points { w += (y[k + 1] - y[k]) / 2 }
            if k > 0 { w += (y[k] - y[k - 1]) / 2 }
            dp[k] = weight * w * (T.log(p[k] + offset) + 1)
        }
        // ∂/∂S_ij = Σ_k dp_k · coefficient · exp(−u²/2h²) · u/h², u = y_k − S_ij; symmetrised into M = G + Gᵀ.
        var m = [T](repeating: 0, count: n * n)
        for idx in 0..<(n * n) {
            var g: T = 0
            for k in 0..<points {
                let u = y[k] - s[idx]
                g += dp[k] * T.exp(-u * u / (2 * variance)) * u
            }
            m[idx] = g * coefficient / variance
        }
        for i in 0..<n {
            for j in i..<n {
                let sym = m[i * n + j] + m[j * n + i]
                m[i * n + j] = sym
                m[j * n + i] = sym
            }
        }
        // ∂S_ij/∂Aᵢ = (Âⱼ − S_ij Âᵢ)/‖Aᵢ‖ (the second term absent for a clamped norm); then back over the head mean.
        var da = [T](repeating: 0, count: hd)
        for i in 0..<n {
            for k in 0..<hd { da[k] = 0 }
            var projection: T = 0
            for j in 0..<n {
                let mij = m[i * n + j]
                projection += mij * s[i * n + j]
                for k in 0..<hd { da[k] += mij * unit[j * hd + k] }
            }
            if clamped[i] { projection = 0 }
            let scale = inverseHeads / norm[i]
            let row = (1 + i) * d
            for k in 0..<hd {
                let g = (da[k] - projection * unit[i * hd + k]) * scale
                for head in 0..<heads { gradient[row + head * hd + k] += g }
            }
        }
        return -entropy
    }

    /// `torch.linspace(start, end, steps)`: the first half counted up from `start`, the rest down from `end`.
    @inlinable
    static func linspace<T: SynthesisFloat>(_ start: T, _ end: T, _ steps: Int) -> [T] {
        let step = (end - start) / T(steps - 1)
        let halfway = steps / 2
        return (0..<steps).map { i in i < halfway ? start + step * T(i) : end - step * T(steps - i - 1) }
    }
}
