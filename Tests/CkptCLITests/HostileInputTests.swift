import CkptCore
import CkptFormats
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Replays the hostile-input corpus (fixtures/hostile/cases.json, written by fixtures/hostile/generate.py): each
/// case runs the built binary under an address-space limit (`prlimit --as`) and must end as the corpus says —
/// exit status 2 with its error code and nothing written, or success — never by a signal, never by hanging.
@Suite("hostile inputs: whole commands under a memory limit", .serialized)
struct HostileInputTests {
    struct Case: CustomTestStringConvertible, Sendable {
        let name: String
        let defectClass: String
        let arguments: [String]
        let code: String
        let limitMiB: Int
        let fifos: [String]
        let copies: [String: String]
        var testDescription: String { "\(defectClass): \(name)" }
    }

    static let corpus = CLI.fixture("hostile")

    static let cases: [Case] = {
        guard let data = FileManager.default.contents(atPath: corpus + "/cases.json"),
              let root = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let entries = root["cases"] as? [[String: Any]]
        else { return [] }
        return entries.compactMap { entry in
            guard let name = entry["name"] as? String, let defectClass = entry["class"] as? String,
                  let arguments = entry["args"] as? [String], let code = entry["code"] as? String,
                  let limit = entry["limit_mb"] as? Int
            else { return nil }
            return Case(name: name, defectClass: defectClass, arguments: arguments, code: code, limitMiB: limit,
                fifos: entry["fifos"] as? [String] ?? [], copies: entry["copies"] as? [String: String] ?? [:])
        }
    }()

    @Test("the corpus has a case for every class of the sweep")
    func corpusIsComplete() {
        #expect(Self.cases.count >= 24)
        #expect(Set(Self.cases.map(\.defectClass)) == ["arithmetic", "memory", "non-regular", "limits", "errors", "config"])
    }

    @Test("each case ends as documented under its memory limit", arguments: cases)
    func replay(_ entry: Case) throws {
        let out = CLI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: out) }
        for (from, to) in entry.copies {
            let target = out + "/" + to
            try FileManager.default.createDirectory(atPath: (target as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try FileManager.default.copyItem(atPath: Self.corpus + "/" + from, toPath: target)
        }
        for fifo in entry.fifos {
            let path = out + "/" + fifo
            try FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            #expect(mkfifo(path, 0o600) == 0, "mkfifo \(path)")
        }
        let before = Self.tree(out)
        let arguments = entry.arguments.map {
            $0.replacingOccurrences(of: "{case}", with: Self.corpus).replacingOccurrences(of: "{out}", with: out)
        }
        let result = try Self.runLimited(arguments, limitBytes: entry.limitMiB << 20, seconds: 120)
        #expect(!result.timedOut, "\(entry.name): still running after 120 s (a hang)")
        #expect(result.exited, "\(entry.name): killed by signal \(result.status)\n\(result.stderr)")
        if entry.code == "ok" {
            #expect(result.status == 0, "\(entry.name): exit \(result.status)\n\(result.stderr)")
        } else {
            #expect(result.status == 2, "\(entry.name): exit \(result.status), expected 2\n\(result.stderr)")
            #expect(result.stderr.contains("[\(entry.code)]"), "\(entry.name): expected [\(entry.code)]\n\(result.stderr)")
            #expect(result.stderr.hasPrefix("ckpt: error: "), "\(entry.name): one clear error line\n\(result.stderr)")
            #expect(Self.tree(out) == before, "\(entry.name): an error case wrote into the output folder")
        }
    }

    @Test("--save-features / --save-logits write the format the file name asks for; another name is a usage error")
    func savedFormats() throws {
        let out = CLI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: out) }
        let model = Self.corpus + "/tiny_vit.safetensors", image = Self.corpus + "/small.png"
        func run(_ features: String, _ logits: String) throws -> CLI.Result {
            try CLI.run(["run", model, "--images", image, image, "--save-features", out + "/" + features, "--save-logits", out + "/" + logits])
        }
        #expect(try run("f.npy", "l.npy").status == 0)
        let saved = try run("f.safetensors", "l.npz")
        #expect(saved.status == 0, "\(saved.stderr)")
        func tensor(_ file: String, _ name: String) throws -> (dims: [Int], bytes: [UInt8]) {
            let checkpoint = try Checkpoint.open(out + "/" + file)
            #expect(checkpoint.format == (file.hasSuffix(".npy") ? .npy : file.hasSuffix(".npz") ? .npz : .safetensors), "\(file)")
            let entry = try #require(checkpoint.tensors.first { $0.name == name || checkpoint.tensors.count == 1 })
            #expect(entry.dtype == .f32)
            return (entry.shape.dims, try entry.load().withUnsafeBytes { Array($0) })
        }
        let features = try tensor("f.safetensors", "features"), reference = try tensor("f.npy", "features")
        #expect(features.dims == [2, 64] && features.dims == reference.dims && features.bytes == reference.bytes)
        let logits = try tensor("l.npz", "logits"), referenceLogits = try tensor("l.npy", "logits")
        #expect(logits.dims == [2, 5] && logits.bytes == referenceLogits.bytes)
        let refused = try CLI.run(["run", model, "--images", image, "--save-features", out + "/f.txt"])
        #expect(refused.status == 64 && refused.stderr.contains("use .npy, .npz or .safetensors"), "\(refused.stderr)")
        #expect(!FileManager.default.fileExists(atPath: out + "/f.txt"))
    }

    /// Every path under `directory`, relative, sorted.
    static func tree(_ directory: String) -> [String] {
        ((FileManager.default.enumerator(atPath: directory)?.allObjects as? [String]) ?? []).sorted()
    }

    struct Outcome {
        let status: Int32
        let exited: Bool
        let timedOut: Bool
        let stderr: String
    }

    /// Runs the binary through `prlimit --as`, killing it after `seconds`.
    static func runLimited(_ arguments: [String], limitBytes: Int, seconds: Double) throws -> Outcome {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/prlimit")
        process.arguments = ["--as=\(limitBytes)", "--", CLI.binary] + arguments
        let err = Pipe()
        process.standardOutput = FileHandle.nullDevice
        process.standardError = err
        try process.run()
        let deadline = DispatchTime.now() + seconds
        let killer = DispatchWorkItem { if process.isRunning { process.terminate() } }
        DispatchQueue.global().asyncAfter(deadline: deadline, execute: killer)
        let errData = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let timedOut = !killer.isCancelled && DispatchTime.now() >= deadline
        killer.cancel()
        return Outcome(
            status: process.terminationStatus, exited: process.terminationReason == .exit, timedOut: timedOut,
            stderr: String(decoding: errData, as: UTF8.self))
    }
}
