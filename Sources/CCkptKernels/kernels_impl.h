// The kernels, written once on 16-lane vectors and included by kernels.c once per ISA level with
// CKPT_SUFFIX (name suffix) set and, on x86-64, a `target` attribute applied to every function here: the compiler
// lowers a 16-lane vector to four XMM registers (SSE2), two YMM (AVX2) or one ZMM (AVX-512).
//
// Numerics (the same as the Swift SIMD8 kernels they replace): e^x = 2^k·p(r) with a two-part ln 2 and a degree-6
// Taylor p; GELU's erfc from the Chebyshev fit of Numerical Recipes' erfcc; two-pass LayerNorm. Every level does
// the same IEEE operations in the same order: reductions keep 16 partial sums folded in a fixed tree, tails run
// lane-wise on a zero-padded vector or in scalar code, and no multiply-add is fused (FP_CONTRACT off in kernels.c),
// so the levels agree bit for bit.

#define CKPT_CAT2(a, b) a##_##b
#define CKPT_CAT(a, b) CKPT_CAT2(a, b)
#define K(name) CKPT_CAT(name, CKPT_SUFFIX)

static inline __attribute__((always_inline)) v16f K(load)(const float *p) { v16f v; memcpy(&v, p, sizeof v); return v; }
static inline __attribute__((always_inline)) void K(store)(v16f v, float *p) { memcpy(p, &v, sizeof v); }
static inline __attribute__((always_inline)) v16f K(splat)(float x) { return (v16f){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline __attribute__((always_inline)) v16f K(select)(v16i mask, v16f a, v16f b) { return (v16f)((mask & (v16i)a) | (~mask & (v16i)b)); }
static inline __attribute__((always_inline)) v16f K(maximum)(v16f a, v16f b) { return K(select)(a < b, b, a); }
static inline __attribute__((always_inline)) v16f K(minimum)(v16f a, v16f b) { return K(select)(b < a, b, a); }

/// The 16 lanes summed in a fixed tree: halves, then quarters, …, so every level rounds alike.
static inline __attribute__((always_inline)) float K(sum)(v16f v) {
    v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline __attribute__((always_inline)) float K(max)(v16f v) {
    float m = v[0];
    for (int i = 1; i < 16; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/// e^x: 2^k·p(r), k = round(x·log2 e), r = x − k·ln 2 (two-part ln 2), p the degree-6 Taylor polynomial
/// (|r| ≤ ln2/2: truncation ≤ 1.3e-7 relative). Inputs clamped to [−87.3, 88.7].
static inline __attribute__((always_inline)) v16f K(vexp)(v16f x) {
    const float magic = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits
    v16f xc = K(minimum)(K(maximum)(x, K(splat)(-87.3f)), K(splat)(88.7f));
    v16f shifted = xc * 1.44269504f + magic;
    v16f k = shifted - magic;
    v16f r = xc - k * 0.69314575f;  // ln 2 high part (k·hi exact for |k| < 2^11)
    r = r - k * 1.4286068e-6f;       // ln 2 low part
    v16f p = K(splat)(1.0f / 720.0f);
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    v16i kBits = (v16i)shifted - (int)0x4B400000;  // the bits of `magic`
    v16f scale = (v16f)((kBits + 127) << 23);
    return p * scale;
}

/// erfc(z)/2 pieces for GELU: Φ(x) = 1 − q/2 (x ≥ 0) or q/2, q = t·exp(−z² + P(t)), t = 1/(1 + z/2), z = |x|/√2
/// (relative error below 1.2e-7 for every z, so the far negative tail stays accurate).
static inline __attribute__((always_inline)) v16f K(phi)(v16f x) {
    v16f magnitude = (v16f)((v16i)x & 0x7FFFFFFF);
    v16f z = magnitude * 0.70710678f;
    v16f t = 1.0f / (1.0f + 0.5f * z);
    v16f p = K(splat)(0.17087277f);
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    v16f q = t * K(vexp)(p - z * z);
    return K(select)(x >= 0.0f, 1.0f - 0.5f * q, 0.5f * q);
}

static inline __attribute__((always_inline)) v16f K(vgelu)(v16f x) { return x * K(phi)(x); }

/// GELU′(x) = Φ(x) + x·φ(x), φ(x) = e^(−x²/2)/√(2π).
static inline __attribute__((always_inline)) v16f K(vgelu_derivative)(v16f x) {
    v16f cdf = K(phi)(x);
    v16f density = K(vexp)(-0.5f * x * x) * 0.39894228f;
    return cdf + x * density;
}

/// y = f(x) over `count` values; the tail runs on one zero-padded vector, so every element sees the same code.
#define CKPT_MAP(fname, vfn)                                                                                  \
    static void K(fname)(const float *x, float *y, ptrdiff_t count) {                                         \
        ptrdiff_t i = 0;                                                                                      \
        for (; i + 16 <= count; i += 16) K(store)(vfn(K(load)(x + i)), y + i);                                \
        if (i < count) {                                                                                      \
            float lane[16] = {0};                                                                             \
            memcpy(lane, x + i, (size_t)(count - i) * sizeof(float));                                         \
            K(store)(vfn(K(load)(lane)), lane);                                                               \
            memcpy(y + i, lane, (size_t)(count - i) * sizeof(float));                                         \
        }                                                                                                     \
    }
CKPT_MAP(exp, K(vexp))
CKPT_MAP(gelu, K(vgelu))
CKPT_MAP(gelu_derivative, K(vgelu_derivative))
#undef CKPT_MAP

static void K(bias_gelu)(float *y, ptrdiff_t rows, ptrdiff_t width, const float *bias, float *output) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        float *row = y + r * width;
        float *out = (output ? output : y) + r * width;
        ptrdiff_t i = 0;
        for (; i + 16 <= width; i += 16) {
            v16f pre = K(load)(row + i) + K(load)(bias + i);
            if (output) K(store)(pre, row + i);
            K(store)(K(vgelu)(pre), out + i);
        }
        if (i < width) {
            float lane[16] = {0};
            ptrdiff_t n = width - i;
            for (ptrdiff_t j = 0; j < n; j++) lane[j] = row[i + j] + bias[i + j];
            if (output) memcpy(row + i, lane, (size_t)n * sizeof(float));
            K(store)(K(vgelu)(K(load)(lane)), lane);
            memcpy(out + i, lane, (size_t)n * sizeof(float));
        }
    }
}

static void K(layer_norm)(const float *x, float *y, ptrdiff_t rows, ptrdiff_t width, const float *gamma, const float *beta, float eps,
                          float *statistics) {
    const float inverseWidth = 1.0f / (float)width;
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *row = x + r * width;
        float *out = y + r * width;
        v16f acc = K(splat)(0);
        ptrdiff_t i = 0;
        for (; i + 16 <= width; i += 16) acc += K(load)(row + i);
        float sum = K(sum)(acc);
        for (; i < width; i++) sum += row[i];
        const float mean = sum * inverseWidth;
        v16f acc2 = K(splat)(0);
        for (i = 0; i + 16 <= width; i += 16) {
            v16f d = K(load)(row + i) - mean;
            acc2 += d * d;
        }
        float squares = K(sum)(acc2);
        for (; i < width; i++) {
            float d = row[i] - mean;
            squares += d * d;
        }
        const float inverseStd = 1.0f / __builtin_sqrtf(squares * inverseWidth + eps);
        if (statistics) {
            statistics[2 * r] = mean;
            statistics[2 * r + 1] = inverseStd;
        }
        for (i = 0; i + 16 <= width; i += 16)
            K(store)((K(load)(row + i) - mean) * inverseStd * K(load)(gamma + i) + K(load)(beta + i), out + i);
        for (; i < width; i++) out[i] = (row[i] - mean) * inverseStd * gamma[i] + beta[i];
    }
}

static void K(softmax_rows)(float *s, ptrdiff_t rows, ptrdiff_t width, ptrdiff_t stride) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        float *row = s + r * stride;
        v16f maxV = K(splat)(-__builtin_inff());
        ptrdiff_t i = 0;
        for (; i + 16 <= width; i += 16) maxV = K(maximum)(maxV, K(load)(row + i));
        float maximum = K(max)(maxV);
        for (; i < width; i++) maximum = row[i] > maximum ? row[i] : maximum;
        v16f sumV = K(splat)(0);
        for (i = 0; i + 16 <= width; i += 16) {
            v16f e = K(vexp)(K(load)(row + i) - maximum);
            K(store)(e, row + i);
            sumV += e;
        }
        float sum = K(sum)(sumV);
        if (i < width) {
            float lane[16] = {0};
            ptrdiff_t n = width - i;
            for (ptrdiff_t j = 0; j < n; j++) lane[j] = row[i + j] - maximum;
            K(store)(K(vexp)(K(load)(lane)), lane);
            for (ptrdiff_t j = 0; j < n; j++) {
                row[i + j] = lane[j];
                sum += lane[j];
            }
        }
        const float inverse = 1.0f / sum;
        for (i = 0; i + 16 <= width; i += 16) K(store)(K(load)(row + i) * inverse, row + i);
        for (; i < width; i++) row[i] *= inverse;
    }
}

