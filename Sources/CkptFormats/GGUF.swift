import CkptCore

/// GGUF version 3, little-endian: ggml's single-file format (header, typed key/value metadata, tensor infos,
/// aligned tensor data). The reader applies the rules of ggml's own loader (`gguf_init_from_file` in gguf.cpp), so
/// a file ckpt accepts is one llama.cpp can load, and checks every count and length against the file size before
/// allocating anything for it.
public enum GGUF {
    public static let magic: [UInt8] = Array("GGUF".utf8)
    public static let version: UInt32 = 3
    /// Used when `general.alignment` is absent (`GGUF_DEFAULT_ALIGNMENT`).
    public static let defaultAlignment = 32
    /// Newer ggml refuses larger alignments: padding a file could ask for would be unbounded otherwise.
    public static let maximumAlignment = 1 << 20
    /// `GGML_MAX_NAME` is 64 including the terminating NUL.
    public static let maximumNameBytes = 63
    /// `GGML_MAX_DIMS`.
    public static let maximumDimensions = 4
    /// `GGUF_MAX_STRING_LENGTH` and `GGUF_MAX_ARRAY_ELEMENTS` (2^30 at ggml d99724f2).
    public static let maximumStringBytes = 1 << 30
    public static let maximumArrayElements = 1 << 30
    /// Arrays longer than this are summarised in ``Checkpoint/metadata`` (a tokenizer's vocabulary, say).
    public static let renderedArrayElements = 1024
    /// `GGML_QNT_VERSION`: the block layouts of the quantized types, recorded in `general.quantization_version`.
    public static let quantizationVersion: UInt32 = 2

    public static let architectureKey = "general.architecture"
    public static let alignmentKey = "general.alignment"
    public static let quantizationVersionKey = "general.quantization_version"
    public static let fileTypeKey = "general.file_type"

    /// Metadata value types (`enum gguf_type`).
    public enum ValueType: UInt32, Sendable, CaseIterable {
        case uint8 = 0, int8, uint16, int16, uint32, int32, float32, bool, string, array, uint64, int64, float64

        /// gguf.cpp's short names (`u8`, `f32`, `str`, `arr`…).
        public var name: String {
            switch self {
            case .uint8: return "u8"
            case .int8: return "i8"
            case .uint16: return "u16"
            case .int16: return "i16"
            case .uint32: return "u32"
            case .int32: return "i32"
            case .float32: return "f32"
            case .bool: return "bool"
            case .string: return "str"
            case .array: return "arr"
            case .uint64: return "u64"
            case .int64: return "i64"
            case .float64: return "f64"
            }
        }

        /// Encoded size of one value; nil for strings and arrays.
        public var fixedSize: Int? {
            switch self {
            case .uint8, .int8, .bool: return 1
            case .uint16, .int16: return 2
            case .uint32, .int32, .float32: return 4
            case .uint64, .int64, .float64: return 8
            case .string, .array: return nil
            }
        }
    }

    /// One key's metadata as read: its type and its value rendered as text for ``Checkpoint/metadata``.
    public struct MetadataEntry: Sendable, Equatable {
        public let key: String
        public let type: ValueType
        /// Element type and count for arrays.
        public let arrayType: ValueType?
        public let arrayCount: Int
        /// Numbers in decimal, bools as `true`/`false`, strings as they are, arrays as compact JSON (or a
        /// summary beyond ``renderedArrayElements``).
        public let text: String
    }

    public struct TensorInfo: Sendable, Equatable {
        public let name: String
        public let type: GGMLType
        /// ggml order: `ne[0]` is the innermost (contiguous) dimension.
        public let dimensions: [Int]
        /// PyTorch order: the dimensions reversed (`ne = [in, out]` → `[out, in]`).
        public let shape: Shape
        /// Byte offset relative to the data section.
        public let offset: Int
        public let byteCount: Int

        public var elements: Int { shape.elements }
    }

    public struct Header: Sendable {
        public let metadata: [MetadataEntry]
        public let alignment: Int
        public let tensors: [TensorInfo]
        /// Absolute file offset of the data section.
        public let dataStart: Int
    }

