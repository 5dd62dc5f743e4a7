import CkptCore

extension NPZ {
    /// Writes tensors as an `.npz` that `numpy.load` reads: one `<name>.npy` member each, in the given order,
    /// stored by default or raw-deflated with `compress`. Like numpy, every local header carries a ZIP64 extra;
    /// the central directory gets ZIP64 fields and end records only when sizes or counts need them. Dtypes numpy
    /// cannot name are stored with void descrs and recorded in ``dtypeManifestName``. Timestamps are fixed
    /// (1980-01-01) so output is byte-reproducible.
    public static func write(
        _ tensors: [OutputTensor], to path: String, compress: Bool,
        inputs: [FileIdentity] = [], progress: ProgressReporter? = nil
    ) throws(CkptError) {
        var names = Set<NameKey>()
        for tensor in tensors {
            guard names.insert(NameKey(tensor.name)).inserted else {
                throw CkptError(.duplicateName, "tensor name is used twice", path: path, tensor: tensor.name)
            }
            do throws(CkptError) {
                try ZipArchive.checkName(tensor.name + ".npy")
                guard tensor.name.utf8.count + 4 <= 0xFFFF else {
                    throw CkptError(.invalidArgument, "name is longer than a zip member name can be (65,535 bytes)")
                }
                _ = try NumPy.descr(for: tensor.dtype)
            } catch {
                throw error.at(tensor: tensor.name).at(path: path)
            }
        }
        var file = try OutputFile(path: path, inputs: inputs)
        var central: [UInt8] = []
        var entryCount = 0

        func addMember(_ name: String, header: [UInt8], body: (OutputTensor.Sink) throws(CkptError) -> Void) throws(CkptError) {
            let nameBytes = Array(name.utf8)
            let localOffset = file.offset
            var local: [UInt8] = []
            local.le32(0x0403_4B50)
            local.le16(45)  // version needed: ZIP64
            local.le16(0x0800)  // UTF-8 names
            local.le16(compress ? 8 : 0)
            local.le16(0)  // time 00:00
            local.le16(0x0021)  // date 1980-01-01
            local.le32(0)  // CRC, patched below
            local.le32(0xFFFF_FFFF)
            local.le32(0xFFFF_FFFF)
            local.le16(nameBytes.count)
            local.le16(20)
            local += nameBytes
            local.le16(0x0001)
            local.le16(16)
            local.le64(0)  // uncompressed, patched below
            local.le64(0)  // compressed, patched below
            try file.write(local)
            let dataStart = file.offset
            var crc: UInt32 = 0
            var size = 0
            if compress {
                let deflater = try ParallelDeflater()
                let emit: OutputTensor.Sink = { (chunk: UnsafeRawBufferPointer) throws(CkptError) in
                    crc = CRC32.checksum(chunk, continuing: crc)
                    size += chunk.count
                    try deflater.compress(chunk) { (out: UnsafeRawBufferPointer) throws(CkptError) in try file.write(out) }
                    progress?.advance(bytes: chunk.count)
                }
                try header.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try emit(raw) }
                try body(emit)
                try deflater.finish { (out: UnsafeRawBufferPointer) throws(CkptError) in try file.write(out) }
            } else {
                let emit: OutputTensor.Sink = { (chunk: UnsafeRawBufferPointer) throws(CkptError) in
                    crc = CRC32.checksum(chunk, continuing: crc)
                    size += chunk.count
                    try file.write(chunk)
                    progress?.advance(bytes: chunk.count)
                }
                try header.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try emit(raw) }
                try body(emit)
            }
            let compressedSize = file.offset - dataStart
            var patchCRC: [UInt8] = []
            patchCRC.le32(Int(crc))
            try file.patch(patchCRC, at: localOffset + 14)
            var patchSizes: [UInt8] = []
            patchSizes.le64(size)
            patchSizes.le64(compressedSize)
            try file.patch(patchSizes, at: localOffset + 30 + nameBytes.count + 4)

