import ArgumentParser
import CkptCore
import CkptFormats
import CkptInference
import CkptKernels
import CkptQuant
import CkptSynthesis

/// `ckpt quantize --activation-bits`: RepQ-ViT-style weight + activation quantization, calibrated without data on
/// images the model synthesises (or on the images of --calibration PATH).
extension ActivationRange: ExpressibleByArgument {}

extension QuantizeCommand {
    /// Where the calibration images come from.
    enum CalibrationSource: Equatable {
        case synthesized(SynthesisMethod)
        case files([String])

        init(_ text: String?) {
            if let text, let method = SynthesisMethod(rawValue: text) {
                self = .synthesized(method)
            } else if let text {
                self = .files([text])
            } else {
                self = .synthesized(.spdfq)
            }
        }

        var description: String {
            switch self {
            case .synthesized(let method): "\(method.rawValue) (synthesised from the model)"
            case .files(let paths): paths.map(TerminalText.escaped).joined(separator: ", ")
            }
        }
    }

    var weightMethod: WeightQuantizationMethod {
        get throws {
            guard let m = WeightQuantizationMethod(rawValue: method) else {
                throw ValidationError("--method \(method): with --activation-bits choose percentile, rtn, mse or hqq")
            }
            return m
        }
    }

    func validateActivationQuantization() throws {
        guard let activationBits, (2...8).contains(activationBits) else {
            throw ValidationError("--activation-bits \(activationBits ?? 0): choose 2 to 8")
        }
        guard (2...8).contains(bits) else { throw ValidationError("--bits \(bits): with --activation-bits choose 2 to 8") }
        let weightMethod = try weightMethod
        if weightMethod != .percentile, !QuantizationSettings.supportedBits.contains(bits) {
            throw ValidationError("--bits \(bits): --method \(method) takes 2, 3, 4, 5, 6 or 8 bits (percentile takes 2–8)")
        }
        guard format == QuantizedFormat.dequantized.rawValue || format == QuantizedFormat.compressedTensors.rawValue else {
            throw ValidationError("--format \(format): --activation-bits writes a model folder with its activation side file: --format dequantized (F32 weights on their grid) or compressed-tensors (int-quantized Linears with static input scales)")
        }
        if let groupSizeOption, groupSizeOption != 0 {
            throw ValidationError("--group-size \(groupSizeOption): --activation-bits quantizes weights per output channel (RepQ-ViT)")
        }
        if gptq || ggufType != nil || symmetric || only != nil || skip != nil || !calibrationData.isEmpty || actOrderOption != nil || sequentialOption != nil {
            throw ValidationError("--gptq, --gguf-type, --symmetric, --only, --skip and --calibration-data do not apply to --activation-bits (images: --calibration)")
        }
        if input == output { throw ValidationError("input and output are the same path") }
        let ext = FilePaths.fileExtension(of: output.hasSuffix("/") ? String(output.dropLast()) : output)
        if ["safetensors", "gguf", "npz", "npy"].contains(ext) {
            throw ValidationError("--activation-bits writes a model folder (model.safetensors, \(ActivationQuantizedWriter.sideFileName), config.json); OUT '\(output)' names a .\(ext) file")
        }
        guard (1...Self.maximumCalibrationImages).contains(calibrationImages) else {
            throw ValidationError("--calibration-images \(calibrationImages): choose 1 to \(Self.maximumCalibrationImages)")
        }
        if case .files = CalibrationSource(calibration), calibrationSeedOption != nil {
            throw ValidationError("--calibration-seed draws synthetic images; --calibration PATH images need none")
        }
    }

