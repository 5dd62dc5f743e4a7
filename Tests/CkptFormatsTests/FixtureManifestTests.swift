import CkptCore
import CkptFormats
import Testing

/// Every fixture made by numpy / safetensors / ml_dtypes / huggingface_hub (fixtures/generate.py) is read by ckpt
/// and compared with what those libraries recorded in fixtures/manifest.json: names, dtypes, shapes and the
/// CRC-32 of each array's C-order little-endian bytes.
@Suite("Real-library fixtures")
struct FixtureManifestTests {
    struct Record: CustomTestStringConvertible, Sendable {
        let path: String
        let json: JSONValue
        var testDescription: String { path }
    }

    static let records: [Record] = {
        guard let manifest = try? Support.parseJSON(file: Support.fixture("manifest.json")),
            case .array(let files)? = manifest["files"]
        else { return [] }
        return files.compactMap { file in
            guard case .string(let path)? = file["path"] else { return nil }
            return Record(path: path, json: file)
        }
    }()

    @Test("the manifest lists the fixtures")
    func manifestIsComplete() {
        #expect(Self.records.count >= 35)
    }

    @Test("ckpt reads each fixture exactly as the library that wrote it", arguments: records)
    func fixture(record: Record) throws {
        let options = Checkpoint.ReadOptions(voidDTypes: [2: .bf16, 1: .f8E4M3])
        let path = Support.fixture(record.path)
        if case .bool(true)? = record.json["refuse"] {
            #expect(throws: CkptError.self) {
                let checkpoint = try Checkpoint.open(path, options: options)
                for tensor in checkpoint.tensors { _ = try tensor.load() }
            }
            return
        }
        let checkpoint = try Checkpoint.open(path, options: options)
        guard case .array(let arrays)? = record.json["arrays"] else {
            Issue.record("no arrays in record")
            return
        }
        #expect(checkpoint.tensors.count == arrays.count)
        let byName = Dictionary(checkpoint.tensors.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        for array in arrays {
            guard case .string(let name)? = array["name"], case .string(let dtype)? = array["dtype"],
                case .array(let shape)? = array["shape"], let crc = array["crc32"]?.unsignedInteger
            else {
                Issue.record("malformed manifest entry")
                continue
            }
            let tensor = try #require(byName[name], "\(name) missing")
            #expect(tensor.dtype.name == dtype, "\(name)")
            #expect(tensor.shape.dims == shape.compactMap { $0.unsignedInteger.map(Int.init) }, "\(name)")
            let bytes = try tensor.load()
            #expect(UInt64(bytes.withUnsafeBytes { CRC32.checksum($0) }) == crc, "\(name) bytes")
        }
    }
}

@Suite("Malformed-file corpus")
struct MalformedCorpusTests {
    struct Case: CustomTestStringConvertible, Sendable {
        let file: String
        let code: String
        var testDescription: String { "\(file) → \(code)" }
    }

    static let cases: [Case] = {
        guard case .object(let entries)? = try? Support.parseJSON(file: Support.fixture("malformed/expected.json")) else { return [] }
        return entries.compactMap { entry in
            guard case .string(let code)? = entry.value["code"] else { return nil }
            return Case(file: entry.key, code: code)
        }
    }()

    @Test("the corpus covers every broken rule the issue lists")
    func corpusSize() {
        #expect(Self.cases.count >= 35)
        let codes = Set(Self.cases.map(\.code))
        for needed in ["headerTooSmall", "headerTooLarge", "invalidHeaderLength", "invalidOffset", "incompleteBuffer", "overflow",
                       "invalidUTF8", "invalidHeader", "unknownDType", "duplicateName", "invalidMetadata", "badMagic",
                       "unsupportedVersion", "objectArray", "shortData", "crcMismatch", "unsafeMemberName", "inflateOverrun"] {
            #expect(codes.contains(needed), "\(needed)")
        }
    }

    @Test("each malformed file fails with its documented error and nothing crashes", arguments: cases)
    func malformed(entry: Case) {
        let code = Support.errorCode { () throws(CkptError) in try Checkpoint.open(Support.fixture("malformed/" + entry.file)) }
        #expect(code?.rawValue == entry.code)
    }
}

@Suite("Fuzzer regressions")
struct FuzzRegressionTests {
    static let files: [String] = {
        let root = Support.repositoryRoot + "/fuzz/regressions"
        // The file-format targets; merge inputs are replayed through the merge (MergeFuzzRegressionTests).
        let targets = ((try? FilePaths.contents(of: root)) ?? []).filter { ["safetensors", "numpy", "npz", "gguf"].contains($0) }
        return targets.flatMap { target in
            ((try? FilePaths.contents(of: root + "/" + target)) ?? []).map { "fuzz/regressions/\(target)/\($0)" }
        }
    }()

    @Test("inputs that once crashed a fuzz target now fail with a ckpt error", arguments: files)
    func regression(file: String) {
        let path = Support.repositoryRoot + "/" + file
        let code = Support.errorCode { () throws(CkptError) in try Checkpoint.open(path) }
        #expect(code != nil)
    }

    @Test("there are regression inputs to replay")
    func present() {
        #expect(!Self.files.isEmpty)
    }
}
