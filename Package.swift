// swift-tools-version: 6.2
import PackageDescription

// Module names of our own for the system libraries, so they never clash with another package's `CZlib`.
let package = Package(
    name: "ckpt",
    products: [
        .library(name: "Ckpt", targets: ["CkptCore", "CkptKernels", "CkptFormats", "CkptAnalysis", "CkptMerge", "CkptInference", "CkptQuant", "CkptSynthesis"]),
        .executable(name: "ckpt", targets: ["ckpt"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    ],
    targets: [
        .systemLibrary(
            name: "CCkptZlib",
            pkgConfig: "zlib",
            providers: [.apt(["zlib1g-dev"])]
        ),
        .systemLibrary(
            name: "CCkptOpenBLAS",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]
        ),
        // DTypes, shapes, byte storage (mmap / owned), dtype conversion kernels, errors, atomic output files.
        .target(name: "CkptCore"),
        // The numeric kernels every module shares: the one OpenBLAS wrapper and thread policy, owned F32 buffers, and the
        // vectorised element-wise kernels (exp, GELU, softmax, LayerNorm and their backward), the CPU features and the
        // OpenBLAS kernel-set check.
        // The element-wise kernels in C, compiled for baseline x86-64 (SSE2), AVX2+FMA and AVX-512 and chosen at run time
        // from CPUID (portable C elsewhere), and the CPUID probe behind the OpenBLAS core check.
        .target(name: "CCkptKernels"),
        .target(name: "CkptKernels", dependencies: ["CkptCore", "CCkptOpenBLAS", "CCkptKernels"]),
        // safetensors (single + sharded), .npy, .npz (zip + deflate): readers and writers.
        .target(name: "CkptFormats", dependencies: ["CkptCore", "CCkptZlib"]),
        // Tensor comparison metrics (diff) on OpenBLAS.
        .target(name: "CkptAnalysis", dependencies: ["CkptCore", "CkptFormats", "CkptKernels", "CCkptOpenBLAS"]),
        // Adapter merging (PEFT LoRA/DoRA, SSF, BitFit, FacT) and ViT key naming (timm ⇄ HF).
        .target(name: "CkptMerge", dependencies: ["CkptCore", "CkptFormats", "CkptKernels"]),
        // The ViT forward pass on OpenBLAS (run, eval): timm/HF ViT and DINOv2, image preprocessing, metrics.
        .target(name: "CkptInference", dependencies: ["CkptCore", "CkptFormats", "CkptKernels", "CkptMerge", "CkptQuant"]),
        // Weight-only quantization (RTN, MSE clipping, HQQ, GPTQ error compensation) and the quantized writers (MLX, GGUF, compressed-tensors).
        // GPTQ error compensation solves with LAPACK's Cholesky from OpenBLAS.
        .target(name: "CkptQuant", dependencies: ["CkptCore", "CkptFormats", "CkptKernels", "CkptMerge", "CCkptOpenBLAS"]),
        // Model-independent building blocks of data-free image synthesis (SPDFQ/SARDFQ, PSAQ-ViT): counter-based
        // random streams, pixel Adam, jitter/flip, TV prior, attention priors, soft labels, MSR crops, PSE loss, contact sheets.
        .target(name: "CkptSynthesis", dependencies: ["CkptCore", "CkptKernels", "CkptFormats", "CkptInference"]),
        .executableTarget(
            name: "ckpt",
            dependencies: [
                "CkptCore", "CkptKernels", "CkptFormats", "CkptAnalysis", "CkptMerge", "CkptInference", "CkptQuant", "CkptSynthesis",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "CkptCoreTests", dependencies: ["CkptCore"]),
        .testTarget(name: "CkptKernelsTests", dependencies: ["CkptCore", "CkptKernels"]),
        .testTarget(name: "CkptFormatsTests", dependencies: ["CkptCore", "CkptFormats", "CCkptZlib"]),
        .testTarget(name: "CkptCLITests", dependencies: ["CkptCore", "CkptFormats", "CkptAnalysis"]),
        .testTarget(name: "CkptMergeTests", dependencies: ["CkptCore", "CkptFormats", "CkptMerge"]),
        .testTarget(name: "CkptQuantTests", dependencies: ["CkptCore", "CkptFormats", "CkptQuant"]),
        .testTarget(name: "CkptInferenceTests", dependencies: ["CkptCore", "CkptFormats", "CkptInference", "CkptQuant"]),
        .testTarget(name: "CkptSynthesisTests", dependencies: ["CkptCore", "CkptFormats", "CkptSynthesis"]),
    ],
    swiftLanguageModes: [.v6]
)

// bench/kernels.sh: the element-wise kernel benchmark (the old Swift SIMD8 kernels against the C ones at each ISA level).
// Only when asked for, so ordinary builds do not compile it.
if Context.environment["CKPT_BENCH"] == "1" {
    package.targets.append(.executableTarget(name: "ckpt-kernel-bench", dependencies: ["CkptKernels"], path: "bench/kernels"))
}
