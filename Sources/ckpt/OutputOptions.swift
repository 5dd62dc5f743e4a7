import ArgumentParser
import CkptCore
import CkptFormats

/// Where and how a command writes a checkpoint: shared by `convert` and `merge`.
struct OutputOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Write floating tensors as this dtype: F32, F16, BF16 or F64 (rounded once, to nearest even).", valueName: "DTYPE"))
    var dtype: String?

    @Option(help: ArgumentHelp("Write Hugging Face shards of at most this size (e.g. 5GB, 500MB, 2GiB) into the OUT folder.", valueName: "SIZE"))
    var maxShardSize: String?

    @Flag(help: "Deflate .npz members (as np.savez_compressed); default is stored (as np.savez).")
    var compress = false

    enum Kind { case safetensors, sharded, npz, npy, gguf }

    /// The output format OUT names: its extension, or a folder (existing, ending in '/', or --max-shard-size).
    func kind(of output: String) throws -> Kind {
        let isDirectory = FileIdentity.of(output)?.isDirectory == true || output.hasSuffix("/")
        if isDirectory || maxShardSize != nil {
            guard FilePaths.fileExtension(of: output).isEmpty || isDirectory else {
                throw ValidationError("--max-shard-size writes a folder of shards; OUT '\(output)' looks like a file")
            }
            return .sharded
        }
        switch FilePaths.fileExtension(of: output) {
        case "safetensors": return .safetensors
        case "npz": return .npz
        case "npy": return .npy
        case "gguf": return .gguf
        case "": return .sharded
        default: throw ValidationError("cannot tell the output format from '\(output)': use .safetensors, .npz, .npy, .gguf or a folder")
        }
    }

    func targetDType() throws -> DType? {
        guard let dtype else { return nil }
        guard let value = DType(userName: dtype), DTypeConversion.targets.contains(value) else {
            throw ValidationError("--dtype \(dtype): choose F32, F16, BF16 or F64")
        }
        return value
    }

    func shardBytes() throws -> Int {
        guard let maxShardSize else { return 5_000_000_000 }
        guard let value = ByteCountFormat.parse(maxShardSize) else {
            throw ValidationError("--max-shard-size \(maxShardSize): expected a size such as 5GB, 500MB, 2GiB or a byte count")
        }
        return value
    }

    /// Flag checks that need OUT (call from the command's `validate`).
    func check(output: String) throws {
        let kind = try kind(of: output)
        _ = try targetDType()
        _ = try shardBytes()
        if compress && kind != .npz { throw ValidationError("--compress applies to .npz output only") }
        if kind == .gguf, let target = try targetDType(), GGMLType(plain: target) == nil {
            throw ValidationError("--dtype \(target.name) has no GGUF type: choose F32, F16, BF16 or F64")
        }
    }

    /// Writes `tensors` to `output` in the format it names, atomically, never over one of `inputs`.
    func write(
        _ tensors: [OutputTensor], metadata: [String: String], to output: String, inputs: [FileIdentity], label: String
    ) throws {
        let totalBytes = tensors.reduce(0) { $0 + $1.byteCount }
        let progress = ProgressReporter.forTerminal(label: label, totalBytes: totalBytes, totalTensors: tensors.count)
        switch try kind(of: output) {
        case .safetensors:
            try SafeTensors.write(tensors, metadata: metadata, to: output, inputs: inputs, progress: progress)
        case .sharded:
            try ShardedSafeTensors.write(tensors, metadata: metadata, to: output, maximumShardBytes: try shardBytes(), inputs: inputs, progress: progress)
        case .npz:
            if metadata.keys.contains(where: { $0 != "format" }) {
                printError("ckpt: note: .npz has no place for the input's __metadata__; it is not carried over")
            }
            try NPZ.write(tensors, to: output, compress: compress, inputs: inputs, progress: progress)
            // One note per dtype without a numpy equivalent, naming the first tensor and the count.
            let foreign = tensors.filter { !NumPy.hasNativeDescr($0.dtype) }
            for dtype in Set(foreign.map(\.dtype)).sorted(by: { $0.rawValue < $1.rawValue }) {
                let names = foreign.filter { $0.dtype == dtype }.map(\.name)
                let first = TerminalText.escaped(names[0])
                let which = names.count == 1 ? "'\(first)'" : "\(names.count) tensors ('\(first)', …)"
                printError("ckpt: note: \(which) (\(dtype.name)) stored with descr '\(try NumPy.descr(for: dtype))' and recorded in \(NPZ.dtypeManifestName); numpy users view them with ml_dtypes")
            }
        case .gguf:
            // Plain tensors only, names unchanged; the metadata is general.architecture ("vit" unless a GGUF input
            // named one) and general.file_type (see formats/gguf.md).
            let infos = try tensors.map { (tensor: OutputTensor) throws(CkptError) in
                do throws(CkptError) { return try GGUF.OutputTensorInfo(tensor) } catch { throw error.at(path: output) }
            }
            let architecture = metadata[GGUF.architectureKey] ?? GGUF.defaultArchitecture
            try GGUF.write(
                tensors: infos, metadata: GGUF.defaultMetadata(architecture: architecture, tensors: infos), to: output,
                inputs: inputs, progress: progress)
        case .npy:
            guard tensors.count == 1 else {
                throw CkptError(.invalidArgument, ".npy holds one array but the output has \(tensors.count) tensors; write .npz instead", path: output)
            }
            try NumPy.write(tensors[0], to: output, inputs: inputs, progress: progress)
            if !NumPy.hasNativeDescr(tensors[0].dtype) {
                printError("ckpt: note: \(tensors[0].dtype.name) has no numpy dtype: stored as '\(try NumPy.descr(for: tensors[0].dtype))'; read it back with --void-dtype \(tensors[0].dtype.name) (or .view(ml_dtypes) in numpy)")
            }
        }
    }
}
