#if canImport(Glibc)
import Glibc
#endif
import CCkptOpenBLAS

/// Which OpenBLAS kernel set (its "core") the process runs on, and whether ckpt should run itself again with a better
/// one. OpenBLAS (DYNAMIC_ARCH builds, as Debian's) picks its kernels from CPUID when the library loads; a CPU newer
/// than the library (Sapphire Rapids under 0.3.21) is not recognised and gets the SSE3 `Prescott` kernels, 4.4×
/// slower on a ViT forward than SkylakeX. The only override is `OPENBLAS_CORETYPE`, read at load time, so the fix
/// is to set it and re-execute the process once (the CLI does that at start-up; this type only decides).
package enum OpenBLASCore {
    /// OpenBLAS's own override; the user's value always wins.
    package static let coretypeVariable = "OPENBLAS_CORETYPE"
    /// Set (to the requested core) by ckpt on the re-executed process: never re-execute twice.
    package static let markerVariable = "CKPT_OPENBLAS_REEXEC"
    /// `CKPT_NO_REEXEC=1` keeps whatever OpenBLAS chose.
    package static let disableVariable = "CKPT_NO_REEXEC"
    /// Test hook: the decision takes this as OpenBLAS's core instead of the real one (to exercise the re-exec on a
    /// machine OpenBLAS recognises). The report still shows the real core.
    package static let simulatedCoreVariable = "CKPT_TEST_OPENBLAS_CORE"

    /// Who chose the kernels the process runs on.
    package enum ChosenBy: String, Sendable, Equatable {
        case openblas, user, ckpt
    }

    package enum Decision: Sendable, Equatable {
        /// Run on as we are.
        case keep(ChosenBy)
        /// Set OPENBLAS_CORETYPE (and the marker) to `core` and execute the binary again with the same arguments.
        case reexec(core: String)
    }

    /// The variables the decision reads.
    package struct Environment: Sendable, Equatable {
        package var coretype: String?
        package var marker: String?
        package var disabled: Bool
        package var simulatedCore: String?

        package init(coretype: String? = nil, marker: String? = nil, disabled: Bool = false, simulatedCore: String? = nil) {
            self.coretype = coretype
            self.marker = marker
            self.disabled = disabled
            self.simulatedCore = simulatedCore
        }

        /// From a name → value map; empty values count as unset.
        package init(_ variables: [String: String]) {
            func value(_ name: String) -> String? { variables[name].flatMap { $0.isEmpty ? nil : $0 } }
            self.init(coretype: value(coretypeVariable), marker: value(markerVariable),
                disabled: value(disableVariable).map { $0 != "0" } ?? false, simulatedCore: value(simulatedCoreVariable))
        }

        /// This process's environment.
        package static var current: Environment {
            var variables: [String: String] = [:]
            for name in [coretypeVariable, markerVariable, disableVariable, simulatedCoreVariable] {
                if let value = getenv(name) { variables[name] = String(cString: value) }
            }
            return Environment(variables)
        }

        /// Who chose the kernels, judged from the variables: ckpt when its marker names the core that is set.
        package var chosenBy: ChosenBy {
            guard let coretype else { return .openblas }
            return marker?.lowercased() == coretype.lowercased() ? .ckpt : .user
        }
    }

    /// An OpenBLAS release, from `openblas_get_config()` ("OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH …").
    package struct Version: Sendable, Comparable, CustomStringConvertible {
        package var major: Int, minor: Int, patch: Int

        package init(_ major: Int, _ minor: Int, _ patch: Int) { (self.major, self.minor, self.patch) = (major, minor, patch) }

        package init?(config: String) {
            let words = config.split(separator: " ")
            guard words.count >= 2, words[0] == "OpenBLAS" else { return nil }
            let parts = words[1].split(separator: ".").map { Int($0.prefix { $0.isNumber }) }
            guard parts.count >= 2, let major = parts[0], let minor = parts[1] else { return nil }
            self.init(major, minor, parts.count > 2 ? parts[2] ?? 0 : 0)
        }

        package static func < (a: Version, b: Version) -> Bool { (a.major, a.minor, a.patch) < (b.major, b.minor, b.patch) }

        package var description: String { "\(major).\(minor).\(patch)" }
    }

    /// OpenBLAS's generic and pre-AVX kernel sets: on a CPU with AVX2 + FMA these are a fallback (OpenBLAS did not
    /// recognise the model, or mapped it to an old family). The AMD Bulldozer family (Bulldozer … Excavator) and every
    /// AVX2/AVX-512 set, and any name not listed (a newer library's, e.g. SapphireRapids), are deliberate choices and left alone.
    package static let fallbackCores: Set<String> = [
        "unknown", "generic", "katmai", "coppermine", "northwood", "prescott", "banias", "atom", "core2", "penryn", "dunnington",
        "nehalem", "athlon", "opteron", "opteron_sse3", "barcelona", "nano", "bobcat", "sandybridge",
    ]

    /// Whether `core` (as `openblas_get_corename()` spells it, any case) is a fallback kernel set.
    package static func isFallback(_ core: String) -> Bool { fallbackCores.contains(core.lowercased()) }

    /// The first release whose DYNAMIC_ARCH build was checked to accept `OPENBLAS_CORETYPE=Cooperlake`; older ones get
    /// SkylakeX (the same sgemm kernels: Cooperlake adds only the BF16 sbgemm ones).
    package static let cooperlakeSince = Version(0, 3, 21)

    /// The best kernel set OpenBLAS has for `cpu`: AVX-512 (F/CD/BW/DQ/VL, OS-enabled) → Cooperlake when the CPU has
    /// AVX512_BF16 and the library knows the name, else SkylakeX; AVX2 + FMA → Zen on AMD/Hygon, Haswell otherwise;
    /// nil without AVX2 + FMA (nothing better than what OpenBLAS picked).
    package static func bestCore(for cpu: CPUFeatures, version: Version?) -> String? {
        if cpu.hasAVX512 {
            if cpu.avx512bf16, let version, version >= cooperlakeSince { return "Cooperlake" }
            return "SkylakeX"
        }
        if cpu.hasAVX2FMA { return cpu.isAMD ? "Zen" : "Haswell" }
        return nil
    }

    /// The start-up decision, pure: re-execute only when ckpt has not already done so, the user set no core and did not
    /// opt out, and OpenBLAS fell back to a generic/pre-AVX2 core on a CPU with AVX2 + FMA or AVX-512.
    package static func decide(cpu: CPUFeatures, corename: String, version: Version?, environment: Environment) -> Decision {
        if environment.marker != nil { return .keep(environment.chosenBy) }
        if environment.coretype != nil { return .keep(.user) }
        if environment.disabled || !cpu.isX86_64 { return .keep(.openblas) }
        guard isFallback(environment.simulatedCore ?? corename), let best = bestCore(for: cpu, version: version) else { return .keep(.openblas) }
        return .reexec(core: best)
    }

    /// `openblas_get_corename()`: the kernel set in use ("SkylakeX", "Prescott", …).
    package static var corename: String { openblas_get_corename().map { String(cString: $0) } ?? "unknown" }

    /// `openblas_get_config()`: "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY SkylakeX MAX_THREADS=64".
    package static var config: String { openblas_get_config().map { String(cString: $0) } ?? "" }

    package static var version: Version? { Version(config: config) }

    /// "OpenBLAS 0.3.21".
    package static var library: String { version.map { "OpenBLAS \($0)" } ?? (config.split(separator: " ").prefix(2).joined(separator: " ")) }

    /// This process's decision.
    package static func decideForThisProcess() -> Decision {
        decide(cpu: .host, corename: corename, version: version, environment: .current)
    }

    /// What the process runs on, for reports.
    package struct Report: Sendable, Equatable {
        package var library: String
        /// The kernel set in use.
        package var core: String
        /// The core asked for through OPENBLAS_CORETYPE (by the user or by ckpt), nil when OpenBLAS chose.
        package var requestedCore: String?
        package var chosenBy: ChosenBy
        package var threads: Int
        package var cpu: String
        /// The CPU's widest vector extension ("avx512", "avx2", …).
        package var simd: String
        /// The level the element-wise kernels run at ("avx512", "avx2", "sse2").
        package var kernels: String
    }

    package static func report() -> Report {
        let environment = Environment.current
        let chosenBy = environment.chosenBy
        return Report(library: library, core: corename, requestedCore: chosenBy == .openblas ? nil : environment.coretype, chosenBy: chosenBy,
            threads: BLAS.threads, cpu: CPUFeatures.host.name, simd: CPUFeatures.host.simd, kernels: Kernels.ISA.active.description)
    }
}
