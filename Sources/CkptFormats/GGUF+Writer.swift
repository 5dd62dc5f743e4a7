import CkptCore
import Synchronization

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
        /// Set where the tensor can be encoded in independent slices (quantizing an input read in place): the writer
        /// then spreads the slices over its workers instead of streaming the tensor on one.
        let slices: SlicedEncoding?
        /// Whether producing streams from bytes at rest (see ``OutputTensor``); the writer runs the other tensors
        /// one at a time, since each may hold its whole tensor in memory.
        let streamsFromRest: Bool

        /// Refuses shapes whose rows (last dimension) are not whole blocks of `type`.
        public init(
            name: String, shape: Shape, type: GGMLType, produce: @escaping @Sendable (OutputTensor.Sink) throws(CkptError) -> Void
        ) throws(CkptError) {
            try self.init(name: name, shape: shape, type: type, streamsFromRest: false, produce: produce)
        }

        init(
            name: String, shape: Shape, type: GGMLType, streamsFromRest: Bool,
            produce: @escaping @Sendable (OutputTensor.Sink) throws(CkptError) -> Void
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
            self.slices = nil
            self.streamsFromRest = streamsFromRest
        }

        private init(_ plain: OutputTensorInfo, slices: SlicedEncoding) {
            self.name = plain.name
            self.shape = plain.shape
            self.type = plain.type
            self.byteCount = plain.byteCount
            self.produce = plain.produce
            self.slices = slices
            self.streamsFromRest = plain.streamsFromRest
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
            try self.init(name: tensor.name, shape: tensor.shape, type: type, streamsFromRest: tensor.streamsFromRest) {
                (sink: OutputTensor.Sink) throws(CkptError) in
                try tensor.write(to: sink)
            }
        }

        /// A floating checkpoint tensor encoded as `type`: block types are quantized with ggml's reference
        /// quantizers (in slices of whole blocks, spread over the writer's workers where the input can be read in
        /// slices), plain float types converted.
        ///
        /// With `measured`, block types are also compared with their source in the same pass
        /// (``GGMLQuants/quantizeMeasured(_:source:count:destination:parallel:)``), `measured` receives the
        /// statistics once the whole file is written, and NaN/Inf values are refused (`nonFinite`, naming the first
        /// such element).
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
            let plain = try OutputTensorInfo(name: entry.name, shape: entry.shape, type: type, streamsFromRest: entry.isAtRest) {
                (sink: OutputTensor.Sink) throws(CkptError) in
                // Streaming to a sink: buffers of our own, sized for this tensor.
                let elements = min(sliceElements, max(entry.shape.elements, type.blockSize))
                let outputBytes = elements / type.blockSize * type.bytesPerBlock
                let output = try LargeAllocation.allocate(outputBytes)
                defer { LargeAllocation.deallocate(output, count: outputBytes) }
                let staging = try LargeAllocation.allocate(elements * 4).assumingMemoryBound(to: Float.self)
                defer { LargeAllocation.deallocate(UnsafeMutableRawPointer(staging), count: elements * 4) }
                var total = GGMLQuants.Measurement()
                var offset = 0
                try entry.forEachF32Chunk(elements: sliceElements, staging: staging) { (floats: UnsafePointer<Float>, count: Int) throws(CkptError) in
                    let m = try encode(entry, as: type, floats, elements: offset..<offset + count, into: output, measuring: measured != nil, parallel: true)
                    total.add(m)
                    try sink(UnsafeRawBufferPointer(start: output, count: count / type.blockSize * type.bytesPerBlock))
                    offset += count
                }
                measured?(total)
            }
            guard entry.hasSliceableFloats else { return plain }
            let count = entry.shape.elements
            let slices = SlicedEncoding(
                // An empty tensor is one empty slice (a part, so progress counts it).
                count: max(1, (count + sliceElements - 1) / sliceElements), bytesPerSlice: sliceElements / type.blockSize * type.bytesPerBlock,
                encode: { (slice: Int, staging: UnsafeMutablePointer<Float>, output: UnsafeMutableRawPointer) throws(CkptError) in
                    let range = slice * sliceElements..<min(count, (slice + 1) * sliceElements)
                    var m = GGMLQuants.Measurement()
                    try entry.withF32Elements(range, staging: staging) { (floats: UnsafePointer<Float>) throws(CkptError) in
                        m = try encode(entry, as: type, floats, elements: range, into: output, measuring: measured != nil, parallel: false)
                    }
                    return (range.count / type.blockSize * type.bytesPerBlock, m)
                },
                measured: measured)
            return OutputTensorInfo(plain, slices: slices)
        }

        /// Streams the bytes to `sink`, checking that exactly ``byteCount`` bytes come out.
        public func write(to sink: OutputTensor.Sink) throws(CkptError) {
            try OutputTensor.checkedWrite(name: name, byteCount: byteCount, produce: produce, to: sink)
        }
    }

    /// A quantized tensor as independent slices of ``sliceElements`` values (the last may be shorter), each read
    /// from its own part of the input and encoded into its own part of the output.
    struct SlicedEncoding: Sendable {
        let count: Int
        /// Encoded bytes of every slice but the last: slice k starts k × this into the tensor's data.
        let bytesPerSlice: Int
        /// Encodes slice k into `output` (room for ``bytesPerSlice``), staging non-F32 input in `staging` (room for
        /// ``sliceElements`` floats); returns the byte count and, when measuring, the slice's statistics.
        let encode: @Sendable (Int, UnsafeMutablePointer<Float>, UnsafeMutableRawPointer) throws(CkptError) -> (bytes: Int, measurement: GGMLQuants.Measurement)
        /// Receives the statistics of all slices, added in order, once the tensor is written.
        let measured: (@Sendable (GGMLQuants.Measurement) -> Void)?
    }

    /// Values per slice when quantizing: 4 MiB of F32 input, a few milliseconds of work, blocks of every type
    /// whole (a power of two), and the encoded slice fits a worker's output buffer.
    static let sliceElements = ParallelFileWriter.WorkerBuffers.stagingElements

    /// Encodes `floats` (the tensor's elements `range`) as `type` blocks into `blocks`; when `measuring`, refuses
    /// NaN/Inf weights and blocks whose F16 scales overflow, and returns the statistics.
    static func encode(
        _ entry: TensorEntry, as type: GGMLType, _ floats: UnsafePointer<Float>, elements range: Range<Int>,
        into blocks: UnsafeMutableRawPointer, measuring: Bool, parallel: Bool
    ) throws(CkptError) -> GGMLQuants.Measurement {
        guard measuring else {
            if parallel {
                GGMLQuants.quantizeParallel(type, source: floats, count: range.count, destination: blocks)
            } else {
                GGMLQuants.quantize(type, source: floats, count: range.count, destination: blocks)
            }
            return GGMLQuants.Measurement()
        }
        let (measurement, bad) = GGMLQuants.quantizeMeasured(type, source: floats, count: range.count, destination: blocks, parallel: parallel)
        if let bad { throw entry.nonFiniteError(element: range.lowerBound + bad, value: floats[bad]) }
        // Finite weights, non-finite error: a block's F16 scale overflowed (|w| beyond ~65504 × the code range),
        // so the blocks would dequantize to Inf/NaN.
        guard measurement.errorEnergy.isFinite else {
            throw entry.unrepresentableError(
                "elements \(range.lowerBound)..<\(range.upperBound)", values: UnsafeBufferPointer(start: floats, count: range.count),
                scheme: "\(type.name) (F16 block scales)")
        }
        return measurement
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
            let (end, overflow) = offset.addingReportingOverflow(tensor.byteCount)
            guard !overflow, let next = aligned(end, alignment) else {
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
        // Every tensor's place is known from the header: the parts (whole tensors, or slices of the quantized ones)
        // are produced on all cores and written where they belong; padding is left as the zeros a sized file reads.
        var positions: [Int] = []
        var end = header.bytes.count
        for tensor in tensors {
            positions.append(end)
            end = aligned(end + tensor.byteCount, header.alignment)!
        }
        var parts: [ParallelFileWriter.Part<GGMLQuants.Measurement>] = []
        var partTensors: [Int] = []
        for (index, tensor) in tensors.enumerated() {
            let start = positions[index]
            if let slices = tensor.slices {
                for slice in 0..<slices.count {
                    parts.append(ParallelFileWriter.Part { (buffers: ParallelFileWriter.WorkerBuffers, file: PositionalWriter) throws(CkptError) in
                        let (count, measurement) = try slices.encode(slice, buffers.staging, buffers.output)
                        try file.write(UnsafeRawBufferPointer(start: buffers.output, count: count), at: start + slice * slices.bytesPerSlice)
                        return measurement
                    })
                    partTensors.append(index)
                }
            } else {
                parts.append(ParallelFileWriter.Part(loadsWholeTensor: !tensor.streamsFromRest) {
                    (_: ParallelFileWriter.WorkerBuffers, file: PositionalWriter) throws(CkptError) in
                    var position = start
                    try tensor.write { (chunk: UnsafeRawBufferPointer) throws(CkptError) in
                        try file.write(chunk, at: position)
                        position += chunk.count
                    }
                    return GGMLQuants.Measurement()
                })
                partTensors.append(index)
            }
        }
        let measurements: [GGMLQuants.Measurement]
        do throws(CkptError) {
            let finished = progress.map { ProgressByTensor($0, tensors: tensors, partTensors: partTensors).partFinished }
            measurements = try file.withPositionalWriter(size: end) { (writer: PositionalWriter) throws(CkptError) in
                try ParallelFileWriter.run(parts, to: writer, finished: finished)
            }
        } catch {
            throw error.at(path: path)
        }
        // Statistics of sliced tensors: their slices' added in file order, so the totals do not depend on timing.
        var totals = [GGMLQuants.Measurement](repeating: GGMLQuants.Measurement(), count: tensors.count)
        for (part, tensor) in partTensors.enumerated() { totals[tensor].add(measurements[part]) }
        for (tensor, total) in zip(tensors, totals) { tensor.slices?.measured?(total) }
        try file.commit()
    }

    /// Progress by whole tensors while their parts finish on several threads (the reporter is not thread-safe:
    /// one worker at a time, under the lock).
    private final class ProgressByTensor: Sendable {
        let progress: ProgressReporter
        let partTensors: [Int]
        let byteCounts: [Int]
        let partsLeft: Mutex<[Int]>

        init(_ progress: ProgressReporter, tensors: [OutputTensorInfo], partTensors: [Int]) {
            self.progress = progress
            self.partTensors = partTensors
            self.byteCounts = tensors.map(\.byteCount)
            var parts = [Int](repeating: 0, count: tensors.count)
            for tensor in partTensors { parts[tensor] += 1 }
            self.partsLeft = Mutex(parts)
        }

        @Sendable func partFinished(_ part: Int) {
            partsLeft.withLock { left in
                let tensor = partTensors[part]
                left[tensor] -= 1
                if left[tensor] == 0 {
                    progress.advance(bytes: byteCounts[tensor])
                    progress.finishedTensor()
                }
            }
        }
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
