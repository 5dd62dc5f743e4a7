import CkptCore

/// compressed-tensors' `pack-quantized` format (vLLM / llm-compressor): a module `m` stores `m.weight_packed`
/// (int32 `[out, ceil(in*bits/32)]`, signed codes offset by 2^(bits-1) and packed densely LSB-first),
/// `m.weight_scale` (`[out, groups]`, model dtype), `m.weight_shape` (int64 `[2]`) and, when asymmetric,
/// `m.weight_zero_point` (signed zero points packed along the output dimension, `[ceil(out*bits/32), groups]`);
/// `w = (q - zero_point) * scale`. See formats/compressed-tensors.md.
///
/// Also its `int-quantized` format (integer weights with quantized input activations): `m.weight` holds int8
/// signed codes, `m.weight_scale` `[out, groups]` and, when asymmetric, `m.weight_zero_point` (int8, unpacked,
/// `[out, groups]`); and static per-tensor input activations of any quantized module: `m.input_scale` (`[1]`,
/// float) and, when asymmetric, `m.input_zero_point` (int8 `[1]`), q = clamp(round(x/scale + zero_point),
/// −2^(bits−1), 2^(bits−1) − 1). The input quantizers are not tensors of the model: they are taken out of the
/// checkpoint into ``Checkpoint/inputActivations``. See formats/activation-quantization.md.
public enum CompressedTensors {
    /// A module's static per-tensor input quantizer, as stored: `scale` and the signed `zeroPoint` (0 when
    /// symmetric), codes `−2^(bits−1)…2^(bits−1) − 1`.
    public struct InputActivation: Sendable, Equatable {
        public var bits: Int
        public var scale: Float
        public var zeroPoint: Int
        public var symmetric: Bool
        /// The `input_scale` tensor's name and file (for errors).
        public var tensor: String
        public var path: String
    }

    public static let intScheme = "compressed-tensors int-quantized"
    public static let intFormat = "int-quantized"

    public static let scheme = "compressed-tensors pack-quantized"
    public static let format = "pack-quantized"
    /// Before 0.17.0, 3/5/6/7-bit codes were packed whole into each word (padding bits): a different layout.
    static let densePackingVersion = (0, 17, 0)
    /// The `version` ckpt writes: the compressed-tensors release whose layout (dense packing) it follows.
    public static let layoutVersion = "0.20.0"

