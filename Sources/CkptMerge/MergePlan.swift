import CkptCore
import CkptFormats

/// One line of the merge plan, as `--dry-run` and `--json` report it.
public struct MergePlanEntry: Sendable {
    public var target: String
    /// `lora`, `dora`, `lora-bias`, `replace`, `ssf`, `fact`, `bitfit`, `keep-unmerged`.
    public var rule: String
    /// The adapter file or folder the change comes from.
    public var source: String
    /// The adapter tensor(s) behind the change.
    public var sourceTensors: [String]
    public var scaling: Double?
    public var rank: Int?
    public var weight: Double?
    /// Rows of the target written (fused q/k/v placements).
    public var rows: Range<Int>?
    public var note: String?

    /// A number as the plan shows it: integers without a fraction (`2`, not `2.0`).
    public static func format(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? String(Int(value)) : String(value)
    }

    public init(
        target: String, rule: String, source: String, sourceTensors: [String], scaling: Double? = nil, rank: Int? = nil,
        weight: Double? = nil, rows: Range<Int>? = nil, note: String? = nil
    ) {
        self.target = target
        self.rule = rule
        self.source = source
        self.sourceTensors = sourceTensors
        self.scaling = scaling
        self.rank = rank
        self.weight = weight
        self.rows = rows
        self.note = note
    }
}

/// How a low-rank pair B·A lays out against the target weight.
enum LowRankLayout: String, Sendable {
    /// nn.Linear: W [out, in] += s·B[out, r]·A[r, in].
    case linear
    /// nn.Conv2d: A [r, Cin, kh, kw] is flattened to [r, Cin·kh·kw], B is [out, r, 1, 1].
    case conv
    /// nn.Embedding [num, dim] and fan_in_fan_out (Conv1D) weights [in, out]: W += s·(B·A)ᵀ.
    case transposed
}

/// One additive change to one target tensor; every change is relative to the *original* base value, so several
/// adapters combine as the exact weighted sum W + Σ wᵢ·ΔWᵢ whatever their order.
struct Contribution: Sendable {
    enum Delta: Sendable {
        /// ΔW = scaling · B·A (laid out per `layout`).
        case lowRank(a: TensorEntry, b: TensorEntry, layout: LowRankLayout, scaling: Double)
        /// ΔW = (m / ‖W + s·B·A‖) ⊙ (W + s·B·A) − W, the norm taken from the original W (PEFT's DoRA merge).
        case dora(a: TensorEntry, b: TensorEntry, magnitude: TensorEntry, layout: LowRankLayout, scaling: Double)
        /// Δb = scaling · v (a LoRA `lora_B.bias`).
        case scaledVector(TensorEntry, scaling: Double)
        /// ΔW = R − W: the adapter stores the trained tensor itself (modules_to_save, trained biases, BitFit).
        case replacement(TensorEntry)
        /// A delta computed from factors (FacT), already scaled; `rows` × the target's columns.
        case computed(description: String, @Sendable () throws(CkptError) -> FloatMatrix)
    }

    var delta: Delta
    var weight: Double
    var placement: TensorPlacement
    /// The only change to its target (set by the planner): a full-weight replacement or DoRA result is then
    /// stored directly instead of as W + (W' − W), which could differ from W' in the last bit.
    var isSole = false

    var needsOriginal: Bool {
        switch delta {
        case .dora, .replacement: true
        default: false
        }
    }
}

/// SSF folded into the op before it: the weight's output rows are scaled (`shift == nil`), the bias becomes
/// s ⊙ b + t. The same rule serves Linear/Conv (rows are output channels) and LayerNorm (γ, β).
struct ScaleShiftFold: Sendable {
    var scale: TensorEntry
    var shift: TensorEntry?
    var sourceRows: Range<Int>?
}

