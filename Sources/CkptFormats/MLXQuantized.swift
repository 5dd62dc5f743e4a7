import CkptCore

/// MLX's affine quantized layout (`mx.quantize(w, group_size, bits)`, mlx-lm's `nn.QuantizedLinear`): a module
/// `m` stores `m.weight` (uint32, codes packed LSB-first along the input dimension), `m.scales` and `m.biases`
/// (`[out, in/group]`, in the weight dtype); `w = scales * q + biases`. `config.json`'s `quantization` block gives
/// the group size and bits, per module when overridden. See formats/mlx.md.
public enum MLXQuantized {
    public static let scheme = "mlx-affine"
    public static let groupSizes = [32, 64, 128]
    public static let bitWidths = [2, 3, 4, 5, 6, 8]

    /// Group size and bits of one module: the per-module entry of `quantization`, else its defaults.
    struct Parameters: Equatable {
        var groupSize: Int
        var bits: Int
    }

    /// Replaces every `weight`/`scales`/`biases` triple with one dequantized `weight` entry. `config` is the
    /// model's config.json when there is one; without it, bits and group size are inferred from the shapes when
    /// exactly one supported combination fits.
    ///
    /// An incomplete triple is an error rather than a plain tensor passed through: a uint32 `m.weight` next to
    /// only one of `m.scales`/`m.biases` (MLX's other modes, such as mxfp4, store scales without biases), and,
    /// when config.json declares MLX quantization, `m.scales` + `m.biases` without a uint32 `m.weight`.
    static func resolve(_ checkpoint: Checkpoint, config: JSONValue?, configPath: String?) throws(CkptError) -> Checkpoint {
        let byName = checkpoint.tensorsByName()
        func entry(_ name: String) -> TensorEntry? { byName[NameKey(name)] }
        let block = try quantizationBlock(config, configPath: configPath)
        let declared = block?.keyPath == "quantization"
        var modules: [String] = []
        var seen = Set<NameKey>()
        for tensor in checkpoint.tensors {
            for suffix in [".weight", ".scales", ".biases"] where tensor.name.hasSuffix(suffix) {
                let module = String(tensor.name.dropLast(suffix.count))
                if seen.insert(NameKey(module)).inserted { modules.append(module) }
            }
        }
        var replaced: [NameKey: TensorEntry] = [:]
        var consumed = Set<NameKey>()
        for module in modules {
            let weight = entry(module + ".weight"), scales = entry(module + ".scales"), biases = entry(module + ".biases")
            guard let scales, let biases else {
                if let weight, weight.dtype == .u32, let present = scales ?? biases {
                    let absent = scales == nil ? ".scales" : ".biases"
                    throw CkptError(
                        .missingTensor,
                        "uint32 \(weight.name) with \(present.name) but no \(module)\(absent): an MLX quantized module needs both (only the affine mode is supported)",
                        path: weight.path, tensor: weight.name)
                }
                continue
            }
            guard let packed = weight, packed.dtype == .u32 else {
                guard declared else { continue }
                let what = weight.map { "is \($0.dtype.name) \($0.shape), not uint32 packed codes" } ?? "is missing"
                throw CkptError(
                    weight == nil ? .missingTensor : .invalidData,
                    "config.json declares MLX quantization and \(module) has .scales and .biases, but \(module).weight \(what)",
                    path: scales.path, tensor: module + ".weight")
            }
            try checkWidths(packed: packed, scales: scales)
            let parameters = try parametersFor(module, block: block, packed: packed, scales: scales, configPath: configPath)
            let entry = try dequantizedEntry(module: module, packed: packed, scales: scales, biases: biases, parameters: parameters)
            replaced[NameKey(packed.name)] = entry
            consumed.insert(NameKey(scales.name))
            consumed.insert(NameKey(biases.name))
        }
        guard !replaced.isEmpty else { return checkpoint }
        return checkpoint.replacing(replaced, dropping: consumed)
    }

