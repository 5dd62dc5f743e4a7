import CkptCore
import CkptFormats
import CkptInference
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// config.json / preprocessor_config.json of a ViT folder: a key of the wrong type or out of range is a
/// `modelConfig` error naming the file and the key. Each case replaces one fragment of a valid file.
@Suite("ViT config.json and preprocessor_config.json refuse wrong-typed keys")
struct ViTConfigTests {
    static let config = """
        {"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128, \
        "patch_size": 4, "num_channels": 3, "image_size": 8, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "qkv_bias": true}
        """
    static let preprocessor = #"{"do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 0.5]}"#

    /// A one-block timm ViT (D 64, patch 4, 2×2 grid + class token, MLP 128), all zeros, with the two JSON files.
    static func folder(config: String, preprocessor: String) throws -> String {
        var template = Array("/tmp/ckpt-vit-XXXXXX".utf8CString)
        let dir = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
        let shapes: [(String, [Int])] = [
            ("patch_embed.proj.weight", [64, 3, 4, 4]), ("patch_embed.proj.bias", [64]), ("cls_token", [1, 1, 64]),
            ("pos_embed", [1, 5, 64]), ("blocks.0.norm1.weight", [64]), ("blocks.0.norm1.bias", [64]),
            ("blocks.0.attn.qkv.weight", [192, 64]), ("blocks.0.attn.qkv.bias", [192]), ("blocks.0.attn.proj.weight", [64, 64]),
            ("blocks.0.attn.proj.bias", [64]), ("blocks.0.norm2.weight", [64]), ("blocks.0.norm2.bias", [64]),
            ("blocks.0.mlp.fc1.weight", [128, 64]), ("blocks.0.mlp.fc1.bias", [128]), ("blocks.0.mlp.fc2.weight", [64, 128]),
            ("blocks.0.mlp.fc2.bias", [64]), ("norm.weight", [64]), ("norm.bias", [64]),
        ]
        let tensors = try shapes.map { (name, dims) throws(CkptError) in
            try OutputTensor.bytes(name: name, dtype: .f32, shape: Shape(dims), [UInt8](repeating: 0, count: dims.reduce(4, *)))
        }
        try SafeTensors.write(tensors, metadata: [:], to: dir + "/model.safetensors")
        for (name, text) in [("config.json", config), ("preprocessor_config.json", preprocessor)] {
            var file = try OutputFile(path: dir + "/" + name)
            try file.write(Array(text.utf8))
            try file.commit()
        }
        return dir
    }

    @Test("the valid files are read: heads, eps, image size and std come from them")
    func valid() throws {
        let model = try ViTModel.load(try Self.folder(config: Self.config, preprocessor: Self.preprocessor))
        #expect(model.config.heads == 2 && model.config.eps == 1e-12 && model.config.imageSize == 8)
        #expect(model.config.std == [0.25, 0.5, 0.5])
    }

    static let configCases: [(fragment: String, replacement: String, key: String)] = [
        (#""model_type": "vit""#, #""model_type": 1"#, "model_type"),
        (#""hidden_size": 64"#, #""hidden_size": "64""#, "hidden_size"),
        (#""num_hidden_layers": 1"#, #""num_hidden_layers": 1.0"#, "num_hidden_layers"),
        (#""num_attention_heads": 2"#, #""num_attention_heads": null"#, "num_attention_heads"),
        (#""num_attention_heads": 2"#, #""num_attention_heads": 0"#, "num_attention_heads"),
        (#""intermediate_size": 128"#, #""intermediate_size": [128]"#, "intermediate_size"),
        (#""patch_size": 4"#, #""patch_size": "4""#, "patch_size"),
        (#""num_channels": 3"#, #""num_channels": -3"#, "num_channels"),
        (#""image_size": 8"#, #""image_size": "8""#, "image_size"),
        (#""layer_norm_eps": 1e-12"#, #""layer_norm_eps": "1e-12""#, "layer_norm_eps"),
        (#""layer_norm_eps": 1e-12"#, #""layer_norm_eps": 2"#, "layer_norm_eps"),
        (#""hidden_act": "gelu""#, #""hidden_act": 1"#, "hidden_act"),
        (#""qkv_bias": true"#, #""qkv_bias": "true""#, "qkv_bias"),
        (#""qkv_bias": true"#, #""qkv_bias": true, "use_swiglu_ffn": 0"#, "use_swiglu_ffn"),
        (#""qkv_bias": true"#, #""qkv_bias": true, "mlp_ratio": "4""#, "mlp_ratio"),
        (#""qkv_bias": true"#, #""qkv_bias": true, "layerscale_value": "1""#, "layerscale_value"),
    ]

    @Test("config.json: a wrong-typed key is modelConfig naming the file and the key", arguments: configCases)
    func configWrongType(fragment: String, replacement: String, key: String) throws {
        #expect(Self.config.contains(fragment))
        let dir = try Self.folder(config: Self.config.replacing(fragment, with: replacement), preprocessor: Self.preprocessor)
        Self.expectRefusal(dir, file: dir + "/config.json", key: key)
    }

    static let preprocessorCases: [(fragment: String, replacement: String, key: String)] = [
        (#""image_mean": [0.5, 0.5, 0.5]"#, #""image_mean": 0.5"#, "image_mean"),
        (#""image_mean": [0.5, 0.5, 0.5]"#, #""image_mean": [0.5, 0.5]"#, "image_mean"),
        (#""image_std": [0.25, 0.5, 0.5]"#, #""image_std": [0.25, "0.5", 0.5]"#, "image_std[1]"),
        (#""do_normalize": true"#, #""do_normalize": "yes""#, "do_normalize"),
    ]

    @Test("preprocessor_config.json: a wrong-typed key is modelConfig naming the file and the key", arguments: preprocessorCases)
    func preprocessorWrongType(fragment: String, replacement: String, key: String) throws {
        #expect(Self.preprocessor.contains(fragment))
        let dir = try Self.folder(config: Self.config, preprocessor: Self.preprocessor.replacing(fragment, with: replacement))
        Self.expectRefusal(dir, file: dir + "/preprocessor_config.json", key: key)
    }

    static func expectRefusal(_ dir: String, file: String, key: String) {
        do {
            _ = try ViTModel.load(dir)
            Issue.record("\(key): loaded without an error")
        } catch {
            #expect(error.code == .modelConfig, "\(key): \(error)")
            #expect(error.path == file, "\(key): \(error)")
            #expect(error.description.contains("key '\(key)'"), "\(key): \(error) does not name the key")
        }
    }
}
