import ArgumentParser
import CkptCore
import CkptFormats
import CkptInference

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run a ViT (timm ViT/DeiT, DINOv2; timm or Hugging Face naming) on images: CLS features or top-k classes.",
        discussion: """
            MODEL is a checkpoint file, shards, or a Hugging Face model folder (config.json, preprocessor_config.json \
            and weights). Images: PNG files, or .npy/.npz with uint8 `images` [N,H,W(,3)] (resized to the model's \
            input size: integer nearest-neighbour when the size is a whole multiple, otherwise bilinear; grey \
            replicated; normalised with the model's mean/std), or F32 [N,C,H,W] already normalised. With a head \
            (--head, or the model's own timm `head`/HF `classifier`) the top-k classes are printed, otherwise the \
            final-norm CLS features.
            """)

    @Argument(help: "The model (file, shards or Hugging Face folder).")
    var model: String

    @Option(name: .customLong("images"), parsing: .upToNextOption, help: ArgumentHelp("PNG files, or one .npy/.npz of images.", valueName: "FILE"))
    var images: [String] = []

    @Option(help: ArgumentHelp("Linear head: safetensors with weight [classes, D] and bias [classes] (labels from its metadata).", valueName: "HEAD"))
    var head: String?

    @Option(name: .customLong("top-k"), help: ArgumentHelp("Classes to print per image.", valueName: "K"))
    var topK: Int = 5

    @OptionGroup var save: SaveOptions
    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var activations: ActivationQuantizationOption
    @OptionGroup var json: JSONOutputOption

    func validate() throws {
        if images.isEmpty { throw ValidationError("--images is required (PNG files or one .npy/.npz)") }
        guard topK > 0 else { throw ValidationError("--top-k must be positive") }
        try save.check(inputs: images + [model, head])
    }

    func run() throws {
        try runReportingErrors {
            // The images first (PNG headers, array shapes): a bad file fails before the model loads.
            let set = try ImageSet.load(images)
            let engine = try modelOptions.load(model)
            let config = engine.model.config
            let headModel = try head.map { (path: String) throws(CkptError) in try LinearHead.load(path) } ?? engine.model.head
            if let headModel, headModel.width != config.dim {
                throw CkptError(.shapeMismatch, "head width \(headModel.width) ≠ model width \(config.dim)", path: headModel.source)
            }
            if save.saveLogits != nil && headModel == nil {
                throw CkptError(.invalidArgument, "--save-logits needs a head (--head, or a model with its own)", path: model)
            }
            let hook = try activations.hook(for: model, engine: engine)
            let timed = try TimedFeatures(engine: engine, images: set, hook: hook)
            let n = set.count
            let logits = try headModel.map { (head: LinearHead) throws(CkptError) in try head.logits(timed.features, count: n) }
            try save.write(features: timed.features, logits: logits, count: n, dim: config.dim, classes: headModel?.classes,
                inputs: images + [model] + [head].compactMap { $0 })
            let k = min(topK, headModel?.classes ?? 1)
            if json.enabled {
                var out = "{\"model\":\(JSONWriter.quoted(model)),\"n\":\(n),\"image_size\":\(engine.imageSize),"
                out += "\"seconds\":\(Formatting.jsonNumber(timed.seconds)),\"images_per_second\":\(Formatting.jsonNumber(Double(n) / max(timed.seconds, 1e-9))),"
                out += "\"activation_quantization\":\(describeActivationQuantization(hook, json: true)),"
                out += "\"config\":\(configJSON(config)),\"blas\":\(BLASStartup.json()),\"images\":["
                for i in 0..<n {
                    if i > 0 { out += "," }
                    out += "{\"name\":\(JSONWriter.quoted(set.name(i))),"
                    if let logits, let headModel {
                        let top = Evaluation.topK(logits, row: i, width: headModel.classes, k: k)
                        out += "\"top_k\":[" + top.map {
                            "{\"class\":\($0.index),\"label\":\(JSONWriter.quoted(headModel.label($0.index))),\"logit\":\(Formatting.jsonNumber(Double($0.logit))),\"probability\":\(Formatting.jsonNumber($0.probability))}"
                        }.joined(separator: ",") + "]}"
                    } else {
                        let row = timed.features[(i * config.dim)..<((i + 1) * config.dim)]
                        out += "\"features\":[" + row.map { Formatting.jsonNumber(Double($0)) }.joined(separator: ",") + "]}"
                    }
                }
                print(out + "]}")
                return
            }
            print("model: \(TerminalText.escaped(model)) (\(describe(config, size: engine.imageSize)))")
            for i in 0..<n {
                if let logits, let headModel {
                    let top = Evaluation.topK(logits, row: i, width: headModel.classes, k: k)
                    let text = top.map { "\(TerminalText.escaped(headModel.label($0.index))) \(Formatting.printf("%.4f", $0.probability))" }.joined(separator: ", ")
                    print("\(TerminalText.escaped(set.name(i))): \(text)")
                } else {
                    let row = Array(timed.features[(i * config.dim)..<((i + 1) * config.dim)])
                    let norm = row.reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot()
                    let first = row.prefix(6).map { Formatting.printf("%.5f", Double($0)) }.joined(separator: ", ")
                    print("\(TerminalText.escaped(set.name(i))): CLS [\(config.dim)] norm \(Formatting.printf("%.4f", norm)) [\(first), …]")
                }
            }
            print("\(n) image\(n == 1 ? "" : "s") in \(Formatting.printf("%.3f", timed.seconds)) s (\(Formatting.printf("%.1f", Double(n) / max(timed.seconds, 1e-9))) images/s; \(BLASStartup.text()))")
        }
    }
}
