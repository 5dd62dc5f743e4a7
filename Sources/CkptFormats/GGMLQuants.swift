import CkptCore

/// ggml's block quantizers and dequantizers, bit-identical to the reference C code (`quantize_row_*_ref`,
/// `dequantize_row_*` in ggml-quants.c) and, for the types it has, to gguf-py 0.19.0's numpy port of it. The
/// K-quants (Q4_K, Q6_K) are in GGMLQuants+KQuants.swift.
///
/// Each 32-element block is processed as two `SIMD16<Float>` halves. Rounding never calls `rintf`/`roundf`
/// (library calls per element on baseline x86-64): adding 1.5·2^23 rounds a float with |x| < 2^22 to the nearest
/// integer (ties to even) and leaves that integer in the low mantissa bits; half-away-from-zero (`roundf`, Q8_0)
/// and truncation (`(int8_t)(x + 8.5f)`, Q4/Q5) are built from that with exact corrections, so codes stay
/// bit-exact while no float→int conversion can trap on NaN or infinity.
public enum GGMLQuants {
    /// Quantizes `count` floats (a multiple of the block size) into `destination`
    /// (`count / blockSize × bytesPerBlock` bytes, any alignment). F32, F16 and BF16 are plain conversions.
    ///
    /// Non-finite inputs give unspecified (but deterministic) codes: ggml and gguf-py disagree on them too.
    public static func quantize(_ type: GGMLType, source: UnsafePointer<Float>, count: Int, destination: UnsafeMutableRawPointer) {
        precondition(count >= 0 && count % type.blockSize == 0, "\(count) elements are not whole \(type.name) blocks")
        let blocks = count / type.blockSize
        switch type {
        case .f32, .f16, .bf16:
            DTypeConversion.convert(from: .f32, to: type.plainDType!, count: count, source: UnsafeRawPointer(source), destination: destination)
        case .q8_0: quantizeQ8_0(source, destination, blocks)
        case .q4_0: quantizeSymmetric(source, destination, blocks, levels: 16)
        case .q5_0: quantizeSymmetric(source, destination, blocks, levels: 32)
        case .q4_1: quantizeAffine(source, destination, blocks, levels: 16)
        case .q5_1: quantizeAffine(source, destination, blocks, levels: 32)
        case .q4_K: quantizeQ4_K(source, destination, blocks)
        case .q6_K: quantizeQ6_K(source, destination, blocks)
        case .i8, .i16, .i32, .i64, .f64:
            preconditionFailure("\(type.name) is not a float encoding")
        }
    }

