import CkptCore
import CkptFormats

/// What to merge: a base checkpoint and the adapters to fold into it.
public struct MergeRequest: Sendable {
    public var base: Checkpoint
    public var loras: [PeftAdapter] = []
    /// SSF parameters in a file of their own (SSF parameters inside the base are always folded).
    public var ssf: Checkpoint?
    public var bitfit: Checkpoint?
    public var fact: Checkpoint?
    public var factScale: Double?
    /// Pass tensors of non-mergeable methods (prompts, adapters) through instead of refusing.
    public var keepUnmerged = false
    /// Output dtype for floating tensors; nil keeps each base tensor's dtype.
    public var outputDType: DType?

    public init(base: Checkpoint) { self.base = base }
}

/// The result of planning: every output tensor with the changes it receives, and the report.
public struct MergePlan: Sendable {
    public var entries: [MergePlanEntry]
    public var notes: [String]
    var tensors: [PlannedTensor]

    public var outputNames: [String] { tensors.map(\.name) }
    public var changedTensorCount: Int { tensors.filter { !$0.isUnchanged }.count }

    /// Streaming producers for the writers, in output order: each merged tensor is computed when written.
    public func outputTensors() throws(CkptError) -> [OutputTensor] {
        MergeKernels.useSingleThreadedBLAS()
        return try tensors.map { (tensor: PlannedTensor) throws(CkptError) in try tensor.outputTensor() }
    }
}

/// Builds a ``MergePlan``: matches every adapter tensor to base tensors, refuses what cannot be merged, and
/// records each change. Nothing is computed here; the arithmetic runs tensor by tensor while writing.
public struct MergePlanner {
    var request: MergeRequest
    var resolver: TensorNameResolver
    var tensors: [String: PlannedTensor] = [:]
    var baseOrder: [String] = []
    /// Tensors the merge creates, keyed by the tensor they follow in the output (nil: at the end).
    var createdAfter: [String: [String]] = [:]
    var appended: [String] = []
    var entries: [MergePlanEntry] = []
    var notes: [String] = []
    var unmatched: [(source: String, key: String, nearest: [String])] = []
    let newTensorDType: DType

    public static func plan(_ request: MergeRequest) throws(CkptError) -> MergePlan {
        var planner = try MergePlanner(request: request)
        try planner.planBase()
        for adapter in request.loras { try planner.planLoRA(adapter) }
        if let fact = request.fact { try planner.planFacT(fact) }
        if let bitfit = request.bitfit { try planner.planReplacements(from: bitfit, rule: "bitfit") }
        try planner.planSSF()
        try planner.reportUnmatched()
        return planner.finish()
    }

    init(request: MergeRequest) throws(CkptError) {
        self.request = request
        let regular = request.base.tensors.filter { !SSFRules.isParameter($0.name) && NonMergeable.method(of: $0.name) == nil }
        resolver = TensorNameResolver(regular.map { ($0.name, $0.shape) })
        // New tensors (a head the base lacks) take the base's most common floating dtype.
        var counts: [DType: Int] = [:]
        for entry in request.base.tensors where entry.dtype.isConvertibleFloat { counts[entry.dtype, default: 0] += 1 }
        newTensorDType = request.outputDType ?? counts.max { $0.value < $1.value || ($0.value == $1.value && $0.key.rawValue > $1.key.rawValue) }?.key ?? .f32
    }

    // MARK: Base

    mutating func planBase() throws(CkptError) {
        var refused: [String] = []
        for entry in request.base.tensors {
            if SSFRules.isParameter(entry.name) { continue }  // folded by planSSF
            if let method = NonMergeable.method(of: entry.name) {
                guard request.keepUnmerged else {
                    refused.append("\(entry.name) (\(method))")
                    continue
                }
                entries.append(MergePlanEntry(target: entry.name, rule: "keep-unmerged", source: request.base.path, sourceTensors: [entry.name], note: method))
            }
            tensors[entry.name] = PlannedTensor(name: entry.name, shape: entry.shape, base: entry, outputDType: outputDType(for: entry))
            baseOrder.append(entry.name)
        }
        if !refused.isEmpty { throw NonMergeable.refusal(refused, path: request.base.path) }
    }

