// Run-time ISA dispatch for the ViT kernels: kernels_impl.h compiled once per level, a table per level, and the
// active table picked once from CPUID (+ XGETBV for the OS-saved register state).
#include "CCkptKernels.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define CKPT_X86_64 1
#endif

// No a·b + c is fused into one rounding: every level, with or without FMA, then rounds exactly alike (and as the
// Swift kernels did). The kernels are bound by loads, stores and the exp polynomial's latency, not by the FMA count.
#pragma STDC FP_CONTRACT OFF
#pragma clang fp contract(off)
// The 16-lane helpers are static and always inlined: no vector crosses a real call, so the ABI note is moot.
#pragma clang diagnostic ignored "-Wpsabi"

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

// MARK: - The levels

#define CKPT_SUFFIX base
#define CKPT_LEVEL CKPT_ISA_BASELINE
#ifdef CKPT_X86_64
#define CKPT_NAME "sse2"
#else
#define CKPT_NAME "generic"
#endif
#include "kernels_impl.h"
#undef CKPT_SUFFIX
#undef CKPT_LEVEL
#undef CKPT_NAME

#ifdef CKPT_X86_64
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#define CKPT_SUFFIX avx2
#define CKPT_LEVEL CKPT_ISA_AVX2
#define CKPT_NAME "avx2"
#include "kernels_impl.h"
#undef CKPT_SUFFIX
#undef CKPT_LEVEL
#undef CKPT_NAME
#pragma clang attribute pop

#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq"))), apply_to = function)
#define CKPT_SUFFIX avx512
#define CKPT_LEVEL CKPT_ISA_AVX512
#define CKPT_NAME "avx512"
#include "kernels_impl.h"
#undef CKPT_SUFFIX
#undef CKPT_LEVEL
#undef CKPT_NAME
#pragma clang attribute pop
#endif

// MARK: - CPU features

#ifdef CKPT_X86_64
static uint64_t ckpt_xgetbv0(void) {
    uint32_t eax, edx;
    __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(eax), "=d"(edx) : "c"(0));  // xgetbv, encoded for any assembler
    return ((uint64_t)edx << 32) | eax;
}
#endif

void ckpt_cpu_features_detect(ckpt_cpu_features *f) {
    memset(f, 0, sizeof *f);
#ifdef CKPT_X86_64
    f->is_x86_64 = 1;
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return;
    const unsigned maxLeaf = a;
    memcpy(f->vendor, &b, 4);
    memcpy(f->vendor + 4, &d, 4);
    memcpy(f->vendor + 8, &c, 4);
    f->vendor[12] = 0;
    __get_cpuid(1, &a, &b, &c, &d);
    unsigned family = (a >> 8) & 0xf, model = (a >> 4) & 0xf;
    if (family == 0xf) family += (a >> 20) & 0xff;
    if (family == 0x6 || family >= 0xf) model |= ((a >> 16) & 0xf) << 4;
    f->family = family;
    f->model = model;
    f->sse2 = (d >> 26) & 1;
    f->sse3 = c & 1;
    f->ssse3 = (c >> 9) & 1;
    f->sse41 = (c >> 19) & 1;
    f->sse42 = (c >> 20) & 1;
    const int osxsave = (c >> 27) & 1;
    const uint64_t xcr0 = osxsave ? ckpt_xgetbv0() : 0;
    const int ymmState = (xcr0 & 0x6) == 0x6;     // XMM + YMM
    const int zmmState = (xcr0 & 0xe6) == 0xe6;   // XMM + YMM + opmask + ZMM0-15 upper + ZMM16-31
    f->avx = ((c >> 28) & 1) && ymmState;
    f->fma = ((c >> 12) & 1) && ymmState;
    f->f16c = ((c >> 29) & 1) && ymmState;
    if (maxLeaf >= 7) {
        unsigned a7, b7, c7, d7;
        __cpuid_count(7, 0, a7, b7, c7, d7);
        f->avx2 = ((b7 >> 5) & 1) && ymmState;
        f->avx512f = ((b7 >> 16) & 1) && zmmState;
        f->avx512dq = ((b7 >> 17) & 1) && zmmState;
        f->avx512cd = ((b7 >> 28) & 1) && zmmState;
        f->avx512bw = ((b7 >> 30) & 1) && zmmState;
        f->avx512vl = ((b7 >> 31) & 1) && zmmState;
        f->avx512_vnni = ((c7 >> 11) & 1) && zmmState;
        f->avx512_fp16 = ((d7 >> 23) & 1) && zmmState;
        f->amx_tile = (d7 >> 24) & 1;
        if (a7 >= 1) {
            unsigned a71, b71, c71, d71;
            __cpuid_count(7, 1, a71, b71, c71, d71);
            f->avx512_bf16 = ((a71 >> 5) & 1) && zmmState;
        }
    }
    __get_cpuid(0x80000000, &a, &b, &c, &d);
    if (a >= 0x80000004) {
        unsigned words[12];
        for (unsigned leaf = 0; leaf < 3; leaf++)
            __get_cpuid(0x80000002 + leaf, &words[4 * leaf], &words[4 * leaf + 1], &words[4 * leaf + 2], &words[4 * leaf + 3]);
        char raw[49];
        memcpy(raw, words, 48);
        raw[48] = 0;
        const char *start = raw;
        while (*start == ' ') start++;
        size_t n = strlen(start);
        while (n > 0 && start[n - 1] == ' ') n--;
        memcpy(f->brand, start, n);
        f->brand[n] = 0;
    }
#endif
}

