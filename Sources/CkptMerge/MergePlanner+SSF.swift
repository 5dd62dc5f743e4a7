import CkptCore
import CkptFormats

/// SSF (Scaling & Shifting Features, dongzelian/SSF): `y = s ⊙ x + t` after chosen ops, named
/// `<owner>.ssf_scale_K` / `<owner>.ssf_shift_K`. The owner and K say which op precedes it.
enum SSFRules {
    static func isParameter(_ name: String) -> Bool {
        let last = name.split(separator: ".").last.map(String.init) ?? name
        return last.hasPrefix("ssf_scale_") || last.hasPrefix("ssf_shift_")
    }

    /// (owner path with trailing dot or "", K, isScale) for an SSF parameter name.
    static func split(_ name: String) -> (owner: String, index: Int, isScale: Bool)? {
        var parts = name.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        guard let last = parts.popLast() else { return nil }
        let isScale = last.hasPrefix("ssf_scale_")
        let digits = last.dropFirst(isScale ? "ssf_scale_".count : "ssf_shift_".count)
        guard let index = Int(digits), String(index) == digits else { return nil }
        return (parts.map { $0 + "." }.joined(), index, isScale)
    }

    /// The module whose output the SSF at `owner`/`index` scales, following the official insertion points:
    /// patch_embed (1: proj conv, 2: its norm), a block (1: norm1, 2: norm2), attn (1: qkv, 2: proj), mlp (1: fc1,
    /// 2: fc2), Swin's downsample (1: norm) and the model root (1: the final norm).
    static func precedingModule(owner: String, index: Int) -> String? {
        let parts = owner.split(separator: ".").map(String.init)
        let last = parts.last ?? ""
        let table: [String: [Int: String]] = [
            "attn": [1: "qkv", 2: "proj"], "mlp": [1: "fc1", 2: "fc2"], "patch_embed": [1: "proj", 2: "norm"], "downsample": [1: "norm"],
        ]
        if let row = table[last] { return row[index].map { owner + $0 } }
        if parts.count >= 2, parts[parts.count - 2] == "blocks", Int(last) != nil {
            return [1: "norm1", 2: "norm2"][index].map { owner + $0 }
        }
        if parts.isEmpty { return index == 1 ? "norm" : nil }
        return nil
    }
}

extension MergePlanner {
    /// Folds every SSF pair, from the base itself and from `--ssf`, into the op before it.
    mutating func planSSF() throws(CkptError) {
        var sources: [(entry: TensorEntry, path: String)] = request.base.tensors.filter { SSFRules.isParameter($0.name) }.map { ($0, request.base.path) }
        if let file = request.ssf {
            let inBase = Set(sources.map { MergePlanner.normalised($0.entry.name) })
            for entry in file.tensors where SSFRules.isParameter(entry.name) {
                guard !inBase.contains(Self.normalised(entry.name)) else {
                    throw CkptError(
                        .invalidArgument, "SSF parameter is both in the base and in --ssf; merge one of them", path: file.path, tensor: entry.name)
                }
                sources.append((entry, file.path))
            }
            try planReplacements(from: file, rule: "replace", skip: SSFRules.isParameter)
        }
        var pairs: [String: (scale: TensorEntry?, shift: TensorEntry?, path: String)] = [:]
        var order: [String] = []
        for (entry, path) in sources {
            let name = Self.normalised(entry.name)
            guard let (owner, index, isScale) = SSFRules.split(name) else {
                throw CkptError(.notMergeable, "'\(entry.name)' is not a recognised SSF parameter name (ssf_scale_K / ssf_shift_K)", path: path, tensor: entry.name)
            }
            let key = "\(owner)#\(index)"
            if pairs[key] == nil { order.append(key) }
            if isScale { pairs[key, default: (nil, nil, path)].scale = entry } else { pairs[key, default: (nil, nil, path)].shift = entry }
        }
        for key in order {
            let pair = pairs[key]!
            guard let scale = pair.scale, let shift = pair.shift else {
                let present = (pair.scale ?? pair.shift)!
                throw CkptError(.adapterConfig, "SSF needs both ssf_scale and ssf_shift; only '\(present.name)' is present", path: pair.path, tensor: present.name)
            }
            guard scale.shape.elements == shift.shape.elements, scale.shape.rank == 1 || scale.shape.dims.filter({ $0 != 1 }).count <= 1 else {
                throw CkptError(.shapeMismatch, "SSF scale \(scale.shape) and shift \(shift.shape) must be vectors of one size", path: pair.path, tensor: scale.name)
            }
            try planSSFPair(scale: scale, shift: shift, path: pair.path)
        }
    }

