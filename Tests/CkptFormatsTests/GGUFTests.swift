import CkptCore
import CkptFormats
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Fixture helpers: the F32 source, raw stored blocks and gguf-py's dequantized values (fixtures/gguf).
enum GGUFFixture {
    static let path = Support.fixture("gguf/quantized.gguf")

    static func floats(_ entry: TensorEntry) throws -> [Float] {
        let bytes = try entry.load()
        return bytes.withUnsafeBytes { raw in (0..<entry.shape.elements).map { raw.loadUnaligned(fromByteOffset: 4 * $0, as: Float.self) } }
    }

    static func source() throws -> [Float] {
        try floats(try Checkpoint.open(Support.fixture("gguf/source.npy")).tensors[0])
    }

    /// The bytes a tensor has in the file (blocks as gguf-py wrote them).
    static func storedBytes(_ name: String, in path: String = path) throws -> [UInt8] {
        let file = try Support.read(path)
        let header = try file.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try GGUF.parseHeader(raw) }
        let info = try #require(header.tensors.first { $0.name == name })
        return Array(file[header.dataStart + info.offset..<header.dataStart + info.offset + info.byteCount])
    }

    static func dequantized(_ name: String) throws -> [Float] {
        let npz = try Checkpoint.open(Support.fixture("gguf/dequantized.npz"))
        return try floats(try #require(npz.tensors.first { $0.name == name }))
    }
}

/// Builds GGUF bytes by hand for the malformed-file corpus.
struct GGUFBytes {
    var bytes: [UInt8] = []

    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func string(_ s: String) { u64(UInt64(s.utf8.count)); bytes += Array(s.utf8) }
    mutating func pad(to alignment: Int) { bytes += [UInt8](repeating: 0, count: (alignment - bytes.count % alignment) % alignment) }

    /// Header with `tensors` and `kvs` counts (written as given, so they may lie).
    static func header(version: UInt32 = 3, tensors: UInt64, kvs: UInt64) -> GGUFBytes {
        var b = GGUFBytes()
        b.bytes = GGUF.magic
        b.u32(version)
        b.u64(tensors)
        b.u64(kvs)
        return b
    }

    mutating func info(_ name: String, ne: [UInt64], type: UInt32, offset: UInt64) {
        string(name)
        u32(UInt32(ne.count))
        for n in ne { u64(n) }
        u32(type)
        u64(offset)
    }

    /// A well-formed file: one F32 tensor `w` of ne [4, 2], preceded by `kvs` key/values written by `writeKVs`.
    static func valid(kvCount: UInt64 = 1, writeKVs: (inout GGUFBytes) -> Void = { $0.string("general.architecture"); $0.u32(8); $0.string("vit") }) -> [UInt8] {
        var b = header(tensors: 1, kvs: kvCount)
        writeKVs(&b)
        b.info("w", ne: [4, 2], type: 0, offset: 0)
        b.pad(to: 32)
        b.bytes += [UInt8](repeating: 0, count: 32)
        return b.bytes
    }
}

@Suite("GGUF")
struct GGUFTests {
    // MARK: - Quantizers against gguf-py

