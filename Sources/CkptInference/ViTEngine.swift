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
        try features(count: count, fill: fill, observe: nil)
    }

    /// Receives the input of every Linear layer of every micro-batch: (block, which input, rows × width values,
    /// rows, width). Called from the workers, concurrently.
    typealias LinearInputObserver = @Sendable (Int, LinearInput, UnsafePointer<Float>, Int, Int) -> Void

    func features(
        count: Int, fill: @Sendable (Int, UnsafeMutablePointer<Float>) throws(CkptError) -> Void, observe: LinearInputObserver?
    ) throws(CkptError) -> [Float] {
        let d = model.config.dim
        guard count > 0 else { return [] }
        let outputBytes = try CheckedSize.product([count, d, 4], "features of \(count) images")
        try MemoryBudget.require(outputBytes, for: "the features of \(count) images", path: model.path)
        let output = try FloatBuffer(count: count * d)
        let imageFloats = model.config.channels * imageSize * imageSize
        try forEachMicroBatch(count: count) { (first: Int, n: Int, ws: Workspace) throws(CkptError) in
            for i in 0..<n { try fill(first + i, ws.images.pointer + i * imageFloats) }
            forward(images: ws.images.pointer, count: n, workspace: ws, output: output.pointer + first * d, observe: observe)
        }
        return output.values
    }

    /// Calls `body(first image, images, workspace)` for every micro-batch of `count` images. Micro-batches are
    /// dealt round-robin to the workers, each with its own workspace and single-threaded OpenBLAS (a lone worker
    /// lets OpenBLAS use every core). The first error stops the other workers and is rethrown.
    func forEachMicroBatch(count: Int, _ body: @Sendable (Int, Int, Workspace) throws(CkptError) -> Void) throws(CkptError) {
        guard count > 0 else { return }
        let batches = (count + microBatch - 1) / microBatch
        var workers = min(Parallel.coreCount, batches)
        // Even split when there are few images, so two cores get equal work.
        var perBatch = min(microBatch, (count + workers - 1) / workers)
        // Smaller micro-batches, then fewer workers, when the workspaces would not fit in memory (large inputs).
        let budget = MemoryBudget.available()
        func plan() throws(CkptError) -> Int {
            try CheckedSize.product(
                [try Workspace.bytes(config: model.config, imageSize: imageSize, images: perBatch), workers], "workspace")
        }
        while perBatch > 1, try plan() > budget { perBatch = (perBatch + 1) / 2 }
        while workers > 1, try plan() > budget { workers -= 1 }
        try MemoryBudget.require(
            try plan(), for: "\(workers) forward-pass workspace\(workers == 1 ? "" : "s") of \(perBatch) image\(perBatch == 1 ? "" : "s") at \(imageSize) px",
            path: model.path)
        let batchCount = (count + perBatch - 1) / perBatch
        let (workerCount, batchSize) = (workers, perBatch)
        let failure = Mutex<CkptError?>(nil)  // the first error any worker throws
        BLAS.withThreads(workerCount == 1 ? Parallel.coreCount : 1) {
        DispatchQueue.concurrentPerform(iterations: workerCount) { worker in
            let workspace: Workspace
            do throws(CkptError) {
                workspace = try Workspace(engine: self, images: batchSize)
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
        observe: LinearInputObserver? = nil
    ) {
        let c = model.config
        let d = c.dim, t = tokens
        let rows = n * t
        embed(images: images, count: n, workspace: ws, into: ws.x.pointer)
        for (index, block) in model.blocks.enumerated() {
            let x = ws.x.pointer
            Kernels.layerNorm(x, ws.h.pointer, rows: rows, width: d, gamma: block.norm1Weight.pointer, beta: block.norm1Bias.pointer, eps: c.eps)
            observe?(index, .attention, ws.h.pointer, rows, d)
            selfAttention(block, input: ws.h.pointer, count: n, workspace: ws)
            observe?(index, .projection, ws.attention.pointer, rows, d)
            addProjection(block, input: ws.attention.pointer, to: x, rows: rows)
            Kernels.layerNorm(x, ws.h.pointer, rows: rows, width: d, gamma: block.norm2Weight.pointer, beta: block.norm2Bias.pointer, eps: c.eps)
            observe?(index, .mlp, ws.h.pointer, rows, d)
            mlpHidden(block, input: ws.h.pointer, rows: rows, workspace: ws)
            observe?(index, .mlpHidden, ws.hidden.pointer, rows, c.mlpDim)
            addMLPOutput(block, input: ws.hidden.pointer, to: x, rows: rows)
        }
        for i in 0..<n {
            Kernels.layerNorm(ws.x.pointer + i * t * d, output + i * d, rows: 1, width: d, gamma: model.finalNormWeight.pointer,
                beta: model.finalNormBias.pointer, eps: c.eps)
        }
    }

    /// Images [n × C × size × size] → the first block's input tokens [n × tokens × D] at `x`.
    func embed(images: UnsafePointer<Float>, count n: Int, workspace ws: Workspace, into x: UnsafeMutablePointer<Float>) {
        let c = model.config
        let d = c.dim, t = tokens, g2 = grid * grid, p = c.patchSize, k = c.channels * p * p
        // Patch embedding: im2col is a pure reshape (stride = kernel), then one GEMM for all images.
        patchify(images, count: n, into: ws.patches.pointer)
        BLAS.gemmTransposedB(ws.patches.pointer, lda: k, model.patchWeight.pointer, ldb: k, ws.h.pointer, ldc: d,
            m: n * g2, n: d, k: k, beta: 0)
        for i in 0..<n {
            let base = x + i * t * d
            base.update(from: classRow.pointer, count: d)
            let embedded = ws.h.pointer + i * g2 * d
            for j in 0..<(g2 * d) { base[d + j] = embedded[j] + patchPositions.pointer[j] }
        }
    }

    /// norm1's output `input` [n·tokens × D] → the attention heads' output, in `ws.attention`.
    func selfAttention(_ block: ViTBlock, input: UnsafePointer<Float>, count n: Int, workspace ws: Workspace) {
        let c = model.config
        let d = c.dim, t = tokens, rows = n * t, heads = c.heads, hd = c.headDim
        let scale = 1 / Float(hd).squareRoot()
        Kernels.fillRows(ws.qkv.pointer, rows: rows, width: 3 * d, stride: 3 * d, with: block.qkvBias.pointer)
        BLAS.gemmTransposedB(input, lda: d, block.qkvWeight.pointer, ldb: d, ws.qkv.pointer, ldc: 3 * d, m: rows, n: 3 * d, k: d, beta: 1)
        for i in 0..<n {
            let qkv = ws.qkv.pointer + i * t * 3 * d
            let out = ws.attention.pointer + i * t * d
            for head in 0..<heads {
                let q = qkv + head * hd, key = qkv + d + head * hd, v = qkv + 2 * d + head * hd
                BLAS.gemmTransposedB(q, lda: 3 * d, key, ldb: 3 * d, ws.scores.pointer, ldc: t, m: t, n: t, k: hd, alpha: scale, beta: 0)
                Kernels.softmaxRows(ws.scores.pointer, rows: t, width: t, stride: t)
                BLAS.gemm(ws.scores.pointer, lda: t, v, ldb: 3 * d, out + head * hd, ldc: d, m: t, n: hd, k: t, beta: 0)
            }
        }
    }

    /// x += attention output projection of `input` (LayerScale folded in).
    func addProjection(_ block: ViTBlock, input: UnsafePointer<Float>, to x: UnsafeMutablePointer<Float>, rows: Int) {
        let d = model.config.dim
        Kernels.addRows(x, rows: rows, width: d, stride: d, bias: block.projectionBias.pointer)
        BLAS.gemmTransposedB(input, lda: d, block.projectionWeight.pointer, ldb: d, x, ldc: d, m: rows, n: d, k: d, beta: 1)
    }

    /// GELU(fc1(`input`)) into `ws.hidden`.
    func mlpHidden(_ block: ViTBlock, input: UnsafePointer<Float>, rows: Int, workspace ws: Workspace) {
        let c = model.config
        BLAS.gemmTransposedB(input, lda: c.dim, block.fc1Weight.pointer, ldb: c.dim, ws.hidden.pointer, ldc: c.mlpDim,
            m: rows, n: c.mlpDim, k: c.dim, beta: 0)
        Kernels.biasGELU(ws.hidden.pointer, rows: rows, width: c.mlpDim, bias: block.fc1Bias.pointer)
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
