import CkptQuant

/// The engine's activation sites are the side file's (``ActivationQuantization/Site``): the input of every Linear,
/// both operands of each attention matmul, the patch embedding's input and the head's input.
public typealias ActivationSite = ActivationQuantization.Site

extension LinearInput {
    /// The activation site of this Linear input in block `index`.
    public func site(block index: Int) -> ActivationSite {
        switch self {
        case .attention: .block(index, .qkvInput)
        case .projection: .block(index, .projInput)
        case .mlp: .block(index, .fc1Input)
        case .mlpHidden: .block(index, .fc2Input)
        }
    }
}

/// Sees (and may rewrite in place) the values at activation sites during a forward pass: fake quantization
/// (quantize → dequantize, as an integer runtime would see the values) or calibration statistics. Called from the
/// workers, concurrently, once per micro-batch and site (once per image and head for the probabilities).
public protocol ActivationHook: Sendable {
    /// Whether the forward pass hands `site`'s values to ``process(_:_:rows:width:stride:)``.
    func handles(_ site: ActivationSite) -> Bool
    /// `rows` rows of `width` values, consecutive rows `stride` floats apart (q, k and v are column blocks of one
    /// [rows × 3D] matrix; the patch input is the patchified pixels, [images·patches × C·p·p]).
    func process(_ site: ActivationSite, _ values: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int)
}
