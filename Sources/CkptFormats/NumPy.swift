import CkptCore

/// NumPy `.npy` files: versions 1.0, 2.0 and 3.0, every numeric descr, either byte order, C or Fortran order.
/// Object, structured, string and datetime arrays are refused: nothing is ever unpickled.
public enum NumPy {
    public static let magic: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59]  // \x93NUMPY
    /// numpy's default `max_header_size` for `np.load`.
    public static let maximumHeaderSize = 10_000

    /// What a descr says about the elements.
    public enum ElementType: Equatable, Sendable {
        /// A numeric type; `swapBytes` when it is stored big-endian.
        case numeric(DType, swapBytes: Bool)
        /// Raw bytes of a given size (`<V2`, `|V1`): how ml_dtypes stores bfloat16/float8; needs a caller's decision.
        case void(Int)
    }

    public struct Header: Sendable, Equatable {
        public let version: (major: UInt8, minor: UInt8)
        public let descr: String
        public let elementType: ElementType
        public let fortranOrder: Bool
        public let shape: [Int]
        /// Offset of the array data from the start of the file.
        public let dataOffset: Int

        public static func == (a: Header, b: Header) -> Bool {
            a.version == b.version && a.descr == b.descr && a.elementType == b.elementType
                && a.fortranOrder == b.fortranOrder && a.shape == b.shape && a.dataOffset == b.dataOffset
        }
    }

    /// Parses and validates the magic, version and header dictionary.
    public static func parseHeader(_ bytes: UnsafeRawBufferPointer) throws(CkptError) -> Header {
        guard bytes.count >= 10 else {
            throw CkptError(.badMagic, "file is \(bytes.count) bytes, too short for an .npy preamble")
        }
        guard zip(bytes.prefix(6), magic).allSatisfy({ $0 == $1 }) else {
            throw CkptError(.badMagic, "missing the \\x93NUMPY magic string")
        }
        let major = bytes[6], minor = bytes[7]
        let lengthFieldSize: Int
        switch (major, minor) {
        case (1, 0): lengthFieldSize = 2
        case (2, 0), (3, 0): lengthFieldSize = 4
        default: throw CkptError(.unsupportedVersion, "format version \(major).\(minor); only 1.0, 2.0 and 3.0 exist")
        }
        guard bytes.count >= 8 + lengthFieldSize else {
            throw CkptError(.shortData, "file ends inside the header length field")
        }
        let headerLength = lengthFieldSize == 2
            ? Int(UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt16.self)))
            : Int(UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt32.self)))
        guard headerLength <= maximumHeaderSize else {
            throw CkptError(.headerTooLarge, "header is \(headerLength) bytes, over numpy's \(maximumHeaderSize)-byte limit")
        }
        let start = 8 + lengthFieldSize
        guard start + headerLength <= bytes.count else {
            throw CkptError(.shortData, "header of \(headerLength) bytes runs past the end of the file")
        }
        let raw = UnsafeRawBufferPointer(rebasing: bytes[start..<start + headerLength])
        let text: String
        if major == 3 {
            guard SafeTensors.validUTF8(raw) else { throw CkptError(.invalidUTF8, "version 3.0 header is not valid UTF-8") }
            text = String(decoding: raw, as: UTF8.self)
        } else {
            text = String(String.UnicodeScalarView(raw.map { Unicode.Scalar($0) }))  // latin-1
        }
        let literal = try PythonLiteral.parse(text)
        guard case .dict(let entries) = literal else {
            throw CkptError(.invalidHeader, "header is not a Python dict literal")
        }
        let keys = entries.map(\.key)
        guard Set(keys) == ["descr", "fortran_order", "shape"], keys.count == 3 else {
            throw CkptError(.invalidHeader, "header keys are \(keys.sorted()); numpy requires exactly descr, fortran_order, shape")
        }
        let values = Dictionary(entries.map { ($0.key, $0.value) }, uniquingKeysWith: { a, _ in a })
        guard case .bool(let fortran)? = values["fortran_order"] else {
            throw CkptError(.invalidHeader, "'fortran_order' is not True or False")
        }
        guard case .tuple(let dimValues)? = values["shape"] else {
            throw CkptError(.invalidHeader, "'shape' is not a tuple")
        }
        var shape: [Int] = []
        for value in dimValues {
            guard case .int(let d) = value else { throw CkptError(.invalidHeader, "'shape' holds a non-integer") }
            guard d >= 0 else { throw CkptError(.invalidHeader, "'shape' holds the negative dimension \(d)") }
            shape.append(d)
        }
        let descr: String
        switch values["descr"] {
        case .string(let s)?: descr = s
        case .list?, .tuple?:
            throw CkptError(.unsupportedDType, "structured dtype (record fields) is not a tensor")
        default:
            throw CkptError(.invalidHeader, "'descr' is not a dtype string")
        }
        return Header(
            version: (major, minor), descr: descr, elementType: try elementType(descr), fortranOrder: fortran,
            shape: shape, dataOffset: start + headerLength)
    }

    /// Maps a descr string (`<f4`, `>i8`, `|b1`, `<V2` …) to an element type.
    public static func elementType(_ descr: String) throws(CkptError) -> ElementType {
        var body = Substring(descr)
        var bigEndian = false
        if let first = body.first, "<>|=".contains(first) {
            bigEndian = first == ">"
            body = body.dropFirst()
        }
        guard let kind = body.first else { throw CkptError(.unsupportedDType, "empty descr") }
        let sizeText = body.dropFirst()
        if kind == "O" { throw CkptError(.objectArray, "object arrays (descr '\(descr)') hold pickled data; ckpt never unpickles") }
        if kind == "?" && sizeText.isEmpty { return .numeric(.bool, swapBytes: false) }
        guard let size = Int(sizeText), size > 0 else {
            throw CkptError(.unsupportedDType, "descr '\(descr)' is not a numeric dtype ckpt can read")
        }
        let dtype: DType?
        switch (kind, size) {
        case ("b", 1): dtype = .bool
        case ("i", 1): dtype = .i8
        case ("u", 1): dtype = .u8
        case ("i", 2): dtype = .i16
        case ("u", 2): dtype = .u16
        case ("i", 4): dtype = .i32
        case ("u", 4): dtype = .u32
        case ("i", 8): dtype = .i64
        case ("u", 8): dtype = .u64
        case ("f", 2): dtype = .f16
        case ("f", 4): dtype = .f32
        case ("f", 8): dtype = .f64
        case ("c", 8): dtype = .c64
        case ("c", 16): dtype = .c128
        case ("V", _): return .void(size)
        default: dtype = nil
        }
        guard let dtype else {
            let why: String
            switch kind {
            case "S", "U", "a": why = "string arrays are not tensors"
            case "M", "m": why = "datetime arrays are not tensors"
            case "f" where size == 1: why = "numpy has no 1-byte float (ml_dtypes writes float8_e5m2 this way; numpy.load rejects it too)"
            case "f" where size > 8, "c" where size > 16: why = "extended-precision floats have no portable layout"
            case "f", "c": why = "no such floating-point size"
            default: why = "unknown type"
            }
            throw CkptError(.unsupportedDType, "descr '\(descr)': \(why)")
        }
        // A complex number swaps each of its two halves.
        return .numeric(dtype, swapBytes: bigEndian && dtype.byteWidth! > 1)
    }

    /// Resolves a header's element type to a dtype, using `voidDTypes` for void descrs.
    static func resolve(_ header: Header, voidDTypes: [Int: DType], manifest: DType? = nil) throws(CkptError) -> (DType, Bool) {
        switch header.elementType {
        case .numeric(let dtype, let swap):
            if let manifest, manifest != dtype {
                throw CkptError(.invalidHeader, "descr '\(header.descr)' does not match the dtype \(manifest.name) recorded for it")
            }
            return (dtype, swap)
        case .void(let size):
            if let dtype = manifest ?? voidDTypes[size] {
                guard dtype.byteWidth == size else {
                    throw CkptError(.unsupportedDType, "\(dtype.name) is \(dtype.bitWidth / 8) bytes wide, but descr '\(header.descr)' is \(size)")
                }
                return (dtype, false)
            }
            throw CkptError(
                .unsupportedDType,
                "descr '\(header.descr)' is raw \(size)-byte data (ml_dtypes stores bfloat16 as '<V2' and float8 as '|V1'); pass --void-dtype (e.g. BF16 or F8_E4M3) to say what it holds")
        }
    }

    /// What a parsed header describes once its dtype is resolved, with the payload size checked against the
    /// `available` bytes after the header (shared by .npy files and .npz members).
    struct Payload {
        let dtype: DType
        let shape: Shape
        let byteCount: Int
        let layout: NpyLayout
    }

    static func payload(
        _ header: Header, available total: Int, voidDTypes: [Int: DType], manifest: DType? = nil, container: String
    ) throws(CkptError) -> Payload {
        let (dtype, swap) = try resolve(header, voidDTypes: voidDTypes, manifest: manifest)
        let shape = try Shape(header.shape)
        let byteCount = try shape.byteCount(for: dtype)
        let available = total - header.dataOffset
        guard available >= byteCount else {
            throw CkptError(.shortData, "array needs \(byteCount) data bytes but \(container) has \(available)")
        }
        guard available == byteCount else {
            throw CkptError(.trailingData, "\(available - byteCount) bytes follow the array data in \(container)")
        }
        return Payload(
            dtype: dtype, shape: shape, byteCount: byteCount,
            layout: NpyLayout(dataOffset: header.dataOffset, swapBytes: swap, fortranOrder: header.fortranOrder))
    }

    /// Reads a single-array `.npy` file; the tensor is named after the file (without `.npy`).
    public static func read(storage: ByteStorage, path: String, options: Checkpoint.ReadOptions) throws(CkptError) -> Checkpoint {
        let (header, entry): (Header, TensorEntry) = try storage.withUnsafeBytes { (bytes: UnsafeRawBufferPointer) throws(CkptError) in
            let header = try parseHeader(bytes)
            let p = try payload(header, available: bytes.count, voidDTypes: options.voidDTypes, container: "the file")
            var name = FilePaths.fileName(of: path)
            if name.lowercased().hasSuffix(".npy") { name = String(name.dropLast(4)) }
            let data = TensorBytes(storage: storage, range: header.dataOffset..<header.dataOffset + p.byteCount)
            let source: TensorSource = p.layout.isCanonical(shape: p.shape) ? .bytes(data) : .npyPayload(data, p.layout)
            return (header, TensorEntry(name: name, dtype: p.dtype, shape: p.shape, byteCount: p.byteCount, path: path, source: source))
        }
        var metadata: [String: String] = ["npy_version": "\(header.version.major).\(header.version.minor)", "descr": header.descr]
        if header.fortranOrder { metadata["fortran_order"] = "True" }
        return Checkpoint(format: .npy, path: path, metadata: metadata, tensors: [entry], files: [path])
    }
}