    private mutating func planSSFPair(scale: TensorEntry, shift: TensorEntry, path: String) throws(CkptError) {
        let (owner, index, _) = SSFRules.split(Self.normalised(scale.name))!
        guard let module = SSFRules.precedingModule(owner: owner, index: index) else {
            throw CkptError(
                .notMergeable,
                "SSF parameter '\(scale.name)' follows no op ckpt can fold it into (known insertion points: patch_embed, blocks.N, blocks.N.attn, blocks.N.mlp, the model root)",
                path: path, tensor: scale.name)
        }
        guard let placements = try resolver.resolve(module + ".weight") else {
            throw CkptError(
                .notMergeable,
                "SSF parameter '\(scale.name)' scales the output of '\(module)', which the base does not have (nothing foldable before it; "
                    + "e.g. a root SSF on a model whose final norm is Identity)",
                path: path, tensor: scale.name)
        }
        let biasPlacements = try resolver.resolve(module + ".bias")
        let channels = scale.shape.elements
        for placement in placements {
            let rows = tensors[placement.target]!.shape.dims.first ?? 1
            let used = placement.sourceRows ?? 0..<channels
            guard placement.targetRows == nil, used.upperBound <= channels, used.count == rows else {
                throw CkptError(
                    .shapeMismatch, "SSF '\(scale.name)' has \(channels) channels but '\(placement.target)' has \(rows) output channels",
                    path: path, tensor: scale.name)
            }
            tensors[placement.target]!.folds.append(ScaleShiftFold(scale: scale, shift: nil, sourceRows: placement.sourceRows))
            entries.append(
                MergePlanEntry(
                    target: placement.target, rule: "ssf", source: path, sourceTensors: [scale.name], rows: placement.targetRows,
                    note: "weight rows × scale"))
            // The bias that goes with this weight (resolved per placement: HF BEiT has no key bias): the base's, or a
            // new one (s ⊙ 0 + t) right after the weight.
            let biasTarget: String
            if let match = biasPlacements?.first(where: { $0.sourceRows == placement.sourceRows && $0.targetRows == nil }) {
                biasTarget = match.target
            } else {
                guard placement.target.hasSuffix(".weight") else {
                    throw CkptError(.notMergeable, "cannot name a bias for '\(placement.target)'", path: path, tensor: scale.name)
                }
                let stem = String(placement.target.dropLast("weight".count))
                biasTarget = stem + "bias"
                // BEiT/EVA keep the qkv bias as separate `q_bias`/`v_bias`: a new `qkv.bias` would not load and they
                // would stay unscaled.
                let parent = stem.dropLast().split(separator: ".").dropLast().map { $0 + "." }.joined()
                if let sibling = ["q_bias", "k_bias", "v_bias"].map({ parent + $0 }).first(where: { resolver.contains($0) }) {
                    throw CkptError(
                        .notMergeable, "SSF after '\(module)' needs its bias, but the base keeps it as '\(sibling)' (BEiT/EVA layout); not supported",
                        path: path, tensor: scale.name)
                }
                if tensors[biasTarget] == nil {
                    let rows = placement.sourceRows?.count ?? scale.shape.elements
                    let dtype = tensors[placement.target]!.outputDType
                    tensors[biasTarget] = PlannedTensor(name: biasTarget, shape: try Shape([rows]), base: nil, outputDType: dtype)
                    createdAfter[placement.target, default: []].append(biasTarget)
                    notes.append("'\(biasTarget)' is created: the SSF shift after '\(module)' needs a bias the base layer does not have")
                }
            }
            tensors[biasTarget]!.folds.append(ScaleShiftFold(scale: scale, shift: shift, sourceRows: placement.sourceRows))
            entries.append(
                MergePlanEntry(target: biasTarget, rule: "ssf", source: path, sourceTensors: [scale.name, shift.name], note: "bias = scale ⊙ bias + shift"))
        }
    }
}

/// Methods whose parameters add tokens or nonlinear branches: they cannot be folded into plain weights.
enum NonMergeable {
    static let markers: [(segment: String, exact: Bool, method: String)] = [
        ("prompt_embeddings", false, "VPT prompt tokens"), ("deep_prompt_embeddings", false, "VPT deep prompt tokens"),
        ("prompt_proj", true, "VPT prompt projection"), ("visual_prompt_token", false, "NOAH visual prompt tokens"),
        ("prefix_tokens_key", false, "prefix tuning"), ("prefix_tokens_value", false, "prefix tuning"),
        ("adapter_attn", true, "Convpass adapter"), ("adapter_mlp", true, "Convpass adapter"), ("adaptmlp", true, "AdaptFormer adapter"),
        ("adapter", true, "bottleneck adapter (Houlsby/NOAH)"), ("adapters", true, "bottleneck adapter (Houlsby)"),
        ("phm_rule", false, "KAdaptation"), ("q_proj_adapter1", false, "KAdaptation"), ("v_proj_adapter1", false, "KAdaptation"),
    ]

    /// The method a tensor belongs to, when it is one of the non-mergeable kinds.
    static func method(of name: String) -> String? {
        for part in name.split(separator: ".") {
            for marker in markers where marker.exact ? part == marker.segment : part.hasPrefix(marker.segment) {
                return marker.method
            }
        }
        return nil
    }

    static func refusal(_ tensors: [String], path: String) -> CkptError {
        CkptError(
            .notMergeable,
            "\(tensors.count) tensor(s) belong to methods that add tokens or nonlinear branches and cannot be folded into weights: "
                + tensors.prefix(8).joined(separator: ", ") + (tensors.count > 8 ? ", …" : "")
                + ". Pass --keep-unmerged to carry them into the output unchanged (the runtime must then apply them)",
            path: path, tensor: tensors.first.map { String($0.split(separator: " ").first!) })
    }
}
