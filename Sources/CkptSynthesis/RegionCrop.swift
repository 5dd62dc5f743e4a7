/// One region of SARDFQ's Multi-Semantic Reinforcement: a cell of the image, cropped and resized to the model's
/// input size to be optimised as an image of its own.
///
/// The image is split into a 2 × 2 grid: rows `0..<H/2` and `H/2..<H` (so an odd side gives cells of ⌊H/2⌋ and
/// ⌈H/2⌉), columns likewise; cell k is grid row k / 2, column k % 2. ``forward(_:into:channels:)`` is exactly
/// `torch.nn.functional.interpolate(cell, size: (outputHeight, outputWidth), mode: "bilinear",
/// align_corners: false)` without antialiasing: output coordinate o reads source `s = (o + ½)·in/out − ½`, clamped
/// at 0, between rows ⌊s⌋ and ⌊s⌋ + 1 (the last row repeats) with weights computed in the pixel type, as torch does.
/// The resize is separable, two taps per output coordinate along each axis, so ``addAdjoint(_:into:channels:)``
/// (its transpose) scatters a gradient back into the cell only.
public struct RegionCrop: Sendable, Equatable {
    public let imageHeight: Int
    public let imageWidth: Int
    /// The cell's first row and column in the image.
    public let top: Int
    public let left: Int
    /// The cell's size.
    public let height: Int
    public let width: Int
    /// The size the cell is resized to.
    public let outputHeight: Int
    public let outputWidth: Int

    /// The cells of the 2 × 2 grid.
    public static let cellCount = 4

    /// A crop of rows `top..<top+height` and columns `left..<left+width` of an `imageHeight × imageWidth` image,
    /// resized to `outputHeight × outputWidth`.
    public init(imageHeight: Int, imageWidth: Int, top: Int, left: Int, height: Int, width: Int, outputHeight: Int, outputWidth: Int) {
        precondition(height > 0 && width > 0 && outputHeight > 0 && outputWidth > 0, "empty crop")
        precondition(top >= 0 && left >= 0 && top + height <= imageHeight && left + width <= imageWidth, "crop outside the image")
        self.imageHeight = imageHeight
        self.imageWidth = imageWidth
        self.top = top
        self.left = left
        self.height = height
        self.width = width
        self.outputHeight = outputHeight
        self.outputWidth = outputWidth
    }

    /// Cell `index` (0…3) of the 2 × 2 grid of an `imageHeight × imageWidth` image, resized back to the image's size
    /// unless another output size is given.
    public static func cell(_ index: Int, imageHeight: Int, imageWidth: Int, outputHeight: Int? = nil, outputWidth: Int? = nil) -> RegionCrop {
        precondition((0..<cellCount).contains(index), "cell \(index) is not one of 0…3")
        precondition(imageHeight >= 2 && imageWidth >= 2, "an image needs at least 2 × 2 pixels to be split")
        let splitRow = imageHeight / 2, splitColumn = imageWidth / 2
        let lowerRow = index / 2 == 1, rightColumn = index % 2 == 1
        return RegionCrop(
            imageHeight: imageHeight, imageWidth: imageWidth,
            top: lowerRow ? splitRow : 0, left: rightColumn ? splitColumn : 0,
            height: lowerRow ? imageHeight - splitRow : splitRow, width: rightColumn ? imageWidth - splitColumn : splitColumn,
            outputHeight: outputHeight ?? imageHeight, outputWidth: outputWidth ?? imageWidth)
    }

    /// The cells to optimise in one step: m ~ U{1…4}, then m distinct cells in the order drawn, from the stream
    /// (seed, image, ``SynthesisRandom/Purpose/regions``, step).
    public static func randomCells(seed: UInt64, image: Int, step: Int) -> [Int] {
        var random = SynthesisRandom(seed: seed, image: image, purpose: .regions, step: step)
        let m = random.int(in: 1...cellCount)
        return random.distinct(m, in: 0...(cellCount - 1))
    }

    /// The two source taps of each output coordinate along one axis, as torch's `upsample_bilinear2d` computes them.
    @usableFromInline
    struct Taps<T: SynthesisFloat> {
        @usableFromInline var first: [Int]
        @usableFromInline var second: [Int]
        @usableFromInline var firstWeight: [T]
        @usableFromInline var secondWeight: [T]

