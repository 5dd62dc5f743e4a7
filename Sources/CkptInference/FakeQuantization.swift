import CkptCore
import CkptQuant

/// Applies the activation quantizers of a side file during the forward pass: at every listed site the values are
/// quantized and dequantized in place (x̂ = (clamp(round(x/Δ) + zp, 0, 2^b − 1) − zp)·Δ, or log√2 for the
/// probabilities), which is what an integer runtime computes with.
public struct FakeQuantization: ActivationHook {
    public let quantization: ActivationQuantization

    /// Checks every site against the model (block indices, per-channel widths) so the forward pass never meets a
    /// quantizer that does not fit its values.
    public init(_ quantization: ActivationQuantization, config: ViTConfig, path: String? = nil) throws(CkptError) {
        for (site, quantizer) in quantization.sites {
            if case .block(let b, _) = site, b >= config.depth {
                throw CkptError(.invalidMetadata, "site \(site.name): the model has \(config.depth) blocks", path: path)
            }
            if case .uniform(let q) = quantizer, q.granularity != .perTensor {
                let width = Self.width(site, config: config)
                guard q.granularity == .perColumn, q.channels == width else {
                    throw CkptError(.invalidMetadata, "site \(site.name): \(q.channels) \(q.granularity.rawValue) channels; its values have \(width) per row",
                        path: path)
                }
            }
        }
        self.quantization = quantization
    }

    /// Values per row at a site (the channels a per-column quantizer needs).
    static func width(_ site: ActivationSite, config c: ViTConfig) -> Int {
        switch site {
        case .patchEmbedInput: c.channels * c.patchSize * c.patchSize
        case .headInput: c.dim
        case .block(_, let s):
            switch s {
            case .fc2Input: c.mlpDim
            case .attnProbs: -1  // tokens: per tensor only
            default: c.dim
            }
        }
    }

    public func handles(_ site: ActivationSite) -> Bool { quantization[site] != nil }

    public func process(_ site: ActivationSite, _ values: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int) {
        guard let quantizer = quantization[site] else { return }
        do throws(CkptError) {
            for r in 0..<rows {
                let row = UnsafeMutableBufferPointer(start: values + r * stride, count: width)
                switch quantizer {
                case .uniform(let q): try q.fakeQuantize(row)
                case .logSqrt2(let q): try q.fakeQuantize(row)
                }
            }
        } catch {
            preconditionFailure("site \(site.name): \(error) (the widths were checked when the side file was loaded)")
        }
    }
}
