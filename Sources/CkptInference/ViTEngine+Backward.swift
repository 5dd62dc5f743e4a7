import CkptCore
import CkptKernels

/// Gradients that losses inject inside the network during ``ViTEngine/inputGradient(count:workspace:featureGradient:hooks:into:)``,
/// besides the gradient at the final-norm CLS features. Each hook *adds* its gradient to the buffer it is handed.
public struct BackwardHooks {
    /// Blocks whose attention probabilities receive a gradient from ``attention``.
    public var attentionBlocks: Set<Int>
    /// `(sample, block, head, P, dP)`: P is the post-softmax attention [tokens × tokens] (row = query, CLS first) of
    /// one sample and head; add dL/dP into dP (same layout), before the softmax's backward.
    public var attention: ((Int, Int, Int, UnsafePointer<Float>, UnsafeMutablePointer<Float>) -> Void)?
    /// Blocks whose attention output receives a gradient from ``attentionOutput``.
    public var attentionOutputBlocks: Set<Int>
    /// `(block, O, dO)`: O is the heads' output before the projection, [samples × tokens × D] (heads concatenated
    /// along D, as P·V writes them); add dL/dO into dO (same layout).
    public var attentionOutput: ((Int, UnsafePointer<Float>, UnsafeMutablePointer<Float>) -> Void)?

    public init(
        attentionBlocks: Set<Int> = [], attention: ((Int, Int, Int, UnsafePointer<Float>, UnsafeMutablePointer<Float>) -> Void)? = nil,
        attentionOutputBlocks: Set<Int> = [], attentionOutput: ((Int, UnsafePointer<Float>, UnsafeMutablePointer<Float>) -> Void)? = nil
    ) {
        self.attentionBlocks = attentionBlocks
        self.attention = attention
        self.attentionOutputBlocks = attentionOutputBlocks
        self.attentionOutput = attentionOutput
    }
}

/// One worker's buffers for forward + backward passes of up to `capacity` images: the forward scratch, every
/// activation the backward pass reads (saved per block), and the backward scratch. Allocated once and reused for
/// every step; not shared between threads.
public final class GradientWorkspace {
    public let capacity: Int
    let forward: ViTEngine.Workspace
    /// Saved per block, at block stride (capacity × tokens rows).
    let norm1Input, norm2Input, norm1Statistics, norm2Statistics, qkv, probabilities, attention, preActivation, hidden: FloatBuffer
    /// The residual stream's CLS rows before the final norm [capacity × D], and its statistics [capacity × 2].
    let finalInput, finalStatistics: FloatBuffer
    /// Backward scratch.
    let dx, dh, dqkv, dhidden, dscores, dpatches: FloatBuffer
    let strides: Strides
    /// tokens², the floats of one attention map.
    let tokenPairs: Int

    struct Strides {
        let rows, residual, statistics, qkv, probabilities, hidden: Int
    }

    /// Float counts of every buffer for `images` images, overflow-checked.
    static func floats(engine: ViTEngine, images: Int) throws(CkptError) -> (strides: Strides, perBlock: Int, scratch: Int) {
        let c = engine.model.config, t = engine.tokens
        let what = "the backward pass's saved activations at \(engine.imageSize) px"
        let rows = try CheckedSize.product([images, t], what)
        let strides = Strides(
            rows: rows, residual: try CheckedSize.product([rows, c.dim], what), statistics: try CheckedSize.product([rows, 2], what),
            qkv: try CheckedSize.product([rows, 3, c.dim], what), probabilities: try CheckedSize.product([images, c.heads, t, t], what),
            hidden: try CheckedSize.product([rows, c.mlpDim], what))
        // norm1/norm2 inputs, the heads' output, two statistics, qkv, probabilities, fc1's pre-activation and GELU.
        let perBlock = try CheckedSize.sum(
            [strides.residual, strides.residual, strides.residual, strides.statistics, strides.statistics, strides.qkv,
                strides.probabilities, strides.hidden, strides.hidden], what)
        let patches = try CheckedSize.product([images, engine.grid, engine.grid, c.channels, c.patchSize, c.patchSize], what)
        let scratch = try CheckedSize.sum(
            [strides.residual, strides.residual, strides.qkv, strides.hidden, try CheckedSize.product([t, t], what), patches,
                try CheckedSize.product([images, c.dim, 3], what)], what)
        return (strides, perBlock, scratch)
    }

