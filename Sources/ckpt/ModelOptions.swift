import ArgumentParser
import CkptCore
import CkptFormats
import CkptInference
import CkptQuant

/// How to build a ViT from a checkpoint: shared by `run` and `eval`.
struct ModelOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Attention heads (default: config.json, else width / 64).", valueName: "N"))
    var heads: Int?

    @Option(help: ArgumentHelp("LayerNorm epsilon (default: config.json, else 1e-6).", valueName: "EPS"))
    var eps: Double?

    @Option(help: ArgumentHelp("Per-channel image mean, comma-separated (default: preprocessor_config.json, else ImageNet's).", valueName: "M,M,M"))
    var mean: String?

    @Option(help: ArgumentHelp("Per-channel image std, comma-separated.", valueName: "S,S,S"))
    var std: String?

    @Option(help: ArgumentHelp("Input size in pixels, a multiple of the patch size (default: config.json image_size, else the position grid's). Position embeddings are resized bicubically when it differs from the stored grid.", valueName: "PX"))
    var imageSize: Int?

    @Option(help: ArgumentHelp("Images per micro-batch and worker.", valueName: "N"))
    var batchSize: Int = 8

    static func floats(_ text: String, flag: String) throws -> [Float] {
        let parts = text.split(separator: ",", omittingEmptySubsequences: false)
        var values: [Float] = []
        for part in parts {
            guard let v = Float(part.trimmingSpaces), v.isFinite else { throw ValidationError("\(flag) \(text): expected comma-separated numbers") }
            values.append(v)
        }
        return values
    }

    func validate() throws {
        if let heads, heads <= 0 { throw ValidationError("--heads must be positive") }
        if let eps, !(eps > 0 && eps < 1) { throw ValidationError("--eps must be in (0, 1)") }
        if let imageSize, imageSize <= 0 || imageSize > 4096 { throw ValidationError("--image-size must be 1…4096") }
        guard batchSize > 0, batchSize <= 256 else { throw ValidationError("--batch-size must be 1…256") }
        if let mean { _ = try Self.floats(mean, flag: "--mean") }
        if let std {
            let s = try Self.floats(std, flag: "--std")
            if s.contains(where: { $0 <= 0 }) { throw ValidationError("--std values must be positive") }
        }
    }

    var overrides: ViTConfig.Overrides {
        ViTConfig.Overrides(
            heads: heads, eps: eps.map(Float.init), mean: mean.flatMap { try? Self.floats($0, flag: "--mean") },
            std: std.flatMap { try? Self.floats($0, flag: "--std") }, imageSize: imageSize)
    }

    func load(_ path: String) throws(CkptError) -> ViTEngine {
        let model = try ViTModel.load(path, overrides: overrides)
        return try ViTEngine(model: model, microBatch: batchSize)
    }
}

extension Substring {
    var trimmingSpaces: Substring {
        var s = self
        while s.first == " " { s = s.dropFirst() }
        while s.last == " " { s = s.dropLast() }
        return s
    }
}

/// The activation quantizers `run` and `eval` apply: the side file of a model folder written by
/// `ckpt quantize --activation-bits`, unless turned off.
struct ActivationQuantizationOption: ParsableArguments {
    @Flag(name: .customLong("no-activation-quantization"), help: "Ignore a model folder's activation quantizers (activation_quantization.json, compressed-tensors input scales): run the weights alone, in float.")
    var ignore = false

    /// The fake quantization of `path`'s side file and of the static input quantizers stored with its Linears
    /// (compressed-tensors `input_scale`) for `engine`'s model, or nil.
    func hook(for path: String, engine: ViTEngine) throws(CkptError) -> FakeQuantization? {
        guard !ignore else { return nil }
        let sidePath = FilePaths.join(path, ActivationQuantizedWriter.sideFileName)
        let side = try ActivationQuantizedWriter.sideFile(in: path)
        let stored = try Checkpoint.open(path).inputActivations
        guard let quantization = try ActivationQuantization.combining(sideFile: side, sidePath: sidePath, stored: stored, model: engine.model) else { return nil }
        return try FakeQuantization(quantization, config: engine.model.config, path: side != nil ? sidePath : path)
    }
}

/// One line (text) or object (JSON) saying which activation quantizers a run applied.
func describeActivationQuantization(_ hook: FakeQuantization?, json: Bool) -> String {
    guard let hook else { return json ? "null" : "" }
    var bits: [Int: Int] = [:]
    var kinds: [String: Int] = [:]
    for (_, q) in hook.quantization.sites {
        bits[q.bits, default: 0] += 1
        kinds[q.kind.rawValue, default: 0] += 1
    }
    if json {
        return "{\"sites\":[" + hook.quantization.sites.keys.sorted().map { JSONWriter.quoted($0.name) }.joined(separator: ",") + "],"
            + "\"bits\":{" + bits.keys.sorted().map { "\"\($0)\":\(bits[$0]!)" }.joined(separator: ",") + "}}"
    }
    return "activation quantization: \(hook.quantization.sites.count) sites fake-quantized ("
        + bits.keys.sorted().map { "\(bits[$0]!) at \($0) bits" }.joined(separator: ", ") + "; "
        + kinds.keys.sorted().map { "\(kinds[$0]!) \($0)" }.joined(separator: ", ") + ")"
}

