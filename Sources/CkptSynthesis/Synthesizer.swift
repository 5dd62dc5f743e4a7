import CkptCore
import CkptInference
import CkptKernels
import Dispatch
import Synchronization

/// How calibration images are made.
public enum SynthesisMethod: String, CaseIterable, Sendable {
    /// SPDFQ/SARDFQ: images optimised from Gaussian noise to follow random attention priors (APA), with soft labels
    /// (SL) for the image and for multi-semantic regions (MSR), plus a TV prior.
    case spdfq
    /// PSAQ-ViT: patch-similarity entropy of every block + cross-entropy to a random class + TV.
    case psaq
    /// Gaussian noise N(0, 1) in normalised pixel space (clipped to the valid box), no optimisation.
    case noise
    /// ``CalibrationImages/smoothNoise(index:seed:channels:size:into:)``: noise constant over 16-px cells.
    case smooth
}

/// Everything that decides the synthetic images, besides the model.
public struct SynthesisSettings: Sendable, Equatable {
    public var method: SynthesisMethod
    /// Optimisation steps per image, over all stages (the schedule's total when ``schedule`` is set).
    public var steps: Int
    /// The resolution schedule; nil: one stage of ``steps`` at the model's input size. Setting it sets ``steps`` to
    /// its total.
    public var schedule: SynthesisSchedule? {
        didSet { if let schedule { steps = schedule.totalSteps } }
    }
    public var seed: UInt64
    /// Adam's base learning rate on the normalised pixels (PSAQ-ViT: 0.2), with a linear warm-up over
    /// ``warmupFraction`` of the steps and a cosine decay after, both spanning all stages.
    public var learningRate: Double = 0.25
    public var warmupFraction: Double = 0.1
    public var beta1: Double = 0.5, beta2: Double = 0.9
    /// The APA weight α (the SARDFQ paper searches 1…1e5 per model).
    public var attentionWeight: Double = 1e4
    /// The TV prior's weight on R (the sum of the four difference norms of one image).
    public var totalVariationWeight: Double = 0.05
    /// The PSE weight (PSAQ-ViT, and SPDFQ without a head).
    public var similarityWeight: Double = 1
    /// Jitter offsets are drawn from ±`jitter`·size pixels each step, size being the stage's (PSAQ-ViT: 30 px at 224).
    public var jitter: Double = 30.0 / 224
    /// The ablation switches of SPDFQ: attention-prior alignment, multi-semantic regions, soft labels (off: one-hot
    /// cross-entropy to the image's class, no region targets).
    public var attentionPriors = true, regions = true, softLabels = true

    public init(method: SynthesisMethod, steps: Int, seed: UInt64) {
        self.method = method
        self.steps = steps
        self.seed = seed
    }

    /// Whether images are optimised (the two noise methods are not).
    public var optimises: Bool { method == .spdfq || method == .psaq }
}

/// The loss terms of one image at one step (0 where a term is off).
public struct SynthesisLosses: Sendable, Equatable {
    /// Soft (or one-hot) cross-entropy, the mean over the samples of the step (the whole image and its MSR
    /// regions), so steps with different region counts compare; the gradient is that of the sum (every sample
    /// weighs 1).
    public var labels: Double = 0
    /// α-free APA: Σ over the deeper blocks and heads of (l/L)·MSE.
    public var attention: Double = 0
    /// R, the TV prior.
    public var totalVariation: Double = 0
    /// Σ over blocks of the patch-similarity entropy loss (−H).
    public var similarity: Double = 0

    public init() {}

    public static let names = ["labels", "attention", "total_variation", "similarity"]
    public var values: [Double] { [labels, attention, totalVariation, similarity] }

    /// The mean of `losses` term by term, summed in order (0 for none).
    public static func mean<C: Collection<SynthesisLosses>>(_ losses: C) -> SynthesisLosses {
        var m = SynthesisLosses()
        guard !losses.isEmpty else { return m }
        for l in losses {
            m.labels += l.labels
            m.attention += l.attention
            m.totalVariation += l.totalVariation
            m.similarity += l.similarity
        }
        let n = Double(losses.count)
        m.labels /= n
        m.attention /= n
        m.totalVariation /= n
        m.similarity /= n
        return m
    }
}

