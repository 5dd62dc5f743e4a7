#ifndef CCKPT_KERNELS_H
#define CCKPT_KERNELS_H
// The element-wise and row-wise kernels of the ViT forward and backward passes, compiled once per x86-64 ISA level
// (baseline SSE2, AVX2+FMA, AVX-512 F/BW/VL/DQ) and chosen once at run time from CPUID, so one binary runs on
// baseline x86-64 and uses the widest vectors the CPU and the OS support. Other architectures get the portable
// build only. All levels compute the same operations in the same order (16-lane partial sums, no fused
// multiply-add), so their results are bit-identical; see formats/vit-model.md, "CPU kernels".
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// MARK: - CPU features

/// What CPUID and XGETBV report. The vector flags are only set when the OS also saves that register state
/// (XCR0: YMM for AVX/AVX2/FMA, opmask + ZMM for AVX-512), i.e. when the instructions can actually be used.
typedef struct ckpt_cpu_features {
    int is_x86_64;
    char vendor[13];  // "GenuineIntel", "AuthenticAMD", "HygonGenuine", … ("" off x86)
    char brand[49];   // the processor brand string, trimmed ("" when CPUID has none)
    unsigned family, model;  // display family and model (base + extended)
    int sse2, sse3, ssse3, sse41, sse42, avx, avx2, fma, f16c;
    int avx512f, avx512bw, avx512vl, avx512dq, avx512cd, avx512_vnni, avx512_bf16, avx512_fp16, amx_tile;
} ckpt_cpu_features;

/// Fills `features` from CPUID on this CPU (all zero but `is_x86_64` = 0 elsewhere).
void ckpt_cpu_features_detect(ckpt_cpu_features *_Nonnull features);

// MARK: - Kernel table

/// ISA levels of the kernels. Off x86-64 only CKPT_ISA_BASELINE exists (portable C, vectorised by the compiler).
enum {
    CKPT_ISA_BASELINE = 0,  // SSE2 on x86-64
    CKPT_ISA_AVX2 = 1,      // AVX2 + FMA (YMM state)
    CKPT_ISA_AVX512 = 2,    // AVX-512 F, BW, VL, DQ (ZMM and opmask state)
};

/// One ISA level's kernels. The signatures are those of the Swift `Kernels.*` functions (pointers stay the
/// caller's; `output` and `statistics` may be NULL).
typedef struct ckpt_kernel_table {
    int level;
    const char *_Nonnull name;  // "sse2", "avx2", "avx512" ("generic" off x86-64)
    void (*_Nonnull exp)(const float *_Nonnull x, float *_Nonnull y, ptrdiff_t count);
    void (*_Nonnull gelu)(const float *_Nonnull x, float *_Nonnull y, ptrdiff_t count);
    void (*_Nonnull gelu_derivative)(const float *_Nonnull x, float *_Nonnull y, ptrdiff_t count);
    void (*_Nonnull bias_gelu)(float *_Nonnull y, ptrdiff_t rows, ptrdiff_t width, const float *_Nonnull bias, float *_Nullable output);
    void (*_Nonnull layer_norm)(const float *_Nonnull x, float *_Nonnull y, ptrdiff_t rows, ptrdiff_t width, const float *_Nonnull gamma,
                                const float *_Nonnull beta, float eps, float *_Nullable statistics);
    void (*_Nonnull softmax_rows)(float *_Nonnull s, ptrdiff_t rows, ptrdiff_t width, ptrdiff_t stride);
    void (*_Nonnull add_rows)(float *_Nonnull y, ptrdiff_t rows, ptrdiff_t width, ptrdiff_t stride, const float *_Nonnull bias);
    void (*_Nonnull gelu_backward)(float *_Nonnull dy, const float *_Nonnull x, ptrdiff_t count);
    void (*_Nonnull softmax_backward)(float *_Nonnull dp, const float *_Nonnull p, ptrdiff_t rows, ptrdiff_t width, ptrdiff_t stride);
    void (*_Nonnull layer_norm_backward)(const float *_Nonnull dy, const float *_Nonnull x, const float *_Nonnull statistics,
                                         const float *_Nonnull gamma, ptrdiff_t rows, ptrdiff_t width, float *_Nonnull dx);
} ckpt_kernel_table;

/// The highest level this CPU (and OS) supports.
int ckpt_kernels_best_level(void);

/// The kernels of one level, or NULL when this CPU or build cannot run it (tests and benchmarks force levels so).
const ckpt_kernel_table *_Nullable ckpt_kernels_at_level(int level);

/// The kernels every call below goes through: the best level, or a lower one named by the environment variable
/// CKPT_KERNELS ("sse2"/"baseline", "avx2", "avx512"; a level the CPU lacks is capped to the best). Chosen once.
const ckpt_kernel_table *_Nonnull ckpt_kernels_active(void);

// MARK: - Dispatched entry points (the active table)

void ckpt_exp(const float *_Nonnull x, float *_Nonnull y, ptrdiff_t count);
void ckpt_gelu(const float *_Nonnull x, float *_Nonnull y, ptrdiff_t count);
void ckpt_gelu_derivative(const float *_Nonnull x, float *_Nonnull y, ptrdiff_t count);
void ckpt_bias_gelu(float *_Nonnull y, ptrdiff_t rows, ptrdiff_t width, const float *_Nonnull bias, float *_Nullable output);
void ckpt_layer_norm(const float *_Nonnull x, float *_Nonnull y, ptrdiff_t rows, ptrdiff_t width, const float *_Nonnull gamma,
                     const float *_Nonnull beta, float eps, float *_Nullable statistics);
void ckpt_softmax_rows(float *_Nonnull s, ptrdiff_t rows, ptrdiff_t width, ptrdiff_t stride);
void ckpt_add_rows(float *_Nonnull y, ptrdiff_t rows, ptrdiff_t width, ptrdiff_t stride, const float *_Nonnull bias);
void ckpt_gelu_backward(float *_Nonnull dy, const float *_Nonnull x, ptrdiff_t count);
void ckpt_softmax_backward(float *_Nonnull dp, const float *_Nonnull p, ptrdiff_t rows, ptrdiff_t width, ptrdiff_t stride);
void ckpt_layer_norm_backward(const float *_Nonnull dy, const float *_Nonnull x, const float *_Nonnull statistics,
                              const float *_Nonnull gamma, ptrdiff_t rows, ptrdiff_t width, float *_Nonnull dx);

#ifdef __cplusplus
}
#endif
#endif
