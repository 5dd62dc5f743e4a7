import CkptCore
import CkptKernels
import CkptMerge
import CkptQuant
import Synchronization

/// How each Linear's weights are quantized, per output channel, for weight + activation quantization.
public enum WeightQuantizationMethod: String, CaseIterable, Sendable {
    /// RepQ-ViT's: uniform asymmetric, the clipping range from the percentile search of each row.
    case percentile
    /// Round to nearest on each row's min–max range.
    case rtn
    /// The MSE-optimal clipping of each row (``QuantMethod/mse``).
    case mse
    /// HQQ's zero-point optimisation on each row (``QuantMethod/hqq``).
    case hqq
}

/// How an activation site's clipping range is chosen.
public enum ActivationRange: String, CaseIterable, Sendable {
    /// RepQ-ViT's: the range of the 0.999, 0.9999 or 0.99999 percentile with the least MSE on the values.
    case percentile
    /// The whole range seen at calibration (min–max): nothing is clipped.
    case minmax
    /// RepQ-ViT's candidates and the min–max range, the least MSE kept.
    case search

    public var percentiles: [Double] {
        switch self {
        case .percentile: PercentileSearch.percentiles
        case .minmax: [1]
        case .search: PercentileSearch.percentiles + [1]
        }
    }
}

/// Settings of RepQ-ViT-style weight + activation quantization.
public struct ActivationCalibrationSettings: Sendable, Equatable {
    public var weightBits: Int
    public var activationBits: Int
    public var weightMethod: WeightQuantizationMethod = .percentile
    /// Calibrate the post-LayerNorm sites (inputs of qkv and fc1) per channel and fold the channel scales into the
    /// LayerNorm and the next Linear (RepQ-ViT's scale reparameterisation); off: plain per-tensor calibration.
    public var reparameterize = true
    /// Bits of the patch-embedding input (RepQ-ViT: 8).
    public var patchInputBits = 8
    /// How activation ranges are chosen.
    public var activationRange: ActivationRange = .percentile

    public init(weightBits: Int, activationBits: Int) {
        self.weightBits = weightBits
        self.activationBits = activationBits
    }
}

/// What weight + activation calibration produced: the side file, the checkpoint tensors it changed, and a report.
public struct ActivationCalibration: Sendable {
    public struct SiteReport: Sendable {
        public let site: ActivationSite
        public let quantizer: ActivationQuantization.Quantizer
        /// The percentile the search kept (per-tensor sites; the mean over channels for folded ones) and its MSE.
        public let percentile: Double
        public let meanSquaredError: Double
        /// Values seen at calibration and the share the quantizer clips (outside its range).
        public let values: Int
        public let clipped: Double
    }

    public struct WeightReport: Sendable {
        public let tensor: String
        public let rows: Int, columns: Int
        public let sqnr: Double
    }

    public let settings: ActivationCalibrationSettings
    public let quantization: ActivationQuantization
    /// Checkpoint tensors that changed, by stored name, in the stored layout (F32): the LayerNorm γ/β and the
    /// qkv/fc1 biases of the fold, and every quantized weight dequantized (its values are on the weight grid).
    public let tensors: [String: [Float]]
    public let sites: [SiteReport]
    public let weights: [WeightReport]
    /// The integer grid of every quantized weight, by stored name (q, k and v apart when stored apart).
    public let weightGrids: [String: WeightGrid]
}