    /// ggml type ids ckpt does not read, named for error messages (ggml.h; 4, 5, 31–33 and 36–38 were removed).
    static let unsupportedTypeNames: [UInt32: String] = [
        4: "Q4_2 (removed)", 5: "Q4_3 (removed)", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 13: "Q5_K", 15: "Q8_K",
        16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
        29: "IQ1_M", 31: "Q4_0_4_4 (removed)", 32: "Q4_0_4_8 (removed)", 33: "Q4_0_8_8 (removed)", 34: "TQ1_0",
        35: "TQ2_0", 36: "IQ4_NL_4_4 (removed)", 37: "IQ4_NL_4_8 (removed)", 38: "IQ4_NL_8_8 (removed)",
        39: "MXFP4", 40: "NVFP4", 41: "Q1_0", 42: "Q2_0",
    ]

    /// `offset` rounded up to a multiple of `alignment` (a power of two); nil on overflow.
    static func aligned(_ offset: Int, _ alignment: Int) -> Int? {
        let (sum, overflow) = offset.addingReportingOverflow(alignment - 1)
        return overflow ? nil : sum & ~(alignment - 1)
    }

    // MARK: - Header

    /// Validates the header and layout of a whole GGUF file held in `bytes`.
    public static func parseHeader(_ bytes: UnsafeRawBufferPointer) throws(CkptError) -> Header {
        guard bytes.count >= 4, bytes.prefix(4).elementsEqual(magic) else {
            let shown = bytes.prefix(4).map { $0 >= 0x20 && $0 < 0x7F ? String(UnicodeScalar($0)) : "?" }.joined()
            throw CkptError(.badMagic, "file starts with '\(shown)', not the GGUF magic 'GGUF'")
        }
        var reader = Reader(bytes: bytes, offset: 4)
        let fileVersion = try reader.u32("the version")
        try checkVersion(fileVersion)
        let tensorCount = try reader.count("tensor_count")
        let kvCount = try reader.count("kv_count")
        // The smallest tensor info is 24 bytes (empty name, no dims) and the smallest key/value 14 (a 1-byte key,
        // a u8 value): counts that cannot fit in the rest of the file are refused before anything is reserved.
        let (tensorBytes, o1) = tensorCount.multipliedReportingOverflow(by: 24)
        let (kvBytes, o2) = kvCount.multipliedReportingOverflow(by: 14)
        let (needed, o3) = tensorBytes.addingReportingOverflow(kvBytes)
        guard !o1, !o2, !o3, needed <= reader.remaining else {
            throw CkptError(
                .tooLarge,
                "tensor_count \(tensorCount) and kv_count \(kvCount) need at least \(o1 || o2 || o3 ? "2^63" : String(needed)) bytes of header, but only \(reader.remaining) bytes follow")
        }

        var metadata: [MetadataEntry] = []
        metadata.reserveCapacity(kvCount)
        var keys = Set<NameKey>()
        var alignment = defaultAlignment
        for index in 0..<kvCount {
            let key = try reader.string("the key of key/value pair \(index)")
            guard !key.isEmpty else {
                throw CkptError(.invalidMetadata, "key/value pair \(index) has an empty key (ggml requires a name)")
            }
            guard keys.insert(NameKey(key)).inserted else {
                throw CkptError(.duplicateName, "metadata key '\(key)' appears more than once")
            }
            let entry = try reader.metadataValue(key: key)
            if key == alignmentKey {
                alignment = try checkAlignment(entry)
            }
            metadata.append(entry)
        }

        var tensors: [TensorInfo] = []
        tensors.reserveCapacity(tensorCount)
        var names = Set<NameKey>()
        for index in 0..<tensorCount {
            let info = try reader.tensorInfo(index: index)
            guard names.insert(NameKey(info.name)).inserted else {
                throw CkptError(.duplicateName, "tensor name appears more than once (tensor info \(index))", tensor: info.name)
            }
            tensors.append(info)
        }

        // The data section starts at the next multiple of the alignment (ggml skips that padding only when there
        // are tensors), and each tensor starts exactly where the previous one's padded data ends.
        var dataStart = reader.offset
        if tensorCount > 0 {
            guard let start = aligned(reader.offset, alignment), start <= bytes.count else {
                throw CkptError(
                    .incompleteBuffer,
                    "the data section would start at \(reader.offset) rounded up to a multiple of \(alignment), past the end of the file (\(bytes.count) bytes)")
            }
            dataStart = start
        }
        var expected = 0
        for tensor in tensors {
            guard tensor.offset == expected else {
                throw CkptError(
                    .invalidOffset,
                    "data offset \(tensor.offset), expected \(expected): tensors must follow each other in info order, each padded to the \(alignment)-byte alignment",
                    tensor: tensor.name)
            }
            let (end, o4) = dataStart.addingReportingOverflow(tensor.offset)
            let (last, o5) = end.addingReportingOverflow(tensor.byteCount)
            guard !o4, !o5, last <= bytes.count else {
                throw CkptError(
                    .incompleteBuffer,
                    "data runs to byte \(o4 || o5 ? "beyond 2^63" : String(last)) but the file is \(bytes.count) bytes (truncated?)",
                    tensor: tensor.name)
            }
            guard let next = aligned(tensor.offset + tensor.byteCount, alignment) else {
                throw CkptError(.overflow, "data offset overflows", tensor: tensor.name)
            }
            expected = next
        }
        return Header(metadata: metadata, alignment: alignment, tensors: tensors, dataStart: dataStart)
    }

