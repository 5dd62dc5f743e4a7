import Dispatch

/// Bulk element conversion between dtypes, over raw (possibly unaligned) bytes.
///
/// Conversions go between the floating types (F64, F32, F16, BF16 and the F8 formats as sources; F64, F32, F16,
/// BF16 as targets). Every result is rounded once, to nearest even: F8/F16/BF16 → F32 is exact, and F64 sources
/// are rounded directly to the target.
public enum DTypeConversion {
    /// Target dtypes `convert --dtype` offers.
    public static let targets: [DType] = [.f32, .f16, .bf16, .f64]

    public static func canConvert(from source: DType, to target: DType) -> Bool {
        source == target || (source.isConvertibleFloat && targets.contains(target))
    }

    /// Converts `count` elements from `source` (dtype `from`) into `destination` (dtype `to`).
    /// Both buffers must hold `count` elements of their dtype; they may be unaligned.
    public static func convert(
        from: DType, to: DType, count: Int,
        source: UnsafeRawPointer, destination: UnsafeMutableRawPointer
    ) {
        precondition(canConvert(from: from, to: to), "unsupported conversion \(from) → \(to)")
        if from == to {
            destination.copyMemory(from: source, byteCount: count * from.byteWidth!)
            return
        }
        switch (from, to) {
        case (.f32, .f16): f32ToF16(source, destination, count)
        case (.f32, .bf16): f32ToBF16(source, destination, count)
        case (.f16, .f32): f16ToF32(source, destination, count)
        case (.bf16, .f32): bf16ToF32(source, destination, count)
        case (.f64, .f32):
            for i in 0..<count {
                let value = source.loadUnaligned(fromByteOffset: i * 8, as: Double.self)
                destination.storeBytes(of: Float(value), toByteOffset: i * 4, as: Float.self)
            }
        case (.f64, .f16):
            for i in 0..<count {
                let value = source.loadUnaligned(fromByteOffset: i * 8, as: Double.self)
                destination.storeBytes(of: FloatBits.f64ToF16(value), toByteOffset: i * 2, as: UInt16.self)
            }
        case (.f64, .bf16):
            for i in 0..<count {
                let value = source.loadUnaligned(fromByteOffset: i * 8, as: Double.self)
                destination.storeBytes(of: FloatBits.f64ToBF16(value), toByteOffset: i * 2, as: UInt16.self)
            }
        case (_, .f64):
            withFloatBlocks(from: from, count: count, source: source) { offset, block in
                for (i, value) in block.enumerated() {
                    destination.storeBytes(of: Double(value), toByteOffset: (offset + i) * 8, as: Double.self)
                }
            }
        case (_, .f32):
            decodeToFloat(from, source, destination.assumingMemoryBound(to: Float.self), count)
        default:
            // F8 / F16 / BF16 sources to F16 / BF16: decode exactly to F32, then round once.
            withFloatBlocks(from: from, count: count, source: source) { offset, block in
                convert(
                    from: .f32, to: to, count: block.count, source: UnsafeRawPointer(block.baseAddress!),
                    destination: destination + offset * to.byteWidth!)
            }
        }
    }

    /// Converts like ``convert(from:to:count:source:destination:)``, split across cores for large inputs.
    public static func convertParallel(
        from: DType, to: DType, count: Int,
        source: UnsafeRawPointer, destination: UnsafeMutableRawPointer
    ) {
        let inWidth = from.byteWidth!, outWidth = to.byteWidth!
        nonisolated(unsafe) let src = source
        nonisolated(unsafe) let dst = destination
        Parallel.forEachChunk(count: count, minimumChunk: 1 << 16, alignment: 8) { range in
            convert(
                from: from, to: to, count: range.count,
                source: src + range.lowerBound * inWidth, destination: dst + range.lowerBound * outWidth)
        }
    }

    // MARK: - Kernels

    /// Runs an element-wise kernel over typed, aligned pointers so the compiler can vectorise it. Inputs that
    /// are not aligned to their element size (MLX writes unaligned safetensors) are staged through an aligned
    /// block first.
    @inline(__always)
    static func elementwise<In, Out>(
        _ source: UnsafeRawPointer, _ destination: UnsafeMutableRawPointer, _ count: Int,
        _ kernel: (UnsafePointer<In>, UnsafeMutablePointer<Out>, Int) -> Void
    ) {
        let out = destination.assumingMemoryBound(to: Out.self)
        if Int(bitPattern: source) % MemoryLayout<In>.alignment == 0 {
            kernel(source.assumingMemoryBound(to: In.self), out, count)
            return
        }
        let block = 4096
        let staging = UnsafeMutablePointer<In>.allocate(capacity: block)
        defer { staging.deallocate() }
        var done = 0
        while done < count {
            let n = min(block, count - done)
            UnsafeMutableRawPointer(staging).copyMemory(from: source + done * MemoryLayout<In>.stride, byteCount: n * MemoryLayout<In>.stride)
            kernel(staging, out + done, n)
            done += n
        }
    }

    static func f32ToF16(_ source: UnsafeRawPointer, _ destination: UnsafeMutableRawPointer, _ count: Int) {
        elementwise(source, destination, count) { (s: UnsafePointer<UInt32>, d: UnsafeMutablePointer<UInt16>, n: Int) in
            for i in 0..<n { d[i] = FloatBits.f32ToF16(bits: s[i]) }
        }
    }

