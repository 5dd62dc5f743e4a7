import CkptCore

/// Where one adapter-side tensor lands in the base: a base tensor, and optionally which rows of the adapter's
/// logical output (`sourceRows`) go to which rows of the base tensor (`targetRows`). Row slices appear when one
/// side fuses q/k/v (timm `attn.qkv`, rows [q; k; v]) and the other keeps them separate.
public struct TensorPlacement: Hashable, Sendable {
    public var target: String
    public var sourceRows: Range<Int>?
    public var targetRows: Range<Int>?

    public init(target: String, sourceRows: Range<Int>? = nil, targetRows: Range<Int>? = nil) {
        self.target = target
        self.sourceRows = sourceRows
        self.targetRows = targetRows
    }
}

/// Finds base tensors for names written against another naming: exact name first, then the same name under a
/// different prefix (`backbone.`, `vit.`), then the scheme-free ViT identity (timm ⇄ HF v4 ⇄ HF v5, fused ⇄
/// separate q/k/v). Anything else is unmatched: callers report it with ``nearestNames(to:)``.
public struct TensorNameResolver: Sendable {
    public let names: [String]
    private let shapes: [String: Shape]
    private let byKey: [ViTName.Key: [(prefix: String, name: String)]]

    public init(_ tensors: [(name: String, shape: Shape)]) {
        names = tensors.map(\.name)
        var shapes: [String: Shape] = [:]
        var byKey: [ViTName.Key: [(prefix: String, name: String)]] = [:]
        for tensor in tensors {
            shapes[tensor.name] = tensor.shape
            if let parsed = ViTName.parse(tensor.name) {
                byKey[parsed.key, default: []].append((parsed.prefix, tensor.name))
            }
        }
        self.shapes = shapes
        self.byKey = byKey
    }

    public func shape(of name: String) -> Shape? { shapes[name] }
    public func contains(_ name: String) -> Bool { shapes[name] != nil }

    /// The placements of `name`, or nil when nothing in the base corresponds. Throws when the name is ambiguous.
    public func resolve(_ name: String) throws(CkptError) -> [TensorPlacement]? {
        if shapes[name] != nil { return [TensorPlacement(target: name)] }
        // Same module under a model-wrapper prefix (`backbone.x` for `x`, or the other way round). Only known wrapper
        // segments may differ, so `patch_embed.norm.weight` never lands on the top-level `norm.weight`.
        let suffixMatches = names.filter { Self.differsByWrapperPrefix($0, name) || Self.differsByWrapperPrefix(name, $0) }
        if suffixMatches.count == 1 { return [TensorPlacement(target: suffixMatches[0])] }
        if suffixMatches.count > 1 {
            throw CkptError(.unmatchedKey, "'\(name)' matches several base tensors: \(suffixMatches.prefix(4).joined(separator: ", "))", tensor: name)
        }
        guard let parsed = ViTName.parse(name) else { return nil }
        let parameter = parsed.parameter
        func unique(_ role: ViTName.Role) throws(CkptError) -> String? {
            guard let candidates = byKey[ViTName.Key(role: role, parameter: parameter)], !candidates.isEmpty else { return nil }
            if let same = candidates.first(where: { $0.prefix == parsed.prefix }) { return same.name }
            // Another prefix only when both are model wrappers (`backbone.` vs none): `text_model.` never lands on
            // `vision_model.`.
            let compatible = candidates.filter { ViTName.isWrapperPrefix($0.prefix) && ViTName.isWrapperPrefix(parsed.prefix) }
            if compatible.isEmpty { return nil }
            if compatible.count == 1 { return compatible[0].name }
            throw CkptError(
                .unmatchedKey, "'\(name)' could be any of \(compatible.map(\.name).joined(separator: ", ")) (several models in one base?)",
                tensor: name)
        }
        switch parsed.role {
        case .query(let i), .key(let i), .value(let i):
            if let direct = try unique(parsed.role) { return [TensorPlacement(target: direct)] }
            guard let fused = try unique(.qkv(i)), let rows = shapes[fused]?.dims.first, rows % 3 == 0 else { return nil }
            let width = rows / 3
            let part: Int = if case .query = parsed.role { 0 } else if case .key = parsed.role { 1 } else { 2 }
            return [TensorPlacement(target: fused, targetRows: part * width..<(part + 1) * width)]
        case .qkv(let i):
            if let direct = try unique(parsed.role) { return [TensorPlacement(target: direct)] }
            guard let q = try unique(.query(i)), let k = try unique(.key(i)), let v = try unique(.value(i)),
                let width = shapes[q]?.dims.first, shapes[k]?.dims.first == width, shapes[v]?.dims.first == width
            else { return nil }
            return [
                TensorPlacement(target: q, sourceRows: 0..<width), TensorPlacement(target: k, sourceRows: width..<2 * width),
                TensorPlacement(target: v, sourceRows: 2 * width..<3 * width),
            ]
        default:
            return try unique(parsed.role).map { [TensorPlacement(target: $0)] }
        }
    }

    /// True when `longer` is `shorter` under one or more wrapper segments.
    static func differsByWrapperPrefix(_ longer: String, _ shorter: String) -> Bool {
        guard longer.count > shorter.count, longer.hasSuffix("." + shorter) else { return false }
        let prefix = longer.dropLast(shorter.count + 1)
        return ViTName.isWrapperPrefix(String(prefix))
    }

    /// Up to `count` base names closest to `name` (edit distance), for "did you mean" messages.
    public func nearestNames(to name: String, count: Int = 3) -> [String] {
        let query = Array(name.utf8)
        let scored: [(name: String, distance: Int)] = names.map { candidate in (candidate, Self.editDistance(query, Array(candidate.utf8))) }
        let sorted = scored.sorted { lhs, rhs in lhs.distance != rhs.distance ? lhs.distance < rhs.distance : lhs.name < rhs.name }
        return sorted.prefix(count).map { $0.name }
    }

    static func editDistance(_ a: [UInt8], _ b: [UInt8]) -> Int {
        if a.isEmpty { return b.count }
        var previous = Array(0...b.count), current = [Int](repeating: 0, count: b.count + 1)
        for i in 1...a.count {
            current[0] = i
            for j in 1...max(1, b.count) where j <= b.count {
                current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            swap(&previous, &current)
        }
        return previous[b.count]
    }
}