    static func checkVersion(_ fileVersion: UInt32) throws(CkptError) {
        if fileVersion == version { return }
        let message: String
        if fileVersion == 0 {
            message = "version 0 is not a GGUF version"
        } else if fileVersion & 0xFFFF == 0 {
            message = "version \(fileVersion) (0x\(String(fileVersion, radix: 16))) reads like a byte-swapped 3: a big-endian GGUF file? ckpt reads little-endian GGUF v3 only"
        } else if fileVersion == 1 {
            message = "GGUF v1 is no longer supported (ggml refuses it too); convert the file with a current llama.cpp"
        } else if fileVersion == 2 {
            message = "GGUF v2 is not supported: ckpt reads version 3 only; re-save the file with a current gguf-py or llama.cpp"
        } else {
            message = "GGUF version \(fileVersion) is newer than the version 3 ckpt reads"
        }
        throw CkptError(.unsupportedVersion, message)
    }

    /// `general.alignment` must be a UINT32 (ggml's getter aborts otherwise), a power of two, at most 1 MiB.
    static func checkAlignment(_ entry: MetadataEntry) throws(CkptError) -> Int {
        guard entry.type == .uint32, let value = Int(entry.text) else {
            throw CkptError(.invalidMetadata, "'\(alignmentKey)' is of type \(entry.arrayType.map { "arr[\($0.name)]" } ?? entry.type.name); ggml requires u32")
        }
        guard value > 0, value & (value - 1) == 0, value <= maximumAlignment else {
            throw CkptError(.invalidMetadata, "'\(alignmentKey)' is \(value); it must be a power of two no larger than \(maximumAlignment)")
        }
        return value
    }

    // MARK: - Checkpoint

    /// Reads a GGUF file from mapped or in-memory bytes. Plain tensors are zero-copy views; quantized ones are
    /// F32 tensors dequantized when loaded.
    public static func read(storage: ByteStorage, path: String) throws(CkptError) -> Checkpoint {
        let header: Header
        do {
            header = try storage.withUnsafeBytes { (bytes: UnsafeRawBufferPointer) throws(CkptError) in try parseHeader(bytes) }
        } catch {
            throw error.at(path: path)
        }
        var metadata: [String: String] = [:]
        for entry in header.metadata { metadata[entry.key] = entry.text }
        var tensors: [TensorEntry] = []
        tensors.reserveCapacity(header.tensors.count)
        for info in header.tensors {
            let start = header.dataStart + info.offset
            let bytes = TensorBytes(storage: storage, range: start..<start + info.byteCount)
            if let dtype = info.type.plainDType {
                tensors.append(TensorEntry(
                    name: info.name, dtype: dtype, shape: info.shape, byteCount: info.byteCount, path: path, source: .bytes(bytes)))
                continue
            }
            let type = info.type, count = info.elements
            let quantization = QuantizationDescription(
                scheme: type.name, bits: type.bits, groupSize: type.blockSize, symmetric: type.isSymmetric,
                storedBytes: info.byteCount, storedTensors: [info.name])
            tensors.append(try TensorEntry(name: info.name, dtype: .f32, shape: info.shape, path: path, quantization: quantization) {
                () throws(CkptError) -> TensorBytes in
                let decoded = try ByteStorage(uninitializedCount: count * 4) { (output: UnsafeMutableRawBufferPointer) in
                    guard count > 0 else { return }
                    bytes.withUnsafeBytes { (raw: UnsafeRawBufferPointer) in
                        GGMLQuants.dequantizeParallel(
                            type, source: raw.baseAddress!, count: count, destination: output.baseAddress!.assumingMemoryBound(to: Float.self))
                    }
                }
                bytes.doneReading()
                return TensorBytes(storage: decoded)
            })
        }
        return Checkpoint(format: .gguf, path: path, metadata: metadata, tensors: tensors, files: [path])
    }
}

