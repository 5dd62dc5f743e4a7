import CkptCore

/// F32 values owned by one allocation (mmap'd when large, budget-checked), zero-filled, released in `deinit`.
/// Shared read-only by workers; a worker that writes owns its buffer.
package final class FloatBuffer: @unchecked Sendable {
    package let pointer: UnsafeMutablePointer<Float>
    package let count: Int

    package init(count: Int) throws(CkptError) {
        let bytes = try CheckedSize.product([max(count, 1), MemoryLayout<Float>.stride], "a buffer of \(count) floats")
        self.count = count
        let raw = try LargeAllocation.allocate(bytes)
        pointer = raw.bindMemory(to: Float.self, capacity: max(count, 1))
        pointer.initialize(repeating: 0, count: max(count, 1))
    }

    package convenience init(_ values: [Float]) throws(CkptError) {
        try self.init(count: values.count)
        values.withUnsafeBufferPointer { pointer.update(from: $0.baseAddress!, count: values.count) }
    }

    deinit { LargeAllocation.deallocate(UnsafeMutableRawPointer(pointer), count: max(count, 1) * MemoryLayout<Float>.stride) }

    package var values: [Float] { Array(UnsafeBufferPointer(start: pointer, count: count)) }

    /// Sets every value to 0.
    package func zero() { pointer.update(repeating: 0, count: count) }
}
