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
    public var sqnr: Double {
        errorEnergy == 0 ? .infinity : 10 * log10(signalEnergy / errorEnergy)
    }

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
                                // Methods that search cost more per weight: smaller chunks keep both cores busy.
                                let minimumRows = max(1, (settings.method == .rtn ? 1 << 16 : 1 << 13) / cols)
                                Parallel.forEachChunk(count: rows, minimumChunk: minimumRows) { range in
                                    let codes = UnsafeMutablePointer<UInt8>.allocate(capacity: cols)
                                    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: groupSize)
                                    defer { codes.deallocate(); scratch.deallocate() }
                                    for r in range {
                                        let row = w + r * cols
                                        var signal: Double = 0
                                        for j in 0..<cols { signal += Double(row[j] * row[j]) }
                                        var error: Double = 0
                                        var largest: Float = 0
                                        for g in 0..<groups {
                                            let (p, squared, maxError) = quantizer.quantize(
                                                row + g * groupSize, groupSize, codes: codes + g * groupSize, scratch: scratch)
                                            out.1[r * groups + g] = p.scale
                                            out.2[r * groups + g] = p.offset
                                            error += squared
                                            largest = max(largest, maxError)
                                        }
                                        BitPacking.pack(codes, count: cols, bits: settings.bits, into: out.0 + r * wordsPerRow)
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
