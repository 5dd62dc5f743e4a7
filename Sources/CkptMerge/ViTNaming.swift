/// Key naming of ViT-family checkpoints: timm (`blocks.3.attn.qkv.weight`), Hugging Face transformers v4
/// (`encoder.layer.3.attention.attention.query.weight`, ViT and DINOv2 flavours) and transformers 5.x
/// (`attention.q_proj`, `layers.3.`). Every name is parsed into a scheme-free ``ViTName`` (role + layer), so an
/// adapter written against one naming lands on a base in another, and `convert --rename` can rewrite names.
public struct ViTName: Hashable, Sendable, CustomStringConvertible {
    /// What a tensor is, independent of naming. Layer roles carry the block index.
    public enum Role: Hashable, Sendable {
        case classToken, positionEmbedding, maskToken, registerTokens, patchProjection, finalNorm, head
        case norm1(Int), query(Int), key(Int), value(Int), qkv(Int), attentionOutput(Int), layerScale1(Int)
        case norm2(Int), fc1(Int), fc2(Int), layerScale2(Int)

        /// The block index of a per-layer role.
        public var layerIndex: Int? {
            switch self {
            case .norm1(let i), .query(let i), .key(let i), .value(let i), .qkv(let i), .attentionOutput(let i),
                .layerScale1(let i), .norm2(let i), .fc1(let i), .fc2(let i), .layerScale2(let i):
                return i
            default:
                return nil
            }
        }
    }

    /// `weight`, `bias`, or nothing for bare parameters (tokens, position embeddings, layer scales).
    public enum Parameter: String, Hashable, Sendable { case weight, bias, value }

    public var role: Role
    public var parameter: Parameter
    /// Whatever precedes the recognised part (`backbone.`, `vit.`, `dinov2.`), kept so renames preserve it.
    public var prefix: String

    public var description: String { "\(prefix)\(role)/\(parameter.rawValue)" }

    /// The scheme-free identity used for matching (the prefix is not part of it).
    public struct Key: Hashable, Sendable {
        public let role: Role
        public let parameter: Parameter

        public init(role: Role, parameter: Parameter) {
            self.role = role
            self.parameter = parameter
        }
    }

    public var key: Key { Key(role: role, parameter: parameter) }

    // Module paths inside one block, for every supported naming (longest first where one is a suffix of another).
    static let layerModules: [(path: String, make: @Sendable (Int) -> Role)] = [
        ("attention.attention.query", { .query($0) }), ("attention.attention.key", { .key($0) }),
        ("attention.attention.value", { .value($0) }), ("attention.output.dense", { .attentionOutput($0) }),
        ("attention.q_proj", { .query($0) }), ("attention.k_proj", { .key($0) }), ("attention.v_proj", { .value($0) }),
        ("attention.o_proj", { .attentionOutput($0) }),
        ("attn.qkv", { .qkv($0) }), ("attn.proj", { .attentionOutput($0) }),
        ("norm1", { .norm1($0) }), ("layernorm_before", { .norm1($0) }),
        ("norm2", { .norm2($0) }), ("layernorm_after", { .norm2($0) }),
        ("mlp.fc1", { .fc1($0) }), ("intermediate.dense", { .fc1($0) }),
        ("mlp.fc2", { .fc2($0) }), ("output.dense", { .fc2($0) }),
    ]
    static let layerScales: [(path: String, make: @Sendable (Int) -> Role)] = [
        ("ls1.gamma", { .layerScale1($0) }), ("layer_scale1.lambda1", { .layerScale1($0) }),
        ("ls2.gamma", { .layerScale2($0) }), ("layer_scale2.lambda1", { .layerScale2($0) }),
    ]
    static let globalModules: [(path: String, role: Role)] = [
        ("embeddings.patch_embeddings.projection", .patchProjection), ("patch_embed.proj", .patchProjection),
        ("layernorm", .finalNorm), ("norm", .finalNorm), ("classifier", .head), ("head", .head),
    ]
    static let globalParameters: [(path: String, role: Role)] = [
        ("embeddings.cls_token", .classToken), ("cls_token", .classToken),
        ("embeddings.position_embeddings", .positionEmbedding), ("pos_embed", .positionEmbedding),
        ("embeddings.mask_token", .maskToken), ("mask_token", .maskToken),
        ("embeddings.register_tokens", .registerTokens), ("reg_token", .registerTokens),
    ]
    // Block containers: timm `blocks.N`, HF v4 `encoder.layer.N`, HF v5 ViT `layers.N`.
    static let containers: [[String]] = [["encoder", "layer"], ["blocks"], ["layers"]]

    /// Segments models are commonly wrapped in: HF `base_model_prefix` values, timm/torch training wrappers.
    static let wrapperSegments: Set<String> = [
        "backbone", "model", "module", "_orig_mod", "base_model", "vit", "dinov2", "deit", "beit", "bert", "roberta", "distilbert",
        "transformer", "visual", "vision_model", "encoder_model", "net", "swin", "convnext",
    ]

    /// True for "" and for prefixes made only of wrapper segments (`backbone.`, `model.vit.`).
    static func isWrapperPrefix(_ prefix: String) -> Bool {
        prefix.split(separator: ".").allSatisfy { wrapperSegments.contains(String($0)) }
    }

    /// The most transformer blocks a name may number (indices 0 ..< 2^20); larger indices are not ViT names.
    public static let maximumBlocks = 1 << 20

