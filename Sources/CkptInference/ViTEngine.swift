import CkptCore
import CkptKernels
import Dispatch
import Synchronization

/// The forward pass of a ``ViTModel`` at one input size, over many images.
///
/// Images are processed in micro-batches whose tokens are stacked, so every Linear is one `cblas_sgemm` over
/// (images × tokens) rows. Micro-batches are split across cores, each worker with its own reused buffers and
/// OpenBLAS kept single-threaded; a lone worker (one micro-batch) lets OpenBLAS use every core instead.
public final class ViTEngine: Sendable {
    public let model: ViTModel
    public let imageSize: Int
    public let grid: Int
    public let tokens: Int
    /// Patch rows of the position table at this input size with the patch bias folded in: [grid² × D].
    let patchPositions: FloatBuffer
    /// Class token + its position entry: [D].
    let classRow: FloatBuffer
    public let microBatch: Int

    public init(model: ViTModel, imageSize: Int? = nil, microBatch: Int = 8) throws(CkptError) {
        let config = model.config
        let size = imageSize ?? config.imageSize
        guard size >= config.patchSize, size % config.patchSize == 0, size <= 4096 else {
            throw CkptError(.invalidArgument, "image size \(size) must be a multiple of the patch size \(config.patchSize) (at most 4096)", path: model.path)
        }
        self.model = model
        self.imageSize = size
        grid = size / config.patchSize
        tokens = grid * grid + 1
        self.microBatch = max(1, microBatch)
        // Refused here, before any image is read, when even one image's workspace does not fit (the attention scores
        // alone are tokens² floats: 4.4 TB for a patch-4 model at 4096 px). `forEachMicroBatch` fits the rest.
        try MemoryBudget.require(
            try Workspace.bytes(config: config, imageSize: size, images: 1),
            for: "the forward pass of one image at \(size)×\(size) px (\(tokens) tokens)", path: model.path)
        let d = config.dim
        let stored = config.positionGrid
        let patchOffset = config.positionIncludesClassToken ? d : 0
        let resized = PositionEmbedding.resize(model.positions.pointer + patchOffset, gridHeight: stored.height, gridWidth: stored.width,
            dim: d, toHeight: grid, toWidth: grid)
        patchPositions = try FloatBuffer(resized)
        for g in 0..<(grid * grid) {
            for c in 0..<d { patchPositions.pointer[g * d + c] += model.patchBias.pointer[c] }
        }
        classRow = try FloatBuffer(count: d)
        for c in 0..<d {
            classRow.pointer[c] = model.classToken.pointer[c] + (config.positionIncludesClassToken ? model.positions.pointer[c] : 0)
        }
    }

    /// Per-worker activations, allocated once and reused for every layer and micro-batch.
    final class Workspace {
        let capacity: Int  // images
        let x, h, qkv, attention, hidden, scores, patches, images: FloatBuffer

        init(engine: ViTEngine, images: Int) throws(CkptError) {
            let f = try Self.floats(config: engine.model.config, imageSize: engine.imageSize, images: images)
            capacity = images
            x = try FloatBuffer(count: f.x)
            h = try FloatBuffer(count: f.x)
            qkv = try FloatBuffer(count: f.qkv)
            attention = try FloatBuffer(count: f.x)
            hidden = try FloatBuffer(count: f.hidden)
            scores = try FloatBuffer(count: f.scores)
            patches = try FloatBuffer(count: f.patches)
            self.images = try FloatBuffer(count: f.images)
        }

        /// The reused scratch as stage buffers (one score matrix for every image and head).
        var stageBuffers: StageBuffers {
            StageBuffers(normalized: h.pointer, qkv: qkv.pointer, probabilities: scores.pointer, probabilityStride: 0,
                attention: attention.pointer, hidden: hidden.pointer)
        }

        /// The float count of each buffer, overflow-checked (the sizes come from the model file and the flags).
        static func floats(config c: ViTConfig, imageSize: Int, images: Int) throws(CkptError)
            -> (x: Int, qkv: Int, hidden: Int, scores: Int, patches: Int, images: Int)
        {
            let what = "forward-pass buffers at \(imageSize) px"
            let grid = imageSize / max(c.patchSize, 1)
            let tokens = try CheckedSize.sum([try CheckedSize.product([grid, grid], what), 1], what)
            let rows = try CheckedSize.product([images, tokens], what)
            return (
                x: try CheckedSize.product([rows, c.dim], what),
                qkv: try CheckedSize.product([rows, 3, c.dim], what),
                hidden: try CheckedSize.product([rows, c.mlpDim], what),
                scores: try CheckedSize.product([tokens, tokens], what),
                patches: try CheckedSize.product([images, grid, grid, c.channels, c.patchSize, c.patchSize], what),
                images: try CheckedSize.product([images, c.channels, imageSize, imageSize], what))
        }

