import CkptCore
import CkptFormats
import Testing

@testable import CkptMerge

@Suite("ViT key naming")
struct ViTNamingTests {
    /// The same parameter in timm, HF v4 (ViT and DINOv2 flavours) and HF v5 naming parses to one identity.
    @Test(
        "one identity across namings",
        arguments: [
            (["blocks.3.attn.proj.weight", "encoder.layer.3.attention.output.dense.weight", "vit.layers.3.attention.o_proj.weight",
              "backbone.encoder.layer.3.attention.o_proj.weight"], ViTName.Role.attentionOutput(3), ViTName.Parameter.weight),
            (["blocks.0.norm1.bias", "encoder.layer.0.layernorm_before.bias", "encoder.layer.0.norm1.bias"], .norm1(0), .bias),
            (["blocks.11.mlp.fc1.weight", "encoder.layer.11.intermediate.dense.weight", "encoder.layer.11.mlp.fc1.weight"], .fc1(11), .weight),
            (["blocks.2.mlp.fc2.bias", "encoder.layer.2.output.dense.bias", "layers.2.mlp.fc2.bias"], .fc2(2), .bias),
            (["blocks.5.ls2.gamma", "encoder.layer.5.layer_scale2.lambda1"], .layerScale2(5), .value),
            (["encoder.layer.1.attention.attention.query.weight", "encoder.layer.1.attention.q_proj.weight"], .query(1), .weight),
            (["pos_embed", "embeddings.position_embeddings", "vit.embeddings.position_embeddings"], .positionEmbedding, .value),
            (["patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"], .patchProjection, .weight),
            (["norm.weight", "layernorm.weight", "vit.layernorm.weight"], .finalNorm, .weight),
            (["head.bias", "classifier.bias"], .head, .bias),
        ])
    func identity(names: [String], role: ViTName.Role, parameter: ViTName.Parameter) throws {
        for name in names {
            let parsed = try #require(ViTName.parse(name), "\(name) should parse")
            #expect(parsed.role == role, "\(name)")
            #expect(parsed.parameter == parameter, "\(name)")
        }
    }

    @Test("prefixes are kept apart from the identity")
    func prefixes() throws {
        #expect(ViTName.parse("backbone.encoder.layer.0.norm1.weight")?.prefix == "backbone.")
        #expect(ViTName.parse("vit.embeddings.cls_token")?.prefix == "vit.")
        #expect(ViTName.parse("blocks.0.attn.qkv.weight")?.prefix == "")
    }

    @Test("names that are not ViT tensors do not parse", arguments: [
        "encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight", "blocks.0.attn.qkv.lora_A.weight",
        "blocks.x.norm1.weight", "blocks.01.norm1.weight", "blocks.0.norm.weight", "embeddings.position_embeddings.weight",
    ])
    func notViT(name: String) {
        #expect(ViTName.parse(name) == nil)
    }

    func resolver(_ names: [(String, [Int])]) throws -> TensorNameResolver {
        TensorNameResolver(try names.map { ($0.0, try Shape($0.1)) })
    }