/// Progress of a synthesis: optimisation steps done over all images, and the losses of the last step reported.
public struct SynthesisProgress: Sendable {
    public let stepsDone: Int
    public let stepsTotal: Int
    public let imagesDone: Int
    public let imagesTotal: Int
    public let seconds: Double
    public let losses: SynthesisLosses
    /// The input size of the stage the last reported step ran at.
    public let stageSize: Int
}

/// What a synthesis returns besides the images, per image in the order of the indices asked for.
public struct SynthesisRecord: Sendable {
    /// The losses at each image's last step.
    public var final: [SynthesisLosses]
    /// Per image, the losses at the last step of each stage (one entry per stage; empty for noise/smooth).
    public var stageFinal: [[SynthesisLosses]]
    /// Per image, the losses at every step (only when asked for: `recordingSteps`).
    public var steps: [[SynthesisLosses]]
    /// Per image, the wall-clock seconds each stage took on its worker.
    public var stageSeconds: [[Double]] = []
    /// The workers that ran concurrently (each with one OpenBLAS thread).
    public var workers = 0

    /// Per stage, image-steps per second over the whole run: the stage's image-steps over its worker-seconds
    /// divided by the worker count (the throughput with every worker busy in that stage).
    public func stageThroughput(_ schedule: SynthesisSchedule) -> [Double] {
        schedule.stages.indices.map { st in
            let seconds = stageSeconds.reduce(0.0) { $0 + $1[st] }
            return seconds > 0 ? Double(stageSeconds.count * schedule.stages[st].steps) * Double(max(1, workers)) / seconds : 0
        }
    }

    /// The mean over the images of each stage's final losses.
    public var stageMeans: [SynthesisLosses] {
        let stages = stageFinal.first?.count ?? 0
        return (0..<stages).map { st in SynthesisLosses.mean(stageFinal.map { $0[st] }) }
    }

    /// The mean over the images of the losses at each step (summed in image order: deterministic).
    public var stepMeans: [SynthesisLosses] {
        let count = steps.first?.count ?? 0
        return (0..<count).map { t in SynthesisLosses.mean(steps.map { $0[t] }) }
    }
}

/// Synthesises calibration images from a model, with no data. Each image depends only on (settings, model, global
/// image index): images are optimised one at a time (its forward/backward micro-batch is the image and its MSR
/// crops), every random draw comes from a stream keyed by (seed, image, purpose, step), and OpenBLAS runs
/// single-threaded inside each worker whatever the worker count, so a shard's images are bit-identical to the same
/// images of a full run on the same machine and build.
///
/// With a resolution schedule every image runs its stages in order: the image starts as noise at the first stage's
/// size, is resized bilinearly at each change of size, and ends resized to the model's input size when the last
/// stage is not at it. Steps are numbered globally (0 ..< total over all stages): the augmentation and MSR draws of
/// step t are the same whatever the stage sizes.
public final class Synthesizer: Sendable {
    public let engine: ViTEngine
    public let head: LinearHead?
    public let settings: SynthesisSettings
    public let box: PixelBox
    /// The stages every optimised image runs (empty for noise/smooth).
    public let schedule: SynthesisSchedule?
    /// One engine per stage size (the model's own engine at its size).
    let engines: [Int: ViTEngine]

    public init(engine: ViTEngine, head: LinearHead?, settings: SynthesisSettings) throws(CkptError) {
        let c = engine.model.config
        if let head, head.width != c.dim {
            throw CkptError(.shapeMismatch, "head width \(head.width) ≠ model width \(c.dim)", path: head.source)
        }
        guard settings.steps >= 0, settings.steps <= SynthesisSchedule.maximumSteps else {
            throw CkptError(.invalidArgument, "steps must be in 0…\(SynthesisSchedule.maximumSteps), got \(settings.steps)")
        }
        guard settings.optimises == false || settings.steps > 0 else {
            throw CkptError(.invalidArgument, "\(settings.method.rawValue) optimises the images: steps must be at least 1")
        }
        self.engine = engine
        self.head = head
        self.settings = settings
        box = try PixelBox(mean: c.mean.map(Double.init), std: c.std.map(Double.init))
        var engines = [engine.imageSize: engine]
        if settings.optimises {
            let schedule: SynthesisSchedule
            if let given = settings.schedule { schedule = given } else { schedule = try .single(size: engine.imageSize, steps: settings.steps) }
            do throws(CkptError) { try schedule.check(patchSize: c.patchSize) } catch { throw error.at(path: engine.model.path) }
            for size in schedule.sizes where engines[size] == nil {
                engines[size] = try ViTEngine(model: engine.model, imageSize: size, microBatch: engine.microBatch)
            }
            self.schedule = schedule
        } else {
            schedule = nil
        }
        self.engines = engines
    }