    @Test("quantize reproduces gguf-py's (= ggml's reference) blocks byte for byte", arguments: ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
    func quantizeMatchesReference(typeName: String) throws {
        let type = try #require(GGMLType(name: typeName))
        let source = try GGUFFixture.source()
        let expected = try GGUFFixture.storedBytes("q.\(typeName.lowercased())")
        #expect(expected.count == type.byteCount(elements: source.count))
        var serial = [UInt8](repeating: 0xAA, count: expected.count)
        var parallel = serial
        source.withUnsafeBufferPointer { src in
            serial.withUnsafeMutableBytes { GGMLQuants.quantize(type, source: src.baseAddress!, count: src.count, destination: $0.baseAddress!) }
            parallel.withUnsafeMutableBytes { GGMLQuants.quantizeParallel(type, source: src.baseAddress!, count: src.count, destination: $0.baseAddress!) }
        }
        let blockBytes = type.bytesPerBlock
        for block in 0..<expected.count / blockBytes {
            let range = block * blockBytes..<(block + 1) * blockBytes
            #expect(Array(serial[range]) == Array(expected[range]), "\(typeName) block \(block) (row \(block / 8), values \(source[block * 32..<block * 32 + 4])…)")
        }
        #expect(parallel == serial)
        // Blocks are quantized four at a time: every batch size (1, 2, 3) gives the same bytes.
        var pieces = [UInt8](repeating: 0xAA, count: expected.count)
        source.withUnsafeBufferPointer { src in
            pieces.withUnsafeMutableBytes { out in
                var block = 0, size = 1
                while block < src.count / 32 {
                    let n = min(size, src.count / 32 - block)
                    GGMLQuants.quantize(type, source: src.baseAddress! + 32 * block, count: 32 * n, destination: out.baseAddress! + blockBytes * block)
                    block += n
                    size = size % 3 + 1
                }
            }
        }
        #expect(pieces == serial)
    }

    @Test("dequantize reproduces gguf-py's values bit for bit", arguments: ["q.q8_0", "q.q4_0", "q.q4_1", "q.q5_0", "q.q5_1", "k.q4_k", "k.q6_k"])
    func dequantizeMatchesReference(name: String) throws {
        let checkpoint = try Checkpoint.open(GGUFFixture.path)
        let entry = try #require(checkpoint.tensors.first { $0.name == name })
        let got = try GGUFFixture.floats(entry)
        let want = try GGUFFixture.dequantized(name)
        #expect(got.count == want.count)
        let differing = zip(got, want).enumerated().filter { $0.element.0.bitPattern != $0.element.1.bitPattern }
        #expect(differing.isEmpty, "\(differing.count) values differ, first at \(differing.first.map { "\($0.offset): \($0.element.0) vs \($0.element.1)" } ?? "")")
        // The direct API agrees with the decode-on-load path.
        let stored = try GGUFFixture.storedBytes(name)
        var direct = [Float](repeating: .nan, count: want.count)
        stored.withUnsafeBytes { raw in
            direct.withUnsafeMutableBufferPointer { GGMLQuants.dequantize(entry.quantization.flatMap { GGMLType(name: $0.scheme) }!, source: raw.baseAddress!, count: $0.count, destination: $0.baseAddress!) }
        }
        #expect(direct.map(\.bitPattern) == got.map(\.bitPattern))
    }

    @Test("quantize → dequantize round trip stays within half a step of every block", arguments: GGMLType.allCases.filter { $0.isQuantized && $0.blockSize == 32 })
    func roundTripError(type: GGMLType) {
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        let count = 32 * 4096 + 32 * 3  // parallel split with a remainder
        let source = (0..<count).map { _ -> Float in
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return Float(Int64(bitPattern: state) >> 40) / Float(1 << 23)
        }
        var blocks = [UInt8](repeating: 0, count: type.byteCount(elements: count)!)
        var back = [Float](repeating: 0, count: count)
        source.withUnsafeBufferPointer { src in
            blocks.withUnsafeMutableBytes { GGMLQuants.quantizeParallel(type, source: src.baseAddress!, count: count, destination: $0.baseAddress!) }
        }
        blocks.withUnsafeBytes { raw in
            back.withUnsafeMutableBufferPointer { GGMLQuants.dequantizeParallel(type, source: raw.baseAddress!, count: count, destination: $0.baseAddress!) }
        }
        for block in stride(from: 0, to: count, by: 32) {
            let values = source[block..<block + 32]
            let amax = values.map(abs).max()!, range = values.max()! - values.min()!
            // Half a step for the rounding types; a whole one for Q4_0/Q5_0, whose most negative code is clamped.
            let bound: Float
            switch type {
            case .q8_0: bound = amax / 127 / 2
            case .q4_0: bound = amax / 8
            case .q5_0: bound = amax / 16
            case .q4_1: bound = range / 15 / 2
            default: bound = range / 31 / 2
            }
            let worst = zip(values, back[block..<block + 32]).map { abs($0 - $1) }.max()!
            // Plus the F16 rounding of d (and m) times the largest code.
            #expect(worst <= bound + 2e-3 * amax + 1e-6, "\(type.name) block \(block / 32)")
        }
    }

    /// CRC-32 of what ggml's `quantize_row_q4_K_ref` / `quantize_row_q6_K_ref` (ggml-org/ggml d99724f2,
    /// src/ggml-quants.c built for baseline x86-64 with gcc -O2, so without fused multiply-adds) write for
    /// fixtures/gguf/source.npy. gguf-py cannot quantize K-quants, so these pins come from libggml itself.
    static let kQuantReference: [(GGMLType, Int, UInt32)] = [(.q4_K, 2304, 0x98C2_B37D), (.q6_K, 3360, 0x4A80_BD79)]

    @Test("K-quant quantizers reproduce ggml's reference blocks", arguments: 0..<2)
    func kQuantsMatchReference(index: Int) throws {
        let (type, bytes, crc) = Self.kQuantReference[index]
        let source = try GGUFFixture.source()
        var blocks = [UInt8](repeating: 0xAA, count: try #require(type.byteCount(elements: source.count)))
        #expect(blocks.count == bytes)
        source.withUnsafeBufferPointer { src in
            blocks.withUnsafeMutableBytes { GGMLQuants.quantizeParallel(type, source: src.baseAddress!, count: src.count, destination: $0.baseAddress!) }
        }
        #expect(Support.crc32(blocks) == crc, "\(type.name): CRC-32 \(String(Support.crc32(blocks), radix: 16)), ggml's is \(String(crc, radix: 16))")
        // Decoded, every value stays within a step of the source, a step being the super-block's range over the
        // code count (scales are themselves quantized against the super-block's largest one).
        var back = [Float](repeating: 0, count: source.count)
        blocks.withUnsafeBytes { raw in
            back.withUnsafeMutableBufferPointer { GGMLQuants.dequantize(type, source: raw.baseAddress!, count: $0.count, destination: $0.baseAddress!) }
        }
        for start in stride(from: 0, to: source.count, by: 256) {
            let amax = source[start..<start + 256].map(abs).max()!
            guard amax < 1e4, amax > 1e-6 else { continue }  // F16 scales saturate or vanish at the extremes
            let worst = zip(source[start..<start + 256], back[start..<start + 256]).map { abs($0 - $1) }.max()!
            #expect(worst <= 2 * amax / (type == .q4_K ? 15 : 63), "\(type.name) super-block \(start / 256)")
        }
    }

    // MARK: - Reading

    @Test("reading gguf-py's file: metadata as text, names, PyTorch-order shapes, dtypes, quantization")
    func readFixture() throws {
        let checkpoint = try Checkpoint.open(GGUFFixture.path)
        #expect(checkpoint.format == .gguf)
        let m = checkpoint.metadata
        #expect(m["general.architecture"] == "vit")
        #expect(m["general.name"] == "ckpt gguf fixture")
        #expect(m["test.u8"] == "255" && m["test.i8"] == "-128" && m["test.u16"] == "65535" && m["test.i16"] == "-32768")
        #expect(m["test.u32"] == "4294967295" && m["test.i32"] == "-2147483648")
        #expect(m["test.u64"] == "18446744073709551615" && m["test.i64"] == "-9223372036854775808")
        #expect(m["test.f32"] == "0.1" && m["test.f64"] == "-2.5e-300")
        #expect(m["test.bool"] == "true" && m["test.false"] == "false")
        #expect(m["test.string"] == "ViT-S/16 é \"quoted\"")
        #expect(m["test.array_u32"] == "[1,2,3]")
        #expect(m["test.array_f32"] == "[0.5,-1.0,1e-06]")
        #expect(m["test.array_string"] == #"["a","b\"c","é"]"#)
        #expect(m["test.array_bool"] == "[true,false]")
        #expect(m["test.array_long"] == "[1500 × i32]")
        #expect(m["general.file_type"] == "7" && m["general.quantization_version"] == "2")

        let byName = Dictionary(uniqueKeysWithValues: checkpoint.tensors.map { ($0.name, $0) })
        #expect(checkpoint.tensors.map(\.name) == [
            "q.q8_0", "q.q4_0", "q.q4_1", "q.q5_0", "q.q5_1", "k.q4_k", "k.q6_k",
            "p.f32_4d", "p.f16", "p.f64", "p.i8", "p.i16", "p.i32", "p.i64", "p.bf16",
        ])
        for (name, scheme, bits, group, symmetric) in [
            ("q.q8_0", "Q8_0", 8, 32, true), ("q.q4_0", "Q4_0", 4, 32, true), ("q.q4_1", "Q4_1", 4, 32, false),
            ("q.q5_0", "Q5_0", 5, 32, true), ("q.q5_1", "Q5_1", 5, 32, false),
            ("k.q4_k", "Q4_K", 4, 256, false), ("k.q6_k", "Q6_K", 6, 256, true),
        ] {
            let entry = try #require(byName[name])
            #expect(entry.dtype == .f32, "\(name)")
            #expect(entry.quantization == QuantizationDescription(
                scheme: scheme, bits: bits, groupSize: group, symmetric: symmetric,
                storedBytes: GGMLType(name: scheme)!.byteCount(elements: entry.shape.elements)!, storedTensors: [name]))
        }
        #expect(byName["q.q4_0"]?.shape.dims == [16, 256])
        #expect(byName["k.q6_k"]?.shape.dims == [2, 512])
        #expect(byName["p.f32_4d"]?.shape.dims == [4, 3, 2, 2])
        #expect(byName["p.f32_4d"]?.quantization == nil)
        let dtypes = ["p.f16": DType.f16, "p.f64": .f64, "p.i8": .i8, "p.i16": .i16, "p.i32": .i32, "p.i64": .i64, "p.bf16": .bf16]
        for (name, dtype) in dtypes { #expect(byName[name]?.dtype == dtype, "\(name)") }
        let i64 = try #require(byName["p.i64"]).load().withUnsafeBytes { raw in (0..<2).map { raw.loadUnaligned(fromByteOffset: 8 * $0, as: Int64.self) } }
        #expect(i64 == [-(1 << 62), 1 << 62])
        let i16 = try #require(byName["p.i16"]).load().withUnsafeBytes { raw in (0..<4).map { raw.loadUnaligned(fromByteOffset: 2 * $0, as: Int16.self) } }
        #expect(i16 == [-32768, 1, 2, 32767])
        // BF16 is carried as stored; decoded it equals gguf-py's dequantized values.
        var bf16 = [Float](repeating: 0, count: 16)
        try #require(byName["p.bf16"]).decodeFloats(into: &bf16)
        #expect(bf16.map(\.bitPattern) == (try GGUFFixture.dequantized("p.bf16")).map(\.bitPattern))
        #expect(checkpoint.storedBytes == checkpoint.tensors.reduce(0) { $0 + ($1.quantization?.storedBytes ?? $1.byteCount) })
    }

    @Test("general.alignment 64: data at multiples of 64, read through the magic even without the extension")
    func alignment64() throws {
        let bytes = try Support.read(Support.fixture("gguf/aligned64.gguf"))
        let header = try bytes.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try GGUF.parseHeader(raw) }
        #expect(header.alignment == 64 && header.dataStart % 64 == 0)
        #expect(header.tensors.map(\.offset) == [0, 64])
        let checkpoint = try Support.checkpoint(bytes: bytes, name: "model.bin")
        #expect(checkpoint.format == .gguf)
        #expect(try GGUFFixture.floats(checkpoint.tensors[0]) == [0, 1, 2])
        #expect(checkpoint.tensors[1].quantization?.scheme == "Q8_0")
    }

    // MARK: - Writing

    @Test("write → read round trip: every value type, plain and quantized tensors, file layout")
    func roundTrip() throws {
        let source = try GGUFFixture.source()
        let sourceEntry = try Checkpoint.open(Support.fixture("gguf/source.npy")).tensors[0]
        let f16 = try OutputTensor.bytes(name: "half", dtype: .f16, shape: Shape([2, 3]), [0, 0x3C, 0, 0x40, 0, 0x42, 0, 0xBC, 0, 0, 0, 0x80])
        let ints = try OutputTensor.bytes(name: "scalar.i32", dtype: .i32, shape: Shape([]), Support.le32(-7 & 0xFFFF_FFFF))
        let tensors = [
            try GGUF.OutputTensorInfo(f16),
            try GGUF.OutputTensorInfo(ints),
            try GGUF.OutputTensorInfo.encoding(sourceEntry, as: .q4_0).renamedForTest("q4_0"),
            try GGUF.OutputTensorInfo.encoding(sourceEntry, as: .bf16).renamedForTest("bf16"),
        ]
        let metadata: [GGUF.KeyValue] = [
            .init("test.u8", .uint8(1)), .init("test.i8", .int8(-1)), .init("test.u16", .uint16(2)), .init("test.i16", .int16(-2)),
            .init("test.u32", .uint32(3)), .init("test.i32", .int32(-3)), .init("test.u64", .uint64(4)), .init("test.i64", .int64(-4)),
            .init("test.f32", .float32(0.25)), .init("test.f64", .float64(1e300)), .init("test.bool", .bool(false)),
            .init("test.string", .string("ü")), .init("test.array", .array(.string, [.string("x"), .string("y")])),
            .init("test.empty", .array(.float32, [])),
            .init("general.architecture", .string("vit")),
        ]
        let dir = Support.temporaryDirectory()
        let path = dir + "/out.gguf"
        try GGUF.write(tensors: tensors, metadata: metadata, to: path)
        let file = try Support.read(path)
        #expect(file.count % 32 == 0, "the last tensor is padded too")
        let header = try file.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try GGUF.parseHeader(raw) }
        #expect(header.metadata.map(\.key) == ["general.architecture"] + metadata.dropLast().map(\.key) + ["general.quantization_version"])
        #expect(header.metadata.last?.type == .uint32 && header.metadata.last?.text == "2")
        #expect(header.tensors.map(\.dimensions) == [[3, 2], [], [256, 16], [256, 16]])

        let checkpoint = try Checkpoint.open(path)
        #expect(checkpoint.metadata["test.f64"] == "1e+300" && checkpoint.metadata["test.array"] == #"["x","y"]"#)
        #expect(checkpoint.metadata["test.empty"] == "[]" && checkpoint.metadata["test.i64"] == "-4")
        #expect(checkpoint.tensors.map(\.shape.dims) == [[2, 3], [], [16, 256], [16, 256]])
        #expect(try checkpoint.tensors[0].load().withUnsafeBytes { Array($0) } == [0, 0x3C, 0, 0x40, 0, 0x42, 0, 0xBC, 0, 0, 0, 0x80])
        #expect(try checkpoint.tensors[1].load().withUnsafeBytes { $0.loadUnaligned(as: Int32.self) } == -7)
        #expect(try GGUFFixture.storedBytes("q.q4_0") == (try GGUFFixture.storedBytes("q4_0", in: path)))
        #expect(try GGUFFixture.floats(checkpoint.tensors[2]).map(\.bitPattern) == (try GGUFFixture.dequantized("q.q4_0")).map(\.bitPattern))
        let bf16 = try checkpoint.tensors[3].load().withUnsafeBytes { raw in (0..<source.count).map { raw.loadUnaligned(fromByteOffset: 2 * $0, as: UInt16.self) } }
        #expect(bf16 == source.map { FloatBits.f32ToBF16($0) })
    }

    @Test("non-default alignment is written as a u32 and honoured; the default one is left implicit")
    func customAlignment() throws {
        let tensor = try GGUF.OutputTensorInfo(try OutputTensor.bytes(name: "a", dtype: .f32, shape: Shape([3]), [UInt8](repeating: 1, count: 12)))
        let dir = Support.temporaryDirectory()
        try GGUF.write(tensors: [tensor, tensor.renamedForTest("b")], metadata: [.init("general.alignment", .uint32(128))], to: dir + "/a.gguf")
        let file = try Support.read(dir + "/a.gguf")
        let header = try file.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try GGUF.parseHeader(raw) }
        #expect(header.alignment == 128 && header.dataStart % 128 == 0 && header.tensors.map(\.offset) == [0, 128] && file.count % 128 == 0)
        try GGUF.write(tensors: [tensor], metadata: [.init("general.alignment", .uint32(32))], to: dir + "/b.gguf")
        let implicit = try Support.read(dir + "/b.gguf").withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try GGUF.parseHeader(raw) }
        #expect(implicit.metadata.isEmpty && implicit.alignment == 32)
    }

    @Test("GGUF.write quantizes straight into its buffers: the bytes of gguf-py")
    func inPlaceEncoding() throws {
        let sourceEntry = try Checkpoint.open(Support.fixture("gguf/source.npy")).tensors[0]
        let dir = Support.temporaryDirectory()
        for type in [GGMLType.q8_0, .q4_0, .q4_1, .q5_0, .q5_1] {
            try GGUF.write(tensors: [try GGUF.OutputTensorInfo.encoding(sourceEntry, as: type)], metadata: [], to: dir + "/\(type.name).gguf")
            #expect(try GGUFFixture.storedBytes("source", in: dir + "/\(type.name).gguf") == (try GGUFFixture.storedBytes("q.\(type.name.lowercased())")))
        }
        for (type, _, crc) in Self.kQuantReference {
            try GGUF.write(tensors: [try GGUF.OutputTensorInfo.encoding(sourceEntry, as: type)], metadata: [], to: dir + "/\(type.name).gguf")
            #expect(Support.crc32(try GGUFFixture.storedBytes("source", in: dir + "/\(type.name).gguf")) == crc)
            let read = try Checkpoint.open(dir + "/\(type.name).gguf")
            #expect(read.metadata["general.quantization_version"] == "2" && read.tensors[0].quantization?.scheme == type.name)
        }
    }

    @Test("chunked encoding of a tensor larger than one chunk equals quantizing it at once")
    func chunkedEncoding() throws {
        let rows = 8193, columns = 256  // 2^21 + 256 elements: one full chunk and a partial one
        var halves = [UInt8](repeating: 0, count: rows * columns * 2)
        var floats = [Float](repeating: 0, count: rows * columns)
        for i in 0..<floats.count {
            let value = Float((i * 7919) % 2001 - 1000) / 256
            floats[i] = value
            let h = FloatBits.f32ToF16(value)
            halves[2 * i] = UInt8(h & 0xFF)
            halves[2 * i + 1] = UInt8(h >> 8)
        }
        let dir = Support.temporaryDirectory()
        try SafeTensors.write([try OutputTensor.bytes(name: "w", dtype: .f16, shape: Shape([rows, columns]), halves)], metadata: [:], to: dir + "/w.safetensors")
        let entry = try Checkpoint.open(dir + "/w.safetensors").tensors[0]
        let info = try GGUF.OutputTensorInfo.encoding(entry, as: .q8_0)
        var streamed: [UInt8] = []
        try info.write { (chunk: UnsafeRawBufferPointer) throws(CkptError) in streamed += chunk }
        var direct = [UInt8](repeating: 0, count: info.byteCount)
        floats.withUnsafeBufferPointer { src in
            direct.withUnsafeMutableBytes { GGMLQuants.quantize(.q8_0, source: src.baseAddress!, count: src.count, destination: $0.baseAddress!) }
        }
        #expect(streamed == direct)
        // The writer's in-place path takes chunks of another size.
        try GGUF.write(tensors: [info], metadata: [], to: dir + "/w.gguf")
        #expect(try GGUFFixture.storedBytes("w", in: dir + "/w.gguf") == direct)
    }

    @Test("quantizeMeasured writes quantize's blocks, measures their dequantized values, and finds the first NaN/Inf")
    func measuredQuantization() throws {
        let count = 3 * 4096 + 512  // several measured units, the last one short
        let source: [Float] = (0..<count).map { (i: Int) -> Float in
            let base = Float((i * 7919) % 2001 - 1000) / 256
            return base * (1 + Float(i % 7) / 3)
        }
        for type in GGUFTests.measuredTypes {
            // Q4_0 and Q8_0 sum in float over 32 blocks (GGMLQuants+Fused.swift), the others per value in double.
            GGUFTests.expectMeasured(type, source, tolerance: type == .q4_0 || type == .q8_0 ? 1e-6 : 1e-12, type.name)
        }
        var bad = source
        bad[9000] = -.infinity
        bad[5000] = .nan
        var blocks = [UInt8](repeating: 0, count: count / 32 * 34)
        for expected in [5000, 9000] {
            let result = bad.withUnsafeBufferPointer { src in
                blocks.withUnsafeMutableBytes { GGMLQuants.quantizeMeasured(.q8_0, source: src.baseAddress!, count: count, destination: $0.baseAddress!) }
            }
            #expect(result.firstNonFinite == expected)
            bad[5000] = 1
        }
    }

    @Test("Q4_0 and Q8_0 measured while encoding: the reference quantizers' blocks and the dequantized values' statistics on edge cases", arguments: [GGMLType.q4_0, .q8_0])
    func fusedKernelEdgeCases(type: GGMLType) throws {
        var seed: UInt64 = 0x9E37_79B9_7F4A_7C15
        func random(_ scale: Float) -> [Float] {
            (0..<32).map { _ in
                seed = seed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                return scale * (Float(seed >> 40) / Float(1 << 24) * 2 - 1)
            }
        }
        let top: Float = type == .q4_0 ? 8 : 127  // |max| / |d|
        var cases: [(String, [Float])] = []
        cases.append(("zeros and signed zeros", [Float](repeating: 0, count: 64) + [Float](repeating: -0.0, count: 64) + (0..<96).map { $0 % 3 == 0 ? -0.0 : 0.0 }))
        var ties: [Float] = []
        for b in 0..<24 {  // +m and −m in one block, either first (Q4_0 keeps the first one's sign), some repeated
            var block = random(1)
            let m = 2.5 + Float(b), i = (b * 7) % 32, j = (b * 13 + 5) % 32
            block[i] = b & 1 == 0 ? m : -m
            if i != j { block[j] = -block[i] }
            if b % 5 == 0 { block[(i + 3) % 32] = m; block[(i + 9) % 32] = -m }
            ties += block
        }
        cases.append(("largest magnitude tied between signs", ties))
        var halves: [Float] = []
        for b in 0..<16 {  // scaled values landing on k + 0.5: roundf ties (Q8_0), truncation edges (Q4_0)
            var block = (0..<32).map { (j: Int) -> Float in type == .q8_0 ? Float(j - 16) + 0.5 * Float((j + b) & 1) : Float(j % 17) * 0.5 - 4 }
            block[b % 32] = b & 1 == 0 ? top : -top
            halves += block.map { b % 3 == 0 ? $0 * 0.25 : $0 }
        }
        cases.append(("exact halves after scaling", halves))
        var tiny: [Float] = []
        for b in 0..<12 {  // subnormal weights: the F16 scale flushes to zero
            let scale = b < 6 ? Float.leastNormalMagnitude * Float(b + 1) / 7 : Float(sign: .plus, exponent: -130 + b, significand: 1)
            tiny += (0..<32).map { (j: Int) -> Float in (j % 4 == 0 ? -1 : 1) * scale * Float(j + 1) / 32 }
        }
        // A subnormal scale whose reciprocal overflows, next to zeros: 0 × ∞ gives NaN codes, which the fused Q4_0
        // kernel must not pack together with their neighbours (it falls back to integer packing for such chunks).
        let zerosBesideTinyScale = (0..<32).map { (j: Int) -> Float in j == 3 ? -1e-39 : (j % 2 == 0 ? 0 : 1e-40) }
        cases.append(("subnormal and tiny", tiny + [Float](repeating: .leastNonzeroMagnitude, count: 32) + zerosBesideTinyScale + random(1e-30) + random(1e-7)))
        var large: [Float] = []
        for (b, d) in [Float(65504), 65519, 65000].enumerated() {  // the F16 scale at its largest
            var block = random(d * top * 0.9)
            block[(b * 3) % 32] = (b & 1 == 0 ? -1 : 1) * d * top
            large += block
        }
        cases.append(("scales near the F16 maximum", large + random(1)))
        for blocks in [1, 3, 9, 17, 100] {
            cases.append(("\(blocks) random blocks", (0..<blocks).flatMap { random(Float($0 % 5 + 1) * 0.01) }))
        }
        for (name, values) in cases {
            GGUFTests.expectMeasured(type, values, tolerance: 1e-6, doubleSquares: true, "\(type.name) \(name)")
        }
        // A scale beyond F16's range: finite weights whose blocks would decode to Inf (the writer refuses them).
        let beyond = random(1) + (0..<32).map { Float($0 - 16) * 70_000 * top / 16 }
        var blocks = [UInt8](repeating: 0, count: 2 * type.bytesPerBlock)
        let overflow = beyond.withUnsafeBufferPointer { src in
            blocks.withUnsafeMutableBytes { GGMLQuants.quantizeMeasured(type, source: src.baseAddress!, count: 64, destination: $0.baseAddress!) }
        }
        #expect(overflow.firstNonFinite == nil && !overflow.measurement.errorEnergy.isFinite)
        for (index, bad) in [(5, Float.nan), (300, .infinity), (31 * 32 + 31, -.infinity), (17 * 32, .signalingNaN)] {
            var values = (0..<33).flatMap { _ in random(1) }
            values[index] = bad
            var blocks = [UInt8](repeating: 0, count: 33 * type.bytesPerBlock)
            let result = values.withUnsafeBufferPointer { src in
                blocks.withUnsafeMutableBytes { GGMLQuants.quantizeMeasured(type, source: src.baseAddress!, count: values.count, destination: $0.baseAddress!) }
            }
            #expect(result.firstNonFinite == index, "\(type.name) \(bad) at \(index)")
        }
    }

    /// quantizeMeasured's blocks equal quantize's, and its statistics those of dequantize's values (Σx², Σe² within
    /// `tolerance`, relative; max |e| exact). The reference squares in float, as the per-unit kernels do, or in
    /// double (`doubleSquares`: subnormal inputs, whose float squares vanish where the fused kernels' exact path
    /// keeps them).
    static func expectMeasured(_ type: GGMLType, _ values: [Float], tolerance: Double, doubleSquares: Bool = false, _ label: String) {
        let count = values.count
        var expected = [UInt8](repeating: 0, count: count / type.blockSize * type.bytesPerBlock)
        var blocks = expected
        var restored = [Float](repeating: 0, count: count)
        values.withUnsafeBufferPointer { src in
            expected.withUnsafeMutableBytes { GGMLQuants.quantize(type, source: src.baseAddress!, count: count, destination: $0.baseAddress!) }
        }
        expected.withUnsafeBytes { e in
            restored.withUnsafeMutableBufferPointer { GGMLQuants.dequantize(type, source: e.baseAddress!, count: count, destination: $0.baseAddress!) }
        }
        let result = values.withUnsafeBufferPointer { src in
            blocks.withUnsafeMutableBytes { GGMLQuants.quantizeMeasured(type, source: src.baseAddress!, count: count, destination: $0.baseAddress!) }
        }
        #expect(blocks == expected, "\(label)")
        #expect(result.firstNonFinite == nil, "\(label)")
        var signal: Double = 0, noise: Double = 0
        var largest: Float = 0
        for i in 0..<count {
            let x: Float = values[i], d: Float = values[i] - restored[i]
            signal += doubleSquares ? Double(x) * Double(x) : Double(x * x)
            noise += doubleSquares ? Double(d) * Double(d) : Double(d * d)
            largest = max(largest, abs(d))
        }
        #expect(abs(result.measurement.signalEnergy - signal) <= tolerance * signal, "\(label)")
        #expect(abs(result.measurement.errorEnergy - noise) <= tolerance * noise, "\(label)")
        #expect(result.measurement.maxError == largest, "\(label)")
    }

    static let measuredTypes: [GGMLType] = [.q8_0, .q6_K, .q5_1, .q5_0, .q4_K, .q4_1, .q4_0]

    @Test("encoding(measured:) reports the statistics once the tensor is written, and refuses NaN/Inf leaving no file")
    func measuredEncoding() throws {
        let rows = 1100, columns = 1024  // more than one chunk of 2^20 values
        var floats: [Float] = (0..<rows * columns).map { (i: Int) -> Float in Float((i * 7919) % 2001 - 1000) / 512 }
        let dir = Support.temporaryDirectory()
        func entry(_ values: [Float], _ name: String) throws -> TensorEntry {
            let bytes = values.withUnsafeBytes { Array($0) }
            try SafeTensors.write([try OutputTensor.bytes(name: "w", dtype: .f32, shape: Shape([rows, columns]), bytes)], metadata: [:], to: dir + "/" + name)
            return try Checkpoint.open(dir + "/" + name).tensors[0]
        }
        let measured = Mutex<GGMLQuants.Measurement?>(nil)
        let info = try GGUF.OutputTensorInfo.encoding(try entry(floats, "ok.safetensors"), as: .q4_0) { (m: GGMLQuants.Measurement) in
            measured.withLock { $0 = m }
        }
        try GGUF.write(tensors: [info], metadata: [], to: dir + "/ok.gguf")
        let stored = try GGUFFixture.storedBytes("w", in: dir + "/ok.gguf")
        var restored = [Float](repeating: 0, count: floats.count)
        stored.withUnsafeBytes { b in
            restored.withUnsafeMutableBufferPointer { GGMLQuants.dequantize(.q4_0, source: b.baseAddress!, count: floats.count, destination: $0.baseAddress!) }
        }
        var noise: Double = 0
        var largest: Float = 0
        for i in 0..<floats.count {
            let d: Float = floats[i] - restored[i]
            noise += Double(d * d)
            largest = max(largest, abs(d))
        }
        let m = try #require(measured.withLock { $0 })
        #expect(abs(m.errorEnergy - noise) <= 1e-6 * noise)  // float sums over 32 blocks (GGMLQuants+Fused.swift)
        #expect(m.maxError == largest)

        floats[1_048_576 + 3 * columns + 5] = .infinity  // in the second chunk
        let bad = try GGUF.OutputTensorInfo.encoding(try entry(floats, "bad.safetensors"), as: .q4_0) { (_: GGMLQuants.Measurement) in }
        let error = #expect(throws: CkptError.self) { try GGUF.write(tensors: [bad], metadata: [], to: dir + "/bad.gguf") }
        #expect(error?.code == .nonFinite && error?.tensor == "w" && error?.path == dir + "/bad.safetensors")
        #expect(error?.message.hasPrefix("element \(1_048_576 + 3 * columns + 5) is inf") == true)
        #expect(FileIdentity.of(dir + "/bad.gguf") == nil)
        let left = try FilePaths.contents(of: dir)
        #expect(left.allSatisfy { !$0.contains("tmp") }, "no temporary file left: \(left)")
    }

    @Test("tensors written slice by slice on all cores: blocks and statistics as one pass, first error in file order")
    func slicedWriting() throws {
        let dir = Support.temporaryDirectory()
        let rows = 2100, columns = 1024  // three slices of 2^20 values, the last one short
        func values(_ seed: Int) -> [Float] {
            (0..<rows * columns).map { (i: Int) -> Float in Float((i * 7919 + seed * 104_729) % 2001 - 1000) / 512 }
        }
        let names = ["a", "b", "c"]
        var tensors = names.enumerated().map { values($0.offset) }
        func write(_ tensors: [[Float]], to name: String) throws -> [String: GGMLQuants.Measurement] {
            var outputs: [OutputTensor] = []
            for (k, v) in tensors.enumerated() {
                outputs.append(try v.withUnsafeBytes { try OutputTensor.bytes(name: names[k], dtype: .f32, shape: Shape([rows, columns]), Array($0)) })
            }
            try SafeTensors.write(outputs, metadata: [:], to: dir + "/\(name).safetensors")
            let measured = Mutex<[String: GGMLQuants.Measurement]>([:])
            let checkpoint = try Checkpoint.open(dir + "/\(name).safetensors")
            let infos = try names.map { (n: String) throws(CkptError) -> GGUF.OutputTensorInfo in
                let entry = checkpoint.tensors.first { $0.name == n }!
                return try GGUF.OutputTensorInfo.encoding(entry, as: .q8_0) { (m: GGMLQuants.Measurement) in measured.withLock { $0[n] = m } }
            }
            try GGUF.write(tensors: infos, metadata: [], to: dir + "/\(name).gguf")
            return measured.withLock { $0 }
        }
        let measured = try write(tensors, to: "ok")
        for (k, name) in names.enumerated() {
            var expected = [UInt8](repeating: 0, count: rows * columns / 32 * 34)
            let whole = tensors[k].withUnsafeBufferPointer { src in
                expected.withUnsafeMutableBytes { GGMLQuants.quantizeMeasured(.q8_0, source: src.baseAddress!, count: rows * columns, destination: $0.baseAddress!) }
            }
            #expect(try GGUFFixture.storedBytes(name, in: dir + "/ok.gguf") == expected, "\(name)")
            let m = try #require(measured[name])
            #expect(abs(m.signalEnergy - whole.measurement.signalEnergy) <= 1e-12 * whole.measurement.signalEnergy)
            #expect(abs(m.errorEnergy - whole.measurement.errorEnergy) <= 1e-12 * whole.measurement.errorEnergy)
            #expect(m.maxError == whole.measurement.maxError)
        }

        // NaN in b's last slice and c's first: whichever worker meets which first, b's is the error.
        tensors[1][2 * (1 << 20) + 17] = .nan
        tensors[2][5] = .nan
        for _ in 0..<4 {
            let error = #expect(throws: CkptError.self) { _ = try write(tensors, to: "bad") }
            #expect(error?.code == .nonFinite && error?.tensor == "b", "\(String(describing: error))")
            #expect(error?.message.hasPrefix("element \(2 * (1 << 20) + 17) is nan") == true)
            #expect(FileIdentity.of(dir + "/bad.gguf") == nil)
        }
    }

    @Test("writer refuses what ggml would refuse, before creating any file")
    func writerRefusals() throws {
        let dir = Support.temporaryDirectory()
        func tensor(_ name: String, _ shape: [Int], _ type: GGMLType = .f32) throws -> GGUF.OutputTensorInfo {
            let count = try #require(type.byteCount(elements: shape.reduce(1, *)))
            return try GGUF.OutputTensorInfo(name: name, shape: Shape(shape), type: type) { (sink: OutputTensor.Sink) throws(CkptError) in
                try [UInt8](repeating: 0, count: count).withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try sink(raw) }
            }
        }
        func code(_ tensors: [GGUF.OutputTensorInfo], _ metadata: [GGUF.KeyValue] = []) -> CkptError.Code? {
            do {
                try GGUF.write(tensors: tensors, metadata: metadata, to: dir + "/x.gguf")
                return nil
            } catch {
                #expect(error.path == dir + "/x.gguf")
                return error.code
            }
        }
        #expect(code([try tensor(String(repeating: "n", count: 64), [1])]) == .invalidHeader)
        #expect(code([try tensor(String(repeating: "n", count: 63), [1])]) == nil)
        #expect(code([try tensor("five", [1, 1, 1, 1, 1])]) == .invalidHeader)
        #expect(code([try tensor("a", [1]), try tensor("a", [2])]) == .duplicateName)
        #expect(code([], [.init("general.alignment", .uint64(64))]) == .invalidMetadata)
        #expect(code([], [.init("general.alignment", .uint32(48))]) == .invalidMetadata)
        #expect(code([], [.init("k", .array(.array, []))]) == .invalidMetadata)
        #expect(code([], [.init("k", .array(.uint8, [.int8(1)]))]) == .invalidMetadata)
        #expect(code([], [.init("k", .bool(true)), .init("k", .bool(false))]) == .duplicateName)
        #expect(code([], [.init("", .bool(true))]) == .invalidMetadata)
        #expect(throws: CkptError.self) { try tensor("rows", [2, 48], .q4_0) }
        let short = try GGUF.OutputTensorInfo(name: "short", shape: Shape([4]), type: .f32) { (sink: OutputTensor.Sink) throws(CkptError) in
            try [UInt8](repeating: 0, count: 12).withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try sink(raw) }
        }
        #expect(code([try tensor("ok", [8]), short]) == .shortData)
        let failing = try GGUF.OutputTensorInfo(name: "failing", shape: Shape([1 << 22]), type: .f32) { (sink: OutputTensor.Sink) throws(CkptError) in
            try [UInt8](repeating: 0, count: 8 << 20).withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try sink(raw) }
            throw CkptError(.crcMismatch, "the input went bad halfway")
        }
        #expect(code([try tensor("ok", [8]), failing]) == .crcMismatch)
        #expect(try FilePaths.contents(of: dir).filter { $0 != "x.gguf" }.isEmpty, "no temporary file is left behind")
        #expect(throws: CkptError.self) { try GGUF.OutputTensorInfo(try OutputTensor.bytes(name: "u", dtype: .u8, shape: Shape([1]), [1])) }
    }

    // MARK: - Malformed files

    static let corpus: [(String, [UInt8], CkptError.Code)] = {
        var cases: [(String, [UInt8], CkptError.Code)] = []
        var badMagic = GGUFBytes.valid()
        badMagic[0] = UInt8(ascii: "g")
        cases.append(("bad magic", badMagic, .badMagic))
        cases.append(("too short for the magic", [0x47, 0x47], .badMagic))
        for version: UInt32 in [0, 1, 2, 4, 0x0300_0000] {
            var file = GGUFBytes.valid()
            file.replaceSubrange(4..<8, with: Support.le32(Int(version)))
            cases.append(("version \(version)", file, .unsupportedVersion))
        }
        cases.append(("absurd tensor_count", GGUFBytes.header(tensors: 1 << 40, kvs: 0).bytes, .tooLarge))
        cases.append(("absurd kv_count", GGUFBytes.header(tensors: 0, kvs: UInt64(Int64.max)).bytes, .tooLarge))
        cases.append(("negative tensor_count", GGUFBytes.header(tensors: UInt64.max, kvs: 0).bytes, .tooLarge))
        cases.append(("truncated in the tensor infos", Array(GGUFBytes.valid().prefix(24 + 43 + 4)), .invalidHeader))
        cases.append(("counts larger than a truncated file", Array(GGUFBytes.valid().prefix(30)), .tooLarge))
        cases.append(("nested array", GGUFBytes.valid { b in b.string("a"); b.u32(9); b.u32(9); b.u64(0) }, .invalidMetadata))
        cases.append(("value type 13", GGUFBytes.valid { b in b.string("a"); b.u32(13); b.u8(0) }, .invalidMetadata))
        cases.append(("empty key", GGUFBytes.valid { b in b.string(""); b.u32(0); b.u8(0) }, .invalidMetadata))
        cases.append(("duplicate key", GGUFBytes.valid(kvCount: 2) { b in b.string("k"); b.u32(0); b.u8(0); b.string("k"); b.u32(0); b.u8(1) }, .duplicateName))
        cases.append(("string longer than the file", GGUFBytes.valid { b in b.string("k"); b.u32(8); b.u64(1 << 20) }, .invalidHeader))
        cases.append(("string over ggml's limit", GGUFBytes.valid { b in b.string("k"); b.u32(8); b.u64(1 << 31) }, .tooLarge))
        cases.append(("array over ggml's limit", GGUFBytes.valid { b in b.string("k"); b.u32(9); b.u32(0); b.u64(1 << 31) }, .tooLarge))
        cases.append(("array longer than the file", GGUFBytes.valid { b in b.string("k"); b.u32(9); b.u32(12); b.u64(1 << 20) }, .invalidHeader))
        cases.append(("invalid UTF-8 key", GGUFBytes.valid { b in b.u64(1); b.u8(0xFF); b.u32(0); b.u8(0) }, .invalidUTF8))
        cases.append(("alignment key is u64", GGUFBytes.valid { b in b.string("general.alignment"); b.u32(10); b.u64(32) }, .invalidMetadata))
        cases.append(("alignment key is an array", GGUFBytes.valid { b in b.string("general.alignment"); b.u32(9); b.u32(4); b.u64(1); b.u32(32) }, .invalidMetadata))
        cases.append(("alignment not a power of two", GGUFBytes.valid { b in b.string("general.alignment"); b.u32(4); b.u32(48) }, .invalidMetadata))
        cases.append(("alignment zero", GGUFBytes.valid { b in b.string("general.alignment"); b.u32(4); b.u32(0) }, .invalidMetadata))

        func oneTensor(_ name: String = "w", ne: [UInt64] = [4, 2], type: UInt32 = 0, offset: UInt64 = 0, data: Int = 32) -> [UInt8] {
            var b = GGUFBytes.header(tensors: 1, kvs: 0)
            b.info(name, ne: ne, type: type, offset: offset)
            b.pad(to: 32)
            b.bytes += [UInt8](repeating: 0, count: data)
            return b.bytes
        }
        cases.append(("name of 64 bytes", oneTensor(String(repeating: "x", count: 64)), .invalidHeader))
        cases.append(("name with NUL", oneTensor("a\u{0}b"), .invalidHeader))
        cases.append(("5 dimensions", oneTensor(ne: [1, 1, 1, 1, 1]), .invalidHeader))
        cases.append(("negative ne", oneTensor(ne: [UInt64.max, 1]), .invalidHeader))
        cases.append(("element count overflow", oneTensor(ne: [1 << 32, 1 << 32]), .overflow))
        cases.append(("unknown type (IQ2_XXS)", oneTensor(type: 16), .unsupportedDType))
        cases.append(("type id out of range", oneTensor(type: 1000), .unsupportedDType))
        cases.append(("ne[0] not a multiple of the block size", oneTensor(ne: [48, 1], type: 2), .misalignedSlice))
        cases.append(("misaligned offset", oneTensor(offset: 4, data: 64), .invalidOffset))
        cases.append(("truncated data", oneTensor(data: 16), .incompleteBuffer))
        cases.append(("data section past the end", Array(oneTensor(data: 0).dropLast(4)), .incompleteBuffer))

        var twoTensors = GGUFBytes.header(tensors: 2, kvs: 0)
        twoTensors.info("a", ne: [3], type: 0, offset: 0)
        twoTensors.info("a", ne: [3], type: 0, offset: 32)
        twoTensors.pad(to: 32)
        twoTensors.bytes += [UInt8](repeating: 0, count: 64)
        cases.append(("duplicate tensor name", twoTensors.bytes, .duplicateName))
        var unpadded = GGUFBytes.header(tensors: 2, kvs: 0)
        unpadded.info("a", ne: [3], type: 0, offset: 0)
        unpadded.info("b", ne: [3], type: 0, offset: 12)  // ggml pads a's 12 bytes to 32
        unpadded.pad(to: 32)
        unpadded.bytes += [UInt8](repeating: 0, count: 64)
        cases.append(("second tensor not at the padded end of the first", unpadded.bytes, .invalidOffset))
        return cases
    }()

    @Test("malformed files fail with the rule's error code, naming the file", arguments: 0..<corpus.count)
    func malformed(index: Int) {
        let (label, bytes, expected) = Self.corpus[index]
        do {
            let checkpoint = try Support.checkpoint(bytes: bytes, name: "bad.gguf")
            for tensor in checkpoint.tensors { _ = try tensor.load() }
            Issue.record("\(label): accepted")
        } catch {
            #expect(error.code == expected, "\(label): \(error)")
            #expect(error.path == "bad.gguf", "\(label)")
        }
    }

    @Test("errors about a tensor name it")
    func errorsNameTheTensor() {
        var b = GGUFBytes.header(tensors: 1, kvs: 0)
        b.info("blocks.0.attn.qkv.weight", ne: [48, 2], type: 8, offset: 0)
        do {
            _ = try Support.checkpoint(bytes: b.bytes, name: "m.gguf")
            Issue.record("accepted")
        } catch {
            #expect(error.tensor == "blocks.0.attn.qkv.weight")
            #expect(error.description.contains("Q8_0 block size 32"))
        }
    }

    @Test("the well-formed corpus base and an empty file with no tensors are accepted")
    func corpusBaseIsValid() throws {
        let checkpoint = try Support.checkpoint(bytes: GGUFBytes.valid(), name: "ok.gguf")
        #expect(checkpoint.tensors.map(\.shape.dims) == [[2, 4]] && checkpoint.metadata == ["general.architecture": "vit"])
        let empty = try Support.checkpoint(bytes: GGUFBytes.header(tensors: 0, kvs: 0).bytes, name: "e.gguf")
        #expect(empty.tensors.isEmpty)
    }
}

extension GGUF.OutputTensorInfo {
    /// The same tensor under another name (test helper).
    func renamedForTest(_ name: String) throws -> GGUF.OutputTensorInfo {
        let original = self
        return try GGUF.OutputTensorInfo(name: name, shape: shape, type: type) { (sink: OutputTensor.Sink) throws(CkptError) in
            try original.write(to: sink)
        }
    }
}
