import CkptCore
import CkptFormats

/// The activation quantizers of a ViT (RepQ-ViT's quantized sites) and their parameters: the "side file" stored
/// next to a quantized model (`formats/activation-quantization.md`).
///
/// Sites, per block `i`: the inputs of `qkv`, `proj`, `fc1` and `fc2`; the `q` and `k` operands of `q·kᵀ`; the
/// probabilities and the `v` operand of `P·V`. Once per model: the patch-embedding input (8 bits in RepQ-ViT)
/// and the classifier head's input. Probabilities take the log√2 or the uniform quantizer, every other site the
/// uniform one, per tensor or per channel (the last dimension: ``UniformQuantizer/Granularity/perColumn``).
public struct ActivationQuantization: Sendable, Equatable {
    public static let formatName = "ckpt-activation-quantization"
    public static let formatVersion = 1

    /// A quantized activation.
    public enum Site: Hashable, Sendable, Comparable, CustomStringConvertible {
        case patchEmbedInput
        case block(Int, BlockSite)
        case headInput

        /// A site inside transformer block `i`.
        public enum BlockSite: String, CaseIterable, Sendable, Comparable {
            case qkvInput = "qkv.input"
            case projInput = "proj.input"
            case fc1Input = "fc1.input"
            case fc2Input = "fc2.input"
            case attnQ = "attn.q"
            case attnK = "attn.k"
            case attnV = "attn.v"
            case attnProbs = "attn.probs"

            public static func < (a: BlockSite, b: BlockSite) -> Bool {
                allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
            }
        }

        /// Blocks a name may index (a bound against absurd names, far above any ViT's depth).
        public static let maximumBlocks = 10_000

        /// `patch_embed.input`, `blocks.{i}.{qkv|proj|fc1|fc2}.input`, `blocks.{i}.attn.{q|k|v|probs}`, `head.input`.
        public var name: String {
            switch self {
            case .patchEmbedInput: "patch_embed.input"
            case .headInput: "head.input"
            case .block(let i, let site): "blocks.\(i).\(site.rawValue)"
            }
        }

        public var description: String { name }

        /// The site a name denotes; nil for anything else (block indices in canonical decimal, below
        /// ``maximumBlocks``).
        public init?(name: String) {
            switch name {
            case "patch_embed.input": self = .patchEmbedInput
            case "head.input": self = .headInput
            default:
                guard name.hasPrefix("blocks.") else { return nil }
                let rest = name.dropFirst("blocks.".count)
                let digits = rest.prefix { $0.isASCII && $0.isNumber }
                guard !digits.isEmpty, digits.count <= 5, digits == "0" || digits.first != "0", let index = Int(digits),
                      index < Self.maximumBlocks, rest.dropFirst(digits.count).first == "." else { return nil }
                guard let site = BlockSite(rawValue: String(rest.dropFirst(digits.count + 1))) else { return nil }
                self = .block(index, site)
            }
        }

        /// Every site of a ViT with `blocks` blocks, in canonical order.
        public static func all(blocks: Int) -> [Site] {
            [.patchEmbedInput] + (0..<blocks).flatMap { i in BlockSite.allCases.map { Site.block(i, $0) } } + [.headInput]
        }

        /// RepQ-ViT's quantizer for the site: log√2 for the probabilities, uniform elsewhere.
        public var repQViTKind: Kind { self == .patchEmbedInput || self == .headInput ? .uniform : (blockSite == .attnProbs ? .logSqrt2 : .uniform) }

        /// RepQ-ViT's bits for the site at activation width `bits`: 8 for the patch-embedding input.
        public func repQViTBits(activationBits bits: Int) -> Int { self == .patchEmbedInput ? 8 : bits }

        /// Whether RepQ-ViT calibrates the site per channel before the LayerNorm fold (the post-LayerNorm inputs of
        /// qkv and fc1, folded with ``LayerNormReparameterization``).
        public var isPostLayerNorm: Bool { blockSite == .qkvInput || blockSite == .fc1Input }

        var blockSite: BlockSite? { if case .block(_, let s) = self { s } else { nil } }

        public static func < (a: Site, b: Site) -> Bool {
            func key(_ s: Site) -> (Int, Int, Int) {
                switch s {
                case .patchEmbedInput: (0, 0, 0)
                case .block(let i, let site): (1, i, BlockSite.allCases.firstIndex(of: site)!)
                case .headInput: (2, 0, 0)
                }
            }
            return key(a) < key(b)
        }
    }

