import CkptCore

// Q4_0 and Q8_0 quantized and measured in one pass: the blocks are those of ``GGMLQuants/quantize(_:source:count:destination:)``
// (the same float operations in the same order, so bit-identical to ggml's reference quantizers), and the statistics
// are those of the values a reader dequantizes, x̂ = (code − 8)·d16 or code·d16 with d16 the stored F16 scale, without
// decoding the blocks again. These two types are the ones `ckpt quantize --format gguf` is timed on (bench/).
//
// Swift 6.3's code generation decides the speed here (single thread, Zen 4, -target-cpu haswell: 0.27 ns a value
// for Q4_0 and 0.26 for Q8_0, against 1.35 for quantize + dequantize + compare):
// - One large loop body per group of blocks is partly scalarised (per-lane mask rebuilding, spills); three small
//   loops per 32 blocks (scan, scales, codes) vectorise cleanly, and the second and third re-read the input from L1.
// - `@_transparent` helpers, because `@inline(__always)` ones were emitted as calls inside the kernels; the same for
//   the stdlib's generic `SIMD16<UInt8>(truncatingIfNeeded:)` (hence `lowBytes`).
// - `addingProduct` (FMA) rather than `a + b * c`, which came out 5× slower; the codes round with `rounded(.down)` /
//   `rounded(.towardZero)` (one vroundps). On baseline x86-64 builds (no FMA/SSE4.1/F16C) these and the `Float16`
//   conversions are library calls per lane: correct, but ~13 ns a value (`scripts/build.sh` builds for the host).
// - Horizontal reductions at full width (128-, 64-, 32-bit swaps), since SIMD4 halves split the whole max tree.
// - The codes' roundings are other formulas than the reference quantizers' (GGMLQuants.swift), equal to them for
//   every Float input (checked exhaustively over all 2^32 bit patterns while writing them); the tests compare the
//   blocks with GGMLQuants.quantize's.

fileprivate typealias Lanes8 = SIMD8<Float>
fileprivate typealias Bits8 = SIMD8<UInt32>
fileprivate typealias Doubles4 = SIMD4<Double>

@_transparent fileprivate func load8(_ p: UnsafePointer<Float>) -> Lanes8 { UnsafeRawPointer(p).loadUnaligned(as: Lanes8.self) }
@_transparent fileprivate func bits8(_ v: Lanes8) -> Bits8 { unsafeBitCast(v, to: Bits8.self) }
@_transparent fileprivate func floats8(_ v: Bits8) -> Lanes8 { unsafeBitCast(v, to: Lanes8.self) }
@_transparent fileprivate func absolute8(_ v: Lanes8) -> Lanes8 { floats8(bits8(v) & 0x7FFF_FFFF) }
// select-based max/min: one maxps/minps; a NaN in b never replaces a.
@_transparent fileprivate func maximum8(_ a: Lanes8, _ b: Lanes8) -> Lanes8 { a.replacing(with: b, where: b .> a) }
@_transparent fileprivate func minimum8(_ a: Lanes8, _ b: Lanes8) -> Lanes8 { a.replacing(with: b, where: b .< a) }
@_transparent fileprivate var magic8: Float { 12_582_912 }  // 1.5·2^23

/// F32 → F16 (round to nearest even) and back, 8 lanes. With F16C (-target-cpu haswell) two instructions;
/// on baseline x86-64 a library call per lane (correct, slower).
@_transparent fileprivate func halfRoundTrip8(_ d: Lanes8) -> (bits: SIMD8<UInt16>, value: Lanes8) {
    let h = SIMD8<Float16>(d)
    return (unsafeBitCast(h, to: SIMD8<UInt16>.self), Lanes8(h))
}

// MARK: - Per-block codes

/// Q4_0 code q = min(floor(x·id + 8.5), 15) as a Float (= the repo's floorBits(minimum(x·id + 8.5, 15.5)): x·id then
/// + 8.5, two roundings; vroundps floors like the magic-constant formula, NaN and −Inf included), and the error
/// x − (q−8)·d16 (`negD` = −d16; the product is exact, so the fused multiply-add equals x − x̂).
@_transparent fileprivate func q4_0Code(_ xv: Lanes8, _ id: Lanes8, _ negD: Lanes8) -> (Lanes8, Lanes8) {
    let q = minimum8((xv * id + 8.5).rounded(.down), Lanes8(repeating: 15))
    return (q, xv.addingProduct(q - 8, negD))
}

