import CCkptOpenBLAS
import CkptCore
import CkptFormats
import CkptKernels
import Dispatch

/// How one tensor differs between two checkpoints. Values are compared in double precision, whatever the dtypes.
public struct TensorComparison: Sendable {
    public let name: String
    public let dtypeA: DType
    public let dtypeB: DType
    public let shapeA: Shape
    public let shapeB: Shape
    /// Largest |a − b| over positions where both are finite.
    public let maxAbsError: Double
    /// ‖a − b‖₂ / ‖a‖₂.
    public let relativeError: Double
    /// a·b / (‖a‖₂‖b‖₂); 1 when both are all zeros.
    public let cosine: Double
    /// Signal-to-quantisation-noise ratio 10·log10(‖a‖² / ‖a − b‖²) in dB; +∞ when identical.
    public let sqnrDB: Double
    /// Positions where one side is NaN/±Inf and the other is not the same non-finite value.
    public let nonFiniteMismatches: Int
    /// For dtypes without numeric values (F4, F6, complex): whether the bytes are identical.
    public let bytesIdentical: Bool?

    public var shapesMatch: Bool { shapeA == shapeB }

    public func isEqual(tolerance: Double) -> Bool {
        guard shapesMatch else { return false }
        if let bytesIdentical { return bytesIdentical }
        return nonFiniteMismatches == 0 && maxAbsError <= tolerance
    }
}

public struct CheckpointComparison: Sendable {
    public let tensors: [TensorComparison]
    public let onlyInA: [String]
    public let onlyInB: [String]

    public func isEqual(tolerance: Double) -> Bool {
        onlyInA.isEmpty && onlyInB.isEmpty && tensors.allSatisfy { $0.isEqual(tolerance: tolerance) }
    }
}

public enum Comparison {
    /// Compares every tensor both checkpoints hold (in A's order), in parallel across cores.
    public static func compare(_ a: Checkpoint, _ b: Checkpoint) throws(CkptError) -> CheckpointComparison {
        let indexB = Dictionary(b.tensors.enumerated().map { (NameKey($1.name), $0) }, uniquingKeysWith: { x, _ in x })
        let namesA = Set(a.tensors.map { NameKey($0.name) })
        let pairs = a.tensors.compactMap { t in indexB[NameKey(t.name)].map { (t, b.tensors[$0]) } }
        let results = UnsafeMutableBufferPointer<Result<TensorComparison, CkptError>?>.allocate(capacity: pairs.count)
        results.initialize(repeating: nil)
        defer { results.deallocate() }
        nonisolated(unsafe) let slots = results
        // One tensor per worker; BLAS stays single-threaded inside each so the two pools do not fight.
        let next = Counter()
        BLAS.withThreads(1) {
            DispatchQueue.concurrentPerform(iterations: min(Parallel.coreCount, max(pairs.count, 1))) { _ in
                while true {
                    let i = next.take()
                    guard i < pairs.count else { return }
                    do throws(CkptError) {
                        slots[i] = .success(try compare(pairs[i].0, pairs[i].1))
                    } catch {
                        slots[i] = .failure(error)
                    }
                }
            }
        }
        var tensors: [TensorComparison] = []
        for slot in results {
            switch slot! {
            case .success(let c): tensors.append(c)
            case .failure(let e): throw e
            }
        }
        return CheckpointComparison(
            tensors: tensors,
            onlyInA: a.tensors.map(\.name).filter { indexB[NameKey($0)] == nil },
            onlyInB: b.tensors.map(\.name).filter { !namesA.contains(NameKey($0)) })
    }

