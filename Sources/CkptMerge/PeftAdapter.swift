import CkptCore
import CkptFormats

/// The fields of PEFT's `adapter_config.json` (LoraConfig) that decide a merge.
/// (`r` and `lora_bias` are only validated: the rank comes from `lora_A`, the bias delta from `lora_B.bias`.)
public struct PeftLoraConfig: Sendable {
    public var alpha: Double
    public var useRSLoRA: Bool
    public var useDoRA: Bool
    public var fanInFanOut: Bool
    public var bias: String
    /// Regex/suffix keys → rank or alpha, in file order (PEFT ≥ 0.15 takes the first key that matches).
    public var rankPattern: [(key: String, value: Double)]
    public var alphaPattern: [(key: String, value: Double)]
    public var modulesToSave: [String]
    /// How `rank_pattern`/`alpha_pattern` keys were matched by the PEFT version that wrote the config.
    public var patternRules: PatternRules = .current

    /// PEFT changed how pattern keys match module names (adapters.md §1.3); an adapter is merged the way the
    /// version that trained it resolved its ranks and alphas. Configs without `peft_version` use the current rule.
    public enum PatternRules: Sendable, Equatable {
        /// ≥ 0.15: first key k (file order) with `re.match(rf"(.*\.)?({k})$", module)`, rank and alpha independently.
        case current
        /// 0.14: `re.match(rf".*\.{k}$", module)`, rank and alpha independently.
        case v0_14
        /// ≤ 0.13: one key chosen from rank_pattern then alpha_pattern keys with `.*\.{k}$` (else the module name),
        /// then both values looked up by that key (peft#2194).
        case v0_13

        init(peftVersion: [Int]?) {
            guard let version = peftVersion, version.count == 2, version[0] == 0 else { self = .current; return }
            self = version[1] >= 15 ? .current : version[1] == 14 ? .v0_14 : .v0_13
        }
    }

    /// Scaling for a layer of `rank` (from `lora_A`'s shape): α/r, or α/√r with rsLoRA. α comes from
    /// `alpha_pattern` when a key matches the module, else `lora_alpha`.
    public func scaling(module: String, rank: Int) throws(CkptError) -> (scaling: Double, alpha: Double) {
        let alpha = try patternValue(alphaPattern, module: module) ?? self.alpha
        let r = Double(rank)
        return (useRSLoRA ? alpha / r.squareRoot() : alpha / r, alpha)
    }

    /// The rank `rank_pattern` promises for `module`, if any key matches.
    public func patternRank(module: String) throws(CkptError) -> Int? {
        try patternValue(rankPattern, module: module).map { Int($0) }
    }

    func patternValue(_ pattern: [(key: String, value: Double)], module: String) throws(CkptError) -> Double? {
        switch patternRules {
        case .current:
            for entry in pattern where try Self.matches("(.*\\.)?(\(entry.key))", module) { return entry.value }
            return nil
        case .v0_14:
            for entry in pattern where try Self.matches(".*\\.\(entry.key)", module) { return entry.value }
            return pattern.first { $0.key == module }?.value  // 0.14 falls back to the module's own name
        case .v0_13:
            var chosen = module
            for key in rankPattern.map(\.key) + alphaPattern.map(\.key) where try Self.matches(".*\\.\(key)", module) {
                chosen = key
                break
            }
            return pattern.first { $0.key == chosen }?.value
        }
    }

    /// Whole-string match, as Python's `re.match(p + "$")` for these patterns.
    static func matches(_ pattern: String, _ module: String) throws(CkptError) -> Bool {
        let regex: Regex<AnyRegexOutput>
        do {
            regex = try Regex(pattern)
        } catch {
            throw CkptError(.adapterConfig, "pattern '\(pattern)' is not a regular expression ckpt can read", cause: "\(error)")
        }
        return (try? regex.wholeMatch(in: module)) != nil
    }
}

/// A PEFT adapter folder: `adapter_config.json` + `adapter_model.safetensors`.
public struct PeftAdapter: Sendable {
    public let folder: String
    public let configPath: String
    public let config: PeftLoraConfig
    public let tensors: Checkpoint
    public let weight: Double

    static let maximumConfigBytes = 16 << 20
    /// Bound on ranks and pattern values read from a config (real ranks are ≤ a few thousand).
    static let maximumRank = Double(1 << 24)

    /// `init_lora_weights` values that rewrite the base at initialisation: such an adapter is only correct on
    /// top of the residual base, unless PEFT converted it when saving (which rewrites the value to `true`).
    static let baseMutatingInits = ["pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga"]

