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

    /// Quantizes every planned tensor; `settings.scaleType` is replaced per tensor by its own dtype.
    public static func quantizeAll(_ plan: [PlannedTensor], settings: QuantizationSettings) throws(CkptError) -> [String: QuantizedMatrix] {
        var result: [String: QuantizedMatrix] = [:]
        for item in plan where item.isQuantized {
            let count = item.rows * item.cols
            let buffer = LargeAllocation.allocate(count * 4).bindMemory(to: Float.self, capacity: count)
            defer { LargeAllocation.deallocate(UnsafeMutableRawPointer(buffer), count: count * 4) }
            try QuantizationPlan.loadFinite(item, into: buffer)
            var tensorSettings = settings
            tensorSettings.scaleType = scaleType(for: item.entry.dtype)
            result[item.entry.name] = QuantizedMatrix.quantize(buffer, rows: item.rows, cols: item.cols, settings: tensorSettings)
        }
        return result
    }

    public static func write(
        _ checkpoint: Checkpoint, plan: [PlannedTensor], matrices: [String: QuantizedMatrix], format: QuantizedFormat,
        settings: QuantizationSettings, to destination: Destination
    ) throws(CkptError) -> QuantizationReport {
        var outputs: [OutputTensor] = []
        var reports: [TensorReport] = []
        for item in plan {
            let entry = item.entry
            guard let matrix = matrices[entry.name] else {
                outputs.append(try OutputTensor.from(entry))
                reports.append(TensorReport(
                    name: entry.name, shape: entry.shape, keptReason: item.keptReason ?? "not quantized",
                    outputBytes: entry.byteCount, elements: entry.shape.elements))
                continue
            }
            let tensors = try self.tensors(for: matrix, entry: entry, format: format)
            outputs += tensors
            reports.append(TensorReport(
                name: entry.name, shape: entry.shape, scheme: label(format: format, settings: settings), bits: matrix.settings.bits,
                groupSize: settings.groupSize, sqnr: matrix.sqnr, maxError: matrix.maxError,
                outputBytes: tensors.reduce(0) { $0 + $1.byteCount }, elements: entry.shape.elements))
        }
        var metadata = checkpoint.format == .safetensors || checkpoint.format == .shardedSafetensors ? checkpoint.metadata : [:]
        if format == .mlx { metadata["format"] = "mlx" }
        if destination.folder {
            try writeFolder(outputs, metadata: metadata, config: config(for: format, settings: settings, plan: plan, base: destination.inputConfig),
                            to: destination)
        } else {
            try SafeTensors.write(outputs, metadata: metadata, to: destination.path, inputs: destination.inputs)
        }
        return QuantizationReport(tensors: reports, inputBytes: checkpoint.storedBytes)
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

    static func tensors(for matrix: QuantizedMatrix, entry: TensorEntry, format: QuantizedFormat) throws(CkptError) -> [OutputTensor] {
        let module = String(entry.name.dropLast(".weight".count))
        let scaleType = matrix.settings.scaleType
        let parameterShape = try Shape([matrix.rows, matrix.groups])
        switch format {
        case .dequantized:
            return [try OutputTensor(name: entry.name, dtype: entry.dtype, shape: entry.shape) { (sink: OutputTensor.Sink) throws(CkptError) in
                let count = matrix.rows * matrix.cols
                let buffer = LargeAllocation.allocate(count * 4)
                defer { LargeAllocation.deallocate(buffer, count: count * 4) }
                matrix.dequantize(into: buffer.bindMemory(to: Float.self, capacity: count))
                try OutputTensor.writeConverted(UnsafeRawBufferPointer(start: buffer, count: count * 4), from: .f32, to: entry.dtype, sink)
            }]
        case .mlx:
            precondition(matrix.settings.grid == .mlxAffine)
            return [
                try words(entry.name, .u32, [matrix.rows, matrix.wordsPerRow], matrix.words),
                try floats(module + ".scales", scaleType, parameterShape, matrix.scales),
                try floats(module + ".biases", scaleType, parameterShape, matrix.offsets),
            ]
        case .compressedTensors:
            var result = [
                try words(module + ".weight_packed", .i32, [matrix.rows, matrix.wordsPerRow], matrix.words),
                try floats(module + ".weight_scale", scaleType, parameterShape, matrix.scales),
                try int64s(module + ".weight_shape", [Int64(matrix.rows), Int64(matrix.cols)]),
            ]
            if matrix.settings.grid == .integerZeroPoint {
                // Zero codes (signed zero point + 2^(bits-1)) packed along the output dimension, one column per group.
                let zpWords = BitPacking.wordCount(codes: matrix.rows, bits: matrix.settings.bits)
                var packed = [UInt32](repeating: 0, count: zpWords * matrix.groups)
                var column = [UInt8](repeating: 0, count: matrix.rows)
                var words = [UInt32](repeating: 0, count: zpWords)
                for g in 0..<matrix.groups {
                    for r in 0..<matrix.rows { column[r] = UInt8(matrix.offsets[r * matrix.groups + g]) }
                    column.withUnsafeBufferPointer { c in
                        words.withUnsafeMutableBufferPointer { BitPacking.pack(c.baseAddress!, count: matrix.rows, bits: matrix.settings.bits, into: $0.baseAddress!) }
                    }
                    for k in 0..<zpWords { packed[k * matrix.groups + g] = words[k] }
                }
                result.append(try self.words(module + ".weight_zero_point", .i32, [zpWords, matrix.groups], packed))
            }
            return result
        case .gguf:
            preconditionFailure("GGUF is written by GGUFQuantizedWriter")
        }
    }

    static func words(_ name: String, _ dtype: DType, _ dims: [Int], _ values: [UInt32]) throws(CkptError) -> OutputTensor {
        try OutputTensor(name: name, dtype: dtype, shape: try Shape(dims)) { (sink: OutputTensor.Sink) throws(CkptError) in
            try values.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try sink(raw) }
        }
    }

    static func int64s(_ name: String, _ values: [Int64]) throws(CkptError) -> OutputTensor {
        try OutputTensor(name: name, dtype: .i64, shape: try Shape([values.count])) { (sink: OutputTensor.Sink) throws(CkptError) in
            try values.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try sink(raw) }
        }
    }

    static func floats(_ name: String, _ dtype: DType, _ shape: Shape, _ values: [Float]) throws(CkptError) -> OutputTensor {
        try OutputTensor(name: name, dtype: dtype, shape: shape) { (sink: OutputTensor.Sink) throws(CkptError) in
            try values.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in
                try OutputTensor.writeConverted(raw, from: .f32, to: dtype, sink)
            }
        }
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
            let ignored = plan.filter { !$0.isQuantized && $0.kind == .linear }.map { JSONValue.string(String($0.entry.name.dropLast(".weight".count))) }
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

    static func writeFolder(_ outputs: [OutputTensor], metadata: [String: String], config: JSONValue, to destination: Destination) throws(CkptError) {
        let directory = destination.path
        let created = FileIdentity.of(directory) == nil
        try FilePaths.makeDirectory(directory)
        var staged: [StagedFile] = []
        do throws(CkptError) {
            for stale in [ShardedSafeTensors.indexName] where FileIdentity.of(FilePaths.join(directory, stale)) != nil {
                throw CkptError(.invalidArgument, "the folder holds \(stale) from an earlier write; remove it or choose another folder", path: directory)
            }
            var model = try OutputFile(path: FilePaths.join(directory, "model.safetensors"), inputs: destination.inputs)
            try SafeTensors.write(outputs, metadata: metadata, into: &model)
            staged.append(try model.stage())
            var configFile = try OutputFile(path: FilePaths.join(directory, "config.json"), inputs: destination.inputs)
            try configFile.write(Array((JSONWriter.serialize(config, indent: 2) + "\n").utf8))
            staged.append(try configFile.stage())
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
