/* vision/vit_ops.h - element-wise kernels shared by the ViT encoders and the
 * projectors: f16 widening, LayerNorm, softmax, bias + activation, residual
 * adds, all reproducing the numerics of ggml's CPU backend.
 *
 * Header-only on purpose: projector/ uses the same GELU as vision/ but links
 * only core/, so each translation unit that includes this header gets its
 * own static copy of the functions and of the 64 Ki-entry activation tables
 * (256 KiB of BSS each, touched only when used).
 *
 * ggml numerics reproduced here (llama.cpp c392e50, ggml-cpu.c):
 *  - GELU (tanh form) and quick-GELU go through fp16 lookup tables:
 *    y = f16(act(f16(x))), where the table is indexed by the f16 bits of x.
 *    GELU saturates first: x <= -10 gives 0 and x >= 10 gives x.
 *  - LayerNorm accumulates the mean and the variance in double, then
 *    y = (x - mean) * (1 / sqrtf(var + eps)) * w + b in f32.
 *  - softmax: y = exp(x - max), sum in double, y *= (float)(1 / sum).
 * The AVX2/F16C paths are chosen at run time (vlm_isa_best(), so
 * VLM_ISA=scalar selects the portable code); the scalar fallbacks compute
 * the same quantities (expf instead of the polynomial exp).
 */
#ifndef VLM_VISION_VIT_OPS_H
#define VLM_VISION_VIT_OPS_H

#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VIT_X86 1
#else
#define VIT_X86 0
#endif

#include "core/dtype.h"
#include "core/gguf.h"
#include "core/quant.h"

/* Which nonlinearity follows a bias add. */
typedef enum vit_act {
    VIT_ACT_NONE = 0,
    VIT_ACT_GELU,        /* tanh approximation, fp16 table, saturating at +-10 */
    VIT_ACT_GELU_QUICK,  /* x * sigmoid(1.702 x), fp16 table */
} vit_act_t;

/* ==== CPU features and tables ========================================== */

static bool vit_has_avx2_f16c;               /* AVX2 + FMA + F16C available */
static float vit_table_gelu[1 << 16];        /* [f16 bits of x] -> f16(gelu(x)) widened */
static float vit_table_gelu_quick[1 << 16];  /* [f16 bits of x] -> f16(qgelu(x)) widened */
static pthread_once_t vit_once = PTHREAD_ONCE_INIT;

static inline float vit_gelu_ref(float x) {
    const float c_a = 0.044715f;
    const float sqrt_2_over_pi = 0.79788456080286535587989211986876f;
    return 0.5f * x * (1.0f + tanhf(sqrt_2_over_pi * x * (1.0f + c_a * x * x)));
}

static inline float vit_gelu_quick_ref(float x) {
    return x * (1.0f / (1.0f + expf(-1.702f * x)));
}

static void vit_init_once(void) {
#if VIT_X86
    /* core's choice, so VLM_ISA=scalar in the environment forces the
     * portable paths here too (tests use it). */
    vit_has_avx2_f16c = vlm_isa_best() >= VLM_ISA_AVX2;
#endif
    for (int i = 0; i < (1 << 16); i++) {
        float f = vlm_fp16_to_fp32((uint16_t)i);
        vit_table_gelu[i] = vlm_round_fp16(vit_gelu_ref(f));
        vit_table_gelu_quick[i] = vlm_round_fp16(vit_gelu_quick_ref(f));
    }
}

/* Builds the tables and probes the CPU; cheap after the first call.
 * Thread-safe. Every entry point below assumes it has run. */
static inline void vit_ops_init(void) { pthread_once(&vit_once, vit_init_once); }

/* ==== f16 -> f32 widening ============================================== */

#if VIT_X86
__attribute__((target("avx2,fma,f16c")))
static void vit_f16_to_f32_avx2(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; i++) dst[i] = vlm_fp16_to_fp32(src[i]);
}
#endif

