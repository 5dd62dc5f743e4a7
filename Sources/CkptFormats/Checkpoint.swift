import CkptCore

/// The file formats ckpt reads and writes.
public enum CheckpointFormat: String, Sendable {
    case safetensors
    case shardedSafetensors = "safetensors-sharded"
    case npy
    case npz
    case gguf
}

/// How a logical tensor is stored when the file holds it quantized: read back, it is dequantized on load.
public struct QuantizationDescription: Sendable, Equatable {
    /// The layout family: `mlx-affine`, `compressed-tensors pack-quantized`, or a ggml block type (`Q4_0`…).
    public var scheme: String
    public var bits: Int
    /// Weights per scale (the ggml block size for GGUF); nil for one scale per output channel.
    public var groupSize: Int?
    public var symmetric: Bool
    /// Bytes the file spends on this tensor: codes, scales, zero points/biases, shape.
    public var storedBytes: Int
    /// The file's tensor names holding it (`x.weight`, `x.scales`, `x.biases`, …).
    public var storedTensors: [String]

    public init(scheme: String, bits: Int, groupSize: Int?, symmetric: Bool, storedBytes: Int, storedTensors: [String]) {
        self.scheme = scheme
        self.bits = bits
        self.groupSize = groupSize
        self.symmetric = symmetric
        self.storedBytes = storedBytes
        self.storedTensors = storedTensors
    }

    /// A short label for reports: `mlx-affine 4-bit g64`.
    public var label: String {
        "\(scheme) \(bits)-bit " + (groupSize.map { "g\($0)" } ?? "per-channel") + (symmetric ? " sym" : "")
    }
}

/// One tensor of a checkpoint: its description, and how to get its bytes (C order, little-endian).
public struct TensorEntry: Sendable {
    public let name: String
    public let dtype: DType
    public let shape: Shape
    public let byteCount: Int
    /// The file the tensor lives in (a shard, for sharded checkpoints).
    public let path: String
    /// Set when the file stores this tensor quantized; `dtype`/`shape` are then the dequantized tensor's.
    public let quantization: QuantizationDescription?
    let source: TensorSource

    init(
        name: String, dtype: DType, shape: Shape, byteCount: Int, path: String, source: TensorSource,
        quantization: QuantizationDescription? = nil
    ) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.byteCount = byteCount
        self.path = path
        self.source = source
        self.quantization = quantization
    }

    /// A tensor computed from others on load (dequantization): `decode` returns its bytes, C order, little-endian.
    public init(
        name: String, dtype: DType, shape: Shape, path: String, quantization: QuantizationDescription?,
        decode: @escaping @Sendable () throws(CkptError) -> TensorBytes
    ) throws(CkptError) {
        let byteCount: Int
        do { byteCount = try shape.byteCount(for: dtype) } catch { throw error.at(tensor: name).at(path: path) }
        self.init(name: name, dtype: dtype, shape: shape, byteCount: byteCount, path: path, source: .decoded(decode), quantization: quantization)
    }

    /// Streams the tensor's bytes (C order, little-endian) in chunks of at most `maxBytes` (a multiple of every
    /// element size), dropping each chunk's input pages from memory once `body` has used it.
    ///
    /// Stored zip members are checksummed on the way, in the same single pass, and a CRC mismatch is thrown after
    /// the last chunk: a caller that writes what it receives must discard that output on error, as ckpt's
    /// atomic writers do. Everything else is loaded (and verified) first, as ``load()`` does.
    public func forEachChunk(maxBytes: Int, _ body: (UnsafeRawBufferPointer) throws(CkptError) -> Void) throws(CkptError) {
        do {
            if case .zipMember(let member, let layout) = source, member.method == .stored, layout.isCanonical(shape: shape) {
                try member.streamStored(payloadOffset: layout.dataOffset, payloadCount: byteCount, maxBytes: maxBytes, body)
                return
            }
            let bytes = try load()
            var offset = 0
            repeat {
                let range = bytes.range.lowerBound + offset..<bytes.range.lowerBound + min(bytes.count, offset + maxBytes)
                try bytes.storage.withUnsafeBytes(in: range, body)
                bytes.storage.doneReading(range)
                offset = range.upperBound - bytes.range.lowerBound
            } while offset < bytes.count
        } catch {
            throw error.at(tensor: name).at(path: path)
        }
    }

    /// Decodes a floating tensor to F32 into `destination` (`shape.elements` values; F16/BF16/F8 exact, F64 rounded
    /// once), then releases the mapped pages: callers keep the F32 copy, not the input bytes.
    public func decodeFloats(into destination: UnsafeMutablePointer<Float>) throws(CkptError) {
        precondition(dtype.isConvertibleFloat, "\(dtype) is not a floating dtype")
        let bytes = try load()
        let count = shape.elements
        bytes.withUnsafeBytes { (raw: UnsafeRawBufferPointer) in
            guard count > 0 else { return }
            DTypeConversion.convert(from: dtype, to: .f32, count: count, source: raw.baseAddress!, destination: destination)
        }
        bytes.doneReading()
    }

    /// The tensor's bytes in C order, little-endian: a zero-copy view of the input where the file layout already
    /// is that, otherwise a decoded copy (inflated, CRC-checked, byte-swapped or transposed as needed).
    public func load() throws(CkptError) -> TensorBytes {
        do {
            return try source.load(byteCount: byteCount, dtype: dtype, shape: shape)
        } catch {
            throw error.at(tensor: name).at(path: path)
        }
    }
}

