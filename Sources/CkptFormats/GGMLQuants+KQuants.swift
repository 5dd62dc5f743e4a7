import CkptCore

// The K-quants: 256-element super-blocks with per-sub-block scales. The quantizers follow ggml's reference
// (`quantize_row_q4_K_ref`, `quantize_row_q6_K_ref` with `make_qkx2_quants` / `make_qx_quants`) step by step, with
// float32 arithmetic in the same order and no fused multiply-add, so their search lands on the same codes. They
// are scalar: the searches are sequential by nature, and these types are not on a hot path.

extension GGMLQuants {
    /// ggml's `nearest_int`: round to nearest, ties to even, through the 1.5·2^23 constant. Meant for
    /// |x| ≤ 2^22 − 1; beyond that it returns what the bit arithmetic gives (as ggml's release builds do), never traps.
    @inline(__always)
    static func nearestInt(_ x: Float) -> Int32 {
        Int32(bitPattern: (x + 12_582_912).bitPattern & 0x007F_FFFF) &- 0x0040_0000
    }

    /// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below this is treated as all zero.
    static let groupMaxEpsilon: Float = 1e-15

    // MARK: Q4_K

    /// Fits `x ≈ scale·L − min` with L in 0…nmax (min ≤ 0 so that zero stays exact), first from the range, then
    /// by trying `nstep + 1` scales around it and keeping the one with the least weighted squared error, each with
    /// its least-squares scale and min (ggml's `make_qkx2_quants`, `use_mad` false). Returns the scale; `theMin`
    /// gets −min (≥ 0).
    static func makeQKX2Quants(
        _ n: Int, _ nmax: Int32, _ x: UnsafePointer<Float>, _ weights: UnsafePointer<Float>, _ L: UnsafeMutablePointer<UInt8>,
        _ theMin: inout Float, _ Laux: UnsafeMutablePointer<UInt8>, rmin: Float, rdelta: Float, nstep: Int
    ) -> Float {
        var min = x[0], max = x[0]
        var sumW = weights[0]
        var sumX = sumW * x[0]
        for i in 1..<n {
            if x[i] < min { min = x[i] }
            if x[i] > max { max = x[i] }
            let w = weights[i]
            sumW += w
            sumX += w * x[i]
        }
        if min > 0 { min = 0 }
        if max == min {
            for i in 0..<n { L[i] = 0 }
            theMin = -min
            return 0
        }
        var iscale = Float(nmax) / (max - min)
        var scale = 1 / iscale
        var bestError: Float = 0
        for i in 0..<n {
            let l = nearestInt(iscale * (x[i] - min))
            L[i] = UInt8(Swift.max(0, Swift.min(nmax, l)))
            var diff = scale * Float(L[i]) + min - x[i]
            diff = diff * diff
            bestError += weights[i] * diff
        }
        if nstep < 1 {
            theMin = -min
            return scale
        }
        for step in 0...nstep {
            iscale = (rmin + rdelta * Float(step) + Float(nmax)) / (max - min)
            var sumL: Float = 0, sumL2: Float = 0, sumXL: Float = 0
            for i in 0..<n {
                let l = Swift.max(0, Swift.min(nmax, nearestInt(iscale * (x[i] - min))))
                Laux[i] = UInt8(l)
                let w = weights[i], lf = Float(l)
                sumL += w * lf
                sumL2 += w * lf * lf
                sumXL += w * lf * x[i]
            }
            let D = sumW * sumL2 - sumL * sumL
            if D > 0 {
                var thisScale = (sumW * sumXL - sumX * sumL) / D
                var thisMin = (sumL2 * sumX - sumL * sumXL) / D
                if thisMin > 0 {
                    thisMin = 0
                    thisScale = sumXL / sumL2
                }
                var error: Float = 0
                for i in 0..<n {
                    var diff = thisScale * Float(Laux[i]) + thisMin - x[i]
                    diff = diff * diff
                    error += weights[i] * diff
                }
                if error < bestError {
                    for i in 0..<n { L[i] = Laux[i] }
                    bestError = error
                    scale = thisScale
                    min = thisMin
                }
            }
        }
        theMin = -min
        return scale
    }

