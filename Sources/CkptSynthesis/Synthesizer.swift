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
    public var steps: Int
    public var seed: UInt64
    /// Adam's base learning rate on the normalised pixels (PSAQ-ViT: 0.2), with a linear warm-up over
    /// ``warmupFraction`` of the steps and a cosine decay after.
    public var learningRate: Double = 0.25
    public var warmupFraction: Double = 0.1
    public var beta1: Double = 0.5, beta2: Double = 0.9
    /// The APA weight α (the SARDFQ paper searches 1…1e5 per model).
    public var attentionWeight: Double = 1e4
    /// The TV prior's weight on R (the sum of the four difference norms of one image).
    public var totalVariationWeight: Double = 0.05
    /// The PSE weight (PSAQ-ViT, and SPDFQ without a head).
    public var similarityWeight: Double = 1
    /// Jitter offsets are drawn from ±`jitter`·size pixels each step (PSAQ-ViT: 30 px at 224).
    public var jitter: Double = 30.0 / 224
    /// The ablation switches of SPDFQ: attention-prior alignment, multi-semantic regions, soft labels (off: one-hot
    /// cross-entropy to the image's class, no region targets).
    public var attentionPriors = true, regions = true, softLabels = true

    /// The defaults `ckpt synthesize` and `ckpt quantize --activation-bits` use.
    public static let defaultImages = 32, defaultSteps = 100

    public init(method: SynthesisMethod, steps: Int, seed: UInt64) {
        self.method = method
        self.steps = steps
        self.seed = seed
    }

    /// Whether images are optimised (the two noise methods are not).
    public var optimises: Bool { method == .spdfq || method == .psaq }
}

/// The final loss terms of one image (0 where a term is off), at its last step.
public struct SynthesisLosses: Sendable, Equatable {
    /// Soft (or one-hot) cross-entropy of the image and its regions.
    public var labels: Double = 0
    /// α-free APA: Σ over the deeper blocks and heads of (l/L)·MSE.
    public var attention: Double = 0
    /// R, the TV prior.
    public var totalVariation: Double = 0
    /// Σ over blocks of the patch-similarity entropy loss (−H).
    public var similarity: Double = 0

    public static let names = ["labels", "attention", "total_variation", "similarity"]
    public var values: [Double] { [labels, attention, totalVariation, similarity] }
}

/// Progress of a synthesis: optimisation steps done over all images, and the mean losses of the last steps.
public struct SynthesisProgress: Sendable {
    public let stepsDone: Int
    public let stepsTotal: Int
    public let imagesDone: Int
    public let imagesTotal: Int
    public let seconds: Double
    public let losses: SynthesisLosses
}

/// Synthesises calibration images from a model, with no data. Each image depends only on (settings, model, global
/// image index): images are optimised one at a time (its forward/backward micro-batch is the image and its MSR
/// crops), every random draw comes from a stream keyed by (seed, image, purpose, step), and OpenBLAS runs
/// single-threaded inside each worker whatever the worker count, so a shard's images are bit-identical to the same
/// images of a full run on the same machine and build.
public final class Synthesizer: Sendable {
    public let engine: ViTEngine
    public let head: LinearHead?
    public let settings: SynthesisSettings
    public let box: PixelBox

    public init(engine: ViTEngine, head: LinearHead?, settings: SynthesisSettings) throws(CkptError) {
        let c = engine.model.config
        if let head, head.width != c.dim {
            throw CkptError(.shapeMismatch, "head width \(head.width) ≠ model width \(c.dim)", path: head.source)
        }
        guard settings.steps >= 0, settings.steps <= 1_000_000 else {
            throw CkptError(.invalidArgument, "steps must be in 0…1000000, got \(settings.steps)")
        }
        guard settings.optimises == false || settings.steps > 0 else {
            throw CkptError(.invalidArgument, "\(settings.method.rawValue) optimises the images: steps must be at least 1")
        }
        self.engine = engine
        self.head = head
        self.settings = settings
        box = try PixelBox(mean: c.mean.map(Double.init), std: c.std.map(Double.init))
    }

    /// Without a head SPDFQ has no classes: its soft-label and region terms are dropped and the patch-similarity
    /// entropy takes their place (with APA and TV).
    public var usesPatchSimilarity: Bool { settings.method == .psaq || (settings.method == .spdfq && head == nil) }