    /// The quantizer families.
    public enum Kind: String, CaseIterable, Sendable {
        case uniform
        case logSqrt2 = "log_sqrt2"
    }

    /// One site's quantizer and parameters.
    public enum Quantizer: Sendable, Equatable {
        case uniform(UniformQuantizer)
        case logSqrt2(LogSqrt2Quantizer)

        public var kind: Kind {
            switch self {
            case .uniform: .uniform
            case .logSqrt2: .logSqrt2
            }
        }

        public var bits: Int {
            switch self {
            case .uniform(let q): q.bits
            case .logSqrt2(let q): q.bits
            }
        }
    }

    /// The quantized sites; a site not listed is not quantized.
    public private(set) var sites: [Site: Quantizer] = [:]

    public init() {}

    public subscript(site: Site) -> Quantizer? { sites[site] }

    /// Sets (or, with nil, removes) a site's quantizer. Refuses the log√2 quantizer anywhere but `attn.probs`,
    /// and per-row uniform quantizers (activations are quantized per tensor or per last-dimension channel).
    public mutating func set(_ quantizer: Quantizer?, for site: Site) throws(CkptError) {
        if let quantizer { try Self.check(quantizer, site) }
        sites[site] = quantizer
    }

    private static func check(_ quantizer: Quantizer, _ site: Site) throws(CkptError) {
        switch quantizer {
        case .logSqrt2:
            guard site.blockSite == .attnProbs else {
                throw CkptError(.invalidArgument, "site '\(site)': the log√2 quantizer is for attention probabilities only", tensor: site.name)
            }
        case .uniform(let q):
            guard q.granularity != .perRow else {
                throw CkptError(.invalidArgument, "site '\(site)': activations are quantized per tensor or per channel, not per row", tensor: site.name)
            }
        }
    }

    // MARK: JSON

    /// The side file's JSON object: sites in canonical order, numbers as the shortest text that reads back to
    /// the same float32.
    public var json: JSONValue {
        var members: [(key: String, value: JSONValue)] = []
        for site in sites.keys.sorted() {
            let quantizer = sites[site]!
            var entry: [(key: String, value: JSONValue)] = [("kind", .string(quantizer.kind.rawValue)), ("bits", .number(String(quantizer.bits)))]
            switch quantizer {
            case .logSqrt2(let q):
                entry.append(("scale", Self.number(q.scale)))
            case .uniform(let q) where q.granularity == .perTensor:
                entry.append(("scale", Self.number(q.scales[0])))
                entry.append(("zero_point", Self.number(q.zeroPoints[0])))
            case .uniform(let q):
                entry.append(("granularity", .string("channel")))
                entry.append(("scales", .array(q.scales.map(Self.number))))
                entry.append(("zero_points", .array(q.zeroPoints.map(Self.number))))
            }
            members.append((site.name, .object(entry)))
        }
        return .object([
            ("format", .string(Self.formatName)), ("version", .number(String(Self.formatVersion))), ("sites", .object(members)),
        ])
    }

    /// The side file's text (two-space indent).
    public func serialized() -> String { JSONWriter.serialize(json) + "\n" }

    /// Reads a side file's JSON text; `path` names it in errors.
    public init(parsing text: String, path: String? = nil) throws(CkptError) {
        let value: JSONValue
        do { value = try JSONParser.parse(text) } catch { throw error.at(path: path ?? "activation quantization") }
        try self.init(json: value, path: path)
    }

    /// Reads a side file's JSON object. Refuses (`invalidMetadata`, naming the site) another format or version,
    /// repeated keys, unknown sites, kinds, granularities or members, bits outside 2…8, scales that are not
    /// positive finite float32 values, zero points that are not finite, per-channel lists of different lengths,
    /// and a kind a site cannot take.
    public init(json: JSONValue, path: String? = nil) throws(CkptError) {
        let top = try ConfigObject(file: json, path: path, code: .invalidMetadata, name: "the activation quantization file")
        if let key = json.repeatedKey { throw top.error(key, "appears twice") }
        guard let format = try top.string("format"), format == Self.formatName else {
            throw top.error("format", "expected '\(Self.formatName)'")
        }
        guard let version = try top.integer("version"), version == Self.formatVersion else {
            throw top.error("version", "expected \(Self.formatVersion)")
        }
        for (key, _) in top.members where !["format", "version", "sites"].contains(key) { throw top.error(key, "unknown member") }
        guard let sitesObject = try top.object("sites") else { throw top.error("sites", "missing") }
        if let key = sitesObject.value.repeatedKey { throw sitesObject.error(key, "site appears twice") }
        for (name, entry) in try sitesObject.objectMembers() {
            guard let site = Site(name: name) else {
                throw sitesObject.error(name, "unknown site '\(name)' (expected patch_embed.input, head.input, blocks.{i}.{qkv|proj|fc1|fc2}.input or blocks.{i}.attn.{q|k|v|probs})")
            }
            let quantizer = try Self.quantizer(entry, site: site)
            do { try Self.check(quantizer, site) } catch { throw CkptError(.invalidMetadata, error.message, path: path, tensor: site.name) }
            sites[site] = quantizer
        }
    }