/// How an .npy payload's bytes differ from C order, little-endian.
struct NpyLayout: Sendable {
    let dataOffset: Int
    let swapBytes: Bool
    let fortranOrder: Bool

    func isCanonical(shape: Shape) -> Bool {
        !swapBytes && (!fortranOrder || shape.dims.filter { $0 > 1 }.count <= 1)
    }

    /// Returns the bytes in C order, little-endian (a copy when anything has to change).
    func canonicalize(_ bytes: TensorBytes, dtype: DType, shape: Shape) throws(CkptError) -> TensorBytes {
        if isCanonical(shape: shape) { return bytes }
        let width = dtype.byteWidth!
        // Complex values swap each real/imaginary half separately.
        let swapUnit = (dtype == .c64 || dtype == .c128) ? width / 2 : width
        let storage = try bytes.withUnsafeBytes { (source: UnsafeRawBufferPointer) throws(CkptError) in
            try ByteStorage(uninitializedCount: bytes.count) { destination in
                if fortranOrder && shape.dims.filter({ $0 > 1 }).count > 1 {
                    NpyLayout.fortranToC(source, destination, dims: shape.dims, width: width)
                } else {
                    destination.copyMemory(from: source)
                }
                if swapBytes { NpyLayout.swapInPlace(destination, unit: swapUnit) }
            }
        }
        return TensorBytes(storage: storage)
    }

