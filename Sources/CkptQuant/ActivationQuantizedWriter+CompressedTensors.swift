import CkptCore
import CkptFormats

/// Writes a weight + activation quantized model in compressed-tensors' own layout for static integer W{b}A{a}
/// quantization (the library's `int-quantized` format, formats/activation-quantization.md): every block Linear
/// stores its weight as int8 codes with a per-output-channel `weight_scale` and `weight_zero_point`, and the
/// calibrated per-tensor quantizer of its input as `input_scale` / `input_zero_point`; everything else is plain
/// tensors (the folded LayerNorms, biases, the patch-embedding conv on its grid). The sites compressed-tensors
/// cannot express (the patch-embedding and head inputs, q, k, v and the attention probabilities) stay in the side
/// file beside it.
extension ActivationQuantizedWriter {
    /// compressed-tensors' format for integer weights with quantized input activations.
    public static let compressedTensorsFormat = "int-quantized"

    /// A block Linear written quantized: its module name (the weight's stored name without `.weight`) and the
    /// activation site that is its input.
    public struct LinearModule: Sendable, Equatable {
        public var module: String
        public var site: ActivationQuantization.Site

        public init(module: String, site: ActivationQuantization.Site) {
            self.module = module
            self.site = site
        }

        public var weightName: String { module + ".weight" }
    }

    /// The `observer` strings of the config group (informational in compressed-tensors).
    public struct Observers: Sendable, Equatable {
        public var weights: String
        public var inputActivations: String

        public init(weights: String, inputActivations: String) {
            self.weights = weights
            self.inputActivations = inputActivations
        }
    }

    /// The signed (compressed-tensors) zero point of a ckpt quantizer's zero point `zeroPoint` (code units
    /// 0…2^bits − 1): `zeroPoint − 2^(bits−1)`, which must be an integer an int8 holds.
    public static func signedZeroPoint(_ zeroPoint: Float, bits: Int) -> Int8? {
        let signed = zeroPoint - Float(1 << (bits - 1))
        guard signed == signed.rounded(), signed >= -128, signed <= 127 else { return nil }
        return Int8(signed)
    }