extension ViTEngine {
    /// RepQ-ViT-style weight + activation calibration on `count` images (`fill` as in ``features(count:fill:)``).
    ///
    /// Sequential, site by site in forward order, each site calibrated on the values it receives when every earlier
    /// site and weight is already quantized: the patch-embedding weights and its 8-bit input; then per block the
    /// qkv input (per channel, folded into norm1 and qkv), the qkv weights, q, k and v, the probabilities (log√2),
    /// the projection input and weights, the fc1 input (folded into norm2 and fc1) and weights, the fc2 input and
    /// weights; finally the head input when `head` is given (the head's weights stay F32). The residual stream of
    /// every image is kept (count × tokens × D floats) and advanced block by block through the quantized block.
    ///
    /// The engine's model is changed in place (folded and quantized weights): afterwards it runs the quantized model,
    /// and with ``FakeQuantization`` of the result's side file it computes what an integer runtime would.
    public func calibrateActivations(
        count: Int, fill: @Sendable (Int, UnsafeMutablePointer<Float>) throws(CkptError) -> Void, head: LinearHead?,
        settings: ActivationCalibrationSettings, progress: ((String) -> Void)? = nil
    ) throws(CkptError) -> ActivationCalibration {
        let c = model.config, d = c.dim, t = tokens, m = c.mlpDim, heads = c.heads
        for bits in [settings.weightBits, settings.activationBits, settings.patchInputBits] where !UniformQuantizer.supportedBits.contains(bits) {
            throw CkptError(.invalidArgument, "\(bits) bits: weight and activation quantization takes 2…8 bits", path: model.path)
        }
        guard count > 0 else { throw CkptError(.invalidData, "no calibration images", path: model.path) }
        let what = "activation calibration"
        let largestSite = max(try CheckedSize.product([count, heads, t, t], what), try CheckedSize.product([count, t, m], what),
            try CheckedSize.product([count, grid * grid, c.channels, c.patchSize, c.patchSize], what))
        try MemoryBudget.require(
            try CheckedSize.product([try CheckedSize.sum([try CheckedSize.product([count, t, d], what), largestSite, largestSite], what), 4], what),
            for: "calibrating \(count) images (residual stream \(count) × \(t) × \(d), largest site \(largestSite) values)", path: model.path)
        let states = try FloatBuffer(count: count * t * d)
        var quantization = ActivationQuantization()
        var tensors: [String: [Float]] = [:]
        var siteReports: [ActivationCalibration.SiteReport] = []
        var weightReports: [ActivationCalibration.WeightReport] = []
        var weightGrids: [String: WeightGrid] = [:]
        let imageFloats = c.channels * imageSize * imageSize

        /// Quantizes a [rows × cols] weight in place per output row; reports its SQNR under `name`.
        func quantizeWeight(_ w: UnsafeMutablePointer<Float>, rows: Int, cols: Int, name: String) throws(CkptError) {
            var signal = 0.0
            for i in 0..<(rows * cols) { signal += Double(w[i]) * Double(w[i]) }
            let original = try FloatBuffer(count: rows * cols)
            original.pointer.update(from: w, count: rows * cols)
            let buffer = UnsafeMutableBufferPointer(start: w, count: rows * cols)
            switch settings.weightMethod {
            case .percentile:
                let (q, _) = try UniformQuantizer.calibrate(UnsafeBufferPointer(buffer), rows: rows, columns: cols, bits: settings.weightBits, granularity: .perRow)
                try q.fakeQuantize(buffer)
                weightGrids[name] = WeightGrid(bits: settings.weightBits, rows: rows, cols: cols, scales: q.scales, zeroPoints: q.zeroPoints)
            case .rtn, .mse, .hqq:
                guard QuantizationSettings.supportedBits.contains(settings.weightBits) else {
                    throw CkptError(.invalidArgument, "--weight-method \(settings.weightMethod.rawValue) takes \(QuantizationSettings.supportedBits.map(String.init).joined(separator: "/")) bits", path: model.path)
                }
                let method: QuantMethod = settings.weightMethod == .rtn ? .rtn : (settings.weightMethod == .mse ? .mse : .hqq)
                let q = QuantizedMatrix.quantize(UnsafePointer(w), rows: rows, cols: cols,
                    settings: QuantizationSettings(bits: settings.weightBits, groupSize: nil, method: method, grid: .integerZeroPoint))
                q.dequantize(into: w)
                weightGrids[name] = WeightGrid(bits: settings.weightBits, rows: rows, cols: cols, scales: q.scales, zeroPoints: q.offsets)
            }
            var error = 0.0
            for i in 0..<(rows * cols) { let e = Double(w[i] - original.pointer[i]); error += e * e }
            weightReports.append(.init(tensor: name, rows: rows, columns: cols, sqnr: QuantizedMatrix.sqnr(signal: signal, error: error)))
        }

        /// Records a site's quantizer and what it does to the values it was calibrated on.
        func record(_ site: ActivationSite, _ quantizer: ActivationQuantization.Quantizer, _ values: FloatBuffer, _ choice: PercentileSearch.Choice) throws(CkptError) {
            try quantization.set(quantizer, for: site)
            var clipped = 0
            let p = values.pointer
            switch quantizer {
            case .uniform(let q):
                if q.granularity == .perTensor {
                    let lo = (0 - q.zeroPoints[0]) * q.scales[0], hi = (q.maxCode - q.zeroPoints[0]) * q.scales[0]
                    for i in 0..<values.count where p[i] < lo - q.scales[0] / 2 || p[i] > hi + q.scales[0] / 2 { clipped += 1 }
                }
            case .logSqrt2(let q):
                for i in 0..<values.count where p[i] > q.scale * 1.0000001 { clipped += 1 }
            }
            siteReports.append(.init(site: site, quantizer: quantizer, percentile: choice.percentile, meanSquaredError: choice.meanSquaredError,
                values: values.count, clipped: Double(clipped) / Double(max(values.count, 1))))
        }

        // 0. The patch embedding: weights per output channel, then its 8-bit input.
        let k = c.channels * c.patchSize * c.patchSize, g2 = grid * grid
        if let name = model.tensorName(.patchProjection, .weight) {
            try quantizeWeight(model.patchWeight.pointer, rows: d, cols: k, name: name)
            tensors[name] = model.patchWeight.values
        }
        let patchValues = try FloatBuffer(count: count * g2 * k)
        try forEachMicroBatch(count: count) { (first: Int, n: Int, ws: Workspace) throws(CkptError) in
            for i in 0..<n { try fill(first + i, ws.images.pointer + i * imageFloats) }
            self.patchify(ws.images.pointer, count: n, into: patchValues.pointer + first * g2 * k)
        }
        let percentiles = settings.activationRange.percentiles
        let (patchQuantizer, patchChoice) = try UniformQuantizer.calibrate(UnsafeBufferPointer(start: patchValues.pointer, count: patchValues.count),
            bits: settings.patchInputBits, percentiles: percentiles)
        try record(.patchEmbedInput, .uniform(patchQuantizer), patchValues, patchChoice)
        progress?("patch embedding: weights \(settings.weightBits)-bit, input \(settings.patchInputBits)-bit")
        do {
            let hook = try FakeQuantization(quantization, config: c, path: model.path)
            try forEachMicroBatch(count: count) { (first: Int, n: Int, ws: Workspace) throws(CkptError) in
                for i in 0..<n { try fill(first + i, ws.images.pointer + i * imageFloats) }
                self.embed(images: ws.images.pointer, count: n, workspace: ws, into: states.pointer + first * t * d, hook: hook)
            }
        }

        for (index, block) in model.blocks.enumerated() {
            /// Runs `stages` of this block on a copy of every image's residual rows with the quantizers calibrated so
            /// far, and collects `sites` (each [values]); nothing is collected when `sites` is empty.
            func collect(_ sites: [ActivationSite], through stages: [BlockStage]) throws(CkptError) -> [ActivationSite: FloatBuffer] {
                var buffers: [ActivationSite: FloatBuffer] = [:]
                for site in sites {
                    let perImage: Int
                    switch site {
                    case .block(_, .attnProbs): perImage = heads * t * t
                    case .block(_, .fc2Input): perImage = t * m
                    default: perImage = t * d
                    }
                    buffers[site] = try FloatBuffer(count: try CheckedSize.product([count, perImage], what))
                }
                let apply = try FakeQuantization(quantization, config: c, path: model.path)
                let targets = buffers
                try forEachMicroBatch(count: count) { (first: Int, n: Int, ws: Workspace) throws(CkptError) in
                    ws.x.pointer.update(from: states.pointer + first * t * d, count: n * t * d)
                    var b = ws.stageBuffers
                    b.hook = CalibrationHook(apply: apply, collector: Collector(targets: targets, first: first, tokens: t, heads: heads))
                    for stage in stages { self.run(stage, index, block, x: ws.x.pointer, count: n, b) }
                }
                return buffers
            }
            func calibrateUniform(_ site: ActivationSite, _ values: FloatBuffer) throws(CkptError) {
                let (q, choice) = try UniformQuantizer.calibrate(UnsafeBufferPointer(start: values.pointer, count: values.count), bits: settings.activationBits,
                    percentiles: percentiles)
                try record(site, .uniform(q), values, choice)
            }
            /// The post-LayerNorm site `site` (values [rows × D]): per-channel calibration folded into the norm and
            /// the Linear rows `linear` [out × D] + bias, or plain per-tensor calibration.
            func calibrateFolded(
                _ site: ActivationSite, _ values: FloatBuffer, gamma: FloatBuffer, beta: FloatBuffer, weight: FloatBuffer, bias: FloatBuffer, outputs: Int
            ) throws(CkptError) {
                guard settings.reparameterize else { return try calibrateUniform(site, values) }
                let rows = values.count / d
                let (perChannel, choices) = try UniformQuantizer.calibrate(UnsafeBufferPointer(start: values.pointer, count: values.count),
                    rows: rows, columns: d, bits: settings.activationBits, granularity: .perColumn, percentiles: percentiles)
                let fold = try LayerNormReparameterization<Float>(inputQuantizer: perChannel, gamma: gamma.values, beta: beta.values,
                    linears: [.init(weight: weight.values, bias: bias.values)])
                fold.gamma.withUnsafeBufferPointer { gamma.pointer.update(from: $0.baseAddress!, count: d) }
                fold.beta.withUnsafeBufferPointer { beta.pointer.update(from: $0.baseAddress!, count: d) }
                fold.linears[0].weight.withUnsafeBufferPointer { weight.pointer.update(from: $0.baseAddress!, count: outputs * d) }
                fold.linears[0].bias!.withUnsafeBufferPointer { bias.pointer.update(from: $0.baseAddress!, count: outputs) }
                // The per-tensor quantizer of the folded norm's output, reported on the folded values.
                let q = try fold.inputQuantizer(bits: settings.activationBits)
                let folded = try FloatBuffer(count: values.count)
                for r in 0..<rows {
                    for ch in 0..<d { folded.pointer[r * d + ch] = values.pointer[r * d + ch] / fold.ratios[ch] - fold.shifts[ch] }
                }
                let mean = choices.map(\.percentile).reduce(0, +) / Double(choices.count)
                let mse = choices.map(\.meanSquaredError).reduce(0, +) / Double(choices.count)
                try record(site, .uniform(q), folded, .init(percentile: mean, meanSquaredError: mse))
            }

            // qkv input (norm1, folded), then the qkv weights.
            var collected = try collect([.block(index, .qkvInput)], through: [.norm1])
            try calibrateFolded(.block(index, .qkvInput), collected[.block(index, .qkvInput)]!, gamma: block.norm1Weight, beta: block.norm1Bias,
                weight: block.qkvWeight, bias: block.qkvBias, outputs: 3 * d)
            try quantizeWeight(block.qkvWeight.pointer, rows: 3 * d, cols: d, name: qkvName(index))
            splitQKVGrid(index, &weightGrids)
            // q, k, v; then the probabilities; then the projection input and weights.
            collected = try collect([.block(index, .attnQ), .block(index, .attnK), .block(index, .attnV)], through: [.norm1, .attention])
            for s in [ActivationQuantization.Site.BlockSite.attnQ, .attnK, .attnV] { try calibrateUniform(.block(index, s), collected[.block(index, s)]!) }
            collected = try collect([.block(index, .attnProbs)], through: [.norm1, .attention])
            let probabilities = collected[.block(index, .attnProbs)]!
            let (logQuantizer, logChoice) = try LogSqrt2Quantizer.calibrate(UnsafeBufferPointer(start: probabilities.pointer, count: probabilities.count),
                bits: settings.activationBits, percentiles: percentiles)
            try record(.block(index, .attnProbs), .logSqrt2(logQuantizer), probabilities, logChoice)
            collected = try collect([.block(index, .projInput)], through: [.norm1, .attention])
            try calibrateUniform(.block(index, .projInput), collected[.block(index, .projInput)]!)
            let projection = try quantizeStoredWeight(.attentionOutput(index), input: .projection, block: index, quantize: quantizeWeight)
            // fc1 input (norm2, folded) and weights; fc2 input and weights.
            collected = try collect([.block(index, .fc1Input)], through: [.norm1, .attention, .projection, .norm2])
            try calibrateFolded(.block(index, .fc1Input), collected[.block(index, .fc1Input)]!, gamma: block.norm2Weight, beta: block.norm2Bias,
                weight: block.fc1Weight, bias: block.fc1Bias, outputs: m)
            try quantizeWeight(block.fc1Weight.pointer, rows: m, cols: d, name: model.tensorName(.fc1(index), .weight) ?? "fc1")
            collected = try collect([.block(index, .fc2Input)], through: [.norm1, .attention, .projection, .norm2, .mlpHidden])
            try calibrateUniform(.block(index, .fc2Input), collected[.block(index, .fc2Input)]!)
            let fc2 = try quantizeStoredWeight(.fc2(index), input: .mlpHidden, block: index, quantize: quantizeWeight)
            collected = [:]
            // The block's changed tensors as stored, then the residual stream through the quantized block.
            storeBlock(index, block, into: &tensors)
            tensors[projection.name] = projection.values
            tensors[fc2.name] = fc2.values
            let hook = try FakeQuantization(quantization, config: c, path: model.path)
            try forEachMicroBatch(count: count) { (first: Int, n: Int, ws: Workspace) throws(CkptError) in
                var b = ws.stageBuffers
                b.hook = hook
                for stage in BlockStage.allCases { self.run(stage, index, block, x: states.pointer + first * t * d, count: n, b) }
            }
            progress?("block \(index + 1)/\(model.blocks.count): \(settings.weightBits)-bit weights, \(settings.activationBits)-bit activations at 8 sites")
        }
        if head != nil {
            let features = try FloatBuffer(count: count * d)
            for i in 0..<count {
                Kernels.layerNorm(states.pointer + i * t * d, features.pointer + i * d, rows: 1, width: d, gamma: model.finalNormWeight.pointer,
                    beta: model.finalNormBias.pointer, eps: c.eps)
            }
            let (q, choice) = try UniformQuantizer.calibrate(UnsafeBufferPointer(start: features.pointer, count: features.count), bits: settings.activationBits,
                percentiles: percentiles)
            try record(.headInput, .uniform(q), features, choice)
        }
        return ActivationCalibration(settings: settings, quantization: quantization, tensors: tensors, sites: siteReports, weights: weightReports,
            weightGrids: weightGrids)
    }

