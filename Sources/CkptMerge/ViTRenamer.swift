import CkptCore
import CkptFormats

/// `convert --rename`: rewrites a ViT checkpoint's keys into timm or Hugging Face naming, fusing q/k/v into timm's
/// `attn.qkv` (rows [q; k; v]) or splitting it. The model's prefix (`backbone.`, `vit.`) is dropped from every tensor
/// that has it; tensors that are not recognised ViT tensors otherwise keep their names. HF names are written as a
/// bare model's (`ViTModel`/`Dinov2Model`: no `vit.` prefix; the timm `head` becomes `classifier`).
public enum ViTRenamer {
    public static func rename(_ checkpoint: Checkpoint, to scheme: ViTNamingScheme, dtype: DType?) throws(CkptError) -> (
        tensors: [OutputTensor], notes: [String]
    ) {
        let parsed = checkpoint.tensors.map { ViTName.parse($0.name) }
        let dinov2 = parsed.contains { name in
            if case .layerScale1? = name?.role { return true }
            return false
        }
        var byKey: [ViTName.Key: TensorEntry] = [:]
        for (entry, name) in zip(checkpoint.tensors, parsed) {
            guard let name else { continue }
            if byKey.updateValue(entry, forKey: name.key) != nil {
                throw CkptError(
                    .duplicateName, "two tensors mean the same ViT parameter (\(name.role)); the checkpoint holds several models",
                    path: checkpoint.path, tensor: entry.name)
            }
        }
        var output: [OutputTensor] = []
        var unrecognised: [String] = []
        var seen = Set<String>()
        func append(_ tensor: OutputTensor) throws(CkptError) {
            guard seen.insert(tensor.name).inserted else {
                throw CkptError(.duplicateName, "renaming produces '\(tensor.name)' twice", path: checkpoint.path, tensor: tensor.name)
            }
            output.append(tensor)
        }
        // The model's prefix (`backbone.`, `vit.`) goes from every tensor that carries it, recognised or not.
        let prefixes = Set(parsed.compactMap { $0?.prefix })
        let modelPrefix = prefixes.count == 1 ? prefixes.first! : ""
        for (entry, name) in zip(checkpoint.tensors, parsed) {
            guard let name else {
                unrecognised.append(entry.name)
                let source = try OutputTensor.from(entry, convertingTo: dtype)
                let keepsPrefix = modelPrefix.isEmpty || !entry.name.hasPrefix(modelPrefix)
                try append(keepsPrefix ? source : try source.renamed(String(entry.name.dropFirst(modelPrefix.count))))
                continue
            }
            let outputType = dtype != nil && entry.dtype.isConvertibleFloat ? dtype! : entry.dtype
            switch (scheme, name.role) {
            case (.timm, .query(let layer)):
                // Fuse at the query's position; key and value are consumed here.
                guard let k = byKey[ViTName.Key(role: .key(layer), parameter: name.parameter)],
                    let v = byKey[ViTName.Key(role: .value(layer), parameter: name.parameter)],
                    k.dtype == entry.dtype, v.dtype == entry.dtype, k.shape == entry.shape, v.shape == entry.shape,
                    entry.shape.rank >= 1
                else {
                    throw CkptError(
                        .invalidArgument, "timm fuses q, k and v into attn.qkv, but the matching key/value tensor is missing or differs (or q is a scalar)",
                        path: checkpoint.path, tensor: entry.name)
                }
                var dims = entry.shape.dims
                dims[0] = entry.shape.dims[0] + k.shape.dims[0] + v.shape.dims[0]
                let target = scheme.name(.qkv(layer), name.parameter, dinov2: dinov2, prefix: "")
                try append(
                    try OutputTensor(name: target, dtype: outputType, shape: try Shape(dims)) { (sink: OutputTensor.Sink) throws(CkptError) in
                        for part in [entry, k, v] { try OutputTensor.from(part, convertingTo: dtype).write(to: sink) }
                    })
            case (.timm, .key(let layer)), (.timm, .value(let layer)):
                guard byKey[ViTName.Key(role: .query(layer), parameter: name.parameter)] != nil else {
                    throw CkptError(
                        .invalidArgument, "timm fuses q, k and v into attn.qkv, but block \(layer) has no query \(name.parameter.rawValue)",
                        path: checkpoint.path, tensor: entry.name)
                }
                continue
            case (.hf, .qkv(let layer)):
                guard let rows = entry.shape.dims.first, rows > 0, rows % 3 == 0 else {
                    throw CkptError(.shapeMismatch, "attn.qkv must have 3·D rows to split into q, k, v", path: checkpoint.path, tensor: entry.name)
                }
                let width = rows / 3
                var dims = entry.shape.dims
                dims[0] = width
                for (part, role) in [ViTName.Role.query(layer), .key(layer), .value(layer)].enumerated() {
                    let range = part * width..<(part + 1) * width
                    try append(
                        try OutputTensor(name: scheme.name(role, name.parameter, dinov2: dinov2, prefix: ""), dtype: outputType, shape: try Shape(dims)) {
                            (sink: OutputTensor.Sink) throws(CkptError) in try stream(entry, rows: range, as: outputType, sink)
                        })
                }
            default:
                let target = scheme.name(name.role, name.parameter, dinov2: dinov2, prefix: "")
                try append(try OutputTensor.from(entry, convertingTo: dtype).renamed(target))
            }
        }
        var notes: [String] = []
        if !unrecognised.isEmpty {
            notes.append(
                "\(unrecognised.count) tensor(s) are not ViT tensors ckpt knows and keep their names\(modelPrefix.isEmpty ? "" : " (less the '\(modelPrefix)' prefix)"): \(unrecognised.prefix(5).joined(separator: ", "))\(unrecognised.count > 5 ? ", …" : "")")
        }
        return (output, notes)
    }

    /// Streams `rows` of `entry`, converted to `dtype`.
    static func stream(_ entry: TensorEntry, rows: Range<Int>, as dtype: DType, _ sink: OutputTensor.Sink) throws(CkptError) {
        let bytes = try entry.load()
        let rowBytes = entry.byteCount / entry.shape.dims[0]
        let range = rows.lowerBound * rowBytes..<rows.upperBound * rowBytes
        try bytes.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in
            try OutputTensor.writeConverted(UnsafeRawBufferPointer(rebasing: raw[range]), from: entry.dtype, to: dtype, sink)
        }
        bytes.doneReading()
    }
}
