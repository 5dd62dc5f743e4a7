#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Text of the current `errno`.
@usableFromInline
func errnoText(_ code: Int32 = errno) -> String {
    guard let text = strerror(code) else { return "errno \(code)" }
    return String(cString: text)
}

/// Seconds on the monotonic clock (for timing and progress; unaffected by wall-clock changes).
public enum MonotonicClock {
    public static func seconds() -> Double {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
    }
}

/// Facts about a path, used to refuse overwriting an input and to tell files from folders.
public struct FileIdentity: Equatable, Sendable {
    /// What a path names, from `st_mode`.
    public enum Kind: String, Sendable {
        case regularFile = "a regular file"
        case directory = "a directory"
        case fifo = "a FIFO"
        case characterDevice = "a character device"
        case blockDevice = "a block device"
        case socket = "a socket"
        case symbolicLink = "a symbolic link"
        case other = "not a file"

        init(mode: mode_t) {
            switch mode & S_IFMT {
            case S_IFREG: self = .regularFile
            case S_IFDIR: self = .directory
            case S_IFIFO: self = .fifo
            case S_IFCHR: self = .characterDevice
            case S_IFBLK: self = .blockDevice
            case S_IFSOCK: self = .socket
            case S_IFLNK: self = .symbolicLink
            default: self = .other
            }
        }
    }

    public let device: UInt64
    public let inode: UInt64
    public let kind: Kind
    public let size: Int

    public var isDirectory: Bool { kind == .directory }
    public var isRegularFile: Bool { kind == .regularFile }

    /// Identity of `path` following symlinks, or nil if nothing exists there.
    public static func of(_ path: String) -> FileIdentity? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        return FileIdentity(info)
    }

    init(_ info: stat) {
        device = UInt64(info.st_dev)
        inode = UInt64(info.st_ino)
        kind = Kind(mode: info.st_mode)
        size = Int(info.st_size)
    }

    public func sameFile(as other: FileIdentity) -> Bool { device == other.device && inode == other.inode }
}

/// Small path helpers (no Foundation, to keep start-up cheap: `inspect` is header-only work).
public enum FilePaths {
    public static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let dir = String(path[..<slash])
        return dir.isEmpty ? "/" : dir
    }

    public static func fileName(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return path }
        return String(path[path.index(after: slash)...])
    }

    public static func join(_ directory: String, _ name: String) -> String {
        directory.hasSuffix("/") ? directory + name : directory + "/" + name
    }

    /// Lower-cased extension without the dot, "" when there is none.
    public static func fileExtension(of path: String) -> String {
        let name = fileName(of: path)
        guard let dot = name.lastIndex(of: "."), dot != name.startIndex else { return "" }
        return String(name[name.index(after: dot)...]).lowercased()
    }

    /// Names in a directory (no "." or ".."), sorted bytewise.
    public static func contents(of directory: String) throws(CkptError) -> [String] {
        guard let dir = opendir(directory) else {
            throw CkptError(.io, "cannot list directory", path: directory, cause: errnoText())
        }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(cString: raw.baseAddress!.assumingMemoryBound(to: CChar.self))
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }
    }

    /// Removes `path` if it is an empty directory (cleanup after a failed write into a folder ckpt created).
    public static func removeEmptyDirectory(_ path: String) {
        _ = rmdir(path)
    }

    /// Creates `path` as a directory if it does not exist yet.
    public static func makeDirectory(_ path: String) throws(CkptError) {
        if let identity = FileIdentity.of(path) {
            if identity.isDirectory { return }
            throw CkptError(.invalidArgument, "exists and is not a directory", path: path)
        }
        if mkdir(path, 0o755) != 0 && errno != EEXIST {
            throw CkptError(.io, "cannot create directory", path: path, cause: errnoText())
        }
    }
}

/// Unbuffered writes to file descriptor 2 (no shared `FILE*`, so safe from any thread).
public enum StandardError {
    /// Writes `text` to stderr with control and bidi characters escaped (``TerminalText/sanitized(_:keeping:)``),
    /// except the line breaks, tabs and carriage returns (progress lines) the writers put there themselves.
    public static func write(_ text: String) {
        var bytes = Array(TerminalText.sanitized(text, keeping: ["\n", "\t", "\r"]).utf8)
        bytes.withUnsafeMutableBytes { raw in
            var done = 0
            while done < raw.count {
                let n = Glibc.write(2, raw.baseAddress! + done, raw.count - done)
                if n <= 0 { if n < 0 && errno == EINTR { continue }; return }
                done += n
            }
        }
    }
}
