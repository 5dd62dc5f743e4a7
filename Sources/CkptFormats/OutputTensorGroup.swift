import CkptCore

/// Tensors whose bytes come out of one computation, interleaved: a quantized matrix's codes, scales and biases,
/// produced row chunk by row chunk. A file may store the parts far apart (safetensors orders by dtype, then name),
/// so the writer places each part's bytes at its own offset: nothing is held back or computed twice.
public struct OutputTensorGroup: Sendable {
    /// Receives the next bytes of part `part`: each part's bytes arrive in order, parts in any interleaving.
    public typealias Sink = (_ part: Int, _ bytes: UnsafeRawBufferPointer) throws(CkptError) -> Void

    /// One tensor of the group, as the file's header describes it.
    public struct Part: Sendable {
        public let name: String
        public let dtype: DType
        public let shape: Shape
        public let byteCount: Int

        public init(name: String, dtype: DType, shape: Shape) throws(CkptError) {
            self.name = name
            self.dtype = dtype
            self.shape = shape
            self.byteCount = try OutputTensor.byteCount(name: name, dtype: dtype, shape: shape)
        }

        init(_ tensor: OutputTensor) {
            name = tensor.name
            dtype = tensor.dtype
            shape = tensor.shape
            byteCount = tensor.byteCount
        }
    }

    public let parts: [Part]
    private let produce: @Sendable (Sink) throws(CkptError) -> Void

    public init(parts: [Part], produce: @escaping @Sendable (Sink) throws(CkptError) -> Void) {
        self.parts = parts
        self.produce = produce
    }

    /// A single tensor streamed by its own producer.
    public init(_ tensor: OutputTensor) {
        parts = [Part(tensor)]
        produce = { (sink: Sink) throws(CkptError) in
            try tensor.write { (chunk: UnsafeRawBufferPointer) throws(CkptError) in try sink(0, chunk) }
        }
    }

    /// Runs the producer into `sink`, failing (`shortData`) unless every part receives exactly its byte count.
    public func write(to sink: Sink) throws(CkptError) {
        var written = [Int](repeating: 0, count: parts.count)
        try produce { (part: Int, chunk: UnsafeRawBufferPointer) throws(CkptError) in
            written[part] += chunk.count
            guard written[part] <= parts[part].byteCount else {
                throw CkptError(.shortData, "producer wrote more than the \(parts[part].byteCount) bytes declared", tensor: parts[part].name)
            }
            try sink(part, chunk)
        }
        for (part, count) in written.enumerated() where count != parts[part].byteCount {
            throw CkptError(.shortData, "producer wrote \(count) of \(parts[part].byteCount) bytes", tensor: parts[part].name)
        }
    }
}