    /// config.json's `quantization` block (mlx-lm writes it, and the same dict as `quantization_config` for
    /// transformers), when there is one. Either key, when present, must be an object (or null).
    static func quantizationBlock(_ config: JSONValue?, configPath: String?) throws(CkptError) -> ConfigObject? {
        guard let config else { return nil }
        let file = try ConfigObject(file: config, path: configPath, code: .invalidMetadata, name: "config.json")
        let quantization = try file.object("quantization", nullable: true)
        let quantizationConfig = try file.object("quantization_config", nullable: true)
        return quantization ?? quantizationConfig
    }

    private static func parametersFor(
        _ module: String, block: ConfigObject?, packed: TensorEntry, scales: TensorEntry, configPath: String?
    ) throws(CkptError) -> Parameters {
        /// group_size and bits (both required) and mode (a string, default "affine") of a quantization entry.
        func read(_ entry: ConfigObject) throws(CkptError) -> Parameters {
            guard let g = try entry.integer("group_size") else { throw entry.error("group_size", "is missing (an integer)").at(tensor: module) }
            guard let b = try entry.integer("bits") else { throw entry.error("bits", "is missing (an integer)").at(tensor: module) }
            if let mode = try entry.string("mode"), mode != "affine" {
                let known = ["mxfp4", "mxfp8", "nvfp4"].contains(mode) ? "is not supported (affine only)" : "is not an MLX quantization mode"
                throw entry.error("mode", "'\(mode)' \(known)", code: .unsupportedDType).at(tensor: module)
            }
            return Parameters(groupSize: g, bits: b)
        }
        if let block {
            // A per-module entry is an object of its own parameters, or a boolean (mlx-lm's class predicate: the
            // module takes the block's defaults).
            switch block.value[module] {
            case nil, .bool?: break
            case .object?: if let entry = try block.object(module) { return try read(entry) }
            case let other?: throw block.error(module, "expected an object or a boolean, found \(other.typeName)").at(tensor: module)
            }
            return try read(block)
        }
        // No configuration: cols = packedCols*32/bits and cols = scaleCols*group; accept a unique solution.
        let packedCols = packed.shape.dims.last ?? 0, scaleCols = scales.shape.dims.last ?? 0
        var fits: [Parameters] = []
        for b in bitWidths {
            for g in groupSizes where (packedCols * 32) % b == 0 && (packedCols * 32) / b == scaleCols * g {
                fits.append(Parameters(groupSize: g, bits: b))
            }
        }
        guard fits.count == 1 else {
            throw CkptError(
                .invalidMetadata,
                "MLX quantized weight: \(fits.count) (bits, group size) combinations fit the shapes; config.json's \"quantization\" block must say which",
                path: packed.path, tensor: packed.name)
        }
        return fits[0]
    }

    private static func dequantizedEntry(
        module: String, packed: TensorEntry, scales: TensorEntry, biases: TensorEntry, parameters: Parameters
    ) throws(CkptError) -> TensorEntry {
        let (g, bits) = (parameters.groupSize, parameters.bits)
        func fail(_ rule: String) -> CkptError { CkptError(.invalidData, rule, path: packed.path, tensor: packed.name) }
        guard groupSizes.contains(g), bitWidths.contains(bits) else {
            throw fail("MLX affine supports group sizes 32/64/128 and bits 2/3/4/5/6/8, not group \(g), \(bits) bits")
        }
        guard packed.shape.rank >= 2, scales.shape.rank == packed.shape.rank, biases.shape == scales.shape else {
            throw fail("weight \(packed.shape), scales \(scales.shape) and biases \(biases.shape) must have the same rank ≥ 2")
        }
        guard QuantizedDecoding.canDecode(into: scales.dtype), biases.dtype == scales.dtype else {
            throw fail("scales (\(scales.dtype.name)) and biases (\(biases.dtype.name)) must share one dtype of F32, F16, BF16 or F64")
        }
        let packedCols = packed.shape.dims.last!, scaleCols = scales.shape.dims.last!
        let rows = packed.shape.elements / max(packedCols, 1)
        guard packedCols * 32 % bits == 0 else { throw fail("\(packedCols) words per row is not a whole number of \(bits)-bit codes") }
        let cols = packedCols * 32 / bits
        guard scaleCols * g == cols, Array(packed.shape.dims.dropLast()) == Array(scales.shape.dims.dropLast()) else {
            throw fail("scales \(scales.shape) do not match \(cols) input columns in groups of \(g)")
        }
        let shape = try Shape(Array(packed.shape.dims.dropLast()) + [cols])
        let description = QuantizationDescription(
            scheme: scheme, bits: bits, groupSize: g, symmetric: false,
            storedBytes: packed.byteCount + scales.byteCount + biases.byteCount,
            storedTensors: [packed.name, scales.name, biases.name])
        let outputType = scales.dtype
        return try TensorEntry(name: packed.name, dtype: outputType, shape: shape, path: packed.path, quantization: description) {
            () throws(CkptError) -> TensorBytes in
            let words = try packed.load()
            let scaleValues = try floats(scales), biasValues = try floats(biases)
            return try QuantizedDecoding.decode(rows: rows, cols: cols, outputType: outputType, name: packed.name) { row, out in
                words.withUnsafeBytes { raw in
                    let w = raw.baseAddress!.assumingMemoryBound(to: UInt32.self) + row * packedCols
                    withUnsafeTemporaryAllocation(of: UInt8.self, capacity: cols) { codes in
                        BitPacking.unpack(w, count: cols, bits: bits, into: codes.baseAddress!)
                        for j in 0..<cols {
                            let k = row * scaleCols + j / g
                            out[j] = Float(codes[j]) * scaleValues[k] + biasValues[k]
                        }
                    }
                }
            }
        }
    }