    /// Decodes `count` elements (a multiple of the block size) of `type` from `source` (any alignment) to F32.
    /// Plain types convert exactly (F64 rounds once to nearest even; integers convert as `Float(x)`).
    public static func dequantize(_ type: GGMLType, source: UnsafeRawPointer, count: Int, destination: UnsafeMutablePointer<Float>) {
        precondition(count >= 0 && count % type.blockSize == 0, "\(count) elements are not whole \(type.name) blocks")
        let blocks = count / type.blockSize
        switch type {
        case .f32, .f16, .bf16, .f64:
            DTypeConversion.convert(from: type.plainDType!, to: .f32, count: count, source: source, destination: UnsafeMutableRawPointer(destination))
        case .i8: for i in 0..<count { destination[i] = Float(source.load(fromByteOffset: i, as: Int8.self)) }
        case .i16: for i in 0..<count { destination[i] = Float(source.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self)) }
        case .i32: for i in 0..<count { destination[i] = Float(source.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self)) }
        case .i64: for i in 0..<count { destination[i] = Float(source.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self)) }
        case .q8_0: dequantizeQ8_0(source, destination, blocks)
        case .q4_0: dequantizeSymmetric(source, destination, blocks, levels: 16)
        case .q5_0: dequantizeSymmetric(source, destination, blocks, levels: 32)
        case .q4_1: dequantizeAffine(source, destination, blocks, levels: 16)
        case .q5_1: dequantizeAffine(source, destination, blocks, levels: 32)
        case .q4_K: dequantizeQ4_K(source, destination, blocks)
        case .q6_K: dequantizeQ6_K(source, destination, blocks)
        }
    }

    /// ``quantize(_:source:count:destination:)`` split across cores on block boundaries for large inputs.
    public static func quantizeParallel(_ type: GGMLType, source: UnsafePointer<Float>, count: Int, destination: UnsafeMutableRawPointer) {
        precondition(count >= 0 && count % type.blockSize == 0, "\(count) elements are not whole \(type.name) blocks")
        nonisolated(unsafe) let src = source
        nonisolated(unsafe) let dst = destination
        let blockSize = type.blockSize, blockBytes = type.bytesPerBlock
        // Disjoint block ranges: each worker reads and writes only its own blocks.
        Parallel.forEachChunk(count: count / blockSize, minimumChunk: parallelBlocks(type)) { range in
            quantize(type, source: src + range.lowerBound * blockSize, count: range.count * blockSize, destination: dst + range.lowerBound * blockBytes)
        }
    }

    /// ``dequantize(_:source:count:destination:)`` split across cores on block boundaries for large inputs.
    public static func dequantizeParallel(_ type: GGMLType, source: UnsafeRawPointer, count: Int, destination: UnsafeMutablePointer<Float>) {
        precondition(count >= 0 && count % type.blockSize == 0, "\(count) elements are not whole \(type.name) blocks")
        nonisolated(unsafe) let src = source
        nonisolated(unsafe) let dst = destination
        let blockSize = type.blockSize, blockBytes = type.bytesPerBlock
        Parallel.forEachChunk(count: count / blockSize, minimumChunk: parallelBlocks(type)) { range in
            dequantize(type, source: src + range.lowerBound * blockBytes, count: range.count * blockSize, destination: dst + range.lowerBound * blockSize)
        }
    }

    /// Blocks per worker below which threads cost more than they save (~64 K elements).
    private static func parallelBlocks(_ type: GGMLType) -> Int { max(1, (1 << 16) / type.blockSize) }
}

// MARK: - SIMD helpers

typealias Vector = SIMD16<Float>
typealias Bits = SIMD16<UInt32>

/// 1.5·2^23: x + magic − magic rounds x (|x| < 2^22) to an integer, ties to even; the sum's bit pattern is
/// 0x4B40_0000 plus that integer (two's complement in the low bits).
@inline(__always) var magic: Float { 12_582_912 }
@inline(__always) var magicBits: UInt32 { 0x4B40_0000 }

@inline(__always) func bits(_ v: Vector) -> Bits { unsafeBitCast(v, to: Bits.self) }
@inline(__always) func floats(_ v: Bits) -> Vector { unsafeBitCast(v, to: Vector.self) }
@inline(__always) func absolute(_ v: Vector) -> Vector { floats(bits(v) & 0x7FFF_FFFF) }

// Lane comparisons and selects on 16 lanes can compile to a scalar loop once inlined into a large kernel; on
// SIMD4 they always become single SSE instructions (cmpps, maxps…), so 16-lane ones are built from quarters.

@inline(__always) func split(_ v: Vector) -> (SIMD4<Float>, SIMD4<Float>, SIMD4<Float>, SIMD4<Float>) {
    (v.lowHalf.lowHalf, v.lowHalf.highHalf, v.highHalf.lowHalf, v.highHalf.highHalf)
}
@inline(__always) func join<S: SIMDScalar>(_ a: SIMD4<S>, _ b: SIMD4<S>, _ c: SIMD4<S>, _ d: SIMD4<S>) -> SIMD16<S> {
    SIMD16(lowHalf: SIMD8(lowHalf: a, highHalf: b), highHalf: SIMD8(lowHalf: c, highHalf: d))
}

