import CkptCore

/// One member of a zip archive, located through the central directory (sizes come from there; ZIP64 extras are
/// honoured for the fields set to 0xFFFFFFFF).
struct ZipMember: Sendable {
    enum Method: UInt16, Sendable { case stored = 0, deflated = 8 }

    let name: String
    let method: Method
    let crc32: UInt32
    let compressedSize: Int
    let uncompressedSize: Int
    /// Absolute range of the member's (compressed) data in the archive.
    let dataRange: Range<Int>
    let storage: ByteStorage

    /// Largest ratio deflate can reach (about 1032:1): bounds what a declared size may make us allocate.
    static let maximumDeflateRatio = 1032

    /// The member's uncompressed bytes, CRC-checked. Stored members are views of the archive.
    func contents() throws(CkptError) -> TensorBytes {
        switch method {
        case .stored:
            let bytes = TensorBytes(storage: storage, range: dataRange)
            // Checksum in chunks, dropping each from the resident set: the caller streams the data again later, and
            // peak memory must stay near one chunk, not the member size.
            var crc: UInt32 = 0
            var offset = dataRange.lowerBound
            while offset < dataRange.upperBound {
                let chunk = offset..<min(dataRange.upperBound, offset + (8 << 20))
                crc = storage.withUnsafeBytes(in: chunk) { CRC32.checksum($0, continuing: crc) }
                storage.doneReading(chunk)
                offset = chunk.upperBound
            }
            guard crc == crc32 else {
                throw CkptError(.crcMismatch, "CRC-32 of member '\(name)' is \(hex(crc)), the archive says \(hex(crc32))")
            }
            return bytes
        case .deflated:
            let output = try ByteStorage(uninitializedCount: uncompressedSize) { (buffer: UnsafeMutableRawBufferPointer) throws(CkptError) in
                defer { storage.doneReading(dataRange) }  // the compressed bytes are consumed
                try storage.withUnsafeBytes(in: dataRange) { (input: UnsafeRawBufferPointer) throws(CkptError) in
                    _ = try RawInflate.inflate(input, into: buffer)
                }
                let crc = CRC32.checksum(UnsafeRawBufferPointer(buffer))
                guard crc == crc32 else {
                    throw CkptError(.crcMismatch, "CRC-32 of member '\(name)' is \(hex(crc)), the archive says \(hex(crc32))")
                }
            }
            return TensorBytes(storage: output)
        }
    }

    /// Streams a stored member's payload (the bytes after `payloadOffset`) in chunks while computing the member's
    /// CRC-32; throws `crcMismatch` after the last chunk if it is wrong.
    func streamStored(
        payloadOffset: Int, payloadCount: Int, maxBytes: Int, _ body: (UnsafeRawBufferPointer) throws(CkptError) -> Void
    ) throws(CkptError) {
        precondition(method == .stored && payloadOffset + payloadCount == dataRange.count)
        var crc = try storage.copyBytes(dataRange.lowerBound..<dataRange.lowerBound + payloadOffset).withBytes { CRC32.checksum($0) }
        var offset = dataRange.lowerBound + payloadOffset
        repeat {
            let range = offset..<min(dataRange.upperBound, offset + maxBytes)
            try storage.withUnsafeBytes(in: range) { (chunk: UnsafeRawBufferPointer) throws(CkptError) in
                crc = CRC32.checksum(chunk, continuing: crc)
                try body(chunk)
            }
            storage.doneReading(range)
            offset = range.upperBound
        } while offset < dataRange.upperBound
        guard crc == crc32 else {
            throw CkptError(.crcMismatch, "CRC-32 of member '\(name)' is \(hex(crc)), the archive says \(hex(crc32))")
        }
    }

    /// The first `count` uncompressed bytes (for reading an .npy header without inflating the whole member).
    func prefix(_ count: Int) throws(CkptError) -> [UInt8] {
        let n = min(count, uncompressedSize)
        switch method {
        case .stored:
            return try storage.copyBytes(dataRange.lowerBound..<dataRange.lowerBound + n)
        case .deflated:
            // n output bytes never need more than a little over n input bytes (stored blocks cost 5 bytes per
            // 64 KiB), so a bounded pread of the start of the stream is enough.
            let input = try storage.copyBytes(dataRange.lowerBound..<dataRange.lowerBound + min(compressedSize, 2 * n + 1024))
            let result = try ByteStorage(uninitializedCount: n) { (out: UnsafeMutableRawBufferPointer) throws(CkptError) in
                try input.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in
                    _ = try RawInflate.inflate(raw, into: out, prefixOnly: true)
                }
            }
            return result.withUnsafeBytes { Array($0) }
        }
    }

    private func hex(_ value: UInt32) -> String {
        let digits = String(value, radix: 16)
        return "0x" + String(repeating: "0", count: 8 - digits.count) + digits
    }
}

