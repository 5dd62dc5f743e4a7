import CkptCore

/// The ggml tensor types ckpt reads from GGUF files (ids as in ggml's `enum ggml_type`). Ids ggml knows but ckpt
/// does not (IQ*, Q2_K…, TQ*, MXFP4) are refused by the reader with the tensor's name and the id.
public enum GGMLType: UInt32, Sendable, CaseIterable {
    case f32 = 0
    case f16 = 1
    case q4_0 = 2
    case q4_1 = 3
    case q5_0 = 6
    case q5_1 = 7
    case q8_0 = 8
    case q4_K = 12
    case q6_K = 14
    case i8 = 24
    case i16 = 25
    case i32 = 26
    case i64 = 27
    case f64 = 28
    case bf16 = 30

    /// ggml's spelling (`ggml_type_name`): `F32`, `Q4_0`, `Q6_K`, `BF16`…
    public var name: String {
        switch self {
        case .f32: return "F32"
        case .f16: return "F16"
        case .q4_0: return "Q4_0"
        case .q4_1: return "Q4_1"
        case .q5_0: return "Q5_0"
        case .q5_1: return "Q5_1"
        case .q8_0: return "Q8_0"
        case .q4_K: return "Q4_K"
        case .q6_K: return "Q6_K"
        case .i8: return "I8"
        case .i16: return "I16"
        case .i32: return "I32"
        case .i64: return "I64"
        case .f64: return "F64"
        case .bf16: return "BF16"
        }
    }

    /// Parses a name as ``name`` spells it, in any case.
    public init?(name: String) {
        guard let type = GGMLType.allCases.first(where: { $0.name == name.uppercased() }) else { return nil }
        self = type
    }

    /// Elements per block: 1 for plain types, 32 for Q4_0…Q8_0, 256 for the K-quant super-blocks.
    public var blockSize: Int {
        switch self {
        case .q4_0, .q4_1, .q5_0, .q5_1, .q8_0: return 32
        case .q4_K, .q6_K: return 256
        default: return 1
        }
    }

    /// Bytes per block (`ggml_type_size`); for plain types, bytes per element.
    public var bytesPerBlock: Int {
        switch self {
        case .f32, .i32: return 4
        case .f16, .bf16, .i16: return 2
        case .i8: return 1
        case .i64, .f64: return 8
        case .q4_0: return 18  // f16 d + 16 bytes of nibbles
        case .q4_1: return 20  // f16 d, f16 m + 16 bytes of nibbles
        case .q5_0: return 22  // f16 d + 4 bytes of high bits + 16 bytes of nibbles
        case .q5_1: return 24  // f16 d, f16 m + 4 + 16
        case .q8_0: return 34  // f16 d + 32 int8
        case .q4_K: return 144  // f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
        case .q6_K: return 210  // 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, f16 d
        }
    }

    /// Bits of one code (the element width for plain types).
    public var bits: Int {
        switch self {
        case .f32, .i32: return 32
        case .f16, .bf16, .i16: return 16
        case .i8, .q8_0: return 8
        case .i64, .f64: return 64
        case .q4_0, .q4_1, .q4_K: return 4
        case .q5_0, .q5_1: return 5
        case .q6_K: return 6
        }
    }

    /// Block-quantized: the file holds codes and scales, ckpt dequantizes them to F32 on load.
    public var isQuantized: Bool { blockSize > 1 }

    /// Whether the code grid is centred on zero (no per-block minimum is stored).
    public var isSymmetric: Bool {
        switch self {
        case .q4_1, .q5_1, .q4_K: return false
        default: return true
        }
    }

    /// The dtype of a plain (unquantized) type; nil for block types.
    public var plainDType: DType? {
        switch self {
        case .f32: return .f32
        case .f16: return .f16
        case .bf16: return .bf16
        case .f64: return .f64
        case .i8: return .i8
        case .i16: return .i16
        case .i32: return .i32
        case .i64: return .i64
        default: return nil
        }
    }

    /// The GGUF type holding `dtype` unchanged; nil where GGUF has none (unsigned integers, BOOL, F8, complex).
    public init?(plain dtype: DType) {
        guard let type = GGMLType.allCases.first(where: { $0.plainDType == dtype }) else { return nil }
        self = type
    }

    /// Bytes of `elements` values, which must be a whole number of blocks; nil on overflow.
    public func byteCount(elements: Int) -> Int? {
        guard elements >= 0, elements % blockSize == 0 else { return nil }
        let (bytes, overflow) = (elements / blockSize).multipliedReportingOverflow(by: bytesPerBlock)
        return overflow ? nil : bytes
    }

    /// `general.file_type` values (llama.cpp's `LlamaFileType`): the type most weights of a file have.
    public enum FileType: UInt32, Sendable, CaseIterable {
        case allF32 = 0
        case mostlyF16 = 1
        case mostlyQ4_0 = 2
        case mostlyQ4_1 = 3
        case mostlyQ8_0 = 7
        case mostlyQ5_0 = 8
        case mostlyQ5_1 = 9
        case mostlyQ4_K_M = 15
        case mostlyQ6_K = 18
        case mostlyBF16 = 32

        /// The file type of a file whose weights are all `type`; nil where llama.cpp has no such entry.
        public init?(_ type: GGMLType) {
            switch type {
            case .f32: self = .allF32
            case .f16: self = .mostlyF16
            case .bf16: self = .mostlyBF16
            case .q4_0: self = .mostlyQ4_0
            case .q4_1: self = .mostlyQ4_1
            case .q5_0: self = .mostlyQ5_0
            case .q5_1: self = .mostlyQ5_1
            case .q8_0: self = .mostlyQ8_0
            case .q4_K: self = .mostlyQ4_K_M
            case .q6_K: self = .mostlyQ6_K
            default: return nil
            }
        }
    }
}
