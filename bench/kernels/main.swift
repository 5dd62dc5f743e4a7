// Element-wise kernel timings: the Swift SIMD8 kernels ckpt had before (baseline) against the C kernels at each ISA
// level this CPU runs, on DINOv2-S shapes (D = 384, MLP 1536, 257 tokens, 6 heads) for a batch of 8 images.
// Medians of N runs (first argument, default 31), in microseconds per call. Built and run by bench/kernels.sh.
#if canImport(Glibc)
import Glibc
#endif
import CkptKernels

let runs = CommandLine.arguments.count > 1 ? max(3, Int(CommandLine.arguments[1]) ?? 31) : 31
let batch = 8, tokens = 257, dim = 384, mlp = 1536, heads = 6
let rows = batch * tokens

func now() -> Double {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return Double(t.tv_sec) + Double(t.tv_nsec) * 1e-9
}

func values(_ count: Int, seed: UInt64, scale: Float = 1) -> [Float] {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    return (0..<count).map { _ in
        state ^= state << 13; state ^= state >> 7; state ^= state << 17
        return (Float(state >> 40) / Float(1 << 24) * 2 - 1) * scale
    }
}

/// Median seconds of `body`, after `setup` (untimed) before each run.
func median(_ setup: () -> Void, _ body: () -> Void) -> Double {
    var times: [Double] = []
    for _ in 0..<runs {
        setup()
        let start = now()
        body()
        times.append(now() - start)
    }
    return times.sorted()[times.count / 2]
}

let hidden = values(rows * mlp, seed: 1, scale: 4), fc1Bias = values(mlp, seed: 2)
let residual = values(rows * dim, seed: 3, scale: 3), gamma = values(dim, seed: 4).map { 1 + $0 }, beta = values(dim, seed: 5)
let scores = values(batch * heads * tokens * tokens, seed: 6, scale: 8), upstreamScores = values(scores.count, seed: 7)
let upstreamHidden = values(hidden.count, seed: 8), upstreamResidual = values(residual.count, seed: 9)
let scoreRows = batch * heads * tokens

var y = hidden, out = [Float](repeating: 0, count: hidden.count), ln = [Float](repeating: 0, count: residual.count)
var statistics = [Float](repeating: 0, count: 2 * rows), s = scores, ds = scores, dx = residual
var probabilities = scores
probabilities.withUnsafeMutableBufferPointer { Kernels.softmaxRows($0.baseAddress!, rows: scoreRows, width: tokens, stride: tokens) }
Kernels.layerNorm(residual, &ln, rows: rows, width: dim, gamma: gamma, beta: beta, eps: 1e-6, statistics: &statistics)

/// One implementation's kernels, as closures over the shared buffers.
struct Candidate {
    let name: String
    let biasGELU: () -> Void, layerNorm: () -> Void, softmax: () -> Void, addRows: () -> Void
    let geluBackward: () -> Void, softmaxBackward: () -> Void, layerNormBackward: () -> Void
}

var candidates = [Candidate(
    name: "swift-simd8",
    biasGELU: { SwiftSIMD8Kernels.biasGELU(&y, rows: rows, width: mlp, bias: fc1Bias, output: &out) },
    layerNorm: { SwiftSIMD8Kernels.layerNorm(residual, &ln, rows: rows, width: dim, gamma: gamma, beta: beta, eps: 1e-6, statistics: &statistics) },
    softmax: { SwiftSIMD8Kernels.softmaxRows(&s, rows: scoreRows, width: tokens, stride: tokens) },
    addRows: { SwiftSIMD8Kernels.addRows(&dx, rows: rows, width: dim, stride: dim, bias: beta) },
    geluBackward: { SwiftSIMD8Kernels.geluBackward(&y, preActivation: hidden, count: hidden.count) },
    softmaxBackward: { SwiftSIMD8Kernels.softmaxBackward(&ds, probabilities: probabilities, rows: scoreRows, width: tokens, stride: tokens) },
    layerNormBackward: {
        SwiftSIMD8Kernels.layerNormBackward(upstreamResidual, input: residual, statistics: statistics, gamma: gamma, rows: rows, width: dim, accumulatingInto: &dx)
    })]
