import CkptCore

/// How scale and zero point of each group are chosen.
public enum QuantMethod: String, CaseIterable, Sendable {
    /// Round to nearest with the min–max range, exactly as the target runtime's own quantizer does it.
    case rtn
    /// Clipping search: shrink the range by each candidate factor and keep the one with the least squared error.
    case mse
    /// Half-quadratic quantization for an Lp (p = 0.7) error: scale and bias on the affine grid, the integer zero
    /// point on the zero-point grid, the scale on the symmetric grid.
    case hqq
}

/// The code grid a format can store. All grids use unsigned codes 0…2^bits−1.
public enum QuantGrid: String, Sendable {
    /// MLX affine: `w = scale*q + bias` with a free (continuous) bias; RTN places 0.0 exactly on the grid.
    case mlxAffine = "affine"
    /// compressed-tensors asymmetric: `w = (q - z)*scale` with an integer zero code z; the range includes 0.
    case integerZeroPoint = "asymmetric"
    /// Symmetric: `w = (q - 2^(bits-1))*scale`, scale = absmax / ((2^bits - 1)/2).
    case symmetric
}

public struct QuantizationSettings: Sendable, Equatable {
    public var bits: Int
    /// Weights per scale along the input dimension; nil for one scale per output channel (row).
    public var groupSize: Int?
    public var method: QuantMethod
    public var grid: QuantGrid
    /// The dtype scales and biases are stored in (the weight's dtype): they are rounded to it before codes are final.
    public var scaleType: DType

    public init(bits: Int, groupSize: Int?, method: QuantMethod, grid: QuantGrid, scaleType: DType = .f32) {
        self.bits = bits
        self.groupSize = groupSize
        self.method = method
        self.grid = grid
        self.scaleType = scaleType
    }

    /// The scheme in words, for messages: "4-bit affine codes with F16 scales".
    public var schemeName: String { "\(bits)-bit \(grid.rawValue) codes with \(scaleType.name) scales" }

    public static let supportedBits = [2, 3, 4, 5, 6, 8]
    public static let supportedGroupSizes = [32, 64, 128]
}
