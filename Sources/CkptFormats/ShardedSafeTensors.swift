import CkptCore

/// Hugging Face sharded checkpoints: `model-00001-of-0000N.safetensors` files plus `model.safetensors.index.json`
/// (`{"metadata": {"total_size": …}, "weight_map": {tensor: shard}}`), read and written as one checkpoint.
public enum ShardedSafeTensors {
    public static let indexName = "model.safetensors.index.json"
    /// Bound on the index file we are willing to parse.
    static let maximumIndexSize = 256 << 20

    /// Opens a sharded checkpoint from its index file, or from a directory holding one. A directory with a single
    /// `*.safetensors` and no index (what HF writes when everything fits one shard) is read as that file.
    public static func read(_ path: String) throws(CkptError) -> Checkpoint {
        var indexPath = path
        if FileIdentity.of(path)?.isDirectory == true {
            let names = try FilePaths.contents(of: path)
            let indexes = names.filter { $0.hasSuffix(".safetensors.index.json") }
            if indexes.count == 1 {
                indexPath = FilePaths.join(path, indexes[0])
            } else if indexes.count > 1 {
                throw CkptError(.shardIndex, "directory holds several index files (\(indexes.joined(separator: ", "))); name one", path: path)
            } else {
                let files = names.filter { $0.hasSuffix(".safetensors") }
                guard files.count == 1 else {
                    throw CkptError(.shardIndex, "directory holds no *.safetensors.index.json and \(files.count) safetensors files", path: path)
                }
                let single = try Checkpoint.open(FilePaths.join(path, files[0]))
                return single
            }
        }
        let storage = try ByteStorage(mapping: indexPath)
        guard storage.count <= maximumIndexSize else {
            throw CkptError(.tooLarge, "index file is larger than \(maximumIndexSize) bytes", path: indexPath)
        }
        let json: JSONValue
        do {
            json = try storage.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in
                guard SafeTensors.validUTF8(raw) else { throw CkptError(.invalidUTF8, "index is not valid UTF-8") }
                return try JSONParser.parse(raw)
            }
        } catch {
            throw error.at(path: indexPath)
        }
        let index = try ConfigObject(file: json, path: indexPath, code: .shardIndex, name: "the index")
        if let key = json.repeatedKey {
            throw CkptError(.shardIndex, "key '\(key)' appears twice in the index", path: indexPath)
        }
        guard let weightMap = try index.object("weight_map") else { throw index.error("weight_map", "is missing (an object of tensor → shard file)") }
        // metadata.total_size is informational (loaders ignore it, and producers that count shared storage once
        // legitimately disagree with the sum of tensor bytes), but a present value must have its type.
        if let metadata = try index.object("metadata", nullable: true) {
            _ = try metadata.number("total_size", in: 0...Double.greatestFiniteMagnitude, nullable: true)
        }
        var shardOf: [NameKey: String] = [:]
        var shardOrder: [String] = []
        for (tensor, value) in weightMap.members {
            let shard: String
            do { shard = try weightMap.string(member: tensor, value) } catch { throw error.at(tensor: tensor) }
            guard !shard.contains("/"), shard != "..", shard != ".", !shard.isEmpty, !shard.utf8.contains(0) else {
                throw weightMap.error(tensor, "shard name '\(shard)' must be a plain file name next to the index").at(tensor: tensor)
            }
            guard shardOf.updateValue(shard, forKey: NameKey(tensor)) == nil else {
                throw CkptError(.duplicateName, "tensor listed twice in weight_map", path: indexPath, tensor: tensor)
            }
            if !shardOrder.contains(shard) { shardOrder.append(shard) }
        }
        let directory = FilePaths.directory(of: indexPath)
        var tensors: [TensorEntry] = []
        var metadata: [String: String] = [:]
        var files = [indexPath]
        var found = Set<NameKey>()
        for shard in shardOrder.sorted(by: { $0.utf8.lexicographicallyPrecedes($1.utf8) }) {
            let shardPath = FilePaths.join(directory, shard)
            let checkpoint: Checkpoint
            do {
                checkpoint = try SafeTensors.read(storage: ByteStorage(mapping: shardPath), path: shardPath)
            } catch {
                throw error.at(path: shardPath)
            }
            files.append(shardPath)
            for (key, value) in checkpoint.metadata { metadata[key] = value }
            for tensor in checkpoint.tensors {
                guard shardOf[NameKey(tensor.name)] == shard else {
                    let listed = shardOf[NameKey(tensor.name)].map { "the index places it in \($0)" } ?? "the index does not list it"
                    throw CkptError(.shardIndex, "tensor found in \(shard) but \(listed)", path: shardPath, tensor: tensor.name)
                }
                guard found.insert(NameKey(tensor.name)).inserted else {
                    throw CkptError(.duplicateName, "tensor appears in two shards", path: shardPath, tensor: tensor.name)
                }
                tensors.append(tensor)
            }
        }
        for (tensor, shard) in shardOf where !found.contains(tensor) {
            throw CkptError(.shardIndex, "index places the tensor in \(shard), which does not hold it", path: indexPath, tensor: String(decoding: tensor.utf8, as: UTF8.self))
        }
        return Checkpoint(format: .shardedSafetensors, path: indexPath, metadata: metadata, tensors: tensors, files: files)
    }

    /// Groups tensors into shards as huggingface_hub does: greedily in order; a tensor larger than the limit gets
    /// a shard of its own.
    public static func plan(_ tensors: [OutputTensor], maximumShardBytes: Int) -> [[OutputTensor]] {
        var shards: [[OutputTensor]] = []
        var current: [OutputTensor] = []
        var currentSize = 0
        for tensor in tensors {
            if tensor.byteCount > maximumShardBytes {
                shards.append([tensor])
                continue
            }
            if tensor.byteCount > maximumShardBytes - currentSize {
                shards.append(current)
                current = []
                currentSize = 0
            }
            current.append(tensor)
            currentSize += tensor.byteCount
        }
        if !current.isEmpty { shards.append(current) }
        return shards
    }

    public static func shardName(_ index: Int, of count: Int) -> String {
        func five(_ n: Int) -> String { let s = String(n); return String(repeating: "0", count: max(0, 5 - s.count)) + s }
        return "model-\(five(index + 1))-of-\(five(count)).safetensors"
    }

    /// The index JSON exactly as transformers writes it (`json.dumps(…, indent=2, sort_keys=True) + "\n"`).
    public static func indexJSON(totalSize: Int, weightMap: [(tensor: String, shard: String)]) -> String {
        var json = "{\n  \"metadata\": {\n    \"total_size\": \(totalSize)\n  },\n  \"weight_map\": {"
        // sort_keys orders by code point, which is the UTF-8 byte order.
        let entries = weightMap.sorted { $0.tensor.utf8.lexicographicallyPrecedes($1.tensor.utf8) }
        for (i, entry) in entries.enumerated() {
            json += i == 0 ? "\n    " : ",\n    "
            JSONWriter.appendString(entry.tensor, to: &json, asciiOnly: true)
            json += ": "
            JSONWriter.appendString(entry.shard, to: &json, asciiOnly: true)
        }
        json += entries.isEmpty ? "}\n}\n" : "\n  }\n}\n"
        return json
    }

    /// Writes the shards and the index into `directory` (created if needed). All files are written to temporary
    /// names first and renamed into place only when every one is complete. A single shard is written as
    /// `model.safetensors` with no index, as Hugging Face does.
    public static func write(
        _ tensors: [OutputTensor], metadata: [String: String], to directory: String, maximumShardBytes: Int,
        inputs: [FileIdentity] = [], progress: ProgressReporter? = nil
    ) throws(CkptError) {
        let createdDirectory = FileIdentity.of(directory) == nil
        try FilePaths.makeDirectory(directory)
        if createdDirectory { PendingOutputs.add(folder: directory) }
        defer { if createdDirectory { PendingOutputs.remove(folder: directory) } }
        do {
            try writeShards(tensors, metadata: metadata, to: directory, maximumShardBytes: maximumShardBytes, inputs: inputs, progress: progress)
        } catch {
            if createdDirectory { FilePaths.removeEmptyDirectory(directory) }
            throw error
        }
    }

    /// Refuses a destination folder that already holds weights a reader would take with (or instead of) what is
    /// about to be written: for one `model.safetensors`, any other `*.safetensors` or an index (the index wins,
    /// two files are ambiguous); for shards, an index of another name (several indexes are ambiguous).
    public static func requireNoStaleWeights(in directory: String, single: Bool) throws(CkptError) {
        guard FileIdentity.of(directory)?.isDirectory == true else { return }
        let stale = try FilePaths.contents(of: directory).filter { name in
            if name.hasSuffix(".safetensors.index.json") { return single || name != indexName }
            return single && name.hasSuffix(".safetensors") && name != "model.safetensors"
        }.sorted()
        guard stale.isEmpty else {
            throw CkptError(
                .invalidArgument, "the folder already holds \(stale.joined(separator: ", ")), which would make what is written here unreadable; remove it or choose another folder",
                path: directory)
        }
    }

    private static func writeShards(
        _ tensors: [OutputTensor], metadata: [String: String], to directory: String, maximumShardBytes: Int,
        inputs: [FileIdentity], progress: ProgressReporter?
    ) throws(CkptError) {
        let shards = plan(tensors, maximumShardBytes: maximumShardBytes)
        try requireNoStaleWeights(in: directory, single: shards.count <= 1)
        if shards.count <= 1 {
            try SafeTensors.write(shards.first ?? [], metadata: metadata, to: FilePaths.join(directory, "model.safetensors"), inputs: inputs, progress: progress)
            return
        }
        var staged: [StagedFile] = []
        do throws(CkptError) {
            var weightMap: [(tensor: String, shard: String)] = []
            var written = Set<NameKey>()
            for (i, shard) in shards.enumerated() {
                let name = shardName(i, of: shards.count)
                for tensor in shard {
                    weightMap.append((tensor.name, name))
                    guard written.insert(NameKey(tensor.name)).inserted else {
                        throw CkptError(.duplicateName, "tensor name is used twice", path: directory, tensor: tensor.name)
                    }
                }
                var file = try OutputFile(path: FilePaths.join(directory, name), inputs: inputs)
                try SafeTensors.write(shard, metadata: metadata, into: &file, progress: progress)
                staged.append(try file.stage())
            }
            var index = try OutputFile(path: FilePaths.join(directory, indexName), inputs: inputs)
            try index.write(Array(indexJSON(totalSize: tensors.reduce(0) { $0 + $1.byteCount }, weightMap: weightMap).utf8))
            staged.append(try index.stage())
        } catch {
            staged.forEach { $0.discard() }
            throw error
        }
        // Shards first, index last: a reader that sees the index finds every shard it names.
        try StagedFile.publishAll(staged)
    }
}
