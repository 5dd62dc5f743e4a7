import CkptCore

/// Reading safetensors files with every rule of the reference implementation (huggingface/safetensors), plus
/// rejection of duplicate tensor names (the reference silently keeps the last one).
public enum SafeTensors {
    /// The reference reader's `MAX_HEADER_SIZE`.
    public static let maximumHeaderSize = 100_000_000

    public struct TensorInfo: Sendable, Equatable {
        public let name: String
        public let dtype: DType
        public let shape: Shape
        /// Byte range relative to the start of the data section.
        public let dataOffsets: Range<Int>
    }

    public struct Header: Sendable {
        public let metadata: [String: String]
        /// Tensors sorted by data offset (= file order).
        public let tensors: [TensorInfo]
        /// Absolute file offset of the data section (8 + header length).
        public let dataStart: Int
    }

    /// Validates the header and layout of a whole safetensors file held in `bytes`.
    public static func parseHeader(_ bytes: UnsafeRawBufferPointer) throws(CkptError) -> Header {
        guard bytes.count >= 8 else {
            throw CkptError(.headerTooSmall, "file is \(bytes.count) bytes, shorter than the 8-byte header length")
        }
        let declared = UInt64(littleEndian: bytes.loadUnaligned(as: UInt64.self))
        guard declared <= UInt64(maximumHeaderSize) else {
            throw CkptError(.headerTooLarge, "header length \(declared) exceeds the \(maximumHeaderSize)-byte limit")
        }
        let headerLength = Int(declared)
        guard 8 + headerLength <= bytes.count else {
            throw CkptError(
                .invalidHeaderLength, "header length \(headerLength) runs past the end of the file (\(bytes.count) bytes)")
        }
        let headerBytes = UnsafeRawBufferPointer(rebasing: bytes[8..<8 + headerLength])
        guard validUTF8(headerBytes) else {
            throw CkptError(.invalidUTF8, "header is not valid UTF-8")
        }
        let json = try JSONParser.parse(headerBytes)
        guard case .object(let members) = json else {
            throw CkptError(.invalidHeader, "header is a JSON \(json.typeName), expected an object")
        }

        var metadata: [String: String] = [:]
        var seen = Set<NameKey>()
        var tensors: [TensorInfo] = []
        tensors.reserveCapacity(members.count)
        for (key, value) in members {
            guard seen.insert(NameKey(key)).inserted else {
                throw CkptError(.duplicateName, "name appears more than once in the header", tensor: key)
            }
            if key == "__metadata__" {
                metadata = try parseMetadata(value)
                continue
            }
            tensors.append(try parseTensor(key, value))
        }

        // Like the reference: order by offsets, then require contiguity from 0 and exact coverage.
        tensors.sort { ($0.dataOffsets.lowerBound, $0.dataOffsets.upperBound) < ($1.dataOffsets.lowerBound, $1.dataOffsets.upperBound) }
        var end = 0
        for tensor in tensors {
            guard tensor.dataOffsets.lowerBound == end else {
                let problem = tensor.dataOffsets.lowerBound < end ? "overlaps the previous tensor" : "leaves a gap after the previous tensor"
                throw CkptError(
                    .invalidOffset,
                    "data_offsets [\(tensor.dataOffsets.lowerBound), \(tensor.dataOffsets.upperBound)] \(problem) (expected begin \(end))",
                    tensor: tensor.name)
            }
            let expected: Int
            do {
                expected = try tensor.shape.byteCount(for: tensor.dtype)
            } catch {
                throw error.at(tensor: tensor.name)
            }
            guard tensor.dataOffsets.count == expected else {
                throw CkptError(
                    .tensorInvalidInfo,
                    "data_offsets span \(tensor.dataOffsets.count) bytes but shape \(tensor.shape) of \(tensor.dtype.name) needs \(expected)",
                    tensor: tensor.name)
            }
            end = tensor.dataOffsets.upperBound
        }
        let dataStart = 8 + headerLength
        let (fileEnd, overflow) = dataStart.addingReportingOverflow(end)
        guard !overflow, fileEnd == bytes.count else {
            let problem = !overflow && fileEnd < bytes.count
                ? "\(bytes.count - fileEnd) trailing bytes after the last tensor"
                : "tensors need \(end) data bytes but the file has \(bytes.count - dataStart)"
            throw CkptError(.incompleteBuffer, "data section not covered exactly: \(problem)")
        }
        return Header(metadata: metadata, tensors: tensors, dataStart: dataStart)
    }