    /// Parses a full tensor name; nil when it is not a recognised ViT tensor (a BERT name, an adapter key…).
    public static func parse(_ name: String) -> ViTName? {
        let parts = name.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        guard parts.count >= 1, !parts.contains("") else { return nil }
        // Inside a block: <prefix><container>.<N>.<module>.<param>
        for container in containers {
            guard parts.count > container.count + 1 else { continue }
            for start in 0...(parts.count - container.count - 1) where Array(parts[start..<start + container.count]) == container {
                // Block indices are bounded (2^20 blocks) so `index + 1` layer counts cannot overflow.
                guard let index = Int(parts[start + container.count]), index >= 0, index < ViTName.maximumBlocks,
                    String(index) == parts[start + container.count]
                else { continue }
                let rest = parts[(start + container.count + 1)...].joined(separator: ".")
                let prefix = parts[..<start].map { $0 + "." }.joined()
                if let scale = layerScales.first(where: { $0.path == rest }) {
                    return ViTName(role: scale.make(index), parameter: .value, prefix: prefix)
                }
                guard let last = parts.last, let parameter = Parameter(rawValue: last), parameter != .value else { continue }
                let module = parts[(start + container.count + 1)..<(parts.count - 1)].joined(separator: ".")
                if let entry = layerModules.first(where: { $0.path == module }) {
                    return ViTName(role: entry.make(index), parameter: parameter, prefix: prefix)
                }
            }
        }
        // Top level: <prefix><path>[.<param>], where the prefix may only be model wrappers (`backbone.`, `vit.`):
        // `norm`, `head` and the like are common words (`patch_embed.norm` is not the final norm).
        for entry in globalParameters where name == entry.path || name.hasSuffix("." + entry.path) {
            let prefix = String(name.dropLast(entry.path.count))
            guard isWrapperPrefix(prefix) else { continue }
            return ViTName(role: entry.role, parameter: .value, prefix: prefix)
        }
        if let last = parts.last, let parameter = Parameter(rawValue: last), parameter != .value, parts.count >= 2 {
            let module = parts.dropLast().joined(separator: ".")
            for entry in globalModules where module == entry.path || module.hasSuffix("." + entry.path) {
                let prefix = String(module.dropLast(entry.path.count))
                guard isWrapperPrefix(prefix) else { continue }
                return ViTName(role: entry.role, parameter: parameter, prefix: prefix)
            }
        }
        return nil
    }
}

/// The namings `convert --rename` writes.
public enum ViTNamingScheme: String, Sendable, CaseIterable {
    case timm
    /// transformers v4 names, which transformers 5.x still loads: the DINOv2 flavour when the model has
    /// LayerScale (`norm1`, `mlp.fc1`, `layer_scale1.lambda1`), the ViT flavour otherwise.
    case hf

    /// The tensor name in this scheme. `dinov2` picks the HF flavour; the prefix is the caller's.
    public func name(_ role: ViTName.Role, _ parameter: ViTName.Parameter, dinov2: Bool, prefix: String) -> String {
        let suffix = parameter == .value ? "" : "." + parameter.rawValue
        let body: String
        switch self {
        case .timm:
            switch role {
            case .classToken: body = "cls_token"
            case .positionEmbedding: body = "pos_embed"
            case .maskToken: body = "mask_token"
            case .registerTokens: body = "reg_token"
            case .patchProjection: body = "patch_embed.proj" + suffix
            case .finalNorm: body = "norm" + suffix
            case .head: body = "head" + suffix
            case .norm1(let i): body = "blocks.\(i).norm1" + suffix
            case .query(let i): body = "blocks.\(i).attn.q" + suffix  // never written: q/k/v are fused for timm
            case .key(let i): body = "blocks.\(i).attn.k" + suffix
            case .value(let i): body = "blocks.\(i).attn.v" + suffix
            case .qkv(let i): body = "blocks.\(i).attn.qkv" + suffix
            case .attentionOutput(let i): body = "blocks.\(i).attn.proj" + suffix
            case .layerScale1(let i): body = "blocks.\(i).ls1.gamma"
            case .norm2(let i): body = "blocks.\(i).norm2" + suffix
            case .fc1(let i): body = "blocks.\(i).mlp.fc1" + suffix
            case .fc2(let i): body = "blocks.\(i).mlp.fc2" + suffix
            case .layerScale2(let i): body = "blocks.\(i).ls2.gamma"
            }
        case .hf:
            switch role {
            case .classToken: body = "embeddings.cls_token"
            case .positionEmbedding: body = "embeddings.position_embeddings"
            case .maskToken: body = "embeddings.mask_token"
            case .registerTokens: body = "embeddings.register_tokens"
            case .patchProjection: body = "embeddings.patch_embeddings.projection" + suffix
            case .finalNorm: body = "layernorm" + suffix
            case .head: body = "classifier" + suffix
            case .norm1(let i): body = "encoder.layer.\(i)." + (dinov2 ? "norm1" : "layernorm_before") + suffix
            case .query(let i): body = "encoder.layer.\(i).attention.attention.query" + suffix
            case .key(let i): body = "encoder.layer.\(i).attention.attention.key" + suffix
            case .value(let i): body = "encoder.layer.\(i).attention.attention.value" + suffix
            case .qkv(let i): body = "encoder.layer.\(i).attention.attention.qkv" + suffix  // never written: split
            case .attentionOutput(let i): body = "encoder.layer.\(i).attention.output.dense" + suffix
            case .layerScale1(let i): body = "encoder.layer.\(i).layer_scale1.lambda1"
            case .norm2(let i): body = "encoder.layer.\(i)." + (dinov2 ? "norm2" : "layernorm_after") + suffix
            case .fc1(let i): body = "encoder.layer.\(i)." + (dinov2 ? "mlp.fc1" : "intermediate.dense") + suffix
            case .fc2(let i): body = "encoder.layer.\(i)." + (dinov2 ? "mlp.fc2" : "output.dense") + suffix
            case .layerScale2(let i): body = "encoder.layer.\(i).layer_scale2.lambda1"
            }
        }
        return prefix + body
    }
}
