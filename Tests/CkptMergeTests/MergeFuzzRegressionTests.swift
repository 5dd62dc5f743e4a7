import CkptCore
import CkptFormats
import Testing

#if canImport(Glibc)
import Glibc
#endif

@testable import CkptMerge

/// Replays fuzz/regressions/merge/ through the merge itself, as the `merge` fuzz target does (fuzz/FuzzMerge.swift):
/// a 4-byte little-endian prefix P, adapter_config.json (P & 0xFFFFFF bytes), then adapter_model.safetensors;
/// P >> 24 (mod 3) picks the base (the tiny ViT, GPT-2 or BERT of fixtures/adapters/peft/tiny). Each input once
/// trapped; it must now end in a CkptError.
@Suite("merge fuzz regressions")
struct MergeFuzzRegressionTests {
    static let folder: String = {
        var path = #filePath
        for _ in 0..<3 { path = FilePaths.directory(of: path) }  // Tests/CkptMergeTests/<file> → the repository
        return path + "/fuzz/regressions/merge"
    }()

    static let files: [String] = (try? FilePaths.contents(of: folder)) ?? []

    static let bases = ["peft/tiny/base.safetensors", "peft/tiny/embedding_fanin/gpt2/base.safetensors",
                        "peft/tiny/embedding_fanin/bert/base.safetensors"].map { MergeFixtures.root + $0 }

    @Test("there are merge regressions to replay")
    func present() { #expect(!Self.files.isEmpty) }

    @Test("each merge input that once crashed now fails with a ckpt error", arguments: files)
    func replay(file: String) throws {
        let bytes = try ByteStorage(mapping: Self.folder + "/" + file).withUnsafeBytes { Array($0) }
        var prefix: UInt32 = 0, offset = 0
        if bytes.count >= 4 {
            prefix = UInt32(bytes[0]) | UInt32(bytes[1]) << 8 | UInt32(bytes[2]) << 16 | UInt32(bytes[3]) << 24
            offset = 4
        }
        let configLength = bytes.count < 4 ? bytes.count : min(Int(prefix & 0xFF_FFFF), bytes.count - offset)
        var template = Array("/tmp/ckpt-merge-regression-XXXXXX".utf8CString)
        let dir = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
        defer {
            for name in ["adapter_config.json", "adapter_model.safetensors"] { unlink(dir + "/" + name) }
            rmdir(dir)
        }
        for (name, range) in [("adapter_config.json", offset..<offset + configLength),
                              ("adapter_model.safetensors", offset + configLength..<bytes.count)] {
            var file = try OutputFile(path: dir + "/" + name)
            try file.write(Array(bytes[range]))
            try file.commit()
        }
        let base = Self.bases[Int(prefix >> 24) % Self.bases.count]
        do {
            var request = MergeRequest(base: try Checkpoint.open(base))
            request.loras = [try PeftAdapter.open(dir, weight: 1)]
            _ = try MergeFixtures.produce(try MergePlanner.plan(request))
            Issue.record("\(file) merged without an error")
        } catch {
            #expect(error.code == .overflow, "\(file): \(error)")
        }
    }
}
