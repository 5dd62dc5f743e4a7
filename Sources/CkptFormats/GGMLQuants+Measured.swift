import CkptCore
#if canImport(Glibc)
import Glibc
#endif

extension GGMLQuants {
    /// How far quantized values are from their F32 source: Σ x², Σ (x − x̂)² (in double) and max |x − x̂|.
    public struct Measurement: Sendable, Equatable {
        public var signalEnergy: Double = 0
        public var errorEnergy: Double = 0
        public var maxError: Float = 0

        public init() {}

        /// Signal-to-quantization-noise ratio in dB (infinite when the reconstruction is exact).
        public var sqnr: Double { errorEnergy == 0 ? .infinity : 10 * log10(signalEnergy / errorEnergy) }

        public mutating func add(_ other: Measurement) {
            signalEnergy += other.signalEnergy
            errorEnergy += other.errorEnergy
            maxError = max(maxError, other.maxError)
        }
    }

    /// Elements per measured unit: whole blocks of every type (K-quant super-blocks are 256), small enough that a
    /// unit's dequantized values stay in L1 between decoding and comparing.
    static let measuredUnit = 4096

    /// ``quantizeParallel(_:source:count:destination:)`` that also measures what it wrote, in the same pass: each
    /// unit of blocks is dequantized into a small scratch right after encoding and compared with its source (Q4_0
    /// and Q8_0 are measured while they are encoded, by the kernels of GGMLQuants+Fused.swift, whose sums are in
    /// float over 32 blocks before they are added in double: relative error ~1e-7). Partial sums are per fixed unit
    /// and added in order, so the result does not depend on the core count.
    ///
    /// Returns the index of the first NaN/Inf element instead when there is one (the blocks are then unspecified).
    ///
    /// `parallel: false` keeps the work on the calling thread, for callers that already run one slice per core.
    public static func quantizeMeasured(
        _ type: GGMLType, source: UnsafePointer<Float>, count: Int, destination: UnsafeMutableRawPointer, parallel: Bool = true
    ) -> (measurement: Measurement, firstNonFinite: Int?) {
        precondition(count >= 0 && count % type.blockSize == 0, "\(count) elements are not whole \(type.name) blocks")
        precondition(type.isQuantized && measuredUnit % type.blockSize == 0)
        let units = (count + measuredUnit - 1) / measuredUnit
        guard units > 0 else { return (Measurement(), nil) }
        return withUnsafeTemporaryAllocation(of: Measurement.self, capacity: units) { partials in
            nonisolated(unsafe) let src = source
            nonisolated(unsafe) let dst = destination
            nonisolated(unsafe) let out = partials.baseAddress!
            let blockSize = type.blockSize, blockBytes = type.bytesPerBlock
            Parallel.forEachChunk(count: units, minimumChunk: parallel ? max(1, (1 << 16) / measuredUnit) : units) { range in
                withUnsafeTemporaryAllocation(byteCount: Swift.max(4 * measuredUnit, fusedScratchBytes), alignment: 64) { scratch in
                    scratch.baseAddress!.initializeMemory(as: UInt8.self, repeating: 0, count: fusedScratchBytes)
                    let restored = scratch.baseAddress!.bindMemory(to: Float.self, capacity: measuredUnit)
                    for unit in range {
                        let start = unit * measuredUnit
                        let n = min(measuredUnit, count - start)
                        let blocks = dst + start / blockSize * blockBytes
                        if hasFusedKernel(type) {
                            (out + unit).initialize(to: quantizeMeasuredFused(type, source: src + start, count: n, destination: blocks, scratch: scratch.baseAddress!))
                        } else {
                            quantize(type, source: src + start, count: n, destination: blocks)
                            dequantize(type, source: UnsafeRawPointer(blocks), count: n, destination: restored)
                            (out + unit).initialize(to: measure(src + start, restored, n))
                        }
                    }
                }
            }
            var total = Measurement()
            for unit in 0..<units {
                let m = partials[unit]
                // x² of a NaN/Inf (or of a float too large to square) is not finite: only then look for the element.
                if !m.signalEnergy.isFinite {
                    let start = unit * measuredUnit
                    for i in start..<min(count, start + measuredUnit) where !source[i].isFinite { return (total, i) }
                }
                total.add(m)
            }
            return (total, nil)
        }
    }

    /// Σ x², Σ (x − y)², max |x − y| over `n` values (a multiple of 8): squares in float as the reference
    /// quantizers' reports compute them, summed in double in four lanes to break the chain of additions.
    @inline(__always)
    static func measure(_ x: UnsafePointer<Float>, _ y: UnsafePointer<Float>, _ n: Int) -> Measurement {
        typealias F4 = SIMD4<Float>
        typealias D2 = SIMD2<Double>
        var s0 = D2(), s1 = D2(), e0 = D2(), e1 = D2()
        var m = F4()
        let xs = UnsafeRawPointer(x), ys = UnsafeRawPointer(y)
        var i = 0
        while i < n {
            for k in 0..<2 {
                let a = xs.loadUnaligned(fromByteOffset: 4 * (i + 4 * k), as: F4.self)
                let d = a - ys.loadUnaligned(fromByteOffset: 4 * (i + 4 * k), as: F4.self)
                let aa = a * a, dd = d * d
                s0 += D2(Double(aa[0]), Double(aa[1]))
                s1 += D2(Double(aa[2]), Double(aa[3]))
                e0 += D2(Double(dd[0]), Double(dd[1]))
                e1 += D2(Double(dd[2]), Double(dd[3]))
                let magnitude = unsafeBitCast(unsafeBitCast(d, to: SIMD4<UInt32>.self) & 0x7FFF_FFFF, to: F4.self)
                m = m.replacing(with: magnitude, where: magnitude .> m)
            }
            i += 8
        }
        var result = Measurement()
        result.signalEnergy = (s0 + s1).sum()
        result.errorEnergy = (e0 + e1).sum()
        result.maxError = m.max()
        return result
    }
}
