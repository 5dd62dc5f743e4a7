/// The random jitter and flip applied to an image before each forward pass (DeepInversion / PSAQ-ViT):
/// `torch.roll(image, shifts: (dy, dx), dims: (H, W))`, then, when ``flip`` is set, a horizontal flip
/// (`torch.flip(dims: W)`). Both are permutations of the pixels, so the adjoint (the map of a gradient w.r.t. the
/// augmented image back to the original) is the inverse permutation: flip, then roll by (−dy, −dx).
public struct Augmentation: Sendable, Equatable {
    /// Rows rolled down (negative: up); any integer, taken modulo the height.
    public var dy: Int
    /// Columns rolled right (negative: left); any integer, taken modulo the width.
    public var dx: Int
    /// Whether the rolled image is mirrored left–right.
    public var flip: Bool

    public init(dy: Int, dx: Int, flip: Bool) {
        self.dy = dy
        self.dx = dx
        self.flip = flip
    }

    /// The identity.
    public static let none = Augmentation(dy: 0, dx: 0, flip: false)

    /// PSAQ-ViT's draw for one step: one offset `off ~ U{−limit…limit}` used for both axes, and a flip with
    /// probability ½, from the stream (seed, image, ``SynthesisRandom/Purpose/augmentation``, step). PSAQ-ViT uses
    /// limit 15 in its first round and 30 in its second.
    public static func random(seed: UInt64, image: Int, step: Int, limit: Int) -> Augmentation {
        precondition(limit >= 0, "negative jitter limit")
        var random = SynthesisRandom(seed: seed, image: image, purpose: .augmentation, step: step)
        let offset = random.int(in: -limit...limit)
        return Augmentation(dy: offset, dx: offset, flip: random.uniform() > 0.5)
    }

    /// Writes the augmented `image` ([C, H, W]) into `output` (same shape; must not overlap `image`).
    @inlinable
    public func apply<T>(
        _ image: UnsafeBufferPointer<T>, into output: UnsafeMutableBufferPointer<T>, channels: Int, height: Int, width: Int
    ) {
        precondition(image.count == channels * height * width && output.count == image.count, "buffers are not [C, H, W]")
        let sy = Augmentation.wrap(dy, height), sx = Augmentation.wrap(dx, width)
        for c in 0..<channels {
            let plane = c * height * width
            for y in 0..<height {
                // roll: out[y][x] = in[(y − dy) mod H][(x − dx) mod W]; the flip then reads column W−1−x.
                let sourceRow = plane + ((y - sy + height) % height) * width
                let row = plane + y * width
                for x in 0..<width {
                    let column = flip ? width - 1 - x : x
                    output[row + x] = image[sourceRow + (column - sx + width) % width]
                }
            }
        }
    }

    /// Adds the gradient w.r.t. the augmented image (`gradient`, [C, H, W]) into `imageGradient`, the gradient
    /// w.r.t. the original: the transpose of ``apply(_:into:channels:height:width:)``.
    @inlinable
    public func addAdjoint<T: AdditiveArithmetic>(
        _ gradient: UnsafeBufferPointer<T>, into imageGradient: UnsafeMutableBufferPointer<T>, channels: Int, height: Int, width: Int
    ) {
        precondition(gradient.count == channels * height * width && imageGradient.count == gradient.count, "buffers are not [C, H, W]")
        let sy = Augmentation.wrap(dy, height), sx = Augmentation.wrap(dx, width)
        for c in 0..<channels {
            let plane = c * height * width
            for y in 0..<height {
                let sourceRow = plane + ((y - sy + height) % height) * width
                let row = plane + y * width
                for x in 0..<width {
                    let column = flip ? width - 1 - x : x
                    imageGradient[sourceRow + (column - sx + width) % width] += gradient[row + x]
                }
            }
        }
    }

    /// `shift` reduced into 0..<n.
    @inlinable
    static func wrap(_ shift: Int, _ n: Int) -> Int {
        let r = shift % n
        return r < 0 ? r + n : r
    }
}
