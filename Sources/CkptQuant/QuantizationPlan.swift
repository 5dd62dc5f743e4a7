import CkptCore
import CkptFormats

/// The deployable layouts `ckpt quantize` writes.
public enum QuantizedFormat: String, CaseIterable, Sendable {
    /// MLX's affine layout (`weight` uint32 + `scales` + `biases`), a model folder with config.json.
    case mlx
    /// GGUF v3 with ggml block types.
    case gguf
    /// compressed-tensors `pack-quantized`, a model folder with config.json.
    case compressedTensors = "compressed-tensors"
    /// Plain safetensors of the dequantized weights (any method, any loader).
    case dequantized
}

/// What happens to one tensor of the input.
public struct PlannedTensor: Sendable {
    public let entry: TensorEntry
    public let kind: TensorSelection.Kind?
    /// The matrix view `[rows, cols]` (conv weights flattened to `[out, in*kh*kw]`) when it is quantized.
    public let rows: Int
    public let cols: Int
    /// Why the tensor is written unquantized; nil when it is quantized.
    public let keptReason: String?

    public var isQuantized: Bool { keptReason == nil }
}

public enum QuantizationPlan {
    /// Decides, for every tensor, whether it is quantized. `blockSize` is the group size (or the ggml block)
    /// the input dimension must be a multiple of; nil for per-channel.
    public static func make(
        _ checkpoint: Checkpoint, selection: TensorSelection, format: QuantizedFormat, blockSize: Int?
    ) -> [PlannedTensor] {
        checkpoint.tensors.map { entry in
            let kind = TensorSelection.kind(of: entry)
            func kept(_ reason: String) -> PlannedTensor {
                PlannedTensor(entry: entry, kind: kind, rows: 0, cols: 0, keptReason: reason)
            }
            if let reason = selection.exclusion(entry) { return kept(reason) }
            let rows = entry.shape.dims[0]
            let cols = rows == 0 ? 0 : entry.shape.elements / rows
            if kind == .conv && format != .dequantized {
                // MLX nn.quantize, vLLM's compressed-tensors targets and llama.cpp's converters quantize Linear only.
                return kept("conv weight: \(format.rawValue) runtimes quantize Linear layers only")
            }
            // MLX and compressed-tensors store scales as siblings (`m.scales`, `m.weight_scale`); GGUF blocks and
            // dequantized values carry their own, so a fused `in_proj_weight` is quantized there.
            if (format == .mlx || format == .compressedTensors) && !entry.name.hasSuffix(".weight") {
                return kept("name does not end in '.weight', so it has no module to attach \(format.rawValue) scales to")
            }
            guard rows > 0, cols > 0 else { return kept("empty tensor") }
            if let blockSize, cols % blockSize != 0 {
                return kept("input size \(cols) is not a multiple of the group size \(blockSize)")
            }
            return PlannedTensor(entry: entry, kind: kind, rows: rows, cols: cols, keptReason: nil)
        }
    }

    /// Refuses a plan that cannot be written: one whose input is already quantized (its modules read back
    /// dequantized, so quantizing again would round twice and store F32 values where the input stored codes;
    /// mlx-lm refuses too), or one that quantizes nothing (a mistyped --only, a model without Linear weights, a
    /// group size no layer fits), whose output would be a copy that claims to be quantized. The error gives the
    /// commonest reasons.
    public static func requireQuantized(_ plan: [PlannedTensor], path: String) throws(CkptError) {
        let alreadyQuantized = plan.filter { $0.entry.quantization != nil }
        if let first = alreadyQuantized.first, let q = first.entry.quantization {
            throw CkptError(
                .invalidArgument,
                "the input is already quantized (\(alreadyQuantized.count) tensors, e.g. \(q.scheme) \(q.bits)-bit); quantize its float checkpoint, or dequantize it first with `ckpt convert IN plain.safetensors`",
                path: path, tensor: first.entry.name)
        }
        guard !plan.contains(where: \.isQuantized) else { return }
        var counts: [String: Int] = [:]
        for item in plan { counts[item.keptReason ?? "", default: 0] += 1 }
        let reasons = counts.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key < $1.key }.prefix(3)
            .map { "\($0.value) × \($0.key)" }.joined(separator: "; ")
        throw CkptError(.invalidArgument, "no tensor to quantize among \(plan.count) (\(reasons)); nothing written", path: path)
    }

    /// Decodes a planned tensor to F32 and rejects NaN/Inf, naming the tensor and the first bad element.
    public static func loadFinite(_ item: PlannedTensor, into buffer: UnsafeMutablePointer<Float>) throws(CkptError) {
        try item.entry.decodeFloats(into: buffer)
        let count = item.rows * item.cols
        for i in 0..<count where !buffer[i].isFinite {
            throw item.entry.nonFiniteError(element: i, value: buffer[i])
        }
    }
}