    @Test("a q adapter lands on rows of a fused timm qkv; a qkv adapter splits over separate q/k/v")
    func fusedAndSeparate() throws {
        let timm = try resolver([("blocks.0.attn.qkv.weight", [24, 8]), ("blocks.0.attn.qkv.bias", [24])])
        #expect(try timm.resolve("encoder.layer.0.attention.v_proj.weight") == [TensorPlacement(target: "blocks.0.attn.qkv.weight", targetRows: 16..<24)])
        #expect(try timm.resolve("encoder.layer.0.attention.attention.key.bias") == [TensorPlacement(target: "blocks.0.attn.qkv.bias", targetRows: 8..<16)])

        let hf = try resolver([
            ("backbone.encoder.layer.0.attention.attention.query.weight", [8, 8]), ("backbone.encoder.layer.0.attention.attention.key.weight", [8, 8]),
            ("backbone.encoder.layer.0.attention.attention.value.weight", [8, 8]),
        ])
        #expect(
            try hf.resolve("blocks.0.attn.qkv.weight") == [
                TensorPlacement(target: "backbone.encoder.layer.0.attention.attention.query.weight", sourceRows: 0..<8),
                TensorPlacement(target: "backbone.encoder.layer.0.attention.attention.key.weight", sourceRows: 8..<16),
                TensorPlacement(target: "backbone.encoder.layer.0.attention.attention.value.weight", sourceRows: 16..<24),
            ])
        // transformers 5 names on a v4 base with a prefix, through the suffix rule and the identity rule.
        #expect(try hf.resolve("encoder.layer.0.attention.q_proj.weight")?.first?.target == "backbone.encoder.layer.0.attention.attention.query.weight")
        #expect(try hf.resolve("encoder.layer.0.attention.attention.key.weight")?.first?.target == "backbone.encoder.layer.0.attention.attention.key.weight")
        #expect(try hf.resolve("encoder.layer.1.attention.q_proj.weight") == nil)
    }

    @Test("only model-wrapper prefixes may differ: patch_embed.norm never lands on the top-level norm")
    func wrapperPrefixes() throws {
        let base = try resolver([("norm.weight", [8]), ("bert.encoder.layer.0.attention.self.query.weight", [8, 8])])
        #expect(try base.resolve("patch_embed.norm.weight") == nil)
        #expect(try base.resolve("model.norm.weight")?.first?.target == "norm.weight")
        #expect(try base.resolve("encoder.layer.0.attention.self.query.weight")?.first?.target == "bert.encoder.layer.0.attention.self.query.weight")
        #expect(try base.resolve("x.encoder.layer.0.attention.self.query.weight") == nil)
    }

    @Test("a name two base models share is ambiguous, not guessed")
    func ambiguous() throws {
        let two = try resolver([("backbone.blocks.0.norm1.weight", [4]), ("model.blocks.0.norm1.weight", [4])])
        #expect(throws: CkptError.self) { try two.resolve("encoder.layer.0.norm1.weight") }
        #expect(try two.resolve("model.encoder.layer.0.norm1.weight")?.first?.target == "model.blocks.0.norm1.weight")
        // Prefixes that are not model wrappers name different models: no cross-naming guess at all.
        let towers = try resolver([("vision_model.encoder.layers.0.mlp.fc1.weight", [4, 4])])
        #expect(try towers.resolve("text_model.encoder.layers.0.mlp.fc1.weight") == nil)
    }

    @Test("nearest names rank by edit distance")
    func nearest() throws {
        let names = try resolver([("blocks.0.attn.qkv.weight", [3, 1]), ("blocks.0.attn.proj.weight", [1, 1]), ("norm.weight", [1])])
        #expect(names.nearestNames(to: "blocks.0.attn.qkvv.weight", count: 1) == ["blocks.0.attn.qkv.weight"])
        #expect(TensorNameResolver.editDistance(Array("kitten".utf8), Array("sitting".utf8)) == 3)
    }
}

@Suite("PEFT adapter config and keys")
struct PeftConfigTests {
    func config(rank: [(String, Double)] = [], alpha: [(String, Double)] = [], rslora: Bool = false) -> PeftLoraConfig {
        PeftLoraConfig(
            alpha: 16, useRSLoRA: rslora, useDoRA: false, fanInFanOut: false, bias: "none", rankPattern: rank,
            alphaPattern: alpha, modulesToSave: [])
    }

