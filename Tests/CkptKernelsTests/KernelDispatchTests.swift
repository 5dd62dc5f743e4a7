#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import CkptKernels

/// Every ISA level of the C kernels against float64 references, against each other (bit for bit) and against the
/// Swift `SIMD8` helpers; each level is called directly, whatever the run-time choice.
@Suite struct KernelDispatchTests {
    static let levels: [Kernels.Implementation] = Kernels.ISA.supported.compactMap { Kernels.Implementation($0) }

    static func gelu(_ x: Double) -> Double { 0.5 * x * (1 + erf(x / 2.0.squareRoot())) }

    static func geluDerivative(_ x: Double) -> Double {
        0.5 * (1 + erf(x / 2.0.squareRoot())) + x * Glibc.exp(-0.5 * x * x) / (2 * Double.pi).squareRoot()
    }

    /// Deterministic pseudo-random values in [−scale, scale).
    static func values(_ count: Int, seed: UInt64, scale: Float = 1) -> [Float] {
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        return (0..<count).map { _ in
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            return (Float(state >> 40) / Float(1 << 24) * 2 - 1) * scale
        }
    }

    @Test func theMachineRunsItsBestLevel() {
        #expect(Kernels.ISA.supported.first == .baseline)
        #expect(Kernels.ISA.supported.last == Kernels.ISA.best)
        #expect(Self.levels.map(\.isa) == Kernels.ISA.supported)
        if CPUFeatures.host.hasAVX512 { #expect(Kernels.ISA.best == .avx512) }
        else if CPUFeatures.host.hasAVX2FMA { #expect(Kernels.ISA.best == .avx2) }
        #expect(Kernels.ISA.active <= Kernels.ISA.best)
        for isa in Kernels.ISA.allCases where isa > Kernels.ISA.best { #expect(Kernels.Implementation(isa) == nil) }
        print("kernel levels on \(CPUFeatures.host.name): \(Kernels.ISA.supported.map(\.description)), active \(Kernels.ISA.active)")
    }

    @Test func expMatchesLibmAtEveryLevel() {
        let x = stride(from: Float(-87), to: 88, by: 0.0371).map { $0 }
        for level in Self.levels {
            var y = [Float](repeating: 0, count: x.count)
            level.exp(x, &y, count: x.count)
            let worst = zip(x, y).map { abs(Double($1) - Glibc.exp(Double($0))) / Glibc.exp(Double($0)) }.max()!
            #expect(worst < 3e-7, "\(level.isa): worst relative error \(worst)")
            var tiny: [Float] = [0, 0]
            level.exp([-1000, -.infinity], &tiny, count: 2)
            #expect(tiny.allSatisfy { $0 >= 0 && $0 < 1e-37 }, "\(level.isa): \(tiny)")
        }
    }

    @Test func geluAndItsDerivativeMatchTheErfFormAtEveryLevel() {
        let x = stride(from: Float(-12), through: 12, by: 0.0173).map { $0 }
        for level in Self.levels {
            var y = [Float](repeating: 0, count: x.count), d = y
            level.gelu(x, &y, count: x.count)
            level.geluDerivative(x, &d, count: x.count)
            var worst = 0.0, worstDerivative = 0.0
            for i in x.indices {
                let xd = Double(x[i])
                worst = max(worst, abs(Double(y[i]) - Self.gelu(xd)) / max(1, abs(xd)))
                worstDerivative = max(worstDerivative, abs(Double(d[i]) - Self.geluDerivative(xd)) / max(1, abs(xd)))
            }
            #expect(worst < 2e-7, "\(level.isa): GELU worst scaled error \(worst)")
            #expect(worstDerivative < 5e-7, "\(level.isa): GELU′ worst scaled error \(worstDerivative)")
            var tail: [Float] = [0]
            level.gelu([-5], &tail, count: 1)
            let exact = 0.5 * -5.0 * erfc(5.0 / 2.0.squareRoot())
            #expect(abs(Double(tail[0]) - exact) / abs(exact) < 1e-6, "\(level.isa): gelu(-5) = \(tail[0])")
        }
    }

    /// The C kernels do the Swift helpers' operations in the same order, without fusing: the same bits, lane by lane.
    @Test func elementwiseKernelsReproduceTheSwiftHelpersBitForBit() {
        let x = Self.values(1000, seed: 3, scale: 20) + [0, -0.0, 88.7, -87.3, 100, -100]
        for level in Self.levels {
            var e = [Float](repeating: 0, count: x.count), g = e, d = e
            level.exp(x, &e, count: x.count)
            level.gelu(x, &g, count: x.count)
            level.geluDerivative(x, &d, count: x.count)
            for i in x.indices {
                let v = SIMD8<Float>(repeating: x[i])
                #expect(e[i].bitPattern == Kernels.exp(v)[0].bitPattern, "\(level.isa) exp(\(x[i]))")
                #expect(g[i].bitPattern == Kernels.gelu(v)[0].bitPattern, "\(level.isa) gelu(\(x[i]))")
                #expect(d[i].bitPattern == Kernels.geluDerivative(v)[0].bitPattern, "\(level.isa) gelu′(\(x[i]))")
            }
        }
    }

    @Test(arguments: [1, 11, 16, 37, 384]) func biasGELUAtEveryLevel(width: Int) {
        let rows = 3
        let input = Self.values(rows * width, seed: 5, scale: 6), bias = Self.values(width, seed: 6)
        for level in Self.levels {
            var y = input, out = [Float](repeating: 0, count: input.count)
            level.biasGELU(&y, rows: rows, width: width, bias: bias, output: &out)
            var inPlace = input
            level.biasGELU(&inPlace, rows: rows, width: width, bias: bias)
            for i in input.indices {
                let pre = input[i] + bias[i % width]
                #expect(y[i] == pre, "\(level.isa): the pre-activation is kept")
                #expect(abs(Double(out[i]) - Self.gelu(Double(pre))) <= 2e-7 * max(1, abs(Double(pre))) + 1e-7)
                #expect(inPlace[i] == out[i])
            }
        }
    }

    @Test(arguments: [1, 13, 16, 50, 384]) func layerNormMatchesFloat64AtEveryLevel(width: Int) {
        let rows = 3
        let x = Self.values(rows * width, seed: 7, scale: 3).map { $0 + 100 }  // a large mean tests the two-pass variance
        let gamma = (0..<width).map { 1 + Float($0) * 0.01 }, beta = (0..<width).map { Float($0) * -0.02 }
        for level in Self.levels {
            var y = [Float](repeating: 0, count: x.count), statistics = [Float](repeating: 0, count: 2 * rows)
            level.layerNorm(x, &y, rows: rows, width: width, gamma: gamma, beta: beta, eps: 1e-6, statistics: &statistics)
            for r in 0..<rows {
                let row = x[(r * width)..<((r + 1) * width)].map(Double.init)
                let mean = row.reduce(0, +) / Double(width)
                let variance = row.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(width)
                let inverseStd = 1 / (variance + 1e-6).squareRoot()
                #expect(abs(Double(statistics[2 * r]) - mean) < 1e-5 * abs(mean))
                #expect(abs(Double(statistics[2 * r + 1]) - inverseStd) < 2e-5 * inverseStd, "\(level.isa) row \(r)")
                for c in 0..<width {
                    let want = (row[c] - mean) * inverseStd * Double(gamma[c]) + Double(beta[c])
                    // F32 rounding of x − μ at |μ| = 100 is ~1e-5 absolute, then scaled by 1/σ·γ.
                    #expect(abs(Double(y[r * width + c]) - want) < 2e-5 * max(1, abs(Double(gamma[c]))), "\(level.isa) row \(r) column \(c)")
                }
            }
        }
    }

    @Test(arguments: [(1, 1), (19, 21), (16, 16), (257, 260)]) func softmaxRowsMatchFloat64AtEveryLevel(width: Int, stride: Int) {
        let rows = 4
        let input = Self.values(rows * stride, seed: 11, scale: 30)
        for level in Self.levels {
            var s = input
            level.softmaxRows(&s, rows: rows, width: width, stride: stride)
            for r in 0..<rows {
                let row = (0..<width).map { Double(input[r * stride + $0]) }
                let m = row.max()!
                let total = row.reduce(0) { $0 + Glibc.exp($1 - m) }
                var sum = 0.0
                for c in 0..<width {
                    sum += Double(s[r * stride + c])
                    #expect(abs(Double(s[r * stride + c]) - Glibc.exp(row[c] - m) / total) < 1e-6)
                }
                #expect(abs(sum - 1) < 2e-6, "\(level.isa) row \(r) sums to \(sum)")
                for c in width..<stride { #expect(s[r * stride + c] == input[r * stride + c], "padding is untouched") }
            }
        }
    }

    @Test func addRowsAtEveryLevel() {
        let rows = 3, width = 37, stride = 40
        let input = Self.values(rows * stride, seed: 13), bias = Self.values(width, seed: 14)
        for level in Self.levels {
            var y = input
            level.addRows(&y, rows: rows, width: width, stride: stride, bias: bias)
            for r in 0..<rows {
                for c in 0..<stride { #expect(y[r * stride + c] == input[r * stride + c] + (c < width ? bias[c] : 0)) }
            }
        }
    }

    /// GELU′ against central differences of the float64 GELU.
    @Test func geluBackwardMatchesFiniteDifferencesAtEveryLevel() {
        let count = 203
        let x = Self.values(count, seed: 17, scale: 5), upstream = Self.values(count, seed: 18)
        for level in Self.levels {
            var dy = upstream
            level.geluBackward(&dy, preActivation: x, count: count)
            for i in 0..<count {
                let h = 1e-4, xd = Double(x[i])
                let slope = (Self.gelu(xd + h) - Self.gelu(xd - h)) / (2 * h)
                #expect(abs(Double(dy[i]) - Double(upstream[i]) * slope) < 1e-6, "\(level.isa) x = \(x[i])")
            }
        }
    }

    /// dS against central differences of L = Σ w·softmax(s) in float64, row by row.
    @Test(arguments: [7, 16, 33]) func softmaxBackwardMatchesFiniteDifferencesAtEveryLevel(width: Int) {
        let rows = 2, stride = width + 3
        let scores = Self.values(rows * stride, seed: 19, scale: 4), weights = Self.values(rows * stride, seed: 20)
        func softmax(_ row: [Double]) -> [Double] {
            let m = row.max()!, e = row.map { Glibc.exp($0 - m) }, total = e.reduce(0, +)
            return e.map { $0 / total }
        }
        var p = scores
        for level in Self.levels {
            p = scores
            level.softmaxRows(&p, rows: rows, width: width, stride: stride)
            var g = weights
            level.softmaxBackward(&g, probabilities: p, rows: rows, width: width, stride: stride)
            for r in 0..<rows {
                let s = (0..<width).map { Double(scores[r * stride + $0]) }, w = (0..<width).map { Double(weights[r * stride + $0]) }
                func loss(_ s: [Double]) -> Double { zip(softmax(s), w).reduce(0) { $0 + $1.0 * $1.1 } }
                for c in 0..<width {
                    let h = 1e-5
                    var plus = s, minus = s
                    plus[c] += h; minus[c] -= h
                    let want = (loss(plus) - loss(minus)) / (2 * h)
                    #expect(abs(Double(g[r * stride + c]) - want) < 1e-5, "\(level.isa) row \(r) column \(c)")
                }
                for c in width..<stride { #expect(g[r * stride + c] == weights[r * stride + c], "padding is untouched") }
            }
        }
    }

    /// dx against central differences of L = Σ dy·LayerNorm(x) in float64; the kernel accumulates into dx.
    @Test(arguments: [5, 16, 40]) func layerNormBackwardMatchesFiniteDifferencesAtEveryLevel(width: Int) {
        let rows = 2, eps: Float = 1e-5
        let x = Self.values(rows * width, seed: 23, scale: 2).map { $0 + 0.5 }, dy = Self.values(rows * width, seed: 24)
        let gamma = Self.values(width, seed: 25).map { 1 + $0 * 0.5 }, beta = Self.values(width, seed: 26)
        let start = Self.values(rows * width, seed: 27)
        func layerNorm(_ row: [Double]) -> [Double] {
            let mean = row.reduce(0, +) / Double(row.count)
            let variance = row.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(row.count)
            return row.indices.map { (row[$0] - mean) / (variance + Double(eps)).squareRoot() * Double(gamma[$0]) + Double(beta[$0]) }
        }
        for level in Self.levels {
            var y = [Float](repeating: 0, count: x.count), statistics = [Float](repeating: 0, count: 2 * rows)
            level.layerNorm(x, &y, rows: rows, width: width, gamma: gamma, beta: beta, eps: eps, statistics: &statistics)
            var dx = start
            level.layerNormBackward(dy, input: x, statistics: statistics, gamma: gamma, rows: rows, width: width, accumulatingInto: &dx)
            for r in 0..<rows {
                let row = (0..<width).map { Double(x[r * width + $0]) }, g = (0..<width).map { Double(dy[r * width + $0]) }
                func loss(_ row: [Double]) -> Double { zip(layerNorm(row), g).reduce(0) { $0 + $1.0 * $1.1 } }
                for c in 0..<width {
                    let h = 1e-5
                    var plus = row, minus = row
                    plus[c] += h; minus[c] -= h
                    let want = Double(start[r * width + c]) + (loss(plus) - loss(minus)) / (2 * h)
                    #expect(abs(Double(dx[r * width + c]) - want) < 2e-4 * max(1, abs(want)), "\(level.isa) row \(r) column \(c)")
                }
            }
        }
    }

    /// Every level gives the same bits on every kernel (the same operations in the same order), and the dispatched
    /// `Kernels.*` entry points give the active level's.
    @Test func levelsAgreeBitForBit() throws {
        let rows = 5, width = 257, stride = 260
        let x = Self.values(rows * stride, seed: 29, scale: 8), bias = Self.values(stride, seed: 30)
        let gamma = Self.values(width, seed: 31).map { 1 + $0 }, upstream = Self.values(rows * stride, seed: 32)
        func outputs(_ level: Kernels.Implementation?) -> [[Float]] {
            var results: [[Float]] = []
            var y = x, out = [Float](repeating: 0, count: x.count)
            if let level { level.biasGELU(&y, rows: rows, width: width, bias: bias, output: &out) }
            else { Kernels.biasGELU(&y, rows: rows, width: width, bias: bias, output: &out) }
            results += [y, out]
            var ln = [Float](repeating: 0, count: rows * width), statistics = [Float](repeating: 0, count: 2 * rows)
            if let level { level.layerNorm(x, &ln, rows: rows, width: width, gamma: gamma, beta: bias, eps: 1e-6, statistics: &statistics) }
            else { Kernels.layerNorm(x, &ln, rows: rows, width: width, gamma: gamma, beta: bias, eps: 1e-6, statistics: &statistics) }
            results += [ln, statistics]
            var s = x
            if let level { level.softmaxRows(&s, rows: rows, width: width, stride: stride) }
            else { Kernels.softmaxRows(&s, rows: rows, width: width, stride: stride) }
            var ds = upstream
            if let level { level.softmaxBackward(&ds, probabilities: s, rows: rows, width: width, stride: stride) }
            else { Kernels.softmaxBackward(&ds, probabilities: s, rows: rows, width: width, stride: stride) }
            results += [s, ds]
            var added = x
            if let level { level.addRows(&added, rows: rows, width: width, stride: stride, bias: bias) }
            else { Kernels.addRows(&added, rows: rows, width: width, stride: stride, bias: bias) }
            var dg = upstream
            if let level { level.geluBackward(&dg, preActivation: x, count: x.count) }
            else { Kernels.geluBackward(&dg, preActivation: x, count: x.count) }
            var dx = upstream
            if let level {
                level.layerNormBackward(upstream, input: x, statistics: statistics, gamma: gamma, rows: rows, width: width, accumulatingInto: &dx)
            } else {
                Kernels.layerNormBackward(upstream, input: x, statistics: statistics, gamma: gamma, rows: rows, width: width, accumulatingInto: &dx)
            }
            results += [added, dg, dx]
            return results
        }
        let names = ["bias+GELU pre-activation", "bias+GELU", "LayerNorm", "LayerNorm statistics", "softmax", "softmax backward",
                     "add rows", "GELU backward", "LayerNorm backward"]
        let reference = outputs(Self.levels[0])
        for level in Self.levels.dropFirst().map(Optional.some) + [nil] {
            for (name, (a, b)) in zip(names, zip(reference, outputs(level))) {
                let differing = zip(a, b).filter { $0.bitPattern != $1.bitPattern }.count
                #expect(differing == 0, "\(name): \(level.map { "\($0.isa)" } ?? "dispatched") differs from \(Self.levels[0].isa) in \(differing) values")
            }
        }
    }
}
