import CkptCore
import CkptFormats
import Testing

@Suite("npz")
struct NPZTests {
    func sampleTensors() throws -> [OutputTensor] {
        let floats = (0..<1000).flatMap { i -> [UInt8] in withUnsafeBytes(of: Float(i) * 0.25) { Array($0) } }
        return [
            try OutputTensor.bytes(name: "w", dtype: .f32, shape: Shape([10, 100]), floats),
            try OutputTensor.bytes(name: "nested/name.with.dots", dtype: .i16, shape: Shape([2]), [1, 0, 255, 255]),
            try OutputTensor.bytes(name: "b", dtype: .bf16, shape: Shape([2]), [0x80, 0x3F, 0x00, 0x40]),
            try OutputTensor.bytes(name: "s", dtype: .f64, shape: Shape([]), [UInt8](repeating: 0, count: 8)),
        ]
    }

    @Test("write then read returns the same tensors, stored and deflated", arguments: [false, true])
    func roundTrip(compress: Bool) throws {
        let dir = Support.temporaryDirectory()
        let path = dir + "/x.npz"
        let tensors = try sampleTensors()
        try NPZ.write(tensors, to: path, compress: compress)
        let checkpoint = try Checkpoint.open(path)
        #expect(checkpoint.format == .npz)
        #expect(checkpoint.tensors.map(\.name) == tensors.map(\.name))
        #expect(checkpoint.tensors.map(\.dtype) == [.f32, .i16, .bf16, .f64], "BF16 comes back through the dtype manifest")
        for (entry, original) in zip(checkpoint.tensors, tensors) {
            var expected: [UInt8] = []
            try original.write { (chunk: UnsafeRawBufferPointer) throws(CkptError) in expected += chunk }
            #expect(try entry.load().withUnsafeBytes { Array($0) } == expected, "\(entry.name)")
        }
        let size = FileIdentity.of(path)!.size
        if compress { #expect(size < 4000) } else { #expect(size > 4000) }
        // Deterministic: the same input gives the same bytes.
        try NPZ.write(try sampleTensors(), to: dir + "/y.npz", compress: compress)
        #expect(try Support.read(path) == (try Support.read(dir + "/y.npz")))
    }

    /// A stored archive whose central directory uses ZIP64 extras and whose end records include the ZIP64 end
    /// record and locator, as writers produce for archives over 4 GiB.
    func zip64Archive(member: [UInt8], name: String) -> [UInt8] {
        let nameBytes = Array(name.utf8)
        let crc = Int(Support.crc32(member))
        var out: [UInt8] = []
        out += Support.le32(0x0403_4B50) + Support.le16(45) + Support.le16(0) + Support.le16(0) + Support.le16(0) + Support.le16(0x21)
        out += Support.le32(crc) + Support.le32(0xFFFF_FFFF) + Support.le32(0xFFFF_FFFF) + Support.le16(nameBytes.count) + Support.le16(20)
        out += nameBytes + Support.le16(1) + Support.le16(16) + Support.le64(member.count) + Support.le64(member.count)
        out += member
        let directoryOffset = out.count
        var central: [UInt8] = []
        central += Support.le32(0x0201_4B50) + Support.le16(45) + Support.le16(45) + Support.le16(0) + Support.le16(0) + Support.le16(0) + Support.le16(0x21)
        central += Support.le32(crc) + Support.le32(0xFFFF_FFFF) + Support.le32(0xFFFF_FFFF) + Support.le16(nameBytes.count) + Support.le16(28)
        central += Support.le16(0) + Support.le16(0) + Support.le16(0) + Support.le32(0) + Support.le32(0xFFFF_FFFF) + nameBytes
        central += Support.le16(1) + Support.le16(24) + Support.le64(member.count) + Support.le64(member.count) + Support.le64(0)
        out += central
        let recordOffset = out.count
        out += Support.le32(0x0606_4B50) + Support.le64(44) + Support.le16(45) + Support.le16(45) + Support.le32(0) + Support.le32(0)
        out += Support.le64(1) + Support.le64(1) + Support.le64(central.count) + Support.le64(directoryOffset)
        out += Support.le32(0x0706_4B50) + Support.le32(0) + Support.le64(recordOffset) + Support.le32(1)
        out += Support.le32(0x0605_4B50) + Support.le16(0) + Support.le16(0) + Support.le16(0xFFFF) + Support.le16(0xFFFF)
        out += Support.le32(0xFFFF_FFFF) + Support.le32(0xFFFF_FFFF) + Support.le16(0)
        return out
    }

    @Test("ZIP64 extras in the central directory and ZIP64 end records are honoured")
    func zip64() throws {
        let npy = try Support.read(Support.fixture("npy/f32_c_2d.npy"))
        let archive = zip64Archive(member: npy, name: "a.npy")
        let checkpoint = try Support.checkpoint(bytes: archive, name: "z.npz")
        #expect(checkpoint.tensors.map(\.name) == ["a"])
        let reference = try Checkpoint.open(Support.fixture("npy/f32_c_2d.npy")).tensors[0].load()
        #expect(try checkpoint.tensors[0].load().withUnsafeBytes { Array($0) } == reference.withUnsafeBytes { Array($0) })
    }

    @Test("members that overlap in the archive are refused")
    func overlapping() throws {
        // Two central-directory entries pointing at the same local header.
        let npy = try Support.read(Support.fixture("npy/int8.npy"))
        var archive = zip64Archive(member: npy, name: "a.npy")
        let central = archive.count - 22 - 20 - 56 - (46 + 5 + 28)
        let entry = Array(archive[central..<central + 46 + 5 + 28])
        var second = entry
        second[46] = UInt8(ascii: "b")
        archive.insert(contentsOf: second, at: central + entry.count)
        // Patch the ZIP64 end record: two entries, larger directory, and move the locator's offset.
        let record = archive.count - 22 - 20 - 56
        for (field, value) in [(24, 2), (32, 2), (40, 2 * entry.count)] {
            archive.replaceSubrange(record + field..<record + field + 8, with: Support.le64(value))
        }
        archive.replaceSubrange(archive.count - 22 - 20 + 8..<archive.count - 22 - 20 + 16, with: Support.le64(record))
        #expect(Support.errorCode { () throws(CkptError) in try Support.checkpoint(bytes: archive, name: "z.npz") } == .zipFormat)
    }

    @Test("member names that escape are refused", arguments: ["../x.npy", "/x.npy", "a/../../x.npy", "C:x.npy", "a\\b.npy"])
    func unsafeNames(name: String) {
        #expect(throws: CkptError.self) { try ZipArchiveNameCheck.check(name) }
    }
}

/// Exposes the member-name rule through the writer, which applies the same check.
enum ZipArchiveNameCheck {
    static func check(_ name: String) throws(CkptError) {
        let tensor = try OutputTensor.bytes(name: String(name.dropLast(4)), dtype: .u8, shape: Shape([1]), [0])
        try NPZ.write([tensor], to: Support.temporaryDirectory() + "/n.npz", compress: false)
    }
}