    /// Writes the folder; returns the side file's quantization (the sites left to it). `grids` are the weights'
    /// integer grids (``WeightGrid``), `changed` the calibrated F32 values (weights on those grids), `modules`
    /// every block Linear to store quantized. Refused (nothing written): a module without its weight, grid or a
    /// per-tensor uniform quantizer with an integer zero point at its input site, input sites of different bit
    /// widths, a zero point outside int8, and weights that are not on their grid.
    @discardableResult
    public static func writeCompressedTensors(
        _ checkpoint: Checkpoint, changed: [String: [Float]], quantization: ActivationQuantization, grids: [String: WeightGrid],
        modules: [LinearModule], observers: Observers, to destination: QuantizedCheckpointWriter.Destination
    ) throws(CkptError) -> ActivationQuantization {
        guard !modules.isEmpty else { throw CkptError(.invalidArgument, "no Linear modules to write quantized", path: checkpoint.path) }
        var byWeight: [String: LinearModule] = [:]
        for m in modules { byWeight[m.weightName] = m }
        // The input quantizers, as compressed-tensors stores them: one bit width for the config group.
        var inputs: [ActivationQuantization.Site: (scale: Float, zero: Int8)] = [:]
        var activationBits: Int? = nil
        var weightBits: Int? = nil
        for m in modules {
            guard case .uniform(let q)? = quantization[m.site], q.granularity == .perTensor else {
                let found = quantization[m.site].map { q -> String in
                    if case .uniform(let u) = q { return "a per-\(u.granularity == .perColumn ? "channel" : "row") uniform quantizer" }
                    return "a \(q.kind.rawValue) quantizer"
                } ?? "no quantizer"
                throw CkptError(.invalidArgument,
                    "site \(m.site.name) (input of \(m.module)) has \(found): compressed-tensors stores static input quantization per tensor only",
                    path: checkpoint.path, tensor: m.site.name)
            }
            if let activationBits, activationBits != q.bits {
                throw CkptError(.invalidArgument, "site \(m.site.name) has \(q.bits) bits, other Linear inputs \(activationBits): one config group holds one width",
                    path: checkpoint.path, tensor: m.site.name)
            }
            activationBits = q.bits
            guard let zero = signedZeroPoint(q.zeroPoints[0], bits: q.bits) else {
                throw CkptError(.invalidArgument,
                    "site \(m.site.name): zero point \(q.zeroPoints[0]) (signed \(q.zeroPoints[0] - Float(1 << (q.bits - 1)))) is not an integer in int8's range, as compressed-tensors' input_zero_point must be",
                    path: checkpoint.path, tensor: m.site.name)
            }
            inputs[m.site] = (q.scales[0], zero)
            guard let grid = grids[m.weightName] else {
                throw CkptError(.missingTensor, "calibration recorded no weight grid for \(m.weightName)", path: checkpoint.path, tensor: m.weightName)
            }
            if let weightBits, weightBits != grid.bits {
                throw CkptError(.invalidArgument, "\(m.weightName) has \(grid.bits)-bit weights, other Linears \(weightBits)", path: checkpoint.path, tensor: m.weightName)
            }
            weightBits = grid.bits
        }
        var groups: [OutputTensorGroup] = []
        var unused = Set(changed.keys)
        var written = Set<String>()
        for entry in checkpoint.tensors {
            unused.remove(entry.name)
            if let m = byWeight[entry.name] {
                written.insert(entry.name)
                for tensor in try moduleTensors(m, entry: entry, values: changed[entry.name], grid: grids[entry.name]!, input: inputs[m.site]!) {
                    groups.append(OutputTensorGroup(tensor))
                }
                continue
            }
            let tensor: OutputTensor
            if let values = changed[entry.name] {
                guard values.count == entry.shape.elements else {
                    throw CkptError(.shapeMismatch, "calibration changed \(values.count) values of a \(entry.shape) tensor", path: entry.path, tensor: entry.name)
                }
                tensor = try OutputTensor.bytes(name: entry.name, dtype: .f32, shape: entry.shape, values.withUnsafeBytes { Array($0) })
            } else {
                tensor = try OutputTensor.from(entry)
            }
            groups.append(OutputTensorGroup(tensor))
        }
        if let name = unused.sorted().first {
            throw CkptError(.missingTensor, "calibration changed a tensor the checkpoint does not hold", path: checkpoint.path, tensor: name)
        }
        if let missing = modules.first(where: { !written.contains($0.weightName) }) {
            throw CkptError(.missingTensor, "the checkpoint has no weight for module \(missing.module)", path: checkpoint.path, tensor: missing.weightName)
        }
        // The side file keeps what compressed-tensors cannot say.
        var side = quantization
        for m in modules { try side.set(nil, for: m.site) }
        // Every other 2-D float `*.weight` is left out of the "Linear" target by name (the head, a pooler).
        let ignored = checkpoint.tensors.filter {
            byWeight[$0.name] == nil && $0.shape.rank == 2 && $0.name.hasSuffix(".weight") && $0.dtype.isConvertibleFloat
        }.map { String($0.name.dropLast(".weight".count)) }
        let block = compressedTensorsConfig(weightBits: weightBits!, activationBits: activationBits!, ignore: ignored, observers: observers)
        var config: [(key: String, value: JSONValue)] = []
        if case .object(let base)? = destination.inputConfig {
            config = base.filter { !["quantization", "quantization_config", "ckpt_activation_quantization"].contains($0.key) }
        }
        config.append((key: "ckpt_activation_quantization", value: .string(sideFileName)))
        config.append((key: "quantization_config", value: block))
        let metadata = checkpoint.format == .safetensors || checkpoint.format == .shardedSafetensors ? checkpoint.metadata : [:]
        try QuantizedCheckpointWriter.writeFolder(groups, metadata: metadata, config: .object(config),
            extraFiles: [(sideFileName, Array(side.serialized().utf8))], to: destination)
        return side
    }