    private static func quantizer(_ entry: ConfigObject, site: Site) throws(CkptError) -> Quantizer {
        if let key = entry.value.repeatedKey { throw entry.error(key, "appears twice") }
        guard let kindName = try entry.string("kind") else { throw entry.error("kind", "missing") }
        guard let kind = Kind(rawValue: kindName) else {
            throw entry.error("kind", "unknown quantizer kind '\(kindName)' (expected \(Kind.allCases.map { "'\($0.rawValue)'" }.joined(separator: " or ")))")
        }
        guard let bits = try entry.integer("bits", in: 2...8) else { throw entry.error("bits", "missing") }
        let allowed: [String]
        switch kind {
        case .logSqrt2: allowed = ["kind", "bits", "scale"]
        case .uniform: allowed = (try entry.string("granularity", oneOf: ["tensor", "channel"])) == "channel"
            ? ["kind", "bits", "granularity", "scales", "zero_points"] : ["kind", "bits", "granularity", "scale", "zero_point"]
        }
        for (key, _) in entry.members where !allowed.contains(key) { throw entry.error(key, "unknown member") }
        do throws(CkptError) {
            switch kind {
            case .logSqrt2:
                return .logSqrt2(try LogSqrt2Quantizer(bits: bits, scale: try float(entry, "scale", positive: true)))
            case .uniform where entry.value["granularity"] == .string("channel"):
                let scales = try floats(entry, "scales", positive: true)
                let zeros = try floats(entry, "zero_points", positive: false)
                guard scales.count == zeros.count else { throw entry.error("zero_points", "\(zeros.count) zero points for \(scales.count) scales") }
                return .uniform(try UniformQuantizer(bits: bits, granularity: .perColumn, scales: scales, zeroPoints: zeros))
            case .uniform:
                return .uniform(try UniformQuantizer(bits: bits, scale: try float(entry, "scale", positive: true),
                                                     zeroPoint: try float(entry, "zero_point", positive: false)))
            }
        } catch {
            throw error.code == .invalidMetadata ? error : CkptError(.invalidMetadata, "site '\(site)': \(error.message)", path: entry.path, tensor: site.name)
        }
    }

    private static func float(_ entry: ConfigObject, _ key: String, positive: Bool) throws(CkptError) -> Float {
        guard let value = try entry.raw(key, expected: "a number") else { throw entry.error(key, "missing") }
        return try float(value, entry, key, positive: positive)
    }

    private static func floats(_ entry: ConfigObject, _ key: String, positive: Bool) throws(CkptError) -> [Float] {
        guard let items = try entry.array(key) else { throw entry.error(key, "missing") }
        guard !items.isEmpty else { throw entry.error(key, "is empty") }
        var result: [Float] = []
        result.reserveCapacity(items.count)
        for (i, item) in items.enumerated() { result.append(try float(item, entry, "\(key)[\(i)]", positive: positive)) }
        return result
    }

    /// A number read straight as float32 (correctly rounded from its text), finite, and positive where asked.
    private static func float(_ value: JSONValue, _ entry: ConfigObject, _ key: String, positive: Bool) throws(CkptError) -> Float {
        guard case .number(let text) = value else { throw entry.error(key, "expected a number, found \(value.typeName)") }
        guard let x = Float(text), x.isFinite else { throw entry.error(key, "\(text) is not a finite float32 number") }
        if positive && !(x > 0) { throw entry.error(key, "\(text) is not positive") }
        return x
    }

    /// Float32 as JSON: integers below 2^24 without a fraction, else Swift's shortest round-trip text.
    private static func number(_ x: Float) -> JSONValue {
        if x == x.rounded(), abs(x) < 16_777_216, !(x == 0 && x.sign == .minus) { return .number(String(Int(x))) }
        return .number("\(x)")
    }
}
