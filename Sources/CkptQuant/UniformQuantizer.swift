import CkptCore

/// RepQ-ViT's asymmetric uniform quantizer (its `UniformQuantizer`), for activations and weights:
///
///     x_int = clamp(round(x/Δ) + zp, 0, 2^b − 1)        x̂ = (x_int − zp)·Δ
///
/// with `Δ = (max' − min')/(2^b − 1)` and `zp = round(−min'/Δ)` from a clipping range `[min', max']`, rounding half
/// to even (`torch.round`), every step in float32 in the reference's order (a true division by Δ, not a
/// multiplication by 1/Δ), so the values match torch's CPU kernels bit for bit.
///
/// One `(Δ, zp)` pair per tensor, or one per channel: per column of a `[rows × channels]` activation matrix
/// (RepQ-ViT's channel-wise start on post-LayerNorm activations, its last dimension), or per row of an
/// `[out × in]` weight matrix (its `channel_wise` weights). The zero point is integral when it comes from a range;
/// RepQ-ViT's own LayerNorm fold can leave a fractional one (``LayerNormReparameterization``), which fake
/// quantization accepts and ``encode(_:into:)`` refuses.
public struct UniformQuantizer: Sendable, Equatable {
    /// Which elements share a `(Δ, zp)` pair.
    public enum Granularity: String, Sendable, Equatable {
        /// One pair for the whole tensor.
        case perTensor = "tensor"
        /// One pair per row of a row-major `[rows × columns]` matrix (weights: per output channel).
        case perRow = "row"
        /// One pair per column of a row-major `[rows × columns]` matrix (activations: per channel, last dimension).
        case perColumn = "column"
    }

    public static let supportedBits = 2...8

    public let bits: Int
    public let granularity: Granularity
    /// Δ: one per tensor, else one per channel (row or column).
    public let scales: [Float]
    /// zp, in code units: one per tensor, else one per channel.
    public let zeroPoints: [Float]

    /// The largest code, 2^b − 1.
    public var maxCode: Float { Float((1 << bits) - 1) }
    /// Channels (1 per tensor).
    public var channels: Int { scales.count }

    /// A per-tensor quantizer.
    public init(bits: Int, scale: Float, zeroPoint: Float) throws(CkptError) {
        try self.init(bits: bits, granularity: .perTensor, scales: [scale], zeroPoints: [zeroPoint])
    }

    /// A quantizer from its parameters; refuses bits outside 2…8, a Δ that is not positive and finite, a zero
    /// point that is not finite, or per-tensor parameters that are not exactly one pair.
    public init(bits: Int, granularity: Granularity, scales: [Float], zeroPoints: [Float]) throws(CkptError) {
        guard Self.supportedBits.contains(bits) else {
            throw CkptError(.invalidArgument, "uniform quantizer: \(bits) bits is not in 2…8")
        }
        guard !scales.isEmpty, scales.count == zeroPoints.count else {
            throw CkptError(.invalidArgument, "uniform quantizer: \(scales.count) scales and \(zeroPoints.count) zero points")
        }
        guard granularity != .perTensor || scales.count == 1 else {
            throw CkptError(.invalidArgument, "uniform quantizer: a per-tensor quantizer has one scale, not \(scales.count)")
        }
        for (c, s) in scales.enumerated() where !(s.isFinite && s > 0) {
            throw CkptError(.invalidArgument, "uniform quantizer: scale \(c) is \(s); scales are positive and finite")
        }
        for (c, z) in zeroPoints.enumerated() where !z.isFinite {
            throw CkptError(.invalidArgument, "uniform quantizer: zero point \(c) is \(z)")
        }
        self.bits = bits
        self.granularity = granularity
        self.scales = scales
        self.zeroPoints = zeroPoints
    }

    // MARK: parameters from a range