// MARK: - Reading primitives

extension GGUF {
    /// A bounds-checked little-endian cursor over the file.
    struct Reader {
        let bytes: UnsafeRawBufferPointer
        var offset: Int

        var remaining: Int { bytes.count - offset }

        func truncated(_ what: String, needs: Int) -> CkptError {
            CkptError(
                .invalidHeader,
                "truncated header: \(what) needs \(needs) bytes at offset \(offset), but the file ends at \(bytes.count)")
        }

        mutating func skip(_ count: Int, _ what: String) throws(CkptError) {
            guard count <= remaining else { throw truncated(what, needs: count) }
            offset += count
        }

        mutating func load<T: FixedWidthInteger>(_ type: T.Type, _ what: String) throws(CkptError) -> T {
            let size = MemoryLayout<T>.size
            guard size <= remaining else { throw truncated(what, needs: size) }
            let value = T(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: T.self))
            offset += size
            return value
        }

        mutating func u32(_ what: String) throws(CkptError) -> UInt32 { try load(UInt32.self, what) }

        /// A u64 count that ggml reads as int64 and requires to be non-negative.
        mutating func count(_ what: String) throws(CkptError) -> Int {
            let value = try load(UInt64.self, what)
            guard value <= UInt64(Int64.max) else {
                throw CkptError(.tooLarge, "\(what) \(Int64(bitPattern: value)) is negative as ggml reads it (int64)")
            }
            return Int(value)
        }

        /// A length-prefixed string: bounded by ggml's limit and by the bytes left, and valid UTF-8.
        mutating func string(_ what: String) throws(CkptError) -> String {
            let range = try stringRange(what)
            return String(decoding: UnsafeRawBufferPointer(rebasing: bytes[range]), as: UTF8.self)
        }

        /// The byte range of a length-prefixed string, validated like ``string(_:)`` but not decoded.
        mutating func stringRange(_ what: String) throws(CkptError) -> Range<Int> {
            let length = try load(UInt64.self, "the length of \(what)")
            guard length <= UInt64(GGUF.maximumStringBytes) else {
                throw CkptError(.tooLarge, "\(what) is \(length) bytes long, over ggml's limit of \(GGUF.maximumStringBytes)")
            }
            guard Int(length) <= remaining else { throw truncated(what, needs: Int(length)) }
            let range = offset..<offset + Int(length)
            guard SafeTensors.validUTF8(UnsafeRawBufferPointer(rebasing: bytes[range])) else {
                throw CkptError(.invalidUTF8, "\(what) is not valid UTF-8")
            }
            offset += Int(length)
            return range
        }

        mutating func valueType(_ what: String) throws(CkptError) -> ValueType {
            // ggml reads the type as int32; anything outside the enum is refused.
            let raw = try u32(what)
            guard let type = ValueType(rawValue: raw) else {
                throw CkptError(.invalidMetadata, "\(what) is \(Int32(bitPattern: raw)), not a GGUF value type (0…12)")
            }
            return type
        }

        /// One scalar value as text (strings as they are).
        mutating func scalarText(_ type: ValueType, key: String) throws(CkptError) -> String {
            let what = "the value of '\(key)'"
            switch type {
            case .uint8: return String(try load(UInt8.self, what))
            case .int8: return String(try load(Int8.self, what))
            case .uint16: return String(try load(UInt16.self, what))
            case .int16: return String(try load(Int16.self, what))
            case .uint32: return String(try load(UInt32.self, what))
            case .int32: return String(try load(Int32.self, what))
            case .uint64: return String(try load(UInt64.self, what))
            case .int64: return String(try load(Int64.self, what))
            case .float32: return "\(Float(bitPattern: try load(UInt32.self, what)))"
            case .float64: return "\(Double(bitPattern: try load(UInt64.self, what)))"
            case .bool: return try load(UInt8.self, what) != 0 ? "true" : "false"  // ggml: any non-zero byte is true
            case .string: return try string(what)
            case .array: preconditionFailure("arrays are read by metadataValue")
            }
        }

