import CkptCore
import CkptFormats
import Testing

/// The config.json / index readers: a key of the wrong type or an invalid value is an error naming the file and
/// the dotted key, never a silent default (absent keys keep theirs). Each case replaces one fragment of a valid
/// file, so the valid file itself is checked to read first.
@Suite("configuration readers refuse wrong-typed keys")
struct ConfigReaderTests {
    /// A folder with `model.safetensors` holding `tensors` and a config.json with `config`.
    static func folder(_ tensors: [OutputTensor], config: String?, configName: String = "config.json") throws -> String {
        let dir = Support.temporaryDirectory()
        try SafeTensors.write(tensors, metadata: [:], to: dir + "/model.safetensors")
        if let config { try Support.write(Array(config.utf8), to: dir + "/" + configName) }
        return dir
    }

    /// Opens `folder` expecting an error with `code` whose description names `file` and the key `key`.
    static func expectRefusal(_ folder: String, code: CkptError.Code, file: String, key: String) {
        do {
            _ = try Checkpoint.open(folder)
            Issue.record("\(key): opened without an error")
        } catch {
            #expect(error.code == code, "\(key): \(error)")
            #expect(error.description.contains(file), "\(key): \(error) does not name \(file)")
            #expect(error.description.contains("key '\(key)'"), "\(key): \(error) does not name the key")
        }
    }

    static func replacing(_ text: String, _ fragment: String, with replacement: String) -> String {
        precondition(text.contains(fragment), "the valid file has no \(fragment)")
        return text.replacing(fragment, with: replacement)
    }

    // MARK: MLX

    /// One 4-bit, group-64 MLX module `m`: 4 rows of 64 codes.
    static func mlxTensors() throws -> [OutputTensor] {
        [
            try OutputTensor.bytes(name: "m.weight", dtype: .u32, shape: Shape([4, 8]), [UInt8](repeating: 0x11, count: 128)),
            try OutputTensor.bytes(name: "m.scales", dtype: .f32, shape: Shape([4, 1]), [UInt8](repeating: 0, count: 16)),
            try OutputTensor.bytes(name: "m.biases", dtype: .f32, shape: Shape([4, 1]), [UInt8](repeating: 0, count: 16)),
        ]
    }

    static let mlxConfig = #"{"model_type": "vit", "quantization": {"group_size": 64, "bits": 4, "mode": "affine"}}"#

    @Test("the valid MLX config reads")
    func mlxValid() throws {
        let checkpoint = try Checkpoint.open(try Self.folder(try Self.mlxTensors(), config: Self.mlxConfig))
        #expect(checkpoint.tensors.map(\.name) == ["m.weight"])
        #expect(checkpoint.tensors.first?.shape.dims == [4, 64])
    }

