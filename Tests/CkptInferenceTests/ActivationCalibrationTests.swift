import CkptCore
import CkptFormats
@testable import CkptInference
import CkptQuant
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Weight + activation quantization in the engine, on the tiny LayerScale ViT of ``ViTBackwardTests`` (timm names,
/// 3 blocks, D 16, 2 heads, 10 tokens, a 5-class head):
/// - ``FakeQuantization`` through the engine against an independent float64 forward pass: at each site the engine's
///   values before the quantizer equal the reference's, the values after it equal the quantizer's formula applied by
///   hand (bit for bit), and the reference run on from those quantized values gives the engine's features;
/// - ``ViTEngine/calibrateActivations`` with the LayerNorm fold: the folded γ', β', bias' and the 8-bit weights
///   reproduce the original LayerNorm → Linear outputs (the fold is exact algebra; only the weight grid differs);
/// - the side file lists every site with RepQ-ViT's kinds and bits, and the weight report is sane.
@Suite struct ActivationCalibrationTests {
    typealias Model = ViTBackwardTests
    static let images = 4
    static var plane: Int { Model.channels * Model.size * Model.size }

    static let pixels: [Float] = Model.values(images * plane, seed: 17, scale: 1.5).map { Float($0) }

    static let fill: @Sendable (Int, UnsafeMutablePointer<Float>) throws(CkptError) -> Void = { index, destination in
        pixels.withUnsafeBufferPointer { destination.update(from: $0.baseAddress! + index * plane, count: plane) }
    }

    static func loadEngine() throws -> ViTEngine {
        let model = try ViTModel.load(try Model.modelPath(), overrides: .init(heads: Model.heads, eps: 1e-6))
        return try ViTEngine(model: model)
    }

    // MARK: - The float64 reference forward pass

    /// Calls `at(site, part, values, width)` with each site's values of one image (`part` = image; for the
    /// probabilities image·heads + head, one [tokens × tokens] matrix per call), which it may rewrite; returns the
    /// head-input features [images × D].
    static func referenceFeatures(
        _ x: [Float], count n: Int, weights: [String: [Double]], at: (ActivationSite, Int, inout [Double], Int) -> Void
    ) -> [Double] {
        let d = Model.dim, t = Model.tokens, hd = d / Model.heads, heads = Model.heads, m = Model.mlp
        let p = Model.patch, c = Model.channels, s = Model.size, g = Model.grid, k = c * p * p
        func w(_ name: String) -> [Double] { weights[name]! }
        func layerNorm(_ rows: [Double], _ gamma: [Double], _ beta: [Double]) -> [Double] {
            var out = rows
            for r in 0..<(rows.count / d) {
                let row = rows[(r * d)..<((r + 1) * d)]
                let mean = row.reduce(0, +) / Double(d)
                let variance = row.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(d)
                let scale = 1 / (variance + 1e-6).squareRoot()
                for j in 0..<d { out[r * d + j] = (rows[r * d + j] - mean) * scale * gamma[j] + beta[j] }
            }
            return out
        }
        /// rows [r × inputs] · Wᵀ + bias, W [outputs × inputs].
        func linear(_ rows: [Double], _ weight: [Double], _ bias: [Double], inputs: Int) -> [Double] {
            let outputs = bias.count, count = rows.count / inputs
            var out = [Double](repeating: 0, count: count * outputs)
            for r in 0..<count {
                for o in 0..<outputs {
                    var acc = bias[o]
                    for j in 0..<inputs { acc += weight[o * inputs + j] * rows[r * inputs + j] }
                    out[r * outputs + o] = acc
                }
            }
            return out
        }
        var features: [Double] = []
        for i in 0..<n {
            // Patches [grid² × C·p·p], column ch·p² + ky·p + kx (the conv weight's order).
            var patches = [Double](repeating: 0, count: g * g * k)
            for gy in 0..<g {
                for gx in 0..<g {
                    for ch in 0..<c {
                        for ky in 0..<p {
                            for kx in 0..<p {
                                patches[(gy * g + gx) * k + (ch * p + ky) * p + kx] =
                                    Double(x[i * c * s * s + (ch * s + gy * p + ky) * s + gx * p + kx])
                            }
                        }
                    }
                }
            }
            at(.patchEmbedInput, i, &patches, k)
            let embedded = linear(patches, w("patch_embed.proj.weight"), w("patch_embed.proj.bias"), inputs: k)
            let pos = w("pos_embed"), cls = w("cls_token")
            var tokens = [Double](repeating: 0, count: t * d)
            for j in 0..<d { tokens[j] = cls[j] + pos[j] }
            for r in 1..<t { for j in 0..<d { tokens[r * d + j] = embedded[(r - 1) * d + j] + pos[r * d + j] } }
            for b in 0..<Model.depth {
                let pre = "blocks.\(b)."
                var h = layerNorm(tokens, w(pre + "norm1.weight"), w(pre + "norm1.bias"))
                at(.block(b, .qkvInput), i, &h, d)
                let qkv = linear(h, w(pre + "attn.qkv.weight"), w(pre + "attn.qkv.bias"), inputs: d)
                var parts: [[Double]] = (0..<3).map { part in (0..<(t * d)).map { qkv[($0 / d) * 3 * d + part * d + $0 % d] } }
                at(.block(b, .attnQ), i, &parts[0], d)
                at(.block(b, .attnK), i, &parts[1], d)
                at(.block(b, .attnV), i, &parts[2], d)
                var o = [Double](repeating: 0, count: t * d)
                for head in 0..<heads {
                    var probabilities = [Double](repeating: 0, count: t * t)
                    for r in 0..<t {
                        var scores = (0..<t).map { key in
                            (0..<hd).reduce(0.0) { $0 + parts[0][r * d + head * hd + $1] * parts[1][key * d + head * hd + $1] } / Double(hd).squareRoot()
                        }
                        let top = scores.max()!
                        scores = scores.map { Glibc.exp($0 - top) }
                        let sum = scores.reduce(0, +)
                        for key in 0..<t { probabilities[r * t + key] = scores[key] / sum }
                    }
                    at(.block(b, .attnProbs), i * heads + head, &probabilities, t)
                    for r in 0..<t {
                        for e in 0..<hd {
                            o[r * d + head * hd + e] = (0..<t).reduce(0.0) { $0 + probabilities[r * t + $1] * parts[2][$1 * d + head * hd + e] }
                        }
                    }
                }
                at(.block(b, .projInput), i, &o, d)
                let ls1 = w(pre + "ls1.gamma"), ls2 = w(pre + "ls2.gamma")
                let y = linear(o, w(pre + "attn.proj.weight"), w(pre + "attn.proj.bias"), inputs: d)
                for j in 0..<(t * d) { tokens[j] += ls1[j % d] * y[j] }
                var h2 = layerNorm(tokens, w(pre + "norm2.weight"), w(pre + "norm2.bias"))
                at(.block(b, .fc1Input), i, &h2, d)
                var hidden = linear(h2, w(pre + "mlp.fc1.weight"), w(pre + "mlp.fc1.bias"), inputs: d).map { 0.5 * $0 * (1 + erf($0 / 2.0.squareRoot())) }
                at(.block(b, .fc2Input), i, &hidden, m)
                let y2 = linear(hidden, w(pre + "mlp.fc2.weight"), w(pre + "mlp.fc2.bias"), inputs: m)
                for j in 0..<(t * d) { tokens[j] += ls2[j % d] * y2[j] }
            }
            var feature = layerNorm(Array(tokens[0..<d]), w("norm.weight"), w("norm.bias"))
            at(.headInput, i, &feature, d)
            features += feature
        }
        return features
    }

    static var originalWeights: [String: [Double]] { Model.weights.mapValues(\.values) }

    // MARK: - Capturing the engine's site values

    /// Every call's values at the watched sites, before and after the inner hook (rows packed at `width`).
    final class Capture: Sendable {
        struct Values { var before: [Float] = [], after: [Float] = [], width = 0, calls = 0 }
        let store = Mutex<[ActivationSite: Values]>([:])
        subscript(site: ActivationSite) -> Values? { store.withLock { $0[site] } }
    }

    struct CapturingHook: ActivationHook {
        let inner: FakeQuantization?
        let sites: Set<ActivationSite>
        let capture: Capture

        func handles(_ site: ActivationSite) -> Bool { sites.contains(site) || inner?.handles(site) == true }

        func process(_ site: ActivationSite, _ values: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int) {
            func packed() -> [Float] { (0..<rows).flatMap { r in Array(UnsafeBufferPointer(start: values + r * stride, count: width)) } }
            let before = sites.contains(site) ? packed() : []
            inner?.process(site, values, rows: rows, width: width, stride: stride)
            guard sites.contains(site) else { return }
            let after = packed()
            capture.store.withLock {
                $0[site, default: .init()].before += before
                $0[site, default: .init()].after += after
                $0[site, default: .init()].width = width
                $0[site, default: .init()].calls += 1
            }
        }
    }

    // MARK: - Hand-written quantizers (the formulas of formats/activation-quantization.md)

    static func uniform(_ x: Float, scale: Float, zeroPoint: Float, bits: Int) -> Float {
        let q = min(max((x / scale).rounded(.toNearestOrEven) + zeroPoint, 0), Float((1 << bits) - 1))
        return (q - zeroPoint) * scale
    }

    /// nil where −2·log2(x/Δ) is within 1e-5 of a half-integer (a rounding tie the engine reads off the bits).
    static func logSqrt2(_ x: Float, scale: Float, bits: Int) -> Float? {
        guard x > 0 else { return 0 }
        let e = -2 * Glibc.log2(Double(x / scale))
        if abs(e - e.rounded(.down) - 0.5) < 1e-5 { return nil }
        let q = e.rounded(.toNearestOrEven)
        if q >= Double(1 << bits) { return 0 }
        let code = Int(max(q, 0))
        let factor: Float = code % 2 == 1 ? 1 + Float(2.0.squareRoot() - 1) : 1
        return (Float(Glibc.pow(2.0, -Double((code + 1) / 2))) * factor) * scale
    }

    /// A quantizer for `site` fitted by hand to its float values (ranges shrunk so that some values clip).
    static func quantizer(for site: ActivationSite, values: [Float], width: Int, bits: Int) throws -> ActivationQuantization.Quantizer {
        if case .block(_, .attnProbs) = site { return .logSqrt2(try LogSqrt2Quantizer(bits: bits, scale: 0.8 * values.max()!)) }
        func fit(_ v: [Float]) -> (Float, Float) {
            let lo = 0.8 * min(v.min()!, 0), hi = 0.8 * max(v.max()!, 0)
            let scale = (hi - lo) / Float((1 << bits) - 1)
            return (scale, (-lo / scale).rounded(.toNearestOrEven))
        }
        if site.isPostLayerNorm {  // per channel
            let fits = (0..<width).map { ch in fit(stride(from: ch, to: values.count, by: width).map { values[$0] }) }
            return .uniform(try UniformQuantizer(bits: bits, granularity: .perColumn, scales: fits.map(\.0), zeroPoints: fits.map(\.1)))
        }
        let (scale, zero) = fit(values)
        return .uniform(try UniformQuantizer(bits: bits, scale: scale, zeroPoint: zero))
    }

    static let watched: [ActivationSite] = [
        .patchEmbedInput, .block(0, .qkvInput), .block(1, .attnQ), .block(1, .attnK), .block(2, .attnV), .block(1, .attnProbs),
        .block(0, .projInput), .block(2, .fc1Input), .block(1, .fc2Input), .headInput,
    ]

    // MARK: - (a) fake quantization through the engine

    @Test("fake quantization in the engine = the site quantized by hand in a float64 reference forward", arguments: [[0], [5], [6], [1], Array(0..<10)])
    func fakeQuantizationMatchesReference(_ which: [Int]) throws {
        let engine = try Self.loadEngine()
        let sites = which.map { Self.watched[$0] }
        let n = Self.images, d = Model.dim, bits = 4
        // The float values of each site, to fit the hand-chosen quantizers.
        let plain = Capture()
        let floatFeatures = try engine.features(count: n, fill: Self.fill, hook: CapturingHook(inner: nil, sites: Set(sites), capture: plain))
        var quantization = ActivationQuantization()
        for site in sites {
            let v = try #require(plain[site])
            try quantization.set(try Self.quantizer(for: site, values: v.before, width: v.width, bits: bits), for: site)
        }
        let hook = try FakeQuantization(quantization, config: engine.model.config)
        let capture = Capture()
        let features = try engine.features(count: n, fill: Self.fill, hook: CapturingHook(inner: hook, sites: Set(sites), capture: capture))

        // After the quantizer: its formula applied to the values before it, bit for bit.
        for site in sites {
            let v = try #require(capture[site])
            #expect(v.before.count == v.after.count && !v.before.isEmpty)
            var changed = 0, ties = 0
            for (j, (x, y)) in zip(v.before, v.after).enumerated() {
                let want: Float?
                switch quantization[site]! {
                case .uniform(let q):
                    let ch = q.granularity == .perTensor ? 0 : j % v.width
                    want = Self.uniform(x, scale: q.scales[ch], zeroPoint: q.zeroPoints[ch], bits: bits)
                case .logSqrt2(let q):
                    want = Self.logSqrt2(x, scale: q.scale, bits: bits)
                }
                guard let want else { ties += 1; continue }
                #expect(y.bitPattern == want.bitPattern, "\(site) value \(j): \(x) → \(y), by hand \(want)")
                if x != y { changed += 1 }
            }
            #expect(changed > v.before.count / 2, "\(site): the quantizer changed only \(changed) of \(v.before.count) values")
            #expect(ties <= 2)
        }

        // The reference: before each site its values equal the engine's; it then continues from the engine's
        // quantized values, and ends at the engine's features.
        var calls: [ActivationSite: Int] = [:]
        var worstBefore = 0.0
        let reference = Self.referenceFeatures(Self.pixels, count: n, weights: Self.originalWeights) { site, part, values, width in
            guard let v = capture[site] else { return }
            let call = calls[site, default: 0]
            calls[site] = call + 1
            let offset = call * values.count  // calls are in the engine's order: image by image (and head by head)
            let scale = max(v.before.map { abs($0) }.max()!, 1e-3)
            for j in values.indices {
                worstBefore = max(worstBefore, abs(values[j] - Double(v.before[offset + j])) / Double(scale))
                values[j] = Double(v.after[offset + j])
            }
        }
        // Measured: ≤ 4.3e-7 of the site scale before the quantizer, ≤ 3.7e-7 of the feature scale after it (F32 engine
        // against float64); one 4-bit site moves the features by 7 %–27 % of their scale.
        #expect(worstBefore < 5e-6, "site values before quantization differ from the reference by \(worstBefore) of their scale")
        for site in sites {
            let isProbabilities = if case .block(_, .attnProbs) = site { true } else { false }
            #expect(calls[site] == (isProbabilities ? n * Model.heads : n))
        }
        let scale = features.map { abs(Double($0)) }.max()!
        let difference = zip(features, reference).map { abs(Double($0) - $1) }.max()!
        let effect = zip(features, floatFeatures).map { abs(Double($0) - Double($1)) }.max()!
        #expect(difference <= 5e-6 * scale, "features differ from the reference by \(difference) (scale \(scale))")
        #expect(effect > 0.01 * scale, "4-bit quantization at \(sites) moved the features by only \(effect)")
        _ = d
    }

    // MARK: - (b) the LayerNorm fold

    /// Calibrates a fresh engine at 8-bit weights (RTN, so every weight lies within one step of its float value)
    /// and 4-bit activations on the tiny model's images, with the head.
    static func calibrate(reparameterize: Bool, weightBits: Int = 8, activationBits: Int = 4) throws -> (ViTEngine, ActivationCalibration) {
        let engine = try loadEngine()
        var settings = ActivationCalibrationSettings(weightBits: weightBits, activationBits: activationBits)
        settings.weightMethod = .rtn
        settings.reparameterize = reparameterize
        let result = try engine.calibrateActivations(count: images, fill: fill, head: engine.model.head, settings: settings)
        return (engine, result)
    }

    /// The step of a row's grid at `bits` (its range widened to include 0, the widest an RTN grid can be).
    static func rowStep(_ row: ArraySlice<Double>, bits: Int) -> Double { (max(row.max()!, 0) - min(row.min()!, 0)) / Double((1 << bits) - 1) }

    @Test("the LayerNorm fold is exact: γ', β', bias' and the weights on their grid give the original LayerNorm → Linear outputs")
    func layerNormFoldIsExact() throws {
        let (_, result) = try Self.calibrate(reparameterize: true)
        let d = Model.dim, w = Self.originalWeights
        let x = Model.values(64 * d, seed: 23, scale: 2).enumerated().map { $0.element + Double($0.offset % 5) }  // rows with offsets
        for b in 0..<Model.depth {
            for (norm, linear) in [("norm1", "attn.qkv"), ("norm2", "mlp.fc1")] {
                let p = "blocks.\(b)."
                let gamma = w[p + norm + ".weight"]!, beta = w[p + norm + ".bias"]!
                let weight = w[p + linear + ".weight"]!, bias = w[p + linear + ".bias"]!
                let outputs = bias.count
                let gamma2 = try #require(result.tensors[p + norm + ".weight"]).map(Double.init)
                let beta2 = try #require(result.tensors[p + norm + ".bias"]).map(Double.init)
                let weight2 = try #require(result.tensors[p + linear + ".weight"]).map(Double.init)
                let bias2 = try #require(result.tensors[p + linear + ".bias"]).map(Double.init)
                // The fold's ratios r = γ/γ' (positive; not all 1: the channels' scales differ) and shifts b = β/r − β'.
                let r = zip(gamma, gamma2).map { $0 / $1 }
                #expect(r.allSatisfy { $0 > 0 && $0.isFinite }, "\(p)\(norm): ratios \(r)")
                #expect(r.max()! / r.min()! > 1.05, "\(p)\(norm): the fold did not rescale the channels (\(r))")
                let shift = (0..<d).map { beta[$0] / r[$0] - beta2[$0] }
                #expect(shift.map(abs).max()! > 1e-3, "\(p)\(norm): the fold did not shift the channels")
                // The 8-bit weights lie within one step of W·r (columns rescaled), row by row.
                let folded = (0..<(outputs * d)).map { weight[$0] * r[$0 % d] }
                for o in 0..<outputs {
                    let row = folded[(o * d)..<((o + 1) * d)]
                    let step = Self.rowStep(row, bits: 8)
                    let worst = (0..<d).map { abs(weight2[o * d + $0] - row[o * d + $0]) }.max()!
                    #expect(worst <= step * 1.0001, "\(p)\(linear) row \(o): \(worst) from W·r, step \(step)")
                }
                // W·LN(x) + bias = (W·r)·LN'(x) + bias' for any input rows (measured: ≤ 3.4e-8 of the output scale; the
                // float32 γ', β', bias' are the only rounding).
                var worst = 0.0, scale = 0.0
                for row in 0..<(x.count / d) {
                    let v = x[(row * d)..<((row + 1) * d)]
                    let mean = v.reduce(0, +) / Double(d)
                    let variance = v.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(d)
                    let z = v.map { ($0 - mean) / (variance + 1e-6).squareRoot() }
                    for o in 0..<outputs {
                        var y = bias[o], y2 = bias2[o]
                        for c in 0..<d {
                            y += weight[o * d + c] * (z[c] * gamma[c] + beta[c])
                            y2 += folded[o * d + c] * (z[c] * gamma2[c] + beta2[c])
                        }
                        worst = max(worst, abs(y - y2))
                        scale = max(scale, abs(y))
                    }
                }
                #expect(worst <= 1e-6 * scale, "\(p)\(norm) → \(linear): folded outputs differ by \(worst) (scale \(scale))")
            }
        }
    }

    @Test("after calibration the engine runs the folded 8-bit model: float features close to the original's, as without the fold")
    func foldedModelMatchesOriginal() throws {
        let n = Self.images
        let original = Self.referenceFeatures(Self.pixels, count: n, weights: Self.originalWeights) { _, _, _, _ in }
        let scale = original.map(abs).max()!
        var errors: [Bool: Double] = [:]
        for reparameterize in [true, false] {
            let (engine, _) = try Self.calibrate(reparameterize: reparameterize)
            let features = try engine.features(count: n, fill: Self.fill)
            errors[reparameterize] = zip(features, original).map { abs(Double($0) - $1) }.max()! / scale
        }
        // Measured: 8-bit RTN weights move the features by 0.75 % of their scale with the fold, 0.62 % without; a sign
        // error in the fold's bias shift gives 116 %.
        #expect(errors[true]! < 0.03, "folded 8-bit model: features off by \(errors[true]!) of their scale")
        #expect(errors[false]! < 0.03, "unfolded 8-bit model: features off by \(errors[false]!) of their scale")
        #expect(errors[true]! < 4 * errors[false]! + 0.005, "the fold made the 8-bit model worse: \(errors)")
    }

    @Test("the stored projection and fc2 weights are the stored (LayerScale-free) values on their grid; norms unchanged without the fold")
    func storedTensors() throws {
        let w = Self.originalWeights
        let (_, folded) = try Self.calibrate(reparameterize: true)
        let (_, plain) = try Self.calibrate(reparameterize: false)
        for b in 0..<Model.depth {
            let p = "blocks.\(b)."
            for (name, cols) in [("attn.proj.weight", Model.dim), ("mlp.fc2.weight", Model.mlp)] {
                let original = w[p + name]!, stored = try #require(folded.tensors[p + name]).map(Double.init)
                for o in 0..<(original.count / cols) {
                    let row = original[(o * cols)..<((o + 1) * cols)]
                    let step = Self.rowStep(row, bits: 8)
                    let worst = (0..<cols).map { abs(stored[o * cols + $0] - row[o * cols + $0]) }.max()!
                    #expect(worst <= step * 1.0001, "\(p)\(name) row \(o): \(worst) from the stored value, step \(step)")
                }
            }
            for name in ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.bias", "mlp.fc1.bias"] {
                #expect(try #require(plain.tensors[p + name]) == w[p + name]!.map { Float($0) }, "\(p)\(name) changed without the fold")
            }
        }
        #expect(plain.tensors.keys.sorted() == folded.tensors.keys.sorted())
    }

    // MARK: - (c) the side file and the report

    @Test("every site is calibrated with RepQ-ViT's kind and bits; weight SQNRs above 30 dB at 8 bits", arguments: [true, false])
    func sitesAndReport(reparameterize: Bool) throws {
        let (_, result) = try Self.calibrate(reparameterize: reparameterize, weightBits: 8, activationBits: 6)
        let sites = result.quantization.sites
        #expect(Set(sites.keys) == Set(ActivationSite.all(blocks: Model.depth)))
        #expect(Set(result.sites.map(\.site)) == Set(sites.keys))
        for (site, quantizer) in sites {
            #expect(quantizer.kind == site.repQViTKind, "\(site)")
            #expect(quantizer.bits == site.repQViTBits(activationBits: 6), "\(site)")
            switch quantizer {
            case .uniform(let q):
                #expect(q.granularity == .perTensor, "\(site): folded post-LayerNorm sites are per tensor")
                #expect(q.scales[0] > 0 && q.scales[0].isFinite)
                #expect(q.zeroPoints[0] == q.zeroPoints[0].rounded() && q.zeroPoints[0] >= 0 && q.zeroPoints[0] <= q.maxCode,
                    "\(site): zero point \(q.zeroPoints[0])")
            case .logSqrt2(let q):
                #expect(q.scale > 0 && q.scale <= 1.0000001, "\(site): probabilities' scale \(q.scale)")
            }
        }
        // The side file round-trips.
        #expect(try ActivationQuantization(parsing: result.quantization.serialized()) == result.quantization)
        #expect(result.weights.count == 1 + 4 * Model.depth)
        for report in result.weights { #expect(report.sqnr.isFinite && report.sqnr > 30, "\(report.tensor): \(report.sqnr) dB") }
        #expect(result.sites.allSatisfy { $0.values > 0 && $0.meanSquaredError.isFinite && $0.clipped >= 0 && $0.clipped < 0.05 })
    }

    @Test("without a head there is no head.input site")
    func noHead() throws {
        let engine = try Self.loadEngine()
        let result = try engine.calibrateActivations(count: 2, fill: Self.fill, head: nil, settings: .init(weightBits: 8, activationBits: 8))
        #expect(Set(result.quantization.sites.keys) == Set(ActivationSite.all(blocks: Model.depth)).subtracting([.headInput]))
    }
}