    /// Q4_K: each sub-block of 32 gets a scale and a min from ``makeQKX2Quants`` (weights √(mean x²) + |x|); both
    /// are stored as 6-bit multiples of d = max scale / 63 and dmin = max min / 63, and the codes are recomputed
    /// against the F16-rounded d·sc and dmin·m.
    static func quantizeQ4_K(_ x: UnsafePointer<Float>, _ y: UnsafeMutableRawPointer, _ blocks: Int) {
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 256 + 32) { bytes in
            withUnsafeTemporaryAllocation(of: Float.self, capacity: 32 + 8 + 8) { floats in
                let L = bytes.baseAddress!, Laux = L + 256
                let weights = floats.baseAddress!, mins = weights + 32, scales = mins + 8
                for block in 0..<blocks {
                    quantizeQ4_KBlock(x + 256 * block, y + 144 * block, L, Laux, weights, mins, scales)
                }
            }
        }
    }

    private static func quantizeQ4_KBlock(
        _ x: UnsafePointer<Float>, _ out: UnsafeMutableRawPointer, _ L: UnsafeMutablePointer<UInt8>, _ Laux: UnsafeMutablePointer<UInt8>,
        _ weights: UnsafeMutablePointer<Float>, _ mins: UnsafeMutablePointer<Float>, _ scales: UnsafeMutablePointer<Float>
    ) {
        var maxScale: Float = 0, maxMin: Float = 0
        for j in 0..<8 {
            let sub = x + 32 * j
            var sumX2: Float = 0
            for l in 0..<32 { sumX2 += sub[l] * sub[l] }
            let average = (sumX2 / 32).squareRoot()
            for l in 0..<32 { weights[l] = average + abs(sub[l]) }
            scales[j] = makeQKX2Quants(32, 15, sub, weights, L + 32 * j, &mins[j], Laux, rmin: -1, rdelta: 0.1, nstep: 20)
            if scales[j] > maxScale { maxScale = scales[j] }
            if mins[j] > maxMin { maxMin = mins[j] }
        }
        let inverseScale: Float = maxScale > 0 ? 63 / maxScale : 0
        let inverseMin: Float = maxMin > 0 ? 63 / maxMin : 0
        let packed = out + 4
        for j in 0..<12 { packed.storeBytes(of: 0, toByteOffset: j, as: UInt8.self) }
        for j in 0..<8 {
            // ggml stores nearest_int into a uint8_t before clamping: a negative value wraps, then clamps to 63.
            let ls = Swift.min(63, UInt8(truncatingIfNeeded: nearestInt(inverseScale * scales[j])))
            let lm = Swift.min(63, UInt8(truncatingIfNeeded: nearestInt(inverseMin * mins[j])))
            let b = { (i: Int) in packed.load(fromByteOffset: i, as: UInt8.self) }
            if j < 4 {
                packed.storeBytes(of: ls, toByteOffset: j, as: UInt8.self)
                packed.storeBytes(of: lm, toByteOffset: j + 4, as: UInt8.self)
            } else {
                packed.storeBytes(of: (ls & 0xF) | ((lm & 0xF) << 4), toByteOffset: j + 4, as: UInt8.self)
                packed.storeBytes(of: b(j - 4) | ((ls >> 4) << 6), toByteOffset: j - 4, as: UInt8.self)
                packed.storeBytes(of: b(j) | ((lm >> 4) << 6), toByteOffset: j, as: UInt8.self)
            }
        }
        storeF16(maxScale / 63, out, 0)
        storeF16(maxMin / 63, out, 2)
        let d16 = loadF16(out, 0), dmin16 = loadF16(out, 2)
        for j in 0..<8 {
            let (sc, m) = scaleMinK4(j, packed)
            let d = d16 * Float(sc)
            if d == 0 { continue }
            let dm = dmin16 * Float(m)
            for i in 0..<32 {
                L[32 * j + i] = UInt8(Swift.max(0, Swift.min(15, nearestInt((x[32 * j + i] + dm) / d))))
            }
        }
        let qs = out + 16
        for chunk in 0..<4 {
            for l in 0..<32 {
                qs.storeBytes(of: L[64 * chunk + l] | (L[64 * chunk + l + 32] << 4), toByteOffset: 32 * chunk + l, as: UInt8.self)
            }
        }
    }

    // MARK: Q6_K

    /// Symmetric codes L in 0…2·nmax−1 (value L − nmax) for one group: starting from −nmax / (the signed value of
    /// largest magnitude), tries 18 nearby scales and keeps the one maximising (Σ w·x·l)² / Σ w·l² with w = x²,
    /// returning that least-squares scale (ggml's `make_qx_quants`, `rmse_type` 1, no importance weights).
    static func makeQXQuants(_ n: Int, _ nmax: Int32, _ x: UnsafePointer<Float>, _ L: UnsafeMutablePointer<Int8>) -> Float {
        var max: Float = 0, amax: Float = 0
        for i in 0..<n {
            let ax = abs(x[i])
            if ax > amax { amax = ax; max = x[i] }
        }
        if amax < groupMaxEpsilon {
            for i in 0..<n { L[i] = 0 }
            return 0
        }
        var iscale = Float(-nmax) / max
        var sumLX: Float = 0, sumL2: Float = 0
        for i in 0..<n {
            let l = Swift.max(-nmax, Swift.min(nmax - 1, nearestInt(iscale * x[i])))
            L[i] = Int8(l + nmax)
            let w = x[i] * x[i], lf = Float(l)
            sumLX += w * x[i] * lf
            sumL2 += w * lf * lf
        }
        var scale: Float = sumL2 != 0 ? sumLX / sumL2 : 0
        var best = scale * sumLX
        for step in -9...9 where step != 0 {
            iscale = -(Float(nmax) + 0.1 * Float(step)) / max
            sumLX = 0
            sumL2 = 0
            for i in 0..<n {
                let l = Swift.max(-nmax, Swift.min(nmax - 1, nearestInt(iscale * x[i])))
                let w = x[i] * x[i], lf = Float(l)
                sumLX += w * x[i] * lf
                sumL2 += w * lf * lf
            }
            if sumL2 > 0 && sumLX * sumLX > best * sumL2 {
                for i in 0..<n {
                    L[i] = Int8(nmax + Swift.max(-nmax, Swift.min(nmax - 1, nearestInt(iscale * x[i]))))
                }
                scale = sumLX / sumL2
                best = scale * sumLX
            }
        }
        return scale
    }

    /// Q6_K: each sub-block of 16 gets a scale from ``makeQXQuants``; scales are stored as int8 multiples of
    /// d = (largest-magnitude scale) / −128, and the codes recomputed against the F16-rounded d·scale. A
    /// super-block whose scales are all below ``groupMaxEpsilon`` is stored as zeros.
    static func quantizeQ6_K(_ x: UnsafePointer<Float>, _ y: UnsafeMutableRawPointer, _ blocks: Int) {
        withUnsafeTemporaryAllocation(of: Int8.self, capacity: 256) { codes in
            withUnsafeTemporaryAllocation(of: Float.self, capacity: 16) { scales in
                for block in 0..<blocks {
                    quantizeQ6_KBlock(x + 256 * block, y + 210 * block, codes.baseAddress!, scales.baseAddress!)
                }
            }
        }
    }

    private static func quantizeQ6_KBlock(
        _ x: UnsafePointer<Float>, _ out: UnsafeMutableRawPointer, _ L: UnsafeMutablePointer<Int8>, _ scales: UnsafeMutablePointer<Float>
    ) {
        var maxScale: Float = 0, maxAbsScale: Float = 0
        for group in 0..<16 {
            let scale = makeQXQuants(16, 32, x + 16 * group, L + 16 * group)
            scales[group] = scale
            if abs(scale) > maxAbsScale {
                maxAbsScale = abs(scale)
                maxScale = scale
            }
        }
        if maxAbsScale < groupMaxEpsilon {
            out.initializeMemory(as: UInt8.self, repeating: 0, count: 210)
            return
        }
        let iscale = -128 / maxScale
        storeF16(1 / iscale, out, 208)
        let d16 = loadF16(out, 208)
        let stored = out + 192
        for group in 0..<16 {
            // MIN(127, nearest_int(…)) stored into an int8_t: values below −128 wrap, as in ggml.
            stored.storeBytes(of: Int8(truncatingIfNeeded: Swift.min(127, nearestInt(iscale * scales[group]))), toByteOffset: group, as: Int8.self)
        }
        for group in 0..<16 {
            let d = d16 * Float(stored.load(fromByteOffset: group, as: Int8.self))
            if d == 0 { continue }
            for i in 0..<16 {
                L[16 * group + i] = Int8(Swift.max(-32, Swift.min(31, nearestInt(x[16 * group + i] / d))) + 32)
            }
        }
        for half in 0..<2 {
            let ql = out + 64 * half, qh = out + 128 + 32 * half
            let codes = UnsafeRawPointer(L + 128 * half).assumingMemoryBound(to: UInt8.self)
            for l in 0..<32 {
                let q1 = codes[l], q2 = codes[l + 32], q3 = codes[l + 64], q4 = codes[l + 96]
                ql.storeBytes(of: (q1 & 0xF) | ((q3 & 0xF) << 4), toByteOffset: l, as: UInt8.self)
                ql.storeBytes(of: (q2 & 0xF) | ((q4 & 0xF) << 4), toByteOffset: l + 32, as: UInt8.self)
                qh.storeBytes(of: (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6), toByteOffset: l, as: UInt8.self)
            }
        }
    }
}

