import CkptCore

extension GGUF {
    /// A metadata value to write.
    public indirect enum Value: Sendable, Equatable {
        case uint8(UInt8), int8(Int8), uint16(UInt16), int16(Int16), uint32(UInt32), int32(Int32), uint64(UInt64), int64(Int64)
        case float32(Float), float64(Double), bool(Bool), string(String)
        /// Elements all of the given type; arrays of arrays are refused (ggml cannot read them).
        case array(ValueType, [Value])

        public var type: ValueType {
            switch self {
            case .uint8: return .uint8
            case .int8: return .int8
            case .uint16: return .uint16
            case .int16: return .int16
            case .uint32: return .uint32
            case .int32: return .int32
            case .uint64: return .uint64
            case .int64: return .int64
            case .float32: return .float32
            case .float64: return .float64
            case .bool: return .bool
            case .string: return .string
            case .array: return .array
            }
        }
    }

    public struct KeyValue: Sendable, Equatable {
        public var key: String
        public var value: Value

        public init(_ key: String, _ value: Value) {
            self.key = key
            self.value = value
        }
    }

    /// A tensor about to be written: PyTorch-order shape, ggml type, and a producer streaming exactly its encoded
    /// bytes (for block types, the blocks of each row in order).
    public struct OutputTensorInfo: Sendable {
        public let name: String
        public let shape: Shape
        public let type: GGMLType
        public let byteCount: Int
        private let produce: @Sendable (OutputTensor.Sink) throws(CkptError) -> Void
        /// Encodes straight into the writer's buffers, where the encoder can (quantization): saves a copy.
        let encodeInPlace: (@Sendable (ChunkPipeline) throws(CkptError) -> Void)?

        /// Refuses shapes whose rows (last dimension) are not whole blocks of `type`.
        public init(
            name: String, shape: Shape, type: GGMLType, produce: @escaping @Sendable (OutputTensor.Sink) throws(CkptError) -> Void
        ) throws(CkptError) {
            let rowLength = shape.dims.last ?? 1
            guard rowLength % type.blockSize == 0 else {
                throw CkptError(
                    .misalignedSlice,
                    "rows of \(rowLength) elements (the last dimension of \(shape)) are not whole \(type.name) blocks of \(type.blockSize)",
                    tensor: name)
            }
            guard let byteCount = type.byteCount(elements: try shape.elementCount()) else {
                throw CkptError(.overflow, "byte count of \(shape) × \(type.name) overflows", tensor: name)
            }
            self.name = name
            self.shape = shape
            self.type = type
            self.byteCount = byteCount
            self.produce = produce
            self.encodeInPlace = nil
        }

        private init(
            name: String, shape: Shape, type: GGMLType, byteCount: Int,
            produce: @escaping @Sendable (OutputTensor.Sink) throws(CkptError) -> Void,
            encodeInPlace: @escaping @Sendable (ChunkPipeline) throws(CkptError) -> Void
        ) {
            self.name = name
            self.shape = shape
            self.type = type
            self.byteCount = byteCount
            self.produce = produce
            self.encodeInPlace = encodeInPlace
        }

        /// A plain tensor stored unchanged; dtypes GGUF has no type for (unsigned integers, BOOL, F8, complex)
        /// are refused.
        public init(_ tensor: OutputTensor) throws(CkptError) {
            guard let type = GGMLType(plain: tensor.dtype) else {
                let hint = tensor.dtype.isConvertibleFloat
                    ? "convert it with --dtype F32, F16 or BF16"
                    : "GGUF stores integers only as I8, I16, I32 and I64"
                throw CkptError(.unsupportedDType, "\(tensor.dtype.name) has no GGUF type; \(hint)", tensor: tensor.name)
            }
            try self.init(name: tensor.name, shape: tensor.shape, type: type) { (sink: OutputTensor.Sink) throws(CkptError) in
                try tensor.write(to: sink)
            }
        }