// Select-based min/max (maxps/minps), rather than the stdlib's pointwiseMin/Max, which are not inlined. As in
// ggml's `if (v > max) max = v`, a NaN in `b` never replaces `a`.
@inline(__always) func maximum(_ a: SIMD4<Float>, _ b: SIMD4<Float>) -> SIMD4<Float> { a.replacing(with: b, where: b .> a) }
@inline(__always) func minimum(_ a: SIMD4<Float>, _ b: SIMD4<Float>) -> SIMD4<Float> { a.replacing(with: b, where: b .< a) }
@inline(__always) func equalMask(_ a: SIMD4<Float>, _ b: SIMD4<Float>) -> SIMD4<UInt32> {
    SIMD4<UInt32>(repeating: 0).replacing(with: .max, where: a .== b)
}
@inline(__always) func greaterMask(_ a: SIMD4<Float>, _ b: SIMD4<Float>) -> SIMD4<UInt32> {
    SIMD4<UInt32>(repeating: 0).replacing(with: .max, where: a .> b)
}
@inline(__always) func equalMask(_ a: SIMD4<UInt32>, _ b: SIMD4<UInt32>) -> SIMD4<UInt32> {
    SIMD4<UInt32>(repeating: 0).replacing(with: .max, where: a .== b)
}

@inline(__always) func maximum(_ a: Vector, _ b: Vector) -> Vector {
    let (a0, a1, a2, a3) = split(a), (b0, b1, b2, b3) = split(b)
    return join(maximum(a0, b0), maximum(a1, b1), maximum(a2, b2), maximum(a3, b3))
}
@inline(__always) func minimum(_ a: Vector, _ b: Vector) -> Vector {
    let (a0, a1, a2, a3) = split(a), (b0, b1, b2, b3) = split(b)
    return join(minimum(a0, b0), minimum(a1, b1), minimum(a2, b2), minimum(a3, b3))
}
/// All-ones lanes where the comparison holds, zero elsewhere.
@inline(__always) func equalMask(_ a: Vector, _ b: Vector) -> Bits {
    let (a0, a1, a2, a3) = split(a), (b0, b1, b2, b3) = split(b)
    return join(equalMask(a0, b0), equalMask(a1, b1), equalMask(a2, b2), equalMask(a3, b3))
}
@inline(__always) func greaterMask(_ a: Vector, _ b: Vector) -> Bits {
    let (a0, a1, a2, a3) = split(a), (b0, b1, b2, b3) = split(b)
    return join(greaterMask(a0, b0), greaterMask(a1, b1), greaterMask(a2, b2), greaterMask(a3, b3))
}
@inline(__always) func equalMask(_ a: Bits, _ b: Bits) -> Bits {
    join(equalMask(a.lowHalf.lowHalf, b.lowHalf.lowHalf), equalMask(a.lowHalf.highHalf, b.lowHalf.highHalf),
         equalMask(a.highHalf.lowHalf, b.highHalf.lowHalf), equalMask(a.highHalf.highHalf, b.highHalf.highHalf))
}

@inline(__always) func horizontalMaximum(_ v: Vector) -> Float {
    let (a, b, c, d) = split(v)
    let m = maximum(maximum(a, b), maximum(c, d))
    return Swift.max(Swift.max(m[0], m[1]), Swift.max(m[2], m[3]))
}

@inline(__always) func horizontalMinimum(_ v: Vector) -> Float {
    let (a, b, c, d) = split(v)
    let m = minimum(minimum(a, b), minimum(c, d))
    return Swift.min(Swift.min(m[0], m[1]), Swift.min(m[2], m[3]))
}

@inline(__always) func horizontalOr(_ v: Bits) -> UInt32 {
    let a = v.lowHalf | v.highHalf
    let b = a.lowHalf | a.highHalf
    return (b[0] | b[1]) | (b[2] | b[3])
}

