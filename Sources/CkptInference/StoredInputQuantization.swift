import CkptCore
import CkptFormats
import CkptQuant

extension ViTModel {
    /// The block Linears (q, k and v, or the fused qkv; proj; fc1; fc2) as modules (the weight's stored name
    /// without `.weight`) with the activation site that is their input: what weight + activation quantization
    /// quantizes and `--format compressed-tensors` stores int-quantized.
    public var blockLinearModules: [ActivationQuantizedWriter.LinearModule] {
        linearLayers.compactMap { layer -> ActivationQuantizedWriter.LinearModule? in
            guard layer.tensor.hasSuffix(".weight") else { return nil }
            return .init(module: String(layer.tensor.dropLast(".weight".count)), site: layer.input.site(block: layer.block))
        }
    }

    /// Every Linear whose input is an activation site, as a module (its weight's stored name without `.weight`)
    /// with that site: the block Linears (q, k and v, or the fused qkv, share `qkv.input`) and the model's own
    /// classifier (`head.input`).
    public var linearInputModules: [ActivationQuantizedWriter.LinearModule] {
        var modules = blockLinearModules
        if let head = tensorName(.head, .weight), head.hasSuffix(".weight") {
            modules.append(.init(module: String(head.dropLast(".weight".count)), site: .headInput))
        }
        return modules
    }
}

extension ActivationQuantization {
    /// The activation quantizers a model folder applies: its side file's sites and the static input quantizers
    /// stored with its Linears (compressed-tensors `input_scale` / `input_zero_point`, read into
    /// ``Checkpoint/inputActivations``), in ckpt's convention: a signed zero point z of b bits becomes the code-unit
    /// zero point z + 2^(b−1) (codes 0…2^b − 1 instead of −2^(b−1)…2^(b−1) − 1), the scale is kept.
    ///
    /// Refused (`invalidData`, naming the tensor): a stored quantizer on a module that is not a Linear input of
    /// `model`, modules of one site (q, k, v) with different quantizers or only some of them quantized, widths
    /// outside 2…8; (`invalidMetadata`, naming the side file) a site given both ways. Nil when there is none.
    public static func combining(
        sideFile: ActivationQuantization?, sidePath: String?, stored: [String: CompressedTensors.InputActivation], model: ViTModel
    ) throws(CkptError) -> ActivationQuantization? {
        guard !stored.isEmpty else { return sideFile }
        let modules = model.linearInputModules
        let siteOf = Dictionary(modules.map { ($0.module, $0.site) }, uniquingKeysWith: { first, _ in first })
        var bySite: [Site: (module: String, input: CompressedTensors.InputActivation)] = [:]
        for module in stored.keys.sorted() {
            let input = stored[module]!
            guard let site = siteOf[module] else {
                throw CkptError(.invalidData, "\(module) carries a static input quantizer, but it is not a Linear whose input ckpt quantizes (block q/k/v/qkv, proj, fc1, fc2, or the head)",
                    path: input.path, tensor: input.tensor)
            }
            guard UniformQuantizer.supportedBits.contains(input.bits) else {
                throw CkptError(.invalidData, "\(input.bits)-bit input activations: ckpt applies 2…8 bits", path: input.path, tensor: input.tensor)
            }
            if let other = bySite[site] {
                let a = other.input
                guard a.bits == input.bits, a.scale.bitPattern == input.scale.bitPattern, a.zeroPoint == input.zeroPoint else {
                    throw CkptError(.invalidData,
                        "\(module) and \(other.module) read the same activation (\(site.name)) but store different input quantizers (\(input.bits) bits, scale \(input.scale), zero point \(input.zeroPoint) against \(a.bits), \(a.scale), \(a.zeroPoint))",
                        path: input.path, tensor: input.tensor)
                }
            } else {
                bySite[site] = (module, input)
            }
        }
        var result = sideFile ?? ActivationQuantization()
        for site in bySite.keys.sorted() {
            let (module, input) = bySite[site]!
            if let missing = modules.first(where: { $0.site == site && stored[$0.module] == nil }) {
                throw CkptError(.invalidData, "\(module) stores an input quantizer for \(site.name), but \(missing.module), which reads the same activation, has none",
                    path: input.path, tensor: input.tensor)
            }
            if sideFile?[site] != nil {
                throw CkptError(.invalidMetadata, "site \(site.name) is given twice: by \(input.tensor) in the model file and by the side file", path: sidePath, tensor: site.name)
            }
            let zero = Float(input.zeroPoint + (1 << (input.bits - 1)))
            let quantizer: UniformQuantizer
            do { quantizer = try UniformQuantizer(bits: input.bits, scale: input.scale, zeroPoint: zero) } catch {
                throw CkptError(.invalidData, error.message, path: input.path, tensor: input.tensor)
            }
            try result.set(.uniform(quantizer), for: site)
        }
        return result
    }
}
