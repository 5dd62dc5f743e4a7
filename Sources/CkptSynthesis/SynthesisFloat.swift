#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The floating-point types the synthesis losses and their gradients are written for: `Float` for the images
/// being optimised, `Double` for the finite-difference proofs. Every loss is one `@inlinable` generic function
/// over this protocol, so both precisions run the same math and the `Float` path is specialised at the call site.
public protocol SynthesisFloat: BinaryFloatingPoint, Sendable where RawSignificand: FixedWidthInteger {
    /// eˣ.
    static func exp(_ x: Self) -> Self
    /// The natural logarithm.
    static func log(_ x: Self) -> Self
}

extension Float: SynthesisFloat {
    @inlinable @inline(__always) public static func exp(_ x: Float) -> Float { expf(x) }
    @inlinable @inline(__always) public static func log(_ x: Float) -> Float { logf(x) }
}

extension Double: SynthesisFloat {
    @inlinable @inline(__always) public static func exp(_ x: Double) -> Double { libmExp(x) }
    @inlinable @inline(__always) public static func log(_ x: Double) -> Double { libmLog(x) }
}

// Inside the extension the bare names would find the static requirements themselves.
@usableFromInline @inline(__always) func libmExp(_ x: Double) -> Double { exp(x) }
@usableFromInline @inline(__always) func libmLog(_ x: Double) -> Double { log(x) }
