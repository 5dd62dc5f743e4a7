import CkptCore
import CkptFormats
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A `[rows, cols]` weight matrix quantized in groups along its columns: codes packed LSB-first per row (the
/// layout MLX and compressed-tensors share), one scale and offset per (row, group), and the error statistics of
/// what is stored.
public struct QuantizedMatrix: Sendable {
    public let rows: Int
    public let cols: Int
    public let settings: QuantizationSettings
    /// Columns per scale (`cols` for per-channel).
    public let groupSize: Int
    public var groups: Int { cols / groupSize }
    public var wordsPerRow: Int { BitPacking.wordCount(codes: cols, bits: settings.bits) }
    /// `rows × wordsPerRow` packed codes.
    public let words: [UInt32]
    /// `rows × groups`, already rounded to the scale dtype.
    public let scales: [Float]
    /// `rows × groups`: the bias (affine grid) or the integer zero code (zero-point grids).
    public let offsets: [Float]
    /// Σ w² and Σ (w − ŵ)² over the matrix (double), and max |w − ŵ|.
    public let signalEnergy: Double
    public let errorEnergy: Double
    public let maxError: Float

    /// Signal-to-quantization-noise ratio in dB (infinite when the reconstruction is exact).
    public var sqnr: Double { Self.sqnr(signal: signalEnergy, error: errorEnergy) }

    /// Quantizes `weights` (`rows*cols` floats, row-major), rows split across cores.
    public static func quantize(
        _ weights: UnsafePointer<Float>, rows: Int, cols: Int, settings: QuantizationSettings
    ) -> QuantizedMatrix {
        let groupSize = settings.groupSize ?? cols
        precondition(cols % groupSize == 0 && rows > 0 && cols > 0)
        let groups = cols / groupSize
        let wordsPerRow = BitPacking.wordCount(codes: cols, bits: settings.bits)
        var words = [UInt32](repeating: 0, count: rows * wordsPerRow)
        var scales = [Float](repeating: 0, count: rows * groups)
        var offsets = [Float](repeating: 0, count: rows * groups)
        var rowSignal = [Double](repeating: 0, count: rows)
        var rowError = [Double](repeating: 0, count: rows)
        var rowMax = [Float](repeating: 0, count: rows)
        let quantizer = GroupQuantizer(settings)
        nonisolated(unsafe) let w = weights
        words.withUnsafeMutableBufferPointer { wordsBuffer in
            scales.withUnsafeMutableBufferPointer { scaleBuffer in
                offsets.withUnsafeMutableBufferPointer { offsetBuffer in
                    rowSignal.withUnsafeMutableBufferPointer { signalBuffer in
                        rowError.withUnsafeMutableBufferPointer { errorBuffer in
                            rowMax.withUnsafeMutableBufferPointer { maxBuffer in
                                nonisolated(unsafe) let out = (wordsBuffer.baseAddress!, scaleBuffer.baseAddress!, offsetBuffer.baseAddress!,
                                                               signalBuffer.baseAddress!, errorBuffer.baseAddress!, maxBuffer.baseAddress!)
                                Parallel.forEachChunk(count: rows, minimumChunk: minimumRows(cols: cols, method: settings.method)) { range in
                                    let codes = UnsafeMutablePointer<UInt8>.allocate(capacity: cols)
                                    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: groupSize)
                                    defer { codes.deallocate(); scratch.deallocate() }
                                    for r in range {
                                        guard let (signal, error, largest) = quantizeRow(
                                            w + r * cols, cols: cols, groupSize: groupSize, quantizer: quantizer, codes: codes, scratch: scratch,
                                            scales: out.1 + r * groups, offsets: out.2 + r * groups, words: out.0 + r * wordsPerRow, values: nil)
                                        else { preconditionFailure("row \(r) holds NaN/Inf: check the weights first (QuantizationPlan.loadFinite)") }
                                        out.3[r] = signal
                                        out.4[r] = error
                                        out.5[r] = largest
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        return QuantizedMatrix(
            rows: rows, cols: cols, settings: settings, groupSize: groupSize, words: words, scales: scales, offsets: offsets,
            signalEnergy: rowSignal.reduce(0, +), errorEnergy: rowError.reduce(0, +), maxError: rowMax.max() ?? 0)
    }

    /// Rows per worker below which threads cost more than they save: methods that search cost more per weight,
    /// so smaller chunks keep every core busy.
    static func minimumRows(cols: Int, method: QuantMethod) -> Int {
        max(1, (method == .rtn ? 1 << 16 : 1 << 13) / cols)
    }

    /// SQNR in dB of a signal energy against an error energy (infinite when the error is zero).
    public static func sqnr(signal: Double, error: Double) -> Double {
        error == 0 ? .infinity : 10 * log10(signal / error)
    }

    /// Quantizes one row of `cols` weights group by group: the groups' stored scales and offsets, and the row's
    /// packed codes (`words`) and/or its dequantized values as the runtime computes them (`values`). Returns
    /// Σ w², Σ (w − ŵ)² and max |w − ŵ| of the row, or nil (before quantizing anything) when the row holds a
    /// NaN/Inf, which no scale can represent. The error is +∞ when finite weights give a non-finite stored value
    /// (a range wider than the scheme holds).
    @inline(__always)
    static func quantizeRow(
        _ row: UnsafePointer<Float>, cols: Int, groupSize: Int, quantizer: GroupQuantizer,
        codes: UnsafeMutablePointer<UInt8>, scratch: UnsafeMutablePointer<Float>,
        scales: UnsafeMutablePointer<Float>, offsets: UnsafeMutablePointer<Float>,
        words: UnsafeMutablePointer<UInt32>?, values: UnsafeMutablePointer<Float>?
    ) -> (signal: Double, error: Double, largest: Float)? {
        // Four partial sums: one chain of double additions would cost more than the rest of this loop.
        var s0: Double = 0, s1: Double = 0, s2: Double = 0, s3: Double = 0
        var j = 0
        while j + 4 <= cols {
            s0 += Double(row[j] * row[j])
            s1 += Double(row[j + 1] * row[j + 1])
            s2 += Double(row[j + 2] * row[j + 2])
            s3 += Double(row[j + 3] * row[j + 3])
            j += 4
        }
        while j < cols {
            s0 += Double(row[j] * row[j])
            j += 1
        }
        let signal = (s0 + s1) + (s2 + s3)
        // The square of a NaN/Inf is not finite: only then look for one (a finite weight too large to square
        // lands here too, and is quantized).
        if !signal.isFinite {
            for j in 0..<cols where !row[j].isFinite { return nil }
        }
        var error: Double = 0
        var largest: Float = 0
        for g in 0..<cols / groupSize {
            let (p, squared, maxError) = quantizer.quantize(row + g * groupSize, groupSize, codes: codes + g * groupSize, scratch: scratch)
            scales[g] = p.scale
            offsets[g] = p.offset
            error += squared
            largest = max(largest, maxError)
            if let values {
                for j in g * groupSize..<(g + 1) * groupSize { values[j] = quantizer.value(Float(codes[j]), p) }
            }
        }
        if let words { BitPacking.pack(codes, count: cols, bits: quantizer.settings.bits, into: words) }
        if !signal.isFinite || !error.isFinite {
            let stored = { (j: Int) -> Float in
                quantizer.stored(quantizer.value(Float(codes[j]), GroupParameters(scale: scales[j / groupSize], offset: offsets[j / groupSize])))
            }
            return exactStatistics(row, count: cols, stored: stored) ?? (signal, .infinity, .infinity)
        }
        return (signal, error, largest)
    }

    /// Σ w², Σ (w − ŵ)² and max |w − ŵ| from products taken in double, for the rare row or matrix whose float
    /// squares overflowed (finite weights beyond ~1e19); nil when a stored value ŵ is itself not finite, i.e. the
    /// range is wider than the scheme holds and the file would dequantize to Inf/NaN.
    static func exactStatistics(
        _ weights: UnsafePointer<Float>, count: Int, stored: (Int) -> Float
    ) -> (signal: Double, error: Double, largest: Float)? {
        var signal: Double = 0, error: Double = 0
        var largest: Float = 0
        for k in 0..<count {
            let value = stored(k)
            guard value.isFinite else { return nil }
            let w = Double(weights[k]), d = w - Double(value)
            signal += w * w
            error += d * d
            largest = max(largest, Float(abs(d)))
        }
        return (signal, error, largest)
    }

    /// The dequantized matrix as the target runtime computes it, into `destination` (`rows*cols` floats).
    public func dequantize(into destination: UnsafeMutablePointer<Float>) {
        let quantizer = GroupQuantizer(settings)
        nonisolated(unsafe) let out = destination
        let (cols, groups, groupSize, wordsPerRow, bits) = (cols, groups, groupSize, wordsPerRow, settings.bits)
        words.withUnsafeBufferPointer { wordsBuffer in
            nonisolated(unsafe) let packed = wordsBuffer.baseAddress!
            Parallel.forEachChunk(count: rows, minimumChunk: max(1, 65536 / cols)) { range in
                let codes = UnsafeMutablePointer<UInt8>.allocate(capacity: cols)
                defer { codes.deallocate() }
                for r in range {
                    BitPacking.unpack(packed + r * wordsPerRow, count: cols, bits: bits, into: codes)
                    for j in 0..<cols {
                        let k = r * groups + j / groupSize
                        out[r * cols + j] = quantizer.value(Float(codes[j]), GroupParameters(scale: scales[k], offset: offsets[k]))
                    }
                }
            }
        }
    }

    /// Bytes the codes take when packed (rows × words × 4).
    public var packedBytes: Int { words.count * 4 }
}
