/// PSAQ-ViT's total-variation image prior, per image: the sum of the ℓ2 (Frobenius) norms of four neighbour
/// differences over the image's C, H, W,
///
///     R = ‖x[:, :, :−1] − x[:, :, 1:]‖ + ‖x[:, :−1, :] − x[:, 1:, :]‖
///       + ‖x[:, 1:, :−1] − x[:, :−1, 1:]‖ + ‖x[:, :−1, :−1] − x[:, 1:, 1:]‖
///
/// (horizontal, vertical and both diagonals). PSAQ-ViT takes the norms over the whole batch and penalises
/// `|R − v|` with v ~ U(2500, 3000) for 32 images; here every image has its own R, so images never couple: a
/// caller reproducing that penalty passes `weight · sign(R − v)` as the weight.
///
/// The gradient of one norm is `Δ/‖Δ‖` added to the first pixel of each pair and subtracted from the second; a norm
/// of exactly 0 contributes no gradient (as torch's `norm` backward).
public enum TotalVariation {
    /// R of one image ([C, H, W]), the norms accumulated in F64.
    @inlinable
    public static func value<T: SynthesisFloat>(of image: UnsafeBufferPointer<T>, channels: Int, height: Int, width: Int) -> T {
        let norms = squaredNorms(image, channels: channels, height: height, width: width)
        return T(norms.reduce(0) { $0 + $1.squareRoot() })
    }

    /// R of one image ([C, H, W]); adds `weight · ∂R/∂x` into `gradient` (same shape).
    @inlinable
    public static func valueAndGradient<T: SynthesisFloat>(
        of image: UnsafeBufferPointer<T>, channels: Int, height: Int, width: Int, weight: T,
        addingInto gradient: UnsafeMutableBufferPointer<T>
    ) -> T {
        precondition(gradient.count == image.count, "gradient is not the image's shape")
        let norms = squaredNorms(image, channels: channels, height: height, width: width)
        // weight / ‖Δ_k‖ for each of the four differences (0 for a zero norm).
        let scale = norms.map { $0 > 0 ? weight / T($0.squareRoot()) : 0 }
        let (s1, s2, s3, s4) = (scale[0], scale[1], scale[2], scale[3])
        for c in 0..<channels {
            let p = c * height * width
            for y in 0..<height {
                for x in 0..<width {
                    let i = p + y * width + x
                    if x + 1 < width {  // horizontal: x[y][x] − x[y][x+1]
                        let d = s1 * (image[i] - image[i + 1])
                        gradient[i] += d
                        gradient[i + 1] -= d
                    }
                    if y + 1 < height {  // vertical: x[y][x] − x[y+1][x]
                        let d = s2 * (image[i] - image[i + width])
                        gradient[i] += d
                        gradient[i + width] -= d
                        if x + 1 < width {
                            // anti-diagonal: x[y+1][x] − x[y][x+1]
                            let a = s3 * (image[i + width] - image[i + 1])
                            gradient[i + width] += a
                            gradient[i + 1] -= a
                            // diagonal: x[y][x] − x[y+1][x+1]
                            let b = s4 * (image[i] - image[i + width + 1])
                            gradient[i] += b
                            gradient[i + width + 1] -= b
                        }
                    }
                }
            }
        }
        return T(norms.reduce(0) { $0 + $1.squareRoot() })
    }

    /// The four squared norms, in F64.
    @inlinable
    static func squaredNorms<T: SynthesisFloat>(_ image: UnsafeBufferPointer<T>, channels: Int, height: Int, width: Int) -> [Double] {
        precondition(channels > 0 && height > 0 && width > 0 && image.count == channels * height * width, "image is not [C, H, W]")
        var n1 = 0.0, n2 = 0.0, n3 = 0.0, n4 = 0.0
        for c in 0..<channels {
            let p = c * height * width
            for y in 0..<height {
                for x in 0..<width {
                    let i = p + y * width + x
                    if x + 1 < width {
                        let d = Double(image[i] - image[i + 1])
                        n1 += d * d
                    }
                    if y + 1 < height {
                        let d = Double(image[i] - image[i + width])
                        n2 += d * d
                        if x + 1 < width {
                            let a = Double(image[i + width] - image[i + 1])
                            n3 += a * a
                            let b = Double(image[i] - image[i + width + 1])
                            n4 += b * b
                        }
                    }
                }
            }
        }
        return [n1, n2, n3, n4]
    }
}