    static func resolve(_ checkpoint: Checkpoint, config: JSONValue?, configPath: String?) throws(CkptError) -> Checkpoint {
        let tensorsByName = checkpoint.tensorsByName()
        func entry(_ name: String) -> TensorEntry? { tensorsByName[NameKey(name)] }
        let modules = checkpoint.tensors.compactMap { entry -> String? in
            guard entry.name.hasSuffix(".weight_packed") else { return nil }
            return String(entry.name.dropLast(".weight_packed".count))
        }
        // int-quantized modules: an int8 `m.weight` with its `m.weight_scale` (a float weight with a scale is
        // another scheme's, left as it is).
        let intModules = checkpoint.tensors.compactMap { e -> String? in
            guard e.name.hasSuffix(".weight_scale") else { return nil }
            let module = String(e.name.dropLast(".weight_scale".count))
            guard entry(module + ".weight_packed") == nil, let weight = entry(module + ".weight"), weight.dtype == .i8 else { return nil }
            return module
        }
        guard !modules.isEmpty || !intModules.isEmpty else { return checkpoint }
        let quantizationConfig = try config.flatMap { (json: JSONValue) throws(CkptError) -> ConfigObject? in
            try ConfigObject(file: json, path: configPath, code: .invalidMetadata, name: "config.json").object("quantization_config", nullable: true)
        }
        if let quantizationConfig {
            if let method = try quantizationConfig.string("quant_method"), method != "compressed-tensors" {
                throw quantizationConfig.error("quant_method", "is '\(method)', expected compressed-tensors")
            }
            if let format = try quantizationConfig.string("format", nullable: true), ![Self.format, Self.intFormat, "mixed-precision"].contains(format) {
                throw quantizationConfig.error("format", "'\(format)' is not supported (pack-quantized, int-quantized or mixed-precision)", code: .unsupportedDType)
            }
        }
        _ = try quantizationConfig?.strings("ignore", nullable: true)
        let legacyPacking = try quantizationConfig.flatMap { (q: ConfigObject) throws(CkptError) -> (Int, Int, Int)? in try version(q) }
            .map { $0 < densePackingVersion } ?? false
        // Errors in the groups' arguments are reported at the first quantized module (and name config.json and the key).
        let groups: [ConfigGroup]
        let firstTensor = modules.first.map { entry($0 + ".weight_packed")! } ?? entry(intModules[0] + ".weight")!
        do { groups = try configGroups(quantizationConfig) } catch { throw configError(error, decoding: firstTensor) }
        var replaced: [NameKey: TensorEntry] = [:]
        var consumed = Set<NameKey>()
        for module in modules {
            let packed = entry(module + ".weight_packed")!
            func missing(_ suffix: String) -> CkptError {
                CkptError(.missingTensor, "pack-quantized weight has no \(module)\(suffix)", path: packed.path, tensor: packed.name)
            }
            func contradicts(_ rule: String) -> CkptError {
                CkptError(.invalidData, "config.json \(rule)", path: packed.path, tensor: packed.name)
            }
            guard let scale = entry(module + ".weight_scale") else { throw missing(".weight_scale") }
            guard let shape = entry(module + ".weight_shape") else { throw missing(".weight_shape") }
            let zeroPoint = entry(module + ".weight_zero_point")
            let group = try declaredGroup(groups, module: module, configPath: configPath)
            let declared = group?.weights
            if let format = group?.format, format != Self.format {
                throw contradicts("puts \(module) in config group '\(group!.name)' of format '\(format)', but it is stored pack-quantized (weight_packed)")
            }
            // Float codes (FP8/FP4 schemes) have other formats; decoding them as integers would give wrong values.
            if let type = declared?.type, type != "int" {
                throw CkptError(
                    .unsupportedDType, "config.json declares weights of type '\(type)': pack-quantized codes are integers (type \"int\")",
                    path: packed.path, tensor: packed.name)
            }
            // Activation-order groups: column j belongs to group g_idx[j], not j / group_size. compressed-tensors
            // 0.20 no longer decodes them either; decoding them as contiguous groups would give wrong values.
            if entry(module + ".weight_g_idx") != nil || declared?.activationOrder == true {
                throw CkptError(
                    .unsupportedDType,
                    "activation-order groups (\(module).weight_g_idx, actorder \"group\") are not supported: columns would need regrouping",
                    path: packed.path, tensor: packed.name)
            }
            // An asymmetric scheme without its zero points would silently decode as symmetric (wrong values), and
            // compressed-tensors ignores the zero points of a symmetric one.
            if zeroPoint == nil, declared?.symmetric == false {
                throw CkptError(
                    .missingTensor, "config.json declares asymmetric weights, but there is no \(module).weight_zero_point",
                    path: packed.path, tensor: packed.name)
            }
            if let zeroPoint, declared?.symmetric == true {
                throw contradicts("declares symmetric weights, but \(zeroPoint.name) is present")
            }
            let entry = try dequantizedEntry(
                packed: packed, scale: scale, shapeEntry: shape, zeroPoint: zeroPoint, legacyPacking: legacyPacking,
                declaredBits: declared?.bits)
            // The declared strategy and group size must be the ones the scales have.
            let groupSize = entry.quantization?.groupSize
            switch declared?.strategy {
            case "channel"?:
                guard groupSize == nil else { throw contradicts("declares per-channel weights, but \(scale.name) \(scale.shape) has groups of \(groupSize!)") }
            case "group"?:
                guard let declaredSize = declared?.groupSize else {
                    throw configError(declared!.object.error("group_size", "strategy 'group' needs an integer group_size"), decoding: packed)
                }
                guard groupSize ?? entry.shape.dims[1] == declaredSize else {
                    throw contradicts("declares groups of \(declaredSize), but \(scale.name) \(scale.shape) gives groups of \(groupSize ?? entry.shape.dims[1])")
                }
            case let strategy?:
                throw configError(declared!.object.error("strategy", "'\(strategy)' is not supported (channel or group)", code: .unsupportedDType), decoding: packed)
            case nil:
                break
            }
            replaced[NameKey(packed.name)] = entry
            for extra in [scale, shape, zeroPoint].compactMap({ $0 }) { consumed.insert(NameKey(extra.name)) }
        }
        for module in intModules {
            let weight = entry(module + ".weight")!
            let group = try declaredGroup(groups, module: module, configPath: configPath)
            let decoded = try intQuantizedEntry(module: module, weight: weight, group: group, entry: entry)
            replaced[NameKey(weight.name)] = decoded
            for name in decoded.quantization!.storedTensors.dropFirst() { consumed.insert(NameKey(name)) }
        }
        // Static input quantizers of the quantized modules, taken out of the tensors.
        var inputActivations: [String: InputActivation] = [:]
        for module in modules + intModules {
            let group = try declaredGroup(groups, module: module, configPath: configPath)
            if let input = try inputActivation(module: module, group: group, entry: entry) {
                inputActivations[module] = input
                consumed.insert(NameKey(module + ".input_scale"))
                consumed.insert(NameKey(module + ".input_zero_point"))
            }
        }
        let quantized = Set((modules + intModules).map(NameKey.init))
        for tensor in checkpoint.tensors where tensor.name.hasSuffix(".input_scale") || tensor.name.hasSuffix(".input_zero_point") {
            let module = String(tensor.name[..<tensor.name.lastIndex(of: ".")!])
            guard quantized.contains(NameKey(module)) else {
                throw CkptError(.unsupportedDType, "an input quantizer of a module whose weights are not quantized (no \(module).weight_packed or int8 \(module).weight with weight_scale) is not supported",
                    path: tensor.path, tensor: tensor.name)
            }
        }
        var result = checkpoint.replacing(replaced, dropping: consumed)
        result.inputActivations = inputActivations
        return result
    }