    /// The stored name of block `index`'s fused qkv weight, or of its query weight when q, k, v are separate.
    func qkvName(_ index: Int) -> String {
        model.tensorName(.qkv(index), .weight) ?? model.tensorName(.query(index), .weight) ?? "blocks.\(index).qkv"
    }

    /// Quantizes the stored (LayerScale-free) weight of `role` per output row and puts it into the forward pass
    /// with LayerScale folded as at load; returns the stored name and the quantized stored values.
    func quantizeStoredWeight(
        _ role: ViTName.Role, input: LinearInput, block index: Int,
        quantize: (UnsafeMutablePointer<Float>, Int, Int, String) throws(CkptError) -> Void
    ) throws(CkptError) -> (name: String, values: [Float]) {
        guard let name = model.tensorName(role, .weight), let layer = model.linearLayers.first(where: { $0.tensor == name }) else {
            throw CkptError(.missingTensor, "block \(index) has no \(role) weight", path: model.path)
        }
        let cols = input == .mlpHidden ? model.config.mlpDim : model.config.dim
        var values = try model.storedValues([name])[name]!
        try values.withUnsafeMutableBufferPointer { (w: inout UnsafeMutableBufferPointer<Float>) throws(CkptError) in
            try quantize(w.baseAddress!, layer.rows, cols, name)
            model.replaceWeight(of: layer, with: w.baseAddress!)
        }
        return (name, values)
    }