    /// Strict UTF-8 validation (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF).
    static func validUTF8(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var i = 0
        let n = bytes.count
        while i < n {
            let b0 = bytes[i]
            if b0 < 0x80 {
                i += 1
                continue
            }
            let length: Int
            var lower: UInt8 = 0x80, upper: UInt8 = 0xBF
            switch b0 {
            case 0xC2...0xDF: length = 2
            case 0xE0: length = 3; lower = 0xA0
            case 0xE1...0xEC, 0xEE...0xEF: length = 3
            case 0xED: length = 3; upper = 0x9F
            case 0xF0: length = 4; lower = 0x90
            case 0xF1...0xF3: length = 4
            case 0xF4: length = 4; upper = 0x8F
            default: return false
            }
            guard i + length <= n else { return false }
            let b1 = bytes[i + 1]
            guard b1 >= lower && b1 <= upper else { return false }
            for k in 2..<length where bytes[i + k] & 0xC0 != 0x80 { return false }
            i += length
        }
        return true
    }

    private static func parseMetadata(_ value: JSONValue) throws(CkptError) -> [String: String] {
        switch value {
        case .null:
            return [:]
        case .object(let entries):
            var result: [String: String] = [:]
            for (key, entry) in entries {
                guard case .string(let text) = entry else {
                    throw CkptError(.invalidMetadata, "__metadata__ value for '\(key)' is a \(entry.typeName); values must be strings")
                }
                guard result.updateValue(text, forKey: key) == nil else {
                    throw CkptError(.duplicateName, "__metadata__ key '\(key)' appears more than once")
                }
            }
            return result
        default:
            throw CkptError(.invalidMetadata, "__metadata__ is a \(value.typeName); it must be an object of strings")
        }
    }

    private static func parseTensor(_ name: String, _ value: JSONValue) throws(CkptError) -> TensorInfo {
        guard case .object = value else {
            throw CkptError(.invalidHeader, "entry is a JSON \(value.typeName), expected an object", tensor: name)
        }
        if let field = value.repeatedKey {
            throw CkptError(.invalidHeader, "field '\(field)' appears twice in the entry", tensor: name)
        }
        guard case .string(let dtypeName)? = value["dtype"] else {
            throw CkptError(.invalidHeader, "missing or non-string 'dtype'", tensor: name)
        }
        guard let dtype = DType(safetensorsName: dtypeName) else {
            throw CkptError(.unknownDType, "unknown dtype '\(dtypeName)'", tensor: name)
        }
        guard case .array(let shapeValues)? = value["shape"] else {
            throw CkptError(.invalidHeader, "missing or non-array 'shape'", tensor: name)
        }
        var dims: [Int] = []
        for dim in shapeValues {
            guard let d = dim.unsignedInteger else {
                throw CkptError(.invalidHeader, "shape entries must be non-negative integers", tensor: name)
            }
            guard d <= UInt64(Int.max) else {
                throw CkptError(.overflow, "shape dimension \(d) overflows", tensor: name)
            }
            dims.append(Int(d))
        }
        guard case .array(let offsets)? = value["data_offsets"], offsets.count == 2,
            let begin = offsets[0].unsignedInteger, let end = offsets[1].unsignedInteger
        else {
            throw CkptError(.invalidHeader, "'data_offsets' must be two non-negative integers", tensor: name)
        }
        guard begin <= UInt64(Int.max), end <= UInt64(Int.max) else {
            throw CkptError(.overflow, "data_offsets [\(begin), \(end)] overflow", tensor: name)
        }
        guard end >= begin else {
            throw CkptError(.invalidOffset, "data_offsets end \(end) is before begin \(begin)", tensor: name)
        }
        let shape: Shape
        do {
            shape = try Shape(dims)
        } catch {
            throw error.at(tensor: name)
        }
        return TensorInfo(name: name, dtype: dtype, shape: shape, dataOffsets: Int(begin)..<Int(end))
    }

    /// Reads a safetensors file from mapped or in-memory bytes; tensors are zero-copy views.
    public static func read(storage: ByteStorage, path: String) throws(CkptError) -> Checkpoint {
        let header: Header
        do {
            header = try storage.withUnsafeBytes { (bytes: UnsafeRawBufferPointer) throws(CkptError) in try parseHeader(bytes) }
        } catch {
            throw error.at(path: path)
        }
        let tensors = header.tensors.map { info in
            let range = header.dataStart + info.dataOffsets.lowerBound..<header.dataStart + info.dataOffsets.upperBound
            return TensorEntry(
                name: info.name, dtype: info.dtype, shape: info.shape, byteCount: info.dataOffsets.count, path: path,
                source: .bytes(TensorBytes(storage: storage, range: range)))
        }
        return Checkpoint(format: .safetensors, path: path, metadata: header.metadata, tensors: tensors, files: [path])
    }
}