/// Index (0…31) of the first lane of `x0` (lanes 0…15) then `x1` (16…31) equal to `value`; 0 if none (NaN).
@inline(__always) func firstIndex(of value: Float, _ x0: Vector, _ x1: Vector) -> Int {
    let target = Vector(repeating: value)
    // Matching lanes keep their index, others get index + 64; the smallest key wins.
    let key0 = laneIndexFloat + floats(~equalMask(x0, target) & 0x4280_0000)
    let key1 = laneIndexFloat + 16 + floats(~equalMask(x1, target) & 0x4280_0000)
    let first = horizontalMinimum(minimum(key0, key1))
    return first < 32 ? Int(first) : 0
}

// MARK: Four blocks at a time

// The scalar part of a block (its scale, 1/scale, the F16 conversion) is a long dependency chain; doing it for
// four blocks at once in SIMD4 lanes (divps instead of divss) keeps the vector units busy.

typealias Quad = SIMD4<Float>

/// The largest of the 32 values `x0`, `x1` as a SIMD4 whose lanes remain to be reduced.
@inline(__always) func partialMaximum(_ x0: Vector, _ x1: Vector) -> Quad {
    let (a, b, c, d) = split(maximum(x0, x1))
    return maximum(maximum(a, b), maximum(c, d))
}
@inline(__always) func partialMinimum(_ x0: Vector, _ x1: Vector) -> Quad {
    let (a, b, c, d) = split(minimum(x0, x1))
    return minimum(minimum(a, b), minimum(c, d))
}

/// Lane k: the largest lane of the k-th argument (a 4×4 transpose folded into the reduction).
@inline(__always) func lanesMaximum(_ a: Quad, _ b: Quad, _ c: Quad, _ d: Quad) -> Quad {
    let ab = maximum(Quad(a[0], b[0], a[1], b[1]), Quad(a[2], b[2], a[3], b[3]))
    let cd = maximum(Quad(c[0], d[0], c[1], d[1]), Quad(c[2], d[2], c[3], d[3]))
    return maximum(Quad(ab[0], ab[1], cd[0], cd[1]), Quad(ab[2], ab[3], cd[2], cd[3]))
}
@inline(__always) func lanesMinimum(_ a: Quad, _ b: Quad, _ c: Quad, _ d: Quad) -> Quad {
    let ab = minimum(Quad(a[0], b[0], a[1], b[1]), Quad(a[2], b[2], a[3], b[3]))
    let cd = minimum(Quad(c[0], d[0], c[1], d[1]), Quad(c[2], d[2], c[3], d[3]))
    return minimum(Quad(ab[0], ab[1], cd[0], cd[1]), Quad(ab[2], ab[3], cd[2], cd[3]))
}

/// `d ≠ 0 ? 1/d : 0` per lane.
@inline(__always) func inverse(_ d: Quad) -> Quad {
    (Quad(repeating: 1) / d).replacing(with: 0, where: d .== 0)
}

/// F32 → F16 bit patterns per lane, the same rounding as ``FloatBits/f32ToF16(bits:)`` (nearest even,
/// subnormals, overflow to infinity, quiet NaN), without branches.
@inline(__always) func halfBits(_ v: Quad) -> SIMD4<UInt32> {
    let x = unsafeBitCast(v, to: SIMD4<UInt32>.self)
    let sign = x & 0x8000_0000, magnitude = x & 0x7FFF_FFFF
    let normal = (magnitude &+ 0xC800_0FFF &+ ((magnitude &>> 13) & 1)) &>> 13
    let subnormal = unsafeBitCast(unsafeBitCast(magnitude, to: Quad.self) + 0.5, to: SIMD4<UInt32>.self) &- 0x3F00_0000
    let m = unsafeBitCast(magnitude, to: SIMD4<Int32>.self)  // < 2^31: signed compares (SSE2 has no unsigned ones)
    var result = normal.replacing(with: subnormal, where: m .< 0x3880_0000)
    result.replace(with: 0x7C00, where: m .>= 0x4780_0000)
    result.replace(with: 0x7E00 | ((magnitude &>> 13) & 0x3FF), where: m .> 0x7F80_0000)
    return result | (sign &>> 16)
}