    static let mlxCases: [(fragment: String, replacement: String, key: String)] = [
        (#""quantization": {"group_size": 64, "bits": 4, "mode": "affine"}"#, #""quantization": 4"#, "quantization"),
        (#""quantization": {"group_size": 64, "bits": 4, "mode": "affine"}"#, #""quantization": {}, "quantization_config": []"#, "quantization_config"),
        (#""group_size": 64"#, #""group_size": "64""#, "quantization.group_size"),
        (#""bits": 4"#, #""bits": 4.5"#, "quantization.bits"),
        (#""bits": 4"#, #""bits": null"#, "quantization.bits"),
        (#""bits": 4, "#, "", "quantization.bits"),
        (#""mode": "affine""#, #""mode": 1"#, "quantization.mode"),
        (#""mode": "affine""#, #""mode": "affine", "m": "yes""#, "quantization.m"),
        (#""mode": "affine""#, #""mode": "affine", "m": {"group_size": 64, "bits": "4"}"#, "quantization.m.bits"),
    ]

    @Test("MLX quantization: a wrong-typed key is invalidMetadata naming config.json and the key", arguments: mlxCases)
    func mlxWrongType(fragment: String, replacement: String, key: String) throws {
        let config = Self.replacing(Self.mlxConfig, fragment, with: replacement)
        let dir = try Self.folder(try Self.mlxTensors(), config: config)
        Self.expectRefusal(dir, code: .invalidMetadata, file: dir + "/config.json", key: key)
    }

    @Test("MLX: a mode string that is not affine is unsupportedDType; config.json that is not an object is refused")
    func mlxModeAndTopLevel() throws {
        let mxfp4 = try Self.folder(try Self.mlxTensors(), config: Self.replacing(Self.mlxConfig, "\"affine\"", with: "\"mxfp4\""))
        Self.expectRefusal(mxfp4, code: .unsupportedDType, file: mxfp4 + "/config.json", key: "quantization.mode")
        let array = try Self.folder(try Self.mlxTensors(), config: "[1]")
        #expect(throws: CkptError.self) { try Checkpoint.open(array) }
        do { _ = try Checkpoint.open(array) } catch {
            #expect(error.code == .invalidMetadata && error.path == array + "/config.json" && error.message.contains("array"), "\(error)")
        }
    }

    // MARK: compressed-tensors

    /// One symmetric 4-bit per-channel pack-quantized module `m`: 4 rows of 64 codes.
    static func packedTensors() throws -> [OutputTensor] {
        var shape: [UInt8] = []
        for v in [Int64(4), 64] { withUnsafeBytes(of: v.littleEndian) { shape += $0 } }
        return [
            try OutputTensor.bytes(name: "m.weight_packed", dtype: .i32, shape: Shape([4, 8]), [UInt8](repeating: 0x88, count: 128)),
            try OutputTensor.bytes(name: "m.weight_scale", dtype: .f32, shape: Shape([4, 1]), [UInt8](repeating: 0, count: 16)),
            try OutputTensor.bytes(name: "m.weight_shape", dtype: .i64, shape: Shape([2]), shape),
        ]
    }

    static let packedConfig = """
        {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.20.0", \
        "ignore": ["head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", \
        "symmetric": true, "strategy": "channel", "group_size": null, "actorder": null}}}}}
        """

    @Test("the valid compressed-tensors config reads, with a PEP 440 suffix on the version")
    func packedValid() throws {
        for config in [Self.packedConfig, Self.replacing(Self.packedConfig, "\"0.20.0\"", with: "\"0.9.4.a20250326\"")] {
            let checkpoint = try Checkpoint.open(try Self.folder(try Self.packedTensors(), config: config))
            #expect(checkpoint.tensors.map(\.name) == ["m.weight"])
            #expect(checkpoint.tensors.first?.quantization?.bits == 4)
        }
    }

    static let packedCases: [(fragment: String, replacement: String, key: String)] = [
        (#""quantization_config": {"quant_method""#, #""quantization_config": "x", "y": {"quant_method""#, "quantization_config"),
        (#""quant_method": "compressed-tensors""#, #""quant_method": true"#, "quantization_config.quant_method"),
        (#""format": "pack-quantized""#, #""format": 4"#, "quantization_config.format"),
        (#""version": "0.20.0""#, #""version": 17"#, "quantization_config.version"),
        (#""version": "0.20.0""#, #""version": "latest""#, "quantization_config.version"),
        (#""version": "0.20.0""#, #""version": "v0.16""#, "quantization_config.version"),
        (#""ignore": ["head"]"#, #""ignore": "head""#, "quantization_config.ignore"),
        (#""config_groups": {"group_0": {"#, #""config_groups": [], "x": {"y": {"#, "quantization_config.config_groups"),
        (#""group_0": {"targets""#, #""group_0": "Linear", "group_1": {"targets""#, "quantization_config.config_groups.group_0"),
        (#""targets": ["Linear"]"#, #""targets": "Linear""#, "quantization_config.config_groups.group_0.targets"),
        (#""targets": ["Linear"]"#, #""targets": [1]"#, "quantization_config.config_groups.group_0.targets[0]"),
        (#""weights": {"num_bits""#, #""weights": 4, "w": {"num_bits""#, "quantization_config.config_groups.group_0.weights"),
        (#""num_bits": 4"#, #""num_bits": "4""#, "quantization_config.config_groups.group_0.weights.num_bits"),
        (#""num_bits": 4"#, #""num_bits": 16"#, "quantization_config.config_groups.group_0.weights.num_bits"),
        (#""type": "int""#, #""type": 1"#, "quantization_config.config_groups.group_0.weights.type"),
        (#""symmetric": true"#, #""symmetric": "yes""#, "quantization_config.config_groups.group_0.weights.symmetric"),
        (#""strategy": "channel""#, #""strategy": 1"#, "quantization_config.config_groups.group_0.weights.strategy"),
        (#""group_size": null"#, #""group_size": "64""#, "quantization_config.config_groups.group_0.weights.group_size"),
        (#""actorder": null"#, #""actorder": 1"#, "quantization_config.config_groups.group_0.weights.actorder"),
        (#""actorder": null"#, #""actorder": "sometimes""#, "quantization_config.config_groups.group_0.weights.actorder"),
    ]

    @Test("compressed-tensors quantization_config: a wrong-typed key is invalidMetadata naming config.json and the key", arguments: packedCases)
    func packedWrongType(fragment: String, replacement: String, key: String) throws {
        let config = Self.replacing(Self.packedConfig, fragment, with: replacement)
        let dir = try Self.folder(try Self.packedTensors(), config: config)
        Self.expectRefusal(dir, code: .invalidMetadata, file: dir + "/config.json", key: key)
    }

    // MARK: sharded index

    static let indexText = #"{"metadata": {"total_size": 4}, "weight_map": {"a": "model-00001-of-00001.safetensors"}}"#

    static func shardedFolder(index: String) throws -> String {
        let dir = Support.temporaryDirectory()
        let tensor = try OutputTensor.bytes(name: "a", dtype: .f32, shape: Shape([1]), [0, 0, 128, 63])
        try SafeTensors.write([tensor], metadata: [:], to: dir + "/model-00001-of-00001.safetensors")
        try Support.write(Array(index.utf8), to: dir + "/" + ShardedSafeTensors.indexName)
        return dir
    }

    @Test("the valid index reads")
    func indexValid() throws {
        let checkpoint = try ShardedSafeTensors.read(try Self.shardedFolder(index: Self.indexText))
        #expect(checkpoint.tensors.map(\.name) == ["a"])
    }

    static let indexCases: [(fragment: String, replacement: String, key: String)] = [
        (#""weight_map": {"a": "model-00001-of-00001.safetensors"}"#, #""weight_map": []"#, "weight_map"),
        (#""weight_map": {"a": "model-00001-of-00001.safetensors"}"#, #""weight_map": null"#, "weight_map"),
        (#""weight_map": {"a": "model-00001-of-00001.safetensors"}"#, #""map": {}"#, "weight_map"),
        (#""a": "model-00001-of-00001.safetensors""#, #""a": 1"#, "weight_map.a"),
        (#""a": "model-00001-of-00001.safetensors""#, #""a": "../model-00001-of-00001.safetensors""#, "weight_map.a"),
        (#""metadata": {"total_size": 4}"#, #""metadata": 5"#, "metadata"),
        (#""total_size": 4"#, #""total_size": "4""#, "metadata.total_size"),
    ]

    @Test("HF index: a wrong-typed key is shardIndex naming the index and the key", arguments: indexCases)
    func indexWrongType(fragment: String, replacement: String, key: String) throws {
        let dir = try Self.shardedFolder(index: Self.replacing(Self.indexText, fragment, with: replacement))
        Self.expectRefusal(dir, code: .shardIndex, file: dir + "/" + ShardedSafeTensors.indexName, key: key)
    }
}
