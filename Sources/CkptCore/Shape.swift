/// A tensor shape with overflow-checked element and byte counts. Dimensions come from files, so every product is
/// checked: a hostile header cannot make ckpt wrap around or allocate by accident.
public struct Shape: Hashable, Sendable, CustomStringConvertible {
    public let dims: [Int]

    /// The largest product of the non-zero dimensions a shape may have: 2⁵⁶ elements, so any stride of any
    /// dtype fits in an `Int` even when counted in bits (2⁵⁶ × 64 bits = 2⁶² bits).
    public static let maximumSpan = 1 << 56

    /// A shape whose every partial product (any run of dimensions, any stride) fits in an `Int`.
    ///
    /// Zero dimensions are skipped when the span is checked, as numpy does when it creates an array: `[0, 2⁴⁰, 2⁴⁰]`
    /// has no elements but a row stride of 2⁸⁰, and code that multiplies the trailing dimensions (a matrix's
    /// column count, a rank check) would overflow. Such shapes are refused here, once, for every format.
    public init(_ dims: [Int]) throws(CkptError) {
        var span = 1
        for d in dims {
            if d < 0 { throw CkptError(.invalidHeader, "negative dimension \(d) in shape \(dims)") }
            if d == 0 { continue }
            let (product, overflow) = span.multipliedReportingOverflow(by: d)
            if overflow || product > Shape.maximumSpan {
                throw CkptError(.overflow, "shape \(dims) spans more than 2^56 elements (the product of its non-zero dimensions overflows the stride arithmetic)")
            }
            span = product
        }
        self.dims = dims
    }

    public var rank: Int { dims.count }

    /// Product of the dimensions (1 for a scalar), or an `overflow` error.
    public func elementCount() throws(CkptError) -> Int {
        var count = 1
        for d in dims {
            let (product, overflow) = count.multipliedReportingOverflow(by: d)
            if overflow { throw CkptError(.overflow, "element count of shape \(dims) overflows") }
            count = product
        }
        return count
    }

    /// The element count of a shape known to be valid.
    public var elements: Int { (try? elementCount()) ?? 0 }

    /// Bytes occupied by a tensor of this shape and `dtype`; sub-byte types must fill whole bytes.
    public func byteCount(for dtype: DType) throws(CkptError) -> Int {
        let count = try elementCount()
        let (bits, overflow) = count.multipliedReportingOverflow(by: dtype.bitWidth)
        if overflow { throw CkptError(.overflow, "byte count of shape \(dims) × \(dtype.name) overflows") }
        if bits % 8 != 0 {
            throw CkptError(.misalignedSlice, "\(count) elements of \(dtype.name) do not fill a whole number of bytes")
        }
        return bits / 8
    }

    public var description: String { "[" + dims.map(String.init).joined(separator: ", ") + "]" }
}

/// A tensor name compared byte for byte. Swift's `String ==` treats canonically equivalent spellings ("é" and
/// "e\u{301}") as equal; file formats compare names as bytes, so every name set and map in ckpt uses this key.
public struct NameKey: Hashable, Sendable {
    public let utf8: [UInt8]
    public init(_ name: String) { utf8 = Array(name.utf8) }
}