        /// A floating checkpoint tensor encoded as `type`: block types are quantized with ggml's reference
        /// quantizers (in chunks of whole blocks, across cores), plain float types converted.
        ///
        /// With `measured`, block types are also compared with their source in the same pass (each chunk's blocks
        /// dequantized into a small scratch), `measured` receives the statistics once the last block is encoded,
        /// and NaN/Inf values are refused (`nonFinite`, naming the first such element).
        public static func encoding(
            _ entry: TensorEntry, as type: GGMLType, measured: (@Sendable (GGMLQuants.Measurement) -> Void)? = nil
        ) throws(CkptError) -> OutputTensorInfo {
            guard entry.dtype.isConvertibleFloat else {
                throw CkptError(.unsupportedConversion, "\(entry.dtype.name) is not a floating dtype; it cannot become \(type.name)", path: entry.path, tensor: entry.name)
            }
            guard type.isQuantized else {
                guard let dtype = type.plainDType, DTypeConversion.canConvert(from: entry.dtype, to: dtype) else {
                    throw CkptError(.unsupportedConversion, "cannot convert \(entry.dtype.name) to \(type.name)", path: entry.path, tensor: entry.name)
                }
                return try OutputTensorInfo(try OutputTensor.from(entry, convertingTo: dtype))
            }
            let plain = try OutputTensorInfo(name: entry.name, shape: entry.shape, type: type) { (sink: OutputTensor.Sink) throws(CkptError) in
                // Streaming to a sink: buffers of our own, sized for this tensor.
                let elements = min(pipelineChunkElements, max(entry.shape.elements, type.blockSize))
                let outputBytes = elements / type.blockSize * type.bytesPerBlock
                let output = LargeAllocation.allocate(outputBytes)
                let staging = LargeAllocation.allocate(elements * 4)
                defer {
                    LargeAllocation.deallocate(output, count: outputBytes)
                    LargeAllocation.deallocate(staging, count: elements * 4)
                }
                try quantize(entry, as: type, staging: staging.assumingMemoryBound(to: Float.self), measured: measured) {
                    (encode: (UnsafeMutableRawPointer) throws(CkptError) -> Int) throws(CkptError) in
                    let count = try encode(output)
                    try sink(UnsafeRawBufferPointer(start: output, count: count))
                }
            }
            return OutputTensorInfo(
                name: plain.name, shape: plain.shape, type: type, byteCount: plain.byteCount, produce: plain.produce,
                encodeInPlace: { (pipeline: ChunkPipeline) throws(CkptError) in
                    // Straight into the writer's ring buffers: no copy, no buffer per tensor.
                    let staging = pipeline.staging.assumingMemoryBound(to: Float.self)
                    try quantize(entry, as: type, staging: staging, measured: measured) {
                        (encode: (UnsafeMutableRawPointer) throws(CkptError) -> Int) throws(CkptError) in
                        try pipeline.fill { (slot: UnsafeMutableRawBufferPointer) throws(CkptError) -> Int in try encode(slot.baseAddress!) }
                    }
                })
        }

        /// Streams the bytes to `sink`, checking that exactly ``byteCount`` bytes come out.
        public func write(to sink: OutputTensor.Sink) throws(CkptError) {
            try OutputTensor.checkedWrite(name: name, byteCount: byteCount, produce: produce, to: sink)
        }
    }

    /// Elements per chunk when quantizing: the F32 input fills the writer's staging buffer and the blocks of every
    /// type fit a slot. A power of two, so chunks end on block boundaries.
    static let pipelineChunkElements = ChunkPipeline.stagingBytes / 4

    /// Quantizes `entry` chunk by chunk (``pipelineChunkElements`` values, across cores). For each chunk `output`
    /// lends a buffer to `encode`, which fills it with the chunk's blocks and returns their byte count; `staging`
    /// holds inputs that are not aligned F32. With `measured`, see ``OutputTensorInfo/encoding(_:as:measured:)``.
    static func quantize(
        _ entry: TensorEntry, as type: GGMLType, staging: UnsafeMutablePointer<Float>,
        measured: (@Sendable (GGMLQuants.Measurement) -> Void)?,
        output: ((UnsafeMutableRawPointer) throws(CkptError) -> Int) throws(CkptError) -> Void
    ) throws(CkptError) {
        var total = GGMLQuants.Measurement()
        var offset = 0
        try entry.forEachF32Chunk(elements: pipelineChunkElements, staging: staging) { (floats: UnsafePointer<Float>, count: Int) throws(CkptError) in
            try output { (blocks: UnsafeMutableRawPointer) throws(CkptError) -> Int in
                if measured == nil {
                    GGMLQuants.quantizeParallel(type, source: floats, count: count, destination: blocks)
                } else {
                    let (measurement, bad) = GGMLQuants.quantizeMeasured(type, source: floats, count: count, destination: blocks)
                    if let bad { throw entry.nonFiniteError(element: offset + bad, value: floats[bad]) }
                    // Finite weights, non-finite error: a block's F16 scale overflowed (|w| beyond ~65504 × the
                    // code range), so the blocks would dequantize to Inf/NaN.
                    guard measurement.errorEnergy.isFinite else {
                        throw entry.unrepresentableError(
                            "elements \(offset)..<\(offset + count)", values: UnsafeBufferPointer(start: floats, count: count),
                            scheme: "\(type.name) (F16 block scales)")
                    }
                    total.add(measurement)
                }
                return count / type.blockSize * type.bytesPerBlock
            }
            offset += count
        }
        measured?(total)
    }

