import CkptCore
import CkptFormats
import CkptKernels
import CkptMerge

extension FloatBuffer {
    /// The tensor decoded to F32 (F16/BF16/F8 exactly, F64 rounded once); the mapped pages are released afterwards.
    convenience init(entry: TensorEntry) throws(CkptError) {
        guard entry.dtype.isConvertibleFloat else {
            throw CkptError(.unsupportedDType, "\(entry.dtype.name) tensor cannot be used as a model weight (floating tensors only)",
                path: entry.path, tensor: entry.name)
        }
        try self.init(count: entry.shape.elements)
        let count = entry.shape.elements
        let destination = pointer
        try entry.decodeFloats(into: destination)
        if let bad = (0..<count).first(where: { !destination[$0].isFinite }) {
            throw CkptError(.nonFinite, "element \(bad) is \(destination[bad]); a model weight must be finite", path: entry.path, tensor: entry.name)
        }
    }

}

/// One pre-norm transformer block, ready for the forward pass: q/k/v fused into one [3D × D] weight (HF stores
/// them apart) and LayerScale folded into the output projections (γ ⊙ (W x + b) = (diag(γ) W) x + γ ⊙ b).
struct ViTBlock: Sendable {
    let norm1Weight, norm1Bias: FloatBuffer
    let qkvWeight, qkvBias: FloatBuffer
    let projectionWeight, projectionBias: FloatBuffer
    let norm2Weight, norm2Bias: FloatBuffer
    let fc1Weight, fc1Bias: FloatBuffer
    let fc2Weight, fc2Bias: FloatBuffer
    /// LayerScale γ of the attention and MLP branches (nil without LayerScale): kept so that a replacement
    /// projection or fc2 weight can be folded like the original.
    let layerScale1, layerScale2: FloatBuffer?
}

/// A linear classifier on the final-norm CLS token: logits = W·cls + b, W [classes × D].
public struct LinearHead: Sendable {
    let weight: FloatBuffer
    let bias: FloatBuffer
    public let classes: Int
    public let width: Int
    /// Class names from the file's `labels` metadata (a JSON array of strings), when present.
    public let labels: [String]?
    public let source: String

    /// Reads a head file: safetensors/npz with `weight` [classes, D] and `bias` [classes], or a single
    /// `<name>.weight` / `<name>.bias` pair (`head.*`, `classifier.*`).
    public static func load(_ path: String) throws(CkptError) -> LinearHead {
        let checkpoint = try Checkpoint.open(path)
        var weight = checkpoint.tensors.first { $0.name == "weight" }
        var bias = checkpoint.tensors.first { $0.name == "bias" }
        if weight == nil {
            let weights = checkpoint.tensors.filter { $0.name.hasSuffix(".weight") }
            guard weights.count == 1 else {
                throw CkptError(.missingTensor, "a head file needs a tensor \"weight\" [classes, D] and \"bias\" [classes] (or one <name>.weight/.bias pair); found \(checkpoint.tensors.map(\.name).prefix(6).joined(separator: ", "))", path: path)
            }
            weight = weights[0]
            let stem = weights[0].name.dropLast(".weight".count)
            bias = checkpoint.tensors.first { $0.name == stem + ".bias" }
        }
        var labels: [String]? = nil
        if let text = checkpoint.metadata["labels"] {
            guard case .array(let items)? = try? JSONParser.parse(text) else {
                throw CkptError(.invalidMetadata, "metadata \"labels\" must be a JSON array of strings", path: path)
            }
            var names: [String] = []
            for item in items {
                guard case .string(let s) = item else { throw CkptError(.invalidMetadata, "metadata \"labels\" must be a JSON array of strings", path: path) }
                names.append(s)
            }
            labels = names
        }
        return try LinearHead(weight: weight!, bias: bias, labels: labels, source: path)
    }

    init(weight: TensorEntry, bias: TensorEntry?, labels: [String]?, source: String) throws(CkptError) {
        guard weight.shape.dims.count == 2, weight.shape.dims[0] > 0, weight.shape.dims[1] > 0 else {
            throw CkptError(.shapeMismatch, "a head weight must be 2-D [classes, D], found \(weight.shape)", path: weight.path, tensor: weight.name)
        }
        classes = weight.shape.dims[0]
        width = weight.shape.dims[1]
        if let bias, bias.shape.dims != [classes] {
            throw CkptError(.shapeMismatch, "head bias must be [\(classes)], found \(bias.shape)", path: bias.path, tensor: bias.name)
        }
        if let labels, labels.count != classes {
            throw CkptError(.invalidMetadata, "metadata \"labels\" names \(labels.count) classes but the head has \(classes)", path: weight.path)
        }
        self.weight = try FloatBuffer(entry: weight)
        if let bias { self.bias = try FloatBuffer(entry: bias) } else { self.bias = try FloatBuffer(count: classes) }
        self.labels = labels
        self.source = source
    }

