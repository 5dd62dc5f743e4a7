import ArgumentParser
import CkptCore
import CkptFormats
import CkptMerge

struct ConvertCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "convert",
        abstract: "Convert between safetensors, sharded safetensors, .npz, .npy and GGUF, optionally changing float dtypes or ViT key naming.",
        discussion: """
            The output format follows OUT: '.safetensors', '.npz', '.npy' (single-tensor inputs), '.gguf' (GGUF v3, \
            tensors unquantized: F32/F16/BF16/F64/I8–I64, general.architecture 'vit'), or a folder \
            (existing, ending in '/', or given --max-shard-size) for Hugging Face shards. GGUF inputs are read with \
            quantized tensors (Q4_0…Q8_0, Q4_K, Q6_K) dequantized to F32. --dtype changes floating \
            tensors only (F64/F32/F16/BF16/F8 → target, rounded to nearest even); integers and booleans pass through. \
            --rename rewrites ViT keys between timm naming (blocks.N.attn.qkv, fused q/k/v) and Hugging Face naming \
            (encoder.layer.N.attention.attention.query/key/value), splitting or fusing q/k/v. \
            Output is written to a temporary file in the destination folder and renamed when complete.
            """)

    @Argument(help: "Input checkpoint.")
    var input: String

    @Argument(help: "Output path; its extension (or being a folder) picks the format.")
    var output: String

    @Option(help: ArgumentHelp("Rewrite ViT key names: timm-to-hf or hf-to-timm.", valueName: "MAPPING"))
    var rename: String?

    @OptionGroup var write: OutputOptions

    @OptionGroup var read: ReadOptions

    func renameTarget() throws -> ViTNamingScheme? {
        switch rename {
        case nil: return nil
        case "timm-to-hf": return .hf
        case "hf-to-timm": return .timm
        default: throw ValidationError("--rename \(rename!): choose timm-to-hf or hf-to-timm")
        }
    }

    func validate() throws {
        try write.check(output: output)
        _ = try renameTarget()
    }

    func run() throws {
        try runReportingErrors {
            let target = try write.targetDType()
            let checkpoint = try Checkpoint.open(input, options: try read.resolved())
            let inputs = checkpoint.files.compactMap(FileIdentity.of)
            // OutputFile refuses any output that is one of these files (sameInputOutput) before writing a byte.
            if let skipped = checkpoint.metadata["skipped_members"], checkpoint.format == .npz {
                printError("ckpt: note: \(TerminalText.escaped(input)): members that are not arrays were not converted: \(TerminalText.escaped(skipped))")
            }
            var tensors = try checkpoint.tensors.map { (entry: TensorEntry) throws(CkptError) in
                try OutputTensor.from(entry, convertingTo: target)
            }
            if let scheme = try renameTarget() {
                let renamed = try ViTRenamer.rename(checkpoint, to: scheme, dtype: target)
                tensors = renamed.tensors
                for note in renamed.notes { printError("ckpt: note: \(TerminalText.escaped(note))") }
            }
            // String metadata only travels between safetensors files (npy/npz have nowhere to keep it), and from a
            // GGUF input to a GGUF output, which keeps its general.architecture.
            let carriesMetadata = checkpoint.format == .safetensors || checkpoint.format == .shardedSafetensors
                || (checkpoint.format == .gguf && FilePaths.fileExtension(of: output) == "gguf")
            try write.write(tensors, metadata: carriesMetadata ? checkpoint.metadata : [:], to: output, inputs: inputs, label: "convert")
        }
    }
}
