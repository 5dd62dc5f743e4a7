import CkptCore

extension SafeTensors {
    /// Orders tensors the way the reference writer does: dtype rank descending, then name (bytewise).
    public static func writeOrder(_ tensors: [OutputTensor]) -> [OutputTensor] {
        tensors.sorted { a, b in precedes((a.dtype, a.name), (b.dtype, b.name)) }
    }

    static func precedes(_ a: (dtype: DType, name: String), _ b: (dtype: DType, name: String)) -> Bool {
        if a.dtype.safetensorsRank != b.dtype.safetensorsRank { return a.dtype.safetensorsRank > b.dtype.safetensorsRank }
        return a.name.utf8.lexicographicallyPrecedes(b.name.utf8)
    }

    /// Metadata as written: the input's string map plus `format: pt` when absent (transformers requires it).
    public static func outputMetadata(_ metadata: [String: String]) -> [String: String] {
        var result = metadata
        if result["format"] == nil { result["format"] = "pt" }
        return result
    }

    /// The 8-byte length prefix plus the compact JSON header, padded with spaces to a multiple of 8, for
    /// tensors already in write order.
    public static func headerBytes(for tensors: [OutputTensor], metadata: [String: String]) throws(CkptError) -> [UInt8] {
        try headerBytes(for: tensors.map(OutputTensorGroup.Part.init), metadata: metadata)
    }

    static func headerBytes(for tensors: [OutputTensorGroup.Part], metadata: [String: String]) throws(CkptError) -> [UInt8] {
        var json = "{"
        var first = true
        if !metadata.isEmpty {
            json += "\"__metadata__\":{"
            for (i, key) in metadata.keys.sorted(by: { $0.utf8.lexicographicallyPrecedes($1.utf8) }).enumerated() {
                if i > 0 { json += "," }
                JSONWriter.appendString(key, to: &json)
                json += ":"
                JSONWriter.appendString(metadata[key]!, to: &json)
            }
            json += "}"
            first = false
        }
        var offset = 0
        var names = Set<NameKey>()
        for tensor in tensors {
            guard tensor.dtype.isSafetensorsType else {
                throw CkptError(.unsupportedDType, "\(tensor.dtype.name) has no safetensors dtype; convert it first", tensor: tensor.name)
            }
            guard tensor.name != "__metadata__", names.insert(NameKey(tensor.name)).inserted else {
                throw CkptError(.duplicateName, "tensor name is used twice or reserved", tensor: tensor.name)
            }
            if !first { json += "," }
            first = false
            JSONWriter.appendString(tensor.name, to: &json)
            json += ":{\"dtype\":\"\(tensor.dtype.name)\",\"shape\":["
            json += tensor.shape.dims.map(String.init).joined(separator: ",")
            json += "],\"data_offsets\":[\(offset),\(offset + tensor.byteCount)]}"
            offset += tensor.byteCount
        }
        json += "}"
        var header = Array(json.utf8)
        let padding = (8 - header.count % 8) % 8
        header.append(contentsOf: repeatElement(0x20, count: padding))
        guard header.count <= maximumHeaderSize else {
            throw CkptError(.headerTooLarge, "the header would be \(header.count) bytes, over the \(maximumHeaderSize)-byte limit")
        }
        var result = [UInt8](repeating: 0, count: 8)
        withUnsafeBytes(of: UInt64(header.count).littleEndian) { for i in 0..<8 { result[i] = $0[i] } }
        result.append(contentsOf: header)
        return result
    }

    /// Writes one safetensors file into an already-open output.
    public static func write(
        _ tensors: [OutputTensor], metadata: [String: String], into file: inout OutputFile,
        progress: ProgressReporter? = nil
    ) throws(CkptError) {
        let ordered = writeOrder(tensors)
        let header: [UInt8]
        do {
            header = try headerBytes(for: ordered, metadata: outputMetadata(metadata))
        } catch {
            throw error.at(path: file.path)
        }
        try file.write(header)
        for tensor in ordered {
            try tensor.write { (chunk: UnsafeRawBufferPointer) throws(CkptError) in
                try file.write(chunk)
                progress?.advance(bytes: chunk.count)
            }
            progress?.finishedTensor()
        }
    }

    /// Writes one safetensors file of tensor groups into an already-open (empty) output. The header comes from
    /// every part's size, then the groups run in the given order and each part's bytes go straight to that part's
    /// offset, whatever the stored order: the bytes are those of ``write(_:metadata:into:progress:)`` with every
    /// part as a tensor.
    public static func write(
        groups: [OutputTensorGroup], metadata: [String: String], into file: inout OutputFile,
        progress: ProgressReporter? = nil
    ) throws(CkptError) {
        var parts: [(group: Int, part: Int)] = []
        for (g, group) in groups.enumerated() { parts += group.parts.indices.map { (g, $0) } }
        let ordered = parts.sorted { a, b in
            let x = groups[a.group].parts[a.part], y = groups[b.group].parts[b.part]
            return precedes((x.dtype, x.name), (y.dtype, y.name))
        }
        let header: [UInt8]
        do {
            header = try headerBytes(for: ordered.map { groups[$0.group].parts[$0.part] }, metadata: outputMetadata(metadata))
        } catch {
            throw error.at(path: file.path)
        }
        precondition(file.offset == 0, "the header must start the file")
        try file.write(header)
        var offsets = groups.map { [Int](repeating: 0, count: $0.parts.count) }
        var next = header.count
        for (g, p) in ordered {
            offsets[g][p] = next
            next += groups[g].parts[p].byteCount
        }
        for (g, group) in groups.enumerated() {
            var cursors = offsets[g]
            try group.write { (part: Int, chunk: UnsafeRawBufferPointer) throws(CkptError) in
                try file.write(chunk, at: cursors[part])
                cursors[part] += chunk.count
                progress?.advance(bytes: chunk.count)
            }
            for _ in group.parts { progress?.finishedTensor() }
        }
    }

    /// Writes a safetensors file of tensor groups atomically at `path`.
    public static func write(
        groups: [OutputTensorGroup], metadata: [String: String], to path: String,
        inputs: [FileIdentity] = [], progress: ProgressReporter? = nil
    ) throws(CkptError) {
        var file = try OutputFile(path: path, inputs: inputs)
        try write(groups: groups, metadata: metadata, into: &file, progress: progress)
        try file.commit()
    }

    /// Writes a safetensors file atomically at `path`.
    public static func write(
        _ tensors: [OutputTensor], metadata: [String: String], to path: String,
        inputs: [FileIdentity] = [], progress: ProgressReporter? = nil
    ) throws(CkptError) {
        var file = try OutputFile(path: path, inputs: inputs)
        try write(tensors, metadata: metadata, into: &file, progress: progress)
        try file.commit()
    }
}
