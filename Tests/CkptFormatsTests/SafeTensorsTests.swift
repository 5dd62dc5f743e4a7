import CkptCore
import CkptFormats
import Testing

@Suite("safetensors")
struct SafeTensorsTests {
    func rewrite(_ path: String) throws -> [UInt8] {
        let checkpoint = try Checkpoint.open(path)
        let dir = Support.temporaryDirectory()
        let tensors = try checkpoint.tensors.map { (entry: TensorEntry) throws(CkptError) in try OutputTensor.from(entry) }
        try SafeTensors.write(tensors, metadata: checkpoint.metadata, to: dir + "/out.safetensors")
        return try Support.read(dir + "/out.safetensors")
    }

    @Test("writing back a file made by Python safetensors reproduces it byte for byte", arguments: [
        "safetensors/multi_dtype.safetensors", "sharded/model-00001-of-00003.safetensors",
    ])
    func byteIdenticalRewrite(fixture: String) throws {
        let original = try Support.read(Support.fixture(fixture))
        #expect(try rewrite(Support.fixture(fixture)) == original)
    }

    @Test("files without metadata gain format: pt and keep their tensors")
    func addsFormat() throws {
        let bytes = try rewrite(Support.fixture("safetensors/no_metadata.safetensors"))
        let checkpoint = try Support.checkpoint(bytes: bytes, name: "x.safetensors")
        #expect(checkpoint.metadata == ["format": "pt"])
        let original = try Checkpoint.open(Support.fixture("safetensors/no_metadata.safetensors"))
        #expect(checkpoint.tensors.map(\.name) == original.tensors.map(\.name))
    }

    @Test("header is padded with spaces to a multiple of 8 and ordered by dtype rank, then name")
    func headerLayout() throws {
        let tensors = [
            try OutputTensor.bytes(name: "b", dtype: .f32, shape: Shape([3]), [UInt8](repeating: 1, count: 12)),
            try OutputTensor.bytes(name: "a", dtype: .u8, shape: Shape([2]), [1, 2]),
            try OutputTensor.bytes(name: "c", dtype: .f64, shape: Shape([1]), [UInt8](repeating: 2, count: 8)),
        ]
        let ordered = SafeTensors.writeOrder(tensors)
        #expect(ordered.map(\.name) == ["c", "b", "a"])
        let header = try SafeTensors.headerBytes(for: ordered, metadata: ["format": "pt"])
        #expect((header.count - 8) % 8 == 0)
        let text = String(decoding: header[8...], as: UTF8.self)
        #expect(text.hasPrefix(#"{"__metadata__":{"format":"pt"},"c":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},"b":"#))
    }

