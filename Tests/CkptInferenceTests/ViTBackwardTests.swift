import CkptCore
import CkptFormats
@testable import CkptInference
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The backward pass to the input against central finite differences of an independent float64 forward pass of the
/// same tiny ViT (LayerScale, 3 blocks, 2 heads, 2 images in one micro-batch), for a loss that touches every hook:
/// soft cross-entropy on the head's logits, a linear term on the CLS features, a linear term on the attention
/// probabilities of two blocks (all rows, so the softmax backward is exercised beyond the CLS row) and one on a
/// block's attention output.
@Suite struct ViTBackwardTests {
    static let dim = 16, heads = 2, mlp = 40, depth = 3, patch = 4, grid = 3, channels = 3, classes = 5
    static var size: Int { grid * patch }
    static var tokens: Int { grid * grid + 1 }
    static let images = 2

    /// Deterministic pseudo-random values in [−scale, scale].
    static func values(_ count: Int, seed: UInt64, scale: Double) -> [Double] {
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        return (0..<count).map { _ in
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            return (Double(state >> 11) / 9_007_199_254_740_992 * 2 - 1) * scale
        }
    }

    /// The model's tensors (timm names, DINOv2-style LayerScale), as F64 values.
    static let weights: [String: (shape: [Int], values: [Double])] = {
        var w: [String: (shape: [Int], values: [Double])] = [:]
        var seed: UInt64 = 1
        func add(_ name: String, _ shape: [Int], scale: Double, offset: Double = 0) {
            seed += 1
            w[name] = (shape, values(shape.reduce(1, *), seed: seed, scale: scale).map { $0 + offset })
        }
        let d = dim
        add("patch_embed.proj.weight", [d, channels, patch, patch], scale: 0.25)
        add("patch_embed.proj.bias", [d], scale: 0.1)
        add("cls_token", [1, 1, d], scale: 0.5)
        add("pos_embed", [1, tokens, d], scale: 0.5)
        for i in 0..<depth {
            add("blocks.\(i).norm1.weight", [d], scale: 0.3, offset: 1)
            add("blocks.\(i).norm1.bias", [d], scale: 0.1)
            add("blocks.\(i).attn.qkv.weight", [3 * d, d], scale: 0.6)
            add("blocks.\(i).attn.qkv.bias", [3 * d], scale: 0.1)
            add("blocks.\(i).attn.proj.weight", [d, d], scale: 0.3)
            add("blocks.\(i).attn.proj.bias", [d], scale: 0.1)
            add("blocks.\(i).ls1.gamma", [d], scale: 0.4, offset: 0.6)
            add("blocks.\(i).norm2.weight", [d], scale: 0.3, offset: 1)
            add("blocks.\(i).norm2.bias", [d], scale: 0.1)
            add("blocks.\(i).mlp.fc1.weight", [mlp, d], scale: 0.4)
            add("blocks.\(i).mlp.fc1.bias", [mlp], scale: 0.2)
            add("blocks.\(i).mlp.fc2.weight", [d, mlp], scale: 0.25)
            add("blocks.\(i).mlp.fc2.bias", [d], scale: 0.1)
            add("blocks.\(i).ls2.gamma", [d], scale: 0.4, offset: 0.6)
        }
        add("norm.weight", [d], scale: 0.3, offset: 1)
        add("norm.bias", [d], scale: 0.1)
        add("head.weight", [classes, d], scale: 0.8)
        add("head.bias", [classes], scale: 0.2)
        return w
    }()

    static func modelPath() throws -> String {
        var template = Array("/tmp/ckpt-backward-XXXXXX".utf8CString)
        let folder = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
        let path = folder + "/tiny.safetensors"
        var tensors: [OutputTensor] = []
        for (name, w) in weights.sorted(by: { $0.key < $1.key }) {
            let bytes = w.values.flatMap { v in withUnsafeBytes(of: Float(v).bitPattern.littleEndian) { Array($0) } }
            tensors.append(try OutputTensor.bytes(name: name, dtype: .f32, shape: try Shape(w.shape), bytes))
        }
        try SafeTensors.write(tensors, metadata: [:], to: path)
        return path
    }

    /// The parts of the loss, fixed pseudo-random coefficients.
    struct Loss {
        let targets: [Double]  // [images × classes], soft targets (rows sum to 1)
        let featureWeights: [Double]  // [images × D]
        let attentionBlocks: [Int] = [1, 2]
        let attentionWeights: [Double]  // [blocks(2) × images × heads × tokens × tokens]
        let outputBlock = 0
        let outputWeights: [Double]  // [images × tokens × D]