        /// Bytes of one workspace for `images` images.
        static func bytes(config: ViTConfig, imageSize: Int, images: Int) throws(CkptError) -> Int {
            let f = try floats(config: config, imageSize: imageSize, images: images)
            let what = "forward-pass buffers at \(imageSize) px"
            return try CheckedSize.product([try CheckedSize.sum([f.x, f.x, f.x, f.qkv, f.hidden, f.scores, f.patches, f.images], what), 4], what)
        }
    }

    /// Final-norm CLS features [count × D] of `count` images. `fill(i, destination)` writes image i as normalised
    /// F32 [C, size, size] (channel-major); it is called from the workers, so preprocessing runs in parallel too.
    public func features(count: Int, fill: @Sendable (Int, UnsafeMutablePointer<Float>) throws(CkptError) -> Void) throws(CkptError) -> [Float] {
        try features(count: count, fill: fill, hook: nil)
    }

    /// ``features(count:fill:)`` with `hook` seeing (or rewriting) the values at its activation sites.
    public func features(
        count: Int, fill: @Sendable (Int, UnsafeMutablePointer<Float>) throws(CkptError) -> Void, hook: (any ActivationHook)?
    ) throws(CkptError) -> [Float] {
        let d = model.config.dim
        guard count > 0 else { return [] }
        let outputBytes = try CheckedSize.product([count, d, 4], "features of \(count) images")
        try MemoryBudget.require(outputBytes, for: "the features of \(count) images", path: model.path)
        let output = try FloatBuffer(count: count * d)
        let imageFloats = model.config.channels * imageSize * imageSize
        try forEachMicroBatch(count: count) { (first: Int, n: Int, ws: Workspace) throws(CkptError) in
            for i in 0..<n { try fill(first + i, ws.images.pointer + i * imageFloats) }
            forward(images: ws.images.pointer, count: n, workspace: ws, output: output.pointer + first * d, hook: hook)
        }
        return output.values
    }

    /// Calls `body(first image, images, workspace)` for every micro-batch of `count` images. Micro-batches are
    /// dealt round-robin to the workers, each with its own workspace and single-threaded OpenBLAS (a lone worker
    /// lets OpenBLAS use every core). The first error stops the other workers and is rethrown.
    func forEachMicroBatch(count: Int, _ body: @Sendable (Int, Int, Workspace) throws(CkptError) -> Void) throws(CkptError) {
        try forEachMicroBatch(
            count: count, what: "forward-pass workspace",
            bytes: { (images: Int) throws(CkptError) in try Workspace.bytes(config: model.config, imageSize: imageSize, images: images) },
            make: { (images: Int) throws(CkptError) in try Workspace(engine: self, images: images) }, body)
    }

    /// ``forEachMicroBatch(count:_:)`` with forward + backward workspaces (``GradientWorkspace``).
    public func forEachGradientBatch(count: Int, _ body: @Sendable (Int, Int, GradientWorkspace) throws(CkptError) -> Void) throws(CkptError) {
        try forEachMicroBatch(
            count: count, what: "forward + backward workspace",
            bytes: { (images: Int) throws(CkptError) in try GradientWorkspace.bytes(engine: self, images: images) },
            make: { (images: Int) throws(CkptError) in try GradientWorkspace(engine: self, images: images) }, body)
    }

