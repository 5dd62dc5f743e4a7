import CkptCore

/// The integer grid a weight matrix `[rows × cols]` was quantized on, one scale and zero point per output row:
/// `w = (q − zeroPoints[r])·scales[r]` with codes `q ∈ 0…2^bits − 1` and zero points in the same code units
/// (integers; RepQ-ViT's percentile grid may put one outside the code range). Weight + activation calibration
/// records it for every matrix it quantizes, so integer layouts (compressed-tensors `int-quantized`) can store the
/// codes of the values it wrote.
public struct WeightGrid: Sendable, Equatable {
    public let bits: Int
    public let rows: Int
    public let cols: Int
    public let scales: [Float]
    public let zeroPoints: [Float]

    public init(bits: Int, rows: Int, cols: Int, scales: [Float], zeroPoints: [Float]) {
        precondition(scales.count == rows && zeroPoints.count == rows, "one scale and zero point per row")
        self.bits = bits
        self.rows = rows
        self.cols = cols
        self.scales = scales
        self.zeroPoints = zeroPoints
    }

    /// Rows `range` of this grid (a fused matrix split into its parts, e.g. q, k and v).
    public func rows(_ range: Range<Int>) -> WeightGrid {
        WeightGrid(bits: bits, rows: range.count, cols: cols, scales: Array(scales[range]), zeroPoints: Array(zeroPoints[range]))
    }

    /// The codes of `values` (`rows × cols`, each on this grid): `q = round(w/Δ) + zp`, checked to give `w` back
    /// bit for bit as `(q − zp)·Δ` and to lie in `0…2^bits − 1`; `name` and `path` name the tensor in errors.
    public func codes(of values: [Float], name: String, path: String?) throws(CkptError) -> [Int32] {
        guard values.count == rows * cols else {
            throw CkptError(.shapeMismatch, "\(values.count) values for a \(rows)×\(cols) weight grid", path: path, tensor: name)
        }
        let top = Float((1 << bits) - 1)
        var codes = [Int32](repeating: 0, count: values.count)
        for r in 0..<rows {
            let scale = scales[r], zero = zeroPoints[r]
            for j in 0..<cols {
                let w = values[r * cols + j]
                let q = (w / scale).rounded(.toNearestOrEven) + zero
                guard q >= 0, q <= top, (q - zero) * scale == w else {
                    throw CkptError(.invalidData, "row \(r), column \(j): \(w) is not on the row's \(bits)-bit grid (scale \(scale), zero point \(zero))",
                        path: path, tensor: name)
                }
                codes[r * cols + j] = Int32(q)
            }
        }
        return codes
    }
}
