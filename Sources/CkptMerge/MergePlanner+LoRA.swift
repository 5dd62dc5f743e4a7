import CkptCore
import CkptFormats

extension MergePlanner {
    /// One PEFT LoRA/DoRA adapter: low-rank deltas, `lora_B.bias` deltas, and full replacement tensors.
    mutating func planLoRA(_ adapter: PeftAdapter) throws(CkptError) {
        let config = adapter.config
        let source = adapter.folder
        var modules: [String: [PeftKey.LoRAPart: TensorEntry]] = [:]
        var moduleOrder: [String] = []
        var replacements: [(name: String, entry: TensorEntry)] = []
        var unsupported: [String] = []
        for entry in adapter.tensors.tensors {
            switch PeftKey.classify(entry.name) {
            case .lora(let module, let part):
                if modules[module] == nil { moduleOrder.append(module) }
                guard modules[module, default: [:]].updateValue(entry, forKey: part) == nil else {
                    throw CkptError(.adapterConfig, "LoRA module '\(module)' has two tensors for the same factor", path: source, tensor: entry.name)
                }
            case .replacement(let name):
                replacements.append((name, entry))
            case .ignored:
                continue
            case .unsupported(let kind):
                unsupported.append("\(entry.name) (\(kind))")
            }
        }
        if !unsupported.isEmpty {
            throw CkptError(
                .notMergeable,
                "the adapter holds tensors of PEFT methods ckpt does not merge (LoRA and DoRA only): \(unsupported.prefix(6).joined(separator: ", "))",
                path: source, tensor: unsupported.first)
        }
        for module in moduleOrder {
            try planLoRAModule(module, parts: modules[module]!, config: config, adapter: adapter)
        }
        // PEFT may save one trained tensor twice (bias="all" with modules_to_save writes `head.bias` and
        // `head.modules_to_save.bias`): identical copies count once, different ones are refused.
        var seen: [String: TensorEntry] = [:]
        var unique: [(name: String, entry: TensorEntry)] = []
        for (name, entry) in replacements {
            guard let first = seen[name] else {
                seen[name] = entry
                unique.append((name, entry))
                continue
            }
            let firstBytes = try first.load().withUnsafeBytes { Array($0) }
            let entryBytes = try entry.load().withUnsafeBytes { Array($0) }
            let same = first.shape == entry.shape && first.dtype == entry.dtype && firstBytes == entryBytes
            guard same else {
                throw CkptError(
                    .adapterConfig, "'\(first.name)' and '\(entry.name)' are both the trained '\(name)' but differ", path: source, tensor: entry.name)
            }
        }
        for (name, entry) in unique {
            let isModuleToSave = config.modulesToSave.contains { saved in
                let owner = name.split(separator: ".").dropLast().joined(separator: ".")
                return owner == saved || owner.hasSuffix("." + saved)
            }
            let rule = "replace"
            let note = isModuleToSave ? "modules_to_save" : (name.hasSuffix(".bias") ? "trained bias (bias=\(config.bias))" : "trained tensor")
            let line = MergePlanEntry(target: name, rule: rule, source: source, sourceTensors: [entry.name], weight: adapter.weight, note: note)
            if try contribute(to: name, .replacement(entry), weight: adapter.weight, entry: line) { continue }
            if (isModuleToSave || Self.isHeadLike(name)) && tensors[name] == nil {
                guard adapter.weight == 1 else {
                    throw CkptError(
                        .invalidArgument, "'\(name)' is new (the base has no such tensor), so it cannot be merged with weight \(adapter.weight)",
                        path: source, tensor: entry.name)
                }
                addNewTensor(entry, as: name, source: source, rule: rule, note: "\(note) the base does not have")
            } else {
                unmatched.append((source, entry.name, resolver.nearestNames(to: name)))
            }
        }
    }