    public func label(_ index: Int) -> String { labels?[index] ?? String(index) }

    /// logits [n × classes] for features [n × D].
    public func logits(_ features: [Float], count n: Int) throws(CkptError) -> [Float] {
        let bytes = try CheckedSize.product([n, classes, 4], "logits of \(n) images")
        try MemoryBudget.require(bytes, for: "the logits of \(n) images × \(classes) classes", path: source)
        var out = [Float](repeating: 0, count: n * classes)
        guard n > 0 else { return out }
        features.withUnsafeBufferPointer { f in
            out.withUnsafeMutableBufferPointer { o in
                Kernels.fillRows(o.baseAddress!, rows: n, width: classes, stride: classes, with: bias.pointer)
                BLAS.gemmTransposedB(f.baseAddress!, lda: width, weight.pointer, ldb: width, o.baseAddress!, ldc: classes,
                    m: n, n: classes, k: width, beta: 1)
            }
        }
        return out
    }
}

/// A ViT-family encoder loaded for inference: timm ViT/DeiT and DINOv2 (LayerScale) in timm or Hugging Face
/// naming (transformers v4 and v5), from a file, shards, or a Hugging Face model folder.
public final class ViTModel: Sendable {
    public let config: ViTConfig
    public let path: String
    /// The classifier stored in the checkpoint itself (timm `head`, HF `classifier`), if any.
    public let head: LinearHead?
    let patchWeight: FloatBuffer  // [D × C·p·p]
    let patchBias: FloatBuffer
    let classToken: FloatBuffer  // [D]
    let positions: FloatBuffer  // stored table [(grid + class?) × D]
    let blocks: [ViTBlock]
    let finalNormWeight, finalNormBias: FloatBuffer
    /// Every block Linear's weight tensor with the input it reads (q, k and v, or the fused qkv, share one).
    public let linearLayers: [LinearLayer]
    /// The checkpoint's tensor name of each ViT role the model was loaded from.
    public let tensorNames: [ViTName.Key: String]

    public static func load(_ path: String, overrides: ViTConfig.Overrides = .init()) throws(CkptError) -> ViTModel {
        let isFolder = FileIdentity.of(path)?.isDirectory == true
        let checkpoint = try Checkpoint.open(path)
        let roles = try RoleTable(checkpoint: checkpoint)
        let shapes = try roles.shapes()
        let config = try ViTConfig.resolve(shapes: shapes, folder: isFolder ? path : nil, overrides: overrides, path: path)
        return try ViTModel(path: path, config: config, roles: roles)
    }

    private init(path: String, config: ViTConfig, roles: RoleTable) throws(CkptError) {
        self.path = path
        self.config = config
        tensorNames = roles.entries.mapValues(\.name)
        let d = config.dim
        patchWeight = try FloatBuffer(entry: roles.require(.patchProjection, .weight))
        if let entry = roles.optional(.patchProjection, .bias) { patchBias = try FloatBuffer(entry: entry) } else { patchBias = try FloatBuffer(count: d) }
        classToken = try FloatBuffer(entry: roles.require(.classToken, .value))
        positions = try FloatBuffer(entry: roles.require(.positionEmbedding, .value))
        finalNormWeight = try FloatBuffer(entry: roles.require(.finalNorm, .weight))
        finalNormBias = try FloatBuffer(entry: roles.require(.finalNorm, .bias))
        var blocks: [ViTBlock] = []
        for layer in 0..<config.depth {
            blocks.append(try roles.block(layer, config: config))
        }
        self.blocks = blocks
        var linearLayers: [LinearLayer] = []
        for i in 0..<config.depth {
            let attention = roles.optional(.qkv(i), .weight).map { [$0] } ?? [.query(i), .key(i), .value(i)].compactMap { roles.optional($0, .weight) }
            for (part, entry) in attention.enumerated() {
                linearLayers.append(LinearLayer(tensor: entry.name, block: i, input: .attention, firstRow: part * d, rows: entry.shape.dims[0]))
            }
            for (role, input) in [(ViTName.Role.attentionOutput(i), LinearInput.projection), (.fc1(i), .mlp), (.fc2(i), .mlpHidden)] {
                if let entry = roles.optional(role, .weight) { linearLayers.append(LinearLayer(tensor: entry.name, block: i, input: input, firstRow: 0, rows: entry.shape.dims[0])) }
            }
        }
        self.linearLayers = linearLayers
        if let w = roles.optional(.head, .weight) {
            let head = try LinearHead(weight: w, bias: roles.optional(.head, .bias), labels: nil, source: w.name)
            guard head.width == d else {
                throw CkptError(.shapeMismatch, "head width \(head.width) ≠ model width \(d)", path: w.path, tensor: w.name)
            }
            self.head = head
        } else {
            head = nil
        }
        for (name, buffer) in [("norm", finalNormWeight), ("cls", classToken)] where buffer.count != d {
            throw CkptError(.shapeMismatch, "\(name) has \(buffer.count) values, expected \(d)", path: path)
        }
    }
}