    /// Bytes one workspace for `images` images holds: the forward scratch, the saved activations of every block
    /// and the backward scratch.
    public static func bytes(engine: ViTEngine, images: Int) throws(CkptError) -> Int {
        let f = try floats(engine: engine, images: images)
        let what = "the backward pass's workspace"
        let saved = try CheckedSize.product([f.perBlock, engine.model.blocks.count], what)
        let forward = try ViTEngine.Workspace.bytes(config: engine.model.config, imageSize: engine.imageSize, images: images)
        return try CheckedSize.sum([forward, try CheckedSize.product([try CheckedSize.sum([saved, f.scratch], what), 4], what)], what)
    }

    init(engine: ViTEngine, images: Int) throws(CkptError) {
        let capacity = max(1, images)
        try MemoryBudget.require(
            try Self.bytes(engine: engine, images: capacity),
            for: "forward + backward of \(capacity) image\(capacity == 1 ? "" : "s") at \(engine.imageSize) px", path: engine.model.path)
        self.capacity = capacity
        let f = try Self.floats(engine: engine, images: capacity)
        strides = f.strides
        tokenPairs = engine.tokens * engine.tokens
        let blocks = engine.model.blocks.count, c = engine.model.config
        func perBlock(_ stride: Int) throws(CkptError) -> FloatBuffer { try FloatBuffer(count: stride * blocks) }
        forward = try ViTEngine.Workspace(engine: engine, images: capacity)
        norm1Input = try perBlock(strides.residual)
        norm2Input = try perBlock(strides.residual)
        attention = try perBlock(strides.residual)
        norm1Statistics = try perBlock(strides.statistics)
        norm2Statistics = try perBlock(strides.statistics)
        qkv = try perBlock(strides.qkv)
        probabilities = try perBlock(strides.probabilities)
        preActivation = try perBlock(strides.hidden)
        hidden = try perBlock(strides.hidden)
        finalInput = try FloatBuffer(count: capacity * c.dim)
        finalStatistics = try FloatBuffer(count: capacity * 2)
        dx = try FloatBuffer(count: strides.residual)
        dh = try FloatBuffer(count: strides.residual)
        dqkv = try FloatBuffer(count: strides.qkv)
        dhidden = try FloatBuffer(count: strides.hidden)
        dscores = try FloatBuffer(count: engine.tokens * engine.tokens)
        dpatches = try FloatBuffer(count: capacity * engine.grid * engine.grid * c.channels * c.patchSize * c.patchSize)
    }

    /// Block `index`'s saved activations as the stages' buffers.
    func buffers(block index: Int, normalized: UnsafeMutablePointer<Float>) -> ViTEngine.StageBuffers {
        var b = ViTEngine.StageBuffers(
            normalized: normalized, qkv: qkv.pointer + index * strides.qkv,
            probabilities: probabilities.pointer + index * strides.probabilities,
            probabilityStride: tokenPairs,
            attention: attention.pointer + index * strides.residual, hidden: hidden.pointer + index * strides.hidden)
        b.preActivation = preActivation.pointer + index * strides.hidden
        b.norm1Input = norm1Input.pointer + index * strides.residual
        b.norm2Input = norm2Input.pointer + index * strides.residual
        b.norm1Statistics = norm1Statistics.pointer + index * strides.statistics
        b.norm2Statistics = norm2Statistics.pointer + index * strides.statistics
        return b
    }

    /// The post-softmax attention [tokens × tokens] of `sample`, `block`, `head` saved by the last recorded forward.
    public func attentionProbabilities(sample: Int, block: Int, head: Int, heads: Int, tokens: Int) -> UnsafePointer<Float> {
        UnsafePointer(probabilities.pointer + block * strides.probabilities + (sample * heads + head) * tokens * tokens)
    }
}

extension ViTEngine {
    /// A workspace for forward + backward passes over micro-batches of up to `images` images.
    public func makeGradientWorkspace(images: Int) throws(CkptError) -> GradientWorkspace {
        try GradientWorkspace(engine: self, images: images)
    }

