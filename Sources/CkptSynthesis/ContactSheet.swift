import CkptCore
import CkptFormats

/// A grid of images for looking at a synthesis run: each image of `[N, C, H, W]` (normalised pixel space,
/// C = 1 or 3) is denormalised with its mean and std, clamped to [0, 1], optionally shrunk, and placed in a grid
/// with a ``border``-pixel black border around and between the tiles. The result is an 8-bit image that
/// ``PNG/write(_:to:inputs:)`` writes.
public enum ContactSheet {
    /// The border around and between tiles, in pixels.
    public static let border = 2

    /// The sheet of `count` images of `height × width` pixels and `mean.count` channels.
    ///
    /// - Parameters:
    ///   - columns: tiles per row; by default ⌈√N⌉.
    ///   - downscale: each tile is shrunk by this integer factor: a tile pixel is the mean of a factor × factor block
    ///     of denormalised, clamped pixels (the last rows and columns that do not fill a block are dropped).
    /// A value v ∈ [0, 1] becomes the byte ⌊255·v + ½⌋. Refuses inconsistent geometry or normalisation.
    public static func render(
        images: UnsafeBufferPointer<Float>, count: Int, height: Int, width: Int, mean: [Double], std: [Double],
        columns: Int? = nil, downscale: Int = 1
    ) throws(CkptError) -> DecodedImage {
        let channels = mean.count
        guard channels == 1 || channels == 3, std.count == channels, std.allSatisfy({ $0.isFinite && $0 > 0 }) else {
            throw CkptError(.invalidArgument, "a contact sheet needs the mean and positive std of 1 or 3 channels")
        }
        guard count >= 1, height >= 1, width >= 1, images.count == count * channels * height * width else {
            throw CkptError(.invalidArgument, "\(images.count) values are not \(count) images of [\(channels), \(height), \(width)]")
        }
        guard downscale >= 1, downscale <= min(height, width) else {
            throw CkptError(.invalidArgument, "downscale factor \(downscale) does not fit \(height)×\(width) images")
        }
        let across = columns ?? Int((Double(count).squareRoot()).rounded(.up))
        guard across >= 1 else { throw CkptError(.invalidArgument, "a contact sheet needs at least one column") }
        let down = (count + across - 1) / across
        let tileHeight = height / downscale, tileWidth = width / downscale
        let sheetWidth = across * tileWidth + (across + 1) * border
        let sheetHeight = down * tileHeight + (down + 1) * border
        guard sheetWidth <= PNG.maximumDimension, sheetHeight <= PNG.maximumDimension else {
            throw CkptError(.tooLarge, "a \(sheetWidth)×\(sheetHeight) sheet exceeds \(PNG.maximumDimension) pixels a side; downscale or use fewer columns")
        }
        var pixels = [UInt8](repeating: 0, count: sheetWidth * sheetHeight * channels)
        let blockArea = Double(downscale * downscale)
        for n in 0..<count {
            let originY = border + (n / across) * (tileHeight + border)
            let originX = border + (n % across) * (tileWidth + border)
            for c in 0..<channels {
                let plane = (n * channels + c) * height * width
                for ty in 0..<tileHeight {
                    for tx in 0..<tileWidth {
                        var sum = 0.0
                        for dy in 0..<downscale {
                            for dx in 0..<downscale {
                                let x = Double(images[plane + (ty * downscale + dy) * width + tx * downscale + dx])
                                sum += min(max(x * std[c] + mean[c], 0), 1)
                            }
                        }
                        let byte = UInt8((sum / blockArea * 255 + 0.5).rounded(.down))
                        pixels[((originY + ty) * sheetWidth + originX + tx) * channels + c] = byte
                    }
                }
            }
        }
        return DecodedImage(width: sheetWidth, height: sheetHeight, channels: channels, pixels: pixels)
    }
}