extension ViTModel {
    /// The checkpoint's tensor name for `role`'s `parameter`, if the model has it.
    public func tensorName(_ role: ViTName.Role, _ parameter: ViTName.Parameter) -> String? {
        tensorNames[ViTName.Key(role: role, parameter: parameter)]
    }

    /// The values of checkpoint tensors as stored (before any folding), decoded to F32, read again from the file.
    public func storedValues(_ names: [String]) throws(CkptError) -> [String: [Float]] {
        let checkpoint = try Checkpoint.open(path)
        var result: [String: [Float]] = [:]
        for name in names {
            guard let entry = checkpoint.tensors.first(where: { $0.name == name }) else {
                throw CkptError(.missingTensor, "tensor is gone from the checkpoint", path: path, tensor: name)
            }
            let buffer = try FloatBuffer(entry: entry)
            result[name] = buffer.values
        }
        return result
    }

    /// Overwrites the forward pass's copy of `layer`'s weight with `values` (the checkpoint's `[out, in]` layout,
    /// as many values as the tensor holds), folding LayerScale as at load time. The checkpoint is not touched;
    /// sequential calibration uses this to run later layers on the quantized earlier ones.
    func replaceWeight(of layer: LinearLayer, with values: UnsafePointer<Float>) {
        let block = blocks[layer.block], d = config.dim, m = config.mlpDim
        switch layer.input {
        case .attention:
            (block.qkvWeight.pointer + layer.firstRow * d).update(from: values, count: layer.rows * d)
        case .projection:
            // γ = 1 without LayerScale: x · 1 is exact.
            for row in 0..<d {
                let g = block.layerScale1?.pointer[row] ?? 1
                for c in 0..<d { block.projectionWeight.pointer[row * d + c] = values[row * d + c] * g }
            }
        case .mlp:
            block.fc1Weight.pointer.update(from: values, count: m * d)
        case .mlpHidden:
            for row in 0..<d {
                let g = block.layerScale2?.pointer[row] ?? 1
                for c in 0..<m { block.fc2Weight.pointer[row * m + c] = values[row * m + c] * g }
            }
        }
    }
}

/// Checkpoint tensors indexed by their scheme-free ViT role.
struct RoleTable {
    let entries: [ViTName.Key: TensorEntry]
    let layers: Int
    let path: String
    let naming: String