    func outputDType(for entry: TensorEntry) -> DType {
        guard let target = request.outputDType, entry.dtype.isConvertibleFloat else { return entry.dtype }
        return target
    }

    // MARK: Shared helpers

    /// Adds `contribution` for every placement of `name`; false when nothing in the base matches.
    mutating func contribute(
        to name: String, _ delta: Contribution.Delta, weight: Double, entry: MergePlanEntry
    ) throws(CkptError) -> Bool {
        guard let placements = try resolver.resolve(name) else { return false }
        if case .replacement(let replacement) = delta, placements.count == 1, placements[0].sourceRows == nil,
            placements[0].targetRows == nil, let target = tensors[placements[0].target], replacement.shape != target.shape
        {
            // A trained head of another size (a different number of classes) replaces the base's; any other tensor
            // of another shape means the adapter was made for another model.
            guard Self.isHeadLike(target.name), target.contributions.isEmpty, target.folds.isEmpty else {
                throw CkptError(
                    .shapeMismatch, "'\(replacement.name)' \(replacement.shape) cannot replace '\(target.name)' \(target.shape): shapes differ",
                    path: entry.source, tensor: replacement.name)
            }
            guard weight == 1 else {
                throw CkptError(
                    .shapeMismatch, "'\(replacement.name)' \(replacement.shape) replaces '\(target.name)' \(target.shape); a weighted merge needs equal shapes",
                    path: entry.source, tensor: replacement.name)
            }
            tensors[target.name]!.shape = replacement.shape
            notes.append("'\(target.name)' is replaced by '\(replacement.name)' of another shape (\(target.shape) → \(replacement.shape))")
        }
        for placement in placements {
            let targetShape = tensors[placement.target]!.shape
            if case .replacement = delta, weight == 1 {
                // Two full replacements of the same rows (BitFit and a PEFT bias="all", say) cannot both hold.
                let rows = placement.targetRows ?? 0..<Int.max
                if let other = tensors[placement.target]!.contributions.first(where: { existing in
                    guard case .replacement = existing.delta, existing.weight == 1 else { return false }
                    return (existing.placement.targetRows ?? 0..<Int.max).overlaps(rows)
                }), case .replacement(let earlier) = other.delta {
                    throw CkptError(
                        .notMergeable, "'\(placement.target)' is replaced by both '\(earlier.name)' (\(earlier.path)) and this tensor; keep one",
                        path: entry.source, tensor: entry.sourceTensors.first)
                }
            }
            switch delta {
            case .lowRank(let a, let b, let layout, _), .dora(let a, let b, _, let layout, _):
                try LowRankFactors.check(a: a, b: b, layout: layout, target: targetShape)
                let rows = placement.sourceRows ?? 0..<(b.shape.dims.first ?? 0)
                let targetRows = placement.targetRows ?? 0..<(targetShape.dims.first ?? 0)
                guard layout == .transposed || (rows.upperBound <= (b.shape.dims.first ?? 0) && rows.count == targetRows.count) else {
                    throw CkptError(
                        .shapeMismatch, "LoRA B \(b.shape) gives \(b.shape.dims.first ?? 0) output rows; '\(placement.target)' \(targetShape) takes \(targetRows.count)",
                        path: b.path, tensor: b.name)
                }
            default:
                break
            }
            tensors[placement.target]!.contributions.append(Contribution(delta: delta, weight: weight, placement: placement))
            var line = entry
            line.target = placement.target
            line.rows = placement.targetRows
            if let rows = placement.sourceRows { line.note = [line.note, "adapter rows \(rows.lowerBound)..<\(rows.upperBound)"].compactMap { $0 }.joined(separator: "; ") }
            entries.append(line)
        }
        return true
    }

    /// A replacement whose target the base lacks becomes a new tensor when it is plausibly a new module (a
    /// classifier head, a modules_to_save module); otherwise it is unmatched.
    mutating func addNewTensor(_ entry: TensorEntry, as name: String, source: String, rule: String, note: String) {
        var planned = PlannedTensor(name: name, shape: entry.shape, base: nil, outputDType: request.outputDType ?? (entry.dtype.isConvertibleFloat ? newTensorDType : entry.dtype))
        planned.contributions.append(Contribution(delta: .replacement(entry), weight: 1, placement: TensorPlacement(target: name)))
        tensors[name] = planned
        appended.append(name)
        entries.append(MergePlanEntry(target: name, rule: rule, source: source, sourceTensors: [entry.name], note: note))
        notes.append("'\(name)' is new in the output (\(note))")
    }

