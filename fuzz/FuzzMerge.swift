// libFuzzer target: the whole `ckpt merge BASE OUT --lora DIR` path on a fuzzed PEFT adapter folder.
//
// Input: a 4-byte little-endian prefix P, then adapter_config.json (P & 0xFFFFFF bytes, clamped to what is left),
// then adapter_model.safetensors (the rest). P >> 24 (mod 3) picks the base the adapter is merged into: 0 the tiny
// timm ViT of fixtures/adapters/peft/tiny/base.safetensors, 1 the tiny GPT-2 and 2 the tiny BERT of
// fixtures/adapters/peft/tiny/embedding_fanin/ (same names and shapes; values are made up). Inputs shorter than 4
// bytes are all config. fuzz/make_merge_seeds.py packs the PEFT fixtures this way.
//
// The calls are MergeCommand.run's: PeftAdapter.open, MergeRequest, MergePlanner.plan, plan.outputTensors(), and
// SafeTensors.write of the result into the scratch folder (deleted after each input).
#if canImport(Glibc)
import Glibc
#endif
import CkptCore
import CkptFormats
import CkptMerge

struct MergeFixtures {
    let adapterFolder: String
    let outputPath: String
    let bases: [Checkpoint]

    init() {
        adapterFolder = FuzzFolder.folder("adapter")
        let baseFolder = FuzzFolder.folder("bases")
        outputPath = FuzzFolder.folder("out") + "/merged.safetensors"
        var bases: [Checkpoint] = []
        for (name, tensors) in [("vit", FuzzFolder.tinyViT()), ("gpt2", FuzzFolder.tinyGPT2()), ("bert", FuzzFolder.tinyBERT())] {
            let path = baseFolder + "/\(name).safetensors"
            FuzzFolder.writeSafetensors(path, tensors, metadata: ["format": "pt"])
            do { bases.append(try Checkpoint.open(path)) } catch { fatalError("fuzz: cannot open base \(path): \(error)") }
        }
        self.bases = bases
    }
}

nonisolated(unsafe) var mergeFixtures: MergeFixtures?

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    if mergeFixtures == nil { mergeFixtures = MergeFixtures() }
    let fixtures = mergeFixtures!
    var prefix: UInt32 = 0
    var offset = 0
    if size >= 4 {
        prefix = UInt32(data[0]) | UInt32(data[1]) << 8 | UInt32(data[2]) << 16 | UInt32(data[3]) << 24
        offset = 4
    }
    let configLength = size < 4 ? size : min(Int(prefix & 0xFF_FFFF), size - offset)
    let config = UnsafeRawBufferPointer(start: data + offset, count: configLength)
    let weights = UnsafeRawBufferPointer(start: data + offset + configLength, count: size - offset - configLength)
    FuzzFolder.write(fixtures.adapterFolder + "/adapter_config.json", config)
    FuzzFolder.write(fixtures.adapterFolder + "/adapter_model.safetensors", weights)
    let base = fixtures.bases[Int(prefix >> 24) % fixtures.bases.count]
    do {
        var request = MergeRequest(base: base)
        let adapter = try PeftAdapter.open(fixtures.adapterFolder, weight: 1)
        request.loras = [adapter]
        let plan = try MergePlanner.plan(request)
        var inputs = request.base.files
        for adapter in request.loras { inputs += adapter.tensors.files + [adapter.configPath] }
        try SafeTensors.write(
            try plan.outputTensors(), metadata: request.base.metadata, to: fixtures.outputPath, inputs: inputs.compactMap(FileIdentity.of))
        FuzzFolder.remove(fixtures.outputPath)
        fuzzReport("merged \(plan.outputNames.count) tensors, \(plan.entries.count) plan entries")
    } catch {
        let text = "\(error)"
        fuzzReport("error: " + text)
    }
    return 0
}
