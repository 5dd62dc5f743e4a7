import CkptSynthesis
import Testing

@Suite("RegionCrop: MSR cells, bilinear resize and its adjoint")
struct RegionCropTests {
    static func forward<T: SynthesisFloat>(_ crop: RegionCrop, _ image: [T], channels: Int) -> [T] {
        var out = [T](repeating: .nan, count: channels * crop.outputHeight * crop.outputWidth)
        image.withUnsafeBufferPointer { src in out.withUnsafeMutableBufferPointer { crop.forward(src, into: $0, channels: channels) } }
        return out
    }

    static let torchCases: [(size: Int, cell: Int)] = [(28, 3), (30, 3), (29, 0), (29, 1), (29, 2), (29, 3)]

    /// torch derives its tap weights through another rounding path (they differ from `1 − λ`, `λ` by an ulp or two),
    /// so the outputs agree to a few ulps rather than bit for bit.
    @Test("forward equals F.interpolate(bilinear, align_corners=False) in F64 and F32 to a few ulps", arguments: torchCases)
    func torch(size: Int, cell: Int) throws {
        let image = try Reference.doubles("crop_\(size)_image")
        let crop = RegionCrop.cell(cell, imageHeight: size, imageWidth: size)
        let out = Self.forward(crop, image, channels: 3)
        #expect(Reference.maxError(out, try Reference.doubles("crop_\(size)_cell\(cell)_f64")) < 1e-14)
        let outF = Self.forward(crop, image.map(Float.init), channels: 3)
        let error = Reference.maxError(outF, try Reference.floats("crop_\(size)_cell\(cell)_f32"))
        #expect(error < 4e-6, "F32 error \(error)")
    }

    @Test("the four cells partition the image: floor and ceil halves of odd sides", arguments: [(28, 28), (29, 29), (7, 12), (2, 3)])
    func cells(height: Int, width: Int) {
        var covered = [Int](repeating: 0, count: height * width)
        for k in 0..<4 {
            let c = RegionCrop.cell(k, imageHeight: height, imageWidth: width)
            #expect(c.outputHeight == height && c.outputWidth == width)
            #expect(c.height == (k / 2 == 0 ? height / 2 : height - height / 2))
            #expect(c.width == (k % 2 == 0 ? width / 2 : width - width / 2))
            for y in c.top..<(c.top + c.height) { for x in c.left..<(c.left + c.width) { covered[y * width + x] += 1 } }
        }
        #expect(covered.allSatisfy { $0 == 1 })
    }

    static let adjointCases: [RegionCrop] = [
        .cell(3, imageHeight: 29, imageWidth: 29),
        .cell(0, imageHeight: 29, imageWidth: 29),
        .cell(1, imageHeight: 9, imageWidth: 13, outputHeight: 11, outputWidth: 17),
        RegionCrop(imageHeight: 12, imageWidth: 10, top: 2, left: 1, height: 9, width: 8, outputHeight: 4, outputWidth: 5),  // downsampling
        RegionCrop(imageHeight: 6, imageWidth: 6, top: 3, left: 3, height: 3, width: 3, outputHeight: 3, outputWidth: 3),  // same size
    ]

    @Test("adjoint: ⟨A x, y⟩ = ⟨x, Aᵀ y⟩, central differences of ⟨A x, y⟩ give Aᵀ y, only the cell changes", arguments: adjointCases)
    func adjoint(crop: RegionCrop) {
        let channels = 2
        let x = Reference.values(channels * crop.imageHeight * crop.imageWidth, seed: 61)
        let y = Reference.values(channels * crop.outputHeight * crop.outputWidth, seed: 62)
        var back = [Double](repeating: 0, count: x.count)
        y.withUnsafeBufferPointer { g in back.withUnsafeMutableBufferPointer { crop.addAdjoint(g, into: $0, channels: channels) } }
        let lhs = Reference.dot(Self.forward(crop, x, channels: channels), y), rhs = Reference.dot(x, back)
        #expect(abs(lhs - rhs) < 1e-12 * max(1, abs(lhs)))
        // Linear in x: a large step is exact but for rounding.
        let numerical = Reference.numericalGradient(x, step: 0.5) { Reference.dot(Self.forward(crop, $0, channels: channels), y) }
        #expect(Reference.maxError(numerical, back) < 1e-12)
        for c in 0..<channels {
            for row in 0..<crop.imageHeight {
                for column in 0..<crop.imageWidth where !(crop.top..<(crop.top + crop.height)).contains(row) || !(crop.left..<(crop.left + crop.width)).contains(column) {
                    #expect(back[(c * crop.imageHeight + row) * crop.imageWidth + column] == 0)
                }
            }
        }
        // It adds: a second call doubles.
        y.withUnsafeBufferPointer { g in back.withUnsafeMutableBufferPointer { crop.addAdjoint(g, into: $0, channels: channels) } }
        #expect(abs(Reference.dot(x, back) - 2 * rhs) < 1e-12 * max(1, abs(rhs)))
    }

    @Test("upsampling clamps the source index at 0: the first output row copies the cell's first row")
    func clamp() {
        let crop = RegionCrop(imageHeight: 2, imageWidth: 2, top: 0, left: 0, height: 2, width: 2, outputHeight: 8, outputWidth: 8)
        let out = Self.forward(crop, [1.0, 3, 5, 7], channels: 1)
        // scale ¼: output 0 and 1 read source −0.375 and −0.125, both clamped to 0; output 7 reads 1.625 → the last row.
        #expect(Array(out[0..<2]) == [1, 1] && out[7] == 3)
        #expect(out[8] == 1 && out[63] == 7)
        #expect(out[2] == 1 + 2 * 0.125)
    }

    @Test("random cells: m ∈ 1…4 distinct cells, every m and cell drawn, reproducible")
    func random() {
        var sizes = Set<Int>(), used = Set<Int>()
        for step in 0..<200 {
            let cells = RegionCrop.randomCells(seed: 8, image: 2, step: step)
            #expect((1...4).contains(cells.count) && Set(cells).count == cells.count && cells.allSatisfy { (0..<4).contains($0) })
            #expect(cells == RegionCrop.randomCells(seed: 8, image: 2, step: step))
            sizes.insert(cells.count)
            used.formUnion(cells)
        }
        #expect(sizes == Set(1...4) && used == Set(0..<4))
    }
}
