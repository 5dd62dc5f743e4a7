import CkptCore

/// NumPy `.npz` archives: a zip of `.npy` members (stored or deflated, ZIP64 when large), as `np.savez` and
/// `np.savez_compressed` write them.
public enum NPZ {
    /// Member that records the dtypes numpy cannot name (BF16, F8…), stored as void descrs next to it.
    public static let dtypeManifestName = "__ckpt_dtypes__.json"

    public static func read(storage: ByteStorage, path: String, options: Checkpoint.ReadOptions) throws(CkptError) -> Checkpoint {
        let members = try ZipArchive.members(storage: storage, path: path)
        var manifest: [NameKey: DType] = [:]
        if let member = members.first(where: { $0.name == dtypeManifestName }) {
            manifest = try readManifest(member)
        }
        var tensors: [TensorEntry] = []
        var skipped: [String] = []
        var names = Set<NameKey>()
        for member in members where member.name != dtypeManifestName {
            guard member.name.hasSuffix(".npy") else {
                skipped.append(member.name)
                continue
            }
            let name = String(member.name.dropLast(4))
            guard names.insert(NameKey(name)).inserted else {
                throw CkptError(.duplicateName, "two members hold the array '\(name)'", path: path, tensor: name)
            }
            do {
                tensors.append(try entry(for: member, name: name, path: path, options: options, manifest: manifest[NameKey(name)]))
            } catch {
                throw error.at(tensor: name).at(path: path)
            }
        }
        for name in manifest.keys where !names.contains(name) {
            throw CkptError(.invalidMetadata, "\(dtypeManifestName) names an array the archive does not hold", path: path, tensor: String(decoding: name.utf8, as: UTF8.self))
        }
        var metadata: [String: String] = [:]
        if !skipped.isEmpty { metadata["skipped_members"] = skipped.joined(separator: ",") }
        return Checkpoint(format: .npz, path: path, metadata: metadata, tensors: tensors, files: [path])
    }

    private static func entry(
        for member: ZipMember, name: String, path: String, options: Checkpoint.ReadOptions, manifest: DType?
    ) throws(CkptError) -> TensorEntry {
        // The header sits in the first bytes of the member: read (or inflate) only those.
        let prefix = try member.prefix(10 + 4 + NumPy.maximumHeaderSize)
        let header = try prefix.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try NumPy.parseHeader(raw) }
        let p = try NumPy.payload(
            header, available: member.uncompressedSize, voidDTypes: options.voidDTypes, manifest: manifest,
            container: "member '\(member.name)'")
        return TensorEntry(name: name, dtype: p.dtype, shape: p.shape, byteCount: p.byteCount, path: path, source: .zipMember(member, p.layout))
    }

    private static func readManifest(_ member: ZipMember) throws(CkptError) -> [NameKey: DType] {
        guard member.uncompressedSize <= 16 << 20 else {
            throw CkptError(.tooLarge, "\(dtypeManifestName) is larger than 16 MiB")
        }
        let bytes = try member.contents()
        let json = try bytes.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try JSONParser.parse(raw) }
        guard case .object(let entries) = json else {
            throw CkptError(.invalidMetadata, "\(dtypeManifestName) must be a JSON object of name → dtype")
        }
        var result: [NameKey: DType] = [:]
        for (name, value) in entries {
            guard case .string(let text) = value, let dtype = DType(rawValue: text) else {
                throw CkptError(.invalidMetadata, "\(dtypeManifestName): '\(name)' does not map to a dtype name")
            }
            guard result.updateValue(dtype, forKey: NameKey(name)) == nil else {
                throw CkptError(.invalidMetadata, "\(dtypeManifestName): '\(name)' appears twice")
            }
        }
        return result
    }
}
