import CkptCore
import CkptFormats
@testable import CkptInference
import CkptQuant
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `--format compressed-tensors` for weight + activation quantization, on the tiny timm ViT of ``ViTBackwardTests``
/// (fused qkv, LayerScale, a head), calibrated as ``ActivationCalibrationTests`` does:
/// - ``ActivationQuantizedWriter/writeCompressedTensors`` and the dequantized writer from one calibration: read back,
///   every tensor of the compressed-tensors folder decodes to the dequantized folder's bytes; the stored input
///   quantizers are the calibrated ones in compressed-tensors' signed convention; the side file holds the rest; the
///   engine computes bit-identical features from both folders;
/// - the writer's refusals (zero points outside int8, per-channel Linear inputs) leave nothing behind;
/// - the reader's rules for int-quantized weights and input activations, and ``ActivationQuantization/combining``'s.
@Suite struct ActivationCompressedTensorsTests {
    typealias Calibration = ActivationCalibrationTests

    static func temporaryFolder() -> String {
        var template = Array("/tmp/ckpt-ctwaq-XXXXXX".utf8CString)
        return template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
    }

    static func destination(_ path: String) -> QuantizedCheckpointWriter.Destination {
        // A Hugging Face folder (ViTModel.load reads a folder's config.json) of the timm-named model.
        QuantizedCheckpointWriter.Destination(path: path, folder: true, inputConfig: .object([("model_type", .string("vit"))]), companions: [], inputs: [])
    }

    static let observers = ActivationQuantizedWriter.Observers(weights: "memoryless_minmax", inputActivations: "percentile")

    struct Written {
        let engine: ViTEngine
        let result: ActivationCalibration
        let ct: String, dq: String
    }

    static func write(weightBits: Int, activationBits: Int) throws -> Written {
        let (engine, result) = try Calibration.calibrate(reparameterize: true, weightBits: weightBits, activationBits: activationBits)
        let checkpoint = try Checkpoint.open(engine.model.path)
        let root = temporaryFolder()
        let (ct, dq) = (root + "/ct", root + "/dq")
        try ActivationQuantizedWriter.writeCompressedTensors(
            checkpoint, changed: result.tensors, quantization: result.quantization, grids: result.weightGrids,
            modules: engine.model.blockLinearModules, observers: observers, to: destination(ct))
        try ActivationQuantizedWriter.write(checkpoint, changed: result.tensors, quantization: result.quantization, to: destination(dq))
        return Written(engine: engine, result: result, ct: ct, dq: dq)
    }

    static func bytes(_ entry: TensorEntry) throws -> [UInt8] { try entry.load().withUnsafeBytes { Array($0) } }

