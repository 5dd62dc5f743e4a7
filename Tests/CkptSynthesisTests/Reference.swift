import CkptCore
import CkptFormats
import Testing

/// `fixtures/synthesis/reference.npz` (made by `fixtures/synthesis/generate.py` with torch 2.13), and the
/// finite-difference and comparison helpers the synthesis tests share.
enum Reference {
    static let root: String = {
        var path = #filePath
        for _ in 0..<3 { path = FilePaths.directory(of: path) }
        return path
    }()

    static let entries: [String: TensorEntry] = {
        let checkpoint = try! Checkpoint.open(root + "/fixtures/synthesis/reference.npz")
        return Dictionary(uniqueKeysWithValues: checkpoint.tensors.map { ($0.name, $0) })
    }()

    static func shape(_ name: String) throws -> [Int] {
        try #require(entries[name], "missing \(name)").shape.dims
    }

    /// A stored F64 or F32 array, as Double.
    static func doubles(_ name: String) throws -> [Double] {
        let entry = try #require(entries[name], "missing \(name)")
        let bytes = try entry.load()
        let count = entry.shape.elements
        return try bytes.withUnsafeBytes { raw in
            switch entry.dtype {
            case .f64: return (0..<count).map { raw.loadUnaligned(fromByteOffset: $0 * 8, as: Double.self) }
            case .f32: return (0..<count).map { Double(raw.loadUnaligned(fromByteOffset: $0 * 4, as: Float.self)) }
            case .i64: return (0..<count).map { Double(raw.loadUnaligned(fromByteOffset: $0 * 8, as: Int64.self)) }
            default: throw CkptError(.unsupportedDType, "\(name) is \(entry.dtype)")
            }
        }
    }

    static func floats(_ name: String) throws -> [Float] { try doubles(name).map { Float($0) } }

    static func scalar(_ name: String) throws -> Double { try #require(try doubles(name).first) }

    /// The largest |a − b| / (1 + |b|).
    static func maxError<T: BinaryFloatingPoint>(_ a: [T], _ b: [T]) -> Double {
        precondition(a.count == b.count, "lengths differ: \(a.count) vs \(b.count)")
        var worst = 0.0
        for (x, y) in zip(a, b) {
            let e = abs(Double(x) - Double(y)) / (1 + abs(Double(y)))
            worst = max(worst, e.isNaN ? .infinity : e)
        }
        return worst
    }

    /// Central finite differences of `f` at `x`, for every coordinate (step `h`).
    static func numericalGradient(_ x: [Double], step h: Double = 1e-6, _ f: ([Double]) -> Double) -> [Double] {
        var probe = x
        return (0..<x.count).map { i in
            probe[i] = x[i] + h
            let plus = f(probe)
            probe[i] = x[i] - h
            let minus = f(probe)
            probe[i] = x[i]
            return (plus - minus) / (2 * h)
        }
    }

    /// Deterministic test values in (−scale, scale), independent of the code under test.
    static func values(_ count: Int, seed: UInt64, scale: Double = 1) -> [Double] {
        var state = seed
        return (0..<count).map { _ in
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return (Double(state >> 11) / 9_007_199_254_740_992 * 2 - 1) * scale
        }
    }

    static func dot(_ a: [Double], _ b: [Double]) -> Double { zip(a, b).reduce(0) { $0 + $1.0 * $1.1 } }
}