    /// Block `index`'s folded tensors in the stored layout: norms, q/k/v (or qkv), fc1 weight and bias.
    func storeBlock(_ index: Int, _ block: ViTBlock, into tensors: inout [String: [Float]]) {
        let d = model.config.dim
        func put(_ role: ViTName.Role, _ parameter: ViTName.Parameter, _ values: [Float]) {
            if let name = model.tensorName(role, parameter) { tensors[name] = values }
        }
        put(.norm1(index), .weight, block.norm1Weight.values)
        put(.norm1(index), .bias, block.norm1Bias.values)
        put(.norm2(index), .weight, block.norm2Weight.values)
        put(.norm2(index), .bias, block.norm2Bias.values)
        let qkv = block.qkvWeight.values, qkvBias = block.qkvBias.values
        if model.tensorName(.qkv(index), .weight) != nil {
            put(.qkv(index), .weight, qkv)
            put(.qkv(index), .bias, qkvBias)
        } else {
            for (part, role) in [ViTName.Role.query(index), .key(index), .value(index)].enumerated() {
                put(role, .weight, Array(qkv[(part * d * d)..<((part + 1) * d * d)]))
                put(role, .bias, Array(qkvBias[(part * d)..<((part + 1) * d)]))
            }
        }
        put(.fc1(index), .weight, block.fc1Weight.values)
        put(.fc1(index), .bias, block.fc1Bias.values)
    }
}