/// Q8_0: roundf(x·id) (half away from zero) = trunc(v + copysign(0.5 − 2⁻²⁵, v)), exact for |v| < 2²² (|v| ≤ 127
/// here; checked against the magic-constant formula over all Floats), and the error x − q·d16.
@_transparent fileprivate func q8_0Code(_ xv: Lanes8, _ id: Lanes8, _ negD: Lanes8) -> (Lanes8, Lanes8) {
    let v = xv * id
    let q = (v + floats8((bits8(v) & 0x8000_0000) | 0x3EFF_FFFF)).rounded(.towardZero)
    return (q, xv.addingProduct(q, negD))
}

/// The low byte of each lane. Written out lane by lane (LLVM turns it into one shuffle): the stdlib's generic
/// `SIMD16<UInt8>(truncatingIfNeeded:)` stayed an out-of-line call per block inside the kernels.
@_transparent fileprivate func lowBytes(_ v: SIMD16<UInt32>) -> SIMD16<UInt8> {
    SIMD16<UInt8>(
        UInt8(truncatingIfNeeded: v[0]), UInt8(truncatingIfNeeded: v[1]), UInt8(truncatingIfNeeded: v[2]), UInt8(truncatingIfNeeded: v[3]),
        UInt8(truncatingIfNeeded: v[4]), UInt8(truncatingIfNeeded: v[5]), UInt8(truncatingIfNeeded: v[6]), UInt8(truncatingIfNeeded: v[7]),
        UInt8(truncatingIfNeeded: v[8]), UInt8(truncatingIfNeeded: v[9]), UInt8(truncatingIfNeeded: v[10]), UInt8(truncatingIfNeeded: v[11]),
        UInt8(truncatingIfNeeded: v[12]), UInt8(truncatingIfNeeded: v[13]), UInt8(truncatingIfNeeded: v[14]), UInt8(truncatingIfNeeded: v[15]))
}

// Horizontal max/min kept at full width (vpermpd, vshufpd, vshufps + max), so LLVM does not split the block's max
// tree into 128-bit halves; the result is in every lane, and all 8 lanes are stored (see fusedScan): when only lane 0
// was used, LLVM narrowed the last step into compare + pshufb + blend.
@_transparent fileprivate func swap128(_ v: Lanes8) -> Lanes8 { Lanes8(lowHalf: v.highHalf, highHalf: v.lowHalf) }
@_transparent fileprivate func swap64(_ v: Lanes8) -> Lanes8 {
    let d = unsafeBitCast(v, to: Doubles4.self)
    return unsafeBitCast(Doubles4(d[1], d[0], d[3], d[2]), to: Lanes8.self)
}
@_transparent fileprivate func swap32(_ v: Lanes8) -> Lanes8 { Lanes8(v[1], v[0], v[3], v[2], v[5], v[4], v[7], v[6]) }
@_transparent fileprivate func horizontalMaximum8(_ v: Lanes8) -> Lanes8 {
    let a = maximum8(v, swap128(v)); let b = maximum8(a, swap64(a)); return maximum8(b, swap32(b))
}
@_transparent fileprivate func horizontalMinimum8(_ v: Lanes8) -> Lanes8 {
    let a = minimum8(v, swap128(v)); let b = minimum8(a, swap64(a)); return minimum8(b, swap32(b))
}

// The kernel runs in chunks of up to fusedChunkBlocks blocks (4 KiB of input, L1-resident for the second read), as three
// simple loops that LLVM vectorises cleanly (one big fused loop body gets partly scalarised):
//   scan:   x² sums and each block's max/min (or max|x|) → scratch
//   scales: 8 blocks at a time in SIMD8 lanes: the scale, 1/scale, F16 bits and −d16 → scratch
//   codes:  per block, with its constants broadcast from scratch: codes, stores, error sums.
fileprivate let fusedChunkBlocks = 32

/// Scratch layout (Floats): [0,32) high/amax, [40,72) low (each 8 wide stores, so 7 spare floats after each),
/// [80,112) id, [112,144) −d16, [144,160) F16 bits (UInt16), then accumulators at byte 1024: sig (2×8), err (2×8),
/// max|e| (8), max|x| (8).
fileprivate let fusedScratchSize = 1024 + 6 * 32

