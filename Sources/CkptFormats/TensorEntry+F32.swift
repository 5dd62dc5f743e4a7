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
            if dtype == .f32, Int(bitPattern: chunk.baseAddress!) % 4 == 0 {
                try body(chunk.baseAddress!.assumingMemoryBound(to: Float.self), count)
            } else {
                // Other float dtypes, or F32 at an odd address (MLX writes unaligned data): an aligned F32 copy.
                DTypeConversion.convertParallel(from: dtype, to: .f32, count: count, source: chunk.baseAddress!, destination: staging)
                try body(UnsafePointer(staging), count)
            }
        }
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