    public static func open(_ path: String, weight: Double) throws(CkptError) -> PeftAdapter {
        guard let identity = FileIdentity.of(path) else { throw CkptError(.notFound, "no such adapter folder", path: path) }
        guard identity.isDirectory || identity.isRegularFile else {
            throw CkptError(.notRegularFile, "is \(identity.kind.rawValue), not an adapter folder or file", path: path)
        }
        let folder = identity.isDirectory ? path : FilePaths.directory(of: path)
        let configPath = FilePaths.join(folder, "adapter_config.json")
        let weightsPath = FilePaths.join(folder, "adapter_model.safetensors")
        guard FileIdentity.of(weightsPath) != nil else {
            if FileIdentity.of(FilePaths.join(folder, "adapter_model.bin")) != nil {
                throw CkptError(
                    .pickleRefused,
                    "adapter_model.bin is a Python pickle, which ckpt never loads (unpickling runs code). Re-save it as safetensors, e.g. "
                        + "`PeftModel.from_pretrained(base, dir).save_pretrained(out, safe_serialization=True)`, or "
                        + "`safetensors.torch.save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors', metadata={'format': 'pt'})`",
                    path: FilePaths.join(folder, "adapter_model.bin"))
            }
            throw CkptError(.notFound, "adapter folder has no adapter_model.safetensors", path: folder)
        }
        let config = try parseConfig(configPath)
        let tensors = try Checkpoint.open(weightsPath)
        return PeftAdapter(folder: folder, configPath: configPath, config: config, tensors: tensors, weight: weight)
    }

    static func parseConfig(_ path: String) throws(CkptError) -> PeftLoraConfig {
        guard FileIdentity.of(path) != nil else {
            throw CkptError(.adapterConfig, "adapter folder has no adapter_config.json", path: path)
        }
        let storage = try ByteStorage(mapping: path)
        guard storage.count <= maximumConfigBytes else {
            throw CkptError(.tooLarge, "adapter_config.json is larger than \(maximumConfigBytes) bytes", path: path)
        }
        let json: JSONValue
        do {
            json = try storage.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try JSONParser.parse(raw) }
        } catch {
            throw CkptError(.adapterConfig, "adapter_config.json is not valid JSON", path: path, cause: error.message)
        }
        func fail(_ message: String, _ code: CkptError.Code = .adapterConfig) -> CkptError { CkptError(code, message, path: path) }
        let config = try ConfigObject(file: json, path: path, code: .adapterConfig, name: "adapter_config.json")
        if let key = json.repeatedKey { throw fail("key '\(key)' appears twice") }
        func isSet(_ key: String) -> Bool {
            switch json[key] {
            case nil, .null?, .bool(false)?: return false
            case .array(let items)?: return !items.isEmpty
            case .object(let members)?: return !members.isEmpty
            default: return true
            }
        }
        guard let type = try config.string("peft_type") else { throw config.error("peft_type", "is missing") }
        guard type == "LORA" else {
            throw fail(
                "peft_type \(type) is not a LoRA adapter: ckpt merges LoRA and DoRA. "
                    + (["PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "ADAPTION_PROMPT"].contains(type)
                        ? "Prompt and prefix tuning add tokens at run time and cannot be folded into weights."
                        : "Merge it with PEFT, or open an issue for \(type) support."), .notMergeable)
        }
        // Configurations PEFT itself cannot merge, or whose adapter is only valid on a base that was changed.
        if isSet("layer_replication") {
            throw fail("layer_replication shares base layers between replicated blocks; PEFT refuses to merge such an adapter too", .notMergeable)
        }
        for key in ["alora_invocation_tokens", "arrow_config", "target_parameters", "use_qalora", "use_bdlora", "kasa_config", "monteclora_config"]
        where isSet(key) {
            throw fail("'\(key)' is set: that LoRA variant has its own forward and no plain-weight merge in ckpt", .notMergeable)
        }
        // init_lora_weights: `bool | str` in LoraConfig (true, false, "gaussian", "pissa", …).
        switch json["init_lora_weights"] {
        case nil, .bool?: break
        case .string(let initValue)?:
            let lowered = initValue.lowercased()
            if baseMutatingInits.contains(where: { lowered.hasPrefix($0) }) {
                throw fail(
                    "init_lora_weights '\(initValue)' rewrites the base weights at initialisation, so this adapter is only valid on that "
                        + "residual base. Re-save it with PEFT's path_initial_model_for_weight_conversion (which turns it into a plain LoRA), "
                        + "then merge", .notMergeable)
            }
        case let other?: throw config.error("init_lora_weights", "expected true, false or a string, found \(other.typeName)")
        }
        /// rank_pattern / alpha_pattern: null or an object of key → number within `range`, no key twice.
        func pattern(_ key: String, integers: Bool) throws(CkptError) -> [(key: String, value: Double)] {
            guard let object = try config.object(key, nullable: true) else { return [] }
            if let repeated = object.value.repeatedKey { throw object.error(repeated, "appears twice") }
            var result: [(key: String, value: Double)] = []
            for (name, _) in object.members {
                let value = integers
                    ? Double(try object.integer(name, in: 1...Int(Self.maximumRank))!)
                    : try object.number(name, in: -Self.maximumRank...Self.maximumRank)!
                result.append((name, value))
            }
            return result
        }
        // Field types (LoraConfig's annotations): a present value of another type is an error, never a default.
        _ = try config.integer("r", in: 1...Int(Self.maximumRank))
        let alpha = try config.number("lora_alpha") ?? 8
        let flags = (
            rsLoRA: try config.bool("use_rslora", nullable: true) ?? false, dora: try config.bool("use_dora", nullable: true) ?? false,
            fanInFanOut: try config.bool("fan_in_fan_out", nullable: true) ?? false)
        _ = try config.bool("lora_bias", nullable: true)
        let rankPattern = try pattern("rank_pattern", integers: true)
        let alphaPattern = try pattern("alpha_pattern", integers: false)
        let modules = try config.strings("modules_to_save", nullable: true) ?? []
        let bias = try config.string("bias", oneOf: ["none", "all", "lora_only"], nullable: true) ?? "none"
        let version = try config.version("peft_version", nullable: true)
        // Read by PEFT but not by ckpt (the tensors decide what is merged); type-checked all the same.
        for key in ["target_modules", "exclude_modules", "layers_pattern"] { _ = try config.stringOrStrings(key, nullable: true) }
        switch json["layers_to_transform"] {
        case nil, .null?: break
        case .number?: _ = try config.integer("layers_to_transform")
        case .array(let items)?:
            for (i, item) in items.enumerated() where item.unsignedInteger == nil {
                throw config.error("layers_to_transform[\(i)]", "expected a layer index (an integer ≥ 0), found \(item.typeName == "number" ? "\(item)" : item.typeName)")
            }
        case let other?: throw config.error("layers_to_transform", "expected an integer or an array of integers, found \(other.typeName)")
        }
        _ = try config.number("lora_dropout", in: 0...1, nullable: true)
        return PeftLoraConfig(
            alpha: alpha, useRSLoRA: flags.rsLoRA, useDoRA: flags.dora, fanInFanOut: flags.fanInFanOut, bias: bias,
            rankPattern: rankPattern, alphaPattern: alphaPattern, modulesToSave: modules,
            patternRules: PeftLoraConfig.PatternRules(peftVersion: version.map { Array($0.prefix(2)) }))
    }
}