        init() {
            let t = tokens
            var soft = ViTBackwardTests.values(images * classes, seed: 90, scale: 1).map { Glibc.exp($0) }
            for i in 0..<images {
                let sum = soft[(i * classes)..<((i + 1) * classes)].reduce(0, +)
                for c in 0..<classes { soft[i * classes + c] /= sum }
            }
            targets = soft
            featureWeights = ViTBackwardTests.values(images * dim, seed: 91, scale: 0.5)
            attentionWeights = ViTBackwardTests.values(2 * images * heads * t * t, seed: 92, scale: 2)
            outputWeights = ViTBackwardTests.values(images * t * dim, seed: 93, scale: 0.3)
        }
    }

    /// The float64 forward pass and loss, written independently of the engine (plain loops, exact erf).
    static func referenceLoss(_ x: [Double], _ loss: Loss) -> (loss: Double, features: [Double]) {
        let d = dim, t = tokens, hd = dim / heads, g2 = grid * grid
        func w(_ name: String) -> [Double] { weights[name]!.values }
        func layerNorm(_ row: [Double], _ gamma: [Double], _ beta: [Double]) -> [Double] {
            let mean = row.reduce(0, +) / Double(row.count)
            var squares = 0.0
            for v in row { squares += (v - mean) * (v - mean) }
            let variance = squares / Double(row.count)
            let r = 1 / (variance + 1e-6).squareRoot()
            var out = [Double](repeating: 0, count: row.count)
            for k in row.indices {
                let normalized: Double = (row[k] - mean) * r
                out[k] = normalized * gamma[k] + beta[k]
            }
            return out
        }
        func linear(_ row: [Double], _ weight: [Double], _ bias: [Double], out: Int) -> [Double] {
            var result = bias
            for o in 0..<out {
                for k in row.indices { result[o] += weight[o * row.count + k] * row[k] }
            }
            return result
        }
        var total = 0.0
        var allFeatures: [Double] = []
        for i in 0..<images {
            let image = Array(x[(i * channels * size * size)..<((i + 1) * channels * size * size)])
            var tokensX = [[Double]](repeating: [Double](repeating: 0, count: d), count: t)
            let pw = w("patch_embed.proj.weight"), pb = w("patch_embed.proj.bias"), pos = w("pos_embed"), cls = w("cls_token")
            for c in 0..<d { tokensX[0][c] = cls[c] + pos[c] }
            for gy in 0..<grid {
                for gx in 0..<grid {
                    let r = 1 + gy * grid + gx
                    for o in 0..<d {
                        var acc = pb[o]
                        for ch in 0..<channels {
                            for ky in 0..<patch {
                                for kx in 0..<patch {
                                    acc += pw[((o * channels + ch) * patch + ky) * patch + kx] * image[(ch * size + gy * patch + ky) * size + gx * patch + kx]
                                }
                            }
                        }
                        tokensX[r][o] = acc + pos[r * d + o]
                    }
                }
            }
            _ = g2
            for b in 0..<depth {
                let p = "blocks.\(b)."
                let h = tokensX.map { layerNorm($0, w(p + "norm1.weight"), w(p + "norm1.bias")) }
                let qkv = h.map { linear($0, w(p + "attn.qkv.weight"), w(p + "attn.qkv.bias"), out: 3 * d) }
                var o = [[Double]](repeating: [Double](repeating: 0, count: d), count: t)
                for head in 0..<heads {
                    for r in 0..<t {
                        var scores = [Double](repeating: 0, count: t)
                        for k in 0..<t {
                            var dot = 0.0
                            for e in 0..<hd { dot += qkv[r][head * hd + e] * qkv[k][d + head * hd + e] }
                            scores[k] = dot / Double(hd).squareRoot()
                        }
                        let m = scores.max()!
                        scores = scores.map { Glibc.exp($0 - m) }
                        let s = scores.reduce(0, +)
                        let probabilities = scores.map { $0 / s }
                        if let slot = loss.attentionBlocks.firstIndex(of: b) {
                            for k in 0..<t {
                                total += loss.attentionWeights[(((slot * images + i) * heads + head) * t + r) * t + k] * probabilities[k]
                            }
                        }
                        for e in 0..<hd {
                            var acc = 0.0
                            for k in 0..<t { acc += probabilities[k] * qkv[k][2 * d + head * hd + e] }
                            o[r][head * hd + e] = acc
                        }
                    }
                }
                if b == loss.outputBlock {
                    for r in 0..<t { for c in 0..<d { total += loss.outputWeights[(i * t + r) * d + c] * o[r][c] } }
                }
                let ls1 = w(p + "ls1.gamma"), ls2 = w(p + "ls2.gamma")
                for r in 0..<t {
                    let y = linear(o[r], w(p + "attn.proj.weight"), w(p + "attn.proj.bias"), out: d)
                    for c in 0..<d { tokensX[r][c] += ls1[c] * y[c] }
                }
                for r in 0..<t {
                    let h2 = layerNorm(tokensX[r], w(p + "norm2.weight"), w(p + "norm2.bias"))
                    let f = linear(h2, w(p + "mlp.fc1.weight"), w(p + "mlp.fc1.bias"), out: mlp).map { (v: Double) -> Double in
                        0.5 * v * (1 + erf(v / 2.0.squareRoot()))
                    }
                    let y = linear(f, w(p + "mlp.fc2.weight"), w(p + "mlp.fc2.bias"), out: d)
                    for c in 0..<d { tokensX[r][c] += ls2[c] * y[c] }
                }
            }
            let features = layerNorm(tokensX[0], w("norm.weight"), w("norm.bias"))
            allFeatures += features
            for c in 0..<d { total += loss.featureWeights[i * d + c] * features[c] }
            let z = linear(features, w("head.weight"), w("head.bias"), out: classes)
            let m = z.max()!
            let logSum = m + Glibc.log(z.map { Glibc.exp($0 - m) }.reduce(0, +))
            for c in 0..<classes { total -= loss.targets[i * classes + c] * (z[c] - logSum) }
        }
        return (total, allFeatures)
    }

