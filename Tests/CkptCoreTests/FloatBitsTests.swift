import CkptCore
import Testing

/// The references here are the Swift standard library's IEEE conversions (`Float16(x)`, `Float(h)`), which are
/// correctly rounded library calls; ckpt's kernels are branchless bit code and must agree bit for bit.
@Suite("Float conversions")
struct FloatBitsTests {
    @Test("F16 → F32 matches Float(Float16) for all 65536 codes")
    func f16ToF32Exhaustive() {
        for code in 0...UInt16.max {
            let reference = Float(Float16(bitPattern: code))
            let ours = FloatBits.f16ToF32(code)
            if reference.isNaN {
                #expect(ours.isNaN)
                // Payload and sign are kept.
                #expect(ours.bitPattern & 0x807F_FFFF == (UInt32(code & 0x8000) << 16) | (UInt32(code & 0x3FF) << 13))
            } else {
                #expect(ours.bitPattern == reference.bitPattern, "code \(code)")
            }
        }
    }

    @Test("F32 → F16 round-trips every half-precision value and quiets NaNs")
    func f16RoundTrip() {
        for code in 0...UInt16.max {
            let value = FloatBits.f16ToF32(code)
            let back = FloatBits.f32ToF16(value)
            if value.isNaN {
                #expect(back & 0x7E00 == 0x7E00 && back & 0x8000 == code & 0x8000, "NaN \(code)")
            } else {
                #expect(back == code, "code \(code)")
            }
        }
    }

    @Test("F32 → F16 matches Float16(Float) on ties, overflow, subnormals and random values")
    func f32ToF16MatchesStdlib() {
        var values: [Float] = [0, -0, 1, -1, 65504, 65519.99, 65520, 65536, 1e10, -1e10, .infinity, -.infinity,
                               5.96e-8, 2.98e-8, 2.99e-8, 1e-9, 6.1e-5, 6.097e-5, 0.1, 1.0 / 3.0]
        // Exact ties between neighbouring halves: odd multiples of half an ulp.
        for code in stride(from: UInt16(1), to: 0x7BFF, by: 97) {
            let a = FloatBits.f16ToF32(code), b = FloatBits.f16ToF32(code + 1)
            values.append((a + b) / 2)
            values.append(-(a + b) / 2)
        }
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        for _ in 0..<200_000 {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            let bits = UInt32(truncatingIfNeeded: state >> 32)
            let value = Float(bitPattern: bits)
            if !value.isNaN { values.append(value) }
        }
        for value in values {
            #expect(FloatBits.f32ToF16(value) == Float16(value).bitPattern, "\(value)")
        }
    }

    @Test("F64 → F16 and BF16 round once, like a direct correctly rounded conversion")
    func f64RoundsOnce() {
        // 1 + 2^-11 + 2^-40 lies just above an F16 tie: rounding through F32 would lose the 2^-40 and round to even.
        let x = 1.0 + 0x1p-11 + 0x1p-40
        #expect(FloatBits.f64ToF16(x) == Float16(x).bitPattern)
        #expect(FloatBits.f64ToF16(x) == 0x3C01)
        var state: UInt64 = 12345
        for _ in 0..<100_000 {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            let value = Double(bitPattern: state >> 2 | 0x3000_0000_0000_0000) * (state & 1 == 0 ? 1 : -1)
            #expect(FloatBits.f64ToF16(value) == Float16(value).bitPattern, "\(value)")
        }
        #expect(FloatBits.f64ToF16(.infinity) == 0x7C00)
        #expect(FloatBits.f64ToF16(1e300) == 0x7C00)
        #expect(FloatBits.f64ToF16(-1e-300) == 0x8000)
        #expect(FloatBits.f64ToF16(.nan) & 0x7E00 == 0x7E00)
        // BF16: 1 + 2^-8 is an exact tie (rounds to even, 1.0); a hair above rounds up.
        #expect(FloatBits.f64ToBF16(1 + 0x1p-8) == 0x3F80)
        #expect(FloatBits.f64ToBF16(1 + 0x1p-8 + 0x1p-40) == 0x3F81)
        #expect(FloatBits.f64ToBF16(3.0e38) == FloatBits.f32ToBF16(Float(3.0e38)))
    }

    @Test("F32 → BF16 rounds to nearest even and keeps the NaN sign")
    func bf16() {
        #expect(FloatBits.f32ToBF16(Float(bitPattern: 0x3F80_8000)) == 0x3F80)  // tie, even stays
        #expect(FloatBits.f32ToBF16(Float(bitPattern: 0x3F81_8000)) == 0x3F82)  // tie, odd rounds up
        #expect(FloatBits.f32ToBF16(Float(bitPattern: 0x3F80_8001)) == 0x3F81)
        #expect(FloatBits.f32ToBF16(.infinity) == 0x7F80)
        #expect(FloatBits.f32ToBF16(Float(bitPattern: 0x7F7F_FFFF)) == 0x7F80)  // max float rounds to Inf
        #expect(FloatBits.f32ToBF16(Float(bitPattern: 0x0000_0001)) == 0x0000)  // subnormal
        #expect(FloatBits.f32ToBF16(Float(bitPattern: 0x0001_8000)) == 0x0002)
        #expect(FloatBits.f32ToBF16(Float(bitPattern: 0xFFC0_0001)) == 0xFFC0)
        #expect(FloatBits.f32ToBF16(Float(bitPattern: 0x7F80_0001)) == 0x7FC0)
        for code in stride(from: UInt16(0), to: 0x7F80, by: 7) {
            #expect(FloatBits.f32ToBF16(FloatBits.bf16ToF32(code)) == code)
        }
    }

    @Test("F8 decode tables follow the format definitions")
    func f8Tables() {
        let e4m3 = FloatBits.f8E4M3Table
        #expect(e4m3[0x7E] == 448)
        #expect(e4m3[0x7F].isNaN && e4m3[0xFF].isNaN)
        #expect(e4m3[0x01] == 0x1p-9)
        #expect(e4m3[0x38] == 1)
        #expect(e4m3[0x80] == 0 && e4m3[0x80].sign == .minus)
        let e5m2 = FloatBits.f8E5M2Table
        #expect(e5m2[0x7C] == .infinity && e5m2[0xFC] == -.infinity)
        #expect(e5m2[0x7D].isNaN)
        #expect(e5m2[0x7B] == 57344)
        #expect(e5m2[0x3C] == 1)
        #expect(e5m2[0x01] == 0x1p-16)
        let e8m0 = FloatBits.f8E8M0Table
        #expect(e8m0[127] == 1 && e8m0[0] == 0x1p-127 && e8m0[254] == 0x1p127 && e8m0[255].isNaN)
        let e4fnuz = FloatBits.f8E4M3FNUZTable
        #expect(e4fnuz[0x80].isNaN && e4fnuz[0x40] == 1 && e4fnuz[0x7F] == 240)
        let e5fnuz = FloatBits.f8E5M2FNUZTable
        #expect(e5fnuz[0x80].isNaN && e5fnuz[0x40] == 1 && e5fnuz[0x7F] == 57344)
        #expect(e5fnuz.filter(\.isNaN).count == 1 && e4fnuz.filter(\.isNaN).count == 1)
        #expect(e5m2.filter(\.isInfinite).count == 2 && e4m3.filter(\.isInfinite).isEmpty)
    }
}
