import CkptCore
import CkptFormats
import Testing

@testable import CkptMerge

/// The committed tiny fixtures: adapters made by the real PEFT 0.21.2 (LoRA, rsLoRA + patterns, DoRA, conv,
/// embedding, fan_in_fan_out, lora_bias, modules_to_save, two weighted adapters, HF ⇄ timm naming) and SSF / FacT /
/// BitFit files from PyTorch models that follow the official code, each with the golden merged state dict
/// (`merge_and_unload()` for PEFT; checked against the adapted model's outputs by fixtures/adapters/generate_*.py).
enum MergeFixtures {
    static let root: String = {
        var path = #filePath
        for _ in 0..<3 { path = FilePaths.directory(of: path) }
        return path + "/fixtures/adapters/"
    }()

    static func json(_ path: String) -> JSONValue {
        let storage = try! ByteStorage(mapping: path)
        return try! storage.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try JSONParser.parse(raw) }
    }

    static func strings(_ value: JSONValue?) -> [String] {
        guard case .array(let items)? = value else { return [] }
        return items.compactMap { if case .string(let s) = $0 { s } else { nil } }
    }

    static func string(_ value: JSONValue?) -> String? { if case .string(let s)? = value { s } else { nil } }

    static func number(_ value: JSONValue?) -> Double? { if case .number(let s)? = value { Double(s) } else { nil } }

    struct Case: CustomStringConvertible, Sendable {
        var name: String
        var folder: String
        var base: String
        var flags: [String] = []
        var adapters: [(path: String, weight: Double)] = []
        var golden: String?
        var refusal: String?
        var expectedPlan: [(target: String, rule: String, rank: Int?, scaling: Double?)] = []
        var description: String { name }
    }

    static let peftCases: [Case] = {
        let folder = root + "peft/tiny/"
        guard case .object(let members) = json(folder + "cases.json") else { return [] }
        return members.map { name, value in
            var c = Case(name: "peft/\(name)", folder: folder, base: folder + string(value["base"])!)
            if case .array(let adapters)? = value["adapters"] {
                for adapter in adapters {
                    guard case .array(let pair) = adapter, let path = string(pair.first), let weight = number(pair.last) else { continue }
                    c.adapters.append((folder + path, weight))
                }
            }
            c.golden = string(value["golden"]).map { folder + $0 }
            c.refusal = string(value["refuse"])
            if case .array(let plan)? = value["plan"] {
                for line in plan {
                    c.expectedPlan.append(
                        (string(line["target"])!, string(line["rule"])!, number(line["rank"]).map { Int($0) }, number(line["scaling"])))
                }
            }
            return c
        }
    }()

    static let petlCases: [Case] = {
        let folder = root + "petl/tiny/"
        let document = json(folder + "cases.json")
        var cases: [Case] = []
        for key in ["cases", "refusals"] {
            guard case .object(let members)? = document[key] else { continue }
            for (name, value) in members {
                var c = Case(name: "petl/\(name)", folder: folder, base: folder + string(value["base"])!, flags: strings(value["flags"]))
                c.golden = string(value["golden"]).map { folder + $0 }
                c.refusal = string(value["code"])
                cases.append(c)
            }
        }
        if case .object(let members)? = document["nonmergeable"] {
            for (name, value) in members {
                var c = Case(name: "petl/nonmergeable/\(name)", folder: folder, base: folder + "base.safetensors")
                c.flags = ["--bitfit", string(value["file"])!]
                c.refusal = "notMergeable"
                cases.append(c)
            }
        }
        return cases
    }()

    static func request(for c: Case, keepUnmerged: Bool = false) throws(CkptError) -> MergeRequest {
        var request = MergeRequest(base: try Checkpoint.open(c.base))
        for (path, weight) in c.adapters { request.loras.append(try PeftAdapter.open(path, weight: weight)) }
        var flags = c.flags[...]
        while let flag = flags.popFirst() {
            let value = flags.popFirst()!
            switch flag {
            case "--ssf": request.ssf = try Checkpoint.open(c.folder + value)
            case "--bitfit": request.bitfit = try Checkpoint.open(c.folder + value)
            case "--fact": request.fact = try Checkpoint.open(c.folder + value)
            case "--fact-scale": request.factScale = Double(value)
            default: Issue.record("unknown flag \(flag) in \(c.name)")
            }
        }
        request.keepUnmerged = keepUnmerged
        return request
    }

    /// Runs the writers' producers in memory: name → (dtype, bytes).
    static func produce(_ plan: MergePlan) throws(CkptError) -> [(name: String, dtype: DType, bytes: [UInt8])] {
        var result: [(name: String, dtype: DType, bytes: [UInt8])] = []
        for tensor in try plan.outputTensors() {
            var bytes: [UInt8] = []
            try tensor.write { (chunk: UnsafeRawBufferPointer) throws(CkptError) in bytes.append(contentsOf: chunk) }
            result.append((tensor.name, tensor.dtype, bytes))
        }
        return result
    }

    static func floats(_ bytes: [UInt8]) -> [Float] {
        bytes.withUnsafeBytes { raw in (0..<raw.count / 4).map { raw.loadUnaligned(fromByteOffset: $0 * 4, as: Float.self) } }
    }
}

