import CkptCore
import CkptFormats

/// One line of `ckpt quantize`'s report.
public struct TensorReport: Sendable {
    public var name: String
    public var shape: Shape
    /// The layout label (`mlx-affine 4-bit g64`, `Q4_0`), or nil when the tensor was kept.
    public var scheme: String?
    public var bits: Int?
    public var groupSize: Int?
    public var sqnr: Double?
    public var maxError: Float?
    public var keptReason: String?
    /// Bytes the tensor takes in the output (codes + scales + offsets for quantized ones).
    public var outputBytes: Int
    public var elements: Int
}

/// The per-tensor report plus totals: sizes before/after and bits per quantized weight.
public struct QuantizationReport: Sendable {
    public var tensors: [TensorReport]
    public var inputBytes: Int
    public var seconds: Double = 0

    public init(tensors: [TensorReport], inputBytes: Int) {
        self.tensors = tensors
        self.inputBytes = inputBytes
    }

    public var outputBytes: Int { tensors.reduce(0) { $0 + $1.outputBytes } }
    public var quantized: [TensorReport] { tensors.filter { $0.scheme != nil } }
    public var quantizedWeights: Int { quantized.reduce(0) { $0 + $1.elements } }
    /// Stored bits per quantized weight, scales and offsets included.
    public var bitsPerWeight: Double {
        quantizedWeights == 0 ? 0 : Double(quantized.reduce(0) { $0 + $1.outputBytes }) * 8 / Double(quantizedWeights)
    }
    /// Bits per parameter over the whole checkpoint.
    public var overallBitsPerWeight: Double {
        let all = tensors.reduce(0) { $0 + $1.elements }
        return all == 0 ? 0 : Double(outputBytes) * 8 / Double(all)
    }
}