    /// Without a head SPDFQ has no classes: its soft-label and region terms are dropped and the patch-similarity
    /// entropy takes their place (with APA and TV).
    public var usesPatchSimilarity: Bool { settings.method == .psaq || (settings.method == .spdfq && head == nil) }

    /// Images `indices` (global indices), written to `output` [indices.count × C × S × S] in that order; their final
    /// losses are returned in the same order. `progress` is called from the workers (serialised) after each step.
    public func synthesize(
        indices: [Int], into output: UnsafeMutablePointer<Float>, progress: (@Sendable (SynthesisProgress) -> Void)? = nil
    ) throws(CkptError) -> [SynthesisLosses] {
        try synthesize(indices: indices, into: output, recordingSteps: false, progress: progress).final
    }

    /// Images `indices` (global indices), written to `output` [indices.count × C × S × S] (S the model's input size)
    /// in that order, with their losses at the end of each stage and, when `recordingSteps`, at every step.
    public func synthesize(
        indices: [Int], into output: UnsafeMutablePointer<Float>, recordingSteps: Bool,
        progress: (@Sendable (SynthesisProgress) -> Void)? = nil
    ) throws(CkptError) -> SynthesisRecord {
        let c = engine.model.config, s = engine.imageSize
        let plane = c.channels * s * s
        var record = SynthesisRecord(final: [SynthesisLosses](repeating: SynthesisLosses(), count: indices.count), stageFinal: [], steps: [])
        guard !indices.isEmpty else { return record }
        guard let schedule else {
            for (k, index) in indices.enumerated() { initialImage(index, size: s, into: output + k * plane) }
            record.stageFinal = [[SynthesisLosses]](repeating: [], count: indices.count)
            return record
        }
        if recordingSteps {
            let bytes = try CheckedSize.product([indices.count, schedule.totalSteps, MemoryLayout<SynthesisLosses>.stride], "the per-step loss log")
            try MemoryBudget.require(bytes, for: "the per-step losses of \(indices.count) images × \(schedule.totalSteps) steps", path: engine.model.path)
        }
        let samples = settings.method == .spdfq && head != nil && settings.regions ? 1 + RegionCrop.cellCount : 1
        var workspaceBytes = 0
        for size in schedule.sizes {
            workspaceBytes = try CheckedSize.sum([workspaceBytes, try GradientWorkspace.bytes(engine: engines[size]!, images: samples)], "synthesis workspaces")
        }
        var workers = min(Parallel.coreCount, indices.count)
        while workers > 1, workspaceBytes * workers > MemoryBudget.available() { workers -= 1 }
        let sizes = schedule.sizes.map(String.init).joined(separator: ", ")
        try MemoryBudget.require(workspaceBytes * workers, for: "\(workers) synthesis workspace(s) of \(samples) images at \(sizes) px", path: engine.model.path)
        let start = MonotonicClock.seconds()
        let total = indices.count * schedule.totalSteps
        let lastStep = schedule.totalSteps - 1
        let state = Mutex((steps: 0, images: 0, failure: CkptError?.none))
        let results = Mutex([ImageResult?](repeating: nil, count: indices.count))
        nonisolated(unsafe) let destination = output
        let workerCount = workers
        BLAS.withThreads(1) {
            DispatchQueue.concurrentPerform(iterations: workerCount) { worker in
                do throws(CkptError) {
                    let scratch = try WorkerScratch(synthesizer: self, samples: samples)
                    var k = worker
                    while k < indices.count, state.withLock({ $0.failure == nil }) {
                        let result = try optimise(indices[k], scratch: scratch, recordingSteps: recordingSteps, into: destination + k * plane) {
                            step, stepLosses in
                            let snapshot = state.withLock { st -> SynthesisProgress in
                                st.steps += 1
                                if step == lastStep { st.images += 1 }
                                return SynthesisProgress(
                                    stepsDone: st.steps, stepsTotal: total, imagesDone: st.images, imagesTotal: indices.count,
                                    seconds: MonotonicClock.seconds() - start, losses: stepLosses,
                                    stageSize: schedule.stages[schedule.stageIndex(ofStep: step)].size)
                            }
                            progress?(snapshot)
                        }
                        results.withLock { $0[k] = result }
                        k += workerCount
                    }
                } catch {
                    state.withLock { if $0.failure == nil { $0.failure = error } }
                }
            }
        }
        if let failure = state.withLock({ $0.failure }) { throw failure }
        let done = results.withLock { $0 }
        record.final = done.map { $0!.stageFinal.last! }
        record.stageFinal = done.map { $0!.stageFinal }
        record.stageSeconds = done.map { $0!.stageSeconds }
        record.workers = workerCount
        if recordingSteps { record.steps = done.map { $0!.steps } }
        return record
    }