for isa in Kernels.ISA.supported {
    let k = Kernels.Implementation(isa)!
    candidates.append(Candidate(
        name: "c-\(isa)",
        biasGELU: { k.biasGELU(&y, rows: rows, width: mlp, bias: fc1Bias, output: &out) },
        layerNorm: { k.layerNorm(residual, &ln, rows: rows, width: dim, gamma: gamma, beta: beta, eps: 1e-6, statistics: &statistics) },
        softmax: { k.softmaxRows(&s, rows: scoreRows, width: tokens, stride: tokens) },
        addRows: { k.addRows(&dx, rows: rows, width: dim, stride: dim, bias: beta) },
        geluBackward: { k.geluBackward(&y, preActivation: hidden, count: hidden.count) },
        softmaxBackward: { k.softmaxBackward(&ds, probabilities: probabilities, rows: scoreRows, width: tokens, stride: tokens) },
        layerNormBackward: { k.layerNormBackward(upstreamResidual, input: residual, statistics: statistics, gamma: gamma, rows: rows, width: dim, accumulatingInto: &dx) }))
}

let kernels: [(String, String, (Candidate) -> () -> Void, () -> Void)] = [
    ("biasGELU", "[\(rows)×\(mlp)]", \.biasGELU, { y = hidden }),
    ("layerNorm", "[\(rows)×\(dim)] +stats", \.layerNorm, {}),
    ("softmaxRows", "[\(scoreRows)×\(tokens)]", \.softmax, { s = scores }),
    ("addRows", "[\(rows)×\(dim)]", \.addRows, { dx = residual }),
    ("geluBackward", "[\(rows)×\(mlp)]", \.geluBackward, { y = upstreamHidden }),
    ("softmaxBackward", "[\(scoreRows)×\(tokens)]", \.softmaxBackward, { ds = upstreamScores }),
    ("layerNormBackward", "[\(rows)×\(dim)]", \.layerNormBackward, { dx = residual }),
]

func pad(_ text: String, _ width: Int) -> String { text.count >= width ? text + " " : text + String(repeating: " ", count: width - text.count) }

let cpu = CPUFeatures.host
print("CPU: \(cpu.name) (\(cpu.vendor), family \(cpu.family) model \(cpu.model)); widest SIMD \(cpu.simd); "
    + "C kernel levels \(Kernels.ISA.supported.map(\.description).joined(separator: ", ")), dispatched \(Kernels.ISA.active)")
print("BLAS: \(OpenBLASCore.library), core \(OpenBLASCore.corename)")
print("medians of \(runs) runs, µs per call (batch \(batch) × \(tokens) tokens, D \(dim), MLP \(mlp), \(heads) heads); speed-up vs swift-simd8")
print(pad("kernel", 19) + pad("shape", 20) + candidates.map { pad($0.name, 20) }.joined())
for (name, shape, pick, setup) in kernels {
    var line = pad(name, 19) + pad(shape, 20)
    var baseline = 0.0
    for candidate in candidates {
        let t = median(setup, pick(candidate))
        if baseline == 0 { baseline = t }
        let ratio = (baseline / t * 100).rounded() / 100
        let cell = "\(Int((t * 1e6).rounded()))" + (candidate.name == "swift-simd8" ? "" : " (\(ratio)x)")
        line += pad(cell, 20)
    }
    print(line)
}

// The levels must agree bit for bit in this (optimised) build too: the forward kernels on the same inputs.
var reference: [[Float]] = []
var agree = true
for isa in Kernels.ISA.supported {
    let k = Kernels.Implementation(isa)!
    var g = hidden, o = [Float](repeating: 0, count: hidden.count), n = [Float](repeating: 0, count: residual.count), p = scores
    k.biasGELU(&g, rows: rows, width: mlp, bias: fc1Bias, output: &o)
    k.layerNorm(residual, &n, rows: rows, width: dim, gamma: gamma, beta: beta, eps: 1e-6)
    k.softmaxRows(&p, rows: scoreRows, width: tokens, stride: tokens)
    let outputs = [o, n, p]
    if reference.isEmpty { reference = outputs } else {
        for (a, b) in zip(reference, outputs) where !zip(a, b).allSatisfy({ $0.bitPattern == $1.bitPattern }) { agree = false }
    }
}
print("levels bit-identical (biasGELU, layerNorm, softmaxRows): \(agree ? "yes" : "NO")")
