import CkptCore

/// The valid range of each channel in normalised pixel space: pixel values 0…1 become
/// `(0 − mean_c)/std_c … (1 − mean_c)/std_c`. Synthesis projects every image into this box after each step.
public struct PixelBox: Sendable, Equatable {
    /// Per channel, the smallest valid normalised value.
    public let lower: [Float]
    /// Per channel, the largest valid normalised value.
    public let upper: [Float]

    /// The box of a model's input normalisation. Refuses a mean and std of different lengths or a std that is not
    /// positive and finite.
    public init(mean: [Double], std: [Double]) throws(CkptError) {
        guard !mean.isEmpty, mean.count == std.count else {
            throw CkptError(.invalidArgument, "mean has \(mean.count) channels and std \(std.count)")
        }
        guard std.allSatisfy({ $0.isFinite && $0 > 0 }), mean.allSatisfy(\.isFinite) else {
            throw CkptError(.invalidArgument, "normalisation std must be positive and finite, mean finite")
        }
        lower = zip(mean, std).map { Float((0 - $0) / $1) }
        upper = zip(mean, std).map { Float((1 - $0) / $1) }
    }

    /// The box of ImageNet's default normalisation (DeiT, PSAQ-ViT's hard-coded clip).
    public static let imageNet = try! PixelBox(mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225])
    /// The box of mean = std = 0.5 (timm's augreg ViT): [−1, 1] in every channel.
    public static let inception = try! PixelBox(mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5])

    public var channels: Int { lower.count }

    /// Clamps images laid out `[N, C, H·W]` (`planeSize` = H·W, C = ``channels``) into the box, in place.
    public func clamp(_ pixels: UnsafeMutableBufferPointer<Float>, planeSize: Int) {
        precondition(planeSize > 0 && pixels.count % (planeSize * channels) == 0, "pixels are not whole [C, H, W] images")
        let planes = pixels.count / planeSize
        for plane in 0..<planes {
            let lo = lower[plane % channels], hi = upper[plane % channels]
            let start = plane * planeSize
            for i in start..<(start + planeSize) {
                pixels[i] = Swift.min(Swift.max(pixels[i], lo), hi)
            }
        }
    }
}