    static func f32ToBF16(_ source: UnsafeRawPointer, _ destination: UnsafeMutableRawPointer, _ count: Int) {
        elementwise(source, destination, count) { (s: UnsafePointer<UInt32>, d: UnsafeMutablePointer<UInt16>, n: Int) in
            for i in 0..<n { d[i] = FloatBits.f32ToBF16(bits: s[i]) }
        }
    }

    static func f16ToF32(_ source: UnsafeRawPointer, _ destination: UnsafeMutableRawPointer, _ count: Int) {
        elementwise(source, destination, count) { (s: UnsafePointer<UInt16>, d: UnsafeMutablePointer<UInt32>, n: Int) in
            for i in 0..<n { d[i] = FloatBits.f16ToF32(bits: s[i]) }
        }
    }

    static func bf16ToF32(_ source: UnsafeRawPointer, _ destination: UnsafeMutableRawPointer, _ count: Int) {
        elementwise(source, destination, count) { (s: UnsafePointer<UInt16>, d: UnsafeMutablePointer<UInt32>, n: Int) in
            for i in 0..<n { d[i] = UInt32(s[i]) << 16 }
        }
    }

    /// Exact decode of F16/BF16/F8/F32 (and rounded F64) to Float.
    static func decodeToFloat(_ dtype: DType, _ source: UnsafeRawPointer, _ destination: UnsafeMutablePointer<Float>, _ count: Int) {
        let raw = UnsafeMutableRawPointer(destination)
        switch dtype {
        case .f32: raw.copyMemory(from: source, byteCount: count * 4)
        case .f16: f16ToF32(source, raw, count)
        case .bf16: bf16ToF32(source, raw, count)
        case .f64:
            for i in 0..<count { destination[i] = Float(source.loadUnaligned(fromByteOffset: i * 8, as: Double.self)) }
        default:
            let table = FloatBits.table(for: dtype)!
            table.withUnsafeBufferPointer { lookup in
                let codes = source.assumingMemoryBound(to: UInt8.self)
                for i in 0..<count { destination[i] = lookup[Int(codes[i])] }
            }
        }
    }

    /// Calls `body` with successive blocks of the input decoded to Float (exactly, for all but F64).
    static func withFloatBlocks(
        from dtype: DType, count: Int, source: UnsafeRawPointer, _ body: (Int, UnsafeMutableBufferPointer<Float>) -> Void
    ) {
        let blockSize = 4096
        let width = dtype.byteWidth!
        withUnsafeTemporaryAllocation(of: Float.self, capacity: blockSize) { block in
            var offset = 0
            while offset < count {
                let n = min(blockSize, count - offset)
                decodeToFloat(dtype, source + offset * width, block.baseAddress!, n)
                body(offset, UnsafeMutableBufferPointer(rebasing: block[0..<n]))
                offset += n
            }
        }
    }

    // MARK: - Decoding to Double (comparison)

    /// Decodes `count` numeric elements (any dtype with ``DType/isNumeric``) to Double, exactly
    /// (64-bit integers beyond 2^53 round).
    public static func decodeToDouble(
        _ dtype: DType, count: Int, source: UnsafeRawPointer, destination: UnsafeMutablePointer<Double>
    ) {
        precondition(dtype.isNumeric, "\(dtype) is not numeric")
        func each<T>(_ type: T.Type, _ value: (T) -> Double) {
            let width = MemoryLayout<T>.size
            for i in 0..<count { destination[i] = value(source.loadUnaligned(fromByteOffset: i * width, as: T.self)) }
        }
        switch dtype {
        case .bool: each(UInt8.self) { $0 != 0 ? 1 : 0 }
        case .u8: each(UInt8.self) { Double($0) }
        case .i8: each(Int8.self) { Double($0) }
        case .u16: each(UInt16.self) { Double($0) }
        case .i16: each(Int16.self) { Double($0) }
        case .u32: each(UInt32.self) { Double($0) }
        case .i32: each(Int32.self) { Double($0) }
        case .u64: each(UInt64.self) { Double($0) }
        case .i64: each(Int64.self) { Double($0) }
        case .f64: UnsafeMutableRawPointer(destination).copyMemory(from: source, byteCount: count * 8)
        case .f32: each(Float.self) { Double($0) }
        default:
            withFloatBlocks(from: dtype, count: count, source: source) { offset, block in
                for (i, value) in block.enumerated() { destination[offset + i] = Double(value) }
            }
        }
    }
}

/// Splits index ranges across the machine's cores.
public enum Parallel {
    public static let coreCount: Int = {
        #if canImport(Glibc)
        return max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        #else
        return 1
        #endif
    }()

    /// Runs `body` on disjoint sub-ranges of `0..<count` (boundaries are multiples of `alignment`), concurrently
    /// when the work is large enough to pay for it.
    public static func forEachChunk(
        count: Int, minimumChunk: Int, alignment: Int = 1, _ body: @Sendable (Range<Int>) -> Void
    ) {
        let workers = min(coreCount, max(1, count / max(minimumChunk, 1)))
        if workers <= 1 {
            body(0..<count)
            return
        }
        let per = ((count + workers - 1) / workers + alignment - 1) / alignment * alignment
        DispatchQueue.concurrentPerform(iterations: workers) { worker in
            let lower = min(count, worker * per)
            let upper = min(count, lower + per)
            if lower < upper { body(lower..<upper) }
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif
