// libFuzzer target for the JSON configs the library reads next to weights. The first input byte (mod 5) picks
// the config kind, the rest is the file's contents, written into a fixed scratch folder next to small valid
// companion files (built once at start-up with the library's safetensors writer); then the public entry point
// that the CLI uses reads the folder:
//
//   0 quant        config.json beside MLX + compressed-tensors quantized modules  Checkpoint.open(folder), load all
//   1 index        model.safetensors.index.json beside three shards              Checkpoint.open(folder), load all
//   2 peft         adapter_config.json beside adapter_model.safetensors           PeftAdapter.open + MergePlanner.plan
//                                                                                 + every merged tensor computed
//   3 vit          config.json beside a tiny ViT (+ a valid preprocessor config)  ViTModel.load + ViTEngine (ckpt run)
//   4 preprocessor preprocessor_config.json beside the ViT (+ a valid config.json) ViTModel.load + ViTEngine
import CkptCore
import CkptFormats
import CkptInference
import CkptMerge

enum ConfigKind: UInt8 {
    case quant = 0, index, peft, vit, preprocessor
}

/// The companion files, written once per process.
struct ConfigFixtures {
    let quantFolder: String
    let indexFolder: String
    let peftFolder: String
    let vitFolder: String
    /// The tiny ViT the PEFT adapter is planned against (opened once, as `ckpt merge` opens its base).
    let base: Checkpoint

    static let validViTConfig = """
        {"model_type": "dinov2", "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 48, "patch_size": 4, "num_channels": 3, "image_size": 16, "layer_norm_eps": 1e-06,
         "hidden_act": "gelu", "use_swiglu_ffn": false}
        """
    static let validPreprocessor = """
        {"do_normalize": true, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
         "size": {"height": 16, "width": 16}}
        """

    init() {
        typealias T = FuzzFolder.Tensor
        // 0: MLX module `mlx` (uint32 [4, 8] = 64 4-bit codes per row, F16 scales/biases [4, 2] = groups of 32),
        // compressed-tensors modules `ct` (symmetric, [4, 32] 4-bit, one scale per row) and `ctz` (asymmetric,
        // [8, 32] 4-bit in groups of 16, packed zero points), and a plain F32 tensor.
        quantFolder = FuzzFolder.folder("quant")
        let words = (0..<32).map { UInt32(truncatingIfNeeded: $0 &* 0x9E3779B9) }
        FuzzFolder.writeSafetensors(
            quantFolder + "/model.safetensors",
            [
                T(name: "mlx.weight", dtype: .u32, shape: [4, 8], bytes: FuzzFolder.le(words)),
                T(name: "mlx.scales", dtype: .f16, shape: [4, 2], bytes: FuzzFolder.f16Bytes(FuzzFolder.values(8, seed: "s"))),
                T(name: "mlx.biases", dtype: .f16, shape: [4, 2], bytes: FuzzFolder.f16Bytes(FuzzFolder.values(8, seed: "b"))),
                T(name: "ct.weight_packed", dtype: .i32, shape: [4, 4], bytes: FuzzFolder.le(words.prefix(16).map { Int32(bitPattern: $0) })),
                T(name: "ct.weight_scale", dtype: .f16, shape: [4, 1], bytes: FuzzFolder.f16Bytes(FuzzFolder.values(4, seed: "cs"))),
                T(name: "ct.weight_shape", dtype: .i64, shape: [2], bytes: FuzzFolder.le([Int64(4), 32])),
                T(name: "ctz.weight_packed", dtype: .i32, shape: [8, 4], bytes: FuzzFolder.le(words.map { Int32(bitPattern: $0) })),
                T(name: "ctz.weight_scale", dtype: .f16, shape: [8, 2], bytes: FuzzFolder.f16Bytes(FuzzFolder.values(16, seed: "zs"))),
                T(name: "ctz.weight_shape", dtype: .i64, shape: [2], bytes: FuzzFolder.le([Int64(8), 32])),
                T(name: "ctz.weight_zero_point", dtype: .i32, shape: [1, 2], bytes: FuzzFolder.le([Int32(0x1234_5678), -0x0765_4321])),
                T(name: "plain.weight", shape: [4, 4]),
            ])
        // 1: the shards fixtures/sharded/model.safetensors.index.json names, with its tensor names.
        indexFolder = FuzzFolder.folder("index")
        let shards: [(String, [String])] = [
            ("model-00001-of-00003.safetensors", ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]),
            ("model-00002-of-00003.safetensors", ["model.layers.0.input_layernorm.weight", "model.layers.0.mlp.up_proj.weight",
                                                  "model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.q_proj.weight"]),
            ("model-00003-of-00003.safetensors", ["model.layers.1.input_layernorm.weight", "model.layers.1.mlp.up_proj.weight",
                                                  "model.layers.1.self_attn.k_proj.weight", "model.norm.weight"]),
        ]
        for (file, names) in shards {
            FuzzFolder.writeSafetensors(
                indexFolder + "/" + file,
                names.map { T(name: $0, shape: $0.hasSuffix("norm.weight") ? [8] : [8, 4]) },
                metadata: ["format": "pt"])
        }
        // 2: a LoRA adapter on the tiny ViT: qkv (with a lora_B bias), fc1, fc2 (4-D conv not included), and the
        // head as a modules_to_save replacement.
        peftFolder = FuzzFolder.folder("peft")
        let m = "base_model.model."
        FuzzFolder.writeSafetensors(
            peftFolder + "/adapter_model.safetensors",
            [
                T(name: m + "blocks.0.attn.qkv.lora_A.weight", shape: [4, 24]), T(name: m + "blocks.0.attn.qkv.lora_B.weight", shape: [72, 4]),
                T(name: m + "blocks.0.attn.qkv.lora_B.bias", shape: [72]),
                T(name: m + "blocks.1.mlp.fc1.lora_A.weight", shape: [4, 24]), T(name: m + "blocks.1.mlp.fc1.lora_B.weight", shape: [48, 4]),
                T(name: m + "blocks.1.mlp.fc2.lora_A.weight", shape: [2, 48]), T(name: m + "blocks.1.mlp.fc2.lora_B.weight", shape: [24, 2]),
                T(name: m + "head.weight", shape: [5, 24]), T(name: m + "head.bias", shape: [5]),
            ],
            metadata: ["format": "pt"])
        // 3, 4: the tiny ViT as a Hugging Face-style folder.
        vitFolder = FuzzFolder.folder("vit")
        FuzzFolder.writeSafetensors(vitFolder + "/model.safetensors", FuzzFolder.tinyViT())
        let basePath = FuzzFolder.folder("base") + "/model.safetensors"
        FuzzFolder.writeSafetensors(basePath, FuzzFolder.tinyViT())
        do { base = try Checkpoint.open(basePath) } catch { fatalError("fuzz: cannot open the tiny base: \(error)") }
    }
}

