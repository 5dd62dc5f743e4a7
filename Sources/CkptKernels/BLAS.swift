import CCkptOpenBLAS
import CkptCore

/// The one wrapper over OpenBLAS that every module calls: single-precision matrix products in row-major layout and
/// the thread policy (OpenBLAS's pool is process-wide, so whoever parallelises on its own runs BLAS single-threaded).
package enum BLAS {
    /// C[m × n] = α·op(A)·op(B) + β·C, row-major; op(A) is m × k and op(B) is k × n. A transposed A is stored
    /// k × m (leading dimension `lda` ≥ m), a transposed B n × k (PyTorch's [out, in] weight layout).
    @inline(__always)
    package static func gemm(
        _ a: UnsafePointer<Float>, lda: Int, transposeA: Bool = false, _ b: UnsafePointer<Float>, ldb: Int, transposeB: Bool = false,
        _ c: UnsafeMutablePointer<Float>, ldc: Int, m: Int, n: Int, k: Int, alpha: Float = 1, beta: Float
    ) {
        guard m > 0, n > 0 else { return }
        cblas_sgemm(
            CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
            Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }

    /// C[m × n] = α·A[m × k]·B[n × k]ᵀ + β·C: a Linear layer's `x·Wᵀ` with W in PyTorch's [out, in] layout.
    @inline(__always)
    package static func gemmTransposedB(
        _ a: UnsafePointer<Float>, lda: Int, _ b: UnsafePointer<Float>, ldb: Int, _ c: UnsafeMutablePointer<Float>, ldc: Int,
        m: Int, n: Int, k: Int, alpha: Float = 1, beta: Float
    ) {
        gemm(a, lda: lda, b, ldb: ldb, transposeB: true, c, ldc: ldc, m: m, n: n, k: k, alpha: alpha, beta: beta)
    }

    /// The upper triangle of C[n × n] = α·AᵀA + β·C for A [k × n] row-major (a Gram matrix of k rows).
    @inline(__always)
    package static func gramUpper(_ a: UnsafePointer<Float>, rows k: Int, columns n: Int, _ c: UnsafeMutablePointer<Float>, alpha: Float = 1, beta: Float) {
        cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, Int32(n), Int32(k), alpha, a, Int32(n), beta, c, Int32(n))
    }

    /// OpenBLAS's thread count now.
    package static var threads: Int { Int(openblas_get_num_threads()) }

    /// Runs `body` with OpenBLAS using `count` threads, restoring the previous count afterwards. Workers that split
    /// the work across cores themselves call this with 1 so the two thread pools do not fight.
    package static func withThreads<R, E: Error>(_ count: Int, _ body: () throws(E) -> R) throws(E) -> R {
        let previous = openblas_get_num_threads()
        openblas_set_num_threads(Int32(max(1, count)))
        defer { openblas_set_num_threads(previous) }
        return try body()
    }

    /// Sets OpenBLAS to one thread for the rest of the process (commands that only ever parallelise on their own).
    package static func useSingleThread() { openblas_set_num_threads(1) }
}
