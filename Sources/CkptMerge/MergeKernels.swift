import CkptCore
import CkptKernels
import CkptFormats

/// A tensor as F32 values in C order, viewed as a matrix of `rows` × `columns` (rows = first dimension).
struct FloatMatrix: Sendable {
    var values: [Float]
    let shape: Shape

    var rows: Int { shape.dims.first ?? 1 }
    var columns: Int { shape.dims.isEmpty ? 1 : shape.dims.dropFirst().reduce(1, *) }

    init(values: [Float], shape: Shape) {
        precondition(values.count == shape.elements)
        self.values = values
        self.shape = shape
    }

    /// A zero matrix; its size is checked against the memory budget first (merge arithmetic is F32 whatever
    /// the stored dtype, so an F8 tensor quadruples here).
    static func zeros(_ shape: Shape, tensor: String? = nil, path: String? = nil) throws(CkptError) -> FloatMatrix {
        try MemoryBudget.require(
            try CheckedSize.product([shape.elements, 4], "F32 copy"), for: "an F32 copy of \(shape)", path: path)
        return FloatMatrix(values: [Float](repeating: 0, count: shape.elements), shape: shape)
    }
}

extension TensorEntry {
    /// The tensor decoded to F32 (exact for F16/BF16/F8; F64 rounded once). Integer tensors are refused.
    func floatMatrix() throws(CkptError) -> FloatMatrix {
        guard dtype.isConvertibleFloat else {
            throw CkptError(.unsupportedDType, "\(dtype.name) tensor cannot take part in a merge (floating tensors only)", path: path, tensor: name)
        }
        var values = try FloatMatrix.zeros(shape, path: path).values
        try values.withUnsafeMutableBufferPointer { (out: inout UnsafeMutableBufferPointer<Float>) throws(CkptError) in
            guard let base = out.baseAddress else { return }
            try decodeFloats(into: base)
        }
        return FloatMatrix(values: values, shape: shape)
    }

    /// The first finite value whose magnitude is at least `threshold`, scanning chunk by chunk (pages released).
    func firstFiniteValue(atLeast threshold: Float) throws(CkptError) -> (index: Int, value: Float)? {
        guard dtype.isConvertibleFloat, let width = dtype.byteWidth else { return nil }
        var offset = 0
        var found: (index: Int, value: Float)? = nil
        var buffer = [Float]()
        try forEachChunk(maxBytes: 4 << 20) { (chunk: UnsafeRawBufferPointer) throws(CkptError) in
            let n = chunk.count / width
            defer { offset += n }
            guard found == nil, n > 0 else { return }
            if buffer.count < n { buffer = [Float](repeating: 0, count: n) }
            buffer.withUnsafeMutableBytes { out in
                DTypeConversion.convert(from: dtype, to: .f32, count: n, source: chunk.baseAddress!, destination: out.baseAddress!)
            }
            if let i = buffer[0..<n].firstIndex(where: { $0.isFinite && abs($0) >= threshold }) { found = (offset + i, buffer[i]) }
        }
        return found
    }
}

/// The arithmetic of merging, in F32 with F64 where a reduction needs it (norms, the SSF bias).
enum MergeKernels {
    /// Rank-r updates gain nothing from OpenBLAS's second thread, which would only spin against the writer.
    static func useSingleThreadedBLAS() { BLAS.useSingleThread() }

    /// C[rows × n] += alpha · op(A) · op(B), row-major, through OpenBLAS sgemm.
    static func addProduct(
        into c: UnsafeMutablePointer<Float>, rows m: Int, columns n: Int, inner k: Int, alpha: Float,
        a: UnsafePointer<Float>, lda: Int, transposeA: Bool, b: UnsafePointer<Float>, ldb: Int, transposeB: Bool, ldc: Int
    ) {
        guard m > 0, n > 0, k > 0 else { return }
        BLAS.gemm(a, lda: lda, transposeA: transposeA, b, ldb: ldb, transposeB: transposeB, c, ldc: ldc, m: m, n: n, k: k, alpha: alpha, beta: 1)
    }

    /// Euclidean norm of each row (`alongRows`) or each column of a rows × columns matrix, accumulated in F64.
    static func norms(_ values: [Float], rows: Int, columns: Int, alongRows: Bool) -> [Double] {
        var result = [Double](repeating: 0, count: alongRows ? rows : columns)
        values.withUnsafeBufferPointer { v in
            for r in 0..<rows {
                let row = v.baseAddress! + r * columns
                if alongRows {
                    var sum = 0.0
                    for c in 0..<columns { let x = Double(row[c]); sum += x * x }
                    result[r] = sum
                } else {
                    for c in 0..<columns { let x = Double(row[c]); result[c] += x * x }
                }
            }
        }
        return result.map { $0.squareRoot() }
    }

    /// Index of the first non-finite value, if any.
    static func firstNonFinite(_ values: [Float]) -> Int? {
        values.withUnsafeBufferPointer { v in
            guard !v.isEmpty else { return nil }
            // Branch-free scan first (the common case is all finite), then locate.
            var bad: UInt32 = 0
            let bits = UnsafeRawPointer(v.baseAddress!).assumingMemoryBound(to: UInt32.self)
            for i in 0..<v.count { bad |= (bits[i] & 0x7F80_0000) == 0x7F80_0000 ? 1 : 0 }
            guard bad != 0 else { return nil }
            return v.firstIndex { !$0.isFinite }
        }
    }
}
