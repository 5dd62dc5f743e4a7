import ArgumentParser
import CkptCore
import CkptFormats
import CkptInference

struct EvalCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "eval",
        abstract: "Top-1 accuracy of a ViT + linear head on labelled images, and agreement with a reference model.",
        discussion: """
            DATA is an .npz with uint8 `images` [N,H,W] (grey) or [N,H,W,3] and integer `labels` [N], preprocessed as \
            `ckpt run` does. Prints top-1 accuracy and the confusion matrix (rows: true class, columns: predicted). \
            With --reference, the same images also go through a second model (same head) and the top-1 agreement, \
            the KL divergence of its softmax from the reference's, and the cosine of the CLS features are reported.
            """)

    @Argument(help: "The model (file, shards or Hugging Face folder).")
    var model: String

    @Option(help: ArgumentHelp("Linear head (weight [classes, D], bias [classes]); default: the model's own head.", valueName: "HEAD"))
    var head: String?

    @Option(help: ArgumentHelp("Labelled images: .npz with images and labels.", valueName: "DATA"))
    var data: String

    @Option(help: ArgumentHelp("A second model to compare against (the uncompressed one).", valueName: "MODEL"))
    var reference: String?

    @Option(help: ArgumentHelp("Evaluate the first N images only.", valueName: "N"))
    var limit: Int?

    @OptionGroup var save: SaveOptions
    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var activations: ActivationQuantizationOption
    @OptionGroup var json: JSONOutputOption

    func validate() throws {
        if let limit, limit <= 0 { throw ValidationError("--limit must be positive") }
        try save.check(inputs: [model, data, reference, head])
    }

    func run() throws {
        try runReportingErrors {
            // The data first (headers and array shapes only): a bad or empty file fails before the model loads.
            let set = try ImageSet.load([data])
            guard let allLabels = set.labels else { throw CkptError(.missingTensor, "no array \"labels\"", path: data) }
            let engine = try modelOptions.load(model)
            let config = engine.model.config
            guard let headModel = try head.map({ (path: String) throws(CkptError) in try LinearHead.load(path) }) ?? engine.model.head else {
                throw CkptError(.invalidArgument, "no head: give --head (the model has no classifier of its own)", path: model)
            }
            guard headModel.width == config.dim else {
                throw CkptError(.shapeMismatch, "head width \(headModel.width) ≠ model width \(config.dim)", path: headModel.source)
            }
            let n = min(limit ?? set.count, set.count)
            let labels = Array(allLabels.prefix(n))
            let hook = try activations.hook(for: model, engine: engine)
            let timed = try TimedFeatures(engine: engine, images: set, limit: n, hook: hook)
            let logits = try headModel.logits(timed.features, count: n)
            let evaluation = try Evaluation(logits: logits, labels: labels, classes: headModel.classes, source: data)

            var comparison: ReferenceComparison? = nil
            var referenceEvaluation: Evaluation? = nil
            if let reference {
                let referenceEngine = try modelOptions.load(reference)
                guard referenceEngine.model.config.dim == config.dim else {
                    throw CkptError(.shapeMismatch, "reference width \(referenceEngine.model.config.dim) ≠ model width \(config.dim)", path: reference)
                }
                let referenceHook = try activations.hook(for: reference, engine: referenceEngine)
                let referenceFeatures = try TimedFeatures(engine: referenceEngine, images: set, limit: n, hook: referenceHook).features
                let referenceLogits = try headModel.logits(referenceFeatures, count: n)
                referenceEvaluation = try Evaluation(logits: referenceLogits, labels: labels, classes: headModel.classes, source: data)
                comparison = ReferenceComparison(logits: logits, referenceLogits: referenceLogits, features: timed.features,
                    referenceFeatures: referenceFeatures, count: n, classes: headModel.classes, dim: config.dim)
            }
            try save.write(features: timed.features, logits: logits, count: n, dim: config.dim, classes: headModel.classes,
                inputs: [model, data] + [reference, head].compactMap { $0 })

            let rate = Double(n) / max(timed.seconds, 1e-9)
            if json.enabled {
                var out = "{\"model\":\(JSONWriter.quoted(model)),\"data\":\(JSONWriter.quoted(data)),\"head\":\(JSONWriter.quoted(headModel.source)),"
                out += "\"n\":\(n),\"accuracy\":\(Formatting.jsonNumber(evaluation.accuracy)),\"correct\":\(evaluation.correct),"
                out += "\"labels\":[" + (0..<headModel.classes).map { JSONWriter.quoted(headModel.label($0)) }.joined(separator: ",") + "],"
                out += "\"confusion\":[" + evaluation.confusion.map { "[" + $0.map(String.init).joined(separator: ",") + "]" }.joined(separator: ",") + "],"
                out += "\"predictions\":[" + evaluation.predictions.map(String.init).joined(separator: ",") + "],"
                if let comparison, let referenceEvaluation, let reference {
                    out += "\"reference\":{\"model\":\(JSONWriter.quoted(reference)),\"accuracy\":\(Formatting.jsonNumber(referenceEvaluation.accuracy)),"
                    out += "\"top1_agreement\":\(Formatting.jsonNumber(comparison.agreement)),\"agreeing\":\(comparison.agreeing),"
                    out += "\"kl_mean\":\(Formatting.jsonNumber(comparison.meanKL)),\"kl_max\":\(Formatting.jsonNumber(comparison.maxKL)),"
                    out += "\"cls_cosine_mean\":\(Formatting.jsonNumber(comparison.meanCosine)),\"cls_cosine_min\":\(Formatting.jsonNumber(comparison.minCosine))},"
                }
                out += "\"image_size\":\(engine.imageSize),\"seconds\":\(Formatting.jsonNumber(timed.seconds)),\"images_per_second\":\(Formatting.jsonNumber(rate)),"
                out += "\"activation_quantization\":\(describeActivationQuantization(hook, json: true)),"
                out += "\"config\":\(configJSON(config)),\"blas\":\(BLASStartup.json())}"
                print(out)
                return
            }
            print("model: \(TerminalText.escaped(model)) (\(describe(config, size: engine.imageSize)))")
            print("data: \(TerminalText.escaped(data)), \(n) images; head: \(TerminalText.escaped(headModel.source)) (\(headModel.classes) classes)")
            if hook != nil { print(describeActivationQuantization(hook, json: false)) }
            print("top-1 accuracy: \(Formatting.printf("%.4f", evaluation.accuracy)) (\(evaluation.correct)/\(n))")
            print("confusion (rows: true class, columns: predicted):")
            let names = (0..<headModel.classes).map { headModel.label($0) }
            let header = ["true \\ predicted"] + (0..<headModel.classes).map(String.init)
            let rows = evaluation.confusion.enumerated().map { [ "\($0.offset) \(names[$0.offset])" ] + $0.element.map(String.init) }
            print(Formatting.table(header, rows, rightAligned: Set(1...headModel.classes)))
            if let comparison, let referenceEvaluation, let reference {
                print("reference \(TerminalText.escaped(reference)): accuracy \(Formatting.printf("%.4f", referenceEvaluation.accuracy)); "
                    + "top-1 agreement \(Formatting.printf("%.4f", comparison.agreement)) (\(comparison.agreeing)/\(n)), "
                    + "logit KL mean \(Formatting.printf("%.3g", comparison.meanKL)) max \(Formatting.printf("%.3g", comparison.maxKL)), "
                    + "CLS cosine mean \(Formatting.printf("%.6f", comparison.meanCosine)) min \(Formatting.printf("%.6f", comparison.minCosine))")
            }
            print("forward: \(n) images in \(Formatting.printf("%.2f", timed.seconds)) s (\(Formatting.printf("%.1f", rate)) images/s; \(BLASStartup.text()))")
        }
    }
}