    static let headModules = ["head", "classifier", "head_dist", "fc_norm", "pre_logits.fc", "pooler.dense", "score", "lm_head"]

    static func isHeadLike(_ name: String) -> Bool {
        let module = name.split(separator: ".").dropLast().joined(separator: ".")
        return headModules.contains { module == $0 || module.hasSuffix("." + $0) }
    }

    /// Full-tensor replacements (BitFit biases, trained heads in SSF/FacT files).
    mutating func planReplacements(from file: Checkpoint, rule: String, skip: (String) -> Bool = { _ in false }) throws(CkptError) {
        var refused: [String] = []
        for entry in file.tensors where !skip(entry.name) {
            if let method = NonMergeable.method(of: entry.name) {
                if request.keepUnmerged {
                    try keepUnmerged(entry, source: file.path, method: method)
                } else {
                    refused.append("\(entry.name) (\(method))")
                }
                continue
            }
            let name = Self.normalised(entry.name)
            let line = MergePlanEntry(target: name, rule: rule, source: file.path, sourceTensors: [entry.name])
            if try contribute(to: name, .replacement(entry), weight: 1, entry: line) { continue }
            if Self.isHeadLike(name) && tensors[name] == nil {
                addNewTensor(entry, as: name, source: file.path, rule: rule, note: "a trained head the base does not have")
            } else {
                unmatched.append((file.path, entry.name, resolver.nearestNames(to: name)))
            }
        }
        if !refused.isEmpty { throw NonMergeable.refusal(refused, path: file.path) }
    }

    mutating func keepUnmerged(_ entry: TensorEntry, source: String, method: String) throws(CkptError) {
        guard tensors[entry.name] == nil else {
            throw CkptError(.duplicateName, "--keep-unmerged: the output already has a tensor of this name", path: source, tensor: entry.name)
        }
        tensors[entry.name] = PlannedTensor(name: entry.name, shape: entry.shape, base: entry, outputDType: outputDType(for: entry))
        appended.append(entry.name)
        entries.append(MergePlanEntry(target: entry.name, rule: "keep-unmerged", source: source, sourceTensors: [entry.name], note: method))
    }

    /// Training-checkpoint prefixes (DataParallel, torch.compile) that never belong to the model's names.
    static func normalised(_ name: String) -> String {
        var name = name
        for prefix in ["module.", "_orig_mod."] where name.hasPrefix(prefix) { name.removeFirst(prefix.count) }
        return name
    }

    mutating func reportUnmatched() throws(CkptError) {
        guard let first = unmatched.first else { return }
        let lines = unmatched.prefix(8).map { "'\($0.key)' (nearest base tensors: \($0.nearest.joined(separator: ", ")))" }
        let more = unmatched.count > 8 ? "; and \(unmatched.count - 8) more" : ""
        throw CkptError(
            .unmatchedKey,
            "\(unmatched.count) adapter tensor(s) match no base tensor: \(lines.joined(separator: "; "))\(more). "
                + "Every adapter tensor must land somewhere; check that the adapter was trained on this base",
            path: first.source, tensor: first.key)
    }

    func finish() -> MergePlan {
        var ordered: [PlannedTensor] = []
        func emit(_ name: String) {
            var planned = tensors[name]!
            // A change is sole when no other change touches its rows (e.g. q, k and v biases replacing the three
            // row blocks of a fused qkv bias): it is then stored exactly rather than as W + (W' − W).
            let ranges = planned.contributions.map { $0.placement.targetRows ?? 0..<Int.max }
            for i in planned.contributions.indices {
                planned.contributions[i].isSole = !ranges.indices.contains { j in j != i && ranges[j].overlaps(ranges[i]) }
            }
            ordered.append(planned)
            for created in createdAfter[name] ?? [] { emit(created) }
        }
        for name in baseOrder { emit(name) }
        for name in appended { emit(name) }
        return MergePlan(entries: entries, notes: notes, tensors: ordered)
    }
}
