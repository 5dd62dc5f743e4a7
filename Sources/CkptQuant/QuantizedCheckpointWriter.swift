import CkptCore
import CkptFormats

/// Quantizes the planned tensors and writes them in one of the safetensors-based layouts (MLX, compressed-tensors,
/// dequantized). Folder outputs (model.safetensors + config.json) are staged and published together, so a failed
/// run leaves nothing behind.
public enum QuantizedCheckpointWriter {
    /// Where and how to write.
    public struct Destination: Sendable {
        public var path: String
        /// Write a model folder (model.safetensors + config.json) rather than a single file.
        public var folder: Bool
        /// The input's config.json (HF folders), extended with the quantization block; nil writes a fresh one.
        public var inputConfig: JSONValue?
        /// Files copied verbatim into a folder output (preprocessor_config.json).
        public var companions: [String]
        /// Every input file: never overwritten.
        public var inputs: [FileIdentity]

        public init(path: String, folder: Bool, inputConfig: JSONValue?, companions: [String], inputs: [FileIdentity]) {
            self.path = path
            self.folder = folder
            self.inputConfig = inputConfig
            self.companions = companions
            self.inputs = inputs
        }
    }

    /// The dtype scales/biases are stored in: the weight's own floating dtype (F64 weights get F32 scales).
    public static func scaleType(for dtype: DType) -> DType {
        [.f32, .f16, .bf16].contains(dtype) ? dtype : .f32
    }

    /// The settings one tensor is quantized with: `base` with the scale dtype of that tensor. Calibration (which
    /// rounds a tensor ahead of the writer) and the writer both take them from here, so they cannot disagree.
    public static func settings(for entry: TensorEntry, base: QuantizationSettings) -> QuantizationSettings {
        var settings = base
        settings.scaleType = scaleType(for: entry.dtype)
        return settings
    }

    /// Quantizes the planned tensors while writing them: each matrix is quantized once, a chunk of rows at a time,
    /// and its codes, scales and offsets go straight to their places in the file, so memory stays bounded whatever
    /// the model's size. `settings.scaleType` is replaced per tensor by the tensor's own dtype. A tensor named in
    /// `compensation` is quantized with GPTQ error compensation instead (whole, one tensor at a time).
    public static func write(
        _ checkpoint: Checkpoint, plan: [PlannedTensor], format: QuantizedFormat, settings: QuantizationSettings,
        compensation: [String: GPTQCompensation] = [:], to destination: Destination
    ) throws(CkptError) -> QuantizationReport {
        let quantizer = StreamingQuantizer()
        let measured = TensorMeasurements()
        var groups: [OutputTensorGroup] = []
        var reports: [TensorReport] = []
        for item in plan {
            let entry = item.entry
            guard item.isQuantized else {
                // mlx.load has no F64 and reads the F8 formats as raw uint8, so MLX files keep such floats as F32
                // (exact); the other formats' loaders read every safetensors float.
                let kept = format == .mlx && entry.dtype.isConvertibleFloat && ![.f32, .f16, .bf16].contains(entry.dtype)
                    ? try OutputTensor.from(entry, convertingTo: .f32) : try OutputTensor.from(entry)
                groups.append(OutputTensorGroup(kept))
                reports.append(TensorReport(
                    name: entry.name, shape: entry.shape, keptReason: item.keptReason ?? "not quantized",
                    outputBytes: kept.byteCount, elements: entry.shape.elements))
                continue
            }
            let tensorSettings = self.settings(for: entry, base: settings)
            let gptq = compensation[entry.name]
            let group = try self.group(for: item, format: format, settings: tensorSettings, gptq: gptq, quantizer: quantizer) {
                (statistics: StreamingQuantizer.Statistics) in
                measured.record(entry.name, sqnr: statistics.sqnr, maxError: statistics.maxError)
            }
            groups.append(group)
            reports.append(TensorReport(
                name: entry.name, shape: entry.shape, scheme: label(format: format, settings: settings) + (gptq == nil ? "" : " gptq"),
                bits: tensorSettings.bits,
                groupSize: settings.groupSize, outputBytes: group.parts.reduce(0) { $0 + $1.byteCount }, elements: entry.shape.elements))
        }
        var metadata = checkpoint.format == .safetensors || checkpoint.format == .shardedSafetensors ? checkpoint.metadata : [:]
        if format == .mlx { metadata["format"] = "mlx" }
        if destination.folder {
            try writeFolder(groups, metadata: metadata, config: config(for: format, settings: settings, plan: plan, base: destination.inputConfig),
                            to: destination)
        } else {
            try SafeTensors.write(groups: groups, metadata: metadata, to: destination.path, inputs: destination.inputs)
        }
        return QuantizationReport(tensors: reports, measured: measured, inputBytes: checkpoint.storedBytes)
    }