    /// The scheduler behind both: plans micro-batch size and worker count so the workspaces fit the memory budget
    /// (`bytes(images)` per workspace), then runs the workers.
    func forEachMicroBatch<W>(
        count: Int, what: String, bytes: (Int) throws(CkptError) -> Int, make: @Sendable (Int) throws(CkptError) -> W,
        _ body: @Sendable (Int, Int, W) throws(CkptError) -> Void
    ) throws(CkptError) {
        guard count > 0 else { return }
        let batches = (count + microBatch - 1) / microBatch
        var workers = min(Parallel.coreCount, batches)
        // Even split when there are few images, so two cores get equal work.
        var perBatch = min(microBatch, (count + workers - 1) / workers)
        // Smaller micro-batches, then fewer workers, when the workspaces would not fit in memory (large inputs).
        let budget = MemoryBudget.available()
        func plan() throws(CkptError) -> Int {
            try CheckedSize.product([try bytes(perBatch), workers], "workspace")
        }
        while perBatch > 1, try plan() > budget { perBatch = (perBatch + 1) / 2 }
        while workers > 1, try plan() > budget { workers -= 1 }
        try MemoryBudget.require(
            try plan(), for: "\(workers) \(what)\(workers == 1 ? "" : "s") of \(perBatch) image\(perBatch == 1 ? "" : "s") at \(imageSize) px",
            path: model.path)
        let batchCount = (count + perBatch - 1) / perBatch
        let (workerCount, batchSize) = (workers, perBatch)
        let failure = Mutex<CkptError?>(nil)  // the first error any worker throws
        BLAS.withThreads(workerCount == 1 ? Parallel.coreCount : 1) {
            DispatchQueue.concurrentPerform(iterations: workerCount) { worker in
                let workspace: W
                do throws(CkptError) {
                    workspace = try make(batchSize)
                } catch {
                    failure.withLock { if $0 == nil { $0 = error } }
                    return
                }
                var batch = worker
                while batch < batchCount, failure.withLock({ $0 == nil }) {
                    let first = batch * batchSize
                    do throws(CkptError) {
                        try body(first, min(batchSize, count - first), workspace)
                    } catch {
                        failure.withLock { if $0 == nil { $0 = error } }
                        return
                    }
                    batch += workerCount
                }
            }
        }
        if let error = failure.withLock({ $0 }) { throw error }
    }

    /// One micro-batch: images [n × C × size × size] → final-norm CLS rows [n × D].
    func forward(
        images: UnsafePointer<Float>, count n: Int, workspace ws: Workspace, output: UnsafeMutablePointer<Float>,
        hook: (any ActivationHook)? = nil
    ) {
        let c = model.config
        let d = c.dim, t = tokens
        embed(images: images, count: n, workspace: ws, into: ws.x.pointer, hook: hook)
        var buffers = ws.stageBuffers
        buffers.hook = hook
        for (index, block) in model.blocks.enumerated() {
            for stage in BlockStage.allCases { run(stage, index, block, x: ws.x.pointer, count: n, buffers) }
        }
        for i in 0..<n {
            Kernels.layerNorm(ws.x.pointer + i * t * d, output + i * d, rows: 1, width: d, gamma: model.finalNormWeight.pointer,
                beta: model.finalNormBias.pointer, eps: c.eps)
        }
        if let hook, hook.handles(.headInput) { hook.process(.headInput, output, rows: n, width: d, stride: d) }
    }

    /// The stages of a pre-norm block, in forward order. Forward, calibration and the backward pass (in reverse) all
    /// walk this one list through ``run(_:_:_:x:count:_:)``.
    enum BlockStage: CaseIterable {
        /// h = norm1(x)
        case norm1
        /// the attention heads' output of h: qkv, scaled softmax probabilities, P·V
        case attention
        /// x += projection(attention output) (LayerScale folded in)
        case projection
        /// h = norm2(x)
        case norm2
        /// hidden = GELU(fc1(h))
        case mlpHidden
        /// x += fc2(hidden) (LayerScale folded in)
        case mlpOutput

        /// The Linear input this stage produces, if any.
        var linearInput: LinearInput? {
            switch self {
            case .norm1: .attention
            case .attention: .projection
            case .norm2: .mlp
            case .mlpHidden: .mlpHidden
            case .projection, .mlpOutput: nil
            }
        }
    }

