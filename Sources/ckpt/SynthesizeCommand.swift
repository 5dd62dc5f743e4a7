import ArgumentParser
import CkptCore
import CkptFormats
import CkptInference
import CkptKernels
import CkptSynthesis
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

extension SynthesisMethod: ExpressibleByArgument {}

/// `ckpt synthesize`: calibration images made by the model itself, with no data.
struct SynthesizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "synthesize",
        abstract: "Make calibration images from a ViT itself, with no data (SPDFQ, PSAQ-ViT, or noise baselines).",
        discussion: """
            spdfq optimises images from Gaussian noise with Adam (jitter, flip, clipped to the valid pixel box) on \
            α·L_APA + L_SL + 0.05·L_TV: random Gaussian-mixture attention priors per head on the CLS attention of the \
            deeper half of the blocks (APA), soft labels for the image and for 1–4 of its quarters cropped and resized \
            each step (SL + MSR). Without a head there are no classes: APA + TV + patch-similarity entropy. psaq is \
            PSAQ-ViT's patch-similarity entropy + cross-entropy + TV; noise and smooth are not optimised. \
            --schedule SIZE:STEPS,… optimises at each size in turn (multiples of the patch size; the image resized \
            bilinearly between stages, Adam restarted, one learning-rate schedule over all steps); --steps S is one \
            stage of S steps at the model's size; the default is \(SynthesizeCommand.defaultLowSteps) steps at half \
            the patch grid then \(SynthesizeCommand.defaultFullSteps) at the model's size (112:\(SynthesizeCommand.defaultLowSteps),\
            224:\(SynthesizeCommand.defaultFullSteps) for a 224 px ViT). \
            OUT (.npz) gets `images` F32 [N, C, S, S] at the model's size (normalised, what --calibration-data and \
            eval read), `index` [N] (each image's index in the full run), one `loss_<term>` [N] per final loss term and \
            `synthesis` (the settings as UTF-8 JSON bytes). Image i depends only on (model, settings, seed, i): \
            --shard K/N writes images K, K+N, … bit-identical to the same images of a full run, and `ckpt convert \
            a.npz b.npz … all.npz` merges shards. --log writes the mean losses of every step as CSV. See \
            formats/synthesis.md.
            """)

    /// The default schedule: steps at half the patch grid, then at the model's input size.
    static let defaultLowSteps = SynthesisSchedule.defaultLowSteps
    static let defaultFullSteps = SynthesisSchedule.defaultFullSteps

    @Argument(help: "The model (file, shards or Hugging Face folder).")
    var model: String

    @Argument(help: "Output .npz.")
    var output: String

    @Option(help: ArgumentHelp("Linear head (safetensors weight/bias); default: the model's own. Without one, spdfq has no classes.", valueName: "HEAD"))
    var head: String?

    @Option(help: "spdfq, psaq, noise or smooth.")
    var method: SynthesisMethod = .spdfq

    @Option(name: .customLong("images"), help: ArgumentHelp("Images in the full run.", valueName: "N"))
    var count: Int = SynthesisSchedule.defaultImages

    @Option(help: ArgumentHelp("Optimisation steps per image, all at the model's input size (spdfq, psaq).", valueName: "S"))
    var steps: Int?

    @Option(help: ArgumentHelp(
        "Resolution schedule: steps at each size in turn (default \(defaultLowSteps) at half the grid, then \(defaultFullSteps) at the model's size).",
        valueName: "SIZE:STEPS,…"))
    var schedule: String?

    @Option(help: ArgumentHelp("Seed of every random draw.", valueName: "N"))
    var seed: UInt64 = 0

    @Option(help: ArgumentHelp("Write only images K, K+N, … (K counts from 0).", valueName: "K/N"))
    var shard: String?

    @Option(name: .customLong("learning-rate"), help: ArgumentHelp("Adam's base learning rate on normalised pixels.", valueName: "LR"))
    var learningRate: Double = 0.25

    @Option(name: .customLong("attention-weight"), help: ArgumentHelp("α, the weight of the attention-prior loss.", valueName: "A"))
    var attentionWeight: Double = 1e4

    @Flag(name: .customLong("no-attention-priors"), help: "spdfq without APA (ablation).")
    var noAttentionPriors = false

    @Flag(name: .customLong("no-regions"), help: "spdfq without multi-semantic regions (ablation).")
    var noRegions = false

    @Flag(name: .customLong("no-soft-labels"), help: "spdfq with one-hot labels instead of soft ones (ablation).")
    var noSoftLabels = false

    @Option(help: ArgumentHelp("Write a PNG contact sheet of the images.", valueName: "SHEET.png"))
    var preview: String?

    @Option(help: ArgumentHelp("Write the mean losses of every step as CSV (step, size, labels, attention, total_variation, similarity).",
        valueName: "LOSSES.csv"))
    var log: String?

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var json: JSONOutputOption

    /// (K, N) of `--shard K/N`.
    func shardSpec() throws -> (index: Int, count: Int) {
        guard let shard else { return (0, 1) }
        let parts = shard.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let k = Int(parts[0]), let n = Int(parts[1]), n >= 1, k >= 0, k < n else {
            throw ValidationError("--shard '\(shard)': expected K/N with 0 ≤ K < N (K counts from 0)")
        }
        return (k, n)
    }

    func validate() throws {
        guard FilePaths.fileExtension(of: output) == "npz" else { throw ValidationError("\(output): the output must be a .npz") }
        guard (1...1_000_000).contains(count) else { throw ValidationError("--images must be in 1…1000000") }
        if let steps, !(1...1_000_000).contains(steps) { throw ValidationError("--steps must be in 1…1000000") }
        if steps != nil, schedule != nil { throw ValidationError("--steps and --schedule exclude each other (--steps S is the schedule SIZE:S at the model's size)") }
        _ = try parsedSchedule()
        guard learningRate.isFinite, learningRate > 0 else { throw ValidationError("--learning-rate must be positive") }
        guard attentionWeight.isFinite, attentionWeight >= 0 else { throw ValidationError("--attention-weight must be ≥ 0") }
        if let preview, FilePaths.fileExtension(of: preview) != "png" { throw ValidationError("\(preview): --preview writes a .png") }
        if let log, FilePaths.fileExtension(of: log) != "csv" { throw ValidationError("\(log): --log writes a .csv") }
        let inputs = [model, head].compactMap { $0 }
        let outputs = [output, preview, log].compactMap { $0 }
        for out in outputs where inputs.contains(out) {
            throw ValidationError("\(out): an output must not overwrite an input")
        }
        if Set(outputs).count != outputs.count { throw ValidationError("OUT, --preview and --log must name different files") }
        if method != .spdfq, noAttentionPriors || noRegions || noSoftLabels {
            throw ValidationError("--no-attention-priors, --no-regions and --no-soft-labels are spdfq's ablations")
        }
        _ = try shardSpec()
    }

    /// `--schedule`, parsed (the patch-size rule is checked once the model is read).
    func parsedSchedule() throws -> SynthesisSchedule? {
        guard let schedule else { return nil }
        do { return try SynthesisSchedule(parsing: schedule) } catch { throw ValidationError("--schedule: \(error.message)") }
    }

    /// The stages for a model of `imageSize` px and `patchSize` px patches: --schedule, --steps, or the default.
    func resolvedSchedule(imageSize: Int, patchSize: Int) throws -> SynthesisSchedule {
        if let given = try parsedSchedule() { return given }
        if let steps { return try SynthesisSchedule.single(size: imageSize, steps: steps) }
        return try SynthesisSchedule.standard(imageSize: imageSize, patchSize: patchSize, lowSteps: Self.defaultLowSteps, fullSteps: Self.defaultFullSteps)
    }

    func settings(schedule: SynthesisSchedule) -> SynthesisSettings {
        var s = SynthesisSettings(method: method, steps: schedule.totalSteps, seed: seed)
        s.schedule = schedule
        s.learningRate = learningRate
        s.attentionWeight = attentionWeight
        s.attentionPriors = !noAttentionPriors
        s.regions = !noRegions
        s.softLabels = !noSoftLabels
        return s
    }

    func run() throws {
        try runReportingErrors {
            let (k, n) = try shardSpec()
            let engine = try modelOptions.load(model)
            let c = engine.model.config
            let headModel = try head.map { (path: String) throws(CkptError) in try LinearHead.load(path) } ?? engine.model.head
            let stages = try resolvedSchedule(imageSize: engine.imageSize, patchSize: c.patchSize)
            let settings = settings(schedule: stages)
            let synthesizer = try Synthesizer(engine: engine, head: headModel, settings: settings)
            let indices = Array(stride(from: k, to: count, by: n))
            guard !indices.isEmpty else {
                throw CkptError(.invalidArgument, "shard \(k)/\(n) of \(count) images holds no image", path: output)
            }
            let s = engine.imageSize, plane = c.channels * s * s
            let images = try FloatBuffer(count: try CheckedSize.product([indices.count, plane], "\(indices.count) synthetic images"))
            let notes = synthesizer.usesPatchSimilarity && method == .spdfq
                ? "no head: spdfq uses APA + TV + patch-similarity entropy (no soft labels, no regions)" : nil
            if let notes, !json.enabled { printError("note: \(notes)") }
            let optimises = settings.optimises
            let reporter = SynthesisProgressPrinter(method: method.rawValue, optimises: optimises, stages: optimises ? stages.stages.count : 0)
            let start = MonotonicClock.seconds()
            let record = try synthesizer.synthesize(indices: indices, into: images.pointer, recordingSteps: log != nil && optimises) { reporter.report($0) }
            let seconds = MonotonicClock.seconds() - start
            reporter.finish()
            // The file: images, their indices, the final loss terms, the settings (identical in every shard but for
            // `shard`, which is what `ckpt convert` checks when it merges shards).
            var document: [(String, String)] = [
                ("method", JSONWriter.quoted(method.rawValue)), ("seed", String(seed)), ("steps", String(optimises ? stages.totalSteps : 0)),
                ("schedule", optimises ? JSONWriter.quoted(stages.description) : "null"),
                ("images", String(count)), ("shard", JSONWriter.quoted("\(k)/\(n)")), ("image_size", String(s)),
                ("model", JSONWriter.quoted(model)), ("head", headModel.map { JSONWriter.quoted($0.source) } ?? "null"),
                ("learning_rate", Formatting.jsonNumber(settings.learningRate)),
                ("attention_weight", Formatting.jsonNumber(settings.attentionWeight)),
                ("attention_priors", String(settings.attentionPriors)), ("regions", String(settings.regions)),
                ("soft_labels", String(settings.softLabels)),
            ]
            if let notes { document.append(("note", JSONWriter.quoted(notes))) }
            let settingsJSON = "{" + document.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",") + "}"
            var tensors = [
                try images.tensor("images", shape: [indices.count, c.channels, s, s]),
                try OutputTensor.bytes(name: "index", dtype: .i64, shape: try Shape([indices.count]),
                    indices.flatMap { v in withUnsafeBytes(of: Int64(v).littleEndian) { Array($0) } }),
                try OutputTensor.bytes(name: "synthesis", dtype: .u8, shape: try Shape([settingsJSON.utf8.count]), Array(settingsJSON.utf8)),
            ]
            let losses = record.final
            for (t, name) in SynthesisLosses.names.enumerated() {
                tensors.append(try OutputTensor.bytes(name: "loss_" + name, dtype: .f32, shape: try Shape([indices.count]),
                    losses.flatMap { l in withUnsafeBytes(of: Float(l.values[t]).bitPattern.littleEndian) { Array($0) } }))
            }
            let inputs = [model, head].compactMap { $0 }.compactMap { FileIdentity.of($0) }
            // The preview and the log go to temporary files first and are renamed only once the .npz is written, so a
            // failure anywhere leaves none of the outputs behind.
            var sheetFile: OutputFile? = nil
            if let preview {
                let sheet = try ContactSheet.render(images: UnsafeBufferPointer(start: images.pointer, count: indices.count * plane), count: indices.count,
                    height: s, width: s, mean: c.mean.map(Double.init), std: c.std.map(Double.init), columns: min(8, indices.count),
                    downscale: s > 112 ? 2 : 1)
                let bytes: [UInt8]
                do throws(CkptError) { bytes = try PNG.encode(sheet) } catch { throw error.at(path: preview) }
                var file = try OutputFile(path: preview, inputs: inputs)
                try file.write(bytes)
                sheetFile = consume file
            }
            var logFile: OutputFile? = nil
            if let log {
                var file = try OutputFile(path: log, inputs: inputs)
                try file.write(Array(lossLog(record, stages: stages, optimises: optimises).utf8))
                logFile = consume file
            }
            try NPZ.write(tensors, to: output, compress: false, inputs: inputs)
            if var file = sheetFile.take() { try file.commit() }
            if var file = logFile.take() { try file.commit() }
            let mean = SynthesisLosses.mean(losses).values
            let stageMeans = record.stageMeans, throughput = record.stageThroughput(stages)
            if json.enabled {
                func terms(_ values: [Double]) -> String {
                    SynthesisLosses.names.enumerated().map { "\"\($0.element)\":\(Formatting.jsonNumber(values[$0.offset]))" }.joined(separator: ",")
                }
                let stageObjects = optimises ? stages.stages.enumerated().map { st, stage in
                    "{\"size\":\(stage.size),\"steps\":\(stage.steps),\"mean_final_losses\":{\(terms(stageMeans[st].values))},"
                        + "\"image_steps_per_second\":\(Formatting.jsonNumber(throughput[st]))}"
                } : []
                print("{\"output\":\(JSONWriter.quoted(output)),\"n\":\(indices.count),\"settings\":\(settingsJSON),"
                    + "\"mean_final_losses\":{\(terms(mean))},\"stages\":[\(stageObjects.joined(separator: ","))],"
                    + "\"workers\":\(record.workers),\"seconds\":\(Formatting.jsonNumber(seconds)),"
                    + "\"images_per_second\":\(Formatting.jsonNumber(Double(indices.count) / max(seconds, 1e-9)))}")
            } else {
                func terms(_ values: [Double]) -> String {
                    SynthesisLosses.names.enumerated().filter { values[$0.offset] != 0 }
                        .map { "\($0.element) \(Formatting.printf("%.4g", values[$0.offset]))" }.joined(separator: ", ")
                }
                let what = optimises ? ", schedule \(stages.description)" : ""
                print("synthesized \(indices.count) image\(indices.count == 1 ? "" : "s") (\(method.rawValue)\(what)) "
                    + "at \(s) px in \(Formatting.printf("%.1f", seconds)) s" + (terms(mean).isEmpty ? "" : "; final losses (mean): \(terms(mean))"))
                if optimises, stages.stages.count > 1 {
                    for (st, stage) in stages.stages.enumerated() {
                        print("  stage \(stage.size) px × \(stage.steps) steps: \(Formatting.printf("%.2f", throughput[st])) image-steps/s; "
                            + "final losses (mean): \(terms(stageMeans[st].values))")
                    }
                }
                let written = [output, preview, log].compactMap { $0 }.map { TerminalText.escaped($0) }
                print("wrote " + written.joined(separator: ", "))
            }
        }
    }

    /// The --log CSV: a header, then per step (global, from 0) the stage size and the mean of each loss term over
    /// this run's images. Empty of rows for noise and smooth.
    func lossLog(_ record: SynthesisRecord, stages: SynthesisSchedule, optimises: Bool) -> String {
        var text = "step,size," + SynthesisLosses.names.joined(separator: ",") + "\n"
        guard optimises else { return text }
        for (step, mean) in record.stepMeans.enumerated() {
            let size = stages.stages[stages.stageIndex(ofStep: step)].size
            text += "\(step),\(size)," + mean.values.map { Formatting.printf("%.9g", $0) }.joined(separator: ",") + "\n"
        }
        return text
    }
}