static void K(add_rows)(float *y, ptrdiff_t rows, ptrdiff_t width, ptrdiff_t stride, const float *bias) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        float *row = y + r * stride;
        ptrdiff_t i = 0;
        for (; i + 16 <= width; i += 16) K(store)(K(load)(row + i) + K(load)(bias + i), row + i);
        for (; i < width; i++) row[i] += bias[i];
    }
}

static void K(gelu_backward)(float *dy, const float *x, ptrdiff_t count) {
    ptrdiff_t i = 0;
    for (; i + 16 <= count; i += 16) K(store)(K(load)(dy + i) * K(vgelu_derivative)(K(load)(x + i)), dy + i);
    if (i < count) {
        float lane[16] = {0};
        ptrdiff_t n = count - i;
        memcpy(lane, x + i, (size_t)n * sizeof(float));
        K(store)(K(vgelu_derivative)(K(load)(lane)), lane);
        for (ptrdiff_t j = 0; j < n; j++) dy[i + j] *= lane[j];
    }
}

static void K(softmax_backward)(float *dp, const float *p, ptrdiff_t rows, ptrdiff_t width, ptrdiff_t stride) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        float *g = dp + r * stride;
        const float *prob = p + r * stride;
        v16f acc = K(splat)(0);
        ptrdiff_t i = 0;
        for (; i + 16 <= width; i += 16) acc += K(load)(g + i) * K(load)(prob + i);
        float dot = K(sum)(acc);
        for (; i < width; i++) dot += g[i] * prob[i];
        for (i = 0; i + 16 <= width; i += 16) K(store)(K(load)(prob + i) * (K(load)(g + i) - dot), g + i);
        for (; i < width; i++) g[i] = prob[i] * (g[i] - dot);
    }
}