/// A tensor of the output: the base tensor (or a new one) and what happens to it.
struct PlannedTensor: Sendable {
    var name: String
    var shape: Shape
    var base: TensorEntry?
    var outputDType: DType
    var contributions: [Contribution] = []
    var folds: [ScaleShiftFold] = []

    var isUnchanged: Bool { contributions.isEmpty && folds.isEmpty && base != nil && base!.shape == shape }

    func outputTensor() throws(CkptError) -> OutputTensor {
        // Unchanged tensors stream through, rounded once (F64 directly); narrowing one to F16/BF16 first checks that
        // no finite value would overflow to Inf, as for merged tensors (existing NaN/Inf, e.g. masks, pass).
        if isUnchanged, let base {
            guard let overflow = Self.overflowThreshold(outputDType), base.dtype != outputDType, base.dtype.isConvertibleFloat else {
                return try OutputTensor.from(base, convertingTo: outputDType)
            }
            let converted = try OutputTensor.from(base, convertingTo: outputDType)
            let name = self.name, target = outputDType
            return try OutputTensor(name: name, dtype: target, shape: shape) { (sink: OutputTensor.Sink) throws(CkptError) in
                if let (index, value) = try base.firstFiniteValue(atLeast: overflow) {
                    throw CkptError(
                        .nonFinite, "value \(value) at flat index \(index) overflows \(target.name) (it would be written as ±Inf)", path: base.path,
                        tensor: name)
                }
                try converted.write(to: sink)
            }
        }
        let planned = self
        return try OutputTensor(name: name, dtype: outputDType, shape: shape) { (sink: OutputTensor.Sink) throws(CkptError) in
            let merged = try planned.materialize()
            try Self.emit(merged.values, as: planned.outputDType, tensor: planned.name, sink)
        }
    }

    /// The merged values in F32.
    func materialize() throws(CkptError) -> FloatMatrix {
        var merged: FloatMatrix
        if let base, base.shape == shape {
            merged = try base.floatMatrix()
        } else {
            merged = try .zeros(shape)
        }
        // Only replacements and DoRA read the original after changes begin; keep a copy just for them.
        let needsOriginal = contributions.contains(where: \.needsOriginal)
        if needsOriginal {
            try MemoryBudget.require(try CheckedSize.product([shape.elements, 4], "F32 copy"), for: "a second F32 copy of \(shape)", path: base?.path)
        }
        let original: FloatMatrix? = needsOriginal ? FloatMatrix(values: merged.values, shape: shape) : nil
        for contribution in contributions {
            do {
                try contribution.accumulate(into: &merged, original: original)
            } catch {
                throw error.at(tensor: name)
            }
        }
        for fold in folds {
            try fold.apply(to: &merged, tensor: name)
        }
        if let index = MergeKernels.firstNonFinite(merged.values) {
            throw CkptError(.nonFinite, "merged value at flat index \(index) is \(merged.values[index]); nothing was written", tensor: name)
        }
        // Values that round past the largest finite F16 (65504; Inf from 65520) or BF16 would be written as ±Inf.
        if let overflow = Self.overflowThreshold(outputDType), let index = merged.values.firstIndex(where: { abs($0) >= overflow }) {
            throw CkptError(
                .nonFinite, "merged value \(merged.values[index]) at flat index \(index) overflows \(outputDType.name) (it would be written as ±Inf); write F32",
                tensor: name)
        }
        return merged
    }

    /// The smallest magnitude that rounds to Inf in `dtype` (F16: 65520; BF16: just below F32's largest finite).
    static func overflowThreshold(_ dtype: DType) -> Float? {
        switch dtype {
        case .f16: 65520
        case .bf16: Float(bitPattern: 0x7F7F_8000)
        default: nil
        }
    }

    static func emit(_ values: [Float], as dtype: DType, tensor: String, _ sink: OutputTensor.Sink) throws(CkptError) {
        guard DTypeConversion.canConvert(from: .f32, to: dtype) else {
            throw CkptError(.unsupportedConversion, "cannot write a merged tensor as \(dtype.name)", tensor: tensor)
        }
        try values.span.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in
            try OutputTensor.writeConverted(raw, from: .f32, to: dtype, sink)
        }
    }
}