    // MARK: - Writing

    /// `general.architecture` for checkpoints that do not name one: ckpt's inputs are vision transformers.
    public static let defaultArchitecture = "vit"

    /// The metadata `ckpt convert` writes: `general.architecture`, and `general.file_type` for the type that holds
    /// the most elements.
    public static func defaultMetadata(architecture: String, tensors: [OutputTensorInfo]) -> [KeyValue] {
        var result = [KeyValue(architectureKey, .string(architecture))]
        var elements: [GGMLType: Int] = [:]
        for tensor in tensors where tensor.type.plainDType?.isConvertibleFloat ?? true {
            elements[tensor.type, default: 0] += tensor.shape.elements
        }
        let main = elements.max { $0.value != $1.value ? $0.value < $1.value : $0.key.rawValue > $1.key.rawValue }?.key
        if let main, let fileType = GGMLType.FileType(main) {
            result.append(KeyValue(fileTypeKey, .uint32(fileType.rawValue)))
        }
        return result
    }

    /// The header, key/values and tensor infos, and the alignment of the data that follows. Validates every rule
    /// the reader enforces, so nothing is written for tensors or metadata ggml would refuse.
    public static func headerBytes(tensors: [OutputTensorInfo], metadata: [KeyValue]) throws(CkptError) -> (bytes: [UInt8], alignment: Int) {
        var keys = Set<NameKey>()
        var alignment = defaultAlignment
        for entry in metadata {
            guard !entry.key.isEmpty else { throw CkptError(.invalidMetadata, "a metadata key is empty") }
            guard keys.insert(NameKey(entry.key)).inserted else {
                throw CkptError(.duplicateName, "metadata key '\(entry.key)' is given twice")
            }
            try validate(entry.value, key: entry.key)
            if entry.key == alignmentKey {
                guard case .uint32(let value) = entry.value, value > 0, value & (value - 1) == 0, Int(value) <= maximumAlignment else {
                    throw CkptError(.invalidMetadata, "'\(alignmentKey)' must be a u32 power of two no larger than \(maximumAlignment)")
                }
                alignment = Int(value)
            }
            if entry.key == quantizationVersionKey, entry.value != .uint32(quantizationVersion) {
                throw CkptError(.invalidMetadata, "'\(quantizationVersionKey)' must be u32 \(quantizationVersion), the block layouts ckpt writes")
            }
        }
        // general.architecture first, as ggml's and gguf-py's writers place it; the default alignment is implied.
        var ordered = metadata.filter { $0.key == architectureKey }
        ordered += metadata.filter { $0.key != architectureKey && !($0.key == alignmentKey && alignment == defaultAlignment) }
        if tensors.contains(where: { $0.type.isQuantized }) && !keys.contains(NameKey(quantizationVersionKey)) {
            ordered.append(KeyValue(quantizationVersionKey, .uint32(quantizationVersion)))
        }

        var names = Set<NameKey>()
        for tensor in tensors {
            let bytes = Array(tensor.name.utf8)
            guard bytes.count <= maximumNameBytes else {
                throw CkptError(.invalidHeader, "name is \(bytes.count) bytes; ggml allows at most \(maximumNameBytes)", tensor: tensor.name)
            }
            guard !bytes.contains(0) else {
                throw CkptError(.invalidHeader, "name contains a NUL byte", tensor: tensor.name)
            }
            guard names.insert(NameKey(tensor.name)).inserted else {
                throw CkptError(.duplicateName, "tensor name is used twice", tensor: tensor.name)
            }
            guard tensor.shape.rank <= maximumDimensions else {
                throw CkptError(.invalidHeader, "\(tensor.shape.rank) dimensions; ggml allows at most \(maximumDimensions)", tensor: tensor.name)
            }
        }

        var out: [UInt8] = magic
        append(version, to: &out)
        append(UInt64(tensors.count), to: &out)
        append(UInt64(ordered.count), to: &out)
        for entry in ordered {
            appendString(entry.key, to: &out)
            append(entry.value.type.rawValue, to: &out)
            appendValue(entry.value, to: &out)
        }
        var offset = 0
        for tensor in tensors {
            appendString(tensor.name, to: &out)
            append(UInt32(tensor.shape.rank), to: &out)
            for dim in tensor.shape.dims.reversed() { append(UInt64(dim), to: &out) }
            append(tensor.type.rawValue, to: &out)
            append(UInt64(offset), to: &out)
            guard let next = aligned(offset + tensor.byteCount, alignment) else {
                throw CkptError(.overflow, "data offset overflows", tensor: tensor.name)
            }
            offset = next
        }
        if !tensors.isEmpty {
            out += [UInt8](repeating: 0, count: aligned(out.count, alignment)! - out.count)
        }
        return (out, alignment)
    }