    /// Row widths whose column count (`words × 32 / bits`, `groups × group size`) fits an Int. Zero rows carry
    /// no data, so a 200-byte file can declare rows of 2^60 words.
    private static func checkWidths(packed: TensorEntry, scales: TensorEntry) throws(CkptError) {
        let packedCols = packed.shape.dims.last ?? 0, scaleCols = scales.shape.dims.last ?? 0
        guard packedCols <= Int.max / 32, scaleCols <= Int.max / groupSizes.max()! else {
            throw CkptError(
                .overflow, "rows of \(packedCols) packed words / \(scaleCols) scales have more columns than an Int can count",
                path: packed.path, tensor: packed.name)
        }
    }

    static func floats(_ entry: TensorEntry) throws(CkptError) -> [Float] {
        var values = [Float](repeating: 0, count: entry.shape.elements)
        try values.withUnsafeMutableBufferPointer { (buffer: inout UnsafeMutableBufferPointer<Float>) throws(CkptError) in
            try entry.decodeFloats(into: buffer.baseAddress!)
        }
        return values
    }
}

/// Shared by the quantized-layout readers: dequantizes row by row (in parallel) into a new F32 buffer, then
/// converts to the logical dtype when that is narrower.
enum QuantizedDecoding {
    /// Whether ``decode(rows:cols:outputType:name:row:)`` can produce `type`. The readers decode into the scales'
    /// dtype, so they check it with this before building an entry: an F8 scale must be refused, not converted to.
    static func canDecode(into type: DType) -> Bool { DTypeConversion.targets.contains(type) }

    static func decode(
        rows: Int, cols: Int, outputType: DType, name: String,
        row body: @Sendable (Int, UnsafeMutablePointer<Float>) -> Void
    ) throws(CkptError) -> TensorBytes {
        let count = rows * cols
        let f32 = try ByteStorage(uninitializedCount: count * 4) { (buffer: UnsafeMutableRawBufferPointer) in
            nonisolated(unsafe) let base = buffer.baseAddress!.assumingMemoryBound(to: Float.self)
            Parallel.forEachChunk(count: rows, minimumChunk: max(1, 65536 / max(cols, 1))) { range in
                for r in range { body(r, base + r * cols) }
            }
        }
        if outputType == .f32 { return TensorBytes(storage: f32) }
        let width = outputType.byteWidth!
        let converted = try ByteStorage(uninitializedCount: count * width) { (buffer: UnsafeMutableRawBufferPointer) in
            f32.withUnsafeBytes { source in
                DTypeConversion.convertParallel(from: .f32, to: outputType, count: count, source: source.baseAddress!, destination: buffer.baseAddress!)
            }
        }
        return TensorBytes(storage: converted)
    }
}
