import CkptCore
import CkptFormats

/// Which tensors of a checkpoint get quantized: Linear weights (2-D `*.weight`) and convolution weights (3- to 5-D),
/// never norms, biases, embeddings, position embeddings or class tokens; narrowed by `--only`/`--skip`
/// (unanchored regular-expression searches on the tensor name, like grep).
public struct TensorSelection: Sendable {
    public enum Kind: String, Sendable {
        case linear
        case conv
    }

    nonisolated(unsafe) let only: Regex<AnyRegexOutput>?
    nonisolated(unsafe) let skip: Regex<AnyRegexOutput>?
    let onlyPattern: String?
    let skipPattern: String?

    public init(only: String? = nil, skip: String? = nil) throws(CkptError) {
        func compile(_ pattern: String?, _ flag: String) throws(CkptError) -> Regex<AnyRegexOutput>? {
            guard let pattern else { return nil }
            do {
                // grep's \b: a boundary between [A-Za-z0-9_] and anything else. Swift's default (Unicode word
                // boundaries) treats "attn.qkv.weight" as one word, so `\bqkv\b` would match nothing.
                return try Regex(pattern).wordBoundaryKind(.simple)
            } catch {
                throw CkptError(.invalidArgument, "\(flag) '\(pattern)' is not a valid regular expression: \(error)")
            }
        }
        self.only = try compile(only, "--only")
        self.skip = try compile(skip, "--skip")
        onlyPattern = only
        skipPattern = skip
    }

    /// The kind of weight `entry` is, or nil when it is not a Linear/Conv weight at all.
    public static func kind(of entry: TensorEntry) -> Kind? {
        guard entry.dtype.isConvertibleFloat, entry.quantization == nil, entry.name.lowercased().hasSuffix("weight") else { return nil }
        switch entry.shape.rank {
        case 2: return isEmbeddingTable(entry.name) ? nil : .linear
        case 3, 4, 5: return .conv  // Conv1d [out, in, k], Conv2d [out, in, kh, kw], Conv3d (video patch embeddings)
        default: return nil
        }
    }

    /// Whether a 2-D weight is a lookup table (token, position or type embedding), which is indexed, not multiplied.
    /// Judged by the module's own name, the component before `.weight`: a Linear inside or beside an embedding
    /// (MAE's `decoder_embed`, Mixer's `mlp_tokens.fc1`, a `positional_proj`) stays a Linear.
    public static func isEmbeddingTable(_ name: String) -> Bool {
        var parts = name.lowercased().split(separator: ".")
        if parts.count > 1, parts.last == "weight" { parts.removeLast() }
        guard let module = parts.last else { return false }
        return ["wte", "wpe", "shared", "embed", "embedding", "embeddings"].contains(module)
            || module.hasPrefix("embed_") || module.hasPrefix("embedding")  // embed_tokens, embed_positions
            || module.hasSuffix("_embedding") || module.hasSuffix("_embeddings")  // word_/position_/token_type_embeddings
            || module.contains("pos_embed")
    }

    /// Why `entry` stays unquantized, or nil when it is selected.
    public func exclusion(_ entry: TensorEntry) -> String? {
        guard TensorSelection.kind(of: entry) != nil else {
            if entry.quantization != nil { return "already quantized in the input" }
            if entry.shape.rank == 2, entry.dtype.isConvertibleFloat, Self.isEmbeddingTable(entry.name) { return "embedding table (looked up, not multiplied)" }
            return "not a Linear/Conv weight"
        }
        if let only, (try? only.firstMatch(in: entry.name)) == nil { return "not matched by --only \(onlyPattern!)" }
        if let skip, (try? skip.firstMatch(in: entry.name)) != nil { return "matched by --skip \(skipPattern!)" }
        return nil
    }
}