@inline(__always) func storeHalf(_ bits: UInt32, _ p: UnsafeMutableRawPointer, _ offset: Int) {
    p.storeBytes(of: UInt16(truncatingIfNeeded: bits).littleEndian, toByteOffset: offset, as: UInt16.self)
}

@inline(__always) func load(_ p: UnsafePointer<Float>) -> Vector {
    UnsafeRawPointer(p).loadUnaligned(as: Vector.self)
}

/// `roundf(v)` (half away from zero) as the sum's bit pattern: the low byte is the int8 code. A tie that the
/// magic addition rounded toward zero leaves `v − rne(v)` = ±0.5 with v's sign; it moves one step outward.
@inline(__always) func roundAwayBits(_ v: Vector) -> Bits {
    let sum = v + magic
    let difference = v - (sum - magic)  // exact
    let sign = bits(v) & 0x8000_0000
    let half = floats(sign | 0x3F00_0000), one = floats(sign | 0x3F80_0000)
    return bits(sum + floats(bits(one) & equalMask(difference, half)))
}

/// `floor(s)` for s ≥ 0 (= C's truncating `(int)s`) as the sum's bit pattern, low bits holding the integer:
/// round to nearest, then subtract one (add the all-ones mask) where that rounded up.
@inline(__always) func floorBits(_ s: Vector) -> Bits {
    let sum = s + magic
    return bits(sum) &+ greaterMask(sum - magic, s)
}

/// Small integers (|k| < 2^22, two's complement) to Float exactly, by the magic constant in reverse.
@inline(__always) func toFloat(_ k: Bits) -> Vector { floats(k &+ magicBits) - magic }

/// Bit 4 of each code, gathered into one word: bit j for lane j of `q0`, bit j+16 for lane j of `q1`.
/// Byte j gets 1 << (j mod 8) where the bit is set; multiplying 8 such bytes (distinct bits, so no carries) by
/// 0x0101…01 sums them into the top byte. SSE2 has no variable per-lane shift to do it lane-wise.
@inline(__always) func highBits(_ q0: Bits, _ q1: Bits) -> UInt32 {
    let weights = SIMD16<UInt8>(1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128)
    let w0 = unsafeBitCast(narrow(0 &- ((q0 &>> 4) & 1)) & weights, to: SIMD2<UInt64>.self)
    let w1 = unsafeBitCast(narrow(0 &- ((q1 &>> 4) & 1)) & weights, to: SIMD2<UInt64>.self)
    let spread: UInt64 = 0x0101_0101_0101_0101
    let b0 = (w0[0] &* spread) >> 56, b1 = (w0[1] &* spread) >> 56
    let b2 = (w1[0] &* spread) >> 56, b3 = (w1[1] &* spread) >> 56
    return UInt32(truncatingIfNeeded: b0 | (b1 << 8) | (b2 << 16) | (b3 << 24))
}

/// 16 bytes widened to 32-bit lanes (zero-extended).
@inline(__always) func widen(_ p: UnsafeRawPointer) -> Bits {
    let v = p.loadUnaligned(as: SIMD16<UInt8>.self)
    var result = Bits()
    for i in 0..<16 { result[i] = UInt32(v[i]) }
    return result
}

@inline(__always) func narrow(_ v: Bits) -> SIMD16<UInt8> { SIMD16<UInt8>(truncatingIfNeeded: v) }

/// Stores the 32 codes of a Q4_0/Q4_1/Q5_0/Q5_1 block: element j (lane j of `q0`) in the low nibble of byte j of
/// `qs`, element j+16 (lane j of `q1`) in its high nibble; for 5-bit codes (levels 32) bit 4 of each into the u32
/// `qh`, which sits right after the block's halves, 4 bytes before `qs`.
@inline(__always) func storeCodes(_ q0: Bits, _ q1: Bits, _ out: UnsafeMutableRawPointer, codesOffset: Int, levels: Int) {
    out.storeBytes(of: narrow((q0 & 0xF) | ((q1 & 0xF) &<< 4)), toByteOffset: codesOffset, as: SIMD16<UInt8>.self)
    if levels == 32 {
        out.storeBytes(of: highBits(q0, q1).littleEndian, toByteOffset: codesOffset - 4, as: UInt32.self)
    }
}