    static func label(format: QuantizedFormat, settings: QuantizationSettings) -> String {
        let group = settings.groupSize.map { "g\($0)" } ?? "per-channel"
        switch format {
        case .mlx: return "\(MLXQuantized.scheme) \(settings.bits)-bit \(group)"
        case .compressedTensors:
            return "pack-quantized int\(settings.bits) \(group) \(settings.grid == .symmetric ? "sym" : "asym")"
        default:
            return "dequantized \(settings.bits)-bit \(group) \(settings.grid.rawValue)"
        }
    }

    // MARK: tensors per layout

    /// The tensors one quantized matrix becomes in `format`, produced together chunk by chunk of rows.
    static func group(
        for item: PlannedTensor, format: QuantizedFormat, settings: QuantizationSettings, gptq: GPTQCompensation? = nil, quantizer: StreamingQuantizer,
        measured: @escaping @Sendable (StreamingQuantizer.Statistics) -> Void
    ) throws(CkptError) -> OutputTensorGroup {
        let entry = item.entry
        let module = String(entry.name.dropLast(".weight".count))
        let (rows, cols, bits) = (item.rows, item.cols, settings.bits)
        let groups = cols / (settings.groupSize ?? cols)
        let wordsPerRow = BitPacking.wordCount(codes: cols, bits: bits)
        let scaleType = settings.scaleType
        let parameterShape = try Shape([rows, groups])
        typealias Part = OutputTensorGroup.Part
        typealias Sink = OutputTensorGroup.Sink
        switch format {
        case .dequantized:
            // In the weight's dtype, except the F8 formats: grid values are not F8 values, so those get F32 (exact).
            let valueType = DTypeConversion.canConvert(from: .f32, to: entry.dtype) ? entry.dtype : .f32
            return OutputTensorGroup(parts: [try Part(name: entry.name, dtype: valueType, shape: entry.shape)]) { (sink: Sink) throws(CkptError) in
                measured(try quantizer.quantize(item, settings: settings, compensation: gptq, output: .dequantized) { (chunk: StreamingQuantizer.Chunk) throws(CkptError) in
                    try quantizer.converted(chunk.values!, count: chunk.rows.count * cols, to: valueType) { (bytes: UnsafeRawBufferPointer) throws(CkptError) in
                        try sink(0, bytes)
                    }
                })
            }
        case .mlx:
            precondition(settings.grid == .mlxAffine)
            let parts = [
                try Part(name: entry.name, dtype: .u32, shape: try Shape([rows, wordsPerRow])),
                try Part(name: module + ".scales", dtype: scaleType, shape: parameterShape),
                try Part(name: module + ".biases", dtype: scaleType, shape: parameterShape),
            ]
            return OutputTensorGroup(parts: parts) { (sink: Sink) throws(CkptError) in
                measured(try quantizer.quantize(item, settings: settings, compensation: gptq, output: .packed) { (chunk: StreamingQuantizer.Chunk) throws(CkptError) in
                    try sink(0, UnsafeRawBufferPointer(start: chunk.words!, count: chunk.rows.count * wordsPerRow * 4))
                    try parameters(chunk, groups: groups, as: scaleType, quantizer: quantizer, sink)
                })
            }
        case .compressedTensors:
            var parts = [
                try Part(name: module + ".weight_packed", dtype: .i32, shape: try Shape([rows, wordsPerRow])),
                try Part(name: module + ".weight_scale", dtype: scaleType, shape: parameterShape),
                try Part(name: module + ".weight_shape", dtype: .i64, shape: try Shape([2])),
            ]
            let zeroPoints = settings.grid == .integerZeroPoint
            // Zero codes (signed zero point + 2^(bits-1)) packed along the output dimension, one column per group.
            let zpWords = BitPacking.wordCount(codes: rows, bits: bits)
            if zeroPoints { parts.append(try Part(name: module + ".weight_zero_point", dtype: .i32, shape: try Shape([zpWords, groups]))) }
            return OutputTensorGroup(parts: parts) { (sink: Sink) throws(CkptError) in
                try [Int64(rows), Int64(cols)].withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try sink(2, raw) }
                // Every row's zero codes are needed before the first packed word: kept (one byte per group) until the end.
                let zeroCodes = try quantizer.buffer(.zeroCodes, zeroPoints ? rows * groups : 0, as: UInt8.self)
                measured(try quantizer.quantize(item, settings: settings, compensation: gptq, output: .packed) { (chunk: StreamingQuantizer.Chunk) throws(CkptError) in
                    try sink(0, UnsafeRawBufferPointer(start: chunk.words!, count: chunk.rows.count * wordsPerRow * 4))
                    try quantizer.converted(chunk.scales, count: chunk.rows.count * groups, to: scaleType) { (bytes: UnsafeRawBufferPointer) throws(CkptError) in
                        try sink(1, bytes)
                    }
                    if zeroPoints {
                        let base = chunk.rows.lowerBound * groups
                        for k in 0..<chunk.rows.count * groups { zeroCodes[base + k] = UInt8(chunk.offsets[k]) }
                    }
                })
                guard zeroPoints else { return }
                let packed = try quantizer.buffer(.zeroWords, zpWords * groups + zpWords, as: UInt32.self)
                let column = try quantizer.buffer(.zeroColumn, rows, as: UInt8.self)
                let words = packed + zpWords * groups
                for g in 0..<groups {
                    for r in 0..<rows { column[r] = zeroCodes[r * groups + g] }
                    BitPacking.pack(column, count: rows, bits: bits, into: words)
                    for k in 0..<zpWords { packed[k * groups + g] = words[k] }
                }
                try sink(3, UnsafeRawBufferPointer(start: packed, count: zpWords * groups * 4))
            }
        case .gguf:
            preconditionFailure("GGUF is written by GGUFQuantizedWriter")
        }
    }

    /// An MLX chunk's scales and biases (parts 1 and 2) in the scale dtype.
    private static func parameters(
        _ chunk: StreamingQuantizer.Chunk, groups: Int, as dtype: DType, quantizer: StreamingQuantizer, _ sink: OutputTensorGroup.Sink
    ) throws(CkptError) {
        let count = chunk.rows.count * groups
        try quantizer.converted(chunk.scales, count: count, to: dtype) { (bytes: UnsafeRawBufferPointer) throws(CkptError) in try sink(1, bytes) }
        try quantizer.converted(chunk.offsets, count: count, to: dtype) { (bytes: UnsafeRawBufferPointer) throws(CkptError) in try sink(2, bytes) }
    }

    // MARK: config.json

    /// The input's config.json (or an empty object) with the format's quantization block added.
    static func config(for format: QuantizedFormat, settings: QuantizationSettings, plan: [PlannedTensor], base: JSONValue?) -> JSONValue {
        var members: [(key: String, value: JSONValue)] = []
        if case .object(let existing)? = base {
            members = existing.filter { !["quantization", "quantization_config"].contains($0.key) }
        }
        func number(_ n: Int) -> JSONValue { .number(String(n)) }
        switch format {
        case .mlx:
            let block = JSONValue.object([
                ("bits", number(settings.bits)), ("group_size", number(settings.groupSize ?? 0)), ("mode", .string("affine")),
            ])
            members.append(("quantization", block))
            members.append(("quantization_config", block))
        case .compressedTensors:
            // Loaders quantize every module the targets match ("Linear") unless it is listed here, so every kept 2-D
            // `*.weight` is listed, whatever its name suggests (MAE's decoder_embed is a Linear); an Embedding listed
            // too only costs a warning there. Names without a `.weight` module suffix name no module.
            let ignored = plan.filter {
                !$0.isQuantized && $0.entry.shape.rank == 2 && $0.entry.name.hasSuffix(".weight") && $0.entry.dtype.isConvertibleFloat
            }.map { JSONValue.string(String($0.entry.name.dropLast(".weight".count))) }
            let weights = JSONValue.object([
                ("actorder", .null), ("block_structure", .null), ("dynamic", .bool(false)),
                ("group_size", settings.groupSize.map(number) ?? .null), ("num_bits", number(settings.bits)),
                ("observer", .string(observerName(settings.method))), ("observer_kwargs", .object([])),
                ("strategy", .string(settings.groupSize == nil ? "channel" : "group")),
                ("symmetric", .bool(settings.grid == .symmetric)), ("type", .string("int")),
            ])
            let group = JSONValue.object([
                ("format", .string(CompressedTensors.format)), ("input_activations", .null), ("output_activations", .null),
                ("targets", .array([.string("Linear")])), ("weights", weights),
            ])
            members.append(("quantization_config", .object([
                ("config_groups", .object([("group_0", group)])),
                ("format", .string(CompressedTensors.format)),
                ("global_compression_ratio", .null),
                ("ignore", .array(ignored)),
                ("kv_cache_scheme", .null),
                ("quant_method", .string("compressed-tensors")),
                ("quantization_status", .string("compressed")),
                ("sparsity_config", .object([])),
                ("transform_config", .object([])),
                // The dense 3/5/6/7-bit packing we write is the one compressed-tensors uses since 0.17.0.
                ("version", .string(CompressedTensors.layoutVersion)),
            ])))
        case .dequantized, .gguf:
            break
        }
        return .object(members)
    }

    static func observerName(_ method: QuantMethod) -> String {
        switch method {
        case .rtn: "memoryless_minmax"
        case .mse: "mse"
        case .hqq: "hqq"
        }
    }

    // MARK: folder output

    /// Writes model.safetensors, config.json, the companions and `extraFiles` (name, bytes) into the destination
    /// folder; all are staged and published together, so a failure leaves nothing.
    static func writeFolder(
        _ groups: [OutputTensorGroup], metadata: [String: String], config: JSONValue, extraFiles: [(String, [UInt8])] = [], to destination: Destination
    ) throws(CkptError) {
        let directory = destination.path
        let created = FileIdentity.of(directory) == nil
        try FilePaths.makeDirectory(directory)
        if created { PendingOutputs.add(folder: directory) }
        defer { if created { PendingOutputs.remove(folder: directory) } }
        var staged: [StagedFile] = []
        do throws(CkptError) {
            try ShardedSafeTensors.requireNoStaleWeights(in: directory, single: true)
            // A preprocessor config the input does not have would belong to another model (run/eval read its
            // image size, mean and std).
            let stale = FilePaths.join(directory, "preprocessor_config.json")
            if !destination.companions.contains(where: { FilePaths.fileName(of: $0) == "preprocessor_config.json" }), FileIdentity.of(stale) != nil {
                throw CkptError(
                    .invalidArgument, "the output folder holds a preprocessor_config.json the input does not have (another model's); remove it or choose another folder",
                    path: stale)
            }
            var model = try OutputFile(path: FilePaths.join(directory, "model.safetensors"), inputs: destination.inputs)
            try SafeTensors.write(groups: groups, metadata: metadata, into: &model)
            staged.append(try model.stage())
            var configFile = try OutputFile(path: FilePaths.join(directory, "config.json"), inputs: destination.inputs)
            try configFile.write(Array((JSONWriter.serialize(config, indent: 2) + "\n").utf8))
            staged.append(try configFile.stage())
            for (name, bytes) in extraFiles {
                var file = try OutputFile(path: FilePaths.join(directory, name), inputs: destination.inputs)
                try file.write(bytes)
                staged.append(try file.stage())
            }
            for companion in destination.companions {
                let source = try ByteStorage(mapping: companion)
                var copy = try OutputFile(path: FilePaths.join(directory, FilePaths.fileName(of: companion)), inputs: destination.inputs)
                try source.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try copy.write(raw) }
                staged.append(try copy.stage())
            }
        } catch {
            staged.forEach { $0.discard() }
            if created { FilePaths.removeEmptyDirectory(directory) }
            throw error
        }
        try StagedFile.publishAll(staged)
    }
}