    /// An `int-quantized` module: int8 codes `m.weight` `[out, in]`, `m.weight_scale` `[out, G]` and, when
    /// asymmetric, int8 `m.weight_zero_point` `[out, G]`, checked against its config group; decoded (lazily) to
    /// `(q − zero_point)·scale` in the scale's dtype.
    static func intQuantizedEntry(
        module: String, weight: TensorEntry, group: ConfigGroup?, entry: (String) -> TensorEntry?
    ) throws(CkptError) -> TensorEntry {
        func fail(_ rule: String, _ code: CkptError.Code = .invalidData) -> CkptError { CkptError(code, rule, path: weight.path, tensor: weight.name) }
        let declared = group?.weights
        if let format = group?.format, ![Self.intFormat, "naive-quantized"].contains(format) {
            throw fail("config.json puts \(module) in config group '\(group!.name)' of format '\(format)', but its weight is stored as int8 codes (int-quantized)")
        }
        if let type = declared?.type, type != "int" {
            throw fail("config.json declares weights of type '\(type)': int-quantized codes are integers (type \"int\")", .unsupportedDType)
        }
        if entry(module + ".weight_g_idx") != nil || declared?.activationOrder == true {
            throw fail("activation-order groups (\(module).weight_g_idx, actorder \"group\") are not supported: columns would need regrouping", .unsupportedDType)
        }
        guard weight.shape.rank == 2, weight.shape.dims[0] > 0, weight.shape.dims[1] > 0 else {
            throw fail("an int-quantized weight must be a non-empty 2-D int8 tensor, not \(weight.shape)")
        }
        let (rows, cols) = (weight.shape.dims[0], weight.shape.dims[1])
        let scale = entry(module + ".weight_scale")!
        let zeroPoint = entry(module + ".weight_zero_point")
        guard QuantizedDecoding.canDecode(into: scale.dtype), scale.shape.rank == 2, scale.shape.dims[0] == rows,
              scale.shape.dims[1] >= 1, cols % scale.shape.dims[1] == 0 else {
            throw fail("weight_scale \(scale.dtype.name) \(scale.shape) must be F32, F16, BF16 or F64 [\(rows), groups] with groups dividing \(cols)")
        }
        let groups = scale.shape.dims[1], groupSize = cols / groups
        if zeroPoint == nil, declared?.symmetric == false {
            throw fail("config.json declares asymmetric weights, but there is no \(module).weight_zero_point", .missingTensor)
        }
        if let zeroPoint {
            if declared?.symmetric == true { throw fail("config.json declares symmetric weights, but \(zeroPoint.name) is present") }
            guard zeroPoint.dtype == .i8, zeroPoint.shape.dims == [rows, groups] else {
                throw fail("weight_zero_point must be int8 [\(rows), \(groups)] (unpacked, as int-quantized stores it), not \(zeroPoint.dtype.name) \(zeroPoint.shape)")
            }
        }
        switch declared?.strategy {
        case "channel"?:
            guard groups == 1 else { throw fail("config.json declares per-channel weights, but \(scale.name) \(scale.shape) has groups of \(groupSize)") }
        case "group"?:
            guard let size = declared?.groupSize else {
                throw configError(declared!.object.error("group_size", "strategy 'group' needs an integer group_size"), decoding: weight)
            }
            guard groupSize == size else { throw fail("config.json declares groups of \(size), but \(scale.name) \(scale.shape) gives groups of \(groupSize)") }
        case let strategy?:
            throw configError(declared!.object.error("strategy", "'\(strategy)' is not supported (channel or group)", code: .unsupportedDType), decoding: weight)
        case nil:
            break
        }
        // Codes must lie in the declared width's signed range (int8's without a config).
        let bits = declared?.bits ?? 8
        let (lowest, highest) = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        let description = QuantizationDescription(
            scheme: intScheme, bits: bits, groupSize: groups == 1 ? nil : groupSize, symmetric: zeroPoint == nil,
            storedBytes: weight.byteCount + scale.byteCount + (zeroPoint?.byteCount ?? 0),
            storedTensors: [weight.name, scale.name] + (zeroPoint.map { [$0.name] } ?? []))
        let outputType = scale.dtype
        return try TensorEntry(name: weight.name, dtype: outputType, shape: weight.shape, path: weight.path, quantization: description) {
            () throws(CkptError) -> TensorBytes in
            let codes = try weight.load()
            let scales = try MLXQuantized.floats(scale)
            var zeros = [Float](repeating: 0, count: rows * groups)
            if let zeroPoint {
                let bytes = try zeroPoint.load()
                bytes.withUnsafeBytes { raw in for k in 0..<(rows * groups) { zeros[k] = Float(Int8(bitPattern: raw[k])) } }
            }
            let outside: Int? = codes.withUnsafeBytes { raw in
                (0..<(rows * cols)).first { let q = Int(Int8(bitPattern: raw[$0])); return q < lowest || q > highest }
            }
            if let outside {
                throw CkptError(.invalidData, "code \(codes.withUnsafeBytes { Int8(bitPattern: $0[outside]) }) at row \(outside / cols), column \(outside % cols) is outside the \(bits)-bit range \(lowest)…\(highest)",
                    path: weight.path, tensor: weight.name)
            }
            let zeroValues = zeros
            return try QuantizedDecoding.decode(rows: rows, cols: cols, outputType: outputType, name: weight.name) { row, out in
                codes.withUnsafeBytes { raw in
                    for j in 0..<cols {
                        let k = row * groups + j / groupSize
                        out[j] = (Float(Int8(bitPattern: raw[row * cols + j])) - zeroValues[k]) * scales[k]
                    }
                }
            }
        }
    }