    @Test func inputGradientMatchesFloat64FiniteDifferences() throws {
        let path = try Self.modelPath()
        let model = try ViTModel.load(path, overrides: .init(heads: Self.heads, eps: 1e-6))
        let head = try #require(model.head)
        let engine = try ViTEngine(model: model)
        #expect(engine.tokens == Self.tokens)
        let loss = Loss()
        let pixels = Self.values(Self.images * Self.channels * Self.size * Self.size, seed: 7, scale: 1.5)
        let d = Self.dim, t = Self.tokens, n = Self.images, classes = Self.classes

        // Analytic: F32 engine, recorded forward + backward with every hook.
        let workspace = try engine.makeGradientWorkspace(images: n)
        var images = pixels.map { Float($0) }
        var features = [Float](repeating: 0, count: n * d)
        var logits = [Float](repeating: 0, count: n * classes)
        var featureGradient = [Float](repeating: 0, count: n * d)
        var gradient = [Float](repeating: 0, count: images.count)
        images.withUnsafeMutableBufferPointer { x in
            features.withUnsafeMutableBufferPointer { f in
                engine.recordForward(images: x.baseAddress!, count: n, workspace: workspace, features: f.baseAddress!)
                logits.withUnsafeMutableBufferPointer { z in head.logits(features: f.baseAddress!, count: n, into: z.baseAddress!) }
            }
        }
        var dz = [Float](repeating: 0, count: n * classes)
        for i in 0..<n {
            let row = logits[(i * classes)..<((i + 1) * classes)].map(Double.init)
            let m = row.max()!
            let e = row.map { Glibc.exp($0 - m) }
            let s = e.reduce(0, +)
            for c in 0..<classes { dz[i * classes + c] = Float(e[c] / s - loss.targets[i * classes + c]) }
        }
        dz.withUnsafeBufferPointer { g in
            featureGradient.withUnsafeMutableBufferPointer { head.featureGradient(logitGradient: g.baseAddress!, count: n, into: $0.baseAddress!) }
        }
        for k in 0..<(n * d) { featureGradient[k] += Float(loss.featureWeights[k]) }
        let attentionWeights = loss.attentionWeights.map { Float($0) }, outputWeights = loss.outputWeights.map { Float($0) }
        let hooks = BackwardHooks(
            attentionBlocks: Set(loss.attentionBlocks),
            attention: { sample, block, headIndex, _, dp in
                let slot = loss.attentionBlocks.firstIndex(of: block)!
                let base = ((slot * n + sample) * Self.heads + headIndex) * t * t
                for k in 0..<(t * t) { dp[k] += attentionWeights[base + k] }
            },
            attentionOutputBlocks: [loss.outputBlock],
            attentionOutput: { _, _, dO in
                for k in 0..<(n * t * d) { dO[k] += outputWeights[k] }
            })
        featureGradient.withUnsafeBufferPointer { fg in
            gradient.withUnsafeMutableBufferPointer { g in
                engine.inputGradient(count: n, workspace: workspace, featureGradient: fg.baseAddress!, hooks: hooks, into: g.baseAddress!)
            }
        }

        // The reference forward is the same model: its features equal the engine's.
        let reference = Self.referenceLoss(pixels, loss)
        let featureError = zip(reference.features, features).map { abs($0 - Double($1)) }.max()!
        #expect(featureError < 2e-5, "features differ by \(featureError)")

        // Central differences in F64 for every pixel of both images.
        let step = 1e-5
        var worst = 0.0, largest = 0.0
        var x = pixels
        for k in 0..<x.count {
            let original = x[k]
            x[k] = original + step
            let up = Self.referenceLoss(x, loss).loss
            x[k] = original - step
            let down = Self.referenceLoss(x, loss).loss
            x[k] = original
            let numeric = (up - down) / (2 * step)
            worst = max(worst, abs(numeric - Double(gradient[k])))
            largest = max(largest, abs(numeric))
        }
        #expect(largest > 1e-2, "the loss must depend on the pixels")
        #expect(worst / largest < 1e-4, "worst error \(worst) against a largest gradient of \(largest)")
    }
}
