import CkptCore
import CkptFormats
import Foundation
import Testing

/// OpenBLAS's kernel choice end to end: the same predictions on the generic kernels and on the ones ckpt picks, and
/// the start-up re-exec (simulated with the test hook) happening once.
@Suite("OpenBLAS kernel choice", .serialized)
struct BLASDispatchTests {
    /// The real DINOv2-S with the Fashion-MNIST head when the model cache has it, else the tiny ViT with its own head.
    static let evalArguments: [String] = {
        let dinov2 = CLI.root + "/.cache/dinov2/dinov2-small-224"
        if FileManager.default.fileExists(atPath: dinov2 + "/model.safetensors") {
            return ["eval", dinov2, "--head", CLI.fixture("eval/fmnist_head.safetensors"), "--data", CLI.fixture("eval/fmnist_eval.npz"), "--limit", "4"]
        }
        return ["eval", CLI.fixture("hostile/tiny_vit.safetensors"), "--data", CLI.fixture("hostile/one_image.npz")]
    }()

    static let variables = ["OPENBLAS_CORETYPE", "CKPT_OPENBLAS_REEXEC", "CKPT_NO_REEXEC", "CKPT_TEST_OPENBLAS_CORE", "CKPT_KERNELS"]

    struct Outcome {
        let blas: JSONValue
        let predictions: JSONValue?
        let logits: [Float]
        let stderr: String
    }

    /// `ckpt eval --json --save-logits` with the OpenBLAS variables cleared, then `environment` set.
    static func eval(_ environment: [String: String]) throws -> Outcome {
        let out = CLI.temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: out) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: CLI.binary)
        process.arguments = evalArguments + ["--json", "--save-logits", out + "/logits.npy"]
        var inherited = ProcessInfo.processInfo.environment
        for name in variables { inherited[name] = nil }
        process.environment = inherited.merging(environment) { $1 }
        let stdout = Pipe(), stderr = Pipe()
        process.standardOutput = stdout
        process.standardError = stderr
        try process.run()
        let outData = stdout.fileHandleForReading.readDataToEndOfFile()
        let errData = stderr.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let errText = String(decoding: errData, as: UTF8.self)
        try #require(process.terminationStatus == 0, "exit \(process.terminationStatus): \(errText)")
        let json = try JSONParser.parse(String(decoding: outData, as: UTF8.self))
        let blas = try #require(json["blas"])
        let entry = try #require(try Checkpoint.open(out + "/logits.npy").tensors.first)
        let logits = try entry.load().withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        return Outcome(blas: blas, predictions: json["predictions"], logits: logits, stderr: errText)
    }

    static func string(_ value: JSONValue?) -> String? {
        if case .string(let text)? = value { return text }
        return nil
    }

    /// Whether this CPU has kernels better than OpenBLAS's generic ones (x86-64 with AVX2 + FMA or AVX-512).
    static func hasBetterKernels(_ blas: JSONValue) -> Bool { ["avx2", "avx512"].contains(string(blas["simd"]) ?? "") }

    @Test("the generic Prescott kernels and the automatic choice give the same predictions")
    func fallbackAndFastPathAgree() throws {
        let forced = try Self.eval(["OPENBLAS_CORETYPE": "Prescott"])
        #expect(Self.string(forced.blas["core"]) == "Prescott")
        #expect(Self.string(forced.blas["requested_core"]) == "Prescott")
        #expect(Self.string(forced.blas["chosen_by"]) == "user", "the user's OPENBLAS_CORETYPE wins: no re-exec")
        let automatic = try Self.eval([:])
        if Self.hasBetterKernels(automatic.blas) { #expect(Self.string(automatic.blas["core"]) != "Prescott") }
        #expect(Self.string(automatic.blas["chosen_by"]) == "openblas" || Self.string(automatic.blas["chosen_by"]) == "ckpt")
        #expect(Self.string(automatic.blas["library"])?.hasPrefix("OpenBLAS") == true)
        #expect(forced.predictions != nil && forced.predictions == automatic.predictions)
        try #require(forced.logits.count == automatic.logits.count && !forced.logits.isEmpty)
        let worst = zip(forced.logits, automatic.logits).map { abs($0 - $1) }.max() ?? 0
        #expect(worst <= 1e-4, "logits differ by up to \(worst)")
    }

    @Test("a fallback the user did not ask for re-runs ckpt once, on the best kernels")
    func simulatedFallbackReexecutesOnce() throws {
        // The hook makes every process, the re-executed one too, believe OpenBLAS fell back: only the marker stops a loop.
        let reexecuted = try Self.eval(["CKPT_TEST_OPENBLAS_CORE": "Prescott"])
        guard Self.hasBetterKernels(reexecuted.blas) else {
            #expect(Self.string(reexecuted.blas["chosen_by"]) == "openblas", "nothing better to re-run with")
            return
        }
        #expect(Self.string(reexecuted.blas["chosen_by"]) == "ckpt")
        let core = try #require(Self.string(reexecuted.blas["core"]))
        #expect(core != "Prescott" && Self.string(reexecuted.blas["requested_core"]) == core, "ran on the requested kernels: \(reexecuted.blas)")
        #expect(reexecuted.stderr.isEmpty, "\(reexecuted.stderr)")
        // The opt-out keeps OpenBLAS's choice.
        let kept = try Self.eval(["CKPT_TEST_OPENBLAS_CORE": "Prescott", "CKPT_NO_REEXEC": "1"])
        #expect(Self.string(kept.blas["chosen_by"]) == "openblas" && kept.blas["requested_core"] == .null)
        #expect(kept.predictions == reexecuted.predictions)
    }

    @Test("the text report names the kernels on the timing line")
    func textReportNamesTheKernels() throws {
        let result = try CLI.run(Self.evalArguments)
        #expect(result.status == 0, "\(result.stderr)")
        let line = result.stdout.split(separator: "\n").first { $0.hasPrefix("forward: ") }
        #expect(line?.contains("images/s; OpenBLAS ") == true && line?.contains(" kernels") == true, "\(line ?? "no forward line")")
    }
}