// MARK: - Dispatch

int ckpt_kernels_best_level(void) {
#ifdef CKPT_X86_64
    ckpt_cpu_features f;
    ckpt_cpu_features_detect(&f);
    if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx2 && f.fma) return CKPT_ISA_AVX512;
    if (f.avx2 && f.fma) return CKPT_ISA_AVX2;
#endif
    return CKPT_ISA_BASELINE;
}

const ckpt_kernel_table *ckpt_kernels_at_level(int level) {
    if (level < CKPT_ISA_BASELINE || level > ckpt_kernels_best_level()) return NULL;
    switch (level) {
#ifdef CKPT_X86_64
    case CKPT_ISA_AVX512: return &table_avx512;
    case CKPT_ISA_AVX2: return &table_avx2;
#endif
    default: return &table_base;
    }
}

static _Atomic(const ckpt_kernel_table *) active;

const ckpt_kernel_table *ckpt_kernels_active(void) {
    const ckpt_kernel_table *table = atomic_load_explicit(&active, memory_order_acquire);
    if (table) return table;
    int level = ckpt_kernels_best_level();
    const char *request = getenv("CKPT_KERNELS");
    if (request && *request) {
        int wanted = level;
        if (!strcmp(request, "sse2") || !strcmp(request, "baseline") || !strcmp(request, "generic")) wanted = CKPT_ISA_BASELINE;
        else if (!strcmp(request, "avx2")) wanted = CKPT_ISA_AVX2;
        else if (!strcmp(request, "avx512")) wanted = CKPT_ISA_AVX512;
        if (wanted < level) level = wanted;
    }
    table = ckpt_kernels_at_level(level);
    // Every thread that races here computes the same table; the first store wins.
    const ckpt_kernel_table *expected = NULL;
    atomic_compare_exchange_strong_explicit(&active, &expected, table, memory_order_acq_rel, memory_order_acquire);
    return atomic_load_explicit(&active, memory_order_acquire);
}

void ckpt_exp(const float *x, float *y, ptrdiff_t count) { ckpt_kernels_active()->exp(x, y, count); }
void ckpt_gelu(const float *x, float *y, ptrdiff_t count) { ckpt_kernels_active()->gelu(x, y, count); }
void ckpt_gelu_derivative(const float *x, float *y, ptrdiff_t count) { ckpt_kernels_active()->gelu_derivative(x, y, count); }
void ckpt_bias_gelu(float *y, ptrdiff_t rows, ptrdiff_t width, const float *bias, float *output) {
    ckpt_kernels_active()->bias_gelu(y, rows, width, bias, output);
}
void ckpt_layer_norm(const float *x, float *y, ptrdiff_t rows, ptrdiff_t width, const float *gamma, const float *beta, float eps,
                     float *statistics) {
    ckpt_kernels_active()->layer_norm(x, y, rows, width, gamma, beta, eps, statistics);
}
void ckpt_softmax_rows(float *s, ptrdiff_t rows, ptrdiff_t width, ptrdiff_t stride) { ckpt_kernels_active()->softmax_rows(s, rows, width, stride); }
void ckpt_add_rows(float *y, ptrdiff_t rows, ptrdiff_t width, ptrdiff_t stride, const float *bias) {
    ckpt_kernels_active()->add_rows(y, rows, width, stride, bias);
}
void ckpt_gelu_backward(float *dy, const float *x, ptrdiff_t count) { ckpt_kernels_active()->gelu_backward(dy, x, count); }
void ckpt_softmax_backward(float *dp, const float *p, ptrdiff_t rows, ptrdiff_t width, ptrdiff_t stride) {
    ckpt_kernels_active()->softmax_backward(dp, p, rows, width, stride);
}
void ckpt_layer_norm_backward(const float *dy, const float *x, const float *statistics, const float *gamma, ptrdiff_t rows, ptrdiff_t width,
                              float *dx) {
    ckpt_kernels_active()->layer_norm_backward(dy, x, statistics, gamma, rows, width, dx);
}