    @Test("pattern keys match as PEFT ≥ 0.15: (.*\\.)?(key)$, first key in file order")
    func patterns() throws {
        let c = config(alpha: [("blocks.1.attn.qkv", 4), ("qkv", 32), ("^fc\\d", 2)])
        #expect(try c.scaling(module: "blocks.1.attn.qkv", rank: 4).alpha == 4)
        #expect(try c.scaling(module: "blocks.0.attn.qkv", rank: 4).alpha == 32)
        #expect(try c.scaling(module: "blocks.0.attn.qkvx", rank: 4).alpha == 16)  // suffix must end at the name's end
        #expect(try c.scaling(module: "blocks.0.xqkv", rank: 4).alpha == 16)  // and start at a segment boundary
        #expect(try c.scaling(module: "blocks.0.mlp.fc1", rank: 4).alpha == 16)  // '^' anchors at the whole name
        #expect(try c.scaling(module: "fc1", rank: 4).alpha == 2)
    }

    @Test("older PEFT versions resolve patterns their own way (0.14: no bare top-level match; ≤ 0.13: one shared key)")
    func versionedPatterns() throws {
        var c = config(rank: [("qkv", 4)], alpha: [("blocks.0.attn.qkv", 2), ("fc1", 3)])
        c.patternRules = .v0_14
        #expect(try c.scaling(module: "model.blocks.0.attn.qkv", rank: 4).alpha == 2)
        #expect(try c.scaling(module: "model.fc1", rank: 4).alpha == 3)
        #expect(try c.scaling(module: "blocks.0.attn.qkv", rank: 4).alpha == 2)  // no '.' before the key: the name fallback
        #expect(try c.scaling(module: "x.fc2", rank: 4).alpha == 16)
        c.patternRules = .v0_13
        // The rank key 'qkv' is found first, so alpha_pattern is looked up by 'qkv' and misses (peft#2194).
        #expect(try c.scaling(module: "blocks.0.attn.qkv", rank: 4).alpha == 16)
        #expect(PeftLoraConfig.PatternRules(peftVersion: [0, 13]) == .v0_13)
        #expect(PeftLoraConfig.PatternRules(peftVersion: [0, 21]) == .current)
        #expect(PeftLoraConfig.PatternRules(peftVersion: nil) == .current)
    }

    @Test("scaling is alpha/r, or alpha/sqrt(r) with rsLoRA")
    func scaling() throws {
        #expect(try config().scaling(module: "m", rank: 4).scaling == 4)
        #expect(abs(try config(rslora: true).scaling(module: "m", rank: 4).scaling - 8) < 1e-12)
        #expect(try config(rank: [("m", 16)]).patternRank(module: "a.m") == 16)
    }

    @Test(
        "saved keys are classified",
        arguments: [
            ("base_model.model.blocks.0.attn.qkv.lora_A.weight", PeftKey.lora(module: "blocks.0.attn.qkv", part: .a)),
            ("base_model.model.blocks.0.attn.qkv.lora_B.bias", .lora(module: "blocks.0.attn.qkv", part: .bBias)),
            ("base_model.model.blocks.0.attn.qkv.lora_A.default.weight", .lora(module: "blocks.0.attn.qkv", part: .a)),
            ("base_model.model.blocks.0.attn.qkv.lora_magnitude_vector", .lora(module: "blocks.0.attn.qkv", part: .magnitude)),
            ("base_model.model.embeddings.word_embeddings.lora_embedding_A", .lora(module: "embeddings.word_embeddings", part: .embeddingA)),
            ("base_model.model.head.weight", .replacement(name: "head.weight")),
            ("base_model.model.blocks.0.attn.qkv.base_layer.bias", .replacement(name: "blocks.0.attn.qkv.bias")),
            ("base_model.model.head.modules_to_save.default.bias", .replacement(name: "head.bias")),
            ("base_model.model.head.modules_to_save.bias", .replacement(name: "head.bias")),
            ("base_model.model.head.original_module.bias", .ignored),
            ("base_model.model.blocks.0.attn.qkv.hada_w1_a", .unsupported("hada_w1_a")),
        ])
    func classify(key: String, expected: PeftKey) {
        #expect(PeftKey.classify(key) == expected)
    }
}
