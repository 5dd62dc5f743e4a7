import CkptCore
import CkptFormats

/// Which tensors of a checkpoint get quantized: Linear weights (2-D `*.weight`) and convolution weights (4-D),
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
                return try Regex(pattern)
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
        guard entry.dtype.isConvertibleFloat, entry.quantization == nil else { return nil }
        let lower = entry.name.lowercased()
        guard lower.hasSuffix("weight") else { return nil }
        switch entry.shape.rank {
        case 2:
            // Token, position and patch embeddings are lookup tables, not Linear layers.
            if lower.contains("embed") || lower.contains("token") || lower.contains("position") { return nil }
            return .linear
        case 4:
            return .conv
        default:
            return nil
        }
    }

    /// Why `entry` stays unquantized, or nil when it is selected.
    public func exclusion(_ entry: TensorEntry) -> String? {
        guard TensorSelection.kind(of: entry) != nil else {
            return entry.quantization != nil ? "already quantized in the input" : "not a Linear/Conv weight"
        }
        if let only, (try? only.firstMatch(in: entry.name)) == nil { return "not matched by --only \(onlyPattern!)" }
        if let skip, (try? skip.firstMatch(in: entry.name)) != nil { return "matched by --skip \(skipPattern!)" }
        return nil
    }
}