            // Central directory entry: ZIP64 extra only for the fields that overflow 32 bits.
            var extra: [UInt8] = []
            let bigSize = size >= 0xFFFF_FFFF, bigCompressed = compressedSize >= 0xFFFF_FFFF, bigOffset = localOffset >= 0xFFFF_FFFF
            if bigSize { extra.le64(size) }
            if bigCompressed { extra.le64(compressedSize) }
            if bigOffset { extra.le64(localOffset) }
            if !extra.isEmpty { extra = [0x01, 0x00] + UInt16(extra.count).littleEndianBytes + extra }
            central.le32(0x0201_4B50)
            central.le16(0x0300 | 45)  // made by Unix, spec 4.5
            central.le16(45)
            central.le16(0x0800)
            central.le16(compress ? 8 : 0)
            central.le16(0)
            central.le16(0x0021)
            central.le32(Int(crc))
            central.le32(bigCompressed ? 0xFFFF_FFFF : compressedSize)
            central.le32(bigSize ? 0xFFFF_FFFF : size)
            central.le16(nameBytes.count)
            central.le16(extra.count)
            central.le16(0)  // comment
            central.le16(0)  // disk
            central.le16(0)  // internal attributes
            central.le32(0o100644 << 16)  // regular file, rw-r--r--
            central.le32(bigOffset ? 0xFFFF_FFFF : localOffset)
            central += nameBytes
            central += extra
            entryCount += 1
        }

        var manifest: [(String, DType)] = []
        for tensor in tensors {
            let header = NumPy.headerBytes(descr: try NumPy.descr(for: tensor.dtype), shape: tensor.shape.dims)
            try addMember(tensor.name + ".npy", header: header) { (emit: OutputTensor.Sink) throws(CkptError) in
                try tensor.write(to: emit)
            }
            progress?.finishedTensor()
            if !NumPy.hasNativeDescr(tensor.dtype) { manifest.append((tensor.name, tensor.dtype)) }
        }
        if !manifest.isEmpty {
            var json = "{"
            for (i, (name, dtype)) in manifest.enumerated() {
                if i > 0 { json += ", " }
                JSONWriter.appendString(name, to: &json)
                json += ": \"\(dtype.name)\""
            }
            json += "}\n"
            let bytes = Array(json.utf8)
            try addMember(dtypeManifestName, header: []) { (emit: OutputTensor.Sink) throws(CkptError) in
                try bytes.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try emit(raw) }
            }
        }

        let directoryOffset = file.offset
        try file.write(central)
        let directorySize = central.count
        var end: [UInt8] = []
        let needsZip64 = entryCount >= 0xFFFF || directoryOffset >= 0xFFFF_FFFF || directorySize >= 0xFFFF_FFFF
        if needsZip64 {
            let recordOffset = file.offset
            end.le32(0x0606_4B50)
            end.le64(44)
            end.le16(0x0300 | 45)
            end.le16(45)
            end.le32(0)
            end.le32(0)
            end.le64(entryCount)
            end.le64(entryCount)
            end.le64(directorySize)
            end.le64(directoryOffset)
            end.le32(0x0706_4B50)
            end.le32(0)
            end.le64(recordOffset)
            end.le32(1)
        }
        end.le32(0x0605_4B50)
        end.le16(0)
        end.le16(0)
        end.le16(min(entryCount, 0xFFFF))
        end.le16(min(entryCount, 0xFFFF))
        end.le32(min(directorySize, 0xFFFF_FFFF))
        end.le32(min(directoryOffset, 0xFFFF_FFFF))
        end.le16(0)
        try file.write(end)
        try file.commit()
    }
}

extension [UInt8] {
    mutating func le16(_ value: Int) { append(contentsOf: UInt16(truncatingIfNeeded: value).littleEndianBytes) }
    mutating func le32(_ value: Int) {
        Swift.withUnsafeBytes(of: UInt32(truncatingIfNeeded: value).littleEndian) { append(contentsOf: $0) }
    }
    mutating func le64(_ value: Int) {
        Swift.withUnsafeBytes(of: UInt64(truncatingIfNeeded: value).littleEndian) { append(contentsOf: $0) }
    }
}

extension UInt16 {
    var littleEndianBytes: [UInt8] { [UInt8(truncatingIfNeeded: self), UInt8(truncatingIfNeeded: self >> 8)] }
}
