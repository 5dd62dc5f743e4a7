import CkptCore
import CkptFormats
@testable import CkptQuant
import Testing

/// The activation-quantization side file: site names, JSON round trip, refusals.
@Suite("Activation quantization side file")
struct ActivationQuantizationTests {
    /// Every site of a 2-block ViT with RepQ-ViT's kinds: per-channel uniform where RepQ starts per channel,
    /// odd float32 scales that must read back bit for bit.
    static func example() throws -> ActivationQuantization {
        var generator = SplitMix(seed: 3)
        var a = ActivationQuantization()
        for site in ActivationQuantization.Site.all(blocks: 2) {
            let bits = site.repQViTBits(activationBits: 4)
            let scale = Float(generator.uniform() * 0.3 + 1e-6) * (generator.next() % 2 == 0 ? 1 : 1e-7)
            switch site.repQViTKind {
            case .logSqrt2:
                try a.set(.logSqrt2(try LogSqrt2Quantizer(bits: bits, scale: scale)), for: site)
            case .uniform where site.isPostLayerNorm:
                let n = 5
                try a.set(.uniform(try UniformQuantizer(
                    bits: bits, granularity: .perColumn, scales: (0..<n).map { Float($0 + 1) * scale },
                    zeroPoints: (0..<n).map { Float($0) - 2 })), for: site)
            case .uniform:
                try a.set(.uniform(try UniformQuantizer(bits: bits, scale: scale, zeroPoint: Float(generator.next() % 300) - 20)), for: site)
            }
        }
        return a
    }

