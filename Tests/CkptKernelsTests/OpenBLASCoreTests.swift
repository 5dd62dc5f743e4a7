import Testing
@testable import CkptKernels

/// The start-up decision (features + OpenBLAS core + environment → keep or re-exec), on described CPUs.
@Suite struct OpenBLASCoreTests {
    typealias Core = OpenBLASCore

    static let v0321 = Core.Version(0, 3, 21)

    static func intel(avx512: Bool = false, bf16: Bool = false, avx2: Bool = true) -> CPUFeatures {
        var f = CPUFeatures(vendor: "GenuineIntel", brand: "Intel Xeon", family: 6, model: 0x8F)
        f.avx = true
        f.avx2 = avx2
        f.fma = avx2
        if avx512 { (f.avx512f, f.avx512cd, f.avx512bw, f.avx512dq, f.avx512vl) = (true, true, true, true, true) }
        f.avx512bf16 = bf16
        return f
    }

    static func amd(avx512: Bool = false, bf16: Bool = false) -> CPUFeatures {
        var f = intel(avx512: avx512, bf16: bf16)
        f.vendor = "AuthenticAMD"
        f.family = 0x19
        return f
    }

    static let sapphireRapids = intel(avx512: true, bf16: true)
    static let skylakeSP = intel(avx512: true)
    static let haswell = intel()
    static let sandyBridge = intel(avx2: false)
    static let zen2 = amd()
    static let zen4 = amd(avx512: true, bf16: true)

    static func decide(_ cpu: CPUFeatures, _ core: String, _ environment: Core.Environment = .init(), version: Core.Version? = v0321) -> Core.Decision {
        Core.decide(cpu: cpu, corename: core, version: version, environment: environment)
    }

    @Test func theDecisionTable() {
        // Fallback kernels on a CPU with AVX2 or AVX-512: re-execute with the best kernels for its features.
        #expect(Self.decide(Self.sapphireRapids, "Prescott") == .reexec(core: "Cooperlake"))
        #expect(Self.decide(Self.sapphireRapids, "Prescott", version: Core.Version(0, 3, 20)) == .reexec(core: "SkylakeX"))
        #expect(Self.decide(Self.sapphireRapids, "Prescott", version: nil) == .reexec(core: "SkylakeX"))
        #expect(Self.decide(Self.skylakeSP, "Prescott") == .reexec(core: "SkylakeX"))
        #expect(Self.decide(Self.haswell, "Prescott") == .reexec(core: "Haswell"))
        #expect(Self.decide(Self.haswell, "Sandybridge") == .reexec(core: "Haswell"))
        #expect(Self.decide(Self.haswell, "Nehalem") == .reexec(core: "Haswell"))
        #expect(Self.decide(Self.haswell, "Core2") == .reexec(core: "Haswell"))
        #expect(Self.decide(Self.haswell, "Katmai") == .reexec(core: "Haswell"))
        #expect(Self.decide(Self.haswell, "Unknown") == .reexec(core: "Haswell"))
        #expect(Self.decide(Self.zen2, "Barcelona") == .reexec(core: "Zen"))
        #expect(Self.decide(Self.zen4, "prescott") == .reexec(core: "Cooperlake"))
        // A core OpenBLAS chose on purpose, or one this table does not know (a newer library's), is kept.
        #expect(Self.decide(Self.zen4, "Cooperlake") == .keep(.openblas))
        #expect(Self.decide(Self.sapphireRapids, "SkylakeX") == .keep(.openblas))
        #expect(Self.decide(Self.sapphireRapids, "SapphireRapids") == .keep(.openblas))
        #expect(Self.decide(Self.skylakeSP, "Haswell") == .keep(.openblas))
        #expect(Self.decide(Self.zen2, "Zen") == .keep(.openblas))
        var excavator = Self.amd()
        excavator.family = 0x15
        #expect(Self.decide(excavator, "Excavator") == .keep(.openblas))
        // Nothing better exists without AVX2 + FMA, or off x86-64.
        #expect(Self.decide(Self.sandyBridge, "Prescott") == .keep(.openblas))
        #expect(Self.decide(CPUFeatures(isX86_64: false, vendor: ""), "Prescott") == .keep(.openblas))
        var noFMA = Self.haswell
        noFMA.fma = false
        #expect(Self.decide(noFMA, "Prescott") == .keep(.openblas))
        // AVX-512 the OS does not enable is not there (the probe clears it): the AVX2 kernels.
        var disabled = Self.sapphireRapids
        (disabled.avx512f, disabled.avx512bf16) = (false, false)
        #expect(Self.decide(disabled, "Prescott") == .reexec(core: "Haswell"))
    }

