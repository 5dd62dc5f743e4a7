import CCkptKernels

/// What this CPU offers, from CPUID (x86-64). The vector features count only when the OS also saves their register
/// state (XGETBV), so `avx512f` is false on a CPU with AVX-512 under a kernel or hypervisor that disables it.
/// A plain value so tests can describe any CPU to the decisions built on it.
package struct CPUFeatures: Sendable, Equatable {
    package var isX86_64: Bool
    /// CPUID vendor: "GenuineIntel", "AuthenticAMD", "HygonGenuine", … ("" off x86).
    package var vendor: String
    /// The brand string ("AMD EPYC 9654 96-Core Processor"); "" when the CPU has none.
    package var brand: String
    package var family: Int, model: Int
    package var avx = false, avx2 = false, fma = false, f16c = false
    package var avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512cd = false
    package var avx512vnni = false, avx512bf16 = false, avx512fp16 = false, amxTile = false

    package init(isX86_64: Bool = true, vendor: String = "GenuineIntel", brand: String = "", family: Int = 6, model: Int = 0) {
        self.isX86_64 = isX86_64
        self.vendor = vendor
        self.brand = brand
        self.family = family
        self.model = model
    }

    /// AVX2 with FMA: what OpenBLAS's Haswell and Zen kernels need.
    package var hasAVX2FMA: Bool { isX86_64 && avx && avx2 && fma }

    /// AVX-512 F, CD, BW, DQ and VL: what OpenBLAS's SkylakeX kernels need.
    package var hasAVX512: Bool { hasAVX2FMA && avx512f && avx512cd && avx512bw && avx512dq && avx512vl }

    package var isAMD: Bool { vendor == "AuthenticAMD" || vendor == "HygonGenuine" }

    /// The widest vector extension, as a short name: "avx512", "avx2", "avx", "sse2" (x86-64), or "generic".
    package var simd: String {
        guard isX86_64 else { return "generic" }
        return hasAVX512 ? "avx512" : hasAVX2FMA ? "avx2" : avx ? "avx" : "sse2"
    }

    /// A readable name: the brand string, or vendor and family/model.
    package var name: String {
        if !brand.isEmpty { return brand }
        return isX86_64 ? "\(vendor.isEmpty ? "x86-64" : vendor) family \(family) model \(model)" : "unknown"
    }

    /// This machine.
    package static let host: CPUFeatures = {
        var raw = ckpt_cpu_features()
        ckpt_cpu_features_detect(&raw)
        func string<T>(_ tuple: T) -> String {
            withUnsafeBytes(of: tuple) { bytes in String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self) }
        }
        var f = CPUFeatures(isX86_64: raw.is_x86_64 != 0, vendor: string(raw.vendor), brand: string(raw.brand),
            family: Int(raw.family), model: Int(raw.model))
        f.avx = raw.avx != 0
        f.avx2 = raw.avx2 != 0
        f.fma = raw.fma != 0
        f.f16c = raw.f16c != 0
        f.avx512f = raw.avx512f != 0
        f.avx512bw = raw.avx512bw != 0
        f.avx512vl = raw.avx512vl != 0
        f.avx512dq = raw.avx512dq != 0
        f.avx512cd = raw.avx512cd != 0
        f.avx512vnni = raw.avx512_vnni != 0
        f.avx512bf16 = raw.avx512_bf16 != 0
        f.avx512fp16 = raw.avx512_fp16 != 0
        f.amxTile = raw.amx_tile != 0
        return f
    }()
}