    /// Images `indices` (global indices), written to `output` [indices.count × C × S × S] in that order; their final
    /// losses are returned in the same order. `progress` is called from the workers (serialised) after each step.
    public func synthesize(
        indices: [Int], into output: UnsafeMutablePointer<Float>, progress: (@Sendable (SynthesisProgress) -> Void)? = nil
    ) throws(CkptError) -> [SynthesisLosses] {
        let c = engine.model.config, s = engine.imageSize
        let plane = c.channels * s * s
        let losses = Mutex([SynthesisLosses](repeating: SynthesisLosses(), count: indices.count))
        guard !indices.isEmpty else { return [] }
        if !settings.optimises {
            for (k, index) in indices.enumerated() { initialImage(index, into: output + k * plane) }
            return losses.withLock { $0 }
        }
        let samples = settings.method == .spdfq && head != nil && settings.regions ? 1 + RegionCrop.cellCount : 1
        let workspaceBytes = try GradientWorkspace.bytes(engine: engine, images: samples)
        var workers = min(Parallel.coreCount, indices.count)
        while workers > 1, workspaceBytes * workers > MemoryBudget.available() { workers -= 1 }
        try MemoryBudget.require(workspaceBytes * workers, for: "\(workers) synthesis workspace(s) of \(samples) images at \(s) px", path: engine.model.path)
        let start = MonotonicClock.seconds()
        let state = Mutex((steps: 0, images: 0, recent: SynthesisLosses(), failure: CkptError?.none))
        let total = indices.count * settings.steps
        nonisolated(unsafe) let destination = output
        let workerCount = workers
        BLAS.withThreads(1) {
            DispatchQueue.concurrentPerform(iterations: workerCount) { worker in
                do throws(CkptError) {
                    let ws = try engine.makeGradientWorkspace(images: samples)
                    var k = worker
                    while k < indices.count, state.withLock({ $0.failure == nil }) {
                        let final = try optimise(indices[k], workspace: ws, samples: samples, into: destination + k * plane) { step, stepLosses in
                            let snapshot = state.withLock { st -> SynthesisProgress in
                                st.steps += 1
                                st.recent = stepLosses
                                if step == settings.steps - 1 { st.images += 1 }
                                return SynthesisProgress(
                                    stepsDone: st.steps, stepsTotal: total, imagesDone: st.images, imagesTotal: indices.count,
                                    seconds: MonotonicClock.seconds() - start, losses: st.recent)
                            }
                            progress?(snapshot)
                        }
                        losses.withLock { $0[k] = final }
                        k += workerCount
                    }
                } catch {
                    state.withLock { if $0.failure == nil { $0.failure = error } }
                }
            }
        }
        if let failure = state.withLock({ $0.failure }) { throw failure }
        return losses.withLock { $0 }
    }

    /// The starting image (for `noise`/`smooth`, the result): N(0, 1) per pixel, clipped to the box, or smooth noise.
    func initialImage(_ index: Int, into out: UnsafeMutablePointer<Float>) {
        let c = engine.model.config, s = engine.imageSize
        let buffer = UnsafeMutableBufferPointer(start: out, count: c.channels * s * s)
        if settings.method == .smooth {
            CalibrationImages.smoothNoise(index: index, seed: settings.seed, channels: c.channels, size: s, into: out)
        } else {
            var random = SynthesisRandom(seed: settings.seed, image: index, purpose: .initialNoise)
            random.fillNormal(buffer)
        }
        box.clamp(buffer, planeSize: s * s)
    }