    /// Where a block's stages write: a worker's reused scratch, or for the backward pass one block's saved
    /// activations. Rows are images × tokens.
    struct StageBuffers {
        /// LayerNorm output [rows × D].
        let normalized: UnsafeMutablePointer<Float>
        /// q | k | v [rows × 3D].
        let qkv: UnsafeMutablePointer<Float>
        /// Attention probabilities [tokens × tokens] of (image i, head h) at `probabilities + (i·heads + h)·stride`;
        /// stride 0 reuses one matrix for all.
        let probabilities: UnsafeMutablePointer<Float>
        let probabilityStride: Int
        /// The attention heads' output [rows × D].
        let attention: UnsafeMutablePointer<Float>
        /// GELU(fc1) [rows × MLP].
        let hidden: UnsafeMutablePointer<Float>
        /// Saved for the backward pass (nil in a plain forward): fc1's pre-activation [rows × MLP], each norm's
        /// input [rows × D] and statistics [rows × 2].
        var preActivation: UnsafeMutablePointer<Float>? = nil
        var norm1Input: UnsafeMutablePointer<Float>? = nil, norm2Input: UnsafeMutablePointer<Float>? = nil
        var norm1Statistics: UnsafeMutablePointer<Float>? = nil, norm2Statistics: UnsafeMutablePointer<Float>? = nil
        /// Sees or rewrites the activation sites' values (fake quantization, calibration).
        var hook: (any ActivationHook)? = nil

        func linearInput(_ input: LinearInput) -> UnsafePointer<Float> {
            switch input {
            case .attention, .mlp: UnsafePointer(normalized)
            case .projection: UnsafePointer(attention)
            case .mlpHidden: UnsafePointer(hidden)
            }
        }
    }

    /// Runs one stage of block `index` on the residual rows `x` of `n` images; the Linear input it produces goes
    /// through the hook.
    func run(_ stage: BlockStage, _ index: Int, _ block: ViTBlock, x: UnsafeMutablePointer<Float>, count n: Int, _ b: StageBuffers) {
        defer {
            if let hook = b.hook, let input = stage.linearInput, hook.handles(input.site(block: index)) {
                let width = input == .mlpHidden ? model.config.mlpDim : model.config.dim
                hook.process(input.site(block: index), UnsafeMutablePointer(mutating: b.linearInput(input)), rows: n * tokens, width: width, stride: width)
            }
        }
        let c = model.config
        let d = c.dim, rows = n * tokens
        switch stage {
        case .norm1:
            b.norm1Input?.update(from: x, count: rows * d)
            Kernels.layerNorm(x, b.normalized, rows: rows, width: d, gamma: block.norm1Weight.pointer, beta: block.norm1Bias.pointer,
                eps: c.eps, statistics: b.norm1Statistics)
        case .attention:
            selfAttention(index, block, input: b.normalized, count: n, b)
        case .projection:
            addProjection(block, input: b.attention, to: x, rows: rows)
        case .norm2:
            b.norm2Input?.update(from: x, count: rows * d)
            Kernels.layerNorm(x, b.normalized, rows: rows, width: d, gamma: block.norm2Weight.pointer, beta: block.norm2Bias.pointer,
                eps: c.eps, statistics: b.norm2Statistics)
        case .mlpHidden:
            let pre = b.preActivation ?? b.hidden
            BLAS.gemmTransposedB(b.normalized, lda: d, block.fc1Weight.pointer, ldb: d, pre, ldc: c.mlpDim, m: rows, n: c.mlpDim, k: d, beta: 0)
            Kernels.biasGELU(pre, rows: rows, width: c.mlpDim, bias: block.fc1Bias.pointer, output: b.preActivation == nil ? nil : b.hidden)
        case .mlpOutput:
            addMLPOutput(block, input: b.hidden, to: x, rows: rows)
        }
    }

    /// Images [n × C × size × size] → the first block's input tokens [n × tokens × D] at `x`.
    func embed(
        images: UnsafePointer<Float>, count n: Int, workspace ws: Workspace, into x: UnsafeMutablePointer<Float>, hook: (any ActivationHook)? = nil
    ) {
        let c = model.config
        let d = c.dim, t = tokens, g2 = grid * grid, p = c.patchSize, k = c.channels * p * p
        // Patch embedding: im2col is a pure reshape (stride = kernel), then one GEMM for all images.
        patchify(images, count: n, into: ws.patches.pointer)
        if let hook, hook.handles(.patchEmbedInput) {  // the pixels, rearranged: a per-tensor quantizer sees the same values
            hook.process(.patchEmbedInput, ws.patches.pointer, rows: n * g2, width: k, stride: k)
        }
        BLAS.gemmTransposedB(ws.patches.pointer, lda: k, model.patchWeight.pointer, ldb: k, ws.h.pointer, ldc: d,
            m: n * g2, n: d, k: k, beta: 0)
        for i in 0..<n {
            let base = x + i * t * d
            base.update(from: classRow.pointer, count: d)
            let embedded = ws.h.pointer + i * g2 * d
            for j in 0..<(g2 * d) { base[d + j] = embedded[j] + patchPositions.pointer[j] }
        }
    }