    /// Fortran order is C order of the reversed shape; writes the C-order transpose.
    static func fortranToC(_ source: UnsafeRawBufferPointer, _ destination: UnsafeMutableRawBufferPointer, dims: [Int], width: Int) {
        let rank = dims.count
        // Fortran strides (in elements): stride[0] = 1, stride[k] = stride[k-1] * dims[k-1].
        var fStrides = [Int](repeating: 1, count: rank)
        for k in 1..<max(rank, 1) where rank > 1 { fStrides[k] = fStrides[k - 1] * dims[k - 1] }
        let total = dims.reduce(1, *)
        var index = [Int](repeating: 0, count: rank)
        var sourceElement = 0
        let src = source.baseAddress!, dst = destination.baseAddress!
        for c in 0..<total {
            (dst + c * width).copyMemory(from: src + sourceElement * width, byteCount: width)
            // Advance the C-order multi-index (last axis fastest), tracking the Fortran offset.
            var axis = rank - 1
            while axis >= 0 {
                index[axis] += 1
                sourceElement += fStrides[axis]
                if index[axis] < dims[axis] { break }
                sourceElement -= fStrides[axis] * dims[axis]
                index[axis] = 0
                axis -= 1
            }
        }
    }

    static func swapInPlace(_ buffer: UnsafeMutableRawBufferPointer, unit: Int) {
        guard unit > 1 else { return }
        let base = buffer.baseAddress!
        var offset = 0
        while offset + unit <= buffer.count {
            var lo = offset, hi = offset + unit - 1
            while lo < hi {
                let t = base.load(fromByteOffset: lo, as: UInt8.self)
                base.storeBytes(of: base.load(fromByteOffset: hi, as: UInt8.self), toByteOffset: lo, as: UInt8.self)
                base.storeBytes(of: t, toByteOffset: hi, as: UInt8.self)
                lo += 1
                hi -= 1
            }
            offset += unit
        }
    }
}

