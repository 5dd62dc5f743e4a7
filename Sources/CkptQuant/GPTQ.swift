import CCkptOpenBLAS
import CkptCore
import CkptKernels

/// GPTQ error compensation (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
/// Transformers", 2023): the columns of a `[rows, cols]` weight matrix are rounded one at a time, and each column's
/// rounding error is spread over the columns not yet rounded through the inverse Gram matrix of the layer's inputs,
/// so that the layer's *outputs* on those inputs stay close rather than its weights. The grid is any of
/// ``GroupQuantizer``'s (RTN, MSE clipping or HQQ parameters, per group or per channel), so the codes, scales and
/// offsets are stored exactly as plain rounding stores them and every writer and runtime reads them unchanged.
///
/// `H = XᵀX` (X: the layer's inputs, one row per token) is damped by 1 % of its mean diagonal, inverted, and
/// factored as `H⁻¹ = UᵀU` (U upper triangular): row j of U holds the update of the columns after j. Updates inside
/// a block of 128 columns run weight by weight; the rest of the matrix receives each block's errors in one GEMM.
///
/// With `actOrder` the columns are visited in descending order of `H`'s diagonal (the reference's `act_order` /
/// `desc_act`): the inputs with the most energy are rounded first, while every other column can still absorb their
/// error. Groups stay the contiguous runs of the stored layout, so every writer and runtime reads the result
/// unchanged; a group's parameters are taken when the first of its columns is reached.
public struct GPTQ: Sendable {
    /// Row-major `size × size`, upper triangle: `(P(H + λI)Pᵀ)⁻¹ = UᵀU`, P the visiting order's permutation.
    let factor: [Float]
    public let size: Int
    /// `order[k]`: the column visited k-th (identity unless act-order).
    let order: [Int]
    public var actOrder: Bool { order != Array(0..<size) }

    /// λ as a fraction of H's mean diagonal (the reference implementation's `percdamp`).
    public static let dampingFraction = 0.01
    /// Columns per lazy update (a multiple of every supported group size).
    public static let blockColumns = 128

    /// Where a group's scale and offset come from.
    public enum ParameterSource: Sendable {
        /// The group's weights as updated by the errors of the columns before it, when its first column is
        /// reached (the GPTQ paper's algorithm, and the default).
        case updatedWeights
        /// The original weights, before any update (llm-compressor's GPTQ, which takes its observer's parameters).
        case originalWeights
    }

    /// Factors the damped inverse of the Gram matrix `gram` (row-major `size × size`, symmetric). A column whose
    /// input was always zero (zero diagonal) gets a unit diagonal: no information, so plain rounding for it.
    public init(gram: [Float], size: Int, actOrder: Bool = false, tensor: String, path: String) throws(CkptError) {
        precondition(gram.count == size * size && size > 0)
        // H and its factor (F64), the factor kept in F32: three size² matrices.
        try MemoryBudget.require(
            try CheckedSize.product([size, size, 20], "GPTQ matrices"), for: "GPTQ's \(size)×\(size) Hessian", path: path)
        var diagonal = (0..<size).map { Double(gram[$0 * size + $0]) }
        for j in 0..<size where diagonal[j] == 0 { diagonal[j] = 1 }
        // Descending diagonal, ties in column order, so the order is deterministic.
        let order = actOrder ? (0..<size).sorted { diagonal[$0] != diagonal[$1] ? diagonal[$0] > diagonal[$1] : $0 < $1 } : Array(0..<size)
        var h = [Double](repeating: 0, count: size * size)
        for a in 0..<size {
            for b in 0..<size { h[a * size + b] = a == b ? diagonal[order[a]] : Double(gram[order[a] * size + order[b]]) }
        }
        let trace = diagonal.reduce(0, +)
        let damping = Self.dampingFraction * trace / Double(size)
        for j in 0..<size { h[j * size + j] += damping }
        // A row-major symmetric matrix is its own column-major layout. LAPACK's lower triangle (column-major) is
        // the row-major upper one, so the final factor L (H⁻¹ = LLᵀ) read row-major is U = Lᵀ, upper triangular.
        var n = Int32(size), info: Int32 = 0
        let lower: CChar = 76  // "L"
        func fail(_ step: String) -> CkptError {
            CkptError(.invalidArgument, "GPTQ: the damped Gram matrix of the layer's inputs is not positive definite (\(step), LAPACK info \(info))",
                path: path, tensor: tensor)
        }
        withUnsafePointer(to: lower) { uplo in
            h.withUnsafeMutableBufferPointer { a in
                dpotrf_(uplo, &n, a.baseAddress!, &n, &info, 1)
                if info == 0 { dpotri_(uplo, &n, a.baseAddress!, &n, &info, 1) }
            }
        }
        if info != 0 { throw fail("inverting it") }
        withUnsafePointer(to: lower) { uplo in
            h.withUnsafeMutableBufferPointer { a in dpotrf_(uplo, &n, a.baseAddress!, &n, &info, 1) }
        }
        if info != 0 { throw fail("factoring its inverse") }
        var factor = [Float](repeating: 0, count: size * size)
        for i in 0..<size {
            for j in i..<size { factor[i * size + j] = Float(h[i * size + j]) }
        }
        self.factor = factor
        self.size = size
        self.order = order
    }

