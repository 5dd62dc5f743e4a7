import CkptCore
import Testing

@Suite("Bulk conversion")
struct DTypeConversionTests {
    func randomFloats(_ count: Int, seed: UInt64) -> [Float] {
        var state = seed
        return (0..<count).map { _ in
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Float(Int32(truncatingIfNeeded: state >> 32)) / Float(Int32.max) * 70000
        }
    }

    func convert(_ values: [Float], to target: DType, offset: Int = 0, parallel: Bool = false) -> [UInt8] {
        var raw = [UInt8](repeating: 0, count: offset) + values.withUnsafeBytes { Array($0) }
        var out = [UInt8](repeating: 0, count: values.count * target.byteWidth!)
        raw.withUnsafeMutableBytes { src in
            out.withUnsafeMutableBytes { dst in
                if parallel {
                    DTypeConversion.convertParallel(from: .f32, to: target, count: values.count, source: src.baseAddress! + offset, destination: dst.baseAddress!)
                } else {
                    DTypeConversion.convert(from: .f32, to: target, count: values.count, source: src.baseAddress! + offset, destination: dst.baseAddress!)
                }
            }
        }
        return out
    }

    @Test("unaligned, parallel and scalar paths agree with the element-wise reference", arguments: [DType.f16, .bf16])
    func pathsAgree(target: DType) {
        let values = randomFloats(300_001, seed: 7)
        let reference: [UInt8] = values.flatMap { v -> [UInt8] in
            let bits = target == .f16 ? FloatBits.f32ToF16(v) : FloatBits.f32ToBF16(v)
            return [UInt8(bits & 0xFF), UInt8(bits >> 8)]
        }
        #expect(convert(values, to: target) == reference)
        #expect(convert(values, to: target, offset: 1) == reference)
        #expect(convert(values, to: target, parallel: true) == reference)
    }

    @Test("F8/F16/BF16 → F16/BF16 go through an exact F32 decode and round once")
    func chainedConversions() {
        let codes = (0...255).map(UInt8.init)
        var out = [UInt8](repeating: 0, count: 512)
        codes.withUnsafeBytes { src in
            out.withUnsafeMutableBytes { dst in
                DTypeConversion.convert(from: .f8E4M3, to: .f16, count: 256, source: src.baseAddress!, destination: dst.baseAddress!)
            }
        }
        for code in 0..<256 {
            let half = UInt16(out[2 * code]) | UInt16(out[2 * code + 1]) << 8
            let expected = FloatBits.f8E4M3Table[code]
            if expected.isNaN {
                #expect(FloatBits.f16ToF32(half).isNaN)
            } else {
                // Every E4M3 value is exactly representable in F16.
                #expect(FloatBits.f16ToF32(half) == expected, "code \(code)")
            }
        }
    }

    @Test("decodeToDouble reads integers, booleans and floats exactly")
    func decodeToDouble() {
        let ints: [Int64] = [Int64.min, -1, 0, 1 << 52, Int64.max]
        var doubles = [Double](repeating: 0, count: ints.count)
        ints.withUnsafeBytes { src in
            doubles.withUnsafeMutableBufferPointer { DTypeConversion.decodeToDouble(.i64, count: ints.count, source: src.baseAddress!, destination: $0.baseAddress!) }
        }
        #expect(doubles == ints.map(Double.init))
        let bools: [UInt8] = [0, 1, 2, 0]
        var b = [Double](repeating: 0, count: 4)
        bools.withUnsafeBytes { src in
            b.withUnsafeMutableBufferPointer { DTypeConversion.decodeToDouble(.bool, count: 4, source: src.baseAddress!, destination: $0.baseAddress!) }
        }
        #expect(b == [0, 1, 1, 0])
    }

    @Test("conversion support matrix")
    func matrix() {
        #expect(DTypeConversion.canConvert(from: .f8E5M2, to: .bf16))
        #expect(DTypeConversion.canConvert(from: .i32, to: .i32))
        #expect(!DTypeConversion.canConvert(from: .i32, to: .f16))
        #expect(!DTypeConversion.canConvert(from: .f4, to: .f16))
        #expect(!DTypeConversion.canConvert(from: .f32, to: .f8E4M3))
    }
}
