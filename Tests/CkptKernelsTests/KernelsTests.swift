#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import CkptKernels

/// The vectorised kernels against float64 libm references.
@Suite struct KernelsTests {
    @Test func expMatchesLibmAcrossTheRange() {
        var worst: Double = 0
        var x: Float = -87
        while x < 88 {
            let got = Double(Kernels.exp(SIMD8(repeating: x))[3])
            let want = Glibc.exp(Double(x))
            worst = max(worst, abs(got - want) / want)
            x += 0.0371
        }
        #expect(worst < 3e-7, "worst relative error \(worst)")
        // Far below the clamp the result is tiny and positive, never NaN.
        let tiny = Kernels.exp(SIMD8(repeating: -1000))[0]
        #expect(tiny >= 0 && tiny < 1e-37)
    }

    @Test func geluMatchesExactErfForm() {
        var worstAbsolute: Double = 0
        var x: Float = -12
        while x <= 12 {
            let got = Double(Kernels.gelu(SIMD8(repeating: x))[5])
            let xd = Double(x)
            let want = 0.5 * xd * (1 + erf(xd / 2.0.squareRoot()))
            // Error scaled by max(1, |x|): erfc is approximated to 1.2e-7 relative.
            worstAbsolute = max(worstAbsolute, abs(got - want) / max(1, abs(xd)))
            x += 0.0173
        }
        #expect(worstAbsolute < 2e-7, "worst scaled error \(worstAbsolute)")
        // Deep in the negative tail GELU is tiny but keeps its relative accuracy (no 1 − erf cancellation).
        let tail = Double(Kernels.gelu(SIMD8(repeating: -5))[0])
        let exact = 0.5 * -5.0 * erfc(5.0 / 2.0.squareRoot())
        #expect(abs(tail - exact) / abs(exact) < 1e-6, "gelu(-5) = \(tail), exact \(exact)")
    }

    @Test func biasGELUHandlesRowTails() {
        // width 11: one vector and a scalar tail per row.
        let rows = 3, width = 11
        var y = (0..<(rows * width)).map { Float($0) * 0.37 - 6 }
        let bias = (0..<width).map { Float($0) * 0.1 }
        let input = y
        y.withUnsafeMutableBufferPointer { yp in
            bias.withUnsafeBufferPointer { Kernels.biasGELU(yp.baseAddress!, rows: rows, width: width, bias: $0.baseAddress!) }
        }
        for i in 0..<(rows * width) {
            let v = Double(input[i] + bias[i % width])
            let want = 0.5 * v * (1 + erf(v / 2.0.squareRoot()))
            #expect(abs(Double(y[i]) - want) <= 2e-7 * max(1, abs(v)) + 1e-6, "element \(i)")
        }
    }

    @Test func layerNormMatchesFloat64() {
        let rows = 2, width = 13
        let x = (0..<(rows * width)).map { Float(sin(Double($0) * 1.7)) * 3 + 100 }  // a large mean tests the two-pass variance
        let gamma = (0..<width).map { 1 + Float($0) * 0.01 }
        let beta = (0..<width).map { Float($0) * -0.02 }
        var y = [Float](repeating: 0, count: rows * width)
        x.withUnsafeBufferPointer { xp in
            y.withUnsafeMutableBufferPointer { yp in
                Kernels.layerNorm(xp.baseAddress!, yp.baseAddress!, rows: rows, width: width, gamma: gamma, beta: beta, eps: 1e-6)
            }
        }
        for r in 0..<rows {
            let row = x[(r * width)..<((r + 1) * width)].map(Double.init)
            let mean = row.reduce(0, +) / Double(width)
            let variance = row.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(width)
            for c in 0..<width {
                let want = (row[c] - mean) / (variance + 1e-6).squareRoot() * Double(gamma[c]) + Double(beta[c])
                #expect(abs(Double(y[r * width + c]) - want) < 2e-5, "row \(r) column \(c)")
            }
        }
    }

    @Test func softmaxRowsMatchFloat64WithStride() {
        let rows = 3, width = 19, stride = 21
        var s = (0..<(rows * stride)).map { Float(cos(Double($0) * 0.9)) * 30 }
        let input = s
        s.withUnsafeMutableBufferPointer { Kernels.softmaxRows($0.baseAddress!, rows: rows, width: width, stride: stride) }
        for r in 0..<rows {
            let row = (0..<width).map { Double(input[r * stride + $0]) }
            let m = row.max()!
            let total = row.reduce(0) { $0 + Glibc.exp($1 - m) }
            for c in 0..<width {
                #expect(abs(Double(s[r * stride + c]) - Glibc.exp(row[c] - m) / total) < 1e-6)
            }
            // Padding between rows is untouched.
            for c in width..<stride where r * stride + c < s.count { #expect(s[r * stride + c] == input[r * stride + c]) }
        }
    }
}
