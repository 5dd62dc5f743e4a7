import Testing
@testable import CkptInference

/// Position-embedding and image resizing against values computed by PyTorch 2.13
/// (`F.interpolate(..., align_corners=False)`; the grid is (arange(9) ** 1.5 / 3) as 3 × 3). Tolerances are a few
/// F32 ulps of the value: PyTorch rounds differently inside (a float64 evaluation of the same rule is 1.9e-6 away
/// from its output on this grid).
@Suite struct ResizeTests {
    static let grid: [Float] = [0.0, 0.3333333432674408, 0.9428090453147888, 1.7320507764816284, 2.6666667461395264,
        3.7267799377441406, 4.898979663848877, 6.173419952392578, 7.5424723625183105]

    static func resize(to size: Int) -> [Float] {
        grid.withUnsafeBufferPointer {
            PositionEmbedding.resize($0.baseAddress!, gridHeight: 3, gridWidth: 3, dim: 1, toHeight: size, toWidth: size)
        }
    }

    @Test func bicubicUpsamplingMatchesTorch() {
        let torch: [Float] = [-0.19273538887500763, -0.10010724514722824, 0.10933348536491394, 0.47570082545280457,
            0.7299047112464905, 0.39197027683258057, 0.5995079278945923, 0.9861817359924316, 1.4916102886199951,
            1.8214211463928223, 1.642327904701233, 2.0183537006378174, 2.6666667461395264, 3.382748603820801,
            3.8285512924194336, 3.681075096130371, 4.162763595581055, 4.980800151824951, 5.850541591644287,
            6.385467529296875, 5.077528476715088, 5.609438896179199, 6.510068893432617, 7.4601898193359375, 8.04305648803711]
        let got = Self.resize(to: 5)
        for i in 0..<25 { #expect(abs(got[i] - torch[i]) <= 5e-6 * max(1, abs(torch[i])), "element \(i): \(got[i]) vs \(torch[i])") }
    }

    @Test func bicubicDownsamplingMatchesTorch() {
        let torch: [Float] = [0.36012428998947144, 1.2967398166656494, 4.472224235534668, 6.520787715911865]
        let got = Self.resize(to: 2)
        for i in 0..<4 { #expect(abs(got[i] - torch[i]) <= 5e-6 * max(1, abs(torch[i])), "element \(i): \(got[i]) vs \(torch[i])") }
    }

    @Test func sameSizeIsACopy() {
        #expect(Self.resize(to: 3) == Self.grid)
    }

    @Test func bilinearImageResizeMatchesTorch() {
        // u8 [2, 3] → 4 × 4 (3 does not divide 4: the bilinear path), mean 0 / std 1 so the output is u/255 resized.
        let pixels: [UInt8] = [0, 10, 200, 255, 30, 7]
        let torch: [Float] = [0.0, 0.02450980432331562, 0.3186274766921997, 0.7843137383460999, 0.25, 0.1305147111415863,
            0.2599264681339264, 0.595098078250885, 0.75, 0.3425244987010956, 0.14252451062202454, 0.21666666865348816,
            1.0, 0.4485293924808502, 0.08382353186607361, 0.027450980618596077]
        var out = [Float](repeating: 0, count: 16)
        pixels.withUnsafeBufferPointer { p in
            out.withUnsafeMutableBufferPointer { o in
                ImageSet.resizeNormalise(p.baseAddress!, height: 2, width: 3, channels: 1, size: 4, mean: [0], std: [1], modelChannels: 1, into: o.baseAddress!)
            }
        }
        for i in 0..<16 { #expect(abs(out[i] - torch[i]) < 1e-6, "element \(i): \(out[i]) vs \(torch[i])") }
    }

    @Test func integerUpsamplingRepeatsPixelsAndNormalises() {
        // 2 × 2 grey → 4 × 4 (factor 2), replicated to 3 channels with per-channel mean/std.
        let pixels: [UInt8] = [0, 255, 51, 102]
        let mean: [Float] = [0.5, 0.25, 0], std: [Float] = [0.5, 0.25, 1]
        var out = [Float](repeating: .nan, count: 48)
        pixels.withUnsafeBufferPointer { p in
            out.withUnsafeMutableBufferPointer { o in
                ImageSet.resizeNormalise(p.baseAddress!, height: 2, width: 2, channels: 1, size: 4, mean: mean, std: std, modelChannels: 3, into: o.baseAddress!)
            }
        }
        for c in 0..<3 {
            for y in 0..<4 {
                for x in 0..<4 {
                    let u = pixels[(y / 2) * 2 + x / 2]
                    let want = (Float(u) / 255 - mean[c]) / std[c]
                    #expect(out[c * 16 + y * 4 + x] == want)
                }
            }
        }
    }
}