    /// Optimises one image for `settings.steps` steps; `report(step, losses)` after each.
    func optimise(
        _ index: Int, workspace ws: GradientWorkspace, samples capacity: Int, into image: UnsafeMutablePointer<Float>,
        report: (Int, SynthesisLosses) -> Void
    ) throws(CkptError) -> SynthesisLosses {
        let c = engine.model.config, s = engine.imageSize, d = c.dim, t = engine.tokens, heads = c.heads
        let plane = c.channels * s * s
        let x = UnsafeMutableBufferPointer(start: image, count: plane)
        initialImage(index, into: image)
        var adam = try PixelAdam(count: plane, beta1: settings.beta1, beta2: settings.beta2)
        let schedule = try LearningRateSchedule(
            base: settings.learningRate, warmup: max(1, Int((Double(settings.steps) * settings.warmupFraction).rounded())), total: settings.steps)
        let classes = head?.classes ?? 0
        let spdfq = settings.method == .spdfq
        let useLabels = head != nil
        let useRegions = spdfq && useLabels && settings.regions
        let useAttention = spdfq && settings.attentionPriors
        let usePSE = usesPatchSimilarity
        // Per image, fixed for all its steps: the targets and the priors.
        let labels = SoftLabels.draw(seed: settings.seed, image: index, classes: max(classes, 1), regions: useRegions ? RegionCrop.cellCount : 0)
        let imageTarget: [Float] = useLabels ? softTarget(labels.image, classes: classes) : []
        let regionTargets: [[Float]] = useRegions ? labels.regions.map { softTarget($0, classes: classes) } : []
        let blockWeights = AttentionPrior.blockWeights(blocks: c.depth)
        var priors: [Int: [[Float]]] = [:]  // block → head → prior over the patches
        if useAttention {
            for (b, w) in blockWeights.enumerated() where w > 0 {
                priors[b] = (0..<heads).map { h in
                    AttentionPrior.random(seed: settings.seed, image: index, block: b, head: h, grid: engine.grid).probabilities(as: Float.self)
                }
            }
        }
        let sampleBuffer = try FloatBuffer(count: capacity * plane)
        let gradientBuffer = try FloatBuffer(count: capacity * plane)
        let augmented = try FloatBuffer(count: plane), total = try FloatBuffer(count: plane)
        let features = try FloatBuffer(count: capacity * d), featureGradient = try FloatBuffer(count: capacity * d)
        let logits = try FloatBuffer(count: max(1, capacity * classes)), logitGradient = try FloatBuffer(count: max(1, capacity * classes))
        let limit = Int((settings.jitter * Double(s)).rounded())
        var last = SynthesisLosses()
        for step in 0..<settings.steps {
            var losses = SynthesisLosses()
            // 1. Jitter + flip, then the MSR crops of the augmented image.
            let augmentation = Augmentation.random(seed: settings.seed, image: index, step: step, limit: limit)
            augmentation.apply(UnsafeBufferPointer(x), into: UnsafeMutableBufferPointer(start: augmented.pointer, count: plane),
                channels: c.channels, height: s, width: s)
            sampleBuffer.pointer.update(from: augmented.pointer, count: plane)
            let cells = useRegions ? RegionCrop.randomCells(seed: settings.seed, image: index, step: step) : []
            let crops = cells.map { RegionCrop.cell($0, imageHeight: s, imageWidth: s) }
            for (k, crop) in crops.enumerated() {
                crop.forward(UnsafeBufferPointer(start: augmented.pointer, count: plane),
                    into: UnsafeMutableBufferPointer(start: sampleBuffer.pointer + (1 + k) * plane, count: plane), channels: c.channels)
            }
            let n = 1 + crops.count
            // 2. Forward, then the losses at the features / logits.
            engine.recordForward(images: sampleBuffer.pointer, count: n, workspace: ws, features: features.pointer)
            featureGradient.pointer.update(repeating: 0, count: n * d)
            if let head, useLabels {
                head.logits(features: features.pointer, count: n, into: logits.pointer)
                logitGradient.pointer.update(repeating: 0, count: n * classes)
                for k in 0..<n {
                    let z = UnsafeBufferPointer(start: logits.pointer + k * classes, count: classes)
                    let g = UnsafeMutableBufferPointer(start: logitGradient.pointer + k * classes, count: classes)
                    if settings.method == .psaq || !settings.softLabels {
                        losses.labels += Double(SoftLabels.crossEntropy(logits: z, label: labels.image.targets[0].label, weight: 1, addingInto: g))
                    } else {
                        let target = k == 0 ? imageTarget : regionTargets[cells[k - 1]]
                        losses.labels += Double(target.withUnsafeBufferPointer {
                            SoftLabels.crossEntropy(logits: z, target: $0, weight: 1, addingInto: g)
                        })
                    }
                }
                head.featureGradient(logitGradient: logitGradient.pointer, count: n, into: featureGradient.pointer)
            }
            // 3. Backward with APA on the whole image's attention and PSE on every block's heads' output.
            var hooks = BackwardHooks()
            var attentionLoss = 0.0, similarityLoss = 0.0
            if useAttention {
                let alpha = Float(settings.attentionWeight)
                hooks.attentionBlocks = Set(priors.keys)
                hooks.attention = { sample, block, h, p, dp in
                    guard sample == 0, let prior = priors[block]?[h] else { return }
                    let w = Float(blockWeights[block])
                    let l = prior.withUnsafeBufferPointer { pr in
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
            engine.inputGradient(count: n, workspace: ws, featureGradient: featureGradient.pointer, hooks: hooks, into: gradientBuffer.pointer)
            losses.attention = attentionLoss
            losses.similarity = similarityLoss
            // 4. Back through the crops and the augmentation; the TV prior on the image itself.
            for (k, crop) in crops.enumerated() {
                crop.addAdjoint(UnsafeBufferPointer(start: gradientBuffer.pointer + (1 + k) * plane, count: plane),
                    into: UnsafeMutableBufferPointer(start: gradientBuffer.pointer, count: plane), channels: c.channels)
            }
            total.pointer.update(repeating: 0, count: plane)
            augmentation.addAdjoint(UnsafeBufferPointer(start: gradientBuffer.pointer, count: plane),
                into: UnsafeMutableBufferPointer(start: total.pointer, count: plane), channels: c.channels, height: s, width: s)
            losses.totalVariation = Double(TotalVariation.valueAndGradient(
                of: UnsafeBufferPointer(x), channels: c.channels, height: s, width: s, weight: Float(settings.totalVariationWeight),
                addingInto: UnsafeMutableBufferPointer(start: total.pointer, count: plane)))
            // 5. Adam, then the valid pixel box.
            adam.step(x, gradient: UnsafeBufferPointer(start: total.pointer, count: plane), learningRate: schedule.rate(at: step), box: box, planeSize: s * s)
            last = losses
            report(step, losses)
        }
        return last
    }

    func softTarget(_ labels: SoftLabels, classes: Int) -> [Float] { labels.distribution(as: Float.self) }
}
