import ArgumentParser
import CkptCore
import CkptFormats

struct ConvertCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "convert",
        abstract: "Convert between safetensors, sharded safetensors, .npz and .npy, optionally changing float dtypes.",
        discussion: """
            The output format follows OUT: '.safetensors', '.npz', '.npy' (single-tensor inputs), or a folder \
            (existing, ending in '/', or given --max-shard-size) for Hugging Face shards. --dtype changes floating \
            tensors only (F64/F32/F16/BF16/F8 → target, rounded to nearest even); integers and booleans pass through. \
            Output is written to a temporary file in the destination folder and renamed when complete.
            """)

    @Argument(help: "Input checkpoint.")
    var input: String

    @Argument(help: "Output path; its extension (or being a folder) picks the format.")
    var output: String

    @Option(help: ArgumentHelp("Convert floating tensors to this dtype: F32, F16, BF16 or F64.", valueName: "DTYPE"))
    var dtype: String?

    @Option(help: ArgumentHelp("Write Hugging Face shards of at most this size (e.g. 5GB, 500MB, 2GiB) into the OUT folder.", valueName: "SIZE"))
    var maxShardSize: String?

    @Flag(help: "Deflate .npz members (as np.savez_compressed); default is stored (as np.savez).")
    var compress = false

    @OptionGroup var read: ReadOptions

    enum OutputKind { case safetensors, sharded, npz, npy }

    func outputKind() throws -> OutputKind {
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
        case "": return .sharded
        default: throw ValidationError("cannot tell the output format from '\(output)': use .safetensors, .npz, .npy or a folder")
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

    func validate() throws {
        let kind = try outputKind()
        _ = try targetDType()
        _ = try shardBytes()
        if compress && kind != .npz { throw ValidationError("--compress applies to .npz output only") }
    }

    func run() throws {
        try runReportingErrors {
            let kind = try outputKind()
            let target = try targetDType()
            let checkpoint = try Checkpoint.open(input, options: try read.resolved())
            let inputs = checkpoint.files.compactMap(FileIdentity.of)
            // OutputFile refuses any output that is one of these files (sameInputOutput) before writing a byte.
            if let skipped = checkpoint.metadata["skipped_members"], checkpoint.format == .npz {
                printError("ckpt: note: \(input): members that are not arrays were not converted: \(skipped)")
            }
            let tensors = try checkpoint.tensors.map { (entry: TensorEntry) throws(CkptError) in
                try OutputTensor.from(entry, convertingTo: target)
            }
            let totalBytes = tensors.reduce(0) { $0 + $1.byteCount }
            let progress = ProgressReporter.forTerminal(label: "convert", totalBytes: totalBytes, totalTensors: tensors.count)
            // String metadata only travels between safetensors files; npy/npz have nowhere to keep it.
            let carriesMetadata = checkpoint.format == .safetensors || checkpoint.format == .shardedSafetensors
            let metadata = carriesMetadata ? checkpoint.metadata : [:]
            switch kind {
            case .safetensors:
                try SafeTensors.write(tensors, metadata: metadata, to: output, inputs: inputs, progress: progress)
            case .sharded:
                try ShardedSafeTensors.write(
                    tensors, metadata: metadata, to: output, maximumShardBytes: try shardBytes(), inputs: inputs, progress: progress)
            case .npz:
                if carriesMetadata && checkpoint.metadata.keys.contains(where: { $0 != "format" }) {
                    printError("ckpt: note: .npz has no place for the input's __metadata__; it is not carried over")
                }
                try NPZ.write(tensors, to: output, compress: compress, inputs: inputs, progress: progress)
                for t in tensors where !NumPy.hasNativeDescr(t.dtype) {
                    printError("ckpt: note: '\(t.name)' (\(t.dtype.name)) is stored with descr '\(try NumPy.descr(for: t.dtype))' and recorded in \(NPZ.dtypeManifestName); numpy users view it with ml_dtypes")
                }
            case .npy:
                guard tensors.count == 1 else {
                    throw CkptError(.invalidArgument, ".npy holds one array but the input has \(tensors.count) tensors; write .npz instead", path: output)
                }
                try NumPy.write(tensors[0], to: output, inputs: inputs, progress: progress)
                if !NumPy.hasNativeDescr(tensors[0].dtype) {
                    printError("ckpt: note: \(tensors[0].dtype.name) has no numpy dtype: stored as '\(try NumPy.descr(for: tensors[0].dtype))'; read it back with --void-dtype \(tensors[0].dtype.name) (or .view(ml_dtypes) in numpy)")
                }
            }
        }
    }
}