static void K(layer_norm_backward)(const float *dy, const float *x, const float *statistics, const float *gamma, ptrdiff_t rows,
                                   ptrdiff_t width, float *dx) {
    const float inverseWidth = 1.0f / (float)width;
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *g = dy + r * width, *row = x + r * width;
        float *out = dx + r * width;
        const float mean = statistics[2 * r], inverseStd = statistics[2 * r + 1];
        v16f sumG = K(splat)(0), sumGX = K(splat)(0);
        ptrdiff_t i = 0;
        for (; i + 16 <= width; i += 16) {
            v16f gi = K(load)(g + i) * K(load)(gamma + i);
            v16f xi = (K(load)(row + i) - mean) * inverseStd;
            sumG += gi;
            sumGX += gi * xi;
        }
        float meanG = K(sum)(sumG), meanGX = K(sum)(sumGX);
        for (; i < width; i++) {
            float gi = g[i] * gamma[i];
            meanG += gi;
            meanGX += gi * ((row[i] - mean) * inverseStd);
        }
        meanG *= inverseWidth;
        meanGX *= inverseWidth;
        for (i = 0; i + 16 <= width; i += 16) {
            v16f gi = K(load)(g + i) * K(load)(gamma + i);
            v16f xi = (K(load)(row + i) - mean) * inverseStd;
            K(store)(K(load)(out + i) + inverseStd * (gi - meanG - xi * meanGX), out + i);
        }
        for (; i < width; i++) {
            float gi = g[i] * gamma[i];
            float xi = (row[i] - mean) * inverseStd;
            out[i] += inverseStd * (gi - meanG - xi * meanGX);
        }
    }
}

static const ckpt_kernel_table K(table) = {
    .level = CKPT_LEVEL,
    .name = CKPT_NAME,
    .exp = K(exp),
    .gelu = K(gelu),
    .gelu_derivative = K(gelu_derivative),
    .bias_gelu = K(bias_gelu),
    .layer_norm = K(layer_norm),
    .softmax_rows = K(softmax_rows),
    .add_rows = K(add_rows),
    .gelu_backward = K(gelu_backward),
    .softmax_backward = K(softmax_backward),
    .layer_norm_backward = K(layer_norm_backward),
};

#undef K
#undef CKPT_CAT
#undef CKPT_CAT2