    @Test("the compressed-tensors folder reads back as the dequantized one: tensors, input quantizers, side file, features",
          arguments: [(8, 8), (4, 4), (6, 8)])
    func roundTrip(bits: (weights: Int, activations: Int)) throws {
        let w = try Self.write(weightBits: bits.weights, activationBits: bits.activations)
        let modules = w.engine.model.blockLinearModules
        #expect(modules.count == 4 * ViTBackwardTests.depth && modules.contains { $0.module == "blocks.0.attn.qkv" && $0.site == .block(0, .qkvInput) })
        let ct = try Checkpoint.open(w.ct), dq = try Checkpoint.open(w.dq)
        #expect(ct.tensors.map(\.name).sorted() == dq.tensors.map(\.name).sorted())
        let dqByName = Dictionary(uniqueKeysWithValues: dq.tensors.map { ($0.name, $0) })
        for entry in ct.tensors {
            let other = try #require(dqByName[entry.name])
            #expect(entry.dtype == other.dtype && entry.shape == other.shape, "\(entry.name)")
            #expect(try Self.bytes(entry) == Self.bytes(other), "\(entry.name): compressed-tensors readback differs from the dequantized folder")
            let quantized = modules.contains { $0.weightName == entry.name }
            #expect((entry.quantization?.scheme == CompressedTensors.intScheme) == quantized, "\(entry.name)")
            if quantized {
                #expect(entry.quantization?.bits == bits.weights && entry.quantization?.groupSize == nil && entry.quantization?.symmetric == false)
                #expect(entry.quantization?.storedTensors == [entry.name, entry.name.dropLast(7) + ".weight_scale", entry.name.dropLast(7) + ".weight_zero_point"])
            }
        }
        // The stored int8 codes: in the signed b-bit range, and not all the same.
        let file = try SafeTensors.read(storage: ByteStorage(mapping: w.ct + "/model.safetensors"), path: w.ct + "/model.safetensors")
        let stored = Dictionary(uniqueKeysWithValues: file.tensors.map { ($0.name, $0) })
        for m in modules {
            let codes = try Self.bytes(try #require(stored[m.weightName])).map { Int(Int8(bitPattern: $0)) }
            #expect(stored[m.weightName]?.dtype == .i8)
            #expect(codes.min()! >= -(1 << (bits.weights - 1)) && codes.max()! <= (1 << (bits.weights - 1)) - 1 && Set(codes).count > 2, "\(m.weightName)")
            #expect(stored[m.module + ".weight_scale"]?.shape.dims == [stored[m.weightName]!.shape.dims[0], 1])
            #expect(stored[m.module + ".weight_zero_point"]?.dtype == .i8 && stored[m.module + ".weight_zero_point"]?.shape.dims == [stored[m.weightName]!.shape.dims[0], 1])
            #expect(stored[m.module + ".input_scale"]?.dtype == .f32 && stored[m.module + ".input_scale"]?.shape.dims == [1])
            #expect(stored[m.module + ".input_zero_point"]?.dtype == .i8 && stored[m.module + ".input_zero_point"]?.shape.dims == [1])
        }
        // Input quantizers: the calibrated ones, zero point shifted by −2^(b−1); every Linear input site has one.
        #expect(Set(ct.inputActivations.keys) == Set(modules.map(\.module)))
        for m in modules {
            let input = try #require(ct.inputActivations[m.module])
            guard case .uniform(let q)? = w.result.quantization[m.site] else { Issue.record("\(m.site)"); continue }
            #expect(input.bits == bits.activations && !input.symmetric)
            #expect(input.scale.bitPattern == q.scales[0].bitPattern)
            #expect(Float(input.zeroPoint) == q.zeroPoints[0] - Float(1 << (bits.activations - 1)))
        }
        let side = try #require(try ActivationQuantizedWriter.sideFile(in: w.ct))
        #expect(Set(side.sites.keys) == Set(w.result.quantization.sites.keys).subtracting(modules.map(\.site)))
        #expect(side.sites.keys.contains(.patchEmbedInput) && side.sites.keys.contains(.headInput) && side.sites.keys.contains(.block(0, .attnProbs)))
        let combined = try #require(try ActivationQuantization.combining(sideFile: side, sidePath: nil, stored: ct.inputActivations, model: w.engine.model))
        #expect(combined == w.result.quantization)
        // Without the side file, the Linear inputs alone.
        let alone = try #require(try ActivationQuantization.combining(sideFile: nil, sidePath: nil, stored: ct.inputActivations, model: w.engine.model))
        #expect(Set(alone.sites.keys) == Set(modules.map(\.site)))

        // The engine on both folders: the same features, bit for bit.
        var features: [[Float]] = []
        for folder in [w.ct, w.dq] {
            let model = try ViTModel.load(folder, overrides: .init(heads: ViTBackwardTests.heads, eps: 1e-6))
            let engine = try ViTEngine(model: model)
            let stored = try Checkpoint.open(folder).inputActivations
            let q = try #require(try ActivationQuantization.combining(sideFile: try ActivationQuantizedWriter.sideFile(in: folder), sidePath: nil, stored: stored, model: model))
            #expect(q == w.result.quantization)
            features.append(try engine.features(count: Calibration.images, fill: Calibration.fill, hook: try FakeQuantization(q, config: model.config)))
        }
        #expect(features[0].map(\.bitPattern) == features[1].map(\.bitPattern))
    }

    @Test("config.json: compressed-tensors' int-quantized group, Linear targets, the head ignored, the side file named")
    func config() throws {
        let w = try Self.write(weightBits: 4, activationBits: 6)
        let config = try #require(try JSONParser.readFile(w.ct + "/config.json"))
        #expect(config["ckpt_activation_quantization"] == .string("activation_quantization.json"))
        let q = try #require(config["quantization_config"])
        #expect(q["format"] == .string("int-quantized") && q["quant_method"] == .string("compressed-tensors") && q["quantization_status"] == .string("compressed"))
        #expect(q["ignore"] == .array([.string("head")]) && q["version"] == .string(CompressedTensors.layoutVersion))
        let group = try #require(q["config_groups"]?["group_0"])
        #expect(group["targets"] == .array([.string("Linear")]) && group["format"] == .string("int-quantized"))
        #expect(group["weights"]?["num_bits"] == .number("4") && group["weights"]?["strategy"] == .string("channel") && group["weights"]?["symmetric"] == .bool(false))
        let inputs = try #require(group["input_activations"])
        #expect(inputs["num_bits"] == .number("6") && inputs["strategy"] == .string("tensor") && inputs["dynamic"] == .bool(false)
            && inputs["symmetric"] == .bool(false) && inputs["type"] == .string("int") && inputs["observer"] == .string("percentile"))
    }