    func runActivationQuantization() throws {
        try runReportingErrors {
            let started = MonotonicClock.seconds()
            let activationBits = activationBits!
            let source = CalibrationSource(calibration)
            let inputIsFolder = FileIdentity.of(input)?.isDirectory == true
            let checkpoint = try Checkpoint.open(input)
            // A quantized input reads back dequantized: quantizing it again would round twice (and drop its activation
            // quantizers), as the weight-only path refuses too.
            if let first = checkpoint.tensors.first(where: { $0.quantization != nil }), let q = first.quantization {
                throw CkptError(.invalidArgument,
                    "the input is already quantized (\(q.scheme) \(q.bits)-bit); quantize its float checkpoint, or dequantize it first with `ckpt convert IN plain.safetensors`",
                    path: input, tensor: first.name)
            }
            if let module = checkpoint.inputActivations.keys.sorted().first {
                throw CkptError(.invalidArgument, "the input is already activation quantized (\(module).input_scale); quantize its float checkpoint", path: input)
            }
            if inputIsFolder, FileIdentity.of(FilePaths.join(input, ActivationQuantizedWriter.sideFileName)) != nil {
                throw CkptError(.invalidArgument,
                    "the input is already activation quantized (it has \(ActivationQuantizedWriter.sideFileName)); quantize its float checkpoint",
                    path: FilePaths.join(input, ActivationQuantizedWriter.sideFileName))
            }
            let configFiles = inputIsFolder ? ["config.json", "preprocessor_config.json"].map { FilePaths.join(input, $0) } : []
            let inputs = (checkpoint.files + configFiles + [head].compactMap { $0 }).compactMap(FileIdentity.of)
            if inputIsFolder, let out = FileIdentity.of(output), out.sameFile(as: FileIdentity.of(input)!) {
                throw CkptError(.sameInputOutput, "the output folder is the input folder (\(input)); choose another", path: output)
            }
            // The images first: a bad calibration file fails before the model loads.
            var imageSet: ImageSet? = nil
            if case .files(let paths) = source { imageSet = try ImageSet.load(paths, ignoringLabels: true) }
            let model = try ViTModel.load(input)
            let engine = try ViTEngine(model: model)
            let c = model.config, size = engine.imageSize, plane = c.channels * size * size
            let headModel = try head.map { (path: String) throws(CkptError) in try LinearHead.load(path) } ?? model.head
            if let headModel, headModel.width != c.dim {
                throw CkptError(.shapeMismatch, "head width \(headModel.width) ≠ model width \(c.dim)", path: headModel.source)
            }
            // Calibration images.
            let count: Int
            let images: FloatBuffer?
            var synthesisSeconds = 0.0
            switch source {
            case .synthesized(let method):
                count = calibrationImages
                // The defaults of `ckpt synthesize`: the standard resolution schedule.
                let schedule = try SynthesisSchedule.standard(imageSize: size, patchSize: c.patchSize)
                var settings = SynthesisSettings(method: method, steps: schedule.totalSteps, seed: calibrationSeed)
                if settings.optimises { settings.schedule = schedule } else { settings.steps = 0 }
                let synthesizer = try Synthesizer(engine: engine, head: headModel, settings: settings)
                let buffer = try FloatBuffer(count: try CheckedSize.product([count, plane], "\(count) calibration images"))
                let printer = SynthesisProgressPrinter(method: method.rawValue, optimises: settings.optimises, stages: settings.optimises ? schedule.stages.count : 0)
                let t0 = MonotonicClock.seconds()
                _ = try synthesizer.synthesize(indices: Array(0..<count), into: buffer.pointer) { printer.report($0) }
                printer.finish()
                synthesisSeconds = MonotonicClock.seconds() - t0
                images = buffer
            case .files:
                let set = imageSet!
                count = calibrationImagesOption ?? min(set.count, Self.maximumCalibrationImages)
                guard count <= set.count else {
                    throw CkptError(.invalidArgument, "--calibration-images \(count): the calibration data holds \(set.count) images", path: calibration)
                }
                images = nil
            }
            let fill: @Sendable (Int, UnsafeMutablePointer<Float>) throws(CkptError) -> Void
            if let images {
                fill = { index, destination in destination.update(from: images.pointer + index * plane, count: plane) }
            } else {
                let set = imageSet!
                fill = { (index: Int, destination: UnsafeMutablePointer<Float>) throws(CkptError) in try set.fill(index, size: size, config: c, into: destination) }
            }
            var settings = ActivationCalibrationSettings(weightBits: bits, activationBits: activationBits)
            settings.weightMethod = try weightMethod
            settings.reparameterize = reparameterizeOption ?? true
            settings.activationRange = activationRangeOption ?? .percentile
            let t1 = MonotonicClock.seconds()
            let result = try engine.calibrateActivations(count: count, fill: fill, head: headModel, settings: settings) { line in
                if !json.enabled { StandardError.write("quantize: \(line)\n") }
            }
            let calibrationSeconds = MonotonicClock.seconds() - t1
            let companions = inputIsFolder ? ["preprocessor_config.json"].map { FilePaths.join(input, $0) }.filter { FileIdentity.of($0) != nil } : []
            let destination = QuantizedCheckpointWriter.Destination(
                path: output, folder: true, inputConfig: inputIsFolder ? try inputConfig() : nil, companions: companions, inputs: inputs)
            if format == QuantizedFormat.compressedTensors.rawValue {
                try ActivationQuantizedWriter.writeCompressedTensors(
                    checkpoint, changed: result.tensors, quantization: result.quantization, grids: result.weightGrids,
                    modules: model.blockLinearModules, observers: compressedTensorsObservers(settings), to: destination)
            } else {
                try ActivationQuantizedWriter.write(checkpoint, changed: result.tensors, quantization: result.quantization, to: destination)
            }
            let seconds = MonotonicClock.seconds() - started
            print(json.enabled
                ? activationReportJSON(result, source: source, count: count, synthesisSeconds: synthesisSeconds, calibrationSeconds: calibrationSeconds, seconds: seconds)
                : activationReportTable(result, source: source, count: count, synthesisSeconds: synthesisSeconds, calibrationSeconds: calibrationSeconds, seconds: seconds))
        }
    }

    /// The config group's informational `observer` names: the weight method (compressed-tensors' names where it has
    /// them) and the activation range rule.
    func compressedTensorsObservers(_ settings: ActivationCalibrationSettings) -> ActivationQuantizedWriter.Observers {
        let weights: String
        switch settings.weightMethod {
        case .percentile: weights = "percentile"
        case .rtn: weights = "memoryless_minmax"
        case .mse: weights = "mse"
        case .hqq: weights = "hqq"
        }
        let inputs: String
        switch settings.activationRange {
        case .percentile: inputs = "percentile"
        case .minmax: inputs = "minmax"
        case .search: inputs = "mse"
        }
        return ActivationQuantizedWriter.Observers(weights: weights, inputActivations: inputs)
    }