    init(checkpoint: Checkpoint) throws(CkptError) {
        path = checkpoint.path
        var byPrefix: [String: [ViTName.Key: TensorEntry]] = [:]
        for entry in checkpoint.tensors {
            guard let name = ViTName.parse(entry.name) else { continue }
            if byPrefix[name.prefix, default: [:]].updateValue(entry, forKey: name.key) != nil {
                throw CkptError(.duplicateName, "two tensors have the same ViT role \(name.role)", path: path, tensor: entry.name)
            }
        }
        let candidates = byPrefix.filter { $0.value[ViTName.Key(role: .patchProjection, parameter: .weight)] != nil }
        guard candidates.count == 1, let chosen = candidates.first else {
            if candidates.isEmpty {
                throw CkptError(.missingTensor, "no ViT patch embedding found (timm patch_embed.proj.weight or HF embeddings.patch_embeddings.projection.weight)", path: path)
            }
            throw CkptError(.modelConfig, "several ViT encoders in one checkpoint (prefixes \(candidates.keys.sorted().map { "\"\($0)\"" }.joined(separator: ", ")))", path: path)
        }
        var entries = chosen.value
        // HF `*ForImageClassification` keeps the encoder under `vit.`/`dinov2.` and the classifier at the root.
        let headKey = ViTName.Key(role: .head, parameter: .weight)
        if entries[headKey] == nil {
            let heads = byPrefix.filter { $0.key != chosen.key && $0.value[headKey] != nil && $0.value.count <= 2 }
            if heads.count == 1, let other = heads.first {
                for (key, entry) in other.value { entries[key] = entry }
            }
        }
        self.entries = entries
        var maxLayer = -1
        for key in entries.keys {
            if let layer = key.role.layerIndex { maxLayer = max(maxLayer, layer) }
        }
        layers = maxLayer + 1
        let timm = entries.keys.contains { if case .qkv = $0.role { return true } else { return false } }
            || chosen.value.values.contains { $0.name.hasSuffix("pos_embed") }
        naming = timm ? "timm" : "hf"
        if entries[ViTName.Key(role: .registerTokens, parameter: .value)] != nil {
            throw CkptError(.modelConfig, "register tokens are not supported", path: path,
                tensor: entries[ViTName.Key(role: .registerTokens, parameter: .value)]!.name)
        }
    }

    func optional(_ role: ViTName.Role, _ parameter: ViTName.Parameter) -> TensorEntry? {
        entries[ViTName.Key(role: role, parameter: parameter)]
    }

    func require(_ role: ViTName.Role, _ parameter: ViTName.Parameter) throws(CkptError) -> TensorEntry {
        guard let entry = optional(role, parameter) else {
            throw CkptError(.missingTensor, "the model has no \(ViTNamingScheme.timm.name(role, parameter, dinov2: true, prefix: "")) (\(ViTNamingScheme.hf.name(role, parameter, dinov2: true, prefix: "")))", path: path)
        }
        return entry
    }

    func require(_ role: ViTName.Role, _ parameter: ViTName.Parameter, shape: [Int]) throws(CkptError) -> TensorEntry {
        let entry = try require(role, parameter)
        guard entry.shape.dims == shape else {
            throw CkptError(.shapeMismatch, "shape \(entry.shape), expected [\(shape.map(String.init).joined(separator: ", "))]", path: entry.path, tensor: entry.name)
        }
        return entry
    }

    func shapes() throws(CkptError) -> ViTShapes {
        let patch = try require(.patchProjection, .weight)
        let dims = patch.shape.dims
        guard dims.count == 4, dims[2] == dims[3], dims[0] > 0, dims[1] > 0, dims[2] > 0 else {
            throw CkptError(.shapeMismatch, "patch projection must be [D, C, p, p], found \(patch.shape)", path: patch.path, tensor: patch.name)
        }
        // Widths, channels and patch sizes enter BLAS as 32-bit ints and their squares size buffers.
        guard dims.allSatisfy({ $0 <= ViTShapes.maximumSize }) else {
            throw CkptError(.tooLarge, "patch projection \(patch.shape): each size must be at most \(ViTShapes.maximumSize)", path: patch.path, tensor: patch.name)
        }
        let d = dims[0]
        let cls = try require(.classToken, .value)
        guard cls.shape.elements == d else {
            throw CkptError(.shapeMismatch, "class token has \(cls.shape.elements) values, expected \(d)", path: cls.path, tensor: cls.name)
        }
        let pos = try require(.positionEmbedding, .value)
        let pdims = pos.shape.dims
        guard pdims.count >= 2, pdims.last == d, pos.shape.elements % d == 0, pos.shape.elements >= d else {
            throw CkptError(.shapeMismatch, "position embedding must be [1, tokens, \(d)], found \(pos.shape)", path: pos.path, tensor: pos.name)
        }
        let tokens = pos.shape.elements / d
        func squareRoot(_ n: Int) -> Int? {
            guard n > 0 else { return nil }
            var r = Int(Double(n).squareRoot())
            while r * r > n { r -= 1 }
            while (r + 1) * (r + 1) <= n { r += 1 }
            return r * r == n && r > 0 ? r : nil
        }
        let withClass = squareRoot(tokens - 1)
        let grid: Int
        let includesClass: Bool
        if let g = withClass { grid = g; includesClass = true } else if let g = squareRoot(tokens) { grid = g; includesClass = false } else {
            throw CkptError(.shapeMismatch, "position embedding has \(tokens) tokens: neither a square grid nor a square grid + class token", path: pos.path, tensor: pos.name)
        }
        guard layers > 0 else { throw CkptError(.missingTensor, "the model has no transformer blocks", path: path) }
        let fc1 = try require(.fc1(0), .weight)
        guard fc1.shape.dims.count == 2, fc1.shape.dims[1] == d, fc1.shape.dims[0] > 0, fc1.shape.dims[0] <= ViTShapes.maximumSize else {
            throw CkptError(.shapeMismatch, "fc1 must be [hidden, \(d)], found \(fc1.shape)", path: fc1.path, tensor: fc1.name)
        }
        return ViTShapes(naming: naming, dim: d, depth: layers, mlpDim: fc1.shape.dims[0], patchSize: dims[2], channels: dims[1],
            positionGrid: (grid, grid), positionIncludesClassToken: includesClass,
            layerScale: optional(.layerScale1(0), .value) != nil)
    }

    func block(_ i: Int, config: ViTConfig) throws(CkptError) -> ViTBlock {
        let d = config.dim, m = config.mlpDim
        func vector(_ role: ViTName.Role, _ parameter: ViTName.Parameter, _ n: Int, defaultZero: Bool = false) throws(CkptError) -> FloatBuffer {
            if defaultZero, optional(role, parameter) == nil { return try FloatBuffer(count: n) }
            return try FloatBuffer(entry: require(role, parameter, shape: [n]))
        }
        let qkvWeight: FloatBuffer, qkvBias: FloatBuffer
        if optional(.qkv(i), .weight) != nil {
            qkvWeight = try FloatBuffer(entry: require(.qkv(i), .weight, shape: [3 * d, d]))
            qkvBias = try vector(.qkv(i), .bias, 3 * d, defaultZero: true)
        } else {
            qkvWeight = try FloatBuffer(count: 3 * d * d)
            qkvBias = try FloatBuffer(count: 3 * d)
            for (part, role) in [ViTName.Role.query(i), .key(i), .value(i)].enumerated() {
                let w = try FloatBuffer(entry: require(role, .weight, shape: [d, d]))
                (qkvWeight.pointer + part * d * d).update(from: w.pointer, count: d * d)
                let b = try vector(role, .bias, d, defaultZero: true)
                (qkvBias.pointer + part * d).update(from: b.pointer, count: d)
            }
        }
        let projectionWeight = try FloatBuffer(entry: require(.attentionOutput(i), .weight, shape: [d, d]))
        let projectionBias = try vector(.attentionOutput(i), .bias, d, defaultZero: true)
        let fc1Weight = try FloatBuffer(entry: require(.fc1(i), .weight, shape: [m, d]))
        let fc1Bias = try vector(.fc1(i), .bias, m, defaultZero: true)
        let fc2Weight = try FloatBuffer(entry: require(.fc2(i), .weight, shape: [d, m]))
        let fc2Bias = try vector(.fc2(i), .bias, d, defaultZero: true)
        var layerScales: (FloatBuffer, FloatBuffer)? = nil
        if config.layerScale {
            let ls1 = try vector(.layerScale1(i), .value, d)
            let ls2 = try vector(.layerScale2(i), .value, d)
            layerScales = (ls1, ls2)
            for row in 0..<d {
                let g1 = ls1.pointer[row], g2 = ls2.pointer[row]
                for c in 0..<d { projectionWeight.pointer[row * d + c] *= g1 }
                projectionBias.pointer[row] *= g1
                for c in 0..<m { fc2Weight.pointer[row * m + c] *= g2 }
                fc2Bias.pointer[row] *= g2
            }
        } else if optional(.layerScale1(i), .value) != nil || optional(.layerScale2(i), .value) != nil {
            throw CkptError(.modelConfig, "block \(i) has LayerScale but block 0 has none", path: path)
        }
        return ViTBlock(
            norm1Weight: try vector(.norm1(i), .weight, d), norm1Bias: try vector(.norm1(i), .bias, d),
            qkvWeight: qkvWeight, qkvBias: qkvBias, projectionWeight: projectionWeight, projectionBias: projectionBias,
            norm2Weight: try vector(.norm2(i), .weight, d), norm2Bias: try vector(.norm2(i), .bias, d),
            fc1Weight: fc1Weight, fc1Bias: fc1Bias, fc2Weight: fc2Weight, fc2Bias: fc2Bias,
            layerScale1: layerScales?.0, layerScale2: layerScales?.1)
    }
}