/* dst[i] = f32(src[i]) for n IEEE half values (exact). */
static inline void vit_f16_to_f32(const uint16_t *src, float *dst, size_t n) {
#if VIT_X86
    if (vit_has_avx2_f16c) {
        vit_f16_to_f32_avx2(src, dst, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; i++) dst[i] = vlm_fp16_to_fp32(src[i]);
}

/* x[i] = f32(f16(x[i])) in place (round to nearest even). */
static inline void vit_round_f16_inplace(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = vlm_round_fp16(x[i]);
}

/* ==== weights as f32 =================================================== */

/* Tensor types the ViT and projector weights may have. */
#define VIT_WEIGHT_TYPES ((1ull << VLM_DTYPE_F32) | (1ull << VLM_DTYPE_F16))

static inline int64_t vit_tensor_nelements(const vlm_gguf_tensor_t *t) {
    return t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
}

/* Number of floats an f32 copy of t needs: 0 when t is F32 and aligned, so
 * that it can be used in place in the mapping. */
static inline size_t vit_tensor_copy_floats(const vlm_gguf_tensor_t *t) {
    if (t->type == VLM_DTYPE_F32 && ((uintptr_t)t->data % _Alignof(float)) == 0) return 0;
    return (size_t)vit_tensor_nelements(t);
}

/* Returns t's values as f32 (t is F32 or F16): in place when
 * vit_tensor_copy_floats(t) is 0, otherwise converted into *arena, which is
 * advanced past the copy (rounded up to 16 floats, keeping 64-byte
 * alignment). */
static inline const float *vit_tensor_f32(const vlm_gguf_tensor_t *t, float **arena) {
    size_t n = vit_tensor_copy_floats(t);
    if (n == 0) return (const float *)t->data;
    float *dst = *arena;
    if (t->type == VLM_DTYPE_F16) vit_f16_to_f32((const uint16_t *)t->data, dst, n);
    else memcpy(dst, t->data, n * sizeof(float));
    *arena += (n + 15) & ~(size_t)15;
    return dst;
}

/* ==== LayerNorm ======================================================== */

/* y = LayerNorm(x) * w + b over rows of n values; y may equal x. Matches
 * ggml_norm followed by ggml_mul and ggml_add: mean and variance are
 * accumulated in double (four partial sums; the order differs from ggml's
 * serial loop only far below f32 precision). */
static inline void vit_layernorm_rows(float *y, const float *x, long n_rows, int n,
                                      const float *w, const float *b, float eps) {
    for (long r = 0; r < n_rows; r++) {
        const float *xr = x + (size_t)r * n;
        float *yr = y + (size_t)r * n;
        double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        int i = 0;
        for (; i + 4 <= n; i += 4) {
            s0 += xr[i];
            s1 += xr[i + 1];
            s2 += xr[i + 2];
            s3 += xr[i + 3];
        }
        for (; i < n; i++) s0 += xr[i];
        const float mean = (float)((s0 + s1 + s2 + s3) / n);
        double v0 = 0, v1 = 0, v2 = 0, v3 = 0;
        for (i = 0; i + 4 <= n; i += 4) {
            float d0 = xr[i] - mean, d1 = xr[i + 1] - mean;
            float d2 = xr[i + 2] - mean, d3 = xr[i + 3] - mean;
            v0 += (double)(d0 * d0);
            v1 += (double)(d1 * d1);
            v2 += (double)(d2 * d2);
            v3 += (double)(d3 * d3);
        }
        for (; i < n; i++) {
            float d = xr[i] - mean;
            v0 += (double)(d * d);
        }
        const float variance = (float)((v0 + v1 + v2 + v3) / n);
        const float scale = 1.0f / sqrtf(variance + eps);
        for (i = 0; i < n; i++) yr[i] = ((xr[i] - mean) * scale) * w[i] + b[i];
    }
}

/* ==== softmax ========================================================== */

#if VIT_X86
/* exp(x) for x <= 0 (softmax arguments), relative error about 1 ulp:
 * x = k ln2 + r with |r| <= ln2/2, exp(r) by a degree-7 Taylor polynomial,
 * times 2^k built in the exponent bits. Inputs below -87 give 0. */
__attribute__((target("avx2,fma,f16c")))
static inline __m256 vit_exp256_nonpos(__m256 x) {
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 ln2_hi = _mm256_set1_ps(0.693359375f);
    const __m256 ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 k = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, ln2_hi, x);
    r = _mm256_fnmadd_ps(k, ln2_lo, r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, y);
}

__attribute__((target("avx2,fma,f16c")))
static void vit_softmax_row_avx2(float *y, int n) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(y + i));
    float m[8];
    _mm256_storeu_ps(m, vmax);
    float max = m[0];
    for (int j = 1; j < 8; j++) max = m[j] > max ? m[j] : max;
    for (; i < n; i++) max = y[i] > max ? y[i] : max;
    const __m256 vm = _mm256_set1_ps(max);
    __m256 acc = _mm256_setzero_ps();
    double sum = 0;
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 v = vit_exp256_nonpos(_mm256_sub_ps(_mm256_loadu_ps(y + i), vm));
        _mm256_storeu_ps(y + i, v);
        acc = _mm256_add_ps(acc, v);
    }
    float a[8];
    _mm256_storeu_ps(a, acc);
    for (int j = 0; j < 8; j++) sum += a[j];
    for (; i < n; i++) {
        float v = expf(y[i] - max);
        y[i] = v;
        sum += v;
    }
    const __m256 vs = _mm256_set1_ps((float)(1.0 / sum));
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(y + i), vs));
    const float s = (float)(1.0 / sum);
    for (; i < n; i++) y[i] *= s;
}
#endif