    /// `m.weight` (int8 signed codes), `m.weight_scale` (F32 `[out, 1]`), `m.weight_zero_point` (int8 `[out, 1]`),
    /// `m.input_scale` (F32 `[1]`), `m.input_zero_point` (int8 `[1]`).
    static func moduleTensors(
        _ m: LinearModule, entry: TensorEntry, values: [Float]?, grid: WeightGrid, input: (scale: Float, zero: Int8)
    ) throws(CkptError) -> [OutputTensor] {
        guard let values else {
            throw CkptError(.missingTensor, "calibration did not quantize \(entry.name)", path: entry.path, tensor: entry.name)
        }
        guard entry.shape.rank == 2, entry.shape.dims == [grid.rows, grid.cols] else {
            throw CkptError(.shapeMismatch, "weight \(entry.shape) does not match its \(grid.rows)×\(grid.cols) grid", path: entry.path, tensor: entry.name)
        }
        let offset = Int32(1 << (grid.bits - 1))
        let codes = try grid.codes(of: values, name: entry.name, path: entry.path)
        var zeros: [UInt8] = []
        for (r, z) in grid.zeroPoints.enumerated() {
            guard let signed = signedZeroPoint(z, bits: grid.bits) else {
                throw CkptError(.invalidArgument,
                    "row \(r): zero point \(z) (signed \(z - Float(offset))) is outside int8's range, as compressed-tensors' weight_zero_point must be; the row's range excludes 0",
                    path: entry.path, tensor: entry.name)
            }
            zeros.append(UInt8(bitPattern: signed))
        }
        let rows = grid.rows
        return [
            try OutputTensor.bytes(name: entry.name, dtype: .i8, shape: entry.shape, codes.map { UInt8(bitPattern: Int8($0 - offset)) }),
            try OutputTensor.bytes(name: m.module + ".weight_scale", dtype: .f32, shape: try Shape([rows, 1]), grid.scales.withUnsafeBytes { Array($0) }),
            try OutputTensor.bytes(name: m.module + ".weight_zero_point", dtype: .i8, shape: try Shape([rows, 1]), zeros),
            try OutputTensor.bytes(name: m.module + ".input_scale", dtype: .f32, shape: try Shape([1]), [input.scale].withUnsafeBytes { Array($0) }),
            try OutputTensor.bytes(name: m.module + ".input_zero_point", dtype: .i8, shape: try Shape([1]), [UInt8(bitPattern: input.zero)]),
        ]
    }

    /// `quantization_config` as compressed-tensors 0.20's `ModelCompressor.update_config` writes it for this scheme
    /// (keys sorted): one group targeting `Linear`, asymmetric per-channel int weights, asymmetric static per-tensor
    /// int input activations.
    static func compressedTensorsConfig(weightBits: Int, activationBits: Int, ignore: [String], observers: Observers) -> JSONValue {
        func number(_ n: Int) -> JSONValue { .number(String(n)) }
        func arguments(bits: Int, strategy: String, observer: String) -> JSONValue {
            .object([
                ("dynamic", .bool(false)), ("group_size", .null), ("num_bits", number(bits)), ("observer", .string(observer)),
                ("strategy", .string(strategy)), ("symmetric", .bool(false)), ("type", .string("int")),
            ])
        }
        let group = JSONValue.object([
            ("format", .string(compressedTensorsFormat)),
            ("input_activations", arguments(bits: activationBits, strategy: "tensor", observer: observers.inputActivations)),
            ("output_activations", .null),
            ("targets", .array([.string("Linear")])),
            ("weights", arguments(bits: weightBits, strategy: "channel", observer: observers.weights)),
        ])
        return .object([
            ("config_groups", .object([("group_0", group)])),
            ("format", .string(compressedTensorsFormat)),
            ("global_compression_ratio", .null),
            ("ignore", .array(ignore.map(JSONValue.string))),
            ("kv_cache_scheme", .null),
            ("moe_sparsity_config", .null),
            ("quant_method", .string("compressed-tensors")),
            ("quantization_status", .string("compressed")),
            ("sparsity_config", .object([])),
            ("transform_config", .object([])),
            ("version", .string(CompressedTensors.layoutVersion)),
        ])
    }
}
