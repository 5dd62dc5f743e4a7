import CkptCore

/// A tensor about to be written: its description and a producer that streams its bytes (C order,
/// little-endian) in chunks, so writers never need the whole checkpoint in memory.
public struct OutputTensor: Sendable {
    public typealias Sink = (UnsafeRawBufferPointer) throws(CkptError) -> Void

    public let name: String
    public let dtype: DType
    public let shape: Shape
    public let byteCount: Int
    private let produce: @Sendable (Sink) throws(CkptError) -> Void
    /// Whether producing streams from bytes already at rest (a mapped input, a buffer), allocating no more than
    /// a chunk; false where that is not known, or the source is loaded whole first. Writers that produce several
    /// tensors at once run the others one at a time.
    let streamsFromRest: Bool

    public init(
        name: String, dtype: DType, shape: Shape,
        produce: @escaping @Sendable (Sink) throws(CkptError) -> Void
    ) throws(CkptError) {
        try self.init(name: name, dtype: dtype, shape: shape, streamsFromRest: false, produce: produce)
    }

    init(
        name: String, dtype: DType, shape: Shape, streamsFromRest: Bool,
        produce: @escaping @Sendable (Sink) throws(CkptError) -> Void
    ) throws(CkptError) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.byteCount = try Self.byteCount(name: name, dtype: dtype, shape: shape)
        self.produce = produce
        self.streamsFromRest = streamsFromRest
    }

    /// The tensor's size in bytes; an overflowing shape is an error naming the tensor.
    static func byteCount(name: String, dtype: DType, shape: Shape) throws(CkptError) -> Int {
        do {
            return try shape.byteCount(for: dtype)
        } catch {
            throw error.at(tensor: name)
        }
    }

    /// Streams the bytes to `sink`, checking that exactly ``byteCount`` bytes come out.
    public func write(to sink: Sink) throws(CkptError) {
        try Self.checkedWrite(name: name, byteCount: byteCount, produce: produce, to: sink)
    }

    /// Runs a producer into `sink`, failing (`shortData`) unless it yields exactly `byteCount` bytes.
    public static func checkedWrite(
        name: String, byteCount: Int, produce: @escaping @Sendable (Sink) throws(CkptError) -> Void, to sink: Sink
    ) throws(CkptError) {
        var written = 0
        try produce { (chunk: UnsafeRawBufferPointer) throws(CkptError) in
            written += chunk.count
            guard written <= byteCount else {
                throw CkptError(.shortData, "producer wrote more than the \(byteCount) bytes declared", tensor: name)
            }
            try sink(chunk)
        }
        guard written == byteCount else {
            throw CkptError(.shortData, "producer wrote \(written) of \(byteCount) bytes", tensor: name)
        }
    }

    /// The same tensor under another name (renaming while converting).
    public func renamed(_ newName: String) throws(CkptError) -> OutputTensor {
        try OutputTensor(name: newName, dtype: dtype, shape: shape, streamsFromRest: streamsFromRest, produce: produce)
    }

    /// Streams `bytes` (elements of `source`, C order) to `sink` converted to `target`, through a bounded buffer.
    public static func writeConverted(_ bytes: UnsafeRawBufferPointer, from source: DType, to target: DType, _ sink: Sink) throws(CkptError) {
        if source == target {
            try sink(bytes)
            return
        }
        let inWidth = source.byteWidth!, outWidth = target.byteWidth!
        let count = bytes.count / inWidth
        let capacity = max(1, min(count, chunkBytes / max(inWidth, outWidth))) * outWidth
        let buffer = try LargeAllocation.allocate(capacity)
        defer { LargeAllocation.deallocate(buffer, count: capacity) }
        var start = 0
        while start < count {
            let n = min(capacity / outWidth, count - start)
            DTypeConversion.convertParallel(from: source, to: target, count: n, source: bytes.baseAddress! + start * inWidth, destination: buffer)
            try sink(UnsafeRawBufferPointer(start: buffer, count: n * outWidth))
            start += n
        }
    }

    /// Bytes already in memory.
    public static func bytes(name: String, dtype: DType, shape: Shape, _ data: [UInt8]) throws(CkptError) -> OutputTensor {
        try OutputTensor(name: name, dtype: dtype, shape: shape, streamsFromRest: true) { (sink: Sink) throws(CkptError) in
            try data.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try sink(raw) }
        }
    }

    /// A checkpoint tensor, converted to `target` on the fly when given (floating tensors only: others pass
    /// through unchanged). Streams in chunks and drops consumed input pages from memory as it goes.
    public static func from(_ entry: TensorEntry, convertingTo target: DType? = nil) throws(CkptError) -> OutputTensor {
        let outputType = (target != nil && entry.dtype.isConvertibleFloat) ? target! : entry.dtype
        guard DTypeConversion.canConvert(from: entry.dtype, to: outputType) else {
            throw CkptError(.unsupportedConversion, "cannot convert \(entry.dtype.name) to \(outputType.name)", path: entry.path, tensor: entry.name)
        }
        return try OutputTensor(name: entry.name, dtype: outputType, shape: entry.shape, streamsFromRest: entry.isAtRest) { (sink: Sink) throws(CkptError) in
            if outputType == entry.dtype {
                try entry.forEachChunk(maxBytes: chunkBytes, sink)
            } else {
                try streamConverted(entry, to: outputType, sink)
            }
        }
    }

    /// Chunk size for streaming: a multiple of every element size, small enough to keep memory flat.
    static let chunkBytes = 8 << 20

    private static func streamConverted(_ entry: TensorEntry, to target: DType, _ sink: Sink) throws(CkptError) {
        let inWidth = entry.dtype.byteWidth!, outWidth = target.byteWidth!
        let capacity = max(1, min(entry.byteCount, chunkBytes) / inWidth) * outWidth
        let buffer = try LargeAllocation.allocate(capacity)
        defer { LargeAllocation.deallocate(buffer, count: capacity) }
        try entry.forEachChunk(maxBytes: chunkBytes) { (chunk: UnsafeRawBufferPointer) throws(CkptError) in
            let n = chunk.count / inWidth
            guard n > 0 else { return }
            DTypeConversion.convertParallel(from: entry.dtype, to: target, count: n, source: chunk.baseAddress!, destination: buffer)
            try sink(UnsafeRawBufferPointer(start: buffer, count: n * outWidth))
        }
    }
}
