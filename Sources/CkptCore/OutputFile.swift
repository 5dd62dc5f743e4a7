#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An output file written atomically: bytes go to a temporary file in the destination folder, and only
/// ``commit()`` renames it over the destination. If the value is dropped without a commit (an error was thrown),
/// the temporary file is removed, so a failed run leaves nothing behind.
public struct OutputFile: ~Copyable {
    public let path: String
    private let temporaryPath: String
    private let fd: Int32
    private var committed = false
    private var buffer: UnsafeMutableRawPointer
    private var buffered = 0
    /// Bytes written so far (the position the next `write` lands at).
    public private(set) var offset = 0

    private static let bufferCapacity = 1 << 20

    /// Creates the temporary file. Refuses when `path` is one of `inputs` (an input is never overwritten).
    public init(path: String, inputs: [FileIdentity] = []) throws(CkptError) {
        if let existing = FileIdentity.of(path) {
            if existing.isDirectory {
                throw CkptError(.invalidArgument, "output path is a directory", path: path)
            }
            // The rename at commit would replace a FIFO, a device node (/dev/null as root) or a socket.
            if !existing.isRegularFile {
                throw CkptError(.invalidArgument, "output path exists and is not a regular file (\(existing.kind.rawValue))", path: path)
            }
            if inputs.contains(where: { $0.sameFile(as: existing) }) {
                throw CkptError(.sameInputOutput, "output would overwrite an input file", path: path)
            }
        }
        let buffer = try LargeAllocation.allocate(OutputFile.bufferCapacity)
        let directory = FilePaths.directory(of: path)
        let template = FilePaths.join(directory, "." + FilePaths.fileName(of: path) + ".ckpt-tmp-XXXXXX")
        var templateBytes = Array(template.utf8CString)
        let descriptor = templateBytes.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard descriptor >= 0 else {
            LargeAllocation.deallocate(buffer, count: OutputFile.bufferCapacity)
            throw CkptError(.io, "cannot create a temporary file in the output folder", path: path, cause: errnoText())
        }
        _ = fcntl(descriptor, F_SETFD, FD_CLOEXEC)
        fchmod(descriptor, 0o644)
        let temporary = templateBytes.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        PendingOutputs.add(file: temporary)
        self.path = path
        self.temporaryPath = temporary
        self.fd = descriptor
        self.buffer = buffer
    }

    deinit {
        LargeAllocation.deallocate(buffer, count: OutputFile.bufferCapacity)
        if !committed {
            close(fd)
            unlink(temporaryPath)
            PendingOutputs.remove(file: temporaryPath)
        }
    }

    /// Appends bytes. Small writes are coalesced; large ones go straight to the kernel.
    public mutating func write(_ bytes: UnsafeRawBufferPointer) throws(CkptError) {
        guard let source = bytes.baseAddress, bytes.count > 0 else { return }
        if buffered + bytes.count <= OutputFile.bufferCapacity {
            (buffer + buffered).copyMemory(from: source, byteCount: bytes.count)
            buffered += bytes.count
        } else {
            try flush()
            if bytes.count < OutputFile.bufferCapacity / 2 {
                buffer.copyMemory(from: source, byteCount: bytes.count)
                buffered = bytes.count
            } else {
                try writeAll(fd: fd, source, bytes.count)
            }
        }
        offset += bytes.count
    }

