import CkptCore
import CkptFormats

/// The architecture and preprocessing of a ViT-family encoder (timm ViT/DeiT, DINOv2; HF `vit` and `dinov2`).
///
/// Values come from `config.json` (+ `preprocessor_config.json`) when the model is a Hugging Face folder, otherwise
/// from the tensor shapes; explicit ``Overrides`` win over both. `sources` says where each value came from, so
/// `ckpt run --json` can show what was assumed.
public struct ViTConfig: Sendable, Equatable {
    /// "vit" or "dinov2" (config.json's model_type; from shapes: LayerScale means DINOv2).
    public var modelType: String
    /// The tensor naming found: "timm" or "hf".
    public var naming: String
    public var dim: Int
    public var depth: Int
    public var heads: Int
    public var mlpDim: Int
    public var patchSize: Int
    public var channels: Int
    /// The stored position-embedding grid (patch rows × columns) and whether it has an entry for the class token.
    public var positionGrid: (height: Int, width: Int)
    public var positionIncludesClassToken: Bool
    public var layerScale: Bool
    public var eps: Float
    /// The input size images are brought to (square).
    public var imageSize: Int
    public var mean: [Float]
    public var std: [Float]
    /// "config.json", "preprocessor_config.json", "shapes", "default" or "flag", per field name.
    public var sources: [String: String]

    public var headDim: Int { dim / heads }

    public static func == (a: ViTConfig, b: ViTConfig) -> Bool {
        a.modelType == b.modelType && a.dim == b.dim && a.depth == b.depth && a.heads == b.heads && a.mlpDim == b.mlpDim
            && a.patchSize == b.patchSize && a.channels == b.channels && a.positionGrid == b.positionGrid
            && a.positionIncludesClassToken == b.positionIncludesClassToken && a.layerScale == b.layerScale
            && a.eps == b.eps && a.imageSize == b.imageSize && a.mean == b.mean && a.std == b.std
    }

    /// Values given on the command line.
    public struct Overrides: Sendable {
        public var heads: Int?
        public var eps: Float?
        public var mean: [Float]?
        public var std: [Float]?
        public var imageSize: Int?

        public init(heads: Int? = nil, eps: Float? = nil, mean: [Float]? = nil, std: [Float]? = nil, imageSize: Int? = nil) {
            self.heads = heads
            self.eps = eps
            self.mean = mean
            self.std = std
            self.imageSize = imageSize
        }
    }

    static let imageNetMean: [Float] = [0.485, 0.456, 0.406]
    static let imageNetStd: [Float] = [0.229, 0.224, 0.225]