    /// Writes a GGUF v3 file atomically at `path`: header, key/values (in the given order, `general.architecture`
    /// first), tensor infos, then each tensor's data padded to the alignment, the last one included.
    public static func write(
        tensors: [OutputTensorInfo], metadata: [KeyValue], to path: String,
        inputs: [FileIdentity] = [], progress: ProgressReporter? = nil
    ) throws(CkptError) {
        let header: (bytes: [UInt8], alignment: Int)
        do {
            header = try headerBytes(tensors: tensors, metadata: metadata)
        } catch {
            throw error.at(path: path)
        }
        var file = try OutputFile(path: path, inputs: inputs)
        try file.write(header.bytes)
        let zeros = [UInt8](repeating: 0, count: header.alignment)
        do throws(CkptError) {
            // Tensors are produced (quantized) on another thread while this one writes what is ready.
            try ChunkPipeline.run(
                produce: { (pipeline: ChunkPipeline) throws(CkptError) in
                    for (index, tensor) in tensors.enumerated() {
                        if let encode = tensor.encodeInPlace {
                            try encode(pipeline)
                        } else {
                            try tensor.write { (chunk: UnsafeRawBufferPointer) throws(CkptError) in try pipeline.send(chunk) }
                        }
                        let sent = pipeline.end(index)
                        guard sent == tensor.byteCount else {
                            throw CkptError(.shortData, "encoder wrote \(sent) of \(tensor.byteCount) bytes", tensor: tensor.name)
                        }
                    }
                },
                consume: { (chunk: UnsafeRawBufferPointer) throws(CkptError) in
                    try file.write(chunk)
                    progress?.advance(bytes: chunk.count)
                },
                ended: { (index: Int) throws(CkptError) in
                    let count = tensors[index].byteCount
                    try file.write(Array(zeros[0..<aligned(count, header.alignment)! - count]))
                    progress?.finishedTensor()
                })
        } catch {
            throw error.at(path: path)
        }
        try file.commit()
    }

    // MARK: - Encoding

    static func validate(_ value: Value, key: String) throws(CkptError) {
        switch value {
        case .string(let text):
            guard text.utf8.count <= maximumStringBytes else {
                throw CkptError(.tooLarge, "the string value of '\(key)' is over \(maximumStringBytes) bytes")
            }
        case .array(let elementType, let elements):
            guard elementType != .array else {
                throw CkptError(.invalidMetadata, "'\(key)' is an array of arrays; ggml cannot read nested arrays")
            }
            guard elements.count <= maximumArrayElements else {
                throw CkptError(.tooLarge, "array '\(key)' has \(elements.count) elements, over ggml's limit of \(maximumArrayElements)")
            }
            for element in elements {
                guard element.type == elementType else {
                    throw CkptError(.invalidMetadata, "array '\(key)' of \(elementType.name) holds a \(element.type.name)")
                }
                try validate(element, key: key)
            }
        default:
            break
        }
    }

    static func append<T: FixedWidthInteger>(_ value: T, to out: inout [UInt8]) {
        withUnsafeBytes(of: value.littleEndian) { out.append(contentsOf: $0) }
    }

    static func appendString(_ text: String, to out: inout [UInt8]) {
        append(UInt64(text.utf8.count), to: &out)
        out.append(contentsOf: text.utf8)
    }

    static func appendValue(_ value: Value, to out: inout [UInt8]) {
        switch value {
        case .uint8(let v): append(v, to: &out)
        case .int8(let v): append(v, to: &out)
        case .uint16(let v): append(v, to: &out)
        case .int16(let v): append(v, to: &out)
        case .uint32(let v): append(v, to: &out)
        case .int32(let v): append(v, to: &out)
        case .uint64(let v): append(v, to: &out)
        case .int64(let v): append(v, to: &out)
        case .float32(let v): append(v.bitPattern, to: &out)
        case .float64(let v): append(v.bitPattern, to: &out)
        case .bool(let v): out.append(v ? 1 : 0)
        case .string(let v): appendString(v, to: &out)
        case .array(let elementType, let elements):
            append(elementType.rawValue, to: &out)
            append(UInt64(elements.count), to: &out)
            for element in elements { appendValue(element, to: &out) }
        }
    }
}
