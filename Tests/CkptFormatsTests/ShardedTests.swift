import CkptCore
import CkptFormats
import Testing

@Suite("sharded safetensors")
struct ShardedTests {
    func tensor(_ name: String, bytes: Int) throws -> OutputTensor {
        try OutputTensor.bytes(name: name, dtype: .u8, shape: Shape([bytes]), [UInt8](repeating: UInt8(bytes % 251), count: bytes))
    }

    @Test("greedy split as huggingface_hub does it; oversized tensors get a shard of their own")
    func plan() throws {
        let tensors = try [tensor("a", bytes: 40), tensor("b", bytes: 50), tensor("big", bytes: 300), tensor("c", bytes: 20), tensor("d", bytes: 90)]
        let shards = ShardedSafeTensors.plan(tensors, maximumShardBytes: 100)
        #expect(shards.map { $0.map(\.name) } == [["big"], ["a", "b"], ["c"], ["d"]])
        #expect(ShardedSafeTensors.shardName(0, of: 3) == "model-00001-of-00003.safetensors")
    }

    @Test("index JSON is byte-identical to the fixture written with json.dumps(indent=2, sort_keys=True)")
    func indexText() throws {
        let checkpoint = try Checkpoint.open(Support.fixture("sharded"))
        let weightMap = checkpoint.tensors.map { (tensor: $0.name, shard: FilePaths.fileName(of: $0.path)) }
        let text = ShardedSafeTensors.indexJSON(totalSize: checkpoint.totalBytes, weightMap: weightMap)
        #expect(Array(text.utf8) == (try Support.read(Support.fixture("sharded/model.safetensors.index.json"))))
        #expect(checkpoint.format == .shardedSafetensors)
    }

    @Test("write then read: the shards form one checkpoint; the index is read through the folder or the file")
    func roundTrip() throws {
        let dir = Support.temporaryDirectory() + "/out"
        let tensors = try (0..<7).map { try tensor("t\($0)", bytes: 30 + $0) }
        try ShardedSafeTensors.write(tensors, metadata: ["format": "pt"], to: dir, maximumShardBytes: 100)
        let files = try FilePaths.contents(of: dir)
        #expect(files.contains(ShardedSafeTensors.indexName))
        #expect(files.filter { $0.hasSuffix(".safetensors") }.count == 3)
        #expect(!files.contains { $0.contains("ckpt-tmp") })
        for source in [dir, dir + "/" + ShardedSafeTensors.indexName] {
            let checkpoint = try Checkpoint.open(source)
            #expect(Set(checkpoint.tensors.map(\.name)) == Set(tensors.map(\.name)))
            #expect(checkpoint.totalBytes == tensors.reduce(0) { $0 + $1.byteCount })
        }
    }

    @Test("a single shard is written as model.safetensors without an index")
    func singleShard() throws {
        let dir = Support.temporaryDirectory()
        try ShardedSafeTensors.write([try tensor("a", bytes: 10)], metadata: [:], to: dir, maximumShardBytes: 1000)
        #expect(try FilePaths.contents(of: dir) == ["model.safetensors"])
        #expect(try Checkpoint.open(dir).tensors.map(\.name) == ["a"])
    }

    @Test("inconsistent indexes are refused", arguments: [
        (#"{"weight_map": {"missing": "model-00001-of-00003.safetensors"}}"#, CkptError.Code.shardIndex),
        (#"{"weight_map": {"x": "../evil.safetensors"}}"#, .shardIndex),
        (#"{"weight_map": {"x": 3}}"#, .shardIndex),
        (#"{"weight_map": {}, "weight_map": {}}"#, .shardIndex),
        (#"[]"#, .shardIndex),
        (#"{"weight_map": {"x": "nope.safetensors"}}"#, .notFound),
    ])
    func badIndex(index: String, code: CkptError.Code) throws {
        let dir = Support.temporaryDirectory()
        for name in ["model-00001-of-00003.safetensors"] {
            let bytes = try Support.read(Support.fixture("sharded/" + name))
            try Support.write(bytes, to: dir + "/" + name)
        }
        try Support.write(Array(index.utf8), to: dir + "/model.safetensors.index.json")
        #expect(Support.errorCode { () throws(CkptError) in try Checkpoint.open(dir) } == code)
    }
}