    /// Builds the configuration from the shapes found in the checkpoint, then `config.json`/`preprocessor_config.json`
    /// (when `folder` holds them), then the overrides; checks that the result is consistent with the shapes.
    static func resolve(shapes: ViTShapes, folder: String?, overrides: Overrides, path: String) throws(CkptError) -> ViTConfig {
        var sources: [String: String] = [:]
        func note(_ field: String, _ source: String) { sources[field] = source }
        for field in ["dim", "depth", "mlp_dim", "patch_size", "channels", "position_grid", "layer_scale"] { note(field, "shapes") }

        let hfConfig = try folder.flatMap { (dir: String) throws(CkptError) -> JSONValue? in try readJSON(FilePaths.join(dir, "config.json")) }
        let preprocessor = try folder.flatMap { (dir: String) throws(CkptError) -> JSONValue? in
            try readJSON(FilePaths.join(dir, "preprocessor_config.json"))
        }
        let configPath = folder.map { FilePaths.join($0, "config.json") } ?? path

        var modelType = shapes.layerScale ? "dinov2" : "vit"
        note("model_type", "shapes (LayerScale → dinov2)")
        // Heads cannot be read from shapes: ViTs keep a head width of 64 (ViT-Ti/S/B/L, DeiT, DINOv2 S/B/L).
        var heads = shapes.dim % 64 == 0 ? shapes.dim / 64 : 0
        note("heads", "default (dim / 64)")
        // timm and DINOv2 use 1e-6; HF ViT's config says 1e-12 (read from config.json when present).
        var eps: Float = 1e-6
        note("eps", "default")
        var imageSize = shapes.positionGrid.height * shapes.patchSize
        note("image_size", "shapes (position grid × patch)")
        var mean = imageNetMean, std = imageNetStd
        note("mean", "default (ImageNet)")
        note("std", "default (ImageNet)")

        if let hf = try hfConfig.map({ (json: JSONValue) throws(CkptError) in
            try ConfigObject(file: json, path: configPath, code: .modelConfig, name: "config.json")
        }) {
            guard let type = try hf.string("model_type") else { throw hf.error("model_type", "is missing (a string: vit or dinov2)") }
            guard type == "vit" || type == "dinov2" else {
                throw CkptError(.modelConfig, "model_type \"\(type)\" is not supported (vit, dinov2)", path: configPath)
            }
            modelType = type
            note("model_type", "config.json")
            if type == "vit" { mean = [0.5, 0.5, 0.5]; std = [0.5, 0.5, 0.5]; note("mean", "default (vit: 0.5)"); note("std", "default (vit: 0.5)") }
            func integer(_ key: String) throws(CkptError) -> Int? { try hf.integer(key, in: 1...(1 << 20 - 1)) }
            func check(_ key: String, _ value: Int?, _ actual: Int) throws(CkptError) {
                if let value, value != actual {
                    throw CkptError(.modelConfig, "\"\(key)\" is \(value) but the weights say \(actual)", path: configPath)
                }
            }
            try check("hidden_size", integer("hidden_size"), shapes.dim)
            try check("num_hidden_layers", integer("num_hidden_layers"), shapes.depth)
            try check("patch_size", integer("patch_size"), shapes.patchSize)
            try check("num_channels", integer("num_channels"), shapes.channels)
            try check("intermediate_size", integer("intermediate_size"), shapes.mlpDim)
            if let ratio = try integer("mlp_ratio") { try check("mlp_ratio × hidden_size", ratio * shapes.dim, shapes.mlpDim) }
            if let n = try integer("num_attention_heads") { heads = n; note("heads", "config.json") }
            if let n = try integer("image_size") { imageSize = n; note("image_size", "config.json") }
            if let e = try hf.number("layer_norm_eps") {
                guard e > 0, e < 1 else { throw hf.error("layer_norm_eps", "\(e) is not in (0, 1)") }
                eps = Float(e)
                note("eps", "config.json")
            }
            if let act = try hf.string("hidden_act"), act != "gelu" {
                throw CkptError(.modelConfig, "hidden_act \"\(act)\" is not supported (the exact-erf \"gelu\" only)", path: configPath)
            }
            if try hf.bool("use_swiglu_ffn") == true {
                throw CkptError(.modelConfig, "use_swiglu_ffn is not supported (DINOv2 g/14's SwiGLU MLP)", path: configPath)
            }
            // Read by transformers, fixed in ckpt's engine: type-checked so a malformed file is not half-read.
            _ = try hf.bool("qkv_bias")
            _ = try hf.number("layerscale_value")
        }
        if let pre = preprocessor {
            let prePath = FilePaths.join(folder!, "preprocessor_config.json")
            let object = try ConfigObject(file: pre, path: prePath, code: .modelConfig, name: "preprocessor_config.json")
            func triple(_ key: String) throws(CkptError) -> [Float]? {
                try object.numbers(key, count: shapes.channels, nullable: true)?.map { Float($0) }
            }
            if let m = try triple("image_mean") { mean = m; note("mean", "preprocessor_config.json") }
            if let s = try triple("image_std") { std = s; note("std", "preprocessor_config.json") }
            _ = try object.bool("do_normalize", nullable: true)
        }
        if let h = overrides.heads { heads = h; note("heads", "flag") }
        if let e = overrides.eps { eps = e; note("eps", "flag") }
        if let m = overrides.mean { mean = m; note("mean", "flag") }
        if let s = overrides.std { std = s; note("std", "flag") }
        if let size = overrides.imageSize { imageSize = size; note("image_size", "flag") }

        guard heads > 0 else {
            throw CkptError(.modelConfig, "cannot infer the number of heads: no config.json and the width \(shapes.dim) is not a multiple of the usual head width 64 (set --heads)", path: path)
        }
        guard shapes.dim % heads == 0 else {
            throw CkptError(.modelConfig, "\(heads) heads do not divide the width \(shapes.dim) (set --heads)", path: path)
        }
        guard eps > 0, eps.isFinite else { throw CkptError(.modelConfig, "eps must be positive and finite", path: path) }
        guard mean.count == shapes.channels, std.count == shapes.channels, std.allSatisfy({ $0 > 0 && $0.isFinite }),
            mean.allSatisfy(\.isFinite)
        else {
            throw CkptError(.modelConfig, "mean/std need \(shapes.channels) finite values (std > 0)", path: path)
        }
        guard imageSize >= shapes.patchSize, imageSize % shapes.patchSize == 0, imageSize <= 4096 else {
            throw CkptError(.modelConfig, "image size \(imageSize) must be a multiple of the patch size \(shapes.patchSize) (at most 4096)", path: path)
        }
        return ViTConfig(
            modelType: modelType, naming: shapes.naming, dim: shapes.dim, depth: shapes.depth, heads: heads, mlpDim: shapes.mlpDim,
            patchSize: shapes.patchSize, channels: shapes.channels, positionGrid: shapes.positionGrid,
            positionIncludesClassToken: shapes.positionIncludesClassToken, layerScale: shapes.layerScale, eps: eps,
            imageSize: imageSize, mean: mean, std: std, sources: sources)
    }

    /// A small JSON file, or nil when it does not exist.
    static func readJSON(_ path: String) throws(CkptError) -> JSONValue? { try JSONParser.readFile(path) }
}

/// What the tensor shapes alone say about the architecture.
struct ViTShapes: Sendable {
    /// The largest width, MLP width, channel count or patch side accepted from a file (2^20).
    static let maximumSize = 1 << 20
    var naming: String  // "timm" or "hf"
    var dim: Int
    var depth: Int
    var mlpDim: Int
    var patchSize: Int
    var channels: Int
    var positionGrid: (height: Int, width: Int)
    var positionIncludesClassToken: Bool
    var layerScale: Bool
}
