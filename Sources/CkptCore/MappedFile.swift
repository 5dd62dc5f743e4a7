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

    public init(path: String) throws(CkptError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let code = errno
            throw CkptError(code == ENOENT ? .notFound : .io, "cannot open for reading", path: path, cause: errnoText(code))
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            throw CkptError(.io, "cannot stat", path: path, cause: errnoText())
        }
        if (info.st_mode & S_IFMT) == S_IFDIR {
            throw CkptError(.invalidArgument, "is a directory, not a file", path: path)
        }
        let size = Int(info.st_size)
        var mapped: UnsafeRawPointer? = nil
        if size > 0 {
            let pointer = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
            guard let pointer, pointer != MAP_FAILED else {
                throw CkptError(.io, "cannot map file", path: path, cause: errnoText())
            }
            mapped = UnsafeRawPointer(pointer)
        }
        // All-or-nothing initialisation: a noncopyable type with deinit cannot be partly initialised.
        self.base = mapped
        self.count = size
        self.path = path
    }

    deinit {
        if let base { munmap(UnsafeMutableRawPointer(mutating: base), count) }
    }

    /// Scoped access to the mapped bytes. Do not let the pointer escape the closure.
    @inlinable
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(start: base, count: count))
    }

    /// Tells the kernel a range will be read sequentially (read-ahead) or is no longer needed (drops it from
    /// this process's resident set; the page cache keeps it). Keeps peak RSS of streaming conversions low.
    public func advise(_ range: Range<Int>, willNeed: Bool) {
        guard let base, !range.isEmpty else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = willNeed ? range.lowerBound / page * page : (range.lowerBound + page - 1) / page * page
        let end = willNeed ? min(count, range.upperBound) : range.upperBound / page * page
        guard end > start else { return }
        _ = madvise(UnsafeMutableRawPointer(mutating: base + start), end - start, willNeed ? MADV_WILLNEED : MADV_DONTNEED)
    }
}