    /// The starting image at `size` px (for `noise`/`smooth`, the result): N(0, 1) per pixel, clipped to the box,
    /// or smooth noise.
    func initialImage(_ index: Int, size s: Int, into out: UnsafeMutablePointer<Float>) {
        let c = engine.model.config
        let buffer = UnsafeMutableBufferPointer(start: out, count: c.channels * s * s)
        if settings.method == .smooth {
            CalibrationImages.smoothNoise(index: index, seed: settings.seed, channels: c.channels, size: s, into: out)
        } else {
            var random = SynthesisRandom(seed: settings.seed, image: index, purpose: .initialNoise)
            random.fillNormal(buffer)
        }
        box.clamp(buffer, planeSize: s * s)
    }

    /// One image's losses: at the end of each stage and (when recorded) at every step.
    struct ImageResult: Sendable {
        var stageFinal: [SynthesisLosses] = []
        var stageSeconds: [Double] = []
        var steps: [SynthesisLosses] = []
    }

    /// One worker's buffers, allocated once and reused for every image and step: a gradient workspace per stage
    /// size, and the pixel buffers at the largest stage size.
    final class WorkerScratch {
        let workspaces: [Int: GradientWorkspace]
        let capacity: Int
        /// The image being optimised and the one it is resized into at a change of stage.
        let image, resized: FloatBuffer
        /// The micro-batch (augmented image, then its MSR crops) and its input gradient.
        let samples, sampleGradient: FloatBuffer
        /// The gradient w.r.t. the image itself.
        let total: FloatBuffer
        let features, featureGradient, logits, logitGradient: FloatBuffer

        init(synthesizer z: Synthesizer, samples capacity: Int) throws(CkptError) {
            let c = z.engine.model.config, d = c.dim, classes = z.head?.classes ?? 0
            let largest = max(z.engine.imageSize, z.schedule?.stages.map(\.size).max() ?? 0)
            let plane = c.channels * largest * largest
            var workspaces: [Int: GradientWorkspace] = [:]
            for size in z.schedule?.sizes ?? [] { workspaces[size] = try z.engines[size]!.makeGradientWorkspace(images: capacity) }
            self.workspaces = workspaces
            self.capacity = capacity
            image = try FloatBuffer(count: plane)
            resized = try FloatBuffer(count: plane)
            total = try FloatBuffer(count: plane)
            samples = try FloatBuffer(count: capacity * plane)
            sampleGradient = try FloatBuffer(count: capacity * plane)
            features = try FloatBuffer(count: capacity * d)
            featureGradient = try FloatBuffer(count: capacity * d)
            logits = try FloatBuffer(count: max(1, capacity * classes))
            logitGradient = try FloatBuffer(count: max(1, capacity * classes))
        }
    }

