import CkptCore

extension TensorEntry {
    /// Calls `body` with a floating tensor's values as F32 in consecutive chunks of exactly `elements` values (the
    /// last one may be shorter), so a multiple of the row length or block size gives chunks of whole rows or
    /// blocks. Aligned F32 input is passed in place (no copy); anything else is decoded into `staging` (room for
    /// `elements` floats). Input pages are released as they are consumed.
    public func forEachF32Chunk(
        elements: Int, staging: UnsafeMutablePointer<Float>, _ body: (UnsafePointer<Float>, Int) throws(CkptError) -> Void
    ) throws(CkptError) {
        precondition(dtype.isConvertibleFloat, "\(dtype) is not a floating dtype")
        let width = dtype.byteWidth!
        try forEachChunk(maxBytes: elements * width) { (chunk: UnsafeRawBufferPointer) throws(CkptError) in
            let count = chunk.count / width
            guard count > 0 else { return }
            try asF32(chunk, count: count, staging: staging, parallel: true) { (floats: UnsafePointer<Float>) throws(CkptError) in
                try body(floats, count)
            }
        }
    }

    /// `count` elements at `raw` as F32: in place for aligned F32; other float dtypes, or F32 at an odd address (MLX
    /// writes unaligned data), decoded into `staging` (across cores when `parallel`).
    private func asF32(
        _ raw: UnsafeRawBufferPointer, count: Int, staging: UnsafeMutablePointer<Float>, parallel: Bool,
        _ body: (UnsafePointer<Float>) throws(CkptError) -> Void
    ) throws(CkptError) {
        if dtype == .f32, Int(bitPattern: raw.baseAddress!) % 4 == 0 {
            try body(raw.baseAddress!.assumingMemoryBound(to: Float.self))
        } else if parallel {
            DTypeConversion.convertParallel(from: dtype, to: .f32, count: count, source: raw.baseAddress!, destination: staging)
            try body(UnsafePointer(staging))
        } else {
            DTypeConversion.convert(from: dtype, to: .f32, count: count, source: raw.baseAddress!, destination: staging)
            try body(UnsafePointer(staging))
        }
    }

    /// Whether ``withF32Elements(_:staging:_:)`` can read any slice of the tensor: a floating tensor whose bytes lie
    /// at rest in C order, little-endian (mapped or in memory), so that slices can be read in any order, at once.
    var hasSliceableFloats: Bool { dtype.isConvertibleFloat && isAtRest }

    /// Whether the bytes lie at rest in C order, little-endian (mapped or in memory): streaming them allocates
    /// nothing, where other sources (byte-swapped or Fortran-order .npy, zip members, dequantized tensors) are
    /// loaded whole first.
    var isAtRest: Bool {
        guard case .bytes = source else { return false }
        return true
    }

    /// Calls `body` with the elements `range` as F32: in place for aligned F32, otherwise decoded into `staging`
    /// (room for `range.count` floats), then drops the slice's input pages from memory. Requires
    /// ``hasSliceableFloats``; safe to call for disjoint slices from several threads (a neighbour whose pages
    /// are dropped with the slice's 2 MiB units maps them again from the page cache).
    func withF32Elements(
        _ range: Range<Int>, staging: UnsafeMutablePointer<Float>, _ body: (UnsafePointer<Float>) throws(CkptError) -> Void
    ) throws(CkptError) {
        guard case .bytes(let bytes) = source, let width = dtype.byteWidth, dtype.isConvertibleFloat else {
            preconditionFailure("\(name) cannot be read in slices")
        }
        precondition(range.lowerBound >= 0 && range.upperBound <= shape.elements, "slice outside the tensor")
        guard !range.isEmpty else { return }
        let byteRange = bytes.range.lowerBound + range.lowerBound * width..<bytes.range.lowerBound + range.upperBound * width
        // One slice per worker: decoded on this thread.
        try bytes.storage.withUnsafeBytes(in: byteRange) { (raw: UnsafeRawBufferPointer) throws(CkptError) in
            try asF32(raw, count: range.count, staging: staging, parallel: false, body)
        }
        bytes.storage.doneReading(byteRange)
    }

    /// The error for a NaN/Inf weight: quantizers refuse them (no scale can represent them, and the error
    /// statistics would be meaningless). `index` is the element's position in the tensor, `value` its F32 value.
    public func nonFiniteError(element index: Int, value: Float) -> CkptError {
        CkptError(.nonFinite, "element \(index) is \(value); a weight with NaN/Inf cannot be quantized", path: path, tensor: name)
    }

    /// The error for finite weights whose quantized values are not: a range wider than the scheme can hold (an
    /// F16 scale ends at 65504; a min–max range of F32 weights near ±3.4e38 overflows). Writing on would give a
    /// file that dequantizes to Inf/NaN. `values` is the span of weights that overflowed (a row or a block run).
    public func unrepresentableError(_ where_: String, values: UnsafeBufferPointer<Float>, scheme: String) -> CkptError {
        let low = values.min() ?? 0, high = values.max() ?? 0
        return CkptError(
            .overflow, "\(where_) (values \(low) … \(high)) cannot be represented in \(scheme): its quantized values would be Inf/NaN",
            path: path, tensor: name)
    }
}