    /// Quantizes `rows × size` weights (row-major) under `settings`: one code per weight into `codes`, and the
    /// stored scale and offset of each (row, group) into `scales`/`offsets` (`rows × groups`). `weights` is not
    /// modified. Rows are independent, so they are split across cores, each with single-threaded OpenBLAS.
    public func quantize(
        _ weights: UnsafePointer<Float>, rows: Int, settings: QuantizationSettings, source: ParameterSource = .updatedWeights,
        codes: UnsafeMutablePointer<UInt8>, scales: UnsafeMutablePointer<Float>, offsets: UnsafeMutablePointer<Float>
    ) {
        let cols = size
        let groupSize = settings.groupSize ?? cols
        precondition(cols % groupSize == 0 && (groupSize == cols || Self.blockColumns % groupSize == 0))
        let quantizer = GroupQuantizer(settings)
        nonisolated(unsafe) let out = (weights, codes, scales, offsets)
        let order = self.order
        // One GEMM thread per worker: the workers split the rows.
        BLAS.withThreads(1) {
        factor.withUnsafeBufferPointer { factorBuffer in
            nonisolated(unsafe) let u = factorBuffer.baseAddress!
            // Enough rows per worker that the trailing GEMMs stay efficient.
            Parallel.forEachChunk(count: rows, minimumChunk: 32) { range in
                Self.quantizeRows(range, original: out.0, cols: cols, groupSize: groupSize, factor: u, order: order, quantizer: quantizer,
                    source: source, codes: out.1, scales: out.2, offsets: out.3)
            }
        }
        }
    }

    /// Rows `range`, in the work layout of the visiting order: work column k holds original column `order[k]`.
    static func quantizeRows(
        _ range: Range<Int>, original: UnsafePointer<Float>, cols: Int, groupSize: Int, factor u: UnsafePointer<Float>,
        order: [Int], quantizer: GroupQuantizer, source: ParameterSource,
        codes: UnsafeMutablePointer<UInt8>, scales: UnsafeMutablePointer<Float>, offsets: UnsafeMutablePointer<Float>
    ) {
        let n = range.count, block = blockColumns, groups = cols / groupSize
        let work = UnsafeMutablePointer<Float>.allocate(capacity: n * cols)
        let errors = UnsafeMutablePointer<Float>.allocate(capacity: n * block)
        let coding = UnsafeMutablePointer<GroupParameters>.allocate(capacity: n * groups)
        let ready = UnsafeMutablePointer<Bool>.allocate(capacity: n * groups)
        let members = UnsafeMutablePointer<Float>.allocate(capacity: groupSize)
        let memberImportance = UnsafeMutablePointer<Float>.allocate(capacity: groupSize)
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: groupSize)
        defer {
            work.deallocate(); errors.deallocate(); coding.deallocate(); ready.deallocate()
            members.deallocate(); memberImportance.deallocate(); scratch.deallocate()
        }
        var position = [Int](repeating: 0, count: cols)  // where original column c sits in the work layout
        for (k, c) in order.enumerated() { position[c] = k }
        // GPTQ charges a rounding error e in work column k as e²/U_kk²: MSE and HQQ fit their group parameters
        // to that weighted error.
        let importance = (0..<cols).map { k in 1 / (u[k * cols + k] * u[k * cols + k]) }
        let weighted = importance.contains { $0 != importance[0] }  // equal weights: the plain objective, exactly
        for i in 0..<n {
            let source = original + (range.lowerBound + i) * cols
            for k in 0..<cols { work[i * cols + k] = source[order[k]] }
        }
        ready.initialize(repeating: false, count: n * groups)
        /// Group g's parameters from its weights as they stand in row i's work layout.
        func setParameters(row i: Int, group g: Int) {
            for m in 0..<groupSize {
                let k = position[g * groupSize + m]
                members[m] = work[i * cols + k]
                memberImportance[m] = importance[k]
            }
            let (c, s) = quantizer.parameters(members, groupSize, importance: weighted ? memberImportance : nil, scratch: scratch)
            coding[i * groups + g] = c
            let k = (range.lowerBound + i) * groups + g
            scales[k] = s.scale
            offsets[k] = s.offset
            ready[i * groups + g] = true
        }
        if source == .originalWeights {
            for i in 0..<n {
                for g in 0..<groups { setParameters(row: i, group: g) }
            }
        }
        var start = 0
        while start < cols {
            let end = min(start + block, cols)
            for i in 0..<n {
                let w = work + i * cols
                let r = range.lowerBound + i
                for j in start..<end {
                    let column = order[j], g = column / groupSize
                    if !ready[i * groups + g] { setParameters(row: i, group: g) }
                    let p = coding[i * groups + g]
                    let stored = GroupParameters(scale: scales[r * groups + g], offset: offsets[r * groups + g])
                    let q = quantizer.code(w[j], p)
                    codes[r * cols + column] = UInt8(q)
                    let error = (w[j] - quantizer.stored(quantizer.value(q, stored))) / u[j * cols + j]
                    errors[i * block + (j - start)] = error
                    let row = u + j * cols
                    for k in (j + 1)..<end { w[k] -= error * row[k] }
                }
            }
            if end < cols {
                // W[:, end...] -= E · U[start..<end, end...]
                BLAS.gemm(errors, lda: block, u + start * cols + end, ldb: cols, work + end, ldc: cols,
                    m: n, n: cols - end, k: end - start, alpha: -1, beta: 1)
            }
            start = end
        }
    }
}

