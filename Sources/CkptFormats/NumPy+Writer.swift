import CkptCore

extension NumPy {
    /// The descr ckpt writes for a dtype: numpy's own where numpy has one; for BF16 and the F8 formats the void
    /// descr ml_dtypes produces (`<V2`, `<V1`), so the bytes stay intact and `.view(ml_dtypes.…)` recovers them.
    public static func descr(for dtype: DType) throws(CkptError) -> String {
        switch dtype {
        case .bool: return "|b1"
        case .u8: return "|u1"
        case .i8: return "|i1"
        case .u16: return "<u2"
        case .i16: return "<i2"
        case .u32: return "<u4"
        case .i32: return "<i4"
        case .u64: return "<u8"
        case .i64: return "<i8"
        case .f16: return "<f2"
        case .f32: return "<f4"
        case .f64: return "<f8"
        case .c64: return "<c8"
        case .c128: return "<c16"
        case .bf16: return "<V2"
        case .f8E4M3, .f8E5M2, .f8E8M0, .f8E4M3FNUZ, .f8E5M2FNUZ: return "<V1"
        case .f4, .f6E2M3, .f6E3M2:
            throw CkptError(.unsupportedDType, "\(dtype.name) packs several elements per byte; numpy has no such dtype")
        }
    }

    /// Whether numpy reads the dtype back as itself (false for the void-stored ones).
    public static func hasNativeDescr(_ dtype: DType) -> Bool {
        (try? descr(for: dtype)).map { !$0.contains("V") } ?? false
    }

    /// The preamble and header numpy's `np.save` writes (format 1.0, or 2.0 if the header outgrows 65535 bytes):
    /// sorted keys, `(n,)` for 1-tuples, spare spaces for in-place growth, data 64-byte aligned.
    public static func headerBytes(descr: String, shape: [Int]) -> [UInt8] {
        let shapeText: String
        switch shape.count {
        case 0: shapeText = "()"
        case 1: shapeText = "(\(shape[0]),)"
        default: shapeText = "(" + shape.map(String.init).joined(separator: ", ") + ")"
        }
        var header = "{'descr': '\(descr)', 'fortran_order': False, 'shape': \(shapeText), }"
        // numpy leaves room to rewrite the first dimension with up to 21 digits.
        if let first = shape.first { header += String(repeating: " ", count: max(0, 21 - String(first).count)) }
        var body = Array(header.utf8)
        var lengthFieldSize = 2
        var padding = 64 - ((6 + 2 + lengthFieldSize + body.count + 1) % 64)
        if body.count + padding + 1 > 65535 {
            lengthFieldSize = 4
            padding = 64 - ((6 + 2 + lengthFieldSize + body.count + 1) % 64)
        }
        body.append(contentsOf: repeatElement(0x20, count: padding))
        body.append(0x0A)
        var result = magic + [lengthFieldSize == 2 ? 1 : 2, 0]
        if lengthFieldSize == 2 {
            withUnsafeBytes(of: UInt16(body.count).littleEndian) { result.append(contentsOf: $0) }
        } else {
            withUnsafeBytes(of: UInt32(body.count).littleEndian) { result.append(contentsOf: $0) }
        }
        return result + body
    }

    /// Writes one tensor as a `.npy` file, atomically.
    public static func write(_ tensor: OutputTensor, to path: String, inputs: [FileIdentity] = [], progress: ProgressReporter? = nil) throws(CkptError) {
        let header: [UInt8]
        do {
            header = headerBytes(descr: try descr(for: tensor.dtype), shape: tensor.shape.dims)
        } catch {
            throw error.at(tensor: tensor.name).at(path: path)
        }
        var file = try OutputFile(path: path, inputs: inputs)
        try file.write(header)
        try tensor.write { (chunk: UnsafeRawBufferPointer) throws(CkptError) in
            try file.write(chunk)
            progress?.advance(bytes: chunk.count)
        }
        progress?.finishedTensor()
        try file.commit()
    }
}
