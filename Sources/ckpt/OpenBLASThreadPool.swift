#if canImport(Glibc)
import Glibc
#endif

/// OpenBLAS (pthreads build) starts its worker threads when the library loads, and each spins on `sched_yield`
/// for ~2^28 cycles (0.1 s at 2.6 GHz) before it sleeps: on two cores that takes a core's share from ckpt's own
/// workers for the first tenth of a second of every command, BLAS or not (measured: GGUF Q4_0 of a 1.2 GB
/// checkpoint 197 → 175 ms). Stopping the pool at start-up costs nothing later: OpenBLAS starts it again by itself
/// at the first call that runs on several threads (`exec_blas` re-initialises a shut-down server, as after `fork`).
enum OpenBLASThreadPool {
    /// Stops the idle pool where the library has one. Looked up at run time: serial and OpenMP builds of OpenBLAS
    /// (or another BLAS) may lack the symbol, and then there is nothing to stop.
    static func stopUntilNeeded() {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "blas_thread_shutdown_") else { return }
        typealias Shutdown = @convention(c) () -> Int32
        _ = unsafeBitCast(symbol, to: Shutdown.self)()
    }
}