/// The block's codes as ``storeCodes(_:_:_:codesOffset:levels:)`` lays them out: elements 0–15 and 16–31.
@inline(__always) func loadCodes(_ p: UnsafeRawPointer, codesOffset: Int, levels: Int) -> (low: Bits, high: Bits) {
    let packed = widen(p + codesOffset)
    var low = packed & 0xF, high = packed &>> 4
    if levels == 32 {
        let qh = Bits(repeating: UInt32(littleEndian: p.loadUnaligned(fromByteOffset: codesOffset - 4, as: UInt32.self)))
        low |= equalMask(qh & laneBitLow, laneBitLow) & 16
        high |= equalMask(qh & laneBitHigh, laneBitHigh) & 16
    }
    return (low, high)
}

@inline(__always) func storeF16(_ value: Float, _ p: UnsafeMutableRawPointer, _ offset: Int) {
    p.storeBytes(of: FloatBits.f32ToF16(value).littleEndian, toByteOffset: offset, as: UInt16.self)
}

@inline(__always) func loadF16(_ p: UnsafeRawPointer, _ offset: Int) -> Float {
    FloatBits.f16ToF32(UInt16(littleEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt16.self)))
}

// Computed rather than stored: a global `let` is lazily initialised, and its access check would sit in every loop.
@inline(__always) var laneIndexFloat: Vector { Vector(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15) }
@inline(__always) var laneBitLow: Bits {
    Bits(1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 15)
}
@inline(__always) var laneBitHigh: Bits { laneBitLow &<< 16 }

// MARK: - Q8_0

extension GGMLQuants {
    /// `{ f16 d; int8 qs[32] }`: d = max|x| / 127, qs = roundf(x / d) (multiplied by the float32 1/d).
    static func quantizeQ8_0(_ x: UnsafePointer<Float>, _ y: UnsafeMutableRawPointer, _ blocks: Int) {
        for first in stride(from: 0, to: blocks, by: 4) {
            // Lanes past the last block repeat it; only real blocks are stored.
            let n = min(4, blocks - first)
            let p0 = x + 32 * first, p1 = p0 + 32 * min(1, n - 1), p2 = p0 + 32 * min(2, n - 1), p3 = p0 + 32 * min(3, n - 1)
            let amax = lanesMaximum(
                partialMaximum(absolute(load(p0)), absolute(load(p0 + 16))), partialMaximum(absolute(load(p1)), absolute(load(p1 + 16))),
                partialMaximum(absolute(load(p2)), absolute(load(p2 + 16))), partialMaximum(absolute(load(p3)), absolute(load(p3 + 16))))
            let d = amax / 127
            let ids = inverse(d), halves = halfBits(d)
            for k in 0..<n {
                let p = p0 + 32 * k, out = y + 34 * (first + k)
                let id = ids[k]
                storeHalf(halves[k], out, 0)
                out.storeBytes(of: narrow(roundAwayBits(load(p) * id)), toByteOffset: 2, as: SIMD16<UInt8>.self)
                out.storeBytes(of: narrow(roundAwayBits(load(p + 16) * id)), toByteOffset: 18, as: SIMD16<UInt8>.self)
            }
        }
    }

    static func dequantizeQ8_0(_ x: UnsafeRawPointer, _ y: UnsafeMutablePointer<Float>, _ blocks: Int) {
        for block in 0..<blocks {
            let p = x + 34 * block, out = UnsafeMutableRawPointer(y + 32 * block)
            let d = loadF16(p, 0)
            for half in 0..<2 {
                // int8 codes: widen the bytes, then sign-extend by flipping and subtracting bit 7.
                let codes = (widen(p + 2 + 16 * half) ^ 0x80) &- 0x80
                let values = toFloat(codes) * d
                out.storeBytes(of: values, toByteOffset: 64 * half, as: Vector.self)
            }
        }
    }
}