    /// `m.input_scale` / `m.input_zero_point` against the module's config group: present exactly when the group
    /// declares input activations, which must be static, per tensor and of type int.
    static func inputActivation(module: String, group: ConfigGroup?, entry: (String) -> TensorEntry?) throws(CkptError) -> InputActivation? {
        let scale = entry(module + ".input_scale"), zeroPoint = entry(module + ".input_zero_point")
        guard let declared = group?.inputActivations else {
            if let stray = scale ?? zeroPoint {
                throw CkptError(.invalidData, "config.json declares no input_activations for \(module) (no config group covers it, or its input_activations is null), but \(stray.name) is present",
                    path: stray.path, tensor: stray.name)
            }
            return nil
        }
        let anchor = scale ?? entry(module + ".weight_packed") ?? entry(module + ".weight")!
        func fail(_ rule: String, _ code: CkptError.Code = .invalidData) -> CkptError { CkptError(code, rule, path: anchor.path, tensor: anchor.name) }
        let object = declared.object
        if declared.dynamic {
            throw configError(object.error("dynamic", "dynamic input activations (computed at run time, per token or tensor) are not supported: ckpt applies static input quantizers", code: .unsupportedDType), decoding: anchor)
        }
        guard declared.type == "int" else {
            throw configError(object.error("type", "'\(declared.type ?? "")' input activations are not supported (int)", code: .unsupportedDType), decoding: anchor)
        }
        guard declared.strategy == "tensor" else {
            throw configError(object.error("strategy", "'\(declared.strategy ?? "null")' input activations are not supported (static ones are per tensor)", code: .unsupportedDType), decoding: anchor)
        }
        guard let scale else { throw fail("config.json declares static input activations, but there is no \(module).input_scale", .missingTensor) }
        guard QuantizedDecoding.canDecode(into: scale.dtype), scale.shape.elements == 1, scale.shape.rank <= 1 else {
            throw fail("input_scale must be one float ([1]), not \(scale.dtype.name) \(scale.shape)")
        }
        let value = try MLXQuantized.floats(scale)[0]
        guard value.isFinite, value > 0 else { throw fail("input_scale \(value) is not a positive finite number") }
        var zero = 0
        if declared.symmetric {
            if let zeroPoint { throw fail("config.json declares symmetric input activations, but \(zeroPoint.name) is present") }
        } else {
            guard let zeroPoint else { throw fail("config.json declares asymmetric input activations, but there is no \(module).input_zero_point", .missingTensor) }
            guard zeroPoint.dtype == .i8, zeroPoint.shape.elements == 1, zeroPoint.shape.rank <= 1 else {
                throw CkptError(.invalidData, "input_zero_point must be one int8 ([1]), not \(zeroPoint.dtype.name) \(zeroPoint.shape)", path: zeroPoint.path, tensor: zeroPoint.name)
            }
            zero = try zeroPoint.load().withUnsafeBytes { Int(Int8(bitPattern: $0[0])) }
        }
        return InputActivation(bits: declared.bits, scale: value, zeroPoint: zero, symmetric: declared.symmetric, tensor: scale.name, path: scale.path)
    }