    /// The forward pass of `n` ≤ capacity images [n × C × size × size] that records every activation the backward
    /// pass needs in `ws`, writing the final-norm CLS features [n × D] to `features`. Runs on the calling thread (the
    /// caller picks OpenBLAS's thread count).
    public func recordForward(images: UnsafePointer<Float>, count n: Int, workspace ws: GradientWorkspace, features: UnsafeMutablePointer<Float>) {
        precondition(n >= 1 && n <= ws.capacity, "micro-batch of \(n) images in a workspace for \(ws.capacity)")
        let c = model.config, d = c.dim, t = tokens
        let scratch = ws.forward
        embed(images: images, count: n, workspace: scratch, into: scratch.x.pointer)
        for (index, block) in model.blocks.enumerated() {
            let buffers = ws.buffers(block: index, normalized: scratch.h.pointer)
            for stage in BlockStage.allCases { run(stage, index, block, x: scratch.x.pointer, count: n, buffers) }
        }
        for i in 0..<n {
            (ws.finalInput.pointer + i * d).update(from: scratch.x.pointer + i * t * d, count: d)
            Kernels.layerNorm(scratch.x.pointer + i * t * d, features + i * d, rows: 1, width: d, gamma: model.finalNormWeight.pointer,
                beta: model.finalNormBias.pointer, eps: c.eps, statistics: ws.finalStatistics.pointer + 2 * i)
        }
    }

    /// The gradient of a loss with respect to the input pixels of the `n` images of the last ``recordForward``: given
    /// dL/d(features) [n × D] and the hooks' gradients inside the network, writes dL/d(images) [n × C × size × size]
    /// (normalised pixel space) to `gradient`. Only input gradients are formed (no weight gradients): every Linear's
    /// backward is one GEMM with its weight; the blocks run in the reverse of ``BlockStage``'s order.
    public func inputGradient(
        count n: Int, workspace ws: GradientWorkspace, featureGradient: UnsafePointer<Float>, hooks: BackwardHooks = BackwardHooks(),
        into gradient: UnsafeMutablePointer<Float>
    ) {
        precondition(n >= 1 && n <= ws.capacity)
        let c = model.config, d = c.dim, t = tokens, m = c.mlpDim, rows = n * t
        let dx = ws.dx.pointer, dh = ws.dh.pointer
        dx.update(repeating: 0, count: rows * d)
        // Final norm: only the CLS rows reach the features.
        for i in 0..<n {
            Kernels.layerNormBackward(featureGradient + i * d, input: ws.finalInput.pointer + i * d, statistics: ws.finalStatistics.pointer + 2 * i,
                gamma: model.finalNormWeight.pointer, rows: 1, width: d, accumulatingInto: dx + i * t * d)
        }
        for index in model.blocks.indices.reversed() {
            let block = model.blocks[index]
            let b = ws.buffers(block: index, normalized: ws.forward.h.pointer)
            for stage in BlockStage.allCases.reversed() {
                switch stage {
                case .mlpOutput:  // x += fc2(hidden): d hidden = dx · W_fc2
                    BLAS.gemm(dx, lda: d, block.fc2Weight.pointer, ldb: m, ws.dhidden.pointer, ldc: m, m: rows, n: m, k: d, beta: 0)
                case .mlpHidden:  // hidden = GELU(fc1(h)): dh = (d hidden ⊙ GELU′) · W_fc1
                    Kernels.geluBackward(ws.dhidden.pointer, preActivation: b.preActivation!, count: rows * m)
                    BLAS.gemm(ws.dhidden.pointer, lda: m, block.fc1Weight.pointer, ldb: d, dh, ldc: d, m: rows, n: d, k: m, beta: 0)
                case .norm2:
                    Kernels.layerNormBackward(dh, input: b.norm2Input!, statistics: b.norm2Statistics!, gamma: block.norm2Weight.pointer,
                        rows: rows, width: d, accumulatingInto: dx)
                case .projection:  // x += proj(O): dO = dx · W_proj, into dh
                    BLAS.gemm(dx, lda: d, block.projectionWeight.pointer, ldb: d, dh, ldc: d, m: rows, n: d, k: d, beta: 0)
                    if hooks.attentionOutputBlocks.contains(index), let hook = hooks.attentionOutput {
                        hook(index, UnsafePointer(b.attention), dh)
                    }
                case .attention:
                    attentionBackward(index, block, count: n, b, outputGradient: dh, ws: ws, hooks: hooks)
                    // dh = dqkv · W_qkv
                    BLAS.gemm(ws.dqkv.pointer, lda: 3 * d, block.qkvWeight.pointer, ldb: d, dh, ldc: d, m: rows, n: d, k: 3 * d, beta: 0)
                case .norm1:
                    Kernels.layerNormBackward(dh, input: b.norm1Input!, statistics: b.norm1Statistics!, gamma: block.norm1Weight.pointer,
                        rows: rows, width: d, accumulatingInto: dx)
                }
            }
        }
        embedBackward(count: n, tokenGradient: dx, ws: ws, into: gradient)
    }

