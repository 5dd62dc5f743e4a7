import ArgumentParser
import CkptCore
import CkptFormats
import CkptInference
import CkptKernels
import Dispatch
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// `ckpt gradient`: the input gradient of a loss built from the pieces synthesis uses, written to a file. A
/// developer's instrument (hidden from the help): the interop suite checks it against PyTorch autograd on the real
/// model and `bench/` times it against PyTorch.
struct GradientCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gradient",
        abstract: "Input-pixel gradient of a loss on a ViT's logits, CLS features and attention (for tests and benchmarks).",
        discussion: """
            L = Σ_i [ −Σ_c T[i,c]·log softmax(z_i)_c  +  Σ_k W[i,k]·features[i,k]  +  Σ_b Σ_h,q,k A[b,i,h,q,k]·P_b[i,h,q,k] ], \
            z = head(features), features = final-norm CLS, P_b = block b's post-softmax attention. Each term is optional. \
            OUT (.npz) gets `gradient` [N,C,S,S] = dL/d(normalised pixels), `loss` [N], `features` [N,D] and, with a head, `logits`.
            """,
        shouldDisplay: false)

    @Argument(help: "The model (file, shards or Hugging Face folder).")
    var model: String

    @Argument(help: "Output .npz.")
    var output: String

    @Option(name: .customLong("images"), parsing: .upToNextOption, help: ArgumentHelp("PNG files, or one .npy/.npz of images.", valueName: "FILE"))
    var images: [String] = []

    @Option(help: ArgumentHelp("Linear head (safetensors weight/bias); default: the model's own.", valueName: "HEAD"))
    var head: String?

    @Option(help: ArgumentHelp("Soft targets T [N, classes] (.npy): the soft cross-entropy term.", valueName: "FILE"))
    var targets: String?

    @Option(name: .customLong("feature-weights"), help: ArgumentHelp("W [N, D] (.npy): the linear term on the CLS features.", valueName: "FILE"))
    var featureWeights: String?

    @Option(name: .customLong("attention-weights"), help: ArgumentHelp("A [blocks, N, heads, tokens, tokens] (.npy): the linear term on the attention of --attention-blocks.", valueName: "FILE"))
    var attentionWeights: String?

    @Option(name: .customLong("attention-blocks"), help: ArgumentHelp("Blocks (0-based, comma-separated) that A refers to, in order.", valueName: "B,B"))
    var attentionBlocks: String?

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var json: JSONOutputOption

    func validate() throws {
        if images.isEmpty { throw ValidationError("--images is required") }
        if (attentionWeights == nil) != (attentionBlocks == nil) { throw ValidationError("--attention-weights and --attention-blocks go together") }
        guard FilePaths.fileExtension(of: output) == "npz" else { throw ValidationError("\(output): the output must be a .npz") }
        let inputs = images + [model, head, targets, featureWeights, attentionWeights].compactMap { $0 }
        if inputs.contains(output) { throw ValidationError("\(output): an output must not overwrite an input") }
        _ = try blocks()
    }

    func blocks() throws -> [Int] {
        guard let attentionBlocks else { return [] }
        return try attentionBlocks.split(separator: ",").map {
            guard let b = Int($0.trimmingSpaces), b >= 0 else { throw ValidationError("--attention-blocks: '\($0)' is not a block index") }
            return b
        }
    }

    /// An F32-convertible array of exactly `shape` from a .npy (or the only tensor of another checkpoint).
    static func array(_ path: String, shape: [Int], what: String) throws(CkptError) -> FloatBuffer {
        let checkpoint = try Checkpoint.open(path)
        guard checkpoint.tensors.count == 1, let entry = checkpoint.tensors.first else {
            throw CkptError(.invalidData, "\(what) must be one array, found \(checkpoint.tensors.count)", path: path)
        }
        guard entry.dtype.isConvertibleFloat else {
            throw CkptError(.unsupportedDType, "\(what) must be floating point, found \(entry.dtype.name)", path: path, tensor: entry.name)
        }
        guard entry.shape.dims == shape else {
            throw CkptError(.shapeMismatch, "\(what) must be \(shape), found \(entry.shape.dims)", path: path, tensor: entry.name)
        }
        let values = try FloatBuffer(count: entry.shape.elements)
        try entry.decodeFloats(into: values.pointer)
        if let bad = (0..<values.count).first(where: { !values.pointer[$0].isFinite }) {
            throw CkptError(.nonFinite, "element \(bad) of \(what) is not finite", path: path, tensor: entry.name)
        }
        return values
    }

    func run() throws {
        try runReportingErrors {
            let set = try ImageSet.load(images, ignoringLabels: true)
            let engine = try modelOptions.load(model)
            let c = engine.model.config
            let n = set.count, d = c.dim, t = engine.tokens, heads = c.heads, size = engine.imageSize
            let headModel = try head.map { (path: String) throws(CkptError) in try LinearHead.load(path) } ?? engine.model.head
            if let headModel, headModel.width != d {
                throw CkptError(.shapeMismatch, "head width \(headModel.width) ≠ model width \(d)", path: headModel.source)
            }
            if targets != nil && headModel == nil { throw CkptError(.invalidArgument, "--targets needs a head (--head, or a model with its own)", path: model) }
            let blockList = try blocks()
            if let bad = blockList.first(where: { $0 >= c.depth }) {
                throw CkptError(.invalidArgument, "--attention-blocks: block \(bad) does not exist (the model has \(c.depth))", path: model)
            }
            let classes = headModel?.classes ?? 0
            let targetValues = try targets.map { (p: String) throws(CkptError) in try Self.array(p, shape: [n, classes], what: "--targets") }
            let weightValues = try featureWeights.map { (p: String) throws(CkptError) in try Self.array(p, shape: [n, d], what: "--feature-weights") }
            let attentionValues = try attentionWeights.map { (p: String) throws(CkptError) in
                try Self.array(p, shape: [blockList.count, n, heads, t, t], what: "--attention-weights")
            }
            let imageFloats = c.channels * size * size
            let gradient = try FloatBuffer(count: try CheckedSize.product([n, imageFloats], "the gradients of \(n) images"))
            let features = try FloatBuffer(count: n * d), logits = try FloatBuffer(count: max(1, n * classes)), losses = try FloatBuffer(count: n)
            let start = MonotonicClock.seconds()
            try engine.forEachGradientBatch(count: n) { (first: Int, count: Int, ws: GradientWorkspace) throws(CkptError) in
                let pixels = try FloatBuffer(count: count * imageFloats)
                for i in 0..<count { try set.fill(first + i, size: size, config: c, into: pixels.pointer + i * imageFloats) }
                let f = features.pointer + first * d
                engine.recordForward(images: pixels.pointer, count: count, workspace: ws, features: f)
                let featureGradient = try FloatBuffer(count: count * d)
                var loss = [Double](repeating: 0, count: count)
                if let headModel, let targetValues {
                    let z = logits.pointer + first * classes
                    headModel.logits(features: f, count: count, into: z)
                    let dz = try FloatBuffer(count: count * classes)
                    for i in 0..<count {
                        let row = z + i * classes, target = targetValues.pointer + (first + i) * classes
                        var maximum = -Float.infinity
                        for k in 0..<classes { maximum = max(maximum, row[k]) }
                        var sum = 0.0
                        for k in 0..<classes { sum += exp(Double(row[k] - maximum)) }
                        let logSum = Double(maximum) + log(sum)
                        for k in 0..<classes {
                            let p = exp(Double(row[k]) - logSum)
                            loss[i] -= Double(target[k]) * (Double(row[k]) - logSum)
                            dz.pointer[i * classes + k] = Float(p - Double(target[k]))
                        }
                    }
                    headModel.featureGradient(logitGradient: dz.pointer, count: count, into: featureGradient.pointer)
                }
                if let weightValues {
                    for i in 0..<count {
                        for k in 0..<d {
                            let w = weightValues.pointer[(first + i) * d + k]
                            loss[i] += Double(w * f[i * d + k])
                            featureGradient.pointer[i * d + k] += w
                        }
                    }
                }
                var hooks = BackwardHooks()
                let attentionLoss = Mutex([Double](repeating: 0, count: count))
                if let attentionValues {
                    hooks.attentionBlocks = Set(blockList)
                    hooks.attention = { sample, block, h, p, dp in
                        var sum = 0.0
                        for (slot, b) in blockList.enumerated() where b == block {
                            let a = attentionValues.pointer + (((slot * n + first + sample) * heads + h) * t) * t
                            for k in 0..<(t * t) {
                                sum += Double(a[k] * p[k])
                                dp[k] += a[k]
                            }
                        }
                        attentionLoss.withLock { $0[sample] += sum }
                    }
                }
                engine.inputGradient(count: count, workspace: ws, featureGradient: featureGradient.pointer, hooks: hooks,
                    into: gradient.pointer + first * imageFloats)
                let extra = attentionLoss.withLock { $0 }
                for i in 0..<count { losses.pointer[first + i] = Float(loss[i] + extra[i]) }
            }
            let seconds = MonotonicClock.seconds() - start
            var tensors = [
                try gradient.tensor("gradient", shape: [n, c.channels, size, size]), try losses.tensor("loss", shape: [n]),
                try features.tensor("features", shape: [n, d]),
            ]
            if headModel != nil, targetValues != nil { tensors.append(try logits.tensor("logits", shape: [n, classes])) }
            let inputs = (images + [model] + [head, targets, featureWeights, attentionWeights].compactMap { $0 }).compactMap { FileIdentity.of($0) }
            try NPZ.write(tensors, to: output, compress: false, inputs: inputs)
            let peak = Self.peakResidentBytes()
            if json.enabled {
                print("{\"model\":\(JSONWriter.quoted(model)),\"n\":\(n),\"image_size\":\(size),\"seconds\":\(Formatting.jsonNumber(seconds)),"
                    + "\"images_per_second\":\(Formatting.jsonNumber(Double(n) / max(seconds, 1e-9))),\"peak_rss_bytes\":\(peak),"
                    + "\"output\":\(JSONWriter.quoted(output))}")
            } else {
                print("forward + backward: \(n) images at \(size) px in \(Formatting.printf("%.3f", seconds)) s (\(Formatting.printf("%.2f", Double(n) / max(seconds, 1e-9))) images/s), peak RSS \(Formatting.grouped(peak / 1_048_576)) MiB")
                print("wrote \(TerminalText.escaped(output))")
            }
        }
    }

    /// The process's peak resident set size (getrusage), in bytes.
    static func peakResidentBytes() -> Int {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return usage.ru_maxrss * 1024
    }
}

extension FloatBuffer {
    /// The first `shape.product` values as an F32 tensor to write.
    func tensor(_ name: String, shape: [Int]) throws(CkptError) -> OutputTensor {
        let bytes = Array(UnsafeRawBufferPointer(start: pointer, count: shape.reduce(1, *) * 4))
        return try OutputTensor.bytes(name: name, dtype: .f32, shape: try Shape(shape), bytes)
    }
}
