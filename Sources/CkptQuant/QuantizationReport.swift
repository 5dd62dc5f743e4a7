import CkptCore
import CkptFormats
import Synchronization

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

    /// The report with the SQNR and largest error each quantized tensor's producer recorded while it was written.
    init(tensors: [TensorReport], measured: TensorMeasurements, inputBytes: Int) {
        let values = measured.values.withLock { $0 }
        self.init(tensors: tensors.map { report in
            var report = report
            if let m = values[report.name] {
                report.sqnr = m.sqnr
                report.maxError = m.maxError
            }
            return report
        }, inputBytes: inputBytes)
    }

    public var outputBytes: Int { tensors.reduce(0) { $0 + $1.outputBytes } }
    public var quantized: [TensorReport] { tensors.filter { $0.scheme != nil } }
    public var quantizedWeights: Int { quantized.reduce(0) { $0 + $1.elements } }
    /// Stored bits per quantized weight, scales and offsets included.
    public var bitsPerWeight: Double {
        quantizedWeights == 0 ? 0 : Double(quantized.reduce(0) { $0 + $1.outputBytes }) * 8 / Double(quantizedWeights)
    }
    /// Mean of the quantized tensors' SQNR in dB (0 when none has one).
    public var meanSQNR: Double {
        let values = quantized.compactMap(\.sqnr)
        return values.isEmpty ? 0 : values.reduce(0, +) / Double(values.count)
    }
    /// Bits per parameter over the whole checkpoint.
    public var overallBitsPerWeight: Double {
        let all = tensors.reduce(0) { $0 + $1.elements }
        return all == 0 ? 0 : Double(outputBytes) * 8 / Double(all)
    }
}

/// SQNR and largest error per tensor, recorded by the writers' producers (which run on the writing threads) while
/// the file is written.
final class TensorMeasurements: Sendable {
    fileprivate let values = Mutex<[String: (sqnr: Double, maxError: Float)]>([:])

    func record(_ name: String, sqnr: Double, maxError: Float) {
        values.withLock { $0[name] = (sqnr, maxError) }
    }
}