@inline(never)
fileprivate func fusedScan(_ x: UnsafePointer<Float>, _ n: Int, _ w: UnsafeMutableRawPointer, signed: Bool) {
    // Each block stores its 8-lane reduction at hi + k (lo + k); the next block overwrites lanes 1–7.
    let hi = w.assumingMemoryBound(to: Float.self), lo = hi + 40
    var sqA = Lanes8(), sqB = Lanes8()
    for k in 0..<n {
        let p = x + 32 &* k
        let x0 = load8(p), x1 = load8(p + 8), x2 = load8(p + 16), x3 = load8(p + 24)
        sqA = sqA.addingProduct(x0, x0); sqB = sqB.addingProduct(x1, x1)
        sqA = sqA.addingProduct(x2, x2); sqB = sqB.addingProduct(x3, x3)
        if signed {
            UnsafeMutableRawPointer(hi + k).storeBytes(of: horizontalMaximum8(maximum8(maximum8(x0, x1), maximum8(x2, x3))), as: Lanes8.self)
            UnsafeMutableRawPointer(lo + k).storeBytes(of: horizontalMinimum8(minimum8(minimum8(x0, x1), minimum8(x2, x3))), as: Lanes8.self)
        } else {
            UnsafeMutableRawPointer(hi + k).storeBytes(of: horizontalMaximum8(maximum8(maximum8(absolute8(x0), absolute8(x1)), maximum8(absolute8(x2), absolute8(x3)))), as: Lanes8.self)
        }
    }
    (w + 1024).storeBytes(of: sqA, as: Lanes8.self)
    (w + 1056).storeBytes(of: sqB, as: Lanes8.self)
}

@inline(never)
fileprivate func fusedScales(_ x: UnsafePointer<Float>, _ n: Int, _ w: UnsafeMutableRawPointer, q4: Bool) -> Bool {
    var maxAbs = (w + 1184).load(as: Lanes8.self)
    var finite = SIMDMask<SIMD8<Int32>>(repeating: true)
    for g in 0..<(n &+ 7) / 8 {
        let high = (w + (32 &* g)).load(as: Lanes8.self)
        let d: Lanes8
        if q4 {
            let low = (w + (160 &+ 32 &* g)).load(as: Lanes8.self)
            let negLow = -low
            maxAbs = maximum8(maxAbs, maximum8(high, negLow))
            // ggml: max = the first element of largest |x|, with its sign (+0 when all are ±0).
            var mx = high.replacing(with: low, where: high .< negLow)
            let tie = (high .== negLow) .& (high .> 0)
            if _slowPath(any(tie)) {
                for lane in 0..<Swift.min(8, n &- 8 &* g) where tie[lane] {
                    let p = x + 32 &* (8 &* g &+ lane), target = high[lane]
                    for j in 0..<32 where abs(p[j]) == target { mx[lane] = p[j]; break }
                }
            }
            d = (mx + 0) * -0.125  // = max / −8 exactly; −0 → +0 first
        } else {
            maxAbs = maximum8(maxAbs, high)
            d = high / 127
        }
        let id = (1 / d).replacing(with: 0, where: d .== 0)
        finite .&= absolute8(id) .< .infinity
        let (halfBits, d16) = halfRoundTrip8(d)
        (w + (320 &+ 32 &* g)).storeBytes(of: id, as: Lanes8.self)
        (w + (448 &+ 32 &* g)).storeBytes(of: -d16, as: Lanes8.self)
        (w + (576 &+ 16 &* g)).storeBytes(of: halfBits, as: SIMD8<UInt16>.self)
    }
    (w + 1184).storeBytes(of: maxAbs, as: Lanes8.self)
    return all(finite)
}

/// Q4_0 codes loop body. `packInFloat`: the two codes of a byte combined as (q₀ + magic) + 16·q₁ (one fma, exact);
/// only valid when no code is NaN (every id finite), since a NaN would spoil its byte partner.
@_transparent fileprivate func q4_0CodesBody(
    _ x: UnsafePointer<Float>, _ y: UnsafeMutableRawPointer, _ n: Int, _ w: UnsafeMutableRawPointer, packInFloat: Bool
) {
    let ids = (w + 320).assumingMemoryBound(to: Float.self), nds = (w + 448).assumingMemoryBound(to: Float.self)
    let halves = (w + 576).assumingMemoryBound(to: UInt16.self)
    var errA = Lanes8(), errB = Lanes8(), emax = (w + 1152).load(as: Lanes8.self)
    for k in 0..<n {
        let p = x + 32 &* k, out = y + 18 &* k
        let idk = Lanes8(repeating: ids[k]), ndk = Lanes8(repeating: nds[k])
        let x0 = load8(p), x1 = load8(p + 8), x2 = load8(p + 16), x3 = load8(p + 24)
        out.storeBytes(of: halves[k].littleEndian, as: UInt16.self)
        let (f0, e0) = q4_0Code(x0, idk, ndk), (f1, e1) = q4_0Code(x1, idk, ndk)
        let (f2, e2) = q4_0Code(x2, idk, ndk), (f3, e3) = q4_0Code(x3, idk, ndk)
        errA = errA.addingProduct(e0, e0); errB = errB.addingProduct(e1, e1)
        errA = errA.addingProduct(e2, e2); errB = errB.addingProduct(e3, e3)
        emax = maximum8(maximum8(emax, absolute8(e0)), maximum8(maximum8(absolute8(e1), absolute8(e2)), absolute8(e3)))
        // byte j: code j | code j+16 << 4 (only the low byte of each lane is kept)
        let packed: SIMD16<UInt32>
        if packInFloat {
            packed = SIMD16<UInt32>(lowHalf: bits8((f0 + magic8).addingProduct(f2, 16)), highHalf: bits8((f1 + magic8).addingProduct(f3, 16)))
        } else {
            let b0 = bits8(f0 + magic8), b1 = bits8(f1 + magic8), b2 = bits8(f2 + magic8), b3 = bits8(f3 + magic8)
            packed = SIMD16<UInt32>(lowHalf: b0 | (b2 &<< 4), highHalf: b1 | (b3 &<< 4))
        }
        (out + 2).storeBytes(of: lowBytes(packed), as: SIMD16<UInt8>.self)
    }
    (w + 1088).storeBytes(of: errA, as: Lanes8.self)
    (w + 1120).storeBytes(of: errB, as: Lanes8.self)
    (w + 1152).storeBytes(of: emax, as: Lanes8.self)
}