    /// norm1's output `input` [n·tokens × D] → q|k|v, the probabilities and the heads' output, where `b` says.
    func selfAttention(_ index: Int, _ block: ViTBlock, input: UnsafePointer<Float>, count n: Int, _ b: StageBuffers) {
        let c = model.config
        let d = c.dim, t = tokens, rows = n * t, heads = c.heads, hd = c.headDim
        let scale = 1 / Float(hd).squareRoot()
        Kernels.fillRows(b.qkv, rows: rows, width: 3 * d, stride: 3 * d, with: block.qkvBias.pointer)
        BLAS.gemmTransposedB(input, lda: d, block.qkvWeight.pointer, ldb: d, b.qkv, ldc: 3 * d, m: rows, n: 3 * d, k: d, beta: 1)
        let probabilityHook = b.hook.flatMap { $0.handles(.block(index, .attnProbs)) ? $0 : nil }
        if let hook = b.hook {
            for (offset, site) in [(0, ActivationSite.block(index, .attnQ)), (d, .block(index, .attnK)), (2 * d, .block(index, .attnV))]
            where hook.handles(site) {
                hook.process(site, b.qkv + offset, rows: rows, width: d, stride: 3 * d)
            }
        }
        for i in 0..<n {
            let qkv = b.qkv + i * t * 3 * d
            let out = b.attention + i * t * d
            for head in 0..<heads {
                let q = qkv + head * hd, key = qkv + d + head * hd, v = qkv + 2 * d + head * hd
                let scores = b.probabilities + (i * heads + head) * b.probabilityStride
                BLAS.gemmTransposedB(q, lda: 3 * d, key, ldb: 3 * d, scores, ldc: t, m: t, n: t, k: hd, alpha: scale, beta: 0)
                Kernels.softmaxRows(scores, rows: t, width: t, stride: t)
                probabilityHook?.process(.block(index, .attnProbs), scores, rows: t, width: t, stride: t)
                BLAS.gemm(scores, lda: t, v, ldb: 3 * d, out + head * hd, ldc: d, m: t, n: hd, k: t, beta: 0)
            }
        }
    }

    /// x += attention output projection of `input` (LayerScale folded in).
    func addProjection(_ block: ViTBlock, input: UnsafePointer<Float>, to x: UnsafeMutablePointer<Float>, rows: Int) {
        let d = model.config.dim
        Kernels.addRows(x, rows: rows, width: d, stride: d, bias: block.projectionBias.pointer)
        BLAS.gemmTransposedB(input, lda: d, block.projectionWeight.pointer, ldb: d, x, ldc: d, m: rows, n: d, k: d, beta: 1)
    }

    /// x += fc2(`input`) (LayerScale folded in).
    func addMLPOutput(_ block: ViTBlock, input: UnsafePointer<Float>, to x: UnsafeMutablePointer<Float>, rows: Int) {
        let c = model.config
        Kernels.addRows(x, rows: rows, width: c.dim, stride: c.dim, bias: block.fc2Bias.pointer)
        BLAS.gemmTransposedB(input, lda: c.mlpDim, block.fc2Weight.pointer, ldb: c.mlpDim, x, ldc: c.dim,
            m: rows, n: c.dim, k: c.mlpDim, beta: 1)
    }

    /// [n, C, H, W] → [n·grid², C·p·p] with row gy·grid + gx and column c·p² + ky·p + kx (the conv weight's order).
    func patchify(_ images: UnsafePointer<Float>, count n: Int, into out: UnsafeMutablePointer<Float>) {
        let c = model.config.channels, p = model.config.patchSize, s = imageSize
        let k = c * p * p
        for i in 0..<n {
            let image = images + i * c * s * s
            for gy in 0..<grid {
                for gx in 0..<grid {
                    let row = out + ((i * grid + gy) * grid + gx) * k
                    for ch in 0..<c {
                        for ky in 0..<p {
                            (row + (ch * p + ky) * p).update(from: image + (ch * s + gy * p + ky) * s + gx * p, count: p)
                        }
                    }
                }
            }
        }
    }
}