    func activationReportTable(
        _ r: ActivationCalibration, source: CalibrationSource, count: Int, synthesisSeconds: Double, calibrationSeconds: Double, seconds: Double
    ) -> String {
        var rows: [[String]] = []
        for s in r.sites {
            let (kind, scale, zero): (String, Float, Float)
            switch s.quantizer {
            case .uniform(let q): (kind, scale, zero) = ("uniform", q.scales[0], q.zeroPoints[0])
            case .logSqrt2(let q): (kind, scale, zero) = ("log√2", q.scale, 0)
            }
            rows.append([s.site.name, kind, String(s.quantizer.bits), Formatting.printf("%.5g", Double(scale)), Formatting.printf("%.0f", Double(zero)),
                Formatting.printf("%.5g", s.percentile), Formatting.printf("%.3g", s.meanSquaredError), Formatting.printf("%.4f", s.clipped * 100)])
        }
        var out = Formatting.table(["site", "quantizer", "bits", "scale", "zero", "percentile", "MSE", "clipped %"], rows, rightAligned: [2, 3, 4, 5, 6, 7])
        let sqnr = r.weights.map(\.sqnr).filter(\.isFinite)
        out += "\n\n\(r.weights.count) weight matrices at \(r.settings.weightBits) bits per output channel (\(r.settings.weightMethod.rawValue)), mean SQNR "
            + Formatting.printf("%.2f", sqnr.reduce(0, +) / Double(max(sqnr.count, 1))) + " dB; \(r.sites.count) activation sites at \(r.settings.activationBits) bits"
            + " (patch input \(r.settings.patchInputBits))" + (r.settings.reparameterize ? ", post-LayerNorm sites folded" : "")
        out += "\ncalibration: \(count) images, \(source.description)"
            + (synthesisSeconds > 0 ? "; synthesis \(Formatting.printf("%.1f", synthesisSeconds)) s" : "")
            + "; calibration \(Formatting.printf("%.1f", calibrationSeconds)) s; total \(Formatting.printf("%.1f", seconds)) s"
        out += "\nwrote \(TerminalText.escaped(output)) ("
            + (format == QuantizedFormat.compressedTensors.rawValue ? "compressed-tensors \(ActivationQuantizedWriter.compressedTensorsFormat) " : "")
            + "model.safetensors, \(ActivationQuantizedWriter.sideFileName), config.json)"
        return out
    }

    func activationReportJSON(
        _ r: ActivationCalibration, source: CalibrationSource, count: Int, synthesisSeconds: Double, calibrationSeconds: Double, seconds: Double
    ) -> String {
        let sites = r.sites.map { s in
            "{\"site\":\(JSONWriter.quoted(s.site.name)),\"kind\":\(JSONWriter.quoted(s.quantizer.kind.rawValue)),\"bits\":\(s.quantizer.bits),"
                + "\"percentile\":\(Formatting.jsonNumber(s.percentile)),\"mse\":\(Formatting.jsonNumber(s.meanSquaredError)),"
                + "\"values\":\(s.values),\"clipped\":\(Formatting.jsonNumber(s.clipped))}"
        }
        let weights = r.weights.map { w in
            "{\"tensor\":\(JSONWriter.quoted(w.tensor)),\"shape\":[\(w.rows),\(w.columns)],\"sqnr_db\":\(w.sqnr.isFinite ? Formatting.jsonNumber(w.sqnr) : "null")}"
        }
        let sourceJSON: String
        switch source {
        case .synthesized(let method): sourceJSON = "{\"synthesized\":\(JSONWriter.quoted(method.rawValue)),\"seed\":\(calibrationSeed)}"
        case .files(let paths): sourceJSON = "{\"data\":[" + paths.map { JSONWriter.quoted($0) }.joined(separator: ",") + "]}"
        }
        return "{\"input\":\(JSONWriter.quoted(input)),\"output\":\(JSONWriter.quoted(output)),\"format\":\(JSONWriter.quoted(format)),"
            + "\"weight_bits\":\(r.settings.weightBits),\"activation_bits\":\(r.settings.activationBits),\"method\":\(JSONWriter.quoted(r.settings.weightMethod.rawValue)),"
            + "\"reparameterize\":\(r.settings.reparameterize),\"activation_range\":\(JSONWriter.quoted(r.settings.activationRange.rawValue)),\"calibration\":\(sourceJSON),\"calibration_images\":\(count),"
            + "\"synthesis_seconds\":\(Formatting.jsonNumber(synthesisSeconds)),\"calibration_seconds\":\(Formatting.jsonNumber(calibrationSeconds)),"
            + "\"seconds\":\(Formatting.jsonNumber(seconds)),\"sites\":[\(sites.joined(separator: ","))],\"weights\":[\(weights.joined(separator: ","))]}"
    }
}
