import ArgumentParser
import CkptCore
import CkptFormats
import CkptMerge
import CkptSynthesis

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
            Output is written to a temporary file in the destination folder and renamed when complete. \
            With several inputs (`ckpt convert a.npz b.npz … all.npz`) convert merges `ckpt synthesize` shards: every \
            input must be a synthesize .npz with the same settings but for `shard`, and disjoint image indices; OUT \
            (.npz) holds their images sorted by global index, with `index`, the `loss_*` arrays and the settings \
            with `shard` "merged".
            """)

    @Argument(help: ArgumentHelp(
        "The input checkpoint (or several ckpt synthesize .npz shards to merge), then the output path; its extension (or being a folder) picks the format.",
        valueName: "path"))
    var paths: [String] = []

    /// The single input (the first of the merged ones).
    var input: String { paths.first ?? "" }
    /// The output path (the last argument).
    var output: String { paths.last ?? "" }
    /// Every input: all but the last argument.
    var inputs: [String] { Array(paths.dropLast()) }

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
        guard paths.count >= 2 else { throw ValidationError("convert needs an input and an output path (INPUT OUT, or several synthesize shards then OUT)") }
        if paths.count > 2 {
            // Several inputs: only the merge of ckpt synthesize shards.
            let rule = "with several inputs convert merges ckpt synthesize shards (.npz) into one .npz"
            guard FilePaths.fileExtension(of: output) == "npz" else { throw ValidationError("\(output): \(rule); OUT must be a .npz") }
            if let other = inputs.first(where: { FilePaths.fileExtension(of: $0) != "npz" }) {
                throw ValidationError("\(other): \(rule); every input must be a .npz written by ckpt synthesize")
            }
            if rename != nil || write.dtype != nil || write.maxShardSize != nil || !read.voidDTypes.isEmpty {
                throw ValidationError("--rename, --dtype, --max-shard-size and --void-dtype do not apply when merging synthesize shards (\(rule))")
            }
            if let repeated = inputs.first(where: { path in inputs.filter { $0 == path }.count > 1 }) {
                throw ValidationError("\(repeated): a shard is given twice")
            }
            if inputs.contains(output) { throw ValidationError("\(output): the output must not be one of the inputs") }
        }
        try write.check(output: output)
        _ = try renameTarget()
    }

    func run() throws {
        if paths.count > 2 {
            try SynthesisShardMerge.run(inputs: inputs, output: output, compress: write.compress)
            return
        }
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

/// `ckpt convert a.npz b.npz … all.npz`: the merge of `ckpt synthesize` shards into the file a full run writes.
///
/// Rules, checked for every input before anything is written (the first failure names its file and the rule):
/// - it is a synthesize output: it has a `synthesis` array (otherwise the command is misused: exit 64);
/// - `synthesis` is a UTF-8 JSON object with a string `shard`, and with `shard` removed it equals the first input's;
/// - `images` is F32 [n, C, S, S] with C and S the same in every input and S the settings' `image_size`; `index` is
///   I64 [n]; every `loss_<term>` of ``SynthesisLosses/names`` is F32 [n];
/// - every index lies in 0 ..< the settings' `images`, and no index appears twice (within or across inputs).
///
/// The output holds `images`, `index`, `synthesis` (the settings with `shard` "merged") and the loss arrays, in the
/// order synthesize writes them, with the images sorted by global index: merging every shard of a run gives the
/// full run's arrays bit for bit (its `synthesis` differs only in `shard`).
enum SynthesisShardMerge {
    struct Shard {
        let path: String
        let images: TensorEntry
        let losses: [TensorEntry]
        let indices: [Int]
        let settings: [(key: String, value: JSONValue)]
    }

    static func run(inputs: [String], output: String, compress: Bool) throws {
        var shards: [Shard] = []
        var notSynthesis: String? = nil
        try runReportingErrors {
            for path in inputs {
                let checkpoint = try Checkpoint.open(path)
                guard checkpoint.tensors.contains(where: { $0.name == "synthesis" }) else {
                    notSynthesis = path
                    return
                }
                shards.append(try read(checkpoint, path: path))
            }
        }
        if let path = notSynthesis {
            // Misuse, not a bad file: several inputs only ever mean a merge of synthesize shards.
            printError("ckpt: error: \(TerminalText.escaped(path)): not written by ckpt synthesize (no 'synthesis' array); "
                + "with several inputs convert only merges synthesize shards (ckpt convert a.npz b.npz … all.npz)")
            throw ExitCode.validationFailure
        }
        try runReportingErrors { try merge(shards, to: output, compress: compress) }
    }

    /// One input's arrays and settings, each checked on its own.
    static func read(_ checkpoint: Checkpoint, path: String) throws(CkptError) -> Shard {
        func entry(_ name: String) throws(CkptError) -> TensorEntry {
            guard let e = checkpoint.tensors.first(where: { $0.name == name }) else {
                throw CkptError(.missingTensor, "a synthesize shard needs the array '\(name)'", path: path)
            }
            return e
        }
        let synthesis = try entry("synthesis")
        guard synthesis.dtype == .u8, synthesis.shape.dims.count == 1 else {
            throw CkptError(.invalidData, "'synthesis' must be U8 [bytes] (the settings as UTF-8 JSON)", path: path, tensor: "synthesis")
        }
        let bytes = try synthesis.load()
        let json: JSONValue
        do throws(CkptError) { json = try bytes.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try JSONParser.parse(raw) } } catch {
            throw CkptError(.invalidData, "'synthesis' is not JSON: \(error.message)", path: path, tensor: "synthesis")
        }
        guard case .object(let members) = json, let shardField = json["shard"], case .string = shardField else {
            throw CkptError(.invalidData, "'synthesis' must be a JSON object with a string 'shard'", path: path, tensor: "synthesis")
        }
        let images = try entry("images")
        let dims = images.shape.dims
        guard images.dtype == .f32, dims.count == 4, dims[2] == dims[3] else {
            throw CkptError(.invalidData, "'images' must be F32 [N, C, S, S], found \(images.dtype.name) \(images.shape)", path: path, tensor: "images")
        }
        let count = dims[0]
        let index = try entry("index")
        guard index.dtype == .i64, index.shape.dims == [count] else {
            throw CkptError(.invalidData, "'index' must be I64 [\(count)] (one global index per image), found \(index.dtype.name) \(index.shape)",
                path: path, tensor: "index")
        }
        let indexBytes = try index.load()
        let indices = indexBytes.withUnsafeBytes { raw in (0..<count).map { Int(Int64(littleEndian: raw.loadUnaligned(fromByteOffset: 8 * $0, as: Int64.self))) } }
        var losses: [TensorEntry] = []
        for name in SynthesisLosses.names.map({ "loss_" + $0 }) {
            let e = try entry(name)
            guard e.dtype == .f32, e.shape.dims == [count] else {
                throw CkptError(.invalidData, "'\(name)' must be F32 [\(count)] (one value per image), found \(e.dtype.name) \(e.shape)", path: path, tensor: name)
            }
            losses.append(e)
        }
        return Shard(path: path, images: images, losses: losses, indices: indices, settings: members)
    }

    /// Checks the shards against each other, then writes the merged file.
    static func merge(_ shards: [Shard], to output: String, compress: Bool) throws(CkptError) {
        let first = shards[0]
        let reference = first.settings.filter { $0.key != "shard" }
        let total = (first.settings.first { $0.key == "images" }?.value).flatMap { $0.unsignedInteger }.map { Int(clamping: $0) }
        let size = (first.settings.first { $0.key == "image_size" }?.value).flatMap { $0.unsignedInteger }.map { Int(clamping: $0) }
        let imageDims = Array(first.images.shape.dims.dropFirst())
        var owner: [Int: String] = [:]
        for shard in shards {
            let settings = shard.settings.filter { $0.key != "shard" }
            if !(JSONValue.object(settings) == JSONValue.object(reference)) {
                let keys = (reference.map(\.key) + settings.map(\.key))
                let differing = keys.first { key in
                    settings.first(where: { $0.key == key })?.value != reference.first(where: { $0.key == key })?.value
                } ?? "(member order)"
                throw CkptError(.invalidData,
                    "settings differ from \(TerminalText.escaped(first.path))'s in '\(differing)': shards must share every setting but 'shard'", path: shard.path,
                    tensor: "synthesis")
            }
            guard Array(shard.images.shape.dims.dropFirst()) == imageDims, size == nil || imageDims[2] == size else {
                throw CkptError(.shapeMismatch,
                    "images are [C, S, S] = \(Array(shard.images.shape.dims.dropFirst())), not \(imageDims) as in \(TerminalText.escaped(first.path)) "
                        + "and the settings' image_size", path: shard.path, tensor: "images")
            }
            for i in shard.indices {
                guard i >= 0, total.map({ i < $0 }) ?? true else {
                    throw CkptError(.invalidData, "index \(i) is outside the run's \(total ?? 0) images", path: shard.path, tensor: "index")
                }
                if let other = owner[i] {
                    throw CkptError(.invalidData,
                        "image \(i) is also in \(other == shard.path ? "this file" : TerminalText.escaped(other)): shards must hold disjoint indices",
                        path: shard.path, tensor: "index")
                }
                owner[i] = shard.path
            }
        }
        // Sorted by global index: (shard, position) of each output image.
        var order: [(index: Int, shard: Int, position: Int)] = []
        for (s, shard) in shards.enumerated() {
            for (p, i) in shard.indices.enumerated() { order.append((i, s, p)) }
        }
        order.sort { $0.index < $1.index }
        let n = order.count
        let imageBytes = imageDims.reduce(4, *)
        let images = try shards.map { (shard: Shard) throws(CkptError) in try shard.images.load() }
        let sortedOrder = order
        var tensors: [OutputTensor] = []
        tensors.append(try OutputTensor(name: "images", dtype: .f32, shape: try Shape([n] + imageDims)) { (sink: OutputTensor.Sink) throws(CkptError) in
            for item in sortedOrder {
                try images[item.shard].withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in
                    try sink(UnsafeRawBufferPointer(rebasing: raw[(item.position * imageBytes)..<((item.position + 1) * imageBytes)]))
                }
            }
        })
        tensors.append(try OutputTensor.bytes(name: "index", dtype: .i64, shape: try Shape([n]),
            order.flatMap { item in withUnsafeBytes(of: Int64(item.index).littleEndian) { Array($0) } }))
        let merged = first.settings.map { $0.key == "shard" ? (key: $0.key, value: JSONValue.string("merged")) : $0 }
        let settingsText = JSONWriter.serialize(.object(merged), indent: 0)
        tensors.append(try OutputTensor.bytes(name: "synthesis", dtype: .u8, shape: try Shape([settingsText.utf8.count]), Array(settingsText.utf8)))
        for (t, name) in SynthesisLosses.names.enumerated() {
            let columns = try shards.map { (shard: Shard) throws(CkptError) in try shard.losses[t].load() }
            var bytes: [UInt8] = []
            bytes.reserveCapacity(4 * n)
            for item in order {
                columns[item.shard].withUnsafeBytes { raw in bytes += raw[(4 * item.position)..<(4 * item.position + 4)] }
            }
            tensors.append(try OutputTensor.bytes(name: "loss_" + name, dtype: .f32, shape: try Shape([n]), bytes))
        }
        let identities = shards.compactMap { FileIdentity.of($0.path) }
        try NPZ.write(tensors, to: output, compress: compress, inputs: identities)
        if let total, n < total {
            printError("ckpt: note: the merged shards hold \(n) of the run's \(total) images")
        }
        print("merged \(shards.count) synthesize shards (\(n) images) into \(TerminalText.escaped(output))")
    }
}