@inline(never)
fileprivate func q4_0Codes(_ x: UnsafePointer<Float>, _ y: UnsafeMutableRawPointer, _ n: Int, _ w: UnsafeMutableRawPointer) {
    q4_0CodesBody(x, y, n, w, packInFloat: true)
}

/// For chunks with a non-finite id (scales below 2⁻¹²⁸ or non-finite input), where codes can be NaN.
@inline(never)
fileprivate func q4_0CodesNaNSafe(_ x: UnsafePointer<Float>, _ y: UnsafeMutableRawPointer, _ n: Int, _ w: UnsafeMutableRawPointer) {
    q4_0CodesBody(x, y, n, w, packInFloat: false)
}

@inline(never)
fileprivate func q8_0Codes(_ x: UnsafePointer<Float>, _ y: UnsafeMutableRawPointer, _ n: Int, _ w: UnsafeMutableRawPointer) {
    let ids = (w + 320).assumingMemoryBound(to: Float.self), nds = (w + 448).assumingMemoryBound(to: Float.self)
    let halves = (w + 576).assumingMemoryBound(to: UInt16.self)
    var errA = Lanes8(), errB = Lanes8(), emax = (w + 1152).load(as: Lanes8.self)
    for k in 0..<n {
        let p = x + 32 &* k, out = y + 34 &* k
        let idk = Lanes8(repeating: ids[k]), ndk = Lanes8(repeating: nds[k])
        let x0 = load8(p), x1 = load8(p + 8), x2 = load8(p + 16), x3 = load8(p + 24)
        out.storeBytes(of: halves[k].littleEndian, as: UInt16.self)
        let (f0, e0) = q8_0Code(x0, idk, ndk), (f1, e1) = q8_0Code(x1, idk, ndk)
        let (f2, e2) = q8_0Code(x2, idk, ndk), (f3, e3) = q8_0Code(x3, idk, ndk)
        errA = errA.addingProduct(e0, e0); errB = errB.addingProduct(e1, e1)
        errA = errA.addingProduct(e2, e2); errB = errB.addingProduct(e3, e3)
        emax = maximum8(maximum8(emax, absolute8(e0)), maximum8(maximum8(absolute8(e1), absolute8(e2)), absolute8(e3)))
        let q01 = SIMD16<UInt32>(lowHalf: bits8(f0 + magic8), highHalf: bits8(f1 + magic8))
        let q23 = SIMD16<UInt32>(lowHalf: bits8(f2 + magic8), highHalf: bits8(f3 + magic8))
        (out + 2).storeBytes(of: lowBytes(q01), as: SIMD16<UInt8>.self)
        (out + 18).storeBytes(of: lowBytes(q23), as: SIMD16<UInt8>.self)
    }
    (w + 1088).storeBytes(of: errA, as: Lanes8.self)
    (w + 1120).storeBytes(of: errB, as: Lanes8.self)
    (w + 1152).storeBytes(of: emax, as: Lanes8.self)
}

// MARK: - Drivers

fileprivate func decodeHalf(_ p: UnsafeRawPointer) -> Float {
    Float(Float16(bitPattern: UInt16(littleEndian: p.loadUnaligned(as: UInt16.self))))
}

