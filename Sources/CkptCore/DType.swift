/// Element types. The cases and raw values are the safetensors dtype strings; `C128` is an extra that NumPy files
/// can carry (complex128) and safetensors cannot.
///
/// Declaration order matches the safetensors crate's `Dtype` enum (increasing alignment), which its writer uses to
/// order tensors: see ``safetensorsRank``.
public enum DType: String, CaseIterable, Sendable, Hashable {
    case bool = "BOOL"
    case f4 = "F4"
    case f6E2M3 = "F6_E2M3"
    case f6E3M2 = "F6_E3M2"
    case u8 = "U8"
    case i8 = "I8"
    case f8E5M2 = "F8_E5M2"
    case f8E4M3 = "F8_E4M3"
    case f8E8M0 = "F8_E8M0"
    case f8E4M3FNUZ = "F8_E4M3FNUZ"
    case f8E5M2FNUZ = "F8_E5M2FNUZ"
    case i16 = "I16"
    case u16 = "U16"
    case f16 = "F16"
    case bf16 = "BF16"
    case i32 = "I32"
    case u32 = "U32"
    case f32 = "F32"
    case c64 = "C64"
    case f64 = "F64"
    case i64 = "I64"
    case u64 = "U64"
    case c128 = "C128"

    /// Parses a safetensors dtype string (exact, case-sensitive, as the reference reader does).
    public init?(safetensorsName name: String) {
        guard let value = DType(rawValue: name), value.isSafetensorsType else { return nil }
        self = value
    }

    /// Parses a user-supplied dtype name: the safetensors spelling in any case, plus common aliases.
    public init?(userName: String) {
        let upper = userName.uppercased()
        if let value = DType(rawValue: upper) { self = value; return }
        switch userName.lowercased() {
        case "float32", "fp32": self = .f32
        case "float16", "fp16", "half": self = .f16
        case "bfloat16": self = .bf16
        case "float64", "fp64", "double": self = .f64
        default: return nil
        }
    }

    public var name: String { rawValue }

    /// Bits per element. Sub-byte types (F4, F6) pack elements; a tensor's byte count is `elements × bits / 8`.
    public var bitWidth: Int {
        switch self {
        case .f4: return 4
        case .f6E2M3, .f6E3M2: return 6
        case .bool, .u8, .i8, .f8E5M2, .f8E4M3, .f8E8M0, .f8E4M3FNUZ, .f8E5M2FNUZ: return 8
        case .i16, .u16, .f16, .bf16: return 16
        case .i32, .u32, .f32: return 32
        case .c64, .f64, .i64, .u64: return 64
        case .c128: return 128
        }
    }

    /// Bytes per element for whole-byte types; nil for F4/F6.
    public var byteWidth: Int? { bitWidth % 8 == 0 ? bitWidth / 8 : nil }

    /// Whether safetensors files may carry this dtype.
    public var isSafetensorsType: Bool { self != .c128 }

    /// Real floating-point types whose values `convert --dtype` may change. Sub-byte floats are carried unchanged.
    public var isConvertibleFloat: Bool {
        switch self {
        case .f16, .bf16, .f32, .f64, .f8E5M2, .f8E4M3, .f8E8M0, .f8E4M3FNUZ, .f8E5M2FNUZ: return true
        default: return false
        }
    }

    /// Types that ckpt can decode to Float64 for comparison.
    public var isNumeric: Bool {
        switch self {
        case .f4, .f6E2M3, .f6E3M2, .c64, .c128: return false
        default: return true
        }
    }

    /// Rank used by the safetensors writer: tensors are ordered by this, descending, then by name.
    public var safetensorsRank: Int { DType.allCases.firstIndex(of: self)! }
}
