#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A read-only, private memory map of a whole file. Owns the mapping and unmaps it in `deinit`.
/// Empty files are represented without a mapping (mmap of length 0 fails with EINVAL).
public struct MappedFile: ~Copyable {
    @usableFromInline let base: UnsafeRawPointer?
    public let count: Int
    public let path: String
    /// Kept open for `pread`: small reads that should not map pages (see ``read(_:)``).
    private let descriptor: Int32

    /// Maps the regular file at `path` (symlinks followed). Anything else is refused before a byte is read: a
    /// FIFO or a terminal would block, a device has no size to map, a directory is not a file. The file is opened
    /// with `O_NONBLOCK`, so opening a FIFO that no one writes does not hang either.
    public init(path: String) throws(CkptError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
        guard fd >= 0 else {
            let code = errno
            throw CkptError(code == ENOENT ? .notFound : .io, "cannot open for reading", path: path, cause: errnoText(code))
        }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let cause = errnoText()
            close(fd)
            throw CkptError(.io, "cannot stat", path: path, cause: cause)
        }
        let kind = FileIdentity.Kind(mode: info.st_mode)
        guard kind == .regularFile else {
            close(fd)
            throw CkptError(.notRegularFile, "is \(kind.rawValue), not a regular file", path: path)
        }
        let size = Int(info.st_size)
        var mapped: UnsafeRawPointer? = nil
        if size > 0 {
            let pointer = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
            guard let pointer, pointer != MAP_FAILED else {
                let cause = errnoText()
                close(fd)
                throw CkptError(.io, "cannot map file", path: path, cause: cause)
            }
            mapped = UnsafeRawPointer(pointer)
        }
        // All-or-nothing initialisation: a noncopyable type with deinit cannot be partly initialised.
        self.base = mapped
        self.count = size
        self.path = path
        self.descriptor = fd
    }

    deinit {
        if let base { munmap(UnsafeMutableRawPointer(mutating: base), count) }
        close(descriptor)
    }

    /// Copies `range` with `pread`, without mapping any page into this process. For small reads scattered over
    /// a large file (zip local headers, .npy headers of members): through the mapping each would make a whole
    /// large folio resident (measured: 186 MB peak to list a 1.2 GB npz).
    public func read(_ range: Range<Int>) -> [UInt8]? {
        guard range.lowerBound >= 0, range.upperBound <= count else { return nil }
        var result = [UInt8](repeating: 0, count: range.count)
        let ok = result.withUnsafeMutableBytes { buffer -> Bool in
            var done = 0
            while done < buffer.count {
                let n = pread(descriptor, buffer.baseAddress! + done, buffer.count - done, off_t(range.lowerBound + done))
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return false }
                done += n
            }
            return true
        }
        return ok ? result : nil
    }

    /// The largest folio the page cache maps at once (PMD size on x86-64).
    static let releaseUnit = 2 << 20

    /// Scoped access to the mapped bytes. Do not let the pointer escape the closure.
    @inlinable
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(start: base, count: count))
    }

    /// Drops a consumed range from this process's resident set (the page cache keeps it). Keeps the peak RSS
    /// of streaming conversions near one chunk.
    ///
    /// The range widens to 2 MiB boundaries: the kernel maps whole large folios (up to 2 MiB) on a fault, so
    /// touching a few bytes can make megabytes resident. Dropping a neighbour's pages is harmless: they come
    /// back from the page cache on the next access.
    public func release(_ range: Range<Int>) {
        guard let base, !range.isEmpty else { return }
        let unit = MappedFile.releaseUnit
        let start = range.lowerBound / unit * unit
        let end = min(count, (range.upperBound + unit - 1) / unit * unit)
        guard end > start else { return }
        _ = madvise(UnsafeMutableRawPointer(mutating: base + start), end - start, MADV_DONTNEED)
    }
}