// MARK: - Dequantizers

extension GGMLQuants {
    /// Q4_K `{ f16 d, dmin; u8 scales[12]; u8 qs[128] }`: 8 sub-blocks of 32, each with a 6-bit scale and min.
    static func dequantizeQ4_K(_ x: UnsafeRawPointer, _ y: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for block in 0..<blocks {
            let p = x + 144 * block, out = y + 256 * block
            let d = loadF16(p, 0), dmin = loadF16(p, 2)
            let scales = p + 4, qs = p + 16
            for chunk in 0..<4 {  // 64 elements: low nibbles are sub-block 2·chunk, high nibbles 2·chunk+1
                let (sc0, m0) = scaleMinK4(2 * chunk, scales)
                let (sc1, m1) = scaleMinK4(2 * chunk + 1, scales)
                let d0 = d * Float(sc0), min0 = dmin * Float(m0)
                let d1 = d * Float(sc1), min1 = dmin * Float(m1)
                let codes = qs + 32 * chunk
                for half in 0..<2 {
                    let packed = widen(codes + 16 * half)
                    let base = UnsafeMutableRawPointer(out + 64 * chunk + 16 * half)
                    base.storeBytes(of: d0 * toFloat(packed & 0xF) - min0, toByteOffset: 0, as: Vector.self)
                    base.storeBytes(of: d1 * toFloat(packed &>> 4) - min1, toByteOffset: 128, as: Vector.self)
                }
            }
        }
    }

