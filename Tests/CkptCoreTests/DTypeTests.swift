import CkptCore
import Testing

@Suite("DType and Shape")
struct DTypeTests {
    @Test("every safetensors dtype string parses and reports its bit width")
    func safetensorsNames() {
        let expected: [String: Int] = [
            "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
            "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
            "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
        ]
        for (name, bits) in expected {
            let dtype = DType(safetensorsName: name)
            #expect(dtype?.bitWidth == bits, "\(name)")
            #expect(dtype?.name == name)
        }
        #expect(DType.allCases.filter(\.isSafetensorsType).count == expected.count)
        #expect(DType(safetensorsName: "C128") == nil)
        #expect(DType(safetensorsName: "f32") == nil, "safetensors names are case-sensitive")
        #expect(DType(safetensorsName: "F8_E3M4") == nil)
    }

    @Test("writer rank follows the reference Dtype enum order")
    func rankOrder() {
        #expect(DType.bool.safetensorsRank < DType.f4.safetensorsRank)
        #expect(DType.f8E5M2FNUZ.safetensorsRank < DType.i16.safetensorsRank)
        #expect(DType.bf16.safetensorsRank < DType.i32.safetensorsRank)
        #expect(DType.c64.safetensorsRank < DType.f64.safetensorsRank)
        #expect(DType.i64.safetensorsRank < DType.u64.safetensorsRank)
    }

    @Test("user names accept aliases")
    func userNames() {
        #expect(DType(userName: "bf16") == .bf16)
        #expect(DType(userName: "float16") == .f16)
        #expect(DType(userName: "F32") == .f32)
        #expect(DType(userName: "nope") == nil)
    }

    @Test("shape counts are overflow-checked")
    func shapeOverflow() throws {
        #expect(try Shape([2, 3, 4]).elementCount() == 24)
        #expect(try Shape([]).elementCount() == 1)
        #expect(try Shape([5, 0]).byteCount(for: .f32) == 0)
        #expect(throws: CkptError.self) { try Shape([Int.max, 2]) }
        do {
            _ = try Shape([1 << 62]).byteCount(for: .f64)
            Issue.record("expected overflow")
        } catch {
            #expect(error.code == .overflow)
        }
        #expect(throws: CkptError.self) { try Shape([-1]) }
    }

    @Test("sub-byte dtypes must fill whole bytes")
    func subByte() throws {
        #expect(try Shape([4]).byteCount(for: .f4) == 2)
        #expect(try Shape([4]).byteCount(for: .f6E2M3) == 3)
        do {
            _ = try Shape([3]).byteCount(for: .f4)
            Issue.record("expected misalignedSlice")
        } catch {
            #expect(error.code == .misalignedSlice)
        }
    }
}
