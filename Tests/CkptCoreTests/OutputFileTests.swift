import CkptCore
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("Atomic output files")
struct OutputFileTests {
    func temporaryDirectory() -> String {
        var template = Array("/tmp/ckpt-test-XXXXXX".utf8CString)
        let path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
        return path
    }

    @Test("nothing appears until commit; dropping an uncommitted file leaves nothing behind")
    func atomicity() throws {
        let dir = temporaryDirectory()
        let path = dir + "/out.bin"
        do {
            var file = try OutputFile(path: path)
            try file.write([1, 2, 3])
            #expect(FileIdentity.of(path) == nil)
            #expect(try FilePaths.contents(of: dir).count == 1, "only the temporary file exists")
        }
        #expect(try FilePaths.contents(of: dir).isEmpty, "the temporary file is removed on drop")
        var file = try OutputFile(path: path)
        try file.write([1, 2, 3, 4])
        try file.patch([9], at: 1)
        try file.commit()
        #expect(FileIdentity.of(path)?.size == 4)
        #expect(try FilePaths.contents(of: dir) == ["out.bin"])
        let storage = try ByteStorage(mapping: path)
        #expect(storage.withUnsafeBytes { Array($0) } == [1, 9, 3, 4])
    }

    @Test("refuses to overwrite an input")
    func refusesInput() throws {
        let dir = temporaryDirectory()
        let path = dir + "/in.bin"
        var file = try OutputFile(path: path)
        try file.write([1])
        try file.commit()
        let identity = try #require(FileIdentity.of(path))
        do {
            _ = try OutputFile(path: path, inputs: [identity])
            Issue.record("expected sameInputOutput")
        } catch {
            #expect(error.code == .sameInputOutput)
        }
        #expect(try FilePaths.contents(of: dir) == ["in.bin"])
    }

    @Test("large writes bypass the buffer and keep order")
    func largeWrites() throws {
        let dir = temporaryDirectory()
        var file = try OutputFile(path: dir + "/big.bin")
        let big = [UInt8](repeating: 7, count: 3 << 20)
        try file.write([1])
        try file.write(big)
        try file.write([2])
        #expect(file.offset == big.count + 2)
        try file.commit()
        let bytes = try ByteStorage(mapping: dir + "/big.bin").withUnsafeBytes { Array($0) }
        #expect(bytes.first == 1 && bytes.last == 2 && bytes.count == big.count + 2 && bytes[1] == 7)
    }

    @Test("positional writes land anywhere, also past the end; sequential writes continue after the furthest byte")
    func positionalWrites() throws {
        let dir = temporaryDirectory()
        var file = try OutputFile(path: dir + "/p.bin")
        try file.write([1, 2])  // buffered, flushed by the positional write
        try [UInt8]([7, 8]).withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try file.write(raw, at: 6) }
        #expect(file.offset == 8)
        try [UInt8]([5]).withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try file.write(raw, at: 3) }
        #expect(file.offset == 8, "a write inside the file does not move the end")
        try file.write([3])
        try file.commit()
        let bytes = try ByteStorage(mapping: dir + "/p.bin").withUnsafeBytes { Array($0) }
        #expect(bytes == [1, 2, 0, 5, 0, 0, 7, 8, 3])
    }
}