    @Test("site names: every canonical name parses back; malformed ones do not")
    func siteNames() {
        let all = ActivationQuantization.Site.all(blocks: 12)
        #expect(all.count == 2 + 12 * 8)
        #expect(all.map(\.name).prefix(3) == ["patch_embed.input", "blocks.0.qkv.input", "blocks.0.proj.input"])
        #expect(all.last?.name == "head.input")
        #expect(all.contains { $0.name == "blocks.11.attn.probs" })
        for site in all { #expect(ActivationQuantization.Site(name: site.name) == site) }
        #expect(all == all.sorted())
        for bad in ["blocks.01.qkv.input", "blocks.-1.qkv.input", "blocks..qkv.input", "blocks.0.attn.x", "blocks.0.qkv", "blocks.0",
                    "blocks.10000.fc1.input", "blocks.0.fc1.input.", "patch_embed", "head.output", "Blocks.0.fc1.input", "blocks.٣.fc1.input"] {
            #expect(ActivationQuantization.Site(name: bad) == nil, "\(bad)")
        }
        #expect(ActivationQuantization.Site.block(3, .attnProbs).repQViTKind == .logSqrt2)
        #expect(ActivationQuantization.Site.patchEmbedInput.repQViTBits(activationBits: 4) == 8)
    }

    @Test("JSON round trip: every site, kind and granularity; float32 parameters bit for bit; canonical order")
    func roundTrip() throws {
        let a = try Self.example()
        let text = a.serialized()
        let back = try ActivationQuantization(parsing: text)
        #expect(back == a)
        #expect(back.serialized() == text)
        #expect(text.contains("\"blocks.1.attn.probs\": {\n      \"kind\": \"log_sqrt2\""))
        #expect(text.contains("\"granularity\": \"channel\""))
        let patch = try #require(back[.patchEmbedInput])
        #expect(patch.bits == 8 && patch.kind == .uniform)
        // Sites come out in canonical order whatever order they were set in.
        guard case .object(let top) = a.json, case .object(let sites)? = top.first(where: { $0.key == "sites" })?.value else {
            Issue.record("no sites object"); return
        }
        #expect(sites.map(\.key) == ActivationQuantization.Site.all(blocks: 2).map(\.name))
        // Removing a site removes it from the file.
        var fewer = a
        try fewer.set(nil, for: .headInput)
        #expect(try ActivationQuantization(parsing: fewer.serialized())[.headInput] == nil)
    }

    @Test("float32 numbers survive the text bit for bit (shortest round-trip, read as float32)")
    func floatText() throws {
        var generator = SplitMix(seed: 11)
        for _ in 0..<2000 {
            let bits = UInt32(truncatingIfNeeded: generator.next()) & 0x7EFF_FFFF | 0x0080_0000  // positive normal
            let scale = Float(bitPattern: bits)
            guard scale.isFinite else { continue }
            var a = ActivationQuantization()
            try a.set(.uniform(try UniformQuantizer(bits: 6, scale: scale, zeroPoint: -3)), for: .headInput)
            let back = try ActivationQuantization(parsing: a.serialized())
            guard case .uniform(let q)? = back[.headInput] else { Issue.record("lost"); return }
            #expect(q.scales[0].bitPattern == scale.bitPattern, "\(scale)")
        }
    }

    static func document(_ site: String, _ entry: String) -> String {
        "{\"format\": \"ckpt-activation-quantization\", \"version\": 1, \"sites\": {\"\(site)\": \(entry)}}"
    }

    static let refusals: [(name: String, text: String, mentions: String)] = [
        ("unknown site", document("blocks.0.attn.out", #"{"kind": "uniform", "bits": 4, "scale": 0.1, "zero_point": 3}"#), "blocks.0.attn.out"),
        ("unknown kind", document("blocks.2.fc2.input", #"{"kind": "twin_uniform", "bits": 4, "scale": 0.1}"#), "blocks.2.fc2.input"),
        ("bits 9", document("blocks.0.qkv.input", #"{"kind": "uniform", "bits": 9, "scale": 0.1, "zero_point": 3}"#), "blocks.0.qkv.input"),
        ("bits 1", document("head.input", #"{"kind": "uniform", "bits": 1, "scale": 0.1, "zero_point": 3}"#), "head.input"),
        ("bits fraction", document("head.input", #"{"kind": "uniform", "bits": 4.5, "scale": 0.1, "zero_point": 3}"#), "head.input"),
        ("log on a signed site", document("blocks.1.attn.q", #"{"kind": "log_sqrt2", "bits": 4, "scale": 0.5}"#), "blocks.1.attn.q"),
        ("zero scale", document("blocks.0.attn.probs", #"{"kind": "log_sqrt2", "bits": 4, "scale": 0}"#), "blocks.0.attn.probs"),
        ("negative scale", document("blocks.0.attn.k", #"{"kind": "uniform", "bits": 4, "scale": -1, "zero_point": 3}"#), "blocks.0.attn.k"),
        ("scale overflows float32", document("blocks.0.attn.k", #"{"kind": "uniform", "bits": 4, "scale": 1e39, "zero_point": 3}"#), "blocks.0.attn.k"),
        ("missing zero point", document("blocks.0.attn.v", #"{"kind": "uniform", "bits": 4, "scale": 0.1}"#), "blocks.0.attn.v"),
        ("unknown member", document("blocks.0.proj.input", #"{"kind": "uniform", "bits": 4, "scale": 0.1, "zero_point": 3, "axis": 1}"#), "blocks.0.proj.input"),
        ("unknown granularity", document("blocks.0.fc1.input", #"{"kind": "uniform", "bits": 4, "granularity": "row", "scales": [0.1], "zero_points": [1]}"#), "blocks.0.fc1.input"),
        ("list lengths", document("blocks.0.fc1.input", #"{"kind": "uniform", "bits": 4, "granularity": "channel", "scales": [0.1, 0.2], "zero_points": [1]}"#), "blocks.0.fc1.input"),
        ("empty lists", document("blocks.0.fc1.input", #"{"kind": "uniform", "bits": 4, "granularity": "channel", "scales": [], "zero_points": []}"#), "blocks.0.fc1.input"),
        ("string number", document("patch_embed.input", #"{"kind": "uniform", "bits": 8, "scale": "0.1", "zero_point": 3}"#), "patch_embed.input"),
        ("entry not an object", document("patch_embed.input", "[1, 2]"), "patch_embed.input"),
        ("repeated site", "{\"format\": \"ckpt-activation-quantization\", \"version\": 1, \"sites\": {\"head.input\": {\"kind\": \"uniform\", \"bits\": 4, \"scale\": 0.1, \"zero_point\": 3}, \"head.input\": {\"kind\": \"uniform\", \"bits\": 4, \"scale\": 0.1, \"zero_point\": 3}}}", "head.input"),
        ("repeated member", document("head.input", #"{"kind": "uniform", "bits": 4, "bits": 5, "scale": 0.1, "zero_point": 3}"#), "head.input"),
        ("other format", "{\"format\": \"something-else\", \"version\": 1, \"sites\": {}}", "format"),
        ("other version", "{\"format\": \"ckpt-activation-quantization\", \"version\": 2, \"sites\": {}}", "version"),
        ("no sites", "{\"format\": \"ckpt-activation-quantization\", \"version\": 1}", "sites"),
        ("top-level array", "[]", "activation quantization"),
    ]

    @Test("parsing refuses bad files with invalidMetadata naming the site or key", arguments: refusals.indices)
    func refusal(index: Int) {
        let (name, text, mentions) = Self.refusals[index]
        do {
            _ = try ActivationQuantization(parsing: text, path: "model.actq.json")
            Issue.record("\(name): accepted")
        } catch {
            #expect(error.code == .invalidMetadata, "\(name): \(error)")
            #expect(error.description.contains(mentions), "\(name): \(error)")
            #expect(error.path == "model.actq.json", "\(name)")
        }
    }

    @Test("the example in formats/activation-quantization.md parses and round-trips")
    func documentedExample() throws {
        let storage = try ByteStorage(mapping: QuantizerTests.root + "/formats/activation-quantization.md")
        let text = storage.withUnsafeBytes { String(decoding: $0, as: UTF8.self) }
        let start = try #require(text.firstRange(of: "```json\n"))
        let end = try #require(text[start.upperBound...].firstRange(of: "```"))
        let example = String(text[start.upperBound..<end.lowerBound])
        let parsed = try ActivationQuantization(parsing: example)
        #expect(parsed.sites.count == 4)
        #expect(parsed[.block(0, .attnProbs)]?.kind == .logSqrt2)
        guard case .uniform(let fc1)? = parsed[.block(0, .fc1Input)] else { Issue.record("fc1.input"); return }
        #expect(fc1.granularity == .perColumn && fc1.scales == [0.31, 0.5625, 0.27] && fc1.zeroPoints == [8, 7, 9])
        // The writer's layout differs only in how it breaks the arrays.
        #expect(try ActivationQuantization(parsing: parsed.serialized()) == parsed)
    }

    @Test("invalid JSON text is an invalidJSON error with the file's path")
    func invalidJSON() {
        do {
            _ = try ActivationQuantization(parsing: "{\"format\": ", path: "x.json")
            Issue.record("accepted")
        } catch {
            #expect(error.code == .invalidJSON && error.path == "x.json", "\(error)")
        }
    }

    @Test("set refuses log√2 outside the probabilities and per-row activation quantizers")
    func setRefusals() throws {
        var a = ActivationQuantization()
        #expect(throws: CkptError.self) { try a.set(.logSqrt2(try LogSqrt2Quantizer(bits: 4, scale: 1)), for: .block(0, .fc2Input)) }
        #expect(throws: CkptError.self) {
            try a.set(.uniform(try UniformQuantizer(bits: 4, granularity: .perRow, scales: [1, 1], zeroPoints: [0, 0])), for: .headInput)
        }
        try a.set(.uniform(try UniformQuantizer(bits: 4, scale: 1, zeroPoint: 0)), for: .block(0, .attnProbs))
        #expect(a[.block(0, .attnProbs)]?.kind == .uniform)
    }
}
