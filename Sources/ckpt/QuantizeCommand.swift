import ArgumentParser
import CkptCore
import CkptFormats
import CkptInference
import CkptQuant

struct QuantizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quantize",
        abstract: "Quantize Linear weights to 2–8 bits (RTN, MSE clipping, HQQ) and write MLX, GGUF, compressed-tensors or dequantized files.",
        discussion: """
            Linear weights (2-D '*.weight') are quantized in groups of --group-size along the input dimension (or \
            per output channel with --group-size 0); Conv weights too in 'dequantized' output. Norms, biases, \
            embeddings, position embeddings and class tokens stay in their dtype. A layer whose input size is not \
            a multiple of the group size is reported and kept. --method rtn reproduces each runtime's own quantizer \
            (mlx.core.quantize, ggml's reference blocks, compressed-tensors' min-max observer) bit for bit; mse \
            searches a clipping factor per group for the least squared error; hqq optimises the zero point \
            (half-quadratic, p = 0.7). mlx and compressed-tensors write a model folder (model.safetensors + \
            config.json with the quantization block); gguf and dequantized write one file (a folder when the \
            input is a Hugging Face folder and the format is dequantized). Every quantized tensor is reported with \
            its SQNR and largest error; totals give the sizes and bits per weight. \
            --gptq (ViT models, not gguf) runs the model on --calibration-images synthetic images (smooth noise, \
            no data) or on the unlabelled images of --calibration-data, takes each block Linear's input Gram \
            matrix, and rounds with GPTQ error compensation on the grid --method chooses: the layer outputs, not \
            the weights, are kept close.
            """)

    @Argument(help: "Input checkpoint (file, shard folder, or Hugging Face model folder).")
    var input: String

    @Argument(help: "Output folder (mlx, compressed-tensors, dequantized from a folder) or file (gguf, dequantized).")
    var output: String

    @Option(name: .customLong("bits"), help: "Bits per weight: 2, 3, 4, 5, 6 or 8 (default 4; gguf: implied by --gguf-type).")
    var bitsOption: Int?

    var bits: Int { bitsOption ?? 4 }

    @Option(name: .customLong("group-size"), help: "Weights per scale along the input dimension: 32, 64 or 128; 0 for one scale per output channel (default 64; gguf: fixed by the block type).")
    var groupSizeOption: Int?

    var groupSize: Int { groupSizeOption ?? 64 }

    @Option(name: .customLong("method"), help: "rtn, mse or hqq (default rtn); with --activation-bits also percentile (the default there: RepQ-ViT's per-channel percentile search).")
    var methodOption: String?
    var method: String { methodOption ?? (activationBits != nil ? "percentile" : "rtn") }

    @Option(help: "mlx, gguf, compressed-tensors or dequantized.")
    var format: String

    @Option(name: .customLong("activation-bits"), help: ArgumentHelp("Quantize activations too (2–8 bits; RepQ-ViT quantizers at every Linear input and both attention matmuls), calibrated on --calibration images: a ViT model, --format dequantized, weights per output channel.", valueName: "A"))
    var activationBits: Int?

    @Option(help: ArgumentHelp("Calibration images for --activation-bits: spdfq (default), psaq, noise or smooth synthesised from the model itself, or a PATH (npz/png of real or synthetic images).", valueName: "SOURCE"))
    var calibration: String?

    @Option(help: ArgumentHelp("Linear head for --activation-bits (its input is quantized; synthesis uses its classes). Default: the model's own.", valueName: "HEAD"))
    var head: String?

    @Option(name: .customLong("activation-range"), help: ArgumentHelp("With --activation-bits: percentile (RepQ-ViT's 0.999/0.9999/0.99999 search), minmax (nothing clipped) or search (both, least MSE).", valueName: "RULE"))
    var activationRangeOption: ActivationRange?

    @Flag(name: .customLong("reparameterize"), inversion: .prefixedNo, help: "With --activation-bits: RepQ-ViT's per-channel calibration of the LayerNorm outputs folded into the LayerNorm and the next Linear (default on).")
    var reparameterizeOption: Bool?

    @Flag(help: "Symmetric quantization (zero at the middle code): compressed-tensors and dequantized only.")
    var symmetric = false

    @Option(name: .customLong("gguf-type"), help: "GGUF block type: Q8_0, Q6_K, Q5_0, Q5_1, Q4_K, Q4_0 or Q4_1 (default from --bits: 8→Q8_0, 6→Q6_K, 5→Q5_0, 4→Q4_0). Q4_K/Q6_K rows that are not whole 256-value super-blocks fall back to Q5_0/Q8_0, as llama.cpp does.")
    var ggufType: String?

    @Option(help: ArgumentHelp("Quantize only tensors whose name matches this regular expression (searched, not anchored).", valueName: "REGEX"))
    var only: String?

    @Option(help: ArgumentHelp("Keep tensors whose name matches this regular expression.", valueName: "REGEX"))
    var skip: String?

    @Flag(help: "GPTQ error compensation from calibration images: synthetic by default, or --calibration-data (ViT models; mlx, compressed-tensors, dequantized).")
    var gptq = false

    @Flag(name: .customLong("act-order"), inversion: .prefixedNo, help: "With --gptq: round the columns in descending order of their input energy, GPTQ's act-order (default on); groups keep the stored layout.")
    var actOrderOption: Bool?
    var actOrder: Bool { actOrderOption ?? true }

    @Flag(name: .customLong("sequential"), inversion: .prefixedNo, help: "With --gptq: calibrate layer by layer, each layer's inputs taken with the layers before it already quantized, as GPTQ's reference does (default on).")
    var sequentialOption: Bool?
    var sequential: Bool { sequentialOption ?? true }

    @Option(name: .customLong("calibration-images"), help: "Calibration images for --gptq (1–1024; default 32 synthetic, or all of --calibration-data).")
    var calibrationImagesOption: Int?

    @Option(name: .customLong("calibration-data"), parsing: .singleValue, help: ArgumentHelp(
        "Calibration images for --gptq instead of synthetic ones (repeatable): PNG files or npz/npy uint8 [N,H,W(,C)], preprocessed as eval does; labels are ignored.",
        valueName: "PATH"))
    var calibrationData: [String] = []

    /// How many calibration images a --gptq run uses; with --calibration-data, the set's size is checked in `run`.
    var calibrationImages: Int { calibrationImagesOption ?? (calibrationData.isEmpty ? 32 : Self.maximumCalibrationImages) }
    static let maximumCalibrationImages = 1024

    /// Fixed by default, so a run is reproducible; another seed draws other calibration images.
    @Option(name: .customLong("calibration-seed"), help: "Seed of the synthetic calibration images for --gptq (default 20261123).")
    var calibrationSeedOption: UInt64?
    var calibrationSeed: UInt64 { calibrationSeedOption ?? 20_261_123 }

    @OptionGroup var json: JSONOutputOption

    var parsedFormat: QuantizedFormat {
        get throws {
            guard let f = QuantizedFormat(rawValue: format) else {
                throw ValidationError("--format \(format): choose mlx, gguf, compressed-tensors or dequantized")
            }
            return f
        }
    }

    var parsedMethod: QuantMethod {
        get throws {
            guard let m = QuantMethod(rawValue: method) else { throw ValidationError("--method \(method): choose rtn, mse or hqq") }
            return m
        }
    }

    func settings() throws -> QuantizationSettings {
        let format = try parsedFormat
        guard QuantizationSettings.supportedBits.contains(bits) else { throw ValidationError("--bits \(bits): choose 2, 3, 4, 5, 6 or 8") }
        guard groupSize == 0 || QuantizationSettings.supportedGroupSizes.contains(groupSize) else {
            throw ValidationError("--group-size \(groupSize): choose 32, 64, 128, or 0 for per-channel")
        }
        let grid: QuantGrid
        switch format {
        case .mlx:
            guard !symmetric else { throw ValidationError("--symmetric: MLX's layout is affine (scale and bias per group); use compressed-tensors or dequantized") }
            guard groupSize != 0 else { throw ValidationError("--group-size 0: MLX quantizes in groups of 32, 64 or 128") }
            grid = .mlxAffine
        case .compressedTensors:
            grid = symmetric ? .symmetric : .integerZeroPoint
        case .dequantized:
            grid = symmetric ? .symmetric : .mlxAffine
        case .gguf:
            guard !symmetric else {
                throw ValidationError("--symmetric: the GGUF block type fixes the grid (Q8_0, Q6_K, Q5_0 and Q4_0 are symmetric; Q5_1, Q4_1 and Q4_K affine); choose it with --gguf-type")
            }
            guard groupSizeOption == nil else {
                throw ValidationError("--group-size \(groupSize): GGUF blocks fix the group (32 values; 256 for Q4_K/Q6_K); choose it with --gguf-type")
            }
            guard try parsedMethod == .rtn else {
                throw ValidationError("--method \(method): GGUF blocks are ggml's reference quantizers (rtn); mse and hqq apply to mlx, compressed-tensors and dequantized")
            }
            grid = .symmetric
        }
        return QuantizationSettings(bits: bits, groupSize: groupSize == 0 ? nil : groupSize, method: try parsedMethod, grid: grid)
    }

    func validate() throws {
        if activationBits != nil { return try validateActivationQuantization() }
        if calibration != nil || head != nil || reparameterizeOption != nil || activationRangeOption != nil {
            throw ValidationError("--calibration, --head, --activation-range and --[no-]reparameterize apply to --activation-bits")
        }
        _ = try settings()
        if try parsedFormat == .gguf {
            _ = try ggmlType()
        } else if let ggufType {
            throw ValidationError("--gguf-type \(ggufType) applies to --format gguf")
        }
        if input == output { throw ValidationError("input and output are the same path") }
        try validateOutputExtension()
        if try gptq && parsedFormat == .gguf {
            throw ValidationError("--gptq: GGUF blocks are ggml's reference quantizers; GPTQ applies to mlx, compressed-tensors and dequantized")
        }
        guard (1...Self.maximumCalibrationImages).contains(calibrationImages) else {
            throw ValidationError("--calibration-images \(calibrationImages): choose 1 to \(Self.maximumCalibrationImages)")
        }
        if !gptq && (actOrderOption != nil || sequentialOption != nil) {
            throw ValidationError("--[no-]act-order and --[no-]sequential apply to --gptq")
        }
        if !gptq && (calibrationImagesOption != nil || !calibrationData.isEmpty || calibrationSeedOption != nil) {
            throw ValidationError("--calibration-images, --calibration-data and --calibration-seed apply to --gptq")
        }
        if !calibrationData.isEmpty && calibrationSeedOption != nil {
            throw ValidationError("--calibration-seed draws synthetic images; --calibration-data images need none")
        }
    }

    /// OUT's extension must not name another format than the one written: a `.npz` of safetensors bytes, or a
    /// folder called `x.safetensors`, is a file no reader (ckpt's included) takes for what it is.
    func validateOutputExtension() throws {
        let format = try parsedFormat
        let fileFormats = ["safetensors", "gguf", "npz", "npy"]
        let ext = FilePaths.fileExtension(of: output.hasSuffix("/") ? String(output.dropLast()) : output)
        guard fileFormats.contains(ext) else { return }
        let writesFolder = format == .mlx || format == .compressedTensors || (format == .dequantized && FileIdentity.of(input)?.isDirectory == true)
        if writesFolder {
            throw ValidationError(
                "--format \(format.rawValue) writes a model folder (model.safetensors + config.json) here; OUT '\(output)' names a .\(ext) file")
        }
        let expected = format == .gguf ? "gguf" : "safetensors"
        if ext != expected {
            throw ValidationError("--format \(format.rawValue) writes a .\(expected) file; OUT '\(output)' names a .\(ext) file")
        }
    }

    /// GPTQ for the planned block Linears (factors, or with sequential calibration the finished results), from the model's own forward pass on the calibration images, and
    /// how many images that took.
    func compensation(plan: [PlannedTensor], settings: QuantizationSettings) throws(CkptError) -> (factors: [String: GPTQCompensation], images: Int) {
        let model = try ViTModel.load(input)
        let engine = try ViTEngine(model: model)
        let count: Int
        let fill: @Sendable (Int, UnsafeMutablePointer<Float>) throws(CkptError) -> Void
        if calibrationData.isEmpty {
            let (channels, size, seed) = (model.config.channels, engine.imageSize, calibrationSeed)
            count = calibrationImages
            fill = { index, destination in CalibrationImages.smoothNoise(index: index, seed: seed, channels: channels, size: size, into: destination) }
        } else {
            let images = try ImageSet.load(calibrationData, ignoringLabels: true)
            count = calibrationImagesOption ?? min(images.count, Self.maximumCalibrationImages)
            guard count <= images.count else {
                throw CkptError(.invalidArgument, "--calibration-images \(count): the calibration data holds \(images.count) images",
                    path: calibrationData.joined(separator: ", "))
            }
            let (size, config) = (engine.imageSize, model.config)
            fill = { (index: Int, destination: UnsafeMutablePointer<Float>) throws(CkptError) in
                try images.fill(index, size: size, config: config, into: destination)
            }
        }
        var planned: [String: PlannedTensor] = [:]
        for item in plan where item.isQuantized { planned[item.entry.name] = item }
        var compensation: [String: GPTQCompensation] = [:]
        func factor(_ tensor: String, _ gram: LinearInputGram) throws(CkptError) -> GPTQ? {
            guard let item = planned[tensor], gram.width == item.cols else { return nil }
            return try GPTQ(gram: gram.values, size: gram.width, actOrder: actOrder, tensor: tensor, path: item.entry.path)
        }
        if sequential {
            try engine.sequentialCalibration(count: count, fill: fill) { (layer: LinearLayer, gram: LinearInputGram) throws(CkptError) -> [Float]? in
                guard let gptq = try factor(layer.tensor, gram), let item = planned[layer.tensor] else { return nil }
                // Rounded once, here, with the settings the writer uses for this tensor; the writer stores the result.
                let matrix = try gptq.quantize(item, settings: QuantizedCheckpointWriter.settings(for: item.entry, base: settings))
                compensation[layer.tensor] = .quantized(matrix)
                return matrix.storedValues()
            }
        } else {
            for (tensor, gram) in try engine.linearInputGrams(count: count, fill: fill) {
                if let gptq = try factor(tensor, gram) { compensation[tensor] = .factor(gptq) }
            }
        }
        return (compensation, count)
    }

    func run() throws {
        if activationBits != nil { return try runActivationQuantization() }
        try runReportingErrors {
            let started = MonotonicClock.seconds()
            let format = try parsedFormat
            let settings = try settings()
            let checkpoint = try Checkpoint.open(input)
            let inputIsFolder = FileIdentity.of(input)?.isDirectory == true
            // A folder's config files are read too; none of them may be overwritten.
            let configFiles = inputIsFolder ? ["config.json", "preprocessor_config.json"].map { FilePaths.join(input, $0) } : []
            let inputs = (checkpoint.files + configFiles).compactMap(FileIdentity.of)
            if inputIsFolder, let out = FileIdentity.of(output), out.sameFile(as: FileIdentity.of(input)!) {
                throw CkptError(.sameInputOutput, "the output folder is the input folder (\(input)); choose another", path: output)
            }
            let selection = try TensorSelection(only: only, skip: skip)
            var report: QuantizationReport
            var calibrationUsed: Int? = nil
            if format == .gguf {
                report = try quantizeToGGUF(checkpoint, selection: selection, inputs: inputs, inputIsFolder: inputIsFolder)
            } else {
                let plan = QuantizationPlan.make(checkpoint, selection: selection, format: format, blockSize: settings.groupSize)
                try QuantizationPlan.requireQuantized(plan, path: input)
                let folder = format != .dequantized || inputIsFolder
                let companions = inputIsFolder
                    ? ["preprocessor_config.json"].map { FilePaths.join(input, $0) }.filter { FileIdentity.of($0) != nil } : []
                let destination = QuantizedCheckpointWriter.Destination(
                    path: output, folder: folder, inputConfig: inputIsFolder ? try inputConfig() : nil, companions: companions, inputs: inputs)
                var factors: [String: GPTQCompensation] = [:]
                if gptq { (factors, calibrationUsed) = try compensation(plan: plan, settings: settings) }
                report = try QuantizedCheckpointWriter.write(
                    checkpoint, plan: plan, format: format, settings: settings, compensation: factors, to: destination)
            }
            report.seconds = MonotonicClock.seconds() - started
            print(json.enabled ? reportJSON(report, format: format, calibrationImages: calibrationUsed) : reportTable(report, calibrationImages: calibrationUsed))
        }
    }

    /// The input folder's config.json, which the output's extends: it must be a JSON object (or absent).
    func inputConfig() throws(CkptError) -> JSONValue? {
        let path = FilePaths.join(input, "config.json")
        let config = try JSONParser.readFile(path)
        if let config, case .object = config { return config }
        if config != nil { throw CkptError(.invalidMetadata, "config.json must be a JSON object", path: path) }
        return nil
    }

    func reportTable(_ report: QuantizationReport, calibrationImages used: Int?) -> String {
        var rows: [[String]] = []
        for t in report.tensors where t.scheme != nil || t.isWeightMatrix {
            rows.append([
                t.name, Formatting.shape(t.shape), t.scheme ?? "kept: " + (t.keptReason ?? ""),
                t.bits.map(String.init) ?? "-", t.scheme == nil ? "-" : (t.groupSize.map(String.init) ?? "channel"),
                t.sqnr.map { Formatting.printf("%.2f", $0) } ?? "-", t.maxError.map { Formatting.printf("%.3g", Double($0)) } ?? "-",
            ])
        }
        var out = Formatting.table(["tensor", "shape", "layout", "bits", "group", "SQNR dB", "max err"], rows, rightAligned: [3, 4, 5, 6])
        let kept = report.tensors.filter { $0.scheme == nil }
        let quantized = report.quantized
        let meanSQNR = report.meanSQNR
        out += "\n\nquantized \(quantized.count) tensors (\(Formatting.grouped(report.quantizedWeights)) weights) at "
            + Formatting.printf("%.3f", report.bitsPerWeight) + " bits/weight (scales included), mean SQNR "
            + Formatting.printf("%.2f", meanSQNR) + " dB; kept \(kept.count) tensors in their dtype"
        out += "\nsize: \(Formatting.grouped(report.inputBytes)) → \(Formatting.grouped(report.outputBytes)) bytes ("
            + Formatting.printf("%.2f", Double(report.inputBytes) / Double(max(report.outputBytes, 1))) + "× smaller, "
            + Formatting.printf("%.3f", report.overallBitsPerWeight) + " bits/parameter overall) in "
            + Formatting.printf("%.2f", report.seconds) + " s"
        if let used {
            out += "\nGPTQ calibration: \(used) " + (calibrationData.isEmpty ? "synthetic smooth-noise images (seed \(calibrationSeed))"
                : "images from " + calibrationData.map(TerminalText.escaped).joined(separator: ", "))
            let passes = [actOrder ? "act-order" : nil, sequential ? "sequential" : nil].compactMap { $0 }
            if !passes.isEmpty { out += "; " + passes.joined(separator: ", ") }
        }
        out += "\nwrote \(TerminalText.escaped(output))"
        return out
    }

    /// Bits and group of the whole run: for GGUF, the block type's.
    var reportedBits: Int { (try? parsedFormat) == .gguf ? ((try? ggmlType())?.bits ?? bits) : bits }
    var reportedGroup: String {
        if (try? parsedFormat) == .gguf { return (try? ggmlType()).map { String($0.blockSize) } ?? "null" }
        return groupSize == 0 ? "null" : String(groupSize)
    }

    func reportJSON(_ report: QuantizationReport, format: QuantizedFormat, calibrationImages used: Int?) -> String {
        func number(_ x: Double?) -> String { x.map(Formatting.jsonNumber) ?? "null" }
        var items: [String] = []
        for t in report.tensors {
            var fields = [
                "\"name\":\(JSONWriter.quoted(t.name))", "\"shape\":[\(t.shape.dims.map(String.init).joined(separator: ","))]",
                "\"quantized\":\(t.scheme != nil)", "\"output_bytes\":\(t.outputBytes)",
            ]
            if let scheme = t.scheme {
                fields += [
                    "\"layout\":\(JSONWriter.quoted(scheme))", "\"bits\":\(t.bits ?? 0)",
                    "\"group_size\":\(t.groupSize.map(String.init) ?? "null")", "\"sqnr_db\":\(number(t.sqnr))",
                    "\"max_error\":\(number(t.maxError.map(Double.init)))",
                ]
            } else {
                fields.append("\"kept\":\(JSONWriter.quoted(t.keptReason ?? ""))")
            }
            items.append("{" + fields.joined(separator: ",") + "}")
        }
        var calibration = ""
        if let used {
            let source = calibrationData.isEmpty
                ? "{\"synthetic\":\"smooth-noise\",\"seed\":\(calibrationSeed)}"
                : "{\"data\":[" + calibrationData.map { JSONWriter.quoted($0) }.joined(separator: ",") + "]}"
            calibration = "\"calibration_images\":\(used),\"calibration\":" + source + ",\"act_order\":\(actOrder),\"sequential\":\(sequential),"
        }
        return "{\"input\":\(JSONWriter.quoted(input)),\"output\":\(JSONWriter.quoted(output)),\"format\":\(JSONWriter.quoted(format.rawValue)),"
            + "\"method\":\(JSONWriter.quoted(method)),\"gptq\":\(gptq)," + calibration + "\"bits\":\(reportedBits),\"group_size\":\(reportedGroup),"
            + "\"input_bytes\":\(report.inputBytes),\"output_bytes\":\(report.outputBytes),"
            + "\"quantized_weights\":\(report.quantizedWeights),\"bits_per_weight\":\(number(report.bitsPerWeight)),"
            + "\"bits_per_parameter\":\(number(report.overallBitsPerWeight)),\"mean_sqnr_db\":\(number(report.meanSQNR)),"
            + "\"quantized_tensors\":\(report.quantized.count),\"kept_tensors\":\(report.tensors.count - report.quantized.count),"
            + "\"seconds\":\(number(report.seconds)),\"tensors\":[" + items.joined(separator: ",") + "]}"
    }
}

extension TensorReport {
    /// Kept tensors the table lists: weight matrices (so a skipped Linear is visible), not every bias and norm.
    var isWeightMatrix: Bool { shape.rank >= 2 && name.hasSuffix("weight") }
}
