import Testing
@testable import CkptInference

@Suite struct ViTKernelsTests {
    @Test func expMatchesLibm() {
        var worst: Float = 0
        var x: Float = -87
        while x < 88 {
            let got = ViTKernels.exp(SIMD8(repeating: x))[0]
            let want = Float(Double(x).exp())
            worst = max(worst, abs(got - want) / want)
            x += 0.0371
        }
        #expect(worst < 4e-7, "worst relative error \(worst)")
    }
}

extension Double {
    func exp() -> Double {
        #if canImport(Glibc)
        return Glibc.exp(self)
        #else
        return Foundation.exp(self)
        #endif
    }
}
#if canImport(Glibc)
import Glibc
#endif
