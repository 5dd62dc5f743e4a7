import CkptCore
import CkptFormats
import CkptMerge
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// adapter_config.json: a field of the wrong type or out of range is an `adapterConfig` error naming the file and
/// the key; absent fields keep PEFT's defaults. Each case replaces one fragment of the lora_basic fixture's config.
@Suite("PEFT adapter_config.json refuses wrong-typed keys")
struct AdapterConfigTypeTests {
    static let root: String = {
        var path = #filePath
        for _ in 0..<3 { path = FilePaths.directory(of: path) }
        return path
    }()
    static let fixture = root + "/fixtures/adapters/peft/tiny/lora_basic"

    /// A copy of the fixture adapter with `config` as its adapter_config.json.
    static func adapter(config: String) throws -> String {
        var template = Array("/tmp/ckpt-peft-XXXXXX".utf8CString)
        let dir = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
        for (name, bytes) in [
            ("adapter_config.json", Array(config.utf8)),
            ("adapter_model.safetensors", try ByteStorage(mapping: fixture + "/adapter_model.safetensors").withUnsafeBytes { Array($0) }),
        ] {
            var file = try OutputFile(path: dir + "/" + name)
            try file.write(bytes)
            try file.commit()
        }
        return dir
    }

    static let validConfig: String = {
        (try? ByteStorage(mapping: fixture + "/adapter_config.json").withUnsafeBytes { String(decoding: $0, as: UTF8.self) }) ?? ""
    }()

    @Test("the fixture's config reads, and absent optional keys keep their defaults")
    func valid() throws {
        let adapter = try PeftAdapter.open(try Self.adapter(config: Self.validConfig), weight: 1)
        #expect(adapter.config.alpha == 8 && adapter.config.modulesToSave == ["head"] && !adapter.config.useRSLoRA)
        let minimal = try PeftAdapter.open(try Self.adapter(config: #"{"peft_type": "LORA"}"#), weight: 1)
        #expect(minimal.config.alpha == 8 && minimal.config.bias == "none" && minimal.config.rankPattern.isEmpty)
        #expect(minimal.config.patternRules == .current)
    }

    static let cases: [(fragment: String, replacement: String, key: String)] = [
        (#""peft_type": "LORA""#, #""peft_type": 1"#, "peft_type"),
        (#""r": 4"#, #""r": "4""#, "r"),
        (#""r": 4"#, #""r": 4.5"#, "r"),
        (#""r": 4"#, #""r": 0"#, "r"),
        (#""r": 4"#, #""r": null"#, "r"),
        (#""lora_alpha": 8"#, #""lora_alpha": "8""#, "lora_alpha"),
        (#""lora_alpha": 8"#, #""lora_alpha": [8]"#, "lora_alpha"),
        (#""rank_pattern": {}"#, #""rank_pattern": []"#, "rank_pattern"),
        (#""rank_pattern": {}"#, #""rank_pattern": {"fc1": "8"}"#, "rank_pattern.fc1"),
        (#""rank_pattern": {}"#, #""rank_pattern": {"fc1": 2.5}"#, "rank_pattern.fc1"),
        (#""alpha_pattern": {}"#, #""alpha_pattern": "fc1""#, "alpha_pattern"),
        (#""alpha_pattern": {}"#, #""alpha_pattern": {"fc1": true}"#, "alpha_pattern.fc1"),
        (#""target_modules": ["#, #""target_modules": 3, "x": ["#, "target_modules"),
        (#""target_modules": ["#, #""target_modules": [1, "#, "target_modules[0]"),
        (#""exclude_modules": null"#, #""exclude_modules": {}"#, "exclude_modules"),
        (#""use_rslora": false"#, #""use_rslora": "false""#, "use_rslora"),
        (#""use_dora": false"#, #""use_dora": 0"#, "use_dora"),
        (#""fan_in_fan_out": false"#, #""fan_in_fan_out": "no""#, "fan_in_fan_out"),
        (#""lora_bias": false"#, #""lora_bias": 1"#, "lora_bias"),
        (#""modules_to_save": ["#, #""modules_to_save": "head", "x": ["#, "modules_to_save"),
        (#""modules_to_save": ["#, #""modules_to_save": [2, "#, "modules_to_save[0]"),
        (#""bias": "none""#, #""bias": false"#, "bias"),
        (#""bias": "none""#, #""bias": "some""#, "bias"),
        (#""peft_version": "0.21.2""#, #""peft_version": 0.21"#, "peft_version"),
        (#""peft_version": "0.21.2""#, #""peft_version": "main""#, "peft_version"),
        (#""init_lora_weights": true"#, #""init_lora_weights": 1"#, "init_lora_weights"),
        (#""layers_to_transform": null"#, #""layers_to_transform": "0""#, "layers_to_transform"),
        (#""layers_to_transform": null"#, #""layers_to_transform": [0, -1]"#, "layers_to_transform[1]"),
        (#""layers_pattern": null"#, #""layers_pattern": 7"#, "layers_pattern"),
        (#""lora_dropout": 0.0"#, #""lora_dropout": "0.1""#, "lora_dropout"),
    ]

    @Test("a wrong-typed or out-of-range key is adapterConfig naming adapter_config.json and the key", arguments: cases)
    func wrongType(fragment: String, replacement: String, key: String) throws {
        #expect(Self.validConfig.contains(fragment), "the fixture has no \(fragment)")
        let dir = try Self.adapter(config: Self.validConfig.replacing(fragment, with: replacement))
        do {
            _ = try PeftAdapter.open(dir, weight: 1)
            Issue.record("\(key): opened without an error")
        } catch {
            #expect(error.code == .adapterConfig, "\(key): \(error)")
            #expect(error.path == dir + "/adapter_config.json", "\(key): \(error)")
            #expect(error.description.contains("key '\(key)'"), "\(key): \(error) does not name the key")
        }
    }

    @Test("a peft_version with a pre-release suffix selects the rules of its major.minor")
    func versionSuffix() throws {
        let config = Self.validConfig.replacing(#""peft_version": "0.21.2""#, with: #""peft_version": "0.13.3.dev0""#)
        #expect(try PeftAdapter.open(try Self.adapter(config: config), weight: 1).config.patternRules == .v0_13)
    }
}