    /// `(Δ, zp)` for the clipping range `[lo, hi]` in float32 as the reference computes them:
    /// `Δ = (hi − lo)/(2^b − 1)`, `zp = round(−lo/Δ)`.
    ///
    /// **Degenerate ranges (our choice).** Where that gives no usable grid — `hi = lo` (a constant tensor or
    /// channel), or a Δ that is zero, subnormal or infinite, or a zero point that overflows — the reference
    /// computes NaN or ±Inf and, when every candidate is degenerate, fails. Here the range is widened to include 0
    /// instead: `Δ = max(|lo|, |hi|)/(2^b − 1)` and `zp = round(−min(lo, 0)/Δ)`, so a constant `v` lands on the
    /// end code (`v ≈ (2^b − 1)·Δ` or `−(2^b − 1)·Δ`) and is restored to within a float32 rounding; an all-zero (or
    /// below 2^−118) range gets `Δ = 1, zp = 0`, which restores 0 exactly. Never NaN.
    public static func parameters(bits: Int, lo: Float, hi: Float) -> (scale: Float, zeroPoint: Float) {
        let levels = Float((1 << bits) - 1)
        let scale = (hi - lo) / levels
        let zero = (-lo / scale).rounded(.toNearestOrEven)
        if scale.isNormal && scale > 0 && zero.isFinite { return (scale, zero) }
        let wide = max(abs(lo), abs(hi)) / levels
        guard wide.isNormal else { return (1, 0) }
        return (wide, (-min(lo, 0) / wide).rounded(.toNearestOrEven))
    }

    // MARK: calibration

    /// RepQ-ViT's percentile search over all of `x` (one per-tensor quantizer): for each percentile p of
    /// ``PercentileSearch/percentiles``, `max' = quantile(x, p)`, `min' = quantile(x, 1 − p)`
    /// (``Quantile/Rule/repQViT(count:)``), keeping the p with the least `mean((x − x̂)²)`.
    ///
    /// Works on one scratch copy of `x` (4 bytes per value, checked against the memory budget): the quantiles by
    /// selection, then the three squared-error passes over the same copy. Every value is used; no subsampling.
    /// Throws `nonFinite` for NaN/±Inf and `invalidArgument` for no values or unsupported bits.
    public static func calibrate(
        _ x: UnsafeBufferPointer<Float>, bits: Int, percentiles: [Double] = PercentileSearch.percentiles
    ) throws(CkptError) -> (quantizer: UniformQuantizer, choice: PercentileSearch.Choice) {
        let (quantizer, choices) = try calibrate(x, rows: 1, columns: x.count, bits: bits, granularity: .perTensor, percentiles: percentiles)
        return (quantizer, choices[0])
    }