// MARK: - Q4_0, Q5_0: d = (signed value of largest magnitude) / −levels/2, codes truncated

extension GGMLQuants {
    /// Q4_0 `{ f16 d; u8 qs[16] }` (levels 16) and Q5_0 `{ f16 d; u32 qh; u8 qs[16] }` (levels 32).
    /// max = the first element of largest |x| (sign kept), d = max / −(levels/2), id = 1/d (float32, from the
    /// unrounded d), q = min(levels−1, (int)(x·id + levels/2 + 0.5)). Byte j of qs holds element j in its low
    /// nibble and element j+16 in its high one; Q5_0 keeps bit 4 of element j in bit j of qh.
    @inline(__always)
    static func quantizeSymmetric(_ x: UnsafePointer<Float>, _ y: UnsafeMutableRawPointer, _ blocks: Int, levels: Int) {
        let blockBytes = levels == 16 ? 18 : 22, codesOffset = levels == 16 ? 2 : 6
        let divisor = -Float(levels / 2), offset = Float(levels / 2) + 0.5, ceiling = Float(levels) - 0.5
        for first in stride(from: 0, to: blocks, by: 4) {
            let n = min(4, blocks - first)
            let p0 = x + 32 * first, p1 = p0 + 32 * min(1, n - 1), p2 = p0 + 32 * min(2, n - 1), p3 = p0 + 32 * min(3, n - 1)
            let x00 = load(p0), x01 = load(p0 + 16), x10 = load(p1), x11 = load(p1 + 16)
            let x20 = load(p2), x21 = load(p2 + 16), x30 = load(p3), x31 = load(p3 + 16)
            let high = lanesMaximum(partialMaximum(x00, x01), partialMaximum(x10, x11), partialMaximum(x20, x21), partialMaximum(x30, x31))
            let low = lanesMinimum(partialMinimum(x00, x01), partialMinimum(x10, x11), partialMinimum(x20, x21), partialMinimum(x30, x31))
            // ggml keeps the first element whose |x| exceeds all before it (0 when every |x| is 0). The largest
            // and smallest values decide which sign that is, unless both reach the same magnitude.
            var max = high.replacing(with: low, where: high .< -low)
            let tie = high .== -low
            if any(tie) {
                for k in 0..<4 where tie[k] {
                    let p = p0 + 32 * min(k, n - 1)
                    max[k] = high[k] > 0 ? p[firstIndex(of: high[k], absolute(load(p)), absolute(load(p + 16)))] : 0
                }
            }
            let d = max / divisor
            let ids = inverse(d), halves = halfBits(d)
            for k in 0..<n {
                let p = p0 + 32 * k, out = y + blockBytes * (first + k)
                let id = ids[k]
                storeHalf(halves[k], out, 0)
                let q0 = floorBits(minimum(load(p) * id + offset, Vector(repeating: ceiling)))
                let q1 = floorBits(minimum(load(p + 16) * id + offset, Vector(repeating: ceiling)))
                storeCodes(q0, q1, out, codesOffset: codesOffset, levels: levels)
            }
        }
    }

    @inline(__always)
    static func dequantizeSymmetric(_ x: UnsafeRawPointer, _ y: UnsafeMutablePointer<Float>, _ blocks: Int, levels: Int) {
        let blockBytes = levels == 16 ? 18 : 22, codesOffset = levels == 16 ? 2 : 6
        let zero = Bits(repeating: UInt32(levels / 2))
        for block in 0..<blocks {
            let p = x + blockBytes * block, out = UnsafeMutableRawPointer(y + 32 * block)
            let d = loadF16(p, 0)
            let (low, high) = loadCodes(p, codesOffset: codesOffset, levels: levels)
            out.storeBytes(of: toFloat(low &- zero) * d, toByteOffset: 0, as: Vector.self)
            out.storeBytes(of: toFloat(high &- zero) * d, toByteOffset: 64, as: Vector.self)
        }
    }
}