    /// The 6-bit scale and min of sub-block `j` (ggml's `get_scale_min_k4`).
    @inline(__always)
    static func scaleMinK4(_ j: Int, _ q: UnsafeRawPointer) -> (UInt8, UInt8) {
        let b = { (i: Int) in q.load(fromByteOffset: i, as: UInt8.self) }
        if j < 4 { return (b(j) & 63, b(j + 4) & 63) }
        return ((b(j + 4) & 0xF) | ((b(j - 4) >> 6) << 4), (b(j + 4) >> 4) | ((b(j) >> 6) << 4))
    }

    /// Q6_K `{ u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d }`: 16 sub-blocks of 16, codes q − 32 in −32…31.
    static func dequantizeQ6_K(_ x: UnsafeRawPointer, _ y: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for block in 0..<blocks {
            let p = x + 210 * block
            let d = loadF16(p, 208)
            for half in 0..<2 {  // 128 elements from ql[64·half…], qh[32·half…], scales[8·half…]
                let ql = p + 64 * half, qh = p + 128 + 32 * half, sc = p + 192 + 8 * half
                let out = y + 256 * block + 128 * half
                for l in 0..<32 {
                    let low0 = ql.load(fromByteOffset: l, as: UInt8.self), low1 = ql.load(fromByteOffset: l + 32, as: UInt8.self)
                    let high = qh.load(fromByteOffset: l, as: UInt8.self)
                    let q1 = Int((low0 & 0xF) | ((high & 3) << 4)) - 32
                    let q2 = Int((low1 & 0xF) | (((high >> 2) & 3) << 4)) - 32
                    let q3 = Int((low0 >> 4) | (((high >> 4) & 3) << 4)) - 32
                    let q4 = Int((low1 >> 4) | (((high >> 6) & 3) << 4)) - 32
                    let s = l / 16
                    let scale = { (i: Int) in d * Float(sc.load(fromByteOffset: i, as: Int8.self)) }
                    out[l] = scale(s) * Float(q1)
                    out[l + 32] = scale(s + 2) * Float(q2)
                    out[l + 64] = scale(s + 4) * Float(q3)
                    out[l + 96] = scale(s + 6) * Float(q4)
                }
            }
        }
    }
}