/// Where `run` and `eval` write what the model computed.
struct SaveOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Write the final-norm CLS features [N, D] as F32: .npy, or tensor \"features\" of a .npz/.safetensors.", valueName: "FILE"))
    var saveFeatures: String?

    @Option(help: ArgumentHelp("Write the logits [N, classes] as F32 (needs a head): .npy, or tensor \"logits\" of a .npz/.safetensors.", valueName: "FILE"))
    var saveLogits: String?

    /// The formats an array can be saved in, named by the file's extension.
    enum FileFormat: String, CaseIterable { case npy, npz, safetensors }

    static func format(of path: String) throws -> FileFormat {
        guard let format = FileFormat(rawValue: FilePaths.fileExtension(of: path)) else {
            throw ValidationError("\(path): cannot tell the format from the name; use .npy, .npz or .safetensors")
        }
        return format
    }

    func check(inputs: [String?]) throws {
        for out in [saveFeatures, saveLogits].compactMap({ $0 }) {
            if inputs.contains(out) { throw ValidationError("\(out): an output must not overwrite an input") }
            _ = try Self.format(of: out)
        }
        if let saveFeatures, saveFeatures == saveLogits { throw ValidationError("--save-features and --save-logits name the same file") }
    }

    func write(features: [Float], logits: [Float]?, count n: Int, dim: Int, classes: Int?, inputs: [String]) throws {
        if let saveFeatures { try saveFloats(features, name: "features", shape: [n, dim], to: saveFeatures, inputs: inputs) }
        if let saveLogits, let logits, let classes { try saveFloats(logits, name: "logits", shape: [n, classes], to: saveLogits, inputs: inputs) }
    }
}

/// Timing and feature extraction shared by `run` and `eval`.
struct TimedFeatures {
    let features: [Float]
    let seconds: Double

    init(engine: ViTEngine, images: ImageSet, limit: Int? = nil, hook: FakeQuantization? = nil) throws(CkptError) {
        let count = min(images.count, limit ?? images.count)
        let start = MonotonicClock.seconds()
        features = try engine.features(images: images, count: count, hook: hook)
        seconds = MonotonicClock.seconds() - start
    }
}

/// Writes F32 values atomically in the format the file name asks for: a C-order .npy, or one tensor `name` of a
/// .npz or .safetensors.
func saveFloats(_ values: [Float], name: String, shape: [Int], to path: String, inputs: [String]) throws {
    var bytes = [UInt8](repeating: 0, count: values.count * 4)
    values.withUnsafeBytes { raw in bytes.withUnsafeMutableBytes { $0.copyMemory(from: raw) } }
    let tensor = try OutputTensor.bytes(name: name, dtype: .f32, shape: try Shape(shape), bytes)
    let identities = inputs.compactMap { FileIdentity.of($0) }
    switch try SaveOptions.format(of: path) {
    case .npy: try NumPy.write(tensor, to: path, inputs: identities)
    case .npz: try NPZ.write([tensor], to: path, compress: false, inputs: identities)
    case .safetensors: try SafeTensors.write([tensor], metadata: [:], to: path, inputs: identities)
    }
}

func describe(_ config: ViTConfig, size: Int) -> String {
    "\(config.modelType), D=\(config.dim), \(config.depth) layers, \(config.heads) heads, patch \(config.patchSize), \(size) px"
}

func configJSON(_ c: ViTConfig) -> String {
    var sources = "{"
    for (i, key) in c.sources.keys.sorted().enumerated() {
        sources += (i > 0 ? "," : "") + "\(JSONWriter.quoted(key)):\(JSONWriter.quoted(c.sources[key]!))"
    }
    sources += "}"
    let mean = c.mean.map { $0.description }.joined(separator: ",")
    let std = c.std.map { $0.description }.joined(separator: ",")
    return "{\"model_type\":\(JSONWriter.quoted(c.modelType)),\"naming\":\(JSONWriter.quoted(c.naming)),\"dim\":\(c.dim),\"depth\":\(c.depth),\"heads\":\(c.heads),\"mlp_dim\":\(c.mlpDim),"
        + "\"patch_size\":\(c.patchSize),\"image_size\":\(c.imageSize),\"position_grid\":[\(c.positionGrid.height),\(c.positionGrid.width)],"
        + "\"layer_scale\":\(c.layerScale),\"eps\":\(c.eps.description),\"mean\":[\(mean)],\"std\":[\(std)],\"sources\":\(sources)}"
}