    @Test func theUserAndTheMarkerWin() {
        // The user's OPENBLAS_CORETYPE always wins, whatever it names.
        #expect(Self.decide(Self.sapphireRapids, "Prescott", .init(coretype: "Prescott")) == .keep(.user))
        #expect(Self.decide(Self.sapphireRapids, "Prescott", .init(coretype: "bogus")) == .keep(.user))
        // After ckpt's own re-exec: never again, even if the core is still a fallback.
        #expect(Self.decide(Self.sapphireRapids, "Prescott", .init(coretype: "Cooperlake", marker: "Cooperlake")) == .keep(.ckpt))
        #expect(Self.decide(Self.sapphireRapids, "Cooperlake", .init(coretype: "Cooperlake", marker: "Cooperlake", simulatedCore: "Prescott")) == .keep(.ckpt))
        #expect(Self.decide(Self.haswell, "Prescott", .init(marker: "Haswell")) == .keep(.openblas))
        // The escape hatch.
        #expect(Self.decide(Self.sapphireRapids, "Prescott", .init(disabled: true)) == .keep(.openblas))
        // The test hook stands in for the core the decision sees.
        #expect(Self.decide(Self.zen4, "Cooperlake", .init(simulatedCore: "Prescott")) == .reexec(core: "Cooperlake"))
        #expect(Self.decide(Self.zen4, "Cooperlake", .init(disabled: true, simulatedCore: "Prescott")) == .keep(.openblas))
    }

    @Test func theEnvironment() {
        let empty = Core.Environment([Core.coretypeVariable: "", Core.markerVariable: "", Core.disableVariable: "0"])
        #expect(empty == Core.Environment())
        #expect(empty.chosenBy == .openblas)
        #expect(Core.Environment([Core.disableVariable: "1"]).disabled)
        #expect(Core.Environment([Core.coretypeVariable: "SkylakeX"]).chosenBy == .user)
        #expect(Core.Environment([Core.coretypeVariable: "SkylakeX", Core.markerVariable: "SkylakeX"]).chosenBy == .ckpt)
        #expect(Core.Environment([Core.coretypeVariable: "Haswell", Core.markerVariable: "SkylakeX"]).chosenBy == .user)
        #expect(Core.Environment([Core.simulatedCoreVariable: "Prescott"]).simulatedCore == "Prescott")
    }

    @Test func versionsFromTheConfigString() {
        let v = Core.Version(config: "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY Cooperlake MAX_THREADS=64")
        #expect(v == Core.Version(0, 3, 21))
        #expect(Core.Version(config: "OpenBLAS 0.3.26.dev DYNAMIC_ARCH") == Core.Version(0, 3, 26))
        #expect(Core.Version(config: "OpenBLAS 0.4 x") == Core.Version(0, 4, 0))
        #expect(Core.Version(config: "BLIS 1.0") == nil)
        #expect(Core.Version(config: "") == nil)
        #expect(Core.Version(0, 3, 20) < Core.cooperlakeSince)
    }

    @Test func thisProcess() {
        // The library in use answers, and the test runner itself needs no re-exec unless its environment says so.
        let report = Core.report()
        #expect(!report.core.isEmpty && report.library.hasPrefix("OpenBLAS"))
        #expect(report.threads >= 1)
        #expect(report.simd == CPUFeatures.host.simd)
        if Core.Environment.current == Core.Environment() { #expect(report.chosenBy == .openblas && report.requestedCore == nil) }
        print("OpenBLAS on \(report.cpu) (\(report.simd)): \(report.library), core \(report.core), decision \(Core.decideForThisProcess())")
    }
}