extension Contribution {
    /// Resolves the placement's row ranges against the source's logical row count and the target.
    func rowRanges(sourceRows count: Int, target: FloatMatrix) throws(CkptError) -> (source: Range<Int>, target: Range<Int>) {
        let source = placement.sourceRows ?? 0..<count
        let destination = placement.targetRows ?? 0..<target.rows
        guard source.lowerBound >= 0, source.upperBound <= count, destination.upperBound <= target.rows,
            source.count == destination.count
        else {
            throw CkptError(
                .shapeMismatch,
                "adapter rows \(source.lowerBound)..<\(source.upperBound) of \(count) do not fit rows \(destination.lowerBound)..<\(destination.upperBound) of the target \(target.shape)")
        }
        return (source, destination)
    }

    func accumulate(into merged: inout FloatMatrix, original: FloatMatrix?) throws(CkptError) {
        let w = weight
        switch delta {
        case .lowRank(let aEntry, let bEntry, let layout, let scaling):
            let (a, b) = try LowRankFactors.load(a: aEntry, b: bEntry, layout: layout, target: merged.shape)
            let (source, target) = try lowRankRows(layout: layout, b: b, target: merged)
            LowRankFactors.addProduct(a, b, layout: layout, sourceRows: source, alpha: Float(w * scaling), into: &merged.values, at: target.lowerBound * merged.columns, columns: merged.columns)
        case .dora(let aEntry, let bEntry, let magnitudeEntry, let layout, let scaling):
            try accumulateDoRA(
                into: &merged, original: original!, a: aEntry, b: bEntry, magnitude: magnitudeEntry, layout: layout, scaling: scaling)
        case .scaledVector(let entry, let scaling):
            let vector = try entry.floatMatrix()
            guard merged.columns == 1, vector.columns == 1 else {
                throw CkptError(.shapeMismatch, "'\(entry.name)' \(entry.shape) cannot be added to a tensor of shape \(merged.shape)")
            }
            let (source, target) = try rowRanges(sourceRows: vector.rows, target: merged)
            for (s, t) in zip(source, target) { merged.values[t] += Float(w * scaling * Double(vector.values[s])) }
        case .replacement(let entry):
            let replacement = try entry.floatMatrix()
            guard replacement.columns == merged.columns, placement.sourceRows != nil || placement.targetRows != nil || replacement.shape == merged.shape
            else {
                throw CkptError(.shapeMismatch, "replacement '\(entry.name)' has shape \(entry.shape), the target \(merged.shape)")
            }
            let (source, target) = try rowRanges(sourceRows: replacement.rows, target: merged)
            let columns = merged.columns
            for (s, t) in zip(source, target) {
                for c in 0..<columns {
                    let i = t * columns + c, value = replacement.values[s * columns + c]
                    if w == 1 && isSole {
                        merged.values[i] = value
                    } else {
                        merged.values[i] += Float(w * (Double(value) - Double(original!.values[i])))
                    }
                }
            }
        case .computed(let description, let compute):
            let delta = try compute()
            guard delta.columns == merged.columns else {
                throw CkptError(.shapeMismatch, "\(description) gives \(delta.shape), the target is \(merged.shape)")
            }
            let (source, target) = try rowRanges(sourceRows: delta.rows, target: merged)
            let columns = merged.columns
            for (s, t) in zip(source, target) {
                for c in 0..<columns { merged.values[t * columns + c] += Float(w) * delta.values[s * columns + c] }
            }
        }
    }