@Suite("merge against goldens from PEFT and the official SSF / FacT forwards")
struct MergeFixtureTests {
    @Test("merged tensors match the golden state dict", arguments: (MergeFixtures.peftCases + MergeFixtures.petlCases).filter { $0.golden != nil })
    func golden(c: MergeFixtures.Case) throws {
        let plan = try MergePlanner.plan(try MergeFixtures.request(for: c))
        let produced = try MergeFixtures.produce(plan)
        let golden = try Checkpoint.open(c.golden!)
        let base = try Checkpoint.open(c.base)
        #expect(Set(produced.map(\.name)) == Set(golden.tensors.map(\.name)), "tensor names")
        // Base tensors keep their order; new ones follow.
        let baseOrder = base.tensors.map(\.name).filter { name in produced.contains { $0.name == name } }
        #expect(produced.map(\.name).filter { baseOrder.contains($0) } == baseOrder)
        let baseBytes = Dictionary(uniqueKeysWithValues: try base.tensors.map { (t: TensorEntry) throws(CkptError) in (t.name, try t.load().withUnsafeBytes { Array($0) }) })
        for expected in golden.tensors {
            guard let output = produced.first(where: { $0.name == expected.name }) else { continue }
            let reference = try expected.load().withUnsafeBytes { Array($0) }
            #expect(output.dtype == expected.dtype, "\(expected.name)")
            if let original = baseBytes[expected.name], original == reference {
                #expect(output.bytes == reference, "'\(expected.name)' is untouched by the adapter and must be bit-identical")
                continue
            }
            let ours = MergeFixtures.floats(output.bytes), theirs = MergeFixtures.floats(reference)
            try #require(ours.count == theirs.count, "\(expected.name)")
            var error = 0.0, norm = 0.0
            for (a, b) in zip(ours, theirs) {
                error += (Double(a) - Double(b)) * (Double(a) - Double(b))
                norm += Double(b) * Double(b)
            }
            let relative = (error / max(norm, 1e-300)).squareRoot()
            #expect(relative <= 1e-6, "'\(expected.name)': relative L2 error \(relative)")
        }
    }

    @Test("the plan states PEFT's rank and scaling for every layer", arguments: MergeFixtures.peftCases.filter { !$0.expectedPlan.isEmpty })
    func plan(c: MergeFixtures.Case) throws {
        let plan = try MergePlanner.plan(try MergeFixtures.request(for: c))
        for expected in c.expectedPlan {
            let line = plan.entries.first { $0.target == expected.target && $0.rule == expected.rule }
            let entry = try #require(line, "no \(expected.rule) plan entry for \(expected.target)")
            if let rank = expected.rank { #expect(entry.rank == rank, "\(expected.target)") }
            if let scaling = expected.scaling { #expect(abs(entry.scaling! - scaling) <= 1e-12 * abs(scaling), "\(expected.target)") }
        }
    }

    @Test("refused with the stated error code", arguments: (MergeFixtures.peftCases + MergeFixtures.petlCases).filter { $0.refusal != nil })
    func refusal(c: MergeFixtures.Case) throws {
        do {
            let plan = try MergePlanner.plan(try MergeFixtures.request(for: c))
            _ = try MergeFixtures.produce(plan)
            Issue.record("\(c.name) merged, but should be refused with \(c.refusal!)")
        } catch {
            #expect(error.code.rawValue == c.refusal!, "\(error)")
        }
    }

    @Test("--keep-unmerged carries non-mergeable tensors through unchanged")
    func keepUnmerged() throws {
        let c = try #require(MergeFixtures.petlCases.first { $0.name == "petl/nonmergeable/vpt" })
        let plan = try MergePlanner.plan(try MergeFixtures.request(for: c, keepUnmerged: true))
        let produced = try MergeFixtures.produce(plan)
        let prompts = try Checkpoint.open(c.folder + c.flags[1])
        for tensor in prompts.tensors {
            let output = try #require(produced.first { $0.name == tensor.name }, "\(tensor.name) kept")
            #expect(output.bytes == (try tensor.load().withUnsafeBytes { Array($0) }))
        }
        #expect(plan.entries.contains { $0.rule == "keep-unmerged" })
    }

    @Test("an adapter tensor that lands nowhere is an error listing the nearest base names")
    func unmatched() throws {
        let c = try #require(MergeFixtures.peftCases.first { $0.name == "peft/hf_names" })
        // The HF adapter on an unrelated base (BERT) has nothing to land on.
        var request = MergeRequest(base: try Checkpoint.open(MergeFixtures.root + "peft/tiny/embedding_fanin/bert/base.safetensors"))
        request.loras = [try PeftAdapter.open(c.adapters[0].path, weight: 1)]
        #expect {
            try MergePlanner.plan(request)
        } throws: { error in
            guard let error = error as? CkptError else { return false }
            return error.code == .unmatchedKey && error.message.contains("nearest base tensors")
        }
    }

    @Test("F16 output is the F32 merge rounded once")
    func roundsOnce() throws {
        let c = try #require(MergeFixtures.peftCases.first { $0.name == "peft/lora_basic" })
        var request = try MergeFixtures.request(for: c)
        let f32 = try MergeFixtures.produce(try MergePlanner.plan(request))
        request.outputDType = .f16
        let f16 = try MergeFixtures.produce(try MergePlanner.plan(request))
        for (wide, narrow) in zip(f32, f16) {
            #expect(narrow.dtype == .f16)
            var expected = [UInt8](repeating: 0, count: wide.bytes.count / 2)
            wide.bytes.withUnsafeBytes { source in
                expected.withUnsafeMutableBytes { destination in
                    DTypeConversion.convert(
                        from: .f32, to: .f16, count: wide.bytes.count / 4, source: source.baseAddress!, destination: destination.baseAddress!)
                }
            }
            #expect(narrow.bytes == expected, "\(wide.name)")
        }
    }
}