    private mutating func planLoRAModule(
        _ module: String, parts: [PeftKey.LoRAPart: TensorEntry], config: PeftLoraConfig, adapter: PeftAdapter
    ) throws(CkptError) {
        let source = adapter.folder
        let isEmbedding = parts[.embeddingA] != nil || parts[.embeddingB] != nil
        guard let a = parts[isEmbedding ? .embeddingA : .a], let b = parts[isEmbedding ? .embeddingB : .b] else {
            let present = parts.values.map(\.name).sorted().joined(separator: ", ")
            throw CkptError(.adapterConfig, "LoRA module '\(module)' lacks its A or B factor (has \(present))", path: source)
        }
        guard a.shape.rank >= 2, b.shape.rank >= 2, let rank = a.shape.dims.first, rank > 0 else {
            throw CkptError(.shapeMismatch, "LoRA factors must be matrices (A \(a.shape), B \(b.shape))", path: source, tensor: a.name)
        }
        if let promised = try config.patternRank(module: module), promised != rank {
            throw CkptError(
                .adapterConfig, "rank_pattern gives rank \(promised) for '\(module)' but lora_A has \(rank) rows", path: adapter.configPath,
                tensor: a.name)
        }
        let (scaling, alpha) = try config.scaling(module: module, rank: rank)
        let weightName = module + ".weight"
        let layout: LowRankLayout
        if isEmbedding {
            layout = .transposed
        } else if a.shape.rank == 4 {
            layout = .conv
        } else if config.fanInFanOut, let target = try resolver.resolve(weightName)?.first, let shape = resolver.shape(of: target.target),
            shape.rank == 2, shape.dims[0] == a.shape.dims[1], shape.dims[1] == b.shape.dims[0]
        {
            // Stored [in, out] (transformers Conv1D). PEFT resets fan_in_fan_out for nn.Linear, so trust the shape.
            layout = .transposed
        } else {
            layout = .linear
        }
        guard config.useDoRA == (parts[.magnitude] != nil) else {
            throw CkptError(
                .adapterConfig,
                config.useDoRA
                    ? "use_dora is set but '\(module)' has no lora_magnitude_vector: merging it as plain LoRA would be wrong"
                    : "'\(module)' has a lora_magnitude_vector but use_dora is not set", path: adapter.configPath, tensor: a.name)
        }
        let rule: String
        let delta: Contribution.Delta
        if let magnitude = parts[.magnitude] {
            let outputs = b.shape.dims[0]  // B's rows: output features (embedding: the embedding dim)
            guard magnitude.shape.elements == outputs else {
                throw CkptError(
                    .shapeMismatch, "DoRA magnitude \(magnitude.shape) must hold one value per output feature (\(outputs))", path: source,
                    tensor: magnitude.name)
            }
            rule = "dora"
            delta = .dora(a: a, b: b, magnitude: magnitude, layout: layout, scaling: scaling)
        } else {
            rule = "lora"
            delta = .lowRank(a: a, b: b, layout: layout, scaling: scaling)
        }
        let line = MergePlanEntry(
            target: weightName, rule: rule, source: source, sourceTensors: [a.name, b.name] + (parts[.magnitude].map { [$0.name] } ?? []),
            scaling: scaling, rank: rank, weight: adapter.weight,
            note: "alpha \(MergePlanEntry.format(alpha))\(config.useRSLoRA ? ", rsLoRA" : "")\(layout == .linear ? "" : ", \(layout.rawValue)")")
        guard try contribute(to: weightName, delta, weight: adapter.weight, entry: line) else {
            unmatched.append((source, a.name, resolver.nearestNames(to: weightName)))
            return
        }
        if let bias = parts[.bBias] {
            let biasName = module + ".bias"
            let biasLine = MergePlanEntry(
                target: biasName, rule: "lora-bias", source: source, sourceTensors: [bias.name], scaling: scaling, rank: rank, weight: adapter.weight)
            guard try contribute(to: biasName, .scaledVector(bias, scaling: scaling), weight: adapter.weight, entry: biasLine) else {
                throw CkptError(
                    .notMergeable, "lora_bias is set but the base layer '\(module)' has no bias to add it to", path: source, tensor: bias.name)
            }
        }
    }
}