/// The codes and stored group parameters GPTQ chose for one `[rows, cols]` matrix under `settings`.
public struct CompensatedMatrix: Sendable {
    public let rows: Int
    public let cols: Int
    public let settings: QuantizationSettings
    /// Row-major `rows × cols` codes, and `rows × groups` stored scales and offsets.
    let codes: [UInt8]
    let scales: [Float]
    let offsets: [Float]

    /// The values a runtime dequantizes, row-major, into `values`; `rounded` also applies the scale dtype's
    /// rounding (what a file stored in that dtype holds).
    func dequantize(into values: UnsafeMutablePointer<Float>, rounded: Bool) {
        let quantizer = GroupQuantizer(settings)
        let groupSize = settings.groupSize ?? cols, groups = cols / groupSize
        for r in 0..<rows {
            for j in 0..<cols {
                let k = r * groups + j / groupSize
                let value = quantizer.value(Float(codes[r * cols + j]), GroupParameters(scale: scales[k], offset: offsets[k]))
                values[r * cols + j] = rounded ? quantizer.stored(value) : value
            }
        }
    }

    /// The stored values (scale-dtype rounding included) in the checkpoint's `[rows, cols]` layout: what
    /// sequential calibration feeds the layers after this one.
    public func storedValues() -> [Float] {
        [Float](unsafeUninitializedCapacity: rows * cols) { buffer, count in
            dequantize(into: buffer.baseAddress!, rounded: true)
            count = rows * cols
        }
    }
}

/// How the writer applies GPTQ to one tensor.
public enum GPTQCompensation: Sendable {
    /// The factor of the layer's input Gram: the tensor is rounded when it is written.
    case factor(GPTQ)
    /// Already rounded (sequential calibration rounds each layer before it computes the next layer's inputs).
    case quantized(CompensatedMatrix)
}

extension GPTQ {
    /// Loads `item`'s weights into `weights` (`rows × cols`, left unchanged afterwards) and quantizes them.
    func quantize(_ item: PlannedTensor, settings: QuantizationSettings, loadingInto weights: UnsafeMutablePointer<Float>) throws(CkptError) -> CompensatedMatrix {
        let (rows, cols) = (item.rows, item.cols)
        precondition(cols == size)
        let groups = cols / (settings.groupSize ?? cols)
        try QuantizationPlan.loadFinite(item, into: weights)
        var codes = [UInt8](repeating: 0, count: rows * cols)
        var scales = [Float](repeating: 0, count: rows * groups), offsets = scales
        codes.withUnsafeMutableBufferPointer { q in
            scales.withUnsafeMutableBufferPointer { s in
                offsets.withUnsafeMutableBufferPointer { o in
                    quantize(weights, rows: rows, settings: settings, codes: q.baseAddress!, scales: s.baseAddress!, offsets: o.baseAddress!)
                }
            }
        }
        return CompensatedMatrix(rows: rows, cols: cols, settings: settings, codes: codes, scales: scales, offsets: offsets)
    }

    /// Quantizes `item` under `settings` (the tensor's own scale dtype, as the writer uses).
    public func quantize(_ item: PlannedTensor, settings: QuantizationSettings) throws(CkptError) -> CompensatedMatrix {
        let weights = UnsafeMutablePointer<Float>.allocate(capacity: item.rows * item.cols)
        defer { weights.deallocate() }
        return try quantize(item, settings: settings, loadingInto: weights)
    }
}
