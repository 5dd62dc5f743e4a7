import CkptCore

/// RepQ-ViT's calibration rule, shared by ``UniformQuantizer`` and ``LogSqrt2Quantizer``: try the clipping range
/// given by each percentile in ``percentiles`` and keep the one whose fake-quantized values have the least mean
/// squared error over the calibration values (the first on a tie, as the reference's strict `<`).
public enum PercentileSearch {
    /// The candidates, in the reference's order.
    public static let percentiles: [Double] = [0.999, 0.9999, 0.99999]

    /// What the search chose for one tensor or channel.
    public struct Choice: Sendable, Equatable {
        /// The winning percentile (one of ``PercentileSearch/percentiles``).
        public var percentile: Double
        /// `mean((x − x̂)²)` of the winner, accumulated in double.
        public var meanSquaredError: Double

        public init(percentile: Double, meanSquaredError: Double) {
            self.percentile = percentile
            self.meanSquaredError = meanSquaredError
        }
    }

    /// Candidate percentiles must lie in (0.5, 1] (1 is the min–max range) and be at least one.
    static func check(_ percentiles: [Double]) throws(CkptError) {
        guard !percentiles.isEmpty, percentiles.allSatisfy({ $0 > 0.5 && $0 <= 1 }) else {
            throw CkptError(.invalidArgument, "percentile candidates \(percentiles) must be in (0.5, 1]")
        }
    }

    /// Refuses calibration data the search cannot use: no values, or NaN/±Inf (the reference would propagate NaN
    /// into Δ). `what` names the data in the message.
    static func checkFinite(_ values: UnsafeBufferPointer<Float>, _ what: @autoclosure () -> String) throws(CkptError) {
        guard !values.isEmpty else { throw CkptError(.invalidArgument, "\(what()): no calibration values") }
        for (i, v) in values.enumerated() where !v.isFinite {
            throw CkptError(.nonFinite, "\(what()): calibration value \(i) is \(v)")
        }
    }

    /// Bytes of one float scratch buffer of `count` values, overflow-checked.
    static func scratchBytes(_ count: Int) throws(CkptError) -> Int {
        try CheckedSize.product([count, MemoryLayout<Float>.stride], "calibration scratch")
    }

    /// Σ over eight-lane blocks of `count` values of `lane(x)`, each block summed in float lanes and the blocks in
    /// double: the squared-error sums of the searches (order-free, so they may run over a permuted copy).
    @inline(__always)
    static func sum(_ x: UnsafePointer<Float>, _ count: Int, _ lane: (SIMD8<Float>) -> SIMD8<Float>, _ scalar: (Float) -> Float) -> Double {
        var total: Double = 0
        var j = 0
        let raw = UnsafeRawPointer(x)
        while j + 8 <= count {
            // Flush the float lanes every 1024 values so their rounding stays at float32 relative precision.
            var lanes = SIMD8<Float>()
            let end = min(count - count % 8, j + 1024)
            while j < end {
                lanes += lane(raw.loadUnaligned(fromByteOffset: j * 4, as: SIMD8<Float>.self))
                j += 8
            }
            total += Double(lanes.sum())
        }
        while j < count {
            total += Double(scalar(x[j]))
            j += 1
        }
        return total
    }
}