    /// The percentile search per tensor, per row or per column of the row-major `[rows × columns]` matrix `x`;
    /// returns the quantizer and each channel's choice. Channels are searched in parallel, each on a scratch copy
    /// of its values.
    /// `percentiles` replaces RepQ-ViT's candidates (each in (0.5, 1]; 1 is the min–max range).
    public static func calibrate(
        _ x: UnsafeBufferPointer<Float>, rows: Int, columns: Int, bits: Int, granularity: Granularity,
        percentiles: [Double] = PercentileSearch.percentiles
    ) throws(CkptError) -> (quantizer: UniformQuantizer, choices: [PercentileSearch.Choice]) {
        guard supportedBits.contains(bits) else { throw CkptError(.invalidArgument, "uniform quantizer: \(bits) bits is not in 2…8") }
        try PercentileSearch.check(percentiles)
        guard rows > 0, columns > 0, try CheckedSize.product([rows, columns], "calibration matrix") == x.count else {
            throw CkptError(.shapeMismatch, "calibration data: \(x.count) values is not \(rows) × \(columns)")
        }
        try PercentileSearch.checkFinite(x, "uniform quantizer calibration")
        let channels = granularity == .perTensor ? 1 : (granularity == .perRow ? rows : columns)
        let length = x.count / channels
        var scales = [Float](repeating: 0, count: channels)
        var zeros = [Float](repeating: 0, count: channels)
        var choices = [PercentileSearch.Choice](repeating: .init(percentile: 0, meanSquaredError: 0), count: channels)
        let bytes = try PercentileSearch.scratchBytes(length)
        if channels == 1 {
            let raw = try LargeAllocation.allocate(bytes)
            defer { LargeAllocation.deallocate(raw, count: bytes) }
            let scratch = raw.bindMemory(to: Float.self, capacity: length)
            scratch.initialize(from: x.baseAddress!, count: length)
            let found = search(UnsafeMutableBufferPointer(start: scratch, count: length), bits: bits, percentiles: percentiles)
            return (try UniformQuantizer(bits: bits, granularity: granularity, scales: [found.scale], zeroPoints: [found.zeroPoint]), [found.choice])
        }
        try MemoryBudget.require(bytes * Parallel.coreCount, for: "calibration scratch of \(Parallel.coreCount) workers")
        nonisolated(unsafe) let source = x.baseAddress!
        scales.withUnsafeMutableBufferPointer { s in
            zeros.withUnsafeMutableBufferPointer { z in
                choices.withUnsafeMutableBufferPointer { ch in
                    nonisolated(unsafe) let out = (s.baseAddress!, z.baseAddress!, ch.baseAddress!)
                    Parallel.forEachChunk(count: channels, minimumChunk: max(1, (1 << 16) / length)) { range in
                        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: length)
                        defer { scratch.deallocate() }
                        for c in range {
                            if granularity == .perRow {
                                scratch.initialize(from: source + c * columns, count: length)
                            } else {
                                for r in 0..<rows { scratch[r] = source[r * columns + c] }
                            }
                            let found = search(UnsafeMutableBufferPointer(start: scratch, count: length), bits: bits, percentiles: percentiles)
                            out.0[c] = found.scale
                            out.1[c] = found.zeroPoint
                            out.2[c] = found.choice
                        }
                    }
                }
            }
        }
        return (try UniformQuantizer(bits: bits, granularity: granularity, scales: scales, zeroPoints: zeros), choices)
    }

    /// The search on finite values the caller lets it permute.
    static func search(
        _ values: UnsafeMutableBufferPointer<Float>, bits: Int, percentiles: [Double] = PercentileSearch.percentiles
    ) -> (scale: Float, zeroPoint: Float, choice: PercentileSearch.Choice) {
        let bounds = Quantile.linear(inPlace: values, percentiles.flatMap { [$0, 1 - $0] })
        let top = Float((1 << bits) - 1)
        var best: (scale: Float, zeroPoint: Float, choice: PercentileSearch.Choice)?
        for (k, percentile) in percentiles.enumerated() {
            let (scale, zero) = parameters(bits: bits, lo: bounds[2 * k + 1], hi: bounds[2 * k])
            let vScale = SIMD8<Float>(repeating: scale), vZero = SIMD8<Float>(repeating: zero), vTop = SIMD8<Float>(repeating: top)
            let squares = PercentileSearch.sum(values.baseAddress!, values.count, { x in
                let d = x - fakeQuantized8(x, scale: vScale, zero: vZero, top: vTop)
                return d * d
            }, { x in
                let d = x - fakeQuantized(x, scale: scale, zero: zero, top: top)
                return d * d
            })
            let mse = squares / Double(values.count)
            if best == nil || mse < best!.choice.meanSquaredError {
                best = (scale, zero, PercentileSearch.Choice(percentile: percentile, meanSquaredError: mse))
            }
        }
        return best!
    }

    // MARK: fake quantization

    /// Writes `x̂` for every value of `x` into `y` (same count; `y` may be `x` itself). Per-row quantizers read `x`
    /// as `[channels × (count/channels)]`, per-column ones as `[(count/channels) × channels]`. Eight lanes at a
    /// time with the scalar path's operations, rows split across cores. NaN stays NaN, as in torch.
    public func fakeQuantize(_ x: UnsafeBufferPointer<Float>, into y: UnsafeMutableBufferPointer<Float>) throws(CkptError) {
        try checkShape(x.count, y.count)
        guard let input = x.baseAddress, let output = y.baseAddress else { return }
        nonisolated(unsafe) let (source, target) = (input, output)
        let top = maxCode, count = x.count
        switch granularity {
        case .perTensor, .perRow:
            let length = count / channels
            let scales = self.scales, zeros = self.zeroPoints
            Parallel.forEachChunk(count: count, minimumChunk: 1 << 16, alignment: 8) { range in
                var j = range.lowerBound
                while j < range.upperBound {
                    let c = j / length
                    let end = min(range.upperBound, (c + 1) * length)
                    Self.fakeQuantizeRun(source + j, target + j, end - j, scale: scales[c], zero: zeros[c], top: top)
                    j = end
                }
            }
        case .perColumn:
            let columns = channels
            let rows = count / columns
            let scales = self.scales, zeros = self.zeroPoints
            Parallel.forEachChunk(count: rows, minimumChunk: max(1, (1 << 16) / columns)) { range in
                scales.withUnsafeBufferPointer { s in
                    zeros.withUnsafeBufferPointer { z in
                        let rawScales = UnsafeRawPointer(s.baseAddress!), rawZeros = UnsafeRawPointer(z.baseAddress!)
                        let vTop = SIMD8<Float>(repeating: top)
                        for r in range {
                            let rowIn = UnsafeRawPointer(source + r * columns), rowOut = UnsafeMutableRawPointer(target + r * columns)
                            var c = 0
                            while c + 8 <= columns {
                                let v = rowIn.loadUnaligned(fromByteOffset: c * 4, as: SIMD8<Float>.self)
                                let q = Self.fakeQuantized8(
                                    v, scale: rawScales.loadUnaligned(fromByteOffset: c * 4, as: SIMD8<Float>.self),
                                    zero: rawZeros.loadUnaligned(fromByteOffset: c * 4, as: SIMD8<Float>.self), top: vTop)
                                rowOut.storeBytes(of: q, toByteOffset: c * 4, as: SIMD8<Float>.self)
                                c += 8
                            }
                            while c < columns {
                                target[r * columns + c] = Self.fakeQuantized(source[r * columns + c], scale: s[c], zero: z[c], top: top)
                                c += 1
                            }
                        }
                    }
                }
            }
        }
    }

    /// ``fakeQuantize(_:into:)`` in place.
    public func fakeQuantize(_ x: UnsafeMutableBufferPointer<Float>) throws(CkptError) {
        try fakeQuantize(UnsafeBufferPointer(x), into: x)
    }

    /// `x̂` of one value of channel `channel`.
    @inline(__always) public func fakeQuantized(_ x: Float, channel: Int = 0) -> Float {
        Self.fakeQuantized(x, scale: scales[channel], zero: zeroPoints[channel], top: maxCode)
    }

    // MARK: integer codes

    /// The codes `clamp(round(x/Δ) + zp, 0, 2^b − 1)` of `x` (layout as ``fakeQuantize(_:into:)``); `x̂` is
    /// ``decode(_:into:)`` of them, bit for bit. Needs integral zero points (a fractional one has no code grid).
    public func encode(_ x: UnsafeBufferPointer<Float>, into codes: UnsafeMutableBufferPointer<UInt8>) throws(CkptError) {
        try checkShape(x.count, codes.count)
        for (c, z) in zeroPoints.enumerated() where z != z.rounded() {
            throw CkptError(.invalidArgument, "uniform quantizer: zero point \(c) is \(z), not an integer: no integer codes")
        }
        for i in 0..<x.count {
            let c = channel(of: i, count: x.count)
            var q = Self.roundHalfEven(x[i] / scales[c]) + zeroPoints[c]
            q = q < 0 ? 0 : (q > maxCode ? maxCode : q)
            guard !q.isNaN else { throw CkptError(.nonFinite, "uniform quantizer: value \(i) is NaN") }
            codes[i] = UInt8(q)
        }
    }

    /// `(q − zp)·Δ` for every code.
    public func decode(_ codes: UnsafeBufferPointer<UInt8>, into y: UnsafeMutableBufferPointer<Float>) throws(CkptError) {
        try checkShape(codes.count, y.count)
        for i in 0..<codes.count {
            let c = channel(of: i, count: codes.count)
            y[i] = (Float(codes[i]) - zeroPoints[c]) * scales[c]
        }
    }

    @inline(__always) private func channel(of index: Int, count: Int) -> Int {
        switch granularity {
        case .perTensor: 0
        case .perRow: index / (count / channels)
        case .perColumn: index % channels
        }
    }

    private func checkShape(_ count: Int, _ outputCount: Int) throws(CkptError) {
        guard count == outputCount else { throw CkptError(.shapeMismatch, "uniform quantizer: \(count) inputs, \(outputCount) outputs") }
        guard count % channels == 0 else {
            throw CkptError(.shapeMismatch, "uniform quantizer: \(count) values do not split into \(channels) channels")
        }
    }

    // MARK: kernels

    /// Round half to even for every float (`torch.round`, `nearbyint`). GroupQuantizer's `rint` add-and-subtract
    /// trick is exact only below 2^22 in magnitude; beyond that the value is rounded by the library (such values are
    /// clipped to an end code whenever Δ and zp are of ordinary size, but not for a narrow range far from 0).
    @inline(__always) static func roundHalfEven(_ t: Float) -> Float {
        abs(t) < 4_194_304 ? GroupQuantizer.rint(t) : t.rounded(.toNearestOrEven)
    }

    @inline(__always) static func roundHalfEven8(_ t: SIMD8<Float>) -> SIMD8<Float> {
        let magic = SIMD8<Float>(repeating: 12_582_912)
        var r = (t + magic) - magic
        let large = t .>= 4_194_304 .| t .<= -4_194_304
        if any(large) {
            for lane in 0..<8 where large[lane] { r[lane] = t[lane].rounded(.toNearestOrEven) }
        }
        return r
    }

    @inline(__always) static func fakeQuantized(_ x: Float, scale: Float, zero: Float, top: Float) -> Float {
        var q = roundHalfEven(x / scale) + zero
        q = q < 0 ? 0 : (q > top ? top : q)
        return (q - zero) * scale
    }

    @inline(__always) static func fakeQuantized8(_ x: SIMD8<Float>, scale: SIMD8<Float>, zero: SIMD8<Float>, top: SIMD8<Float>) -> SIMD8<Float> {
        var q = roundHalfEven8(x / scale) + zero
        q = q.replacing(with: 0, where: q .< 0)
        q = q.replacing(with: top, where: q .> top)
        return (q - zero) * scale
    }

    /// `n` values of one channel, eight lanes at a time.
    @inline(__always) static func fakeQuantizeRun(
        _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int, scale: Float, zero: Float, top: Float
    ) {
        let vScale = SIMD8<Float>(repeating: scale), vZero = SIMD8<Float>(repeating: zero), vTop = SIMD8<Float>(repeating: top)
        let input = UnsafeRawPointer(x), output = UnsafeMutableRawPointer(y)
        var j = 0
        while j + 8 <= n {
            let v = input.loadUnaligned(fromByteOffset: j * 4, as: SIMD8<Float>.self)
            output.storeBytes(of: fakeQuantized8(v, scale: vScale, zero: vZero, top: vTop), toByteOffset: j * 4, as: SIMD8<Float>.self)
            j += 8
        }
        while j < n {
            y[j] = fakeQuantized(x[j], scale: scale, zero: zero, top: top)
            j += 1
        }
    }
}