        mutating func metadataValue(key: String) throws(CkptError) -> MetadataEntry {
            let type = try valueType("the type of '\(key)'")
            guard type == .array else {
                return MetadataEntry(key: key, type: type, arrayType: nil, arrayCount: 0, text: try scalarText(type, key: key))
            }
            let elementType = try valueType("the element type of array '\(key)'")
            guard elementType != .array else {
                throw CkptError(.invalidMetadata, "'\(key)' is an array of arrays; ggml does not read nested arrays")
            }
            let rawCount = try load(UInt64.self, "the length of array '\(key)'")
            guard rawCount <= UInt64(GGUF.maximumArrayElements) else {
                throw CkptError(.tooLarge, "array '\(key)' has \(rawCount) elements, over ggml's limit of \(GGUF.maximumArrayElements)")
            }
            let count = Int(rawCount)
            // Strings take at least their 8-byte length each.
            let minimum = count * (elementType.fixedSize ?? 8)
            guard minimum <= remaining else { throw truncated("array '\(key)' of \(count) \(elementType.name)", needs: minimum) }
            let rendered = Swift.min(count, GGUF.renderedArrayElements)
            var text = "["
            for i in 0..<rendered {
                if i > 0 { text += "," }
                let element = try scalarText(elementType, key: key)
                switch elementType {
                case .string: JSONWriter.appendString(element, to: &text)
                case .float32, .float64: text += Double(element).map { $0.isFinite } == true ? element : "\"\(element)\""
                default: text += element
                }
            }
            text += "]"
            if count > rendered {
                // Skip the rest, still checking every string's length and encoding.
                if let size = elementType.fixedSize {
                    try skip((count - rendered) * size, "array '\(key)'")
                } else {
                    for _ in rendered..<count { _ = try stringRange("an element of array '\(key)'") }
                }
                text = "[\(count) × \(elementType.name)]"
            }
            return MetadataEntry(key: key, type: .array, arrayType: elementType, arrayCount: count, text: text)
        }

        mutating func tensorInfo(index: Int) throws(CkptError) -> TensorInfo {
            let nameRange = try stringRange("the name of tensor info \(index)")
            let name = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[nameRange]), as: UTF8.self)
            guard nameRange.count <= GGUF.maximumNameBytes else {
                throw CkptError(.invalidHeader, "name is \(nameRange.count) bytes; ggml allows at most \(GGUF.maximumNameBytes)", tensor: name)
            }
            guard !bytes[nameRange].contains(0) else {
                throw CkptError(.invalidHeader, "name contains a NUL byte (ggml would cut the name there)", tensor: name)
            }
            let dimensionCount = try u32("the n_dims of '\(name)'")
            guard dimensionCount <= UInt32(GGUF.maximumDimensions) else {
                throw CkptError(.invalidHeader, "n_dims is \(dimensionCount); ggml allows at most \(GGUF.maximumDimensions)", tensor: name)
            }
            var dimensions: [Int] = []
            for j in 0..<Int(dimensionCount) {
                let value = try load(UInt64.self, "ne[\(j)] of '\(name)'")
                guard value <= UInt64(Int64.max) else {
                    throw CkptError(.invalidHeader, "ne[\(j)] is \(Int64(bitPattern: value)); dimensions must be non-negative", tensor: name)
                }
                dimensions.append(Int(value))
            }
            let shape: Shape
            do { shape = try Shape(dimensions.reversed()) } catch { throw error.at(tensor: name) }
            let elements = try shape.elementCount()
            let rawType = try u32("the type of '\(name)'")
            guard let type = GGMLType(rawValue: rawType) else {
                let known = GGUF.unsupportedTypeNames[rawType].map { " (\($0))" } ?? ""
                throw CkptError(
                    .unsupportedDType,
                    "ggml type \(Int32(bitPattern: rawType))\(known) is not supported; ckpt reads F32, F16, BF16, F64, I8–I64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q6_K",
                    tensor: name)
            }
            let rowLength = dimensions.first ?? 1
            guard rowLength % type.blockSize == 0 else {
                throw CkptError(
                    .misalignedSlice, "ne[0] = \(rowLength) is not a multiple of the \(type.name) block size \(type.blockSize)", tensor: name)
            }
            guard let byteCount = type.byteCount(elements: elements) else {
                throw CkptError(.overflow, "byte count of ne \(dimensions) × \(type.name) overflows", tensor: name)
            }
            let offset = try load(UInt64.self, "the data offset of '\(name)'")
            guard offset <= UInt64(Int.max) else {
                throw CkptError(.invalidOffset, "data offset \(offset) is beyond any file", tensor: name)
            }
            return TensorInfo(name: name, type: type, dimensions: dimensions, shape: shape, offset: Int(offset), byteCount: byteCount)
        }
    }
}
