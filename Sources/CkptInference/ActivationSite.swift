import CkptMerge

/// A place in the ViT forward pass whose values an integer runtime would quantize: the input of every Linear, both
/// operands of each attention matmul, the patch embedding's input and the head's input.
public enum ActivationSite: Hashable, Sendable, CustomStringConvertible {
    /// The normalised pixels [C, S, S] of each image (the patch-embedding convolution's input).
    case patchInput
    /// The input of a block Linear: norm1's output (q, k, v), the heads' output (projection), norm2's output (fc1),
    /// GELU(fc1) (fc2).
    case linearInput(block: Int, LinearInput)
    /// The operands of the scores matmul q·kᵀ (before the 1/√d scale, which the matmul applies).
    case query(block: Int), key(block: Int)
    /// The operands of P·V: the values and the post-softmax probabilities.
    case value(block: Int), probabilities(block: Int)
    /// The final-norm CLS features a linear head reads.
    case headInput

    /// The site's name in side files and reports: `patch_embed.input`, `blocks.{i}.{qkv|proj|fc1|fc2}.input`,
    /// `blocks.{i}.attn.{q|k|v|probs}`, `head.input`.
    public var description: String {
        switch self {
        case .patchInput: "patch_embed.input"
        case .headInput: "head.input"
        case .linearInput(let b, let input):
            switch input {
            case .attention: "blocks.\(b).qkv.input"
            case .projection: "blocks.\(b).proj.input"
            case .mlp: "blocks.\(b).fc1.input"
            case .mlpHidden: "blocks.\(b).fc2.input"
            }
        case .query(let b): "blocks.\(b).attn.q"
        case .key(let b): "blocks.\(b).attn.k"
        case .value(let b): "blocks.\(b).attn.v"
        case .probabilities(let b): "blocks.\(b).attn.probs"
        }
    }

    /// The site a name denotes, or nil.
    public init?(name: String) {
        switch name {
        case "patch_embed.input": self = .patchInput; return
        case "head.input": self = .headInput; return
        default: break
        }
        let parts = name.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4, parts[0] == "blocks", let b = Int(parts[1]), b >= 0, b < ViTName.maximumBlocks,
            String(b) == parts[1]
        else { return nil }
        switch (parts[2], parts[3]) {
        case ("qkv", "input"): self = .linearInput(block: b, .attention)
        case ("proj", "input"): self = .linearInput(block: b, .projection)
        case ("fc1", "input"): self = .linearInput(block: b, .mlp)
        case ("fc2", "input"): self = .linearInput(block: b, .mlpHidden)
        case ("attn", "q"): self = .query(block: b)
        case ("attn", "k"): self = .key(block: b)
        case ("attn", "v"): self = .value(block: b)
        case ("attn", "probs"): self = .probabilities(block: b)
        default: return nil
        }
    }

    /// Every site of a model with `blocks` blocks, in forward order.
    public static func all(blocks: Int) -> [ActivationSite] {
        var sites: [ActivationSite] = [.patchInput]
        for b in 0..<blocks {
            sites += [.linearInput(block: b, .attention), .query(block: b), .key(block: b), .value(block: b), .probabilities(block: b),
                .linearInput(block: b, .projection), .linearInput(block: b, .mlp), .linearInput(block: b, .mlpHidden)]
        }
        return sites + [.headInput]
    }
}

/// Sees (and may rewrite in place) the values at activation sites during a forward pass: fake quantization
/// (quantize → dequantize, as an integer runtime would see the values) or calibration statistics. Called from the
/// workers, concurrently, once per micro-batch and site (once per image and head for the probabilities).
public protocol ActivationHook: Sendable {
    /// Whether the forward pass hands `site`'s values to ``process(_:_:rows:width:stride:)``.
    func handles(_ site: ActivationSite) -> Bool
    /// `rows` rows of `width` values, consecutive rows `stride` floats apart (q, k and v are column blocks of one
    /// [rows × 3D] matrix).
    func process(_ site: ActivationSite, _ values: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int)
}
