import CCkptKernels

/// The run-time choice of the C kernels' instruction set, and each level's kernels for tests and benchmarks.
extension Kernels {
    /// The instruction-set levels the C kernels are compiled for. `baseline` is SSE2 on x86-64 (portable C elsewhere);
    /// `avx2` needs AVX2 + FMA with the OS saving YMM state; `avx512` needs AVX-512 F/BW/VL/DQ with opmask and ZMM state.
    package enum ISA: Int32, CaseIterable, Sendable, Comparable, CustomStringConvertible {
        case baseline = 0, avx2 = 1, avx512 = 2

        package static func < (a: ISA, b: ISA) -> Bool { a.rawValue < b.rawValue }

        /// "sse2" (or "generic" off x86-64), "avx2", "avx512".
        package var description: String {
            switch self {
            case .baseline:
                #if arch(x86_64)
                return "sse2"
                #else
                return "generic"
                #endif
            case .avx2: return "avx2"
            case .avx512: return "avx512"
            }
        }

        /// The highest level this CPU and OS support.
        package static var best: ISA { ISA(rawValue: ckpt_kernels_best_level()) ?? .baseline }

        /// The level every `Kernels.*` call uses: ``best``, or a lower one named by `CKPT_KERNELS` (sse2, avx2, avx512).
        package static var active: ISA { ISA(rawValue: ckpt_kernels_active().pointee.level) ?? .baseline }

        /// The levels this machine can run, lowest first.
        package static var supported: [ISA] { allCases.filter { $0 <= best } }
    }

    /// One ISA level's kernels, called directly (bypassing the run-time choice): what tests use to check every level
    /// against the references and against each other. Same parameters as the `Kernels.*` functions.
    package struct Implementation: @unchecked Sendable {  // a pointer to a static, immutable C table
        let table: UnsafePointer<ckpt_kernel_table>

        /// The kernels of `isa`, or nil when this CPU (or build) cannot run them.
        package init?(_ isa: ISA) {
            guard let table = ckpt_kernels_at_level(isa.rawValue) else { return nil }
            self.table = table
        }

        package var isa: ISA { ISA(rawValue: table.pointee.level) ?? .baseline }

        package func exp(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, count: Int) { table.pointee.exp(x, y, count) }

        package func gelu(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, count: Int) { table.pointee.gelu(x, y, count) }

        package func geluDerivative(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, count: Int) {
            table.pointee.gelu_derivative(x, y, count)
        }

        package func biasGELU(
            _ y: UnsafeMutablePointer<Float>, rows: Int, width: Int, bias: UnsafePointer<Float>, output: UnsafeMutablePointer<Float>? = nil
        ) {
            table.pointee.bias_gelu(y, rows, width, bias, output)
        }

        package func layerNorm(
            _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, rows: Int, width: Int,
            gamma: UnsafePointer<Float>, beta: UnsafePointer<Float>, eps: Float, statistics: UnsafeMutablePointer<Float>? = nil
        ) {
            table.pointee.layer_norm(x, y, rows, width, gamma, beta, eps, statistics)
        }

        package func softmaxRows(_ s: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int) {
            table.pointee.softmax_rows(s, rows, width, stride)
        }

        package func addRows(_ y: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int, bias: UnsafePointer<Float>) {
            table.pointee.add_rows(y, rows, width, stride, bias)
        }

        package func geluBackward(_ dy: UnsafeMutablePointer<Float>, preActivation x: UnsafePointer<Float>, count: Int) {
            table.pointee.gelu_backward(dy, x, count)
        }

        package func softmaxBackward(_ dp: UnsafeMutablePointer<Float>, probabilities p: UnsafePointer<Float>, rows: Int, width: Int, stride: Int) {
            table.pointee.softmax_backward(dp, p, rows, width, stride)
        }

        package func layerNormBackward(
            _ dy: UnsafePointer<Float>, input x: UnsafePointer<Float>, statistics: UnsafePointer<Float>, gamma: UnsafePointer<Float>,
            rows: Int, width: Int, accumulatingInto dx: UnsafeMutablePointer<Float>
        ) {
            table.pointee.layer_norm_backward(dy, x, statistics, gamma, rows, width, dx)
        }
    }
}