/// Where a tensor's bytes come from.
enum TensorSource: Sendable {
    /// Already C order, little-endian, at rest in the input.
    case bytes(TensorBytes)
    /// An .npy payload that needs its byte order swapped and/or its Fortran order undone.
    case npyPayload(TensorBytes, NpyLayout)
    /// An .npy inside a zip member: CRC-checked (and inflated) on load.
    case zipMember(ZipMember, NpyLayout)
    /// Computed on load from other stored tensors (dequantization).
    case decoded(@Sendable () throws(CkptError) -> TensorBytes)

    func load(byteCount: Int, dtype: DType, shape: Shape) throws(CkptError) -> TensorBytes {
        switch self {
        case .bytes(let bytes):
            return bytes
        case .npyPayload(let bytes, let layout):
            return try layout.canonicalize(bytes, dtype: dtype, shape: shape)
        case .zipMember(let member, let layout):
            let memberBytes = try member.contents()
            let payload = TensorBytes(
                storage: memberBytes.storage,
                range: memberBytes.range.lowerBound + layout.dataOffset..<memberBytes.range.lowerBound + layout.dataOffset + byteCount)
            return try layout.canonicalize(payload, dtype: dtype, shape: shape)
        case .decoded(let decode):
            let bytes = try decode()
            guard bytes.count == byteCount else {
                throw CkptError(.shortData, "decoded \(bytes.count) bytes, expected \(byteCount)")
            }
            return bytes
        }
    }
}

/// A checkpoint read from disk: format, string metadata and tensors in file order.
public struct Checkpoint: Sendable {
    public var format: CheckpointFormat
    public var path: String
    public var metadata: [String: String]
    public var tensors: [TensorEntry]
    /// Every file the checkpoint was read from (shards included): outputs must never overwrite them.
    public var files: [String]
    /// Static input quantizers stored with quantized modules (compressed-tensors `input_scale` /
    /// `input_zero_point`), by module name; they are not among ``tensors``.
    public var inputActivations: [String: CompressedTensors.InputActivation] = [:]

    public var totalBytes: Int { tensors.reduce(0) { $0 + $1.byteCount } }
    /// Bytes the file spends on its tensors: quantized tensors count what they store, not their dequantized size.
    public var storedBytes: Int { tensors.reduce(0) { $0 + ($1.quantization?.storedBytes ?? $1.byteCount) } }
    public var totalParameters: Int { tensors.reduce(0) { $0 + $1.shape.elements } }

    /// Options that resolve what a file cannot say by itself.
    public struct ReadOptions: Sendable {
        /// How to read NumPy void descrs (`<V2`, `|V1`, as ml_dtypes writes bfloat16 and float8): byte size → dtype.
        public var voidDTypes: [Int: DType]

        public init(voidDTypes: [Int: DType] = [:]) { self.voidDTypes = voidDTypes }
    }

    /// Opens a checkpoint of any supported format. The format is recognised from the file's magic bytes; a
    /// directory or a `*.index.json` is read as a sharded safetensors checkpoint.
    public static func open(_ path: String, options: ReadOptions = ReadOptions()) throws(CkptError) -> Checkpoint {
        guard let identity = FileIdentity.of(path) else {
            throw CkptError(.notFound, "no such file or directory", path: path)
        }
        let checkpoint: Checkpoint
        if identity.isDirectory || path.hasSuffix(".index.json") {
            checkpoint = try ShardedSafeTensors.read(path)
        } else {
            checkpoint = try open(storage: ByteStorage(mapping: path), path: path, options: options)
        }
        return try resolveQuantizedLayouts(checkpoint, folder: identity.isDirectory ? path : FilePaths.directory(of: path))
    }