/// Applies the quantizers calibrated so far and collects the sites being calibrated.
struct CalibrationHook: ActivationHook {
    let apply: FakeQuantization
    let collector: Collector

    func handles(_ site: ActivationSite) -> Bool { apply.handles(site) || collector.targets[site] != nil }

    func process(_ site: ActivationSite, _ values: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int) {
        if apply.handles(site) { apply.process(site, values, rows: rows, width: width, stride: stride) }
        if collector.targets[site] != nil { collector.collect(site, values, rows: rows, width: width, stride: stride) }
    }
}

/// Copies a micro-batch's values at the collected sites to their place in the whole set (image `first` on). The
/// probabilities arrive one (image, head) matrix per call, in order.
final class Collector: @unchecked Sendable {
    let targets: [ActivationSite: FloatBuffer]
    let first: Int, tokens: Int, heads: Int
    private var probabilityCalls = 0  // one worker owns a collector

    init(targets: [ActivationSite: FloatBuffer], first: Int, tokens: Int, heads: Int) {
        self.targets = targets
        self.first = first
        self.tokens = tokens
        self.heads = heads
    }

    func collect(_ site: ActivationSite, _ values: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int) {
        guard let target = targets[site] else { return }
        let destination: UnsafeMutablePointer<Float>
        if case .block(_, .attnProbs) = site {
            destination = target.pointer + (first * heads + probabilityCalls) * tokens * tokens
            probabilityCalls += 1
        } else {
            destination = target.pointer + first * tokens * width
        }
        for r in 0..<rows { (destination + r * width).update(from: values + r * stride, count: width) }
    }
}