    /// dO [rows × D] (heads concatenated) → d(q|k|v) [rows × 3D] in `ws.dqkv`, per sample and head:
    /// dP = dO·Vᵀ, dV = Pᵀ·dO, hooks add to dP, dS = softmax′(dP), dQ = s·dS·K, dK = s·dSᵀ·Q.
    func attentionBackward(
        _ index: Int, _ block: ViTBlock, count n: Int, _ b: StageBuffers, outputGradient dO: UnsafeMutablePointer<Float>,
        ws: GradientWorkspace, hooks: BackwardHooks
    ) {
        let c = model.config, d = c.dim, t = tokens, heads = c.heads, hd = c.headDim
        let scale = 1 / Float(hd).squareRoot()
        let dp = ws.dscores.pointer
        let attentionHook = hooks.attentionBlocks.contains(index) ? hooks.attention : nil
        for i in 0..<n {
            let qkv = b.qkv + i * t * 3 * d, dqkv = ws.dqkv.pointer + i * t * 3 * d, dout = dO + i * t * d
            for head in 0..<heads {
                let q = qkv + head * hd, key = qkv + d + head * hd, v = qkv + 2 * d + head * hd
                let dq = dqkv + head * hd, dk = dqkv + d + head * hd, dv = dqkv + 2 * d + head * hd
                let p = b.probabilities + (i * heads + head) * b.probabilityStride
                BLAS.gemmTransposedB(dout + head * hd, lda: d, v, ldb: 3 * d, dp, ldc: t, m: t, n: t, k: hd, beta: 0)
                BLAS.gemm(p, lda: t, transposeA: true, dout + head * hd, ldb: d, dv, ldc: 3 * d, m: t, n: hd, k: t, beta: 0)
                attentionHook?(i, index, head, UnsafePointer(p), dp)
                Kernels.softmaxBackward(dp, probabilities: p, rows: t, width: t, stride: t)
                BLAS.gemm(dp, lda: t, key, ldb: 3 * d, dq, ldc: 3 * d, m: t, n: hd, k: t, alpha: scale, beta: 0)
                BLAS.gemm(dp, lda: t, transposeA: true, q, ldb: 3 * d, dk, ldc: 3 * d, m: t, n: hd, k: t, alpha: scale, beta: 0)
            }
        }
    }

    /// The embedding's backward: the class token and position table are constants, so only the patch rows'
    /// gradient flows, through the patch projection (dXp = dE · W_pe) and the inverse of `patchify`.
    func embedBackward(count n: Int, tokenGradient dx: UnsafePointer<Float>, ws: GradientWorkspace, into gradient: UnsafeMutablePointer<Float>) {
        let c = model.config, d = c.dim, t = tokens, g2 = grid * grid, p = c.patchSize, k = c.channels * p * p, s = imageSize
        let dpatches = ws.dpatches.pointer
        for i in 0..<n {
            BLAS.gemm(dx + (i * t + 1) * d, lda: d, model.patchWeight.pointer, ldb: k, dpatches + i * g2 * k, ldc: k, m: g2, n: k, k: d, beta: 0)
        }
        for i in 0..<n {
            let image = gradient + i * c.channels * s * s
            for gy in 0..<grid {
                for gx in 0..<grid {
                    let row = dpatches + ((i * grid + gy) * grid + gx) * k
                    for ch in 0..<c.channels {
                        for ky in 0..<p {
                            (image + (ch * s + gy * p + ky) * s + gx * p).update(from: row + (ch * p + ky) * p, count: p)
                        }
                    }
                }
            }
        }
    }
}

extension LinearHead {
    /// logits [n × classes] = features [n × D] · Wᵀ + b.
    public func logits(features: UnsafePointer<Float>, count n: Int, into out: UnsafeMutablePointer<Float>) {
        Kernels.fillRows(out, rows: n, width: classes, stride: classes, with: bias.pointer)
        BLAS.gemmTransposedB(features, lda: width, weight.pointer, ldb: width, out, ldc: classes, m: n, n: classes, k: width, beta: 1)
    }

    /// dL/d(features) [n × D] = dL/d(logits) [n × classes] · W.
    public func featureGradient(logitGradient: UnsafePointer<Float>, count n: Int, into out: UnsafeMutablePointer<Float>) {
        BLAS.gemm(logitGradient, lda: classes, weight.pointer, ldb: width, out, ldc: width, m: n, n: width, k: classes, beta: 0)
    }
}
