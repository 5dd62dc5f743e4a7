import CkptCore
import CkptFormats

/// Writes a weight + activation quantized model as a "dequantized" folder: `model.safetensors` with every tensor of
/// the input, those calibration changed (folded LayerNorms and biases, weights on their quantization grid) replaced
/// by their F32 values; the side file `activation_quantization.json` (``ActivationQuantization``); `config.json`
/// (the input's, or a minimal one) and the input's preprocessor config. Published together, atomically.
public enum ActivationQuantizedWriter {
    public static let sideFileName = "activation_quantization.json"

    /// Returns the bytes written for the model file's tensors (input bytes of unchanged tensors + 4 per changed value).
    @discardableResult
    public static func write(
        _ checkpoint: Checkpoint, changed: [String: [Float]], quantization: ActivationQuantization,
        to destination: QuantizedCheckpointWriter.Destination
    ) throws(CkptError) -> Int {
        var groups: [OutputTensorGroup] = []
        var bytes = 0
        var unused = Set(changed.keys)
        for entry in checkpoint.tensors {
            let tensor: OutputTensor
            if let values = changed[entry.name] {
                guard values.count == entry.shape.elements else {
                    throw CkptError(.shapeMismatch, "calibration changed \(values.count) values of a \(entry.shape) tensor", path: entry.path, tensor: entry.name)
                }
                unused.remove(entry.name)
                let raw = values.withUnsafeBytes { Array($0) }
                tensor = try OutputTensor.bytes(name: entry.name, dtype: .f32, shape: entry.shape, raw)
            } else {
                tensor = try OutputTensor.from(entry)
            }
            bytes += tensor.byteCount
            groups.append(OutputTensorGroup(tensor))
        }
        if let name = unused.sorted().first {
            throw CkptError(.missingTensor, "calibration changed a tensor the checkpoint does not hold", path: checkpoint.path, tensor: name)
        }
        var config: [(key: String, value: JSONValue)] = []
        if case .object(let base)? = destination.inputConfig { config = base.filter { $0.key != "ckpt_activation_quantization" } }
        config.append((key: "ckpt_activation_quantization", value: .string(sideFileName)))
        let metadata = checkpoint.format == .safetensors || checkpoint.format == .shardedSafetensors ? checkpoint.metadata : [:]
        try QuantizedCheckpointWriter.writeFolder(groups, metadata: metadata, config: .object(config),
            extraFiles: [(sideFileName, Array(quantization.serialized().utf8))], to: destination)
        return bytes
    }

    /// The side file of a model folder, if it has one.
    public static func sideFile(in folder: String) throws(CkptError) -> ActivationQuantization? {
        guard FileIdentity.of(folder)?.isDirectory == true else { return nil }
        let path = FilePaths.join(folder, sideFileName)
        guard FileIdentity.of(path) != nil else { return nil }
        let storage = try ByteStorage(mapping: path)
        guard let text = storage.withUnsafeBytes({ String(validating: $0, as: UTF8.self) }) else {
            throw CkptError(.invalidMetadata, "the side file is not UTF-8", path: path)
        }
        return try ActivationQuantization(parsing: text, path: path)
    }
}