/* In-place softmax over n_rows rows of n values (no mask, scale 1). */
static inline void vit_softmax_rows(float *y, long n_rows, int n) {
    for (long r = 0; r < n_rows; r++) {
        float *yr = y + (size_t)r * n;
#if VIT_X86
        if (vit_has_avx2_f16c) {
            vit_softmax_row_avx2(yr, n);
            continue;
        }
#endif
        float max = -INFINITY;
        for (int i = 0; i < n; i++) max = yr[i] > max ? yr[i] : max;
        double sum = 0;
        for (int i = 0; i < n; i++) {
            float v = expf(yr[i] - max);
            yr[i] = v;
            sum += v;
        }
        const float s = (float)(1.0 / sum);
        for (int i = 0; i < n; i++) yr[i] *= s;
    }
}

/* ==== bias + activation ================================================ */

#if VIT_X86
/* y = table[f16(y)] for 8 values at a time; GELU saturation applied when
 * saturate is set. */
__attribute__((target("avx2,fma,f16c")))
static void vit_act_table_avx2(float *y, long n, const float *table, bool saturate) {
    long i = 0;
    const __m256 lo = _mm256_set1_ps(-10.0f), hi = _mm256_set1_ps(10.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(y + i);
        __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256i idx = _mm256_cvtepu16_epi32(h);
        __m256 t = _mm256_i32gather_ps(table, idx, 4);
        if (saturate) {
            __m256 le = _mm256_cmp_ps(x, lo, _CMP_LE_OQ);
            __m256 ge = _mm256_cmp_ps(x, hi, _CMP_GE_OQ);
            t = _mm256_andnot_ps(le, t);
            t = _mm256_blendv_ps(t, x, ge);
        }
        _mm256_storeu_ps(y + i, t);
    }
    for (; i < n; i++) {
        float x = y[i];
        if (saturate && x <= -10.0f) y[i] = 0.0f;
        else if (saturate && x >= 10.0f) y[i] = x;
        else y[i] = table[vlm_fp32_to_fp16(x)];
    }
}
#endif

/* Applies act to n values in place. */
static inline void vit_act_apply(float *y, long n, vit_act_t act) {
    if (act == VIT_ACT_NONE) return;
    const float *table = act == VIT_ACT_GELU ? vit_table_gelu : vit_table_gelu_quick;
    const bool saturate = act == VIT_ACT_GELU;
#if VIT_X86
    if (vit_has_avx2_f16c) {
        vit_act_table_avx2(y, n, table, saturate);
        return;
    }
#endif
    for (long i = 0; i < n; i++) {
        float x = y[i];
        if (saturate && x <= -10.0f) y[i] = 0.0f;
        else if (saturate && x >= 10.0f) y[i] = x;
        else y[i] = table[vlm_fp32_to_fp16(x)];
    }
}

/* For each of n_rows rows of n values, ld apart: y = act(y + b) * scale
 * (scale 1 is exact, so it only matters for the attention's query
 * scaling). b may be NULL (no bias). */
static inline void vit_bias_act_rows_ld(float *y, int ld, const float *b, long n_rows, int n,
                                        vit_act_t act, float scale) {
    for (long r = 0; r < n_rows; r++) {
        float *yr = y + (size_t)r * ld;
        if (b)
            for (int i = 0; i < n; i++) yr[i] += b[i];
        vit_act_apply(yr, n, act);
        if (scale != 1.0f)
            for (int i = 0; i < n; i++) yr[i] *= scale;
    }
}

/* The same for contiguous rows. */
static inline void vit_bias_act_rows(float *y, const float *b, long n_rows, int n, vit_act_t act,
                                     float scale) {
    vit_bias_act_rows_ld(y, n, b, n_rows, n, act, scale);
}

/* Residual add after a biased projection: x = x + (t + b), per row
 * (ggml: cur = mul_mat + b; cur = cur + residual). b may be NULL. */
static inline void vit_bias_residual_rows(float *x, const float *t, const float *b,
                                          long n_rows, int n) {
    for (long r = 0; r < n_rows; r++) {
        float *xr = x + (size_t)r * n;
        const float *tr = t + (size_t)r * n;
        if (b)
            for (int i = 0; i < n; i++) xr[i] = (tr[i] + b[i]) + xr[i];
        else
            for (int i = 0; i < n; i++) xr[i] = tr[i] + xr[i];
    }
}

#endif
