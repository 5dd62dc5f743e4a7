/// Position-embedding resizing: the one rule ckpt uses when the input grid differs from the stored grid.
///
/// The rule is PyTorch's `F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=False)`
/// on the patch part (the class-token entry is kept as is), which is what Hugging Face transformers' ViT and
/// DINOv2 `interpolate_pos_encoding` do. Cubic convolution with A = −0.75; source coordinate
/// (dst + 0.5)·(in/out) − 0.5, not clamped; the four taps clamped to the border. timm's `resample_abs_pos_embed`
/// differs when shrinking (it antialiases by default).
enum PositionEmbedding {
    /// The cubic-convolution weights of the four taps at fractional offset t.
    static func cubicWeights(_ t: Float) -> (Float, Float, Float, Float) {
        let a: Float = -0.75
        func near(_ x: Float) -> Float { ((a + 2) * x - (a + 3)) * x * x + 1 }  // |x| ≤ 1
        func far(_ x: Float) -> Float { ((a * x - 5 * a) * x + 8 * a) * x - 4 * a }  // 1 < |x| < 2
        return (far(t + 1), near(t), near(1 - t), far(2 - t))
    }

    /// Per output index: the four source indices (clamped) and their weights.
    static func taps(input: Int, output: Int) -> [(indices: (Int, Int, Int, Int), weights: (Float, Float, Float, Float))] {
        let scale = Float(input) / Float(output)
        return (0..<output).map { dst in
            let real = scale * (Float(dst) + 0.5) - 0.5
            let floorValue = real.rounded(.down)
            let t = min(max(real - floorValue, 0), 1)
            let base = Int(floorValue)
            func clamp(_ i: Int) -> Int { min(max(i, 0), input - 1) }
            return ((clamp(base - 1), clamp(base), clamp(base + 1), clamp(base + 2)), cubicWeights(t))
        }
    }

    /// Resizes a [gridH·gridW × D] table (row-major grid) to [outH·outW × D]; rows are interpolated first, then
    /// columns, as PyTorch's separable kernel does.
    static func resize(_ table: UnsafePointer<Float>, gridHeight: Int, gridWidth: Int, dim: Int, toHeight outH: Int, toWidth outW: Int) -> [Float] {
        if gridHeight == outH && gridWidth == outW { return Array(UnsafeBufferPointer(start: table, count: outH * outW * dim)) }
        let rowTaps = taps(input: gridHeight, output: outH)
        let columnTaps = taps(input: gridWidth, output: outW)
        var out = [Float](repeating: 0, count: outH * outW * dim)
        for oy in 0..<outH {
            let (yi, yw) = rowTaps[oy]
            for ox in 0..<outW {
                let (xi, xw) = columnTaps[ox]
                let base = (oy * outW + ox) * dim
                for c in 0..<dim {
                    func at(_ y: Int, _ x: Int) -> Float { table[(y * gridWidth + x) * dim + c] }
                    func row(_ y: Int) -> Float { at(y, xi.0) * xw.0 + at(y, xi.1) * xw.1 + at(y, xi.2) * xw.2 + at(y, xi.3) * xw.3 }
                    out[base + c] = row(yi.0) * yw.0 + row(yi.1) * yw.1 + row(yi.2) * yw.2 + row(yi.3) * yw.3
                }
            }
        }
        return out
    }
}