    /// Compares two tensors.
    public static func compare(_ a: TensorEntry, _ b: TensorEntry) throws(CkptError) -> TensorComparison {
        guard a.shape == b.shape else {
            return TensorComparison(
                name: a.name, dtypeA: a.dtype, dtypeB: b.dtype, shapeA: a.shape, shapeB: b.shape,
                maxAbsError: .infinity, relativeError: .infinity, cosine: 0, sqnrDB: -.infinity, nonFiniteMismatches: 0, bytesIdentical: nil)
        }
        let bytesA = try a.load(), bytesB = try b.load()
        defer { bytesA.doneReading(); bytesB.doneReading() }
        guard a.dtype.isNumeric && b.dtype.isNumeric else {
            let same = a.dtype == b.dtype && bytesA.withUnsafeBytes { x in bytesB.withUnsafeBytes { y in x.elementsEqual(y) } }
            return TensorComparison(
                name: a.name, dtypeA: a.dtype, dtypeB: b.dtype, shapeA: a.shape, shapeB: b.shape,
                maxAbsError: same ? 0 : .nan, relativeError: same ? 0 : .nan, cosine: same ? 1 : .nan,
                sqnrDB: same ? .infinity : .nan, nonFiniteMismatches: 0, bytesIdentical: same)
        }
        let count = a.shape.elements
        let block = 1 << 15
        var maxAbs = 0.0, aa = 0.0, bb = 0.0, ab = 0.0, dd = 0.0
        var mismatches = 0
        let x = UnsafeMutablePointer<Double>.allocate(capacity: block)
        let y = UnsafeMutablePointer<Double>.allocate(capacity: block)
        let d = UnsafeMutablePointer<Double>.allocate(capacity: block)
        defer { x.deallocate(); y.deallocate(); d.deallocate() }
        let widthA = a.dtype.byteWidth!, widthB = b.dtype.byteWidth!
        var done = 0
        while done < count {
            let n = min(block, count - done)
            bytesA.withUnsafeBytes { DTypeConversion.decodeToDouble(a.dtype, count: n, source: $0.baseAddress! + done * widthA, destination: x) }
            bytesB.withUnsafeBytes { DTypeConversion.decodeToDouble(b.dtype, count: n, source: $0.baseAddress! + done * widthB, destination: y) }
            for i in 0..<n {
                let p = x[i], q = y[i]
                if p.isFinite && q.isFinite {
                    let diff = p - q
                    d[i] = diff
                    maxAbs = max(maxAbs, diff.magnitude)
                } else {
                    // Same non-finite value on both sides counts as equal; anything else is a mismatch.
                    if !((p.isNaN && q.isNaN) || p == q) { mismatches += 1 }
                    x[i] = 0
                    y[i] = 0
                    d[i] = 0
                }
            }
            let m = Int32(n)
            aa += cblas_ddot(m, x, 1, x, 1)
            bb += cblas_ddot(m, y, 1, y, 1)
            ab += cblas_ddot(m, x, 1, y, 1)
            dd += cblas_ddot(m, d, 1, d, 1)
            done += n
        }
        let relative = aa > 0 ? (dd / aa).squareRoot() : (dd == 0 ? 0 : .infinity)
        let cosine = (aa == 0 && bb == 0) ? 1 : (aa == 0 || bb == 0 ? 0 : ab / (aa.squareRoot() * bb.squareRoot()))
        let sqnr = dd == 0 ? Double.infinity : (aa == 0 ? -.infinity : 10 * log10Double(aa / dd))
        return TensorComparison(
            name: a.name, dtypeA: a.dtype, dtypeB: b.dtype, shapeA: a.shape, shapeB: b.shape,
            maxAbsError: maxAbs, relativeError: relative, cosine: cosine, sqnrDB: sqnr,
            nonFiniteMismatches: mismatches, bytesIdentical: nil)
    }

    private static func log10Double(_ x: Double) -> Double {
        #if canImport(Glibc)
        return Glibc.log10(x)
        #else
        return log(x) / log(10)
        #endif
    }
}

/// A shared work counter for the comparison workers.
private final class Counter: @unchecked Sendable {
    private var value = 0
    private let lock = DispatchSemaphore(value: 1)

    func take() -> Int {
        lock.wait()
        defer { lock.signal() }
        value += 1
        return value - 1
    }
}

#if canImport(Glibc)
import Glibc
#endif