    /// The (source, target) rows a low-rank delta covers. A transposed delta's rows are input features, so it
    /// cannot be split over fused q/k/v rows.
    private func lowRankRows(layout: LowRankLayout, b: FloatMatrix, target: FloatMatrix) throws(CkptError) -> (Range<Int>, Range<Int>) {
        guard layout == .transposed else { return try rowRanges(sourceRows: b.rows, target: target) }
        guard placement.sourceRows == nil, placement.targetRows == nil else {
            throw CkptError(.notMergeable, "a transposed (embedding / fan_in_fan_out) LoRA cannot be split over fused rows")
        }
        return (0..<target.rows, 0..<target.rows)
    }

    /// DoRA: V = W + s·ΔW on the covered rows, then each output feature (a row; a column for transposed layouts)
    /// rescaled to the magnitude m: W' = (m / ‖V‖) ⊙ V.
    private func accumulateDoRA(
        into merged: inout FloatMatrix, original: FloatMatrix, a aEntry: TensorEntry, b bEntry: TensorEntry,
        magnitude magnitudeEntry: TensorEntry, layout: LowRankLayout, scaling: Double
    ) throws(CkptError) {
        let (a, b) = try LowRankFactors.load(a: aEntry, b: bEntry, layout: layout, target: original.shape)
        let magnitude = try magnitudeEntry.floatMatrix().values
        let (source, target) = try lowRankRows(layout: layout, b: b, target: original)
        let columns = original.columns, alongRows = layout != .transposed
        let features = alongRows ? b.rows : columns
        guard magnitude.count == features else {
            throw CkptError(
                .shapeMismatch, "DoRA magnitude '\(magnitudeEntry.name)' has \(magnitude.count) values for \(features) output features")
        }
        var v = Array(original.values[target.lowerBound * columns..<target.upperBound * columns])
        LowRankFactors.addProduct(a, b, layout: layout, sourceRows: source, alpha: Float(scaling), into: &v, at: 0, columns: columns)
        let norms = MergeKernels.norms(v, rows: target.count, columns: columns, alongRows: alongRows)
        for (k, (s, t)) in zip(source, target).enumerated() {
            for c in 0..<columns {
                let factor = alongRows ? Double(magnitude[s]) / norms[k] : Double(magnitude[c]) / norms[c]
                let rescaled = factor * Double(v[k * columns + c])
                let i = t * columns + c
                if weight == 1 && isSole {
                    merged.values[i] = Float(rescaled)
                } else {
                    merged.values[i] += Float(weight * (rescaled - Double(original.values[i])))
                }
            }
        }
    }
}

/// The two LoRA factors as matrices, checked against the target's shape.
enum LowRankFactors {
    static func load(a aEntry: TensorEntry, b bEntry: TensorEntry, layout: LowRankLayout, target: Shape) throws(CkptError) -> (
        a: FloatMatrix, b: FloatMatrix
    ) {
        try check(a: aEntry, b: bEntry, layout: layout, target: target)
        return (try aEntry.floatMatrix(), try bEntry.floatMatrix())
    }

    /// values[offset…] += alpha · ΔW for `sourceRows` of the delta, where ΔW = B·A (linear, conv) or (B·A)ᵀ
    /// (transposed, always whole), row-major with `columns` columns.
    static func addProduct(
        _ a: FloatMatrix, _ b: FloatMatrix, layout: LowRankLayout, sourceRows: Range<Int>, alpha: Float, into values: inout [Float], at offset: Int,
        columns: Int
    ) {
        let rank = a.rows
        a.values.withUnsafeBufferPointer { ap in
            b.values.withUnsafeBufferPointer { bp in
                values.withUnsafeMutableBufferPointer { c in
                    if layout == .transposed {
                        MergeKernels.addProduct(
                            into: c.baseAddress! + offset, rows: sourceRows.count, columns: columns, inner: rank, alpha: alpha, a: ap.baseAddress!,
                            lda: a.columns, transposeA: true, b: bp.baseAddress!, ldb: rank, transposeB: true, ldc: columns)
                    } else {
                        MergeKernels.addProduct(
                            into: c.baseAddress! + offset, rows: sourceRows.count, columns: columns, inner: rank, alpha: alpha,
                            a: bp.baseAddress! + sourceRows.lowerBound * rank, lda: rank, transposeA: false, b: ap.baseAddress!, ldb: columns,
                            transposeB: false, ldc: columns)
                    }
                }
            }
        }
    }

