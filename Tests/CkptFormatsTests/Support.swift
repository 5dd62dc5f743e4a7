import CkptCore
import CkptFormats
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Repository paths, temporary folders and byte builders shared by the format tests.
enum Support {
    static let repositoryRoot: String = {
        var path = #filePath
        for _ in 0..<3 { path = FilePaths.directory(of: path) }  // Tests/CkptFormatsTests/Support.swift → root
        return path
    }()

    static func fixture(_ relative: String) -> String { repositoryRoot + "/fixtures/" + relative }

    static func temporaryDirectory() -> String {
        var template = Array("/tmp/ckpt-test-XXXXXX".utf8CString)
        return template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
    }

    static func read(_ path: String) throws -> [UInt8] {
        try ByteStorage(mapping: path).withUnsafeBytes { Array($0) }
    }

    static func write(_ bytes: [UInt8], to path: String) throws {
        var file = try OutputFile(path: path)
        try file.write(bytes)
        try file.commit()
    }

    static func parseJSON(file path: String) throws -> JSONValue {
        let storage = try ByteStorage(mapping: path)
        return try storage.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try JSONParser.parse(raw) }
    }

    static func checkpoint(bytes: [UInt8], name: String, options: Checkpoint.ReadOptions = .init()) throws(CkptError) -> Checkpoint {
        try Checkpoint.open(storage: ByteStorage(copying: bytes), path: name, options: options)
    }

    /// Opens and loads every tensor; returns the first error code, or nil if everything loaded.
    static func errorCode(of body: () throws(CkptError) -> Checkpoint) -> CkptError.Code? {
        do {
            let checkpoint = try body()
            for tensor in checkpoint.tensors { _ = try tensor.load() }
            return nil
        } catch {
            return error.code
        }
    }

    /// A safetensors file with the given header text (padded to 8) and data.
    static func safetensors(header: String, data: [UInt8] = [], pad: Bool = true) -> [UInt8] {
        var text = Array(header.utf8)
        if pad { text += [UInt8](repeating: 0x20, count: (8 - text.count % 8) % 8) }
        var out: [UInt8] = []
        withUnsafeBytes(of: UInt64(text.count).littleEndian) { out += $0 }
        return out + text + data
    }

    static func le16(_ v: Int) -> [UInt8] { [UInt8(v & 0xFF), UInt8((v >> 8) & 0xFF)] }
    static func le32(_ v: Int) -> [UInt8] { (0..<4).map { UInt8((v >> (8 * $0)) & 0xFF) } }
    static func le64(_ v: Int) -> [UInt8] { (0..<8).map { UInt8((v >> (8 * $0)) & 0xFF) } }

    static func crc32(_ bytes: [UInt8]) -> UInt32 {
        bytes.withUnsafeBytes { CRC32.checksum($0) }
    }
}