    /// Optimises one image through every stage of the schedule, writing it at the model's size to `output`;
    /// `report(step, losses)` after each step (global step numbers).
    func optimise(
        _ index: Int, scratch: WorkerScratch, recordingSteps: Bool, into output: UnsafeMutablePointer<Float>,
        report: (Int, SynthesisLosses) -> Void
    ) throws(CkptError) -> ImageResult {
        guard let schedule else { preconditionFailure("optimise needs a schedule") }
        let c = engine.model.config, channels = c.channels, d = c.dim, heads = c.heads
        let totalSteps = schedule.totalSteps
        let rates = try LearningRateSchedule(
            base: settings.learningRate,
            warmup: min(max(1, Int((Double(totalSteps) * settings.warmupFraction).rounded())), totalSteps - 1), total: totalSteps)
        let classes = head?.classes ?? 0
        let spdfq = settings.method == .spdfq
        let useLabels = head != nil
        let useRegions = spdfq && useLabels && settings.regions
        let useAttention = spdfq && settings.attentionPriors
        let usePSE = usesPatchSimilarity
        let oneHot = settings.method == .psaq || !settings.softLabels
        // Per image, fixed for all its steps and stages: the targets.
        let labels = SoftLabels.draw(seed: settings.seed, image: index, classes: max(classes, 1), regions: useRegions ? RegionCrop.cellCount : 0)
        let imageTarget: [Float] = useLabels ? labels.image.distribution(as: Float.self) : []
        let regionTargets: [[Float]] = useRegions ? labels.regions.map { $0.distribution(as: Float.self) } : []
        let oneHotLabel = labels.image.targets[0].label
        let blockWeights = AttentionPrior.blockWeights(blocks: c.depth)
        let attentionBlocks = Set(blockWeights.indices.filter { blockWeights[$0] > 0 })
        var result = ImageResult()
        if recordingSteps { result.steps.reserveCapacity(totalSteps) }
        var x = scratch.image, spare = scratch.resized
        var previousSize = 0
        var step = 0
        for stage in schedule.stages {
            let stageStart = MonotonicClock.seconds()
            let s = stage.size, plane = channels * s * s
            let stageEngine = engines[s]!, ws = scratch.workspaces[s]!, t = stageEngine.tokens
            // The image at this stage's size: noise at the first stage, else the last stage's image resized.
            if previousSize == 0 {
                initialImage(index, size: s, into: x.pointer)
            } else if previousSize != s {
                resize(x.pointer, from: previousSize, into: spare.pointer, to: s)
                swap(&x, &spare)
            }
            previousSize = s
            let pixels = UnsafeMutableBufferPointer(start: x.pointer, count: plane)
            var adam = try PixelAdam(count: plane, beta1: settings.beta1, beta2: settings.beta2)
            // The priors at this stage's patch grid: (block, head) → prior over the g² patches.
            var priors = [[Float]](repeating: [], count: c.depth * heads)
            if useAttention {
                for b in attentionBlocks {
                    for h in 0..<heads {
                        priors[b * heads + h] = AttentionPrior.random(seed: settings.seed, image: index, block: b, head: h, grid: stageEngine.grid)
                            .probabilities(as: Float.self)
                    }
                }
            }
            let limit = Int((settings.jitter * Double(s)).rounded())
            let sampleBuffer = scratch.samples.pointer, gradientBuffer = scratch.sampleGradient.pointer, total = scratch.total.pointer
            let features = scratch.features.pointer, featureGradient = scratch.featureGradient.pointer
            let logits = scratch.logits.pointer, logitGradient = scratch.logitGradient.pointer
            var last = SynthesisLosses()
            for _ in 0..<stage.steps {
                var losses = SynthesisLosses()
                // 1. Jitter + flip into sample 0, then the MSR crops of the augmented image.
                let augmentation = Augmentation.random(seed: settings.seed, image: index, step: step, limit: limit)
                let augmented = UnsafeMutableBufferPointer(start: sampleBuffer, count: plane)
                augmentation.apply(UnsafeBufferPointer(pixels), into: augmented, channels: channels, height: s, width: s)
                let cells = useRegions ? RegionCrop.randomCells(seed: settings.seed, image: index, step: step) : []
                let crops = cells.map { RegionCrop.cell($0, imageHeight: s, imageWidth: s) }
                for (k, crop) in crops.enumerated() {
                    crop.forward(UnsafeBufferPointer(augmented),
                        into: UnsafeMutableBufferPointer(start: sampleBuffer + (1 + k) * plane, count: plane), channels: channels)
                }
                let n = 1 + crops.count
                // 2. Forward, then the losses at the features / logits.
                stageEngine.recordForward(images: sampleBuffer, count: n, workspace: ws, features: features)
                featureGradient.update(repeating: 0, count: n * d)
                if let head, useLabels {
                    head.logits(features: features, count: n, into: logits)
                    logitGradient.update(repeating: 0, count: n * classes)
                    for k in 0..<n {
                        let z = UnsafeBufferPointer(start: logits + k * classes, count: classes)
                        let g = UnsafeMutableBufferPointer(start: logitGradient + k * classes, count: classes)
                        if oneHot {
                            losses.labels += Double(SoftLabels.crossEntropy(logits: z, label: oneHotLabel, weight: 1, addingInto: g))
                        } else {
                            let target = k == 0 ? imageTarget : regionTargets[cells[k - 1]]
                            losses.labels += Double(target.withUnsafeBufferPointer {
                                SoftLabels.crossEntropy(logits: z, target: $0, weight: 1, addingInto: g)
                            })
                        }
                    }
                    losses.labels /= Double(n)
                    head.featureGradient(logitGradient: logitGradient, count: n, into: featureGradient)
                }
                // 3. Backward with APA on the whole image's attention and PSE on every block's heads' output.
                var hooks = BackwardHooks()
                var attentionLoss = 0.0, similarityLoss = 0.0
                if useAttention {
                    let alpha = Float(settings.attentionWeight)
                    hooks.attentionBlocks = attentionBlocks
                    hooks.attention = { sample, block, h, p, dp in
                        guard sample == 0 else { return }
                        let w = Float(blockWeights[block])
                        let l = priors[block * heads + h].withUnsafeBufferPointer { pr in
                            AttentionPrior.loss(attentionRow: UnsafeBufferPointer(start: p, count: t), prior: pr, weight: alpha * w,
                                addingInto: UnsafeMutableBufferPointer(start: dp, count: t))
                        }
                        attentionLoss += Double(w * l)
                    }
                }
                if usePSE {
                    let weight = Float(settings.similarityWeight)
                    hooks.attentionOutputBlocks = Set(0..<c.depth)
                    hooks.attentionOutput = { _, o, dO in
                        similarityLoss += Double(PatchSimilarityEntropy.loss(
                            headOutputs: UnsafeBufferPointer(start: o, count: t * d), tokens: t, width: d, heads: heads, weight: weight,
                            addingInto: UnsafeMutableBufferPointer(start: dO, count: t * d)))
                    }
                }
                stageEngine.inputGradient(count: n, workspace: ws, featureGradient: featureGradient, hooks: hooks, into: gradientBuffer)
                losses.attention = attentionLoss
                losses.similarity = similarityLoss
                // 4. Back through the crops and the augmentation; the TV prior on the image itself.
                for (k, crop) in crops.enumerated() {
                    crop.addAdjoint(UnsafeBufferPointer(start: gradientBuffer + (1 + k) * plane, count: plane),
                        into: UnsafeMutableBufferPointer(start: gradientBuffer, count: plane), channels: channels)
                }
                total.update(repeating: 0, count: plane)
                augmentation.addAdjoint(UnsafeBufferPointer(start: gradientBuffer, count: plane),
                    into: UnsafeMutableBufferPointer(start: total, count: plane), channels: channels, height: s, width: s)
                losses.totalVariation = Double(TotalVariation.valueAndGradient(
                    of: UnsafeBufferPointer(pixels), channels: channels, height: s, width: s, weight: Float(settings.totalVariationWeight),
                    addingInto: UnsafeMutableBufferPointer(start: total, count: plane)))
                // 5. Adam, then the valid pixel box.
                adam.step(pixels, gradient: UnsafeBufferPointer(start: total, count: plane), learningRate: rates.rate(at: step), box: box, planeSize: s * s)
                last = losses
                if recordingSteps { result.steps.append(losses) }
                report(step, losses)
                step += 1
            }
            result.stageFinal.append(last)
            result.stageSeconds.append(MonotonicClock.seconds() - stageStart)
        }
        // The result at the model's input size.
        let size = engine.imageSize
        if previousSize == size {
            output.update(from: x.pointer, count: channels * size * size)
        } else {
            resize(x.pointer, from: previousSize, into: output, to: size)
        }
        return result
    }

    /// Resizes an image [C, from, from] to [C, to, to] bilinearly (`align_corners=False`, no antialiasing: the
    /// whole image as one ``RegionCrop``), then clamps it into the pixel box.
    func resize(_ image: UnsafePointer<Float>, from: Int, into output: UnsafeMutablePointer<Float>, to: Int) {
        let channels = engine.model.config.channels
        let crop = RegionCrop(imageHeight: from, imageWidth: from, top: 0, left: 0, height: from, width: from, outputHeight: to, outputWidth: to)
        let out = UnsafeMutableBufferPointer(start: output, count: channels * to * to)
        crop.forward(UnsafeBufferPointer(start: image, count: channels * from * from), into: out, channels: channels)
        box.clamp(out, planeSize: to * to)
    }
}