/// Reads a zip archive's central directory (with ZIP64 end records and extras) and validates every member's
/// placement, name and method before anything is decompressed.
enum ZipArchive {
    static func members(storage: ByteStorage, path: String) throws(CkptError) -> [ZipMember] {
        try storage.withUnsafeBytes { (bytes: UnsafeRawBufferPointer) throws(CkptError) in
            try parse(bytes, storage: storage, path: path)
        }
    }

    private static func u16(_ b: UnsafeRawBufferPointer, _ at: Int) -> Int { Int(UInt16(littleEndian: b.loadUnaligned(fromByteOffset: at, as: UInt16.self))) }
    private static func u32(_ b: UnsafeRawBufferPointer, _ at: Int) -> Int { Int(UInt32(littleEndian: b.loadUnaligned(fromByteOffset: at, as: UInt32.self))) }
    private static func u64(_ b: UnsafeRawBufferPointer, _ at: Int) throws(CkptError) -> Int {
        let v = UInt64(littleEndian: b.loadUnaligned(fromByteOffset: at, as: UInt64.self))
        guard v <= UInt64(Int.max) else { throw CkptError(.zipFormat, "ZIP64 field \(v) is out of range") }
        return Int(v)
    }

    private static func parse(_ bytes: UnsafeRawBufferPointer, storage: ByteStorage, path: String) throws(CkptError) -> [ZipMember] {
        // End of central directory: 22 bytes plus a comment of up to 65535 bytes, which must reach EOF exactly.
        var eocd = -1
        var candidate = bytes.count - 22
        let lowest = max(0, bytes.count - 22 - 65535)
        while candidate >= lowest {
            if u32(bytes, candidate) == 0x0605_4B50 && candidate + 22 + u16(bytes, candidate + 20) == bytes.count {
                eocd = candidate
                break
            }
            candidate -= 1
        }
        guard eocd >= 0 else { throw CkptError(.zipFormat, "no end-of-central-directory record: not a complete zip archive") }
        var entryCount = u16(bytes, eocd + 10)
        var directorySize = u32(bytes, eocd + 12)
        var directoryOffset = u32(bytes, eocd + 16)
        guard u16(bytes, eocd + 4) == 0 && u16(bytes, eocd + 6) == 0 else {
            throw CkptError(.zipFormat, "multi-disk archives are not supported")
        }
        // ZIP64 end record, found through its locator just before the classic record.
        if eocd >= 20 && u32(bytes, eocd - 20) == 0x0706_4B50 {
            let recordOffset = try u64(bytes, eocd - 20 + 8)
            guard recordOffset <= eocd - 20 - 56, u32(bytes, recordOffset) == 0x0606_4B50 else {
                throw CkptError(.zipFormat, "ZIP64 end-of-central-directory locator points to no ZIP64 record")
            }
            entryCount = try u64(bytes, recordOffset + 32)
            directorySize = try u64(bytes, recordOffset + 40)
            directoryOffset = try u64(bytes, recordOffset + 48)
        }
        let directoryEnd = directoryOffset.addingReportingOverflow(directorySize)
        guard !directoryEnd.overflow, directoryEnd.partialValue <= eocd else {
            throw CkptError(.zipFormat, "central directory [\(directoryOffset), +\(directorySize)) lies outside the archive")
        }
        guard entryCount <= directorySize / 46 else {
            throw CkptError(.zipFormat, "\(entryCount) entries cannot fit a \(directorySize)-byte central directory")
        }

        var members: [ZipMember] = []
        members.reserveCapacity(entryCount)
        var names = Set<NameKey>()
        var position = directoryOffset
        for _ in 0..<entryCount {
            guard position + 46 <= directoryEnd.partialValue, u32(bytes, position) == 0x0201_4B50 else {
                throw CkptError(.zipFormat, "bad central directory entry at offset \(position)")
            }
            let flags = u16(bytes, position + 8)
            let methodCode = u16(bytes, position + 10)
            let crc = UInt32(u32(bytes, position + 16))
            var compressed = u32(bytes, position + 20)
            var uncompressed = u32(bytes, position + 24)
            let nameLength = u16(bytes, position + 28)
            let extraLength = u16(bytes, position + 30)
            let commentLength = u16(bytes, position + 32)
            var localOffset = u32(bytes, position + 42)
            let nameStart = position + 46
            let next = nameStart + nameLength + extraLength + commentLength
            guard next <= directoryEnd.partialValue else { throw CkptError(.zipFormat, "central directory entry runs past the directory") }
            let nameBytes = UnsafeRawBufferPointer(rebasing: bytes[nameStart..<nameStart + nameLength])
            guard SafeTensors.validUTF8(nameBytes) else { throw CkptError(.zipFormat, "member name is not valid UTF-8") }
            let name = String(decoding: nameBytes, as: UTF8.self)
            try checkName(name)
            guard names.insert(NameKey(name)).inserted else {
                throw CkptError(.duplicateName, "member '\(name)' appears twice in the archive")
            }
            // ZIP64 extended information: 64-bit values for exactly the fields saturated at 0xFFFFFFFF.
            var extra = nameStart + nameLength
            let extraEnd = extra + extraLength
            while extra + 4 <= extraEnd {
                let id = u16(bytes, extra), size = u16(bytes, extra + 2)
                guard extra + 4 + size <= extraEnd else { throw CkptError(.zipFormat, "member '\(name)': extra field runs past its entry") }
                if id == 0x0001 {
                    var field = extra + 4
                    let fieldEnd = field + size
                    for slot in 0..<3 {
                        let saturated = slot == 0 ? uncompressed == 0xFFFF_FFFF : slot == 1 ? compressed == 0xFFFF_FFFF : localOffset == 0xFFFF_FFFF
                        guard saturated else { continue }
                        guard field + 8 <= fieldEnd else { throw CkptError(.zipFormat, "member '\(name)': ZIP64 extra is too short") }
                        let value = try u64(bytes, field)
                        if slot == 0 { uncompressed = value } else if slot == 1 { compressed = value } else { localOffset = value }
                        field += 8
                    }
                }
                extra += 4 + size
            }
            guard flags & 1 == 0 else { throw CkptError(.zipFormat, "member '\(name)' is encrypted") }
            guard let method = ZipMember.Method(rawValue: UInt16(methodCode)) else {
                throw CkptError(.zipFormat, "member '\(name)' uses compression method \(methodCode); only stored (0) and deflate (8) are supported")
            }
            // The local header repeats the name; its own extra length decides where the data starts.
            // Written so that a hostile ZIP64 offset near Int.max cannot overflow.
            guard localOffset <= directoryOffset - 30 - nameLength else {
                throw CkptError(.zipFormat, "member '\(name)': no local file header at offset \(localOffset)")
            }
            // Read through pread, not the mapping: see ByteStorage.copyBytes.
            let local = try storage.copyBytes(localOffset..<localOffset + 30 + nameLength)
            let localHeader = try local.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) -> (Int, Int, Int, Bool) in
                (u32(raw, 0), u16(raw, 26), u16(raw, 28), UnsafeRawBufferPointer(rebasing: raw[30...]).elementsEqual(nameBytes))
            }
            guard localHeader.0 == 0x0403_4B50 else {
                throw CkptError(.zipFormat, "member '\(name)': no local file header at offset \(localOffset)")
            }
            let localNameLength = localHeader.1
            let dataStart = localOffset + 30 + localNameLength + localHeader.2
            guard localNameLength == nameLength, dataStart <= directoryOffset, localHeader.3 else {
                throw CkptError(.zipFormat, "member '\(name)': local header does not match the central directory")
            }
            let dataEnd = dataStart.addingReportingOverflow(compressed)
            guard !dataEnd.overflow, dataEnd.partialValue <= directoryOffset else {
                throw CkptError(.zipFormat, "member '\(name)': \(compressed) data bytes run past the central directory")
            }
            switch method {
            case .stored:
                guard compressed == uncompressed else {
                    throw CkptError(.zipFormat, "stored member '\(name)' has compressed size \(compressed) ≠ size \(uncompressed)")
                }
            case .deflated:
                let bound = compressed.multipliedReportingOverflow(by: ZipMember.maximumDeflateRatio)
                guard !bound.overflow, uncompressed <= bound.partialValue + 64 else {
                    throw CkptError(.tooLarge, "member '\(name)' declares \(uncompressed) bytes from \(compressed) compressed: more than deflate can produce")
                }
            }
            members.append(
                ZipMember(
                    name: name, method: method, crc32: crc, compressedSize: compressed, uncompressedSize: uncompressed,
                    dataRange: dataStart..<dataEnd.partialValue, storage: storage))
            position = next
        }
        // Members may not share bytes (overlapping entries multiply inflate work: the "zip bomb" construction).
        let ordered = members.sorted { $0.dataRange.lowerBound < $1.dataRange.lowerBound }
        for (previous, next) in zip(ordered, ordered.dropFirst()) where next.dataRange.lowerBound < previous.dataRange.upperBound {
            throw CkptError(.zipFormat, "members '\(previous.name)' and '\(next.name)' overlap in the archive")
        }
        return members
    }

    /// Refuses names that would escape a folder if extracted or that are not plain relative paths.
    static func checkName(_ name: String) throws(CkptError) {
        let components = name.split(separator: "/", omittingEmptySubsequences: false)
        if name.isEmpty || name.hasPrefix("/") || name.contains("\\") || name.utf8.contains(0)
            || components.contains(where: { $0 == ".." }) || (name.count >= 2 && Array(name)[1] == ":")
        {
            throw CkptError(.unsafeMemberName, "member name '\(name)' is absolute or escapes the archive")
        }
    }
}
