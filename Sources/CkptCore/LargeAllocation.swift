#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Buffers of a megabyte or more come straight from `mmap` and go back with `munmap`.
///
/// Through malloc they would not: after the first large free, glibc raises its mmap threshold and serves later
/// multi-megabyte blocks from the brk heap, where fragmentation kept ~340 MB resident while converting a 1.2 GB
/// checkpoint tensor by tensor. Streaming conversions must stay near one tensor of memory.
public enum LargeAllocation {
    public static let threshold = 1 << 20

    /// Allocates `count` bytes, 64-byte aligned (page-aligned when mapped). A request the system refuses is a
    /// `tooLarge` error, never a trap: sizes often come from files or flags, and callers check them against
    /// their budgets first, but the last word is the kernel's.
    public static func allocate(_ count: Int) throws(CkptError) -> UnsafeMutableRawPointer {
        guard count >= 0 else { throw CkptError(.overflow, "negative allocation size \(count)") }
        if count < threshold {
            return UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 64)
        }
        // The kernel overcommits: a mapping larger than memory succeeds and the process is killed when it is
        // touched. Every large buffer is checked against the budget first.
        try MemoryBudget.require(count, for: "a buffer")
        let pointer = mmap(nil, count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let pointer, pointer != MAP_FAILED else {
            throw CkptError(.tooLarge, "out of memory: cannot allocate \(count) bytes", cause: errnoText())
        }
        return pointer
    }

    /// Releases memory from ``allocate(_:)``; `count` must be the size it was allocated with.
    public static func deallocate(_ pointer: UnsafeMutableRawPointer, count: Int) {
        if count < threshold {
            pointer.deallocate()
        } else {
            munmap(pointer, count)
        }
    }
}
