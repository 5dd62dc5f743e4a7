import CkptCore
import Dispatch
import Synchronization

/// Writes a file whose parts' positions are known before any is produced, on every core at once: each worker takes
/// the next part in file order, produces it in buffers of its own and writes it at its position (`pwrite`), so no
/// thread waits for another and no bytes are handed from one thread to another.
///
/// Parts are taken in file order and a failure stops the workers from taking more: every part before a failing one
/// is finished, and the error thrown is the first in file order whatever the timing.
enum ParallelFileWriter {
    /// A part of the file: `write` produces it and writes it through the writer, returning what the caller wants
    /// to know about it (statistics, say).
    struct Part<Result: Sendable>: Sendable {
        /// Set for parts that hold a whole tensor in memory while they run (one decoded, inflated or dequantized on
        /// load): such parts run one at a time, so memory stays at one such tensor whatever the core count.
        var loadsWholeTensor = false
        let write: @Sendable (WorkerBuffers, PositionalWriter) throws(CkptError) -> Result
    }

    /// Scratch memory of one worker, lent to each part it runs; allocated on first use, freed when the work ends.
    final class WorkerBuffers {
        /// Floats a part may stage in ``staging``, bytes it may put in ``output``.
        static let stagingElements = 1 << 20
        static let outputBytes = 4 << 20

        private var stagingPointer: UnsafeMutableRawPointer?
        private var outputPointer: UnsafeMutableRawPointer?

        var staging: UnsafeMutablePointer<Float> {
            get throws(CkptError) {
                if stagingPointer == nil { stagingPointer = try LargeAllocation.allocate(Self.stagingElements * 4) }
                return stagingPointer!.assumingMemoryBound(to: Float.self)
            }
        }

        var output: UnsafeMutableRawPointer {
            get throws(CkptError) {
                if outputPointer == nil { outputPointer = try LargeAllocation.allocate(Self.outputBytes) }
                return outputPointer!
            }
        }

        deinit {
            if let stagingPointer { LargeAllocation.deallocate(stagingPointer, count: Self.stagingElements * 4) }
            if let outputPointer { LargeAllocation.deallocate(outputPointer, count: Self.outputBytes) }
        }
    }

    /// Runs every part on up to `workers` threads and returns their results in part order; `finished` is called (on
    /// a worker thread) with each part's index once it is written.
    static func run<Result: Sendable>(
        _ parts: [Part<Result>], to file: PositionalWriter, workers: Int = Parallel.coreCount,
        finished: (@Sendable (Int) -> Void)? = nil
    ) throws(CkptError) -> [Result] {
        let results = UnsafeMutableBufferPointer<Result?>.allocate(capacity: parts.count)
        results.initialize(repeating: nil)
        defer { results.deinitialize().deallocate() }
        nonisolated(unsafe) let slots = results
        let next = Atomic<Int>(0)
        let failure = Mutex<(part: Int, error: CkptError)?>(nil)
        let stopped = Atomic<Bool>(false)
        let wholeTensorTurn = Mutex(())
        DispatchQueue.concurrentPerform(iterations: max(1, min(workers, parts.count))) { _ in
            let buffers = WorkerBuffers()
            while !stopped.load(ordering: .relaxed) {
                let index = next.add(1, ordering: .relaxed).oldValue
                guard index < parts.count else { return }
                do throws(CkptError) {
                    let part = parts[index]
                    if part.loadsWholeTensor {
                        slots[index] = try wholeTensorTurn.withLock { (_: inout ()) throws(CkptError) in try part.write(buffers, file) }
                    } else {
                        slots[index] = try part.write(buffers, file)
                    }
                    finished?(index)
                } catch {
                    failure.withLock { first in
                        if first == nil || index < first!.part { first = (index, error) }
                    }
                    stopped.store(true, ordering: .relaxed)
                }
            }
        }
        if let (_, error) = failure.withLock({ $0 }) { throw error }
        return results.map { $0! }
    }
}