    /// A config.json error met while decoding `packed`: reported at the tensor, the config file and key in the message.
    static func configError(_ error: CkptError, decoding packed: TensorEntry) -> CkptError {
        CkptError(error.code, "\(error.path ?? "config.json"): \(error.message)", path: packed.path, tensor: packed.name, cause: error.cause)
    }

    /// `quantization_config.version`, as compressed-tensors' `__version__` writes it (`0.20.0`, `0.9.4.a20250326`).
    static func version(_ config: ConfigObject) throws(CkptError) -> (Int, Int, Int)? {
        try config.version("version", nullable: true).map { ($0[0], $0[1], $0[2]) }
    }

    /// The `weights` arguments of one config group that ckpt checks against the tensors.
    struct DeclaredWeights {
        var object: ConfigObject
        var type: String?
        var bits: Int?
        var symmetric: Bool?
        var strategy: String?
        var groupSize: Int?
        var activationOrder: Bool
    }

    /// A group's `input_activations` (checked when a module of the group is read).
    struct DeclaredActivations {
        var object: ConfigObject
        var bits: Int
        var type: String?
        var symmetric: Bool
        var strategy: String?
        var dynamic: Bool
    }

    /// One config group: its `targets`, its `format` and (when not null) its `weights` and `input_activations`.
    struct ConfigGroup {
        var name: String
        var targets: [String]
        var format: String?
        var weights: DeclaredWeights?
        var inputActivations: DeclaredActivations?
    }