    @Test("refused: a Linear input's zero point outside int8, a per-channel Linear input, a weight off its grid; nothing is written")
    func writerRefusals() throws {
        let (engine, result) = try Calibration.calibrate(reparameterize: true)
        let checkpoint = try Checkpoint.open(engine.model.path)
        var cases: [(String, ActivationQuantization, [String: [Float]], String)] = []
        var outside = result.quantization
        try outside.set(.uniform(try UniformQuantizer(bits: 4, scale: 0.1, zeroPoint: -130)), for: .block(1, .fc2Input))
        cases.append(("zero point", outside, result.tensors, "blocks.1.fc2.input: zero point -130.0 (signed -138.0)"))
        var channel = result.quantization
        try channel.set(.uniform(try UniformQuantizer(bits: 4, granularity: .perColumn, scales: .init(repeating: 0.5, count: 16), zeroPoints: .init(repeating: 7, count: 16))),
            for: .block(0, .projInput))
        cases.append(("per channel", channel, result.tensors, "per-channel uniform quantizer"))
        var off = result.tensors
        off["blocks.2.mlp.fc1.weight"]![5] += 1e-3
        cases.append(("off grid", result.quantization, off, "row 0, column 5"))
        for (name, quantization, tensors, message) in cases {
            let root = Self.temporaryFolder()
            do {
                try ActivationQuantizedWriter.writeCompressedTensors(
                    checkpoint, changed: tensors, quantization: quantization, grids: result.weightGrids,
                    modules: engine.model.blockLinearModules, observers: Self.observers, to: Self.destination(root + "/out"))
                Issue.record("\(name): accepted")
            } catch {
                #expect(error.description.contains(message), "\(name): \(error)")
            }
            #expect(FileIdentity.of(root + "/out") == nil, "\(name): the output folder was left behind")
        }
    }

    /// The written folder with its config.json text edited by `edit` and its tensors filtered and extended.
    static func edited(_ folder: String, config edit: (String) -> String = { $0 }, drop: Set<String> = [],
                       add: [OutputTensor] = []) throws -> String {
        let out = temporaryFolder()
        let text = try ByteStorage(mapping: folder + "/config.json").withUnsafeBytes { String(decoding: $0, as: UTF8.self) }
        var config = try OutputFile(path: out + "/config.json", inputs: [])
        try config.write(Array(edit(text).utf8))
        try config.commit()
        let file = try SafeTensors.read(storage: ByteStorage(mapping: folder + "/model.safetensors"), path: folder + "/model.safetensors")
        let kept = try file.tensors.filter { !drop.contains($0.name) }.map { (e: TensorEntry) throws(CkptError) in try OutputTensor.from(e) }
        try SafeTensors.write(kept + add, metadata: [:], to: out + "/model.safetensors")
        return out
    }