    @Test("what real writers produce is accepted: whitespace around the JSON, unpadded headers, unaligned data, scalars, empty tensors")
    func lenientReads() throws {
        let header = #"  {"x":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"e":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]}}"# + "\n\t "
        let data: [UInt8] = [0, 0, 0x80, 0x3F]
        let checkpoint = try Support.checkpoint(bytes: Support.safetensors(header: header, data: data, pad: false), name: "x.safetensors")
        #expect(checkpoint.tensors.count == 2)
        let x = try #require(checkpoint.tensors.first { $0.name == "x" })
        #expect(x.shape.dims.isEmpty)
        #expect(try x.load().withUnsafeBytes { $0.loadUnaligned(as: Float.self) } == 1.0)
        // MLX-style: 13-byte header, so the data starts at an odd offset; conversion reads it unaligned.
        let mlx = Support.safetensors(header: #"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}"#, data: [0, 0, 0x80, 0x3F, 0, 0, 0, 0x40, 0, 0, 0x40, 0x40], pad: false)
        #expect((mlx.count - 12) % 4 != 0)
        let w = try Support.checkpoint(bytes: mlx, name: "m.safetensors").tensors[0]
        let half = try OutputTensor.from(w, convertingTo: .f16)
        var out: [UInt8] = []
        try half.write { (chunk: UnsafeRawBufferPointer) throws(CkptError) in out += chunk }
        #expect(out == [0x00, 0x3C, 0x00, 0x40, 0x00, 0x42])  // 1, 2, 3 in F16
    }

    @Test("rules beyond the corpus", arguments: [
        (#"{"a":{"dtype":"U8","dtype":"U16","shape":[1],"data_offsets":[0,1]}}"#, CkptError.Code.invalidHeader),
        (#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0]}}"#, .invalidHeader),
        (#"{"a":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}"#, .invalidHeader),
        (#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}"#, .invalidOffset),
        (#"{"a":{"dtype":"u8","shape":[1],"data_offsets":[0,1]}}"#, .unknownDType),
        (#"{"__metadata__":["x"]}"#, .invalidMetadata),
        (#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551615]}}"#, .overflow),
    ])
    func rules(header: String, code: CkptError.Code) {
        let bytes = Support.safetensors(header: header, data: [0])
        #expect(Support.errorCode { () throws(CkptError) in try Support.checkpoint(bytes: bytes, name: "x.safetensors") } == code)
    }

    @Test("writer refuses C128, duplicate and reserved names")
    func writerRefusals() throws {
        let c128 = try OutputTensor.bytes(name: "z", dtype: .c128, shape: Shape([1]), [UInt8](repeating: 0, count: 16))
        #expect(throws: CkptError.self) { try SafeTensors.headerBytes(for: [c128], metadata: [:]) }
        let a = try OutputTensor.bytes(name: "a", dtype: .u8, shape: Shape([1]), [1])
        #expect(throws: CkptError.self) { try SafeTensors.headerBytes(for: [a, a], metadata: [:]) }
        let reserved = try OutputTensor.bytes(name: "__metadata__", dtype: .u8, shape: Shape([1]), [1])
        #expect(throws: CkptError.self) { try SafeTensors.headerBytes(for: [reserved], metadata: [:]) }
    }
}

@Suite("JSON parser")
struct JSONTests {
    @Test("parses what serde_json and Python emit, keeping duplicates and exact integers")
    func valid() throws {
        let value = try JSONParser.parse(#" {"a": [1, -2.5e3, true, null, "x\u00e9\ud83d\ude00\n"], "a": 18446744073709551615} "#)
        guard case .object(let members) = value else { Issue.record("not an object"); return }
        #expect(members.count == 2)
        #expect(members[1].value.unsignedInteger == UInt64.max)
        #expect(value["a"]?.unsignedInteger == UInt64.max, "last duplicate wins on lookup")
        guard case .array(let items) = members[0].value else { Issue.record("not an array"); return }
        #expect(items[4] == .string("xé😀\n"))
        #expect(items[1].unsignedInteger == nil)
    }

    @Test("rejects malformed JSON", arguments: [
        "", "{", "[1,]", "{\"a\":1,}", "01", "1.", "\"\\ud800\"", "\"\\udc00x\"", "\"a\u{01}\"", "{} x", "tru", "\"\\q\"",
        String(repeating: "[", count: 200) + String(repeating: "]", count: 200),
    ])
    func invalid(text: String) {
        #expect(throws: CkptError.self) { try JSONParser.parse(text) }
    }

    @Test("string escaping matches serde_json and Python's ensure_ascii")
    func escaping() {
        #expect(JSONWriter.quoted("a\"b\\c\n\u{1}é") == "\"a\\\"b\\\\c\\n\\u0001é\"")
        #expect(JSONWriter.quoted("é😀\u{7F}", asciiOnly: true) == "\"\\u00e9\\ud83d\\ude00\\u007f\"")
    }

    @Test("tensor groups: parts produced interleaved, in small pieces, land where the sequential writer puts them")
    func groupsMatchSequentialWrite() throws {
        func bytes(_ count: Int, _ seed: Int) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 * 31 + seed) } }
        @Sendable func send(_ part: Int, _ piece: ArraySlice<UInt8>, _ sink: OutputTensorGroup.Sink) throws(CkptError) {
            try Array(piece).withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try sink(part, raw) }
        }
        let words = bytes(4 * 6, 1), scales = bytes(2 * 3, 2), biases = bytes(2 * 3, 3), plain = bytes(4 * 5, 4)
        let tensors = [
            try OutputTensor.bytes(name: "m.weight", dtype: .u32, shape: Shape([2, 3]), words),
            try OutputTensor.bytes(name: "m.scales", dtype: .f16, shape: Shape([3]), scales),
            try OutputTensor.bytes(name: "m.biases", dtype: .f16, shape: Shape([3]), biases),
            try OutputTensor.bytes(name: "a.bias", dtype: .f32, shape: Shape([5]), plain),
        ]
        let dir = Support.temporaryDirectory()
        try SafeTensors.write(tensors, metadata: ["k": "v"], to: dir + "/sequential.safetensors")
        let parts = try tensors[0..<3].map { (t: OutputTensor) throws(CkptError) in try OutputTensorGroup.Part(name: t.name, dtype: t.dtype, shape: t.shape) }
        let group = OutputTensorGroup(parts: parts) { (sink: OutputTensorGroup.Sink) throws(CkptError) in
            // Row by row, as a quantizer emits them: each part's pieces in order, the parts interleaved.
            for row in 0..<2 {
                try send(0, words[row * 12..<(row + 1) * 12], sink)
                for part in [2, 1] { try send(part, (part == 1 ? scales : biases)[row * 3..<(row + 1) * 3], sink) }
            }
        }
        try SafeTensors.write(groups: [OutputTensorGroup(tensors[3]), group], metadata: ["k": "v"], to: dir + "/groups.safetensors")
        #expect(try Support.read(dir + "/groups.safetensors") == (try Support.read(dir + "/sequential.safetensors")))

        // A producer that leaves a part short (or overfills it) fails and leaves no file.
        let short = OutputTensorGroup(parts: parts) { (sink: OutputTensorGroup.Sink) throws(CkptError) in
            try send(0, words[...], sink)
            try send(1, scales[...], sink)
        }
        let long = OutputTensorGroup(parts: Array(parts[1...1])) { (sink: OutputTensorGroup.Sink) throws(CkptError) in
            try send(0, (scales + scales)[...], sink)
        }
        for bad in [short, long] {
            #expect(throws: CkptError.self) { try SafeTensors.write(groups: [bad], metadata: [:], to: dir + "/bad.safetensors") }
            #expect(FileIdentity.of(dir + "/bad.safetensors") == nil)
        }
    }
}