nonisolated(unsafe) var configFixtures: ConfigFixtures?

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    if configFixtures == nil { configFixtures = ConfigFixtures() }
    let fixtures = configFixtures!
    guard size >= 1, let kind = ConfigKind(rawValue: data[0] % 5) else { return 0 }
    let body = UnsafeRawBufferPointer(start: data + 1, count: size - 1)
    do {
        switch kind {
        case .quant:
            FuzzFolder.write(fixtures.quantFolder + "/config.json", body)
            let checkpoint = try Checkpoint.open(fixtures.quantFolder)
            fuzzExercise(checkpoint)
            fuzzReport("quant: \(checkpoint.tensors.map { "\($0.name) \($0.quantization?.label ?? "plain")" })")
        case .index:
            FuzzFolder.write(fixtures.indexFolder + "/" + ShardedSafeTensors.indexName, body)
            let checkpoint = try Checkpoint.open(fixtures.indexFolder)
            fuzzExercise(checkpoint)
            fuzzReport("index: \(checkpoint.tensors.count) tensors")
        case .peft:
            FuzzFolder.write(fixtures.peftFolder + "/adapter_config.json", body)
            let adapter = try PeftAdapter.open(fixtures.peftFolder, weight: 1)
            var request = MergeRequest(base: fixtures.base)
            request.loras = [adapter]
            let plan = try MergePlanner.plan(request)
            fuzzDrain(try plan.outputTensors())
            fuzzReport("peft: \(plan.entries.count) plan entries")
        case .vit:
            FuzzFolder.write(fixtures.vitFolder + "/config.json", body)
            FuzzFolder.write(fixtures.vitFolder + "/preprocessor_config.json", ConfigFixtures.validPreprocessor)
            fallthrough
        case .preprocessor:
            if kind == .preprocessor {
                FuzzFolder.write(fixtures.vitFolder + "/config.json", ConfigFixtures.validViTConfig)
                FuzzFolder.write(fixtures.vitFolder + "/preprocessor_config.json", body)
            }
            let model = try ViTModel.load(fixtures.vitFolder)
            let engine = try ViTEngine(model: model, microBatch: 1)
            fuzzSink(UInt64(truncatingIfNeeded: engine.tokens &+ model.config.heads &+ model.config.imageSize))
            fuzzReport("\(kind): heads \(model.config.heads), image \(model.config.imageSize), tokens \(engine.tokens)")
        }
    } catch {
        let text = "\(error)"
        fuzzReport("error: " + text)
    }
    return 0
}