        @inlinable
        init(input: Int, output: Int) {
            first = [Int](repeating: 0, count: output)
            second = first
            firstWeight = [T](repeating: 1, count: output)
            secondWeight = [T](repeating: 0, count: output)
            if input == output {  // torch's shortcut: the identity
                for o in 0..<output { first[o] = o; second[o] = o }
                return
            }
            let scale = T(input) / T(output)
            for o in 0..<output {
                var source = scale * (T(o) + T(0.5)) - T(0.5)
                if source < 0 { source = 0 }
                let i0 = Swift.min(Int(source.rounded(.down)), input - 1)
                let lambda = Swift.min(Swift.max(source - T(i0), 0), 1)
                first[o] = i0
                second[o] = i0 < input - 1 ? i0 + 1 : i0
                secondWeight[o] = lambda
                firstWeight[o] = 1 - lambda
            }
        }
    }

    /// Writes the resized cell of `image` ([C, imageHeight, imageWidth]) into `output` ([C, outputHeight, outputWidth]).
    @inlinable
    public func forward<T: SynthesisFloat>(_ image: UnsafeBufferPointer<T>, into output: UnsafeMutableBufferPointer<T>, channels: Int) {
        precondition(image.count == channels * imageHeight * imageWidth, "image is not [C, \(imageHeight), \(imageWidth)]")
        precondition(output.count == channels * outputHeight * outputWidth, "output is not [C, \(outputHeight), \(outputWidth)]")
        let rows = Taps<T>(input: height, output: outputHeight)
        let columns = Taps<T>(input: width, output: outputWidth)
        // Horizontal pass over the cell's rows, then the vertical pass: out = λ0y(λ0x a + λ1x b) + λ1y(λ0x c + λ1x d).
        var horizontal = [T](repeating: 0, count: height * outputWidth)
        horizontal.withUnsafeMutableBufferPointer { h in
            for c in 0..<channels {
                let plane = c * imageHeight * imageWidth
                for r in 0..<height {
                    let source = plane + (top + r) * imageWidth + left
                    for o in 0..<outputWidth {
                        h[r * outputWidth + o] =
                            columns.firstWeight[o] * image[source + columns.first[o]] + columns.secondWeight[o] * image[source + columns.second[o]]
                    }
                }
                let out = c * outputHeight * outputWidth
                for o in 0..<outputHeight {
                    let a = rows.first[o] * outputWidth, b = rows.second[o] * outputWidth
                    let wa = rows.firstWeight[o], wb = rows.secondWeight[o]
                    for x in 0..<outputWidth {
                        output[out + o * outputWidth + x] = wa * h[a + x] + wb * h[b + x]
                    }
                }
            }
        }
    }

    /// Adds the transpose of ``forward(_:into:channels:)`` applied to `gradient` ([C, outputHeight, outputWidth], the
    /// gradient w.r.t. the resized crop) into `imageGradient` ([C, imageHeight, imageWidth]); only the cell's pixels
    /// change.
    @inlinable
    public func addAdjoint<T: SynthesisFloat>(_ gradient: UnsafeBufferPointer<T>, into imageGradient: UnsafeMutableBufferPointer<T>, channels: Int) {
        precondition(gradient.count == channels * outputHeight * outputWidth, "gradient is not [C, \(outputHeight), \(outputWidth)]")
        precondition(imageGradient.count == channels * imageHeight * imageWidth, "image gradient is not [C, \(imageHeight), \(imageWidth)]")
        let rows = Taps<T>(input: height, output: outputHeight)
        let columns = Taps<T>(input: width, output: outputWidth)
        var vertical = [T](repeating: 0, count: height * outputWidth)
        vertical.withUnsafeMutableBufferPointer { v in
            for c in 0..<channels {
                // Transpose of the vertical pass: scatter each output row into its two cell rows.
                for i in 0..<v.count { v[i] = 0 }
                let g = c * outputHeight * outputWidth
                for o in 0..<outputHeight {
                    let a = rows.first[o] * outputWidth, b = rows.second[o] * outputWidth
                    let wa = rows.firstWeight[o], wb = rows.secondWeight[o]
                    for x in 0..<outputWidth {
                        let d = gradient[g + o * outputWidth + x]
                        v[a + x] += wa * d
                        v[b + x] += wb * d
                    }
                }
                // Transpose of the horizontal pass, into the cell.
                let plane = c * imageHeight * imageWidth
                for r in 0..<height {
                    let target = plane + (top + r) * imageWidth + left
                    for o in 0..<outputWidth {
                        let d = v[r * outputWidth + o]
                        imageGradient[target + columns.first[o]] += columns.firstWeight[o] * d
                        imageGradient[target + columns.second[o]] += columns.secondWeight[o] * d
                    }
                }
            }
        }
    }
}