/// What one key of a PEFT adapter file is.
enum PeftKey: Equatable {
    enum LoRAPart: Equatable { case a, b, bBias, embeddingA, embeddingB, magnitude }
    /// A LoRA factor of `module`.
    case lora(module: String, part: LoRAPart)
    /// A full trained tensor that replaces the base's (modules_to_save, bias="all"/"lora_only").
    case replacement(name: String)
    /// `original_module` copies kept by modules_to_save: the untrained base, nothing to merge.
    case ignored
    /// A PEFT tuner parameter ckpt does not merge (LoHa, LoKr, IA3, OFT, VeRA, prompts…).
    case unsupported(String)

    static let prefixes = ["base_model.model.", "base_model.", "module.", "_orig_mod."]
    static let otherTuners = [
        "hada_", "lokr_", "ia3_l", "oft_", "boft_", "vera_", "lora_E", "ranknum", "prompt_embeddings", "lora_embedding_E",
    ]

    /// Classifies a saved key (adapter name already removed by PEFT, but an in-memory `.default` is tolerated).
    static func classify(_ key: String) -> PeftKey {
        var name = key
        for prefix in prefixes where name.hasPrefix(prefix) { name.removeFirst(prefix.count) }
        var parts = name.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        if parts.contains("original_module") { return .ignored }
        // Wrapper segments PEFT inserts: `base_layer` (tuner layers), `modules_to_save.<adapter>`.
        parts.removeAll { $0 == "base_layer" }
        if let index = parts.firstIndex(of: "modules_to_save") {
            parts.remove(at: index)
            if index < parts.count - 1 { parts.remove(at: index) }  // the adapter name, when still present
        }
        if let tuner = parts.first(where: { part in otherTuners.contains { part.hasPrefix($0) } }) {
            return .unsupported(tuner)
        }
        let markers: [(String, LoRAPart)] = [
            ("lora_A", .a), ("lora_B", .b), ("lora_embedding_A", .embeddingA), ("lora_embedding_B", .embeddingB),
            ("lora_magnitude_vector", .magnitude),
        ]
        for (marker, part) in markers {
            guard let index = parts.lastIndex(of: marker) else { continue }
            let module = parts[..<index].joined(separator: ".")
            let tail = parts[(index + 1)...].filter { $0 != "default" }
            if part == .b && tail.last == "bias" { return .lora(module: module, part: .bBias) }
            return .lora(module: module, part: part)
        }
        return .replacement(name: parts.joined(separator: "."))
    }
}
