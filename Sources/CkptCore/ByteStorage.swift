/// Bytes that tensors point into: either a read-only memory map of an input file (zero-copy) or an owned,
/// 64-byte-aligned heap buffer. Reference type so many tensors can share one mapping; the mapping is released when
/// the last tensor lets go.
public final class ByteStorage: @unchecked Sendable {
    // Immutable after init; the heap buffer is written only by its creator before it is shared.
    @usableFromInline let base: UnsafeMutableRawPointer?
    public let count: Int
    private let mapping: MappedFile?
    private let ownsHeap: Bool
    /// The mapped file's path (nil for in-memory storage).
    public let path: String?

    /// Maps `path` read-only.
    public init(mapping path: String) throws(CkptError) {
        let file = try MappedFile(path: path)
        self.base = file.withUnsafeBytes { UnsafeMutableRawPointer(mutating: $0.baseAddress) }
        self.count = file.count
        self.mapping = consume file
        self.ownsHeap = false
        self.path = path
    }

    /// An owned, uninitialised buffer of `count` bytes, filled by `initialize` before it is shared.
    public init(
        uninitializedCount count: Int, initialize: (UnsafeMutableRawBufferPointer) throws(CkptError) -> Void
    ) throws(CkptError) {
        let pointer = try LargeAllocation.allocate(count)
        do {
            try initialize(UnsafeMutableRawBufferPointer(start: pointer, count: count))
        } catch {
            LargeAllocation.deallocate(pointer, count: count)
            throw error
        }
        self.base = pointer
        self.count = count
        self.mapping = nil
        self.ownsHeap = true
        self.path = nil
    }

    /// An owned copy of `bytes` (used for small in-memory inputs, e.g. fuzzing and tests).
    public convenience init(copying bytes: UnsafeRawBufferPointer) throws(CkptError) {
        try self.init(uninitializedCount: bytes.count) { (buffer: UnsafeMutableRawBufferPointer) in
            if let source = bytes.baseAddress, bytes.count > 0 {
                buffer.baseAddress!.copyMemory(from: source, byteCount: bytes.count)
            }
        }
    }

    public convenience init(copying bytes: [UInt8]) throws(CkptError) {
        try self.init(copying: bytes.withUnsafeBytes { UnsafeRawBufferPointer(start: $0.baseAddress, count: $0.count) })
    }

    deinit {
        if ownsHeap, let base { LargeAllocation.deallocate(base, count: count) }
    }

    public var isMapped: Bool { mapping != nil }

    /// Scoped access to all bytes. Do not let the pointer escape the closure.
    @inlinable
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(start: base, count: count))
    }

    /// Scoped access to `range`, which the caller has validated to lie within the storage.
    @inlinable
    public func withUnsafeBytes<R, E: Error>(
        in range: Range<Int>, _ body: (UnsafeRawBufferPointer) throws(E) -> R
    ) throws(E) -> R {
        precondition(range.lowerBound >= 0 && range.upperBound <= count, "range outside storage")
        return try body(UnsafeRawBufferPointer(start: base.map { $0 + range.lowerBound }, count: range.count))
    }

    /// A copy of `range` (which the caller has validated) that maps no pages: `pread` for mapped files.
    public func copyBytes(_ range: Range<Int>) throws(CkptError) -> [UInt8] {
        precondition(range.lowerBound >= 0 && range.upperBound <= count, "range outside storage")
        if isMapped {
            guard let bytes = mapping?.read(range) else {
                throw CkptError(.io, "cannot read bytes \(range.lowerBound)..<\(range.upperBound)", path: path, cause: errnoText())
            }
            return bytes
        }
        return withUnsafeBytes(in: range) { Array($0) }
    }

    /// Drop `range` from the resident set once it has been consumed (mapped storage only).
    public func doneReading(_ range: Range<Int>) { mapping?.release(range) }
}

/// A tensor's bytes: a range of a ``ByteStorage``.
public struct TensorBytes: Sendable {
    public let storage: ByteStorage
    public let range: Range<Int>

    public init(storage: ByteStorage, range: Range<Int>) {
        self.storage = storage
        self.range = range
    }

    public init(storage: ByteStorage) {
        self.init(storage: storage, range: 0..<storage.count)
    }

    public var count: Int { range.count }

    @inlinable
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try storage.withUnsafeBytes(in: range, body)
    }

    public func doneReading() { storage.doneReading(range) }
}

extension Array where Element: BitwiseCopyable {
    /// Scoped raw access with typed throws (Array's own `withUnsafeBytes` only rethrows untyped errors).
    @inlinable
    public func withBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try span.withUnsafeBytes(body)
    }
}