/// Exact statistics in Double from the input and the written blocks (slow path).
fileprivate func exactStatistics(_ x: UnsafePointer<Float>, _ y: UnsafeRawPointer, _ blocks: Int, q4: Bool) -> (signal: Double, error: Double, maxError: Float) {
    var signal = 0.0, error = 0.0, largest: Float = 0
    for b in 0..<blocks {
        let p = y + (q4 ? 18 : 34) * b
        let d = decodeHalf(p)
        for j in 0..<32 {
            let v = x[32 * b + j]
            let k: Int
            if q4 {
                let byte = p.load(fromByteOffset: 2 + (j & 15), as: UInt8.self)
                k = Int(j < 16 ? byte & 0xF : byte >> 4) - 8
            } else {
                k = Int(p.load(fromByteOffset: 2 + j, as: Int8.self))
            }
            let e = Double(v) - Double(Float(k) * d)
            signal += Double(v) * Double(v)
            error += e * e
            let m = Float(abs(e))
            if m > largest || m.isNaN { largest = m }
        }
    }
    return (signal, error, largest)
}

fileprivate func fusedQuantizeMeasured(
    _ x: UnsafePointer<Float>, _ y: UnsafeMutableRawPointer, _ blocks: Int, q4: Bool, scratch w: UnsafeMutableRawPointer
) -> (signal: Double, error: Double, maxError: Float) {
    guard blocks > 0 else { return (0, 0, 0) }
    let blockBytes = q4 ? 18 : 34
    var signal = Doubles4(), error = Doubles4()
    // Only the accumulators start at zero; the per-block constants are written before they are read.
    (w + 1024).initializeMemory(as: UInt8.self, repeating: 0, count: fusedScratchSize - 1024)
    var first = 0
    while first < blocks {
        let n = Swift.min(fusedChunkBlocks, blocks &- first)
        let p = x + 32 &* first, out = y + blockBytes &* first
        fusedScan(p, n, w, signed: q4)
        let finite = fusedScales(p, n, w, q4: q4)
        if !q4 { q8_0Codes(p, out, n, w) } else if _fastPath(finite) { q4_0Codes(p, out, n, w) } else { q4_0CodesNaNSafe(p, out, n, w) }
        let sq = (w + 1024).load(as: Lanes8.self) + (w + 1056).load(as: Lanes8.self)
        let er = (w + 1088).load(as: Lanes8.self) + (w + 1120).load(as: Lanes8.self)
        signal += Doubles4(sq.lowHalf) + Doubles4(sq.highHalf)
        error += Doubles4(er.lowHalf) + Doubles4(er.highHalf)
        first &+= n
    }
    let maxError = (w + 1152).load(as: Lanes8.self).max(), maxAbs = (w + 1184).load(as: Lanes8.self).max()
    let s = signal.sum(), e = error.sum()
    // Float partial sums lose terms below ~2^-149 each and overflow above ~2^128: recompute exactly when that
    // could matter (also when a scale is Inf/NaN, or when the input is non-finite).
    let floor = Double(32 * blocks) * 0x1p-100
    if !(s.isFinite && e.isFinite) || (s < floor && maxAbs > 0) || (e < floor && maxError > 0) {
        return exactStatistics(x, y, blocks, q4: q4)
    }
    return (s, e, maxError)
}

extension GGMLQuants {
    /// Q4_0 or Q8_0 blocks of `count` floats (whole blocks) at `source`, and the statistics of the values a reader
    /// dequantizes. Non-finite inputs never trap; they make the signal energy non-finite, and the blocks are then
    /// unspecified.
    ///
    /// `scratch`: ``fusedScratchBytes`` bytes, 32-byte aligned, zeroed once before its first use.
    static func quantizeMeasuredFused(
        _ type: GGMLType, source: UnsafePointer<Float>, count: Int, destination: UnsafeMutableRawPointer, scratch: UnsafeMutableRawPointer
    ) -> Measurement {
        precondition((type == .q4_0 || type == .q8_0) && count % 32 == 0 && Int(bitPattern: scratch) % 32 == 0)
        let (signal, error, maxError) = fusedQuantizeMeasured(source, destination, count / 32, q4: type == .q4_0, scratch: scratch)
        var m = Measurement()
        m.signalEnergy = signal
        m.errorEnergy = error
        m.maxError = maxError
        return m
    }

    /// Whether ``quantizeMeasuredFused(_:source:count:destination:scratch:)`` handles `type`.
    static func hasFusedKernel(_ type: GGMLType) -> Bool { type == .q4_0 || type == .q8_0 }

    /// Scratch bytes the fused kernels need.
    static var fusedScratchBytes: Int { fusedScratchSize }
}