    /// The tensors by name, compared byte for byte (as files store names).
    func tensorsByName() -> [NameKey: TensorEntry] {
        Dictionary(tensors.map { (NameKey($0.name), $0) }, uniquingKeysWith: { _, last in last })
    }

    /// This checkpoint with the `replaced` entries swapped in and the `consumed` ones dropped, order kept: how the
    /// quantized-layout readers turn a module's stored tensors into one dequantized entry.
    func replacing(_ replaced: [NameKey: TensorEntry], dropping consumed: Set<NameKey>) -> Checkpoint {
        var result = self
        result.tensors = tensors.compactMap { tensor in
            let key = NameKey(tensor.name)
            return consumed.contains(key) ? nil : (replaced[key] ?? tensor)
        }
        return result
    }

    /// Safetensors files written by MLX or compressed-tensors hold quantized modules as several tensors; they are
    /// read back as one dequantized tensor each, with `config.json` (when the folder has one) saying how.
    static func resolveQuantizedLayouts(_ checkpoint: Checkpoint, folder: String) throws(CkptError) -> Checkpoint {
        guard checkpoint.format == .safetensors || checkpoint.format == .shardedSafetensors else { return checkpoint }
        let hasMLX = checkpoint.tensors.contains { $0.name.hasSuffix(".scales") || $0.name.hasSuffix(".biases") }
        // compressed-tensors: pack-quantized (`weight_packed`) or int-quantized (`weight_scale` beside int8 codes; a
        // float weight with a scale, FP8's, is another scheme, left as stored).
        let int8Weights = Set(checkpoint.tensors.filter { $0.dtype == .i8 && $0.name.hasSuffix(".weight") }.map { NameKey($0.name) })
        let hasPacked = checkpoint.tensors.contains {
            $0.name.hasSuffix(".weight_packed") || ($0.name.hasSuffix(".weight_scale") && int8Weights.contains(NameKey(String($0.name.dropLast("_scale".count)))))
        }
        guard hasMLX || hasPacked else { return checkpoint }
        let configPath = FilePaths.join(folder, "config.json")
        let config = try JSONParser.readFile(configPath)
        var result = checkpoint
        if hasPacked { result = try CompressedTensors.resolve(result, config: config, configPath: configPath) }
        if hasMLX { result = try MLXQuantized.resolve(result, config: config, configPath: configPath) }
        // A packed module and a plain tensor of the name it dequantizes to (`m.weight_packed` and `m.weight`)
        // would be two tensors of one name: readers would pick either.
        var names = Set<NameKey>()
        for tensor in result.tensors where !names.insert(NameKey(tensor.name)).inserted {
            let stored = result.tensors.filter { NameKey($0.name) == NameKey(tensor.name) }
                .map { $0.quantization?.storedTensors.first ?? $0.name }
            throw CkptError(
                .duplicateName, "two tensors hold \(tensor.name): \(stored.joined(separator: " and "))", path: tensor.path, tensor: tensor.name)
        }
        return result
    }

    /// Reads a checkpoint from bytes already in memory or mapped (also the fuzzing entry point).
    public static func open(storage: ByteStorage, path: String, options: ReadOptions = ReadOptions()) throws(CkptError) -> Checkpoint {
        let magic: [UInt8] = storage.withUnsafeBytes { Array($0.prefix(6)) }
        do {
            // A known extension decides (a safetensors header length can spell "PK\3\4"); magic bytes otherwise.
            switch FilePaths.fileExtension(of: path) {
            case "safetensors": return try SafeTensors.read(storage: storage, path: path)
            case "npy": return try NumPy.read(storage: storage, path: path, options: options)
            case "npz": return try NPZ.read(storage: storage, path: path, options: options)
            case "gguf": return try GGUF.read(storage: storage, path: path)
            default: break
            }
            if magic.starts(with: GGUF.magic) {
                return try GGUF.read(storage: storage, path: path)
            }
            if magic.starts(with: NumPy.magic) {
                return try NumPy.read(storage: storage, path: path, options: options)
            }
            if magic.starts(with: [0x50, 0x4B, 0x03, 0x04]) || magic.starts(with: [0x50, 0x4B, 0x05, 0x06]) {
                return try NPZ.read(storage: storage, path: path, options: options)
            }
            return try SafeTensors.read(storage: storage, path: path)
        } catch {
            throw error.at(path: path)
        }
    }
}