/// The subset of Python literal syntax .npy headers use: dicts, tuples, lists, strings, ints, booleans, None.
enum PythonLiteral: Equatable {
    case dict([(key: String, value: PythonLiteral)])
    case tuple([PythonLiteral])
    case list([PythonLiteral])
    case string(String)
    case int(Int)
    case bool(Bool)
    case none

    static func == (a: PythonLiteral, b: PythonLiteral) -> Bool {
        switch (a, b) {
        case let (.dict(x), .dict(y)): return x.count == y.count && zip(x, y).allSatisfy { $0.key == $1.key && $0.value == $1.value }
        case let (.tuple(x), .tuple(y)), let (.list(x), .list(y)): return x == y
        case let (.string(x), .string(y)): return x == y
        case let (.int(x), .int(y)): return x == y
        case let (.bool(x), .bool(y)): return x == y
        case (.none, .none): return true
        default: return false
        }
    }

    static func parse(_ text: String) throws(CkptError) -> PythonLiteral {
        var parser = Parser(scalars: Array(text.unicodeScalars))
        parser.skipSpace()
        let value = try parser.value(depth: 0)
        parser.skipSpace()
        guard parser.index == parser.scalars.count else { throw CkptError(.invalidHeader, "unexpected text after the header dict") }
        return value
    }

    private struct Parser {
        let scalars: [Unicode.Scalar]
        var index = 0

        var current: Unicode.Scalar? { index < scalars.count ? scalars[index] : nil }

        mutating func skipSpace() {
            while let c = current, c == " " || c == "\t" || c == "\n" || c == "\r" { index += 1 }
        }

        func failure(_ message: String) -> CkptError {
            CkptError(.invalidHeader, "header literal: \(message) at character \(index)")
        }

        mutating func value(depth: Int) throws(CkptError) -> PythonLiteral {
            guard depth < 32 else { throw failure("nested too deeply") }
            guard let c = current else { throw failure("unexpected end") }
            switch c {
            case "{":
                index += 1
                var entries: [(key: String, value: PythonLiteral)] = []
                while true {
                    skipSpace()
                    if current == "}" { index += 1; return .dict(entries) }
                    guard case .string(let key) = try value(depth: depth + 1) else { throw failure("dict key is not a string") }
                    skipSpace()
                    guard current == ":" else { throw failure("expected ':'") }
                    index += 1
                    skipSpace()
                    entries.append((key, try value(depth: depth + 1)))
                    skipSpace()
                    if current == "," { index += 1; continue }
                    guard current == "}" else { throw failure("expected ',' or '}'") }
                }
            case "(", "[":
                let close: Unicode.Scalar = c == "(" ? ")" : "]"
                index += 1
                var items: [PythonLiteral] = []
                var sawComma = false
                while true {
                    skipSpace()
                    if current == close { index += 1; break }
                    items.append(try value(depth: depth + 1))
                    skipSpace()
                    if current == "," { index += 1; sawComma = true; continue }
                    guard current == close else { throw failure("expected ',' or '\(close)'") }
                }
                if close == "]" { return .list(items) }
                // `(5)` is just 5 in Python; a 1-tuple needs the comma.
                if items.count == 1 && !sawComma { return items[0] }
                return .tuple(items)
            case "'", "\"":
                index += 1
                var text = String.UnicodeScalarView()
                while let s = current, s != c {
                    if s == "\\" {
                        index += 1
                        guard let e = current else { break }
                        switch e {
                        case "n": text.append("\n")
                        case "t": text.append("\t")
                        default: text.append(e)
                        }
                    } else {
                        text.append(s)
                    }
                    index += 1
                }
                guard current == c else { throw failure("unterminated string") }
                index += 1
                return .string(String(text))
            default:
                var word = ""
                while let s = current, s.properties.isAlphabetic || ("0"..."9").contains(s) || s == "-" || s == "+" || s == "_" {
                    word.unicodeScalars.append(s)
                    index += 1
                }
                switch word {
                case "True": return .bool(true)
                case "False": return .bool(false)
                case "None": return .none
                default:
                    var digits = word
                    if digits.hasSuffix("L") { digits.removeLast() }  // Python 2 longs in old headers
                    guard let n = Int(digits) else { throw failure("unexpected token '\(word)'") }
                    return .int(n)
                }
            }
        }
    }
}