/// Synthesis progress on stderr: a line rewritten in place on a terminal (every 0.5 s), otherwise a line at every
/// 10 % of the steps, so a piped run is never silent for long.
final class SynthesisProgressPrinter: Sendable {
    let method: String
    let optimises: Bool
    /// Stages in the schedule (the size is shown when there are several).
    let stages: Int
    let terminal = isatty(2) == 1
    let state = Mutex((lastPrint: 0.0, lastDecile: 0, printed: false))

    init(method: String, optimises: Bool, stages: Int) {
        self.method = method
        self.optimises = optimises
        self.stages = stages
    }

    func report(_ p: SynthesisProgress) {
        let decile = p.stepsTotal > 0 ? p.stepsDone * 10 / p.stepsTotal : 10
        let due = state.withLock { st -> Bool in
            let due = terminal ? p.seconds - st.lastPrint >= 0.5 || p.stepsDone == p.stepsTotal : decile > st.lastDecile
            if due {
                st.lastPrint = p.seconds
                st.lastDecile = decile
                st.printed = true
            }
            return due
        }
        guard due else { return }
        let rate = Double(p.stepsDone) / max(p.seconds, 1e-9)
        let eta = rate > 0 ? Double(p.stepsTotal - p.stepsDone) / rate : 0
        let l = p.losses
        var terms = "labels \(Formatting.printf("%.3f", l.labels))"
        if l.attention != 0 { terms += ", attention \(Formatting.printf("%.2e", l.attention))" }
        if l.similarity != 0 { terms += ", similarity \(Formatting.printf("%.3f", l.similarity))" }
        terms += ", tv \(Formatting.printf("%.0f", l.totalVariation))"
        let size = stages > 1 ? " (\(p.stageSize) px)" : ""
        let line = "synthesize \(method): step \(p.stepsDone)/\(p.stepsTotal)\(size), images \(p.imagesDone)/\(p.imagesTotal), "
            + "\(Formatting.printf("%.2f", rate)) image-steps/s → "
            + "\(terms); \(Formatting.printf("%.0f", p.seconds)) s elapsed, ETA \(Formatting.printf("%.0f", eta)) s"
        StandardError.write(terminal ? "\r\u{1B}[K" + line : line + "\n")
    }

    func finish() {
        if terminal, state.withLock({ $0.printed }) { StandardError.write("\n") }
    }
}