    /// Shape rules, checked when planning (so `--dry-run` catches them) and again before computing.
    static func check(a aEntry: TensorEntry, b bEntry: TensorEntry, layout: LowRankLayout, target: Shape) throws(CkptError) {
        let a = aEntry.shape, b = bEntry.shape
        func mismatch(_ rule: String) -> CkptError {
            CkptError(.shapeMismatch, "LoRA A \(a) and B \(b) do not fit the target \(target): \(rule)", path: aEntry.path, tensor: aEntry.name)
        }
        guard a.rank >= 2, b.rank >= 2, let rank = a.dims.first, rank > 0 else { throw mismatch("factors must be matrices") }
        // The products run through 32-bit BLAS sizes.
        guard (a.dims + b.dims + target.dims).allSatisfy({ $0 <= Int(Int32.max) }) else {
            throw CkptError(.tooLarge, "LoRA A \(a), B \(b), target \(target): a size over 2^31 − 1", path: aEntry.path, tensor: aEntry.name)
        }
        let aColumns = a.dims.dropFirst().reduce(1, *), bColumns = b.dims.dropFirst().reduce(1, *)
        if layout == .conv, target.rank == 4, a.rank == 4, a.dims[1] != target.dims[1] {
            throw CkptError(
                .notMergeable,
                "conv LoRA on a grouped convolution (groups = \(a.dims[1] / max(1, target.dims[1]))) cannot be merged; PEFT refuses it too",
                path: aEntry.path, tensor: aEntry.name)
        }
        guard bColumns == rank else { throw mismatch("B must have rank \(rank) columns") }
        switch layout {
        case .linear:
            // B's rows against the target's (whole, or a q/k/v slice) are checked with the placement.
            guard target.rank == 2, aColumns == target.dims[1] else { throw mismatch("A's input size must equal the weight's") }
        case .conv:
            guard b.rank == 4, b.dims[2] == 1, b.dims[3] == 1 else { throw mismatch("conv LoRA B must be a 1×1 kernel [out, r, 1, 1]") }
            guard target.rank == 4, a.rank == 4, Array(a.dims[2...]) == Array(target.dims[2...]) else {
                throw mismatch("conv LoRA A must have the weight's kernel size")
            }
        case .transposed:
            guard target.rank == 2, aColumns == target.dims[0], b.dims[0] == target.dims[1] else { throw mismatch("(B·A)ᵀ must have the weight's shape") }
        }
    }
}

extension ScaleShiftFold {
    func apply(to merged: inout FloatMatrix, tensor: String) throws(CkptError) {
        let scale = try self.scale.floatMatrix().values
        let shift = try self.shift?.floatMatrix().values
        let source = sourceRows ?? 0..<scale.count
        guard source.upperBound <= scale.count, source.count == merged.rows, shift == nil || shift!.count == scale.count else {
            throw CkptError(
                .shapeMismatch, "SSF '\(self.scale.name)' has \(scale.count) channels, the target \(merged.shape) has \(merged.rows)",
                tensor: tensor)
        }
        let columns = merged.columns
        for (row, s) in source.enumerated() {
            if let shift {
                guard columns == 1 else {
                    throw CkptError(.shapeMismatch, "SSF shift applies to a bias vector, not \(merged.shape)", tensor: tensor)
                }
                merged.values[row] = Float(Double(scale[s]) * Double(merged.values[row]) + Double(shift[s]))
            } else {
                for c in 0..<columns { merged.values[row * columns + c] *= scale[s] }
            }
        }
    }
}
