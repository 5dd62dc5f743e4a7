import ArgumentParser
import CkptCore
import CkptFormats

struct InspectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inspect",
        abstract: "Show a checkpoint's format, metadata and tensors (header-only: no tensor data is read).",
        discussion: """
            Quantized files (MLX, compressed-tensors, GGUF block types) are shown as their logical tensors: the \
            dtype and shape they dequantize to, with the stored layout and stored bytes alongside.
            """)

    @Argument(help: "A .safetensors, .npy or .npz file, a *.safetensors.index.json, or a folder of shards.")
    var path: String

    @OptionGroup var json: JSONOutputOption
    @OptionGroup var read: ReadOptions

    func run() throws {
        try runReportingErrors {
            let checkpoint = try Checkpoint.open(path, options: try read.resolved())
            print(json.enabled ? Self.json(checkpoint) : Self.table(checkpoint))
        }
    }

    static func json(_ checkpoint: Checkpoint) -> String {
        var out = "{\"format\": \"\(checkpoint.format.rawValue)\", \"metadata\": {"
        let keys = checkpoint.metadata.keys.sorted()
        out += keys.map { JSONWriter.quoted($0) + ": " + JSONWriter.quoted(checkpoint.metadata[$0]!) }.joined(separator: ", ")
        out += "}, \"tensors\": ["
        out += checkpoint.tensors.map { t in
            var fields = "{\"name\": \(JSONWriter.quoted(t.name)), \"dtype\": \"\(t.dtype.name)\", \"shape\": [\(t.shape.dims.map(String.init).joined(separator: ", "))], \"bytes\": \(t.byteCount)"
            if let q = t.quantization {
                fields += ", \"quantization\": {\"scheme\": \(JSONWriter.quoted(q.scheme)), \"bits\": \(q.bits), \"group_size\": \(q.groupSize.map(String.init) ?? "null"), "
                    + "\"symmetric\": \(q.symmetric), \"stored_bytes\": \(q.storedBytes), \"stored_tensors\": [\(q.storedTensors.map { JSONWriter.quoted($0) }.joined(separator: ", "))]}"
            }
            return fields + "}"
        }.joined(separator: ", ")
        out += "], \"total_bytes\": \(checkpoint.totalBytes), \"stored_bytes\": \(checkpoint.storedBytes), \"total_params\": \(checkpoint.totalParameters)}"
        return out
    }

    static func table(_ checkpoint: Checkpoint) -> String {
        var lines: [String] = []
        lines.append("file:     \(TerminalText.escaped(checkpoint.path))")
        lines.append("format:   \(checkpoint.format.rawValue)" + (checkpoint.files.count > 2 ? " (\(checkpoint.files.count - 1) shards)" : ""))
        if checkpoint.metadata.isEmpty {
            lines.append("metadata: (none)")
        } else {
            lines.append("metadata:")
            for key in checkpoint.metadata.keys.sorted() { lines.append("  \(TerminalText.escaped(key)): \(TerminalText.escaped(checkpoint.metadata[key]!))") }
        }
        var byType: [DType: Int] = [:]
        for t in checkpoint.tensors { byType[t.dtype, default: 0] += 1 }
        let mix = byType.sorted { $0.key.safetensorsRank > $1.key.safetensorsRank }.map { "\($0.value) \($0.key.name)" }.joined(separator: ", ")
        lines.append(
            "tensors:  \(checkpoint.tensors.count)" + (mix.isEmpty ? "" : " (\(mix))")
                + ", parameters: \(Formatting.grouped(checkpoint.totalParameters))"
                + ", bytes: \(Formatting.grouped(checkpoint.totalBytes)) (\(ByteCountFormat.human(checkpoint.totalBytes)))")
        let quantized = checkpoint.tensors.filter { $0.quantization != nil }
        if !quantized.isEmpty {
            lines.append(
                "quantized: \(quantized.count) tensors, stored in \(Formatting.grouped(checkpoint.storedBytes)) bytes "
                    + "(\(ByteCountFormat.human(checkpoint.storedBytes))); shown dequantized")
        }
        lines.append("")
        let rows = checkpoint.tensors.map { t in
            [t.name, t.dtype.name, Formatting.shape(t.shape), Formatting.grouped(t.shape.elements),
             Formatting.grouped(t.quantization?.storedBytes ?? t.byteCount), t.quantization?.label ?? ""]
        }
        lines.append(Formatting.table(["name", "dtype", "shape", "params", "stored bytes", "quantization"], rows, rightAligned: [3, 4]))
        return lines.joined(separator: "\n")
    }
}
