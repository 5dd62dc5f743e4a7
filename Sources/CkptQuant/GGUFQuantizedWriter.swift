import CkptCore
import CkptFormats
#if canImport(Glibc)
import Glibc
#endif

/// `ckpt quantize --format gguf`: Linear weights become ggml blocks made by ggml's reference quantizers
/// (GGMLQuants, bit-identical to ggml), every other tensor keeps its float type (F64 becomes F32). Quantizing happens
/// inside the writer, slice by slice on all cores; each slice is measured as it is encoded (the values a reader
/// dequantizes against the weights) to report the tensor's SQNR and largest error, and NaN/Inf weights are refused
/// on the way.
public enum GGUFQuantizedWriter {
    /// The block types ckpt can encode.
    public static let supportedTypes: [GGMLType] = [.q8_0, .q6_K, .q5_1, .q5_0, .q4_K, .q4_1, .q4_0]

    /// The 32-value block type a K-quant falls back to for a row that is not whole 256-value super-blocks (DINOv2-S's
    /// 384-wide layers, for instance). Same choice as llama.cpp's quantizer: Q4_K → Q5_0, Q6_K → Q8_0, never fewer bits.
    public static func fallback(for type: GGMLType) -> GGMLType? {
        switch type {
        case .q4_K: return .q5_0
        case .q6_K: return .q8_0
        default: return nil
        }
    }

    /// The smallest block any tensor is encoded with: the input size must be a multiple of it to be quantized.
    public static func minimumBlockSize(_ type: GGMLType) -> Int { fallback(for: type)?.blockSize ?? type.blockSize }

    /// The block type one tensor with `cols` inputs is written with.
    static func blockType(_ type: GGMLType, cols: Int) -> GGMLType {
        if cols % type.blockSize == 0 { return type }
        return fallback(for: type) ?? type
    }

    /// Writes the GGUF file; `config` (the input's config.json) adds the ViT hyper-parameters as `vit.*` keys.
    public static func write(
        _ checkpoint: Checkpoint, plan: [PlannedTensor], type: GGMLType, config: JSONValue?, to path: String, inputs: [FileIdentity]
    ) throws(CkptError) -> QuantizationReport {
        let measured = TensorMeasurements()
        var infos: [GGUF.OutputTensorInfo] = []
        var reports: [TensorReport] = []
        for item in plan {
            let entry = item.entry
            if item.isQuantized {
                let type = blockType(type, cols: item.cols)
                let info = try GGUF.OutputTensorInfo.encoding(entry, as: type) { (measurement: GGMLQuants.Measurement) in
                    measured.record(entry.name, sqnr: measurement.sqnr, maxError: measurement.maxError)
                }
                infos.append(info)
                reports.append(TensorReport(
                    name: entry.name, shape: entry.shape, scheme: type.name, bits: type.bits, groupSize: type.blockSize,
                    outputBytes: info.byteCount, elements: entry.shape.elements))
            } else {
                // F64 (a GGUF type, but one ggml's kernels do not compute with) and the floats GGUF has no type for
                // (the F8 formats) are kept as F32, exactly; other dtypes it lacks (unsigned integers, BOOL) are
                // refused, naming the file and tensor.
                let info: GGUF.OutputTensorInfo
                do {
                    if entry.dtype == .f64 || (GGMLType(plain: entry.dtype) == nil && entry.dtype.isConvertibleFloat) {
                        info = try GGUF.OutputTensorInfo(try OutputTensor.from(entry, convertingTo: .f32))
                    } else {
                        info = try GGUF.OutputTensorInfo(try OutputTensor.from(entry))
                    }
                } catch {
                    throw error.at(path: entry.path)
                }
                infos.append(info)
                reports.append(TensorReport(
                    name: entry.name, shape: entry.shape, keptReason: item.keptReason ?? "not quantized",
                    outputBytes: info.byteCount, elements: entry.shape.elements))
            }
        }
        var metadata = GGUF.defaultMetadata(architecture: checkpoint.metadata[GGUF.architectureKey] ?? GGUF.defaultArchitecture, tensors: infos)
        metadata += hyperParameters(config)
        try GGUF.write(tensors: infos, metadata: metadata, to: path, inputs: inputs)
        return QuantizationReport(tensors: reports, measured: measured, inputBytes: checkpoint.storedBytes)
    }

    /// ViT hyper-parameters from config.json as `vit.*` keys, so the file describes the model it holds.
    static func hyperParameters(_ config: JSONValue?) -> [GGUF.KeyValue] {
        guard let config else { return [] }
        var result: [GGUF.KeyValue] = []
        let integers = [
            ("hidden_size", "vit.embedding_length"), ("num_hidden_layers", "vit.block_count"),
            ("num_attention_heads", "vit.attention.head_count"), ("intermediate_size", "vit.feed_forward_length"),
            ("image_size", "vit.image_size"), ("patch_size", "vit.patch_size"),
        ]
        for (key, ggufKey) in integers {
            if let n = config[key]?.unsignedInteger, n <= UInt64(UInt32.max) { result.append(GGUF.KeyValue(ggufKey, .uint32(UInt32(n)))) }
        }
        if case .number(let text)? = config["layer_norm_eps"], let eps = Float(text) {
            result.append(GGUF.KeyValue("vit.attention.layer_norm_epsilon", .float32(eps)))
        }
        if case .string(let type)? = config["model_type"] { result.append(GGUF.KeyValue("vit.model_type", .string(type))) }
        return result
    }
}