    /// `quantization_config.config_groups`: an object of groups, each an object whose `targets` is a list of
    /// strings and whose `weights` is null or an object of correctly typed arguments.
    static func configGroups(_ config: ConfigObject?) throws(CkptError) -> [ConfigGroup] {
        guard let groups = try config?.object("config_groups", nullable: true) else { return [] }
        var result: [ConfigGroup] = []
        for (name, group) in try groups.objectMembers() {
            var weights: DeclaredWeights? = nil
            if let object = try group.object("weights", nullable: true) {
                let actorder: Bool
                switch object.value["actorder"] {
                case nil, .null?: actorder = false
                case .bool(let flag)?: actorder = flag
                case .string(let text)?:
                    guard ["group", "weight", "static", "dynamic"].contains(text) else {
                        throw object.error("actorder", "'\(text)' is not an activation ordering (group, weight, static, dynamic)")
                    }
                    actorder = text == "group"
                case let other?: throw object.error("actorder", "expected a string, a boolean or null, found \(other.typeName)")
                }
                weights = DeclaredWeights(
                    object: object, type: try object.string("type"), bits: try object.integer("num_bits", in: 1...8),
                    symmetric: try object.bool("symmetric"), strategy: try object.string("strategy", nullable: true),
                    groupSize: try object.integer("group_size", in: -1...Int.max, nullable: true), activationOrder: actorder)
            }
            var activations: DeclaredActivations? = nil
            if let object = try group.object("input_activations", nullable: true) {
                // `dynamic` is a boolean or "local" (NVFP4's local scales): anything but false is computed at run time.
                let dynamic: Bool
                switch object.value["dynamic"] {
                case nil, .null?: dynamic = false
                case .bool(let flag)?: dynamic = flag
                case .string?: dynamic = true
                case let other?: throw object.error("dynamic", "expected a boolean or \"local\", found \(other.typeName)")
                }
                activations = DeclaredActivations(
                    object: object, bits: try object.integer("num_bits", in: 1...8) ?? 8, type: try object.string("type"),
                    symmetric: try object.bool("symmetric") ?? true, strategy: try object.string("strategy", nullable: true), dynamic: dynamic)
            }
            result.append(ConfigGroup(name: name, targets: try group.strings("targets", nullable: true) ?? [], format: try group.string("format", nullable: true),
                weights: weights, inputActivations: activations))
        }
        return result
    }

    /// The config group that covers `module`, matched as compressed-tensors matches targets: the module's own name
    /// first, then a `re:` pattern matching from the start of the name, then the class `Linear` (every quantized
    /// weight ckpt reads is a Linear's); the only group when there is one. Nil when no group's targets say.
    private static func declaredGroup(_ groups: [ConfigGroup], module: String, configPath: String?) throws(CkptError) -> ConfigGroup? {
        if groups.count == 1 { return groups[0] }
        if let named = groups.first(where: { $0.targets.contains { NameKey($0) == NameKey(module) } }) {
            return named
        }
        for group in groups {
            for target in group.targets where target.hasPrefix("re:") {
                let pattern = String(target.dropFirst(3))
                guard let regex = try? Regex(pattern) else {
                    throw CkptError(.invalidMetadata, "config group '\(group.name)' has a target pattern Swift cannot compile: \(pattern)", path: configPath)
                }
                if (try? regex.prefixMatch(in: module)) != nil { return group }
            }
        }
        return groups.first(where: { $0.targets.contains("Linear") })
    }