    public mutating func write(_ bytes: [UInt8]) throws(CkptError) {
        try bytes.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try write(raw) }
    }

    /// Overwrites bytes already written at `position` (e.g. a CRC patched in after the data).
    public mutating func patch(_ bytes: [UInt8], at position: Int) throws(CkptError) {
        precondition(position + bytes.count <= offset, "patch beyond written data")
        try flush()
        let ok = bytes.withUnsafeBytes { raw -> Bool in
            var done = 0
            while done < raw.count {
                let n = pwrite(fd, raw.baseAddress! + done, raw.count - done, off_t(position + done))
                if n < 0 { if errno == EINTR { continue }; return false }
                done += n
            }
            return true
        }
        if !ok { throw CkptError(.io, "cannot write", path: path, cause: errnoText()) }
    }

    /// Writes bytes at `position`, which may lie past the end (the gap reads as zeros until written): for layouts
    /// whose parts are produced in another order than they are stored. Sequential ``write(_:)`` calls continue at
    /// the end of the furthest byte written so far.
    public mutating func write(_ bytes: UnsafeRawBufferPointer, at position: Int) throws(CkptError) {
        guard let source = bytes.baseAddress, bytes.count > 0 else { return }
        precondition(position >= 0, "negative file position")
        try flush()
        try PositionalWriter(fd: fd, path: path).write(UnsafeRawBufferPointer(start: source, count: bytes.count), at: position)
        if position + bytes.count > offset {
            offset = position + bytes.count
            guard lseek(fd, off_t(offset), SEEK_SET) >= 0 else {
                throw CkptError(.io, "cannot seek", path: path, cause: errnoText())
            }
        }
    }

    /// Lends `body` a handle that writes at explicit positions from any number of threads at once, for files whose
    /// parts several workers produce together. What was written before is flushed first; the file is first sized
    /// to `size` bytes (parts never written read as zeros), and sequential ``write(_:)`` calls continue at `size`.
    public mutating func withPositionalWriter<R>(
        size: Int, _ body: (PositionalWriter) throws(CkptError) -> R
    ) throws(CkptError) -> R {
        precondition(size >= offset, "the file would lose bytes already written")
        try flush()
        // Reserving the blocks first makes the workers' writes cheaper (ext4 need not reserve them page by page)
        // and reports a full disk before any work; filesystems without fallocate are sized by ftruncate alone.
        if let reserve = Self.fallocate, size > 0, reserve(fd, 0, 0, off_t(size)) != 0 {
            let code = errno
            if code == ENOSPC || code == EFBIG {
                throw CkptError(.io, "cannot reserve \(size) bytes for the output", path: path, cause: errnoText(code))
            }
        }
        guard ftruncate(fd, off_t(size)) == 0 else {
            throw CkptError(.io, "cannot size the output to \(size) bytes", path: path, cause: errnoText())
        }
        let result = try body(PositionalWriter(fd: fd, path: path))
        offset = size
        guard lseek(fd, off_t(size), SEEK_SET) >= 0 else {
            throw CkptError(.io, "cannot seek", path: path, cause: errnoText())
        }
        return result
    }

    /// Linux's `fallocate(2)`, which fails with EOPNOTSUPP where the filesystem cannot reserve blocks, rather than
    /// glibc's `posix_fallocate`, which then writes a byte into every block. Looked up at run time: Swift's Glibc
    /// module does not declare it (it is a GNU extension).
    private static let fallocate: (@convention(c) (Int32, Int32, off_t, off_t) -> Int32)? = {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "fallocate") else { return nil }
        return unsafeBitCast(symbol, to: (@convention(c) (Int32, Int32, off_t, off_t) -> Int32).self)
    }()

    private mutating func flush() throws(CkptError) {
        guard buffered > 0 else { return }
        try writeAll(fd: fd, UnsafeRawPointer(buffer), buffered)
        buffered = 0
    }

    private func writeAll(fd: Int32, _ pointer: UnsafeRawPointer, _ count: Int) throws(CkptError) {
        var done = 0
        while done < count {
            let n = Glibc.write(fd, pointer + done, count - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw CkptError(.io, "cannot write", path: path, cause: errnoText())
            }
            done += n
        }
    }

    /// Flushes, closes and renames the temporary file over `path`.
    public mutating func commit() throws(CkptError) {
        try stage().publish()
    }

    /// Flushes and closes the file but leaves it under its temporary name, for outputs made of several files
    /// that must appear together: publish every ``StagedFile`` once all are complete, or discard them.
    public mutating func stage() throws(CkptError) -> StagedFile {
        try flush()
        committed = true
        if close(fd) != 0 {
            let cause = errnoText()
            unlink(temporaryPath)
            PendingOutputs.remove(file: temporaryPath)
            throw CkptError(.io, "cannot close", path: path, cause: cause)
        }
        return StagedFile(path: path, temporaryPath: temporaryPath)
    }
}

/// Writes at explicit positions of an ``OutputFile`` (`pwrite`), safe to use from several threads for disjoint
/// ranges; valid only inside ``OutputFile/withPositionalWriter(size:_:)``.
public struct PositionalWriter: Sendable {
    let fd: Int32
    public let path: String

    public func write(_ bytes: UnsafeRawBufferPointer, at position: Int) throws(CkptError) {
        guard let source = bytes.baseAddress, bytes.count > 0 else { return }
        precondition(position >= 0, "negative file position")
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, source + done, bytes.count - done, off_t(position + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw CkptError(.io, "cannot write", path: path, cause: errnoText())
            }
            done += n
        }
    }
}

/// A complete output file still under its temporary name.
public struct StagedFile: Sendable {
    public let path: String
    let temporaryPath: String

    /// Renames the file into place.
    public func publish() throws(CkptError) {
        defer { PendingOutputs.remove(file: temporaryPath) }
        if rename(temporaryPath, path) != 0 {
            let cause = errnoText()
            unlink(temporaryPath)
            throw CkptError(.io, "cannot rename the temporary file into place", path: path, cause: cause)
        }
    }

    /// Removes the temporary file.
    public func discard() {
        unlink(temporaryPath)
        PendingOutputs.remove(file: temporaryPath)
    }

    /// Publishes `files` in order; if one rename fails, the ones not yet published are discarded.
    public static func publishAll(_ files: [StagedFile]) throws(CkptError) {
        for (i, file) in files.enumerated() {
            do {
                try file.publish()
            } catch {
                files[(i + 1)...].forEach { $0.discard() }
                throw error
            }
        }
    }
}