// MARK: - Q4_1, Q5_1: d = (max − min) / (levels − 1), m = min, codes truncated

extension GGMLQuants {
    /// Q4_1 `{ f16 d, m; u8 qs[16] }` and Q5_1 `{ f16 d, m; u32 qh; u8 qs[16] }`:
    /// q = min(levels−1, (int)((x − min)·id + 0.5)), same nibble and qh layout as Q4_0/Q5_0.
    @inline(__always)
    static func quantizeAffine(_ x: UnsafePointer<Float>, _ y: UnsafeMutableRawPointer, _ blocks: Int, levels: Int) {
        let blockBytes = levels == 16 ? 20 : 24, codesOffset = levels == 16 ? 4 : 8
        let ceiling = Float(levels) - 0.5, steps = Quad(repeating: Float(levels - 1))
        for first in stride(from: 0, to: blocks, by: 4) {
            let n = min(4, blocks - first)
            let p0 = x + 32 * first, p1 = p0 + 32 * min(1, n - 1), p2 = p0 + 32 * min(2, n - 1), p3 = p0 + 32 * min(3, n - 1)
            let x00 = load(p0), x01 = load(p0 + 16), x10 = load(p1), x11 = load(p1 + 16)
            let x20 = load(p2), x21 = load(p2 + 16), x30 = load(p3), x31 = load(p3 + 16)
            let max = lanesMaximum(partialMaximum(x00, x01), partialMaximum(x10, x11), partialMaximum(x20, x21), partialMaximum(x30, x31))
            var min = lanesMinimum(partialMinimum(x00, x01), partialMinimum(x10, x11), partialMinimum(x20, x21), partialMinimum(x30, x31))
            // ggml keeps the first minimal element, so a zero minimum has that element's sign.
            let zero = min .== 0
            if any(zero) {
                for k in 0..<4 where zero[k] {
                    let p = p0 + 32 * Swift.min(k, n - 1)
                    min[k] = p[firstIndex(of: 0, load(p), load(p + 16))]
                }
            }
            // When max and min are one value ggml subtracts an element from itself: +0, never −0.
            let d = ((max - min) / steps).replacing(with: 0, where: max .== min)
            let ids = inverse(d), halves = halfBits(d), minima = halfBits(min)
            for k in 0..<n {
                let p = p0 + 32 * k, out = y + blockBytes * (first + k)
                let id = ids[k], m = min[k]
                storeHalf(halves[k], out, 0)
                storeHalf(minima[k], out, 2)
                let q0 = floorBits(minimum((load(p) - m) * id + 0.5, Vector(repeating: ceiling)))
                let q1 = floorBits(minimum((load(p + 16) - m) * id + 0.5, Vector(repeating: ceiling)))
                storeCodes(q0, q1, out, codesOffset: codesOffset, levels: levels)
            }
        }
    }

    @inline(__always)
    static func dequantizeAffine(_ x: UnsafeRawPointer, _ y: UnsafeMutablePointer<Float>, _ blocks: Int, levels: Int) {
        let blockBytes = levels == 16 ? 20 : 24, codesOffset = levels == 16 ? 4 : 8
        for block in 0..<blocks {
            let p = x + blockBytes * block, out = UnsafeMutableRawPointer(y + 32 * block)
            let d = loadF16(p, 0), m = loadF16(p, 2)
            let (low, high) = loadCodes(p, codesOffset: codesOffset, levels: levels)
            // (d·q) + m, rounded twice, as ggml and gguf-py compute it (no fused multiply-add).
            out.storeBytes(of: toFloat(low) * d + m, toByteOffset: 0, as: Vector.self)
            out.storeBytes(of: toFloat(high) * d + m, toByteOffset: 64, as: Vector.self)
        }
    }
}