    private static func dequantizedEntry(
        packed: TensorEntry, scale: TensorEntry, shapeEntry: TensorEntry, zeroPoint: TensorEntry?, legacyPacking: Bool, declaredBits: Int?
    ) throws(CkptError) -> TensorEntry {
        func fail(_ rule: String) -> CkptError { CkptError(.invalidData, rule, path: packed.path, tensor: packed.name) }
        guard packed.dtype == .i32, packed.shape.rank == 2 else { throw fail("weight_packed must be a 2-D int32 tensor, not \(packed.dtype.name) \(packed.shape)") }
        guard shapeEntry.dtype == .i64 || shapeEntry.dtype == .i32, shapeEntry.shape.elements == 2 else {
            throw fail("weight_shape must hold two integers, not \(shapeEntry.dtype.name) \(shapeEntry.shape)")
        }
        let shapeBytes = try shapeEntry.load()
        let dims: [Int] = shapeBytes.withUnsafeBytes { raw in
            (0..<2).map { i in
                shapeEntry.dtype == .i64
                    ? Int(Int64(littleEndian: raw.loadUnaligned(fromByteOffset: i * 8, as: Int64.self)))
                    : Int(Int32(littleEndian: raw.loadUnaligned(fromByteOffset: i * 4, as: Int32.self)))
            }
        }
        let (rows, cols) = (dims[0], dims[1])
        let words = packed.shape.dims[1]
        // Zero rows carry no data, so a tiny file can declare 2^60 words a row: keep `cols × bits` countable.
        guard words <= Int.max / 256 else { throw CkptError(.overflow, "\(words) words per row are more than ckpt can count", path: packed.path, tensor: packed.name) }
        guard rows == packed.shape.dims[0], cols > 0, cols <= words * 32 else {
            throw fail("weight_shape [\(rows), \(cols)] does not match weight_packed \(packed.shape)")
        }
        // The bit width is the one whose dense packing gives this many words (checked against the config).
        let candidates = (1...8).filter { BitPacking.wordCount(codes: cols, bits: $0) == words }
        let bits: Int
        if let declaredBits {
            guard candidates.contains(declaredBits) else {
                throw fail("config says \(declaredBits)-bit, but \(words) words per row of \(cols) codes is not that width's dense packing")
            }
            bits = declaredBits
        } else {
            guard candidates.count == 1 else { throw fail("\(words) words per row of \(cols) codes fits \(candidates.count) bit widths; config.json must say which") }
            bits = candidates[0]
        }
        if legacyPacking && 32 % bits != 0 {
            throw fail("written by compressed-tensors < 0.17.0, whose \(bits)-bit packing (whole codes per word) is not supported")
        }
        guard QuantizedDecoding.canDecode(into: scale.dtype), scale.shape.rank == 2, scale.shape.dims[0] == rows,
              scale.shape.dims[1] >= 1, cols % scale.shape.dims[1] == 0 else {
            throw fail("weight_scale \(scale.dtype.name) \(scale.shape) must be F32, F16, BF16 or F64 [\(rows), groups] with groups dividing \(cols)")
        }
        let groups = scale.shape.dims[1], groupSize = cols / groups
        if let zeroPoint {
            guard zeroPoint.dtype == .i32, zeroPoint.shape.dims == [BitPacking.wordCount(codes: rows, bits: bits), groups] else {
                throw fail("weight_zero_point must be int32 [\(BitPacking.wordCount(codes: rows, bits: bits)), \(groups)], not \(zeroPoint.dtype.name) \(zeroPoint.shape)")
            }
        }
        let description = QuantizationDescription(
            scheme: scheme, bits: bits, groupSize: groups == 1 ? nil : groupSize, symmetric: zeroPoint == nil,
            storedBytes: packed.byteCount + scale.byteCount + shapeEntry.byteCount + (zeroPoint?.byteCount ?? 0),
            storedTensors: [packed.name, scale.name, shapeEntry.name] + (zeroPoint.map { [$0.name] } ?? []))
        let name = String(packed.name.dropLast("_packed".count))
        let outputType = scale.dtype
        let offset = Float(1 << (bits - 1))
        return try TensorEntry(name: name, dtype: outputType, shape: try Shape([rows, cols]), path: packed.path, quantization: description) {
            () throws(CkptError) -> TensorBytes in
            let codesBytes = try packed.load()
            let scales = try MLXQuantized.floats(scale)
            // Zero points in code units (signed zero point + offset), one per (row, group).
            var zeros = [Float](repeating: offset, count: rows * groups)
            if let zeroPoint {
                let zpBytes = try zeroPoint.load()
                let zpWords = BitPacking.wordCount(codes: rows, bits: bits)
                zpBytes.withUnsafeBytes { raw in
                    let base = raw.baseAddress!.assumingMemoryBound(to: UInt32.self)
                    var column = [UInt32](repeating: 0, count: zpWords)
                    var codes = [UInt8](repeating: 0, count: rows)
                    for g in 0..<groups {
                        for k in 0..<zpWords { column[k] = base[k * groups + g] }
                        column.withUnsafeBufferPointer { c in codes.withUnsafeMutableBufferPointer { BitPacking.unpack(c.baseAddress!, count: rows, bits: bits, into: $0.baseAddress!) } }
                        for r in 0..<rows { zeros[r * groups + g] = Float(codes[r]) }
                    }
                }
            }
            let zeroValues = zeros
            return try QuantizedDecoding.decode(rows: rows, cols: cols, outputType: outputType, name: name) { row, out in
                codesBytes.withUnsafeBytes { raw in
                    let w = raw.baseAddress!.assumingMemoryBound(to: UInt32.self) + row * words
                    withUnsafeTemporaryAllocation(of: UInt8.self, capacity: cols) { codes in
                        BitPacking.unpack(w, count: cols, bits: bits, into: codes.baseAddress!)
                        for j in 0..<cols {
                            let k = row * groups + j / groupSize
                            out[j] = (Float(codes[j]) - zeroValues[k]) * scales[k]
                        }
                    }
                }
            }
        }
    }
}