    static func expectRefused(_ folder: String, _ code: CkptError.Code, _ message: String, tensor: String? = nil, load: Bool = false) {
        do {
            let checkpoint = try Checkpoint.open(folder)
            if load { for entry in checkpoint.tensors { _ = try entry.load() } }
            Issue.record("accepted (\(message))")
        } catch {
            #expect(error.code == code && error.description.contains(message), "\(error)")
            if let tensor { #expect(error.tensor == tensor, "\(error)") }
        }
    }

    @Test("the reader refuses what contradicts the config or lies outside it")
    func readerRefusals() throws {
        let w = try Self.write(weightBits: 4, activationBits: 4)
        let m = "blocks.1.mlp.fc1"
        // Dynamic input activations are computed at run time: not applied, refused.
        Self.expectRefused(try Self.edited(w.ct, config: { $0.replacingFirst("\"dynamic\": false", "\"dynamic\": true") }),
            .unsupportedDType, "dynamic input activations")
        // A declared asymmetric input without its zero point; a symmetric one with it.
        Self.expectRefused(try Self.edited(w.ct, drop: [m + ".input_zero_point"]), .missingTensor, "no \(m).input_zero_point")
        // input_scale where the config declares no input activations.
        Self.expectRefused(try Self.edited(w.ct, config: { $0.replacingFirst("\"input_activations\": {", "\"input_activations\": null, \"x\": {") }),
            .invalidData, "declares no input_activations")
        // A negative input scale.
        let negative = try OutputTensor.bytes(name: m + ".input_scale", dtype: .f32, shape: try Shape([1]), [Float(-0.5)].withUnsafeBytes { Array($0) })
        Self.expectRefused(try Self.edited(w.ct, drop: [m + ".input_scale"], add: [negative]), .invalidData, "is not a positive finite number")
        // Codes outside the declared width: 4-bit codes are −8…7.
        let wide = try OutputTensor.bytes(name: m + ".weight", dtype: .i8, shape: try Shape([ViTBackwardTests.mlp, ViTBackwardTests.dim]),
            [UInt8](repeating: UInt8(bitPattern: 9), count: ViTBackwardTests.mlp * ViTBackwardTests.dim))
        Self.expectRefused(try Self.edited(w.ct, drop: [m + ".weight"], add: [wide]), .invalidData, "outside the 4-bit range -8…7", tensor: m + ".weight", load: true)
        // Unpacked zero points only (int-quantized): a packed-shape int32 tensor is refused.
        let packedZero = try OutputTensor.bytes(name: m + ".weight_zero_point", dtype: .i32, shape: try Shape([5, 1]), [UInt8](repeating: 0, count: 20))
        Self.expectRefused(try Self.edited(w.ct, drop: [m + ".weight_zero_point"], add: [packedZero]), .invalidData, "must be int8 [40, 1]")
        // An input quantizer on a module whose weights are plain.
        let stray = try OutputTensor.bytes(name: "head.input_scale", dtype: .f32, shape: try Shape([1]), [Float(0.5)].withUnsafeBytes { Array($0) })
        Self.expectRefused(try Self.edited(w.ct, add: [stray]), .unsupportedDType, "whose weights are not quantized", tensor: "head.input_scale")
    }

    @Test("combining refuses a site given twice, modules that are no Linear input and widths outside 2…8; the head's input is one")
    func combiningRefusals() throws {
        let w = try Self.write(weightBits: 8, activationBits: 8)
        let ct = try Checkpoint.open(w.ct)
        let model = w.engine.model
        var side = try #require(try ActivationQuantizedWriter.sideFile(in: w.ct))
        try side.set(w.result.quantization[.block(0, .fc1Input)], for: .block(0, .fc1Input))
        func refused(_ side: ActivationQuantization?, _ stored: [String: CompressedTensors.InputActivation], _ code: CkptError.Code, _ message: String) {
            do {
                _ = try ActivationQuantization.combining(sideFile: side, sidePath: "side.json", stored: stored, model: model)
                Issue.record("accepted (\(message))")
            } catch {
                #expect(error.code == code && error.description.contains(message), "\(error)")
            }
        }
        refused(side, ct.inputActivations, .invalidMetadata, "blocks.0.fc1.input is given twice")
        var stray = ct.inputActivations
        stray["patch_embed.proj"] = stray["blocks.0.attn.proj"]
        refused(nil, stray, .invalidData, "patch_embed.proj carries a static input quantizer")
        // The model's head reads head.input: an input quantizer there must agree with no other, and is accepted.
        var head = ct.inputActivations
        head["head"] = head["blocks.0.attn.proj"]
        let withHead = try #require(try ActivationQuantization.combining(sideFile: nil, sidePath: nil, stored: head, model: model))
        #expect(withHead[.headInput] == withHead[.block(0, .projInput)])
        var one = ct.inputActivations
        one["blocks.2.attn.qkv"]!.bits = 1
        refused(nil, one, .invalidData, "1-bit input activations")
    }
}

extension String {
    /// The text with the first `target` replaced (the input activations come first in a config group).
    fileprivate func replacingFirst(_ target: String, _ replacement: String) -> String {
        guard let range = firstRange(of: target) else { preconditionFailure("edit target not found: \(target)") }
        var text = self
        text.replaceSubrange(range, with: replacement)
        return text
    }
}
