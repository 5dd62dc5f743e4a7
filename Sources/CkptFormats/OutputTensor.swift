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

    public init(
        name: String, dtype: DType, shape: Shape,
        produce: @escaping @Sendable (Sink) throws(CkptError) -> Void
    ) throws(CkptError) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        do {
            self.byteCount = try shape.byteCount(for: dtype)
        } catch {
            throw error.at(tensor: name)
        }
        self.produce = produce
    }

    /// Streams the bytes to `sink`, checking that exactly ``byteCount`` bytes come out.
    public func write(to sink: Sink) throws(CkptError) {
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

    /// Bytes already in memory.
    public static func bytes(name: String, dtype: DType, shape: Shape, _ data: [UInt8]) throws(CkptError) -> OutputTensor {
        try OutputTensor(name: name, dtype: dtype, shape: shape) { (sink: Sink) throws(CkptError) in
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
        return try OutputTensor(name: entry.name, dtype: outputType, shape: entry.shape) { (sink: Sink) throws(CkptError) in
            let bytes = try entry.load()
            if outputType == entry.dtype {
                try streamUnchanged(bytes, sink)
            } else {
                try streamConverted(bytes, from: entry.dtype, to: outputType, count: entry.shape.elements, sink)
            }
        }
    }

    static let chunkBytes = 8 << 20

    private static func streamUnchanged(_ bytes: TensorBytes, _ sink: Sink) throws(CkptError) {
        var offset = 0
        while offset < bytes.count {
            let n = min(chunkBytes, bytes.count - offset)
            let range = bytes.range.lowerBound + offset..<bytes.range.lowerBound + offset + n
            try bytes.storage.withUnsafeBytes(in: range) { (raw: UnsafeRawBufferPointer) throws(CkptError) in try sink(raw) }
            bytes.storage.doneReading(range)
            offset += n
        }
        if bytes.count == 0 { try sink(UnsafeRawBufferPointer(start: nil, count: 0)) }
    }

    private static func streamConverted(
        _ bytes: TensorBytes, from: DType, to: DType, count: Int, _ sink: Sink
    ) throws(CkptError) {
        let inWidth = from.byteWidth!, outWidth = to.byteWidth!
        let perChunk = max(1, min(count, chunkBytes / max(inWidth, outWidth)))
        let buffer = LargeAllocation.allocate(perChunk * outWidth)
        defer { LargeAllocation.deallocate(buffer, count: perChunk * outWidth) }
        var done = 0
        while done < count {
            let n = min(perChunk, count - done)
            let range = bytes.range.lowerBound + done * inWidth..<bytes.range.lowerBound + (done + n) * inWidth
            bytes.storage.withUnsafeBytes(in: range) { raw in
                DTypeConversion.convertParallel(from: from, to: to, count: n, source: raw.baseAddress!, destination: buffer)
            }
            bytes.storage.doneReading(range)
            try sink(UnsafeRawBufferPointer(start: buffer, count: n * outWidth))
            done += n
        }
    }
}
