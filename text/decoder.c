/* text/decoder.c - the KV cache and the batched LLaMA forward pass.
 *
 * vlm_decoder_forward() runs a batch of rows from several sequences through
 * the model in one pass: the projections and the FFN are batched over all
 * rows (vlm_matmul_multi for Q/K/V and gate/up, which share their input),
 * attention runs as work items of up to four queries that share one K/V
 * head (the query heads of a GQA group, consecutive rows of a sequence)
 * across the pool, each row reading only its own sequence's slot of the KV
 * cache, and the element-wise steps between the matmuls (norms, residuals,
 * RoPE, the cache store, SwiGLU) are split across the pool as well when the
 * chunk has enough rows. K is cached transposed like V, so K.q is computed
 * for 16 positions per vector.
 *
 * Reproducing llama.cpp c392e50 (CPU backend, AVX-512 build) closely enough
 * that greedy tokens match means copying where ggml rounds and in which order
 * it sums; the rules are stated once here and referred to below:
 *  - RMSNorm: sum of x*x in double, mean rounded to float, y = (x*s)*w.
 *  - RoPE: a cos/sin table per position, theta multiplied by
 *    base^(-2/n_rot) pair after pair in float, divided by the rope_freqs
 *    factor, times freq_scale; pairs (x[2i], x[2i+1]) rotated with the
 *    fused multiply-adds GCC made of ggml's expressions.
 *  - F16 cache: K and V rounded to f16 when stored, Q rounded to f16 for
 *    K.Q, the softmax probabilities rounded to f16 for V.P. F16 x F16
 *    products are exact in f32, so only the summation order matters:
 *      "tinyBLAS" order (llamafile sgemm, used by ggml when the batch has >= 2
 *      rows): 16 lanes, element i added to lane i % 16, then the 16 lanes
 *      summed as a tree (8+8, 4+4, 2+2, 1+1);
 *      "vec_dot" order (ggml_vec_dot_f16, a 1-row decode): 4 x 16 lanes over
 *      the first n_split & ~63 elements, lanes combined (0+2, 1+3, 0+1), the
 *      tree, then the rest added one by one in double. For V.P, n_split is
 *      llama.cpp's n_kv: the used cells rounded up to 32.
 *    We choose per sequence: the order ggml would use if that sequence ran
 *    alone with this many rows, so batching never changes a sequence's
 *    numbers. (F32 cache: K.Q always in vec_dot order with FMA, as ggml.)
 *  - The last layer keeps only the logits rows after attn_output, as
 *    llama.cpp does, so every matmul sees the row count it sees there.
 *  - Softmax: scores times the scale, max subtracted, ggml's AVX-512 expf
 *    (a polynomial, not libm's) 16 lanes at a time, each 16-lane sum (tree)
 *    added in double, probabilities times (float)(1/sum).
 *  - SiLU: x / (1 + expf(-x)) with the same AVX-512 expf on whole groups of
 *    16 and libm's expf on the remainder, then times up.
 * Every kernel exists as portable scalar code (the reference) and as
 * AVX-512 code that gives the same bits. With a matmul that sums in ggml's
 * order, micro-f32 reproduces llama.cpp's hidden states and logits exactly.
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "core/quant.h"
#include "text/llama_impl.h"

/* ==== KV cache ========================================================= */

int vlm_kv_cache_init(vlm_kv_cache_t *kv, const vlm_llama_t *m, int n_seq, int n_ctx, uint32_t type,
                      vlm_error_t *err) {
    VLM_ASSERT(kv != NULL && m != NULL);
    memset(kv, 0, sizeof *kv);
    const vlm_llama_hparams_t *hp = &m->hp;
    if (type != VLM_DTYPE_F16 && type != VLM_DTYPE_F32)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "KV cache type %s is not supported (F16 or F32)",
                             vlm_dtype_name(type));
    if (n_seq < 1 || n_seq > 65536)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "KV cache: %d sequences is outside [1, 65536]", n_seq);
    if (n_ctx < 1 || (hp->n_ctx_train > 0 && n_ctx > hp->n_ctx_train))
        return vlm_error_set(err, VLM_ERR_INVALID_ARG,
                             "KV cache: a context of %d positions is outside [1, %d] (the model's context_length)",
                             n_ctx, (int)hp->n_ctx_train);
    size_t elt = type == VLM_DTYPE_F16 ? 2 : 4;
    int32_t kv_dim = hp->n_head_kv * hp->head_dim;
    /* Every factor is below 2^30 and their product is checked stepwise. */
    size_t cells = (size_t)hp->n_layer * (size_t)n_seq;
    /* Row stride: n_ctx rounded up to 64 bytes, plus 64 bytes, so the rows
     * that one K.q block reads fall into different cache sets (a stride of
     * a multiple of 4 KiB would put them all in one). */
    const size_t ld = (((size_t)n_ctx * elt + 63) / 64 * 64 + 64) / elt;
    if (cells > SIZE_MAX / ld) goto too_large;
    cells *= ld;
    if (cells > SIZE_MAX / ((size_t)kv_dim * elt * 2)) goto too_large;

    kv->k = calloc(cells * (size_t)kv_dim, elt);
    kv->v = calloc(cells * (size_t)kv_dim, elt);
    kv->seq_len = calloc((size_t)n_seq, sizeof *kv->seq_len);
    if (!kv->k || !kv->v || !kv->seq_len) {
        vlm_kv_cache_deinit(kv);
        return vlm_error_set(err, VLM_ERR_NOMEM, "KV cache: out of memory for %d x %d positions", n_seq, n_ctx);
    }
    kv->n_layer = hp->n_layer;
    kv->n_seq = n_seq;
    kv->n_ctx = n_ctx;
    kv->ld = ld;
    kv->kv_dim = kv_dim;
    kv->type = type;
    kv->elt_size = elt;
    kv->bytes = cells * (size_t)kv_dim * elt * 2;
    return VLM_OK;
too_large:
    return vlm_error_set(err, VLM_ERR_TOO_LARGE, "KV cache: %d x %d positions do not fit in memory", n_seq, n_ctx);
}

void vlm_kv_cache_deinit(vlm_kv_cache_t *kv) {
    if (!kv) return;
    free(kv->k);
    free(kv->v);
    free(kv->seq_len);
    memset(kv, 0, sizeof *kv);
}

void vlm_kv_cache_seq_clear(vlm_kv_cache_t *kv, int seq) {
    VLM_ASSERT(seq >= 0 && seq < kv->n_seq);
    kv->seq_len[seq] = 0;
}

void vlm_kv_cache_seq_keep(vlm_kv_cache_t *kv, int seq, int32_t n_keep) {
    VLM_ASSERT(seq >= 0 && seq < kv->n_seq);
    if (n_keep < 0) n_keep = 0;
    if (n_keep < kv->seq_len[seq]) kv->seq_len[seq] = n_keep;
}

void vlm_kv_cache_seq_copy(vlm_kv_cache_t *kv, int src, int dst, int32_t n) {
    VLM_ASSERT(src >= 0 && src < kv->n_seq && dst >= 0 && dst < kv->n_seq);
    if (n > kv->seq_len[src]) n = kv->seq_len[src];
    if (n < 0) n = 0;
    if (src != dst) {
        /* One row per (layer, channel) in each of K and V. */
        const size_t row = (size_t)kv->kv_dim * kv->ld, bytes = (size_t)n * kv->elt_size;
        for (int32_t l = 0; l < kv->n_layer; l++) {
            const size_t s_off = ((size_t)l * kv->n_seq + (size_t)src) * row * kv->elt_size;
            const size_t d_off = ((size_t)l * kv->n_seq + (size_t)dst) * row * kv->elt_size;
            for (int32_t c = 0; c < kv->kv_dim; c++) {
                const size_t o = (size_t)c * kv->ld * kv->elt_size;
                memcpy((char *)kv->k + d_off + o, (const char *)kv->k + s_off + o, bytes);
                memcpy((char *)kv->v + d_off + o, (const char *)kv->v + s_off + o, bytes);
            }
        }
    }
    kv->seq_len[dst] = n;
}

int32_t vlm_kv_cache_seq_len(const vlm_kv_cache_t *kv, int seq) {
    VLM_ASSERT(seq >= 0 && seq < kv->n_seq);
    return kv->seq_len[seq];
}

size_t vlm_kv_cache_bytes(const vlm_kv_cache_t *kv) { return kv->bytes; }

/* ==== ggml numerics: scalar reference kernels ========================== */

static float f16_lut[1 << 16];
static pthread_once_t f16_lut_once = PTHREAD_ONCE_INIT;

static void f16_lut_init(void) {
    for (uint32_t i = 0; i < (1u << 16); i++) f16_lut[i] = vlm_fp16_to_fp32((uint16_t)i);
}

static inline float h2f(uint16_t h) { return f16_lut[h]; }

/* The sum of 16 lanes as _mm512_reduce_add_ps computes it (GCC): halves,
 * quarters, then (0+2) + (1+3). */
static inline float reduce16(const float a[16]) {
    float h[8], q[4];
    for (int i = 0; i < 8; i++) h[i] = a[i + 8] + a[i];
    for (int i = 0; i < 4; i++) q[i] = h[i + 4] + h[i];
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* ggml's AVX-512 expf (ggml_v_expf), one lane at a time: exp(x) = 2^n * p(b)
 * with n = round(x / ln 2) and a degree-5 polynomial, all in fused
 * multiply-adds; |n| > 192 saturates to 0 or infinity. */
static float expf_ggml(float x) {
    const float r = 0x1.8p23f;
    const float z = fmaf(x, 0x1.715476p+0f, r);
    const float n = z - r;
    const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
    const float u = b * b;
    const float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u, fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)),
                         u, fmaf(0x1.ffffecp-1f, b, 1.0f));
    if (isnan(n)) return n;
    if (fabsf(n) > 192.0f) return n <= 0.0f ? 0.0f : INFINITY;
    return ldexpf(j, (int)n);
}

/* Dot products of n floats in ggml's orders (see the file header). For
 * values that came from f16, fmaf() equals a multiply and an add, since the
 * product is exact. vec_dot order: the SIMD part ends at n_split & ~63
 * (n_split >= n); the rest is added in double (f16 inputs: tail_double) or
 * with float FMAs (f32 inputs). */
static float dot_tb_ref(const float *x, const float *y, int n) {
    float acc[16] = {0};
    for (int i = 0; i < n; i++) acc[i & 15] = fmaf(x[i], y[i], acc[i & 15]);
    return reduce16(acc);
}

static float dot_vd_ref(const float *x, const float *y, int n, int n_split, bool tail_double) {
    const int np = n_split & ~63, nm = n < np ? n : np;
    float acc[4][16] = {{0}};
    for (int i = 0; i < nm; i++) acc[(i >> 4) & 3][i & 15] = fmaf(x[i], y[i], acc[(i >> 4) & 3][i & 15]);
    for (int t = 0; t < 16; t++) {
        acc[0][t] += acc[2][t];
        acc[1][t] += acc[3][t];
        acc[0][t] += acc[1][t];
    }
    const float simd = reduce16(acc[0]);
    if (tail_double) {
        double sum = simd;
        for (int i = np; i < n; i++) sum += (double)(x[i] * y[i]);
        return (float)sum;
    }
    float sum = simd;
    for (int i = np; i < n; i++) sum = fmaf(x[i], y[i], sum);
    return sum;
}

/* K.q for positions [lo, n) of one head: kt holds its keys transposed, dim c
 * of position j at kt[c * ld + j]; scores[j] = q . key_j. F16 cache: q is
 * rounded to f16, tinyBLAS order (tb) or vec_dot order. F32 cache: ggml
 * always uses the vec_dot order. */
static void kq_f16_ref(const float *q, const uint16_t *kt, size_t ld, int hd, int lo, int n, bool tb,
                       float *scores) {
    float qf[4096], col[4096];
    for (int c = 0; c < hd; c++) qf[c] = h2f(vlm_fp32_to_fp16(q[c])); /* q rounded to f16 */
    for (int j = lo; j < n; j++) {
        for (int c = 0; c < hd; c++) col[c] = h2f(kt[(size_t)c * ld + (size_t)j]);
        scores[j] = tb ? dot_tb_ref(qf, col, hd) : dot_vd_ref(qf, col, hd, hd, true);
    }
}

static void kq_f32_ref(const float *q, const float *kt, size_t ld, int hd, int lo, int n, float *scores) {
    float col[4096];
    for (int j = lo; j < n; j++) {
        for (int c = 0; c < hd; c++) col[c] = kt[(size_t)c * ld + (size_t)j];
        scores[j] = dot_vd_ref(q, col, hd, hd, false);
    }
}

/* Softmax of one attention row. sc[lo..n) holds the raw scores and receives
 * exp values; p[from..n) receives the probabilities (zero below lo), rounded
 * through f16 when round16 (they are multiplied as f16). from <= lo. */
static void softmax_ref(float *sc, int lo, int n, float scale, float *p, bool round16, int from) {
    float max = -INFINITY;
    for (int j = lo; j < n; j++) {
        sc[j] *= scale;
        max = sc[j] > max ? sc[j] : max;
    }
    double sum = 0.0;
    for (int c = lo & ~15; c < n; c += 16) {
        float e[16];
        for (int t = 0; t < 16; t++) {
            const int j = c + t;
            e[t] = j >= lo && j < n ? expf_ggml(sc[j] - max) : 0.0f;
            if (j >= lo && j < n) sc[j] = e[t];
        }
        sum += (double)reduce16(e);
    }
    const float inv = (float)(1.0 / sum);
    for (int j = from; j < n; j++) {
        const float v = j < lo ? 0.0f : sc[j] * inv;
        p[j] = round16 ? h2f(vlm_fp32_to_fp16(v)) : v;
    }
}

/* out[c] = V[c] . p over n positions for the hd channels of one head: vt
 * holds them as rows ld apart. tinyBLAS order (tb) or vec_dot order with
 * the SIMD part ending at n_split & ~63. */
static void pv_f16_ref(const uint16_t *vt, size_t ld, int hd, const float *p, int n, bool tb, int n_split,
                       float *out) {
    for (int c = 0; c < hd; c++) {
        const uint16_t *v = vt + (size_t)c * ld;
        float acc[4][16] = {{0}};
        if (tb) {
            for (int i = 0; i < n; i++) acc[0][i & 15] = fmaf(h2f(v[i]), p[i], acc[0][i & 15]);
            out[c] = reduce16(acc[0]);
            continue;
        }
        const int np = n_split & ~63, nm = n < np ? n : np;
        for (int i = 0; i < nm; i++) acc[(i >> 4) & 3][i & 15] = fmaf(h2f(v[i]), p[i], acc[(i >> 4) & 3][i & 15]);
        for (int t = 0; t < 16; t++) {
            acc[0][t] += acc[2][t];
            acc[1][t] += acc[3][t];
            acc[0][t] += acc[1][t];
        }
        double sum = reduce16(acc[0]);
        for (int i = np; i < n; i++) sum += (double)(h2f(v[i]) * p[i]);
        out[c] = (float)sum;
    }
}

static void pv_f32_ref(const float *vt, size_t ld, int hd, const float *p, int n, bool tb, int n_split, float *out) {
    for (int c = 0; c < hd; c++) {
        const float *v = vt + (size_t)c * ld;
        out[c] = tb ? dot_tb_ref(v, p, n) : dot_vd_ref(v, p, n, n_split, false);
    }
}

/* g[i] = silu(g[i]) * u[i] over n elements. */
static void silu_mul_ref(float *g, const float *u, int n) {
    const int n16 = n & ~15; /* ggml's SIMD part; the rest uses libm */
    int i = 0;
    for (; i < n16; i++) g[i] = g[i] / (1.0f + expf_ggml(0.0f - g[i])) * u[i];
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* Rotates the first n_rot dims of each of n_heads heads (head_dim apart) of
 * row x in place by the angles in cs. llama.cpp's build contracts
 * x0*cos - x1*sin into fma(x0, cos, -(x1*sin)) (and the sum likewise), so
 * this does too. */
static void rope_ref(float *x, int32_t n_heads, int32_t head_dim, int32_t n_rot, const float *cs) {
    for (int32_t h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * head_dim;
        for (int32_t i = 0; i < n_rot; i += 2) {
            const float x0 = v[i], x1 = v[i + 1];
            v[i] = fmaf(x0, cs[i], -(x1 * cs[i + 1]));
            v[i + 1] = fmaf(x0, cs[i + 1], x1 * cs[i]);
        }
    }
}

/* ==== The same kernels in AVX-512 ====================================== */

#define AVX512_FN __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))

AVX512_FN static inline __mmask16 mask_first(int cnt) {
    return cnt >= 16 ? (__mmask16)0xffff : cnt <= 0 ? (__mmask16)0 : (__mmask16)((1u << cnt) - 1);
}

/* Lanes t of the 16-block at c with lo <= c + t < n. */
AVX512_FN static inline __mmask16 mask_range(int c, int lo, int n) {
    return (__mmask16)(mask_first(n - c) & ~mask_first(lo - c));
}

AVX512_FN static inline __m512 load_h16(const uint16_t *p, __mmask16 k) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

AVX512_FN static inline __m512 v_expf(__m512 x) {
    const __m512 r = _mm512_set1_ps(0x1.8p23f);
    const __m512 z = _mm512_fmadd_ps(x, _mm512_set1_ps(0x1.715476p+0f), r);
    const __m512 n = _mm512_sub_ps(z, r);
    const __m512 b = _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.7f7d1cp-20f),
                                      _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.62e4p-1f), x));
    const __mmask16 big = _mm512_cmp_ps_mask(_mm512_abs_ps(n), _mm512_set1_ps(192.0f), _CMP_GT_OQ);
    const __m512 u = _mm512_mul_ps(b, b);
    const __m512 p5 = _mm512_fmadd_ps(_mm512_set1_ps(0x1.0e4020p-7f), b, _mm512_set1_ps(0x1.573e2ep-5f));
    const __m512 p3 = _mm512_fmadd_ps(_mm512_set1_ps(0x1.555e66p-3f), b, _mm512_set1_ps(0x1.fffdb6p-2f));
    const __m512 p1 = _mm512_fmadd_ps(_mm512_set1_ps(0x1.ffffecp-1f), b, _mm512_set1_ps(1.0f));
    const __m512 j = _mm512_fmadd_ps(_mm512_fmadd_ps(p5, u, p3), u, p1);
    const __m512 res = _mm512_scalef_ps(j, n);
    if (!big) return res;
    const __mmask16 neg = _mm512_cmp_ps_mask(n, _mm512_setzero_ps(), _CMP_LE_OQ);
    const __m512 sat = _mm512_mask_blend_ps(neg, _mm512_set1_ps(INFINITY), _mm512_setzero_ps());
    return _mm512_mask_blend_ps(big, res, sat);
}

/* reduce16() of 16 vectors at once: lane j of the result is the tree sum
 * over t of acc[t][j]. */
AVX512_FN static inline __m512 tree16(__m512 acc[16]) {
    for (int t = 0; t < 8; t++) acc[t] = _mm512_add_ps(acc[t + 8], acc[t]);
    for (int t = 0; t < 4; t++) acc[t] = _mm512_add_ps(acc[t + 4], acc[t]);
    return _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
}

/* kq_f16_ref for 16 positions per step: vector lane j is position c0 + j,
 * and acc[t] holds "lane t" of every position's dot product, so each score
 * is summed exactly as one dot product sums it. */
AVX512_FN static void kq_f16_avx512(const float *q, const uint16_t *kt, size_t ld, int hd, int lo, int n, bool tb,
                                    float *scores) {
    float qf[4096];
    for (int c = 0; c < hd; c += 16) { /* q rounded to f16 */
        const __mmask16 k = mask_first(hd - c);
        const __m512 v = _mm512_maskz_loadu_ps(k, q + c);
        _mm512_mask_storeu_ps(qf + c, k, _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    }
    const int np = hd & ~63;
    for (int c0 = lo & ~15; c0 < n; c0 += 16) {
        const __mmask16 k = mask_range(c0, lo, n);
        const uint16_t *kc = kt + c0;
        __m512 acc[16];
        for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
        __m512 res;
        if (tb) { /* hd % 16 == 0 */
            for (int c = 0; c < hd; c += 16) {
#pragma GCC unroll 16
                for (int t = 0; t < 16; t++)
                    acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(qf[c + t]), load_h16(kc + (size_t)(c + t) * ld, k), acc[t]);
            }
            res = tree16(acc);
        } else {
            for (int t = 0; t < 16 && np > 0; t++) {
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int m = 0; m < np; m += 64) {
                    const int c = m + t;
                    a0 = _mm512_fmadd_ps(_mm512_set1_ps(qf[c]), load_h16(kc + (size_t)c * ld, k), a0);
                    a1 = _mm512_fmadd_ps(_mm512_set1_ps(qf[c + 16]), load_h16(kc + (size_t)(c + 16) * ld, k), a1);
                    a2 = _mm512_fmadd_ps(_mm512_set1_ps(qf[c + 32]), load_h16(kc + (size_t)(c + 32) * ld, k), a2);
                    a3 = _mm512_fmadd_ps(_mm512_set1_ps(qf[c + 48]), load_h16(kc + (size_t)(c + 48) * ld, k), a3);
                }
                acc[t] = _mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3));
            }
            res = tree16(acc);
            if (np < hd) { /* the rest, one by one in double */
                __m512d r0 = _mm512_cvtps_pd(_mm512_castps512_ps256(res));
                __m512d r1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(res, 1));
                for (int c = np; c < hd; c++) {
                    const __m512 p = _mm512_mul_ps(_mm512_set1_ps(qf[c]), load_h16(kc + (size_t)c * ld, k));
                    r0 = _mm512_add_pd(r0, _mm512_cvtps_pd(_mm512_castps512_ps256(p)));
                    r1 = _mm512_add_pd(r1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(p, 1)));
                }
                res = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(r0)), _mm512_cvtpd_ps(r1), 1);
            }
        }
        _mm512_mask_storeu_ps(scores + c0, k, res);
    }
}

AVX512_FN static void kq_f32_avx512(const float *q, const float *kt, size_t ld, int hd, int lo, int n, float *scores) {
    const int np = hd & ~63;
    for (int c0 = lo & ~15; c0 < n; c0 += 16) {
        const __mmask16 k = mask_range(c0, lo, n);
        const float *kc = kt + c0;
        __m512 acc[16];
        for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
        for (int t = 0; t < 16 && np > 0; t++) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int m = 0; m < np; m += 64) {
                const int c = m + t;
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(q[c]), _mm512_maskz_loadu_ps(k, kc + (size_t)c * ld), a0);
                a1 = _mm512_fmadd_ps(_mm512_set1_ps(q[c + 16]), _mm512_maskz_loadu_ps(k, kc + (size_t)(c + 16) * ld), a1);
                a2 = _mm512_fmadd_ps(_mm512_set1_ps(q[c + 32]), _mm512_maskz_loadu_ps(k, kc + (size_t)(c + 32) * ld), a2);
                a3 = _mm512_fmadd_ps(_mm512_set1_ps(q[c + 48]), _mm512_maskz_loadu_ps(k, kc + (size_t)(c + 48) * ld), a3);
            }
            acc[t] = _mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3));
        }
        __m512 res = tree16(acc);
        for (int c = np; c < hd; c++)
            res = _mm512_fmadd_ps(_mm512_set1_ps(q[c]), _mm512_maskz_loadu_ps(k, kc + (size_t)c * ld), res);
        _mm512_mask_storeu_ps(scores + c0, k, res);
    }
}

AVX512_FN static void softmax_avx512(float *sc, int lo, int n, float scale, float *p, bool round16, int from) {
    const int c0 = lo & ~15;
    const __m512 vscale = _mm512_set1_ps(scale);
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int c = c0; c < n; c += 16) {
        const __mmask16 k = mask_range(c, lo, n);
        const __m512 w = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, sc + c), vscale);
        _mm512_mask_storeu_ps(sc + c, k, w);
        vmax = _mm512_mask_max_ps(vmax, k, vmax, w);
    }
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    double sum = 0.0;
    for (int c = c0; c < n; c += 16) {
        const __mmask16 k = mask_range(c, lo, n);
        const __m512 e = _mm512_maskz_mov_ps(k, v_expf(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + c), max)));
        _mm512_mask_storeu_ps(sc + c, k, e);
        sum += (double)_mm512_reduce_add_ps(e);
    }
    const __m512 inv = _mm512_set1_ps((float)(1.0 / sum));
    for (int j = from; j < c0; j++) p[j] = 0.0f;
    for (int c = c0; c < n; c += 16) {
        const __mmask16 k = mask_range(c, lo, n);
        __m512 v = _mm512_maskz_mul_ps(k, _mm512_maskz_loadu_ps(k, sc + c), inv);
        if (round16) v = _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm512_mask_storeu_ps(p + c, mask_range(c, c0, n), v); /* lanes below lo are zero */
    }
}

/* pv_f16_ref: tinyBLAS order four channels at a time (sharing the loads of
 * p), vec_dot order one channel at a time. */
AVX512_FN static void pv_f16_avx512(const uint16_t *vt, size_t ld, int hd, const float *p, int n, bool tb, int n_split,
                                    float *out) {
    int c = 0;
    if (tb) {
        for (; c + 4 <= hd; c += 4) {
            const uint16_t *v0 = vt + (size_t)c * ld, *v1 = v0 + ld, *v2 = v1 + ld, *v3 = v2 + ld;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int i = 0; i < n; i += 16) {
                const __mmask16 k = mask_first(n - i);
                const __m512 pv = _mm512_maskz_loadu_ps(k, p + i);
                a0 = _mm512_fmadd_ps(load_h16(v0 + i, k), pv, a0);
                a1 = _mm512_fmadd_ps(load_h16(v1 + i, k), pv, a1);
                a2 = _mm512_fmadd_ps(load_h16(v2 + i, k), pv, a2);
                a3 = _mm512_fmadd_ps(load_h16(v3 + i, k), pv, a3);
            }
            out[c] = _mm512_reduce_add_ps(a0);
            out[c + 1] = _mm512_reduce_add_ps(a1);
            out[c + 2] = _mm512_reduce_add_ps(a2);
            out[c + 3] = _mm512_reduce_add_ps(a3);
        }
        for (; c < hd; c++) {
            const uint16_t *v = vt + (size_t)c * ld;
            __m512 a = _mm512_setzero_ps();
            for (int i = 0; i < n; i += 16) {
                const __mmask16 k = mask_first(n - i);
                a = _mm512_fmadd_ps(load_h16(v + i, k), _mm512_maskz_loadu_ps(k, p + i), a);
            }
            out[c] = _mm512_reduce_add_ps(a);
        }
        return;
    }
    /* Eight channels at a time, so that their serial double tails (positions
     * np..n-1, one addition after another) run side by side. */
    const int np = n_split & ~63, nm = n < np ? n : np;
    for (; c < hd; c += 8) {
        const int nc = hd - c < 8 ? hd - c : 8;
        double sum[8];
        const uint16_t *v[8];
        for (int g = 0; g < 8; g++) {
            v[g] = vt + (size_t)(c + (g < nc ? g : 0)) * ld;
            __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int i = 0; i < nm; i += 16) {
                const __mmask16 k = mask_first(nm - i);
                a[(i >> 4) & 3] = _mm512_fmadd_ps(load_h16(v[g] + i, k), _mm512_maskz_loadu_ps(k, p + i), a[(i >> 4) & 3]);
            }
            const __m512 s = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
            sum[g] = _mm512_reduce_add_ps(s);
        }
        for (int i = np; i < n; i++)
            for (int g = 0; g < 8; g++) sum[g] += (double)(_cvtsh_ss(v[g][i]) * p[i]);
        for (int g = 0; g < nc; g++) out[c + g] = (float)sum[g];
    }
}

AVX512_FN static void pv_f32_avx512(const float *vt, size_t ld, int hd, const float *p, int n, bool tb, int n_split,
                                    float *out) {
    const int np = n_split & ~63, nm = n < np ? n : np;
    for (int c = 0; c < hd; c++) {
        const float *v = vt + (size_t)c * ld;
        if (tb) {
            __m512 a = _mm512_setzero_ps();
            for (int i = 0; i < n; i += 16) {
                const __mmask16 k = mask_first(n - i);
                a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, v + i), _mm512_maskz_loadu_ps(k, p + i), a);
            }
            out[c] = _mm512_reduce_add_ps(a);
            continue;
        }
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int i = 0; i < nm; i += 16) {
            const __mmask16 k = mask_first(nm - i);
            a[(i >> 4) & 3] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, v + i), _mm512_maskz_loadu_ps(k, p + i),
                                              a[(i >> 4) & 3]);
        }
        const __m512 s = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
        float sum = _mm512_reduce_add_ps(s);
        for (int i = np; i < n; i++) sum = fmaf(v[i], p[i], sum);
        out[c] = sum;
    }
}

AVX512_FN static void silu_mul_avx512(float *g, const float *u, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(g + i);
        const __m512 e = v_expf(_mm512_sub_ps(_mm512_setzero_ps(), x));
        const __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(s, _mm512_loadu_ps(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* The same code as rope_ref: with FMA enabled, fmaf() is one instruction. */
AVX512_FN static void rope_avx512(float *x, int32_t n_heads, int32_t head_dim, int32_t n_rot, const float *cs) {
    for (int32_t h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * head_dim;
        for (int32_t i = 0; i < n_rot; i += 2) {
            const float x0 = v[i], x1 = v[i + 1];
            v[i] = fmaf(x0, cs[i], -(x1 * cs[i + 1]));
            v[i + 1] = fmaf(x0, cs[i + 1], x1 * cs[i]);
        }
    }
}

/* ---- Query tiles: several queries against one K/V head ---------------- */

/* A prefill shares each K and V head among the query heads of its GQA group
 * and among the rows of the batch, so the tiled kernels below compute
 * ATTN_TILE queries at once: every K or V vector is loaded and widened once
 * for all of them. Each score and each output channel is still one dot
 * product summed in exactly the order of the single-query kernels above
 * (only the loops around the dot products are reordered), so the results
 * are the same bits. */
enum { ATTN_TILE = 4 };

/* q rounded to f16 and widened back (what ggml multiplies K by). */
AVX512_FN static void round_q_f16_avx512(const float *q, int hd, float *qf) {
    for (int c = 0; c < hd; c += 16) {
        const __mmask16 k = mask_first(hd - c);
        const __m512 v = _mm512_maskz_loadu_ps(k, q + c);
        _mm512_mask_storeu_ps(qf + c, k, _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    }
}

/* Lane t of the tinyBLAS dot products of 16 positions (kc[c * ld + j],
 * j < 16) with ATTN_TILE queries: a[q] = sum over c = t, t + 16, ... of
 * qf[q][c] * k[c], as a chain of FMAs from zero. */
AVX512_FN static inline void kq_tb_lane(const float *const qf[ATTN_TILE], const uint16_t *kc, size_t ld, int hd, int t,
                                        __m512 a[ATTN_TILE]) {
    for (int q = 0; q < ATTN_TILE; q++) a[q] = _mm512_setzero_ps();
    for (int c = t; c < hd; c += 16) {
        const __m512 k = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kc + (size_t)c * ld)));
        for (int q = 0; q < ATTN_TILE; q++) a[q] = _mm512_fmadd_ps(_mm512_set1_ps(qf[q][c]), k, a[q]);
    }
}

/* A lane function: lane t (of 16) of the dot products of 16 positions with
 * ATTN_TILE queries, over n channels (kq_tb_lane, kq_vd_lane). */
typedef void (*kq_lane_fn)(const float *const qf[ATTN_TILE], const uint16_t *kc, size_t ld, int n, int t,
                           __m512 r[ATTN_TILE]);

/* h[q] = lane t+8 + lane t: the first level of reduce16's tree. lane is a
 * constant at every call, and always_inline makes it a direct call. */
AVX512_FN static inline __attribute__((always_inline)) void
kq_pair(kq_lane_fn lane, const float *const qf[ATTN_TILE], const uint16_t *kc, size_t ld, int n, int t,
        __m512 h[ATTN_TILE]) {
    __m512 a[ATTN_TILE], b[ATTN_TILE];
    lane(qf, kc, ld, n, t, a);
    lane(qf, kc, ld, n, t + 8, b);
    for (int q = 0; q < ATTN_TILE; q++) h[q] = _mm512_add_ps(b[q], a[q]);
}

/* The 16 lanes summed in reduce16's tree order, visited so that only a few
 * partial sums per query stay live: ((0+8) + (4+12)) + ((2+10) + (6+14)),
 * then the same from 1, then both. */
AVX512_FN static inline __attribute__((always_inline)) void
kq_tree16(kq_lane_fn lane, const float *const qf[ATTN_TILE], const uint16_t *kc, size_t ld, int n,
          __m512 res[ATTN_TILE]) {
    __m512 h0[ATTN_TILE], h1[ATTN_TILE], s02[ATTN_TILE], q1[ATTN_TILE];
    kq_pair(lane, qf, kc, ld, n, 0, h0);
    kq_pair(lane, qf, kc, ld, n, 4, h1);
    for (int q = 0; q < ATTN_TILE; q++) s02[q] = _mm512_add_ps(h1[q], h0[q]);
    kq_pair(lane, qf, kc, ld, n, 2, h0);
    kq_pair(lane, qf, kc, ld, n, 6, h1);
    for (int q = 0; q < ATTN_TILE; q++) s02[q] = _mm512_add_ps(s02[q], _mm512_add_ps(h1[q], h0[q]));
    kq_pair(lane, qf, kc, ld, n, 1, h0);
    kq_pair(lane, qf, kc, ld, n, 5, h1);
    for (int q = 0; q < ATTN_TILE; q++) q1[q] = _mm512_add_ps(h1[q], h0[q]);
    kq_pair(lane, qf, kc, ld, n, 3, h0);
    kq_pair(lane, qf, kc, ld, n, 7, h1);
    for (int q = 0; q < ATTN_TILE; q++) res[q] = _mm512_add_ps(s02[q], _mm512_add_ps(q1[q], _mm512_add_ps(h1[q], h0[q])));
}

/* kq_f16_avx512 in tinyBLAS order (hd % 16 == 0) for ATTN_TILE queries
 * (qf already rounded to f16) over the 16-position blocks [c_lo, c_hi)
 * (c_lo a multiple of 16): sc[q][j] = qf[q] . key_j for every j of those
 * blocks, lanes outside a query's own range included (callers ignore
 * them), the lanes summed by kq_tree16. */
AVX512_FN static void kq_f16_tb_tile(const float *const qf[ATTN_TILE], const uint16_t *kt, size_t ld, int hd, int c_lo,
                                     int c_hi, float *const sc[ATTN_TILE]) {
    for (int c0 = c_lo; c0 < c_hi; c0 += 16) {
        __m512 res[ATTN_TILE];
        kq_tree16(kq_tb_lane, qf, kt + c0, ld, hd, res);
        for (int q = 0; q < ATTN_TILE; q++) _mm512_storeu_ps(sc[q] + c0, res[q]);
    }
}

/* _mm512_reduce_add_ps of 16 vectors at once, adding the same pairs in the
 * same order (lanes i and i + 8, then i and i + 4, i and i + 2, i and
 * i + 1), so each sum has the bits of the one-vector reduction. Lane
 * 4j + m of the result is the sum of v[4m + j]. */
AVX512_FN static inline __m512 reduce_add_16x16(const __m512 v[16]) {
    __m512 s[8], r[4], w[2];
    for (int k = 0; k < 8; k++) /* lanes i < 8 of v[2k] and v[2k + 1]: x[i] + x[i + 8] */
        s[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; k++) /* quarter j: v[4k + j]'s i + (i + 4) */
        r[k] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(s[2 * k], s[2 * k + 1], 0xDD));
    for (int k = 0; k < 2; k++) /* 128-bit lane j: (0+2, 1+3) of v[8k + j], then of v[8k + 4 + j] */
        w[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(r[2 * k]), _mm512_castps_pd(r[2 * k + 1]))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(r[2 * k]), _mm512_castps_pd(r[2 * k + 1]))));
    return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* pv_f16_avx512 in tinyBLAS order (hd % 4 == 0) for ATTN_TILE queries that
 * share V (vt, rows ld apart, from the same first position): out[q][c] =
 * V[c][0..n[q]) . p[q][0..n[q]). Four channels times ATTN_TILE queries are
 * accumulated at once, so each V vector is widened once for all queries;
 * the blocks past the shortest query's n are added query by query with
 * the same masks as the single-query kernel. */
AVX512_FN static void pv_f16_tb_tile(const uint16_t *vt, size_t ld, int hd, const float *const p[ATTN_TILE],
                                     const int n[ATTN_TILE], float *const out[ATTN_TILE]) {
    int n_min = n[0];
    for (int q = 1; q < ATTN_TILE; q++) n_min = n[q] < n_min ? n[q] : n_min;
    const int n_full = n_min & ~15;
    for (int c = 0; c < hd; c += 4) {
        const uint16_t *v0 = vt + (size_t)c * ld, *v1 = v0 + ld, *v2 = v1 + ld, *v3 = v2 + ld;
        __m512 a0[ATTN_TILE], a1[ATTN_TILE], a2[ATTN_TILE], a3[ATTN_TILE];
        for (int q = 0; q < ATTN_TILE; q++) a0[q] = a1[q] = a2[q] = a3[q] = _mm512_setzero_ps();
        for (int i = 0; i < n_full; i += 16) {
            const __m512 x0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v0 + i)));
            const __m512 x1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v1 + i)));
            const __m512 x2 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v2 + i)));
            const __m512 x3 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v3 + i)));
            for (int q = 0; q < ATTN_TILE; q++) {
                const __m512 pv = _mm512_loadu_ps(p[q] + i);
                a0[q] = _mm512_fmadd_ps(x0, pv, a0[q]);
                a1[q] = _mm512_fmadd_ps(x1, pv, a1[q]);
                a2[q] = _mm512_fmadd_ps(x2, pv, a2[q]);
                a3[q] = _mm512_fmadd_ps(x3, pv, a3[q]);
            }
        }
        for (int q = 0; q < ATTN_TILE; q++) {
            for (int i = n_full; i < n[q]; i += 16) {
                const __mmask16 k = mask_first(n[q] - i);
                const __m512 pv = _mm512_maskz_loadu_ps(k, p[q] + i);
                a0[q] = _mm512_fmadd_ps(load_h16(v0 + i, k), pv, a0[q]);
                a1[q] = _mm512_fmadd_ps(load_h16(v1 + i, k), pv, a1[q]);
                a2[q] = _mm512_fmadd_ps(load_h16(v2 + i, k), pv, a2[q]);
                a3[q] = _mm512_fmadd_ps(load_h16(v3 + i, k), pv, a3[q]);
            }
        }
        /* v[4 * channel + q]: lanes 4q..4q+3 of the sums are out[q][c..c+3] */
        _Static_assert(ATTN_TILE == 4, "one 16-vector reduction per 4 channels x 4 queries");
        const __m512 v[16] = {a0[0], a0[1], a0[2], a0[3], a1[0], a1[1], a1[2], a1[3],
                              a2[0], a2[1], a2[2], a2[3], a3[0], a3[1], a3[2], a3[3]};
        const __m512 sums = reduce_add_16x16(v);
        _mm_storeu_ps(out[0] + c, _mm512_castps512_ps128(sums));
        _mm_storeu_ps(out[1] + c, _mm512_extractf32x4_ps(sums, 1));
        _mm_storeu_ps(out[2] + c, _mm512_extractf32x4_ps(sums, 2));
        _mm_storeu_ps(out[3] + c, _mm512_extractf32x4_ps(sums, 3));
    }
}

/* Lane t of ggml_vec_dot_f16's order for 16 positions and ATTN_TILE
 * queries (the SIMD part, c < np = hd & ~63): four chains over c = t + 64m,
 * t + 16 + 64m, t + 32 + 64m, t + 48 + 64m, combined as (0+2) + (1+3). */
AVX512_FN static inline void kq_vd_lane(const float *const qf[ATTN_TILE], const uint16_t *kc, size_t ld, int np, int t,
                                        __m512 r[ATTN_TILE]) {
    __m512 a0[ATTN_TILE], a1[ATTN_TILE], a2[ATTN_TILE], a3[ATTN_TILE];
    for (int q = 0; q < ATTN_TILE; q++) a0[q] = a1[q] = a2[q] = a3[q] = _mm512_setzero_ps();
    for (int m = 0; m < np; m += 64) {
        const int c = m + t;
        const __m512 k0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kc + (size_t)c * ld)));
        const __m512 k1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kc + (size_t)(c + 16) * ld)));
        const __m512 k2 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kc + (size_t)(c + 32) * ld)));
        const __m512 k3 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kc + (size_t)(c + 48) * ld)));
        for (int q = 0; q < ATTN_TILE; q++) {
            a0[q] = _mm512_fmadd_ps(_mm512_set1_ps(qf[q][c]), k0, a0[q]);
            a1[q] = _mm512_fmadd_ps(_mm512_set1_ps(qf[q][c + 16]), k1, a1[q]);
            a2[q] = _mm512_fmadd_ps(_mm512_set1_ps(qf[q][c + 32]), k2, a2[q]);
            a3[q] = _mm512_fmadd_ps(_mm512_set1_ps(qf[q][c + 48]), k3, a3[q]);
        }
    }
    for (int q = 0; q < ATTN_TILE; q++) r[q] = _mm512_add_ps(_mm512_add_ps(a0[q], a2[q]), _mm512_add_ps(a1[q], a3[q]));
}

/* kq_f16_avx512 in vec_dot order for ATTN_TILE queries, as kq_f16_tb_tile:
 * the SIMD part summed lane by lane in reduce16's tree order, then the
 * channels from np on added one by one in double. */
AVX512_FN static void kq_f16_vd_tile(const float *const qf[ATTN_TILE], const uint16_t *kt, size_t ld, int hd, int c_lo,
                                     int c_hi, float *const sc[ATTN_TILE]) {
    const int np = hd & ~63;
    for (int c0 = c_lo; c0 < c_hi; c0 += 16) {
        const uint16_t *kc = kt + c0;
        __m512 res[ATTN_TILE];
        if (np > 0) {
            kq_tree16(kq_vd_lane, qf, kc, ld, np, res);
        } else {
            for (int q = 0; q < ATTN_TILE; q++) res[q] = _mm512_setzero_ps();
        }
        if (np < hd) { /* the rest, one by one in double */
            for (int q = 0; q < ATTN_TILE; q++) {
                __m512d r0 = _mm512_cvtps_pd(_mm512_castps512_ps256(res[q]));
                __m512d r1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(res[q], 1));
                for (int c = np; c < hd; c++) {
                    const __m512 k = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kc + (size_t)c * ld)));
                    const __m512 p = _mm512_mul_ps(_mm512_set1_ps(qf[q][c]), k);
                    r0 = _mm512_add_pd(r0, _mm512_cvtps_pd(_mm512_castps512_ps256(p)));
                    r1 = _mm512_add_pd(r1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(p, 1)));
                }
                res[q] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(r0)), _mm512_cvtpd_ps(r1), 1);
            }
        }
        for (int q = 0; q < ATTN_TILE; q++) _mm512_storeu_ps(sc[q] + c0, res[q]);
    }
}

/* The double tail of pv_f16_vd_tile for channels c0..c0+nc-1 (nc <= 4):
 * out[q][c0 + g] = (float)(sums[g][q] + terms np..n-1 in order), each term
 * the float product V[c][j] * p[q][j] widened to double. */
AVX512_FN static void pv_vd_tail_tile(const uint16_t *vt, size_t ld, int c0, int nc, const float *const p[ATTN_TILE],
                                      int np, int n, float sums[4][ATTN_TILE], float *const out[ATTN_TILE]) {
    _Static_assert(ATTN_TILE == 4, "the tail keeps one query per double lane of a ymm register");
    __m256d acc[4];
    for (int g = 0; g < 4; g++) acc[g] = _mm256_cvtps_pd(_mm_loadu_ps(sums[g]));
    const uint16_t *v[4];
    for (int g = 0; g < 4; g++) v[g] = vt + (size_t)(c0 + (g < nc ? g : 0)) * ld;
    for (int j = np; j < n; j++) {
        const __m128 pj = _mm_setr_ps(p[0][j], p[1][j], p[2][j], p[3][j]);
        for (int g = 0; g < 4; g++)
            acc[g] = _mm256_add_pd(acc[g], _mm256_cvtps_pd(_mm_mul_ps(_mm_set1_ps(_cvtsh_ss(v[g][j])), pj)));
    }
    for (int g = 0; g < nc; g++) {
        float r[4];
        _mm_storeu_ps(r, _mm256_cvtpd_ps(acc[g]));
        for (int q = 0; q < ATTN_TILE; q++) out[q][c0 + g] = r[q];
    }
}

/* pv_f16_avx512 in vec_dot order for ATTN_TILE queries of one row (same n
 * and n_split): each V vector is widened once for all of them. The
 * positions from np on are added one by one in double, as ggml does; that
 * serial chain is run for the ATTN_TILE queries side by side (one double
 * lane each) and for four channels at once, so it is no longer bound by the
 * latency of one addition per term. */
AVX512_FN static void pv_f16_vd_tile(const uint16_t *vt, size_t ld, int hd, const float *const p[ATTN_TILE], int n,
                                     int n_split, float *const out[ATTN_TILE]) {
    const int np = n_split & ~63, nm = n < np ? n : np;
    float sums[4][ATTN_TILE]; /* the SIMD part of channels c0..c0+3 */
    for (int c = 0; c < hd; c++) {
        const uint16_t *v = vt + (size_t)c * ld;
        __m512 a0[ATTN_TILE], a1[ATTN_TILE], a2[ATTN_TILE], a3[ATTN_TILE];
        for (int q = 0; q < ATTN_TILE; q++) a0[q] = a1[q] = a2[q] = a3[q] = _mm512_setzero_ps();
        int i = 0;
        for (; i + 64 <= nm; i += 64) {
            const __m512 x0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + i)));
            const __m512 x1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + i + 16)));
            const __m512 x2 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + i + 32)));
            const __m512 x3 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + i + 48)));
            for (int q = 0; q < ATTN_TILE; q++) {
                a0[q] = _mm512_fmadd_ps(x0, _mm512_loadu_ps(p[q] + i), a0[q]);
                a1[q] = _mm512_fmadd_ps(x1, _mm512_loadu_ps(p[q] + i + 16), a1[q]);
                a2[q] = _mm512_fmadd_ps(x2, _mm512_loadu_ps(p[q] + i + 32), a2[q]);
                a3[q] = _mm512_fmadd_ps(x3, _mm512_loadu_ps(p[q] + i + 48), a3[q]);
            }
        }
        /* the last partial group of 64: blocks j = 0..3 of it go to a_j, masked */
#define PV_VD_TAIL(j, aj)                                                                           \
        if (i + 16 * (j) < nm) {                                                                    \
            const __mmask16 k = mask_first(nm - i - 16 * (j));                                      \
            const __m512 x = load_h16(v + i + 16 * (j), k);                                         \
            for (int q = 0; q < ATTN_TILE; q++)                                                     \
                aj[q] = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(k, p[q] + i + 16 * (j)), aj[q]); \
        }
        PV_VD_TAIL(0, a0)
        PV_VD_TAIL(1, a1)
        PV_VD_TAIL(2, a2)
        PV_VD_TAIL(3, a3)
#undef PV_VD_TAIL
        for (int q = 0; q < ATTN_TILE; q++)
            sums[c & 3][q] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0[q], a2[q]), _mm512_add_ps(a1[q], a3[q])));
        if ((c & 3) == 3 || c == hd - 1) pv_vd_tail_tile(vt, ld, c & ~3, c - (c & ~3) + 1, p, np, n, sums, out);
    }
}

typedef struct attn_kernels {
    void (*kq_f16)(const float *q, const uint16_t *kt, size_t ld, int hd, int lo, int n, bool tb, float *scores);
    void (*kq_f32)(const float *q, const float *kt, size_t ld, int hd, int lo, int n, float *scores);
    void (*softmax)(float *sc, int lo, int n, float scale, float *p, bool round16, int from);
    void (*pv_f16)(const uint16_t *vt, size_t ld, int hd, const float *p, int n, bool tb, int n_split, float *out);
    void (*pv_f32)(const float *vt, size_t ld, int hd, const float *p, int n, bool tb, int n_split, float *out);
    void (*silu_mul)(float *g, const float *u, int n);
    void (*rope)(float *x, int32_t n_heads, int32_t head_dim, int32_t n_rot, const float *cs);
} attn_kernels_t;

static const attn_kernels_t kernels_ref = {
    kq_f16_ref, kq_f32_ref, softmax_ref, pv_f16_ref, pv_f32_ref, silu_mul_ref, rope_ref,
};

static const attn_kernels_t kernels_avx512 = {
    kq_f16_avx512, kq_f32_avx512, softmax_avx512, pv_f16_avx512, pv_f32_avx512, silu_mul_avx512, rope_avx512,
};

static const attn_kernels_t *kernels_best(void) {
    if (vlm_isa_best() >= VLM_ISA_AVX512 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma"))
        return &kernels_avx512;
    return &kernels_ref;
}

/* ==== Decoder ========================================================== */

/* One thread's attention scratch; stride = n_ctx + 16 rounded up to 16.
 * A single query uses slot 0 of scores and probs. */
typedef struct attn_scratch {
    float *scores;            /* [ATTN_TILE + 1][stride] K.Q, then exp values (the last slot takes padding) */
    float *probs;             /* [ATTN_TILE][stride] probabilities (values of f16s with an F16 cache) */
    float *qf;                /* [ATTN_TILE][head_dim] queries rounded to f16 */
    float *pad_out;           /* [head_dim] output of padding queries */
} attn_scratch_t;

/* One attention work item: nq queries of one KV head and one sequence,
 * taken in (row, head) order from (row, head): after the last query head
 * of the KV group comes the first one of the next row. nq > 1 only for
 * queries the tiled kernels can run (see build_attn_items). */
typedef struct attn_item {
    int32_t row;
    int32_t head;
    int32_t nq;
} attn_item_t;

struct vlm_decoder {
    const vlm_llama_t *m;
    vlm_kv_cache_t *kv;
    vlm_pool_t *pool;
    int32_t n_batch_max;
    int n_threads;
    const attn_kernels_t *kern;
    vlm_decoder_trace_fn trace;
    void *trace_user;

    /* Row buffers, n_batch_max rows each. */
    float *x;                 /* [n_batch_max][n_embd] residual stream */
    float *xn;                /* [n_batch_max][n_embd] normalised input of a sub-layer */
    float *q;                 /* [n_batch_max][n_head * head_dim] queries */
    float *k;                 /* [n_batch_max][n_head_kv * head_dim] keys */
    float *v;                 /* [n_batch_max][n_head_kv * head_dim] values */
    float *attn;              /* [n_batch_max][n_head * head_dim] attention output, heads concatenated: the
                               * q buffer itself (each query's output replaces it once it has been read) */
    float *proj;              /* [n_batch_max][n_embd] output of attn_output / ffn_down */
    float *gate;              /* [n_batch_max][n_ff] */
    float *up;                /* [n_batch_max][n_ff] */
    float *rope;              /* [n_batch_max][n_rot] (cos, sin) per rotated pair */
    int32_t *out_idx;         /* [n_batch_max] logits index of each active row in the last layer */

    /* Per sequence. */
    int32_t *seq_next;        /* [n_seq] validation: next expected position, -1 = not seen */
    int32_t *seq_rows;        /* [n_seq] rows of the sequence in the current chunk */
    int32_t *seq_n_kv;        /* [n_seq] llama.cpp's n_kv for it: last position + 1, rounded up to 32 */

    attn_scratch_t *scratch;  /* [n_threads] */
    size_t scratch_stride;    /* floats per scores / probs slot */
    attn_item_t *items;       /* [n_batch_max * n_head] attention work of the current chunk */
    int32_t n_items;

    /* The chunk being run (set by forward_chunk, read by the attention workers). */
    const int32_t *row_pos;   /* [n rows] */
    const int32_t *row_seq;   /* [n rows] */
    int32_t layer;
    int32_t n_act;
    atomic_int next_item;

    /* The row section being run (rows_worker). */
    int sec_op;               /* rows_op_t */
    int32_t sec_n;            /* rows */
    const float *sec_w;       /* [n_embd] norm weights */
};

/* Test hook (declared in llama_impl.h): use the scalar reference kernels. */
void vlm__decoder_use_reference_kernels(vlm_decoder_t *d, bool on) { d->kern = on ? &kernels_ref : kernels_best(); }

const char *vlm__decoder_kernels_name(const vlm_decoder_t *d) { return d->kern == &kernels_avx512 ? "avx512" : "scalar"; }

int vlm_decoder_new(const vlm_llama_t *m, vlm_kv_cache_t *kv, vlm_pool_t *pool, int32_t n_batch_max,
                    vlm_decoder_t **out, vlm_error_t *err) {
    VLM_ASSERT(m != NULL && kv != NULL && out != NULL);
    *out = NULL;
    const vlm_llama_hparams_t *hp = &m->hp;
    if (n_batch_max < 1 || n_batch_max > (1 << 16))
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "decoder: n_batch_max %d is outside [1, 65536]", (int)n_batch_max);
    if (kv->n_layer != hp->n_layer || kv->kv_dim != hp->n_head_kv * hp->head_dim || !kv->k)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "decoder: the KV cache was not made for this model");
    pthread_once(&f16_lut_once, f16_lut_init);

    vlm_decoder_t *d = calloc(1, sizeof *d);
    if (!d) return vlm_error_set(err, VLM_ERR_NOMEM, "decoder: out of memory");
    d->m = m;
    d->kv = kv;
    d->pool = pool;
    d->n_batch_max = n_batch_max;
    d->n_threads = vlm_pool_size(pool);
    d->kern = kernels_best();

    const size_t nb = (size_t)n_batch_max, n_embd = (size_t)hp->n_embd;
    const size_t n_q = (size_t)hp->n_head * (size_t)hp->head_dim, n_kv = (size_t)kv->kv_dim;
    d->x = malloc(nb * n_embd * sizeof(float));
    d->xn = malloc(nb * n_embd * sizeof(float));
    d->q = malloc(nb * n_q * sizeof(float));
    d->k = malloc(nb * n_kv * sizeof(float));
    d->v = malloc(nb * n_kv * sizeof(float));
    d->attn = d->q;
    d->proj = malloc(nb * n_embd * sizeof(float));
    d->gate = malloc(nb * (size_t)hp->n_ff * sizeof(float));
    d->up = malloc(nb * (size_t)hp->n_ff * sizeof(float));
    d->rope = malloc(nb * (size_t)hp->n_rot * sizeof(float));
    d->out_idx = malloc(nb * sizeof(int32_t));
    d->seq_next = malloc((size_t)kv->n_seq * sizeof(int32_t));
    d->seq_rows = malloc((size_t)kv->n_seq * sizeof(int32_t));
    d->seq_n_kv = malloc((size_t)kv->n_seq * sizeof(int32_t));
    d->scratch = calloc((size_t)d->n_threads, sizeof *d->scratch);
    d->items = malloc(nb * (size_t)hp->n_head * sizeof *d->items);
    if (!d->x || !d->xn || !d->q || !d->k || !d->v || !d->attn || !d->proj || !d->gate || !d->up ||
        !d->rope || !d->out_idx || !d->seq_next || !d->seq_rows || !d->seq_n_kv || !d->scratch ||
        !d->items)
        goto fail_nomem;
    d->scratch_stride = ((size_t)kv->n_ctx + 16 + 15) & ~(size_t)15;
    for (int t = 0; t < d->n_threads; t++) {
        attn_scratch_t *sc = &d->scratch[t];
        sc->scores = malloc((ATTN_TILE + 1) * d->scratch_stride * sizeof(float));
        sc->probs = malloc(ATTN_TILE * d->scratch_stride * sizeof(float));
        sc->qf = malloc(ATTN_TILE * (size_t)hp->head_dim * sizeof(float));
        sc->pad_out = malloc((size_t)hp->head_dim * sizeof(float));
        if (!sc->scores || !sc->probs || !sc->qf || !sc->pad_out) goto fail_nomem;
    }
    *out = d;
    return VLM_OK;

fail_nomem:
    vlm_decoder_destroy(&d);
    return vlm_error_set(err, VLM_ERR_NOMEM, "decoder: out of memory for %d batch rows", (int)n_batch_max);
}

void vlm_decoder_destroy(vlm_decoder_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_decoder_t *d = *self_p;
    if (d->scratch) {
        for (int t = 0; t < d->n_threads; t++) {
            free(d->scratch[t].scores);
            free(d->scratch[t].probs);
            free(d->scratch[t].qf);
            free(d->scratch[t].pad_out);
        }
    }
    free(d->scratch);
    free(d->items);
    free(d->seq_n_kv);
    free(d->seq_rows);
    free(d->seq_next);
    free(d->out_idx);
    free(d->rope);
    free(d->up);
    free(d->gate);
    free(d->proj);
    free(d->v);
    free(d->k);
    free(d->q);
    free(d->xn);
    free(d->x);
    free(d);
    *self_p = NULL;
}

void vlm_decoder_set_trace(vlm_decoder_t *d, vlm_decoder_trace_fn fn, void *user) {
    d->trace = fn;
    d->trace_user = user;
}

/* ---- forward helpers --------------------------------------------------- */

/* y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for rows [r0, r1) of width
 * n_embd. Each row's sum of squares is one serial chain of double
 * additions (ggml's order), so four rows are summed side by side to keep
 * more than one addition in flight. */
static void rms_norm_rows(const float *x, int32_t r0, int32_t r1, int32_t n_embd, const float *w, float eps, float *y) {
    for (int32_t r = r0; r < r1; r += 4) {
        const int32_t nr = r1 - r < 4 ? r1 - r : 4;
        const float *xr[4];
        for (int32_t k = 0; k < 4; k++) xr[k] = x + (size_t)(r + (k < nr ? k : 0)) * n_embd;
        double sum[4] = {0.0, 0.0, 0.0, 0.0};
        for (int32_t i = 0; i < n_embd; i++) {
            sum[0] += (double)(xr[0][i] * xr[0][i]);
            sum[1] += (double)(xr[1][i] * xr[1][i]);
            sum[2] += (double)(xr[2][i] * xr[2][i]);
            sum[3] += (double)(xr[3][i] * xr[3][i]);
        }
        for (int32_t k = 0; k < nr; k++) {
            const float mean = (float)(sum[k] / n_embd);
            const float scale = 1.0f / sqrtf(mean + eps);
            float *yr = y + (size_t)(r + k) * n_embd;
            for (int32_t i = 0; i < n_embd; i++) yr[i] = (xr[k][i] * scale) * w[i];
        }
    }
}

/* cs[2i], cs[2i+1] = cos, sin of pair i's angle at position pos. */
static void rope_table(const vlm_llama_t *m, int32_t pos, float *cs) {
    const vlm_llama_hparams_t *hp = &m->hp;
    const float theta_scale = powf(hp->rope_freq_base, -2.0f / (float)hp->n_rot);
    float theta = (float)pos;
    for (int32_t i = 0; i < hp->n_rot; i += 2) {
        const float ff = m->rope_freqs ? m->rope_freqs[i / 2] : 1.0f;
        const float angle = hp->rope_freq_scale * (theta / ff);
        cs[i] = cosf(angle);
        cs[i + 1] = sinf(angle);
        theta *= theta_scale;
    }
}

/* Writes channels [c0, c1) of the K and V rows of chunk rows [0, n) of
 * layer l into the cache (k, v: [n][kv_dim]). Channel-major, so a thread
 * writes runs of consecutive positions of its own channels. */
static void kv_store(vlm_kv_cache_t *kv, int32_t l, const int32_t *row_seq, const int32_t *row_pos, int32_t n,
                     const float *k, const float *v, size_t c0, size_t c1) {
    const size_t kv_dim = (size_t)kv->kv_dim, ld = kv->ld;
    for (size_t c = c0; c < c1; c++) {
        for (int32_t r = 0; r < n; r++) {
            const size_t slot = (size_t)l * kv->n_seq + (size_t)row_seq[r];
            const size_t off = (slot * kv_dim + c) * ld + (size_t)row_pos[r];
            const size_t src = (size_t)r * kv_dim + c;
            if (kv->type == VLM_DTYPE_F16) {
                ((uint16_t *)kv->k)[off] = vlm_fp32_to_fp16(k[src]);
                ((uint16_t *)kv->v)[off] = vlm_fp32_to_fp16(v[src]);
            } else {
                ((float *)kv->k)[off] = k[src];
                ((float *)kv->v)[off] = v[src];
            }
        }
    }
}

/* Attention of chunk row i, head h in layer d->layer: softmax(K.q * scale)
 * over the row's visible positions, times V, into d->attn. */
static void attend(vlm_decoder_t *d, int32_t i, int32_t h, attn_scratch_t *s) {
    const vlm_llama_hparams_t *hp = &d->m->hp;
    const vlm_kv_cache_t *kv = d->kv;
    const attn_kernels_t *kn = d->kern;
    const int32_t seq = d->row_seq[i], pos = d->row_pos[i], hd = hp->head_dim;
    const int32_t g = h / (hp->n_head / hp->n_head_kv); /* the KV head of query head h (GQA) */
    const int32_t n = pos + 1;                          /* positions 0..pos are causal */
    const int32_t lo = hp->sliding_window > 0 && n > hp->sliding_window ? n - hp->sliding_window : 0;
    const int32_t from = lo & ~63;                      /* V.P starts at a 64-aligned position: same sums */
    const bool multi = d->seq_rows[seq] >= 2;           /* ggml: tinyBLAS for >= 2 rows, else vec_dot */
    const bool kq_tb = multi && hd % 16 == 0, pv_tb = multi && hd % 4 == 0;
    const int32_t n_kv = d->seq_n_kv[seq];
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t slot = (size_t)d->layer * kv->n_seq + (size_t)seq, ld = kv->ld;
    const size_t kv_dim = (size_t)kv->kv_dim;
    const float *q = d->q + (size_t)i * hp->n_head * hd + (size_t)h * hd;
    float *out = d->attn + (size_t)i * hp->n_head * hd + (size_t)h * hd;

    if (kv->type == VLM_DTYPE_F16) {
        /* scores[j] = K[j] . f16(q) */
        const uint16_t *kt = (const uint16_t *)kv->k + (slot * kv_dim + (size_t)g * hd) * ld;
        kn->kq_f16(q, kt, ld, hd, lo, n, kq_tb, s->scores);
        /* probabilities, rounded to f16 */
        kn->softmax(s->scores, lo, n, scale, s->probs, true, from);
        /* out[c] = V[c][from..n) . p[from..n) */
        const uint16_t *vt = (const uint16_t *)kv->v + (slot * kv_dim + (size_t)g * hd) * ld + from;
        kn->pv_f16(vt, ld, hd, s->probs + from, n - from, pv_tb, n_kv - from, out);
    } else {
        /* F32 cache: nothing rounded to f16. */
        const float *kt = (const float *)kv->k + (slot * kv_dim + (size_t)g * hd) * ld;
        kn->kq_f32(q, kt, ld, hd, lo, n, s->scores);
        kn->softmax(s->scores, lo, n, scale, s->probs, false, from);
        const float *vt = (const float *)kv->v + (slot * kv_dim + (size_t)g * hd) * ld + from;
        kn->pv_f32(vt, ld, hd, s->probs + from, n - from, pv_tb, n_kv - from, out);
    }
}

/* The first position whose V.P terms are summed for a row at position
 * pos: attend()'s `from`. */
static int32_t attn_from(const vlm_llama_hparams_t *hp, int32_t pos) {
    const int32_t n = pos + 1;
    const int32_t lo = hp->sliding_window > 0 && n > hp->sliding_window ? n - hp->sliding_window : 0;
    return lo & ~63;
}

/* Whether chunk row i's queries can go through the tiled kernels: the
 * AVX-512 kernels, an F16 cache, and either tinyBLAS order for both
 * products (the sequence has >= 2 rows in the chunk and head_dim % 16 ==
 * 0) or vec_dot order for both (a single row, whose tile is made of the
 * query heads of one KV head). */
static bool attn_tileable(const vlm_decoder_t *d, int32_t i) {
    const vlm_llama_hparams_t *hp = &d->m->hp;
    if (d->kern != &kernels_avx512 || d->kv->type != VLM_DTYPE_F16) return false;
    return d->seq_rows[d->row_seq[i]] >= 2 ? hp->head_dim % 16 == 0 : hp->n_head > hp->n_head_kv;
}

/* Splits the attention of chunk rows [0, n) into work items: for each KV
 * head, its queries in (row, head) order, up to ATTN_TILE per item as long
 * as they are tileable, of one sequence and share `from`. */
static void build_attn_items(vlm_decoder_t *d, int32_t n) {
    const vlm_llama_hparams_t *hp = &d->m->hp;
    const int32_t gs = hp->n_head / hp->n_head_kv;
    int32_t n_items = 0;
    for (int32_t g = 0; g < hp->n_head_kv; g++) {
        attn_item_t *cur = NULL; /* the open item, which may still grow */
        int32_t cur_seq = -1, cur_from = -1;
        for (int32_t i = 0; i < n; i++) {
            const bool tile = attn_tileable(d, i);
            const int32_t seq = d->row_seq[i], from = attn_from(hp, d->row_pos[i]);
            for (int32_t h = g * gs; h < (g + 1) * gs; h++) {
                if (cur && tile && seq == cur_seq && from == cur_from && cur->nq < ATTN_TILE) {
                    cur->nq++;
                    continue;
                }
                attn_item_t *it = &d->items[n_items++];
                *it = (attn_item_t){.row = i, .head = h, .nq = 1};
                cur = tile ? it : NULL;
                cur_seq = seq;
                cur_from = from;
            }
        }
    }
    d->n_items = n_items;
}

/* attend() for the nq > 1 queries of item it (all tileable): the K and V
 * head is read once for ATTN_TILE queries; missing queries are padded with
 * copies of the first whose results go to scratch. A sequence with one row
 * in the chunk (vec_dot order) has all its queries in that row. */
static void attend_tile(vlm_decoder_t *d, const attn_item_t *it, attn_scratch_t *s) {
    const vlm_llama_hparams_t *hp = &d->m->hp;
    const vlm_kv_cache_t *kv = d->kv;
    const int32_t hd = hp->head_dim, gs = hp->n_head / hp->n_head_kv, g = it->head / gs;
    const int32_t seq = d->row_seq[it->row];
    const int32_t from = attn_from(hp, d->row_pos[it->row]);
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t slot = (size_t)d->layer * kv->n_seq + (size_t)seq, ld = kv->ld, stride = d->scratch_stride;
    const uint16_t *kt = (const uint16_t *)kv->k + (slot * (size_t)kv->kv_dim + (size_t)g * hd) * ld;
    const uint16_t *vt = (const uint16_t *)kv->v + (slot * (size_t)kv->kv_dim + (size_t)g * hd) * ld + from;

    const float *qf[ATTN_TILE], *p[ATTN_TILE];
    float *sc[ATTN_TILE], *out[ATTN_TILE];
    int32_t lo[ATTN_TILE], n[ATTN_TILE];
    int n_rel[ATTN_TILE];
    int32_t c_lo = INT32_MAX, c_hi = 0, r = it->row, h = it->head;
    for (int q = 0; q < ATTN_TILE; q++) {
        if (q >= it->nq) { /* padding */
            qf[q] = qf[0];
            sc[q] = s->scores + ATTN_TILE * stride;
            p[q] = p[0];
            n_rel[q] = n_rel[0];
            out[q] = s->pad_out;
            continue;
        }
        n[q] = d->row_pos[r] + 1;
        lo[q] = hp->sliding_window > 0 && n[q] > hp->sliding_window ? n[q] - hp->sliding_window : 0;
        float *qq = s->qf + (size_t)q * hd;
        round_q_f16_avx512(d->q + ((size_t)r * hp->n_head + (size_t)h) * hd, hd, qq);
        qf[q] = qq;
        sc[q] = s->scores + (size_t)q * stride;
        p[q] = s->probs + (size_t)q * stride + from;
        n_rel[q] = n[q] - from;
        out[q] = d->attn + ((size_t)r * hp->n_head + (size_t)h) * hd;
        c_lo = lo[q] < c_lo ? lo[q] : c_lo;
        c_hi = n[q] > c_hi ? n[q] : c_hi;
        if (++h == (g + 1) * gs) {
            h = g * gs;
            r++;
        }
    }
    /* scores, softmax per query (probabilities rounded to f16), then V.P */
    const bool multi = d->seq_rows[seq] >= 2;
    if (multi) kq_f16_tb_tile(qf, kt, ld, hd, c_lo & ~15, c_hi, sc);
    else kq_f16_vd_tile(qf, kt, ld, hd, c_lo & ~15, c_hi, sc);
    for (int q = 0; q < it->nq; q++) d->kern->softmax(sc[q], lo[q], n[q], scale, s->probs + (size_t)q * stride, true, from);
    if (multi) pv_f16_tb_tile(vt, ld, hd, p, n_rel, out);
    else pv_f16_vd_tile(vt, ld, hd, p, n_rel[0], d->seq_n_kv[seq] - from, out);
}

/* Pool worker: takes work items until none are left. */
static void attend_worker(void *arg, int ith, int nth) {
    (void)nth;
    vlm_decoder_t *d = arg;
    for (;;) {
        const int item = atomic_fetch_add_explicit(&d->next_item, 1, memory_order_relaxed);
        if (item >= d->n_items) break;
        const attn_item_t *it = &d->items[item];
        if (it->nq > 1) attend_tile(d, it, &d->scratch[ith]);
        else attend(d, it->row, it->head, &d->scratch[ith]);
    }
}

static void trace(vlm_decoder_t *d, const char *name, int32_t layer, const float *data, int32_t rows, int32_t cols) {
    if (!d->trace) return;
    char full[64];
    if (layer >= 0) {
        snprintf(full, sizeof full, "%s-%d", name, (int)layer);
        name = full;
    }
    d->trace(d->trace_user, name, data, rows, cols);
}

/* ---- row-parallel sections --------------------------------------------- */

/* The element-wise steps between the matmuls, split across the pool. */
typedef enum rows_op {
    ROWS_NORM,         /* xn = norm(x) */
    ROWS_ADD_NORM,     /* x += proj, then xn = norm(x) */
    ROWS_ROPE,         /* RoPE on q and k */
    ROWS_KV_STORE,     /* k and v into the cache, split by channels */
    ROWS_SILU,         /* gate = silu(gate) * up */
} rows_op_t;

/* Fewer rows than this run on the calling thread: a fork-join would cost
 * more than it saves (a decode step has one row). */
enum { ROWS_PAR_MIN = 8 };

static void rows_worker(void *arg, int ith, int nth) {
    vlm_decoder_t *d = arg;
    const vlm_llama_hparams_t *hp = &d->m->hp;
    const int32_t n = d->sec_n, n_embd = hp->n_embd;
    long lo, hi;
    if (d->sec_op == ROWS_KV_STORE) {
        vlm_pool_range((long)d->kv->kv_dim, ith, nth, &lo, &hi);
        kv_store(d->kv, d->layer, d->row_seq, d->row_pos, n, d->k, d->v, (size_t)lo, (size_t)hi);
        return;
    }
    /* rows in groups of 4 (rms_norm_rows sums 4 rows side by side) */
    vlm_pool_range((long)(n + 3) / 4, ith, nth, &lo, &hi);
    const int32_t r0 = (int32_t)lo * 4, r1 = (int32_t)hi * 4 < n ? (int32_t)hi * 4 : n;
    if (r0 >= r1) return;
    switch (d->sec_op) {
    case ROWS_NORM:
        rms_norm_rows(d->x, r0, r1, n_embd, d->sec_w, hp->rms_eps, d->xn);
        break;
    case ROWS_ADD_NORM:
        for (size_t e = (size_t)r0 * n_embd; e < (size_t)r1 * n_embd; e++) d->x[e] = d->proj[e] + d->x[e];
        rms_norm_rows(d->x, r0, r1, n_embd, d->sec_w, hp->rms_eps, d->xn);
        break;
    case ROWS_ROPE: {
        const int32_t n_q = hp->n_head * hp->head_dim, kv_dim = d->kv->kv_dim;
        for (int32_t r = r0; r < r1; r++) {
            const float *cs = d->rope + (size_t)r * hp->n_rot;
            d->kern->rope(d->q + (size_t)r * n_q, hp->n_head, hp->head_dim, hp->n_rot, cs);
            d->kern->rope(d->k + (size_t)r * kv_dim, hp->n_head_kv, hp->head_dim, hp->n_rot, cs);
        }
        break;
    }
    case ROWS_SILU:
        for (int32_t r = r0; r < r1; r++)
            d->kern->silu_mul(d->gate + (size_t)r * hp->n_ff, d->up + (size_t)r * hp->n_ff, hp->n_ff);
        break;
    default:
        VLM_ASSERT(!"unknown row section");
    }
}

/* Runs row section op over n rows (w: the norm weights, if any). */
static void rows_run(vlm_decoder_t *d, rows_op_t op, int32_t n, const float *w) {
    if (n <= 0) return;
    d->sec_op = op;
    d->sec_n = n;
    d->sec_w = w;
    if (n < ROWS_PAR_MIN) rows_worker(d, 0, 1);
    else vlm_pool_run(d->pool, rows_worker, d);
}

/* ---- the forward pass ------------------------------------------------- */

/* The error of a failed matmul (its scratch could not be allocated):
 * which layer (-1: the output projection), which weights, how many rows. */
static int matmul_failed(vlm_error_t *err, int rc, int32_t layer, const char *what, int32_t n_rows) {
    const char *unit = n_rows == 1 ? "token" : "tokens";
    if (layer < 0) return vlm_error_set(err, rc, "out of memory in matmul (%s, %d %s)", what, (int)n_rows, unit);
    return vlm_error_set(err, rc, "out of memory in matmul (layer %d %s, %d %s)", (int)layer, what, (int)n_rows, unit);
}

/* Runs rows [c0, c0 + n) of batch b (already validated; n <= n_batch_max)
 * and writes the logits of the requested rows among them. Returns VLM_OK,
 * or VLM_ERR_NOMEM when a matmul cannot allocate its scratch: then part of
 * the chunk's K/V may have been stored past the sequences' lengths (cells
 * the next batch overwrites) and the logits are not to be used. It
 * allocates nothing itself, so there is nothing to free. */
static int forward_chunk(vlm_decoder_t *d, const vlm_batch_t *b, int32_t c0, int32_t n, float *logits,
                         vlm_error_t *err) {
    const vlm_llama_t *m = d->m;
    const vlm_llama_hparams_t *hp = &m->hp;
    vlm_kv_cache_t *kv = d->kv;
    const int32_t n_embd = hp->n_embd;
    d->row_pos = b->pos + c0;
    d->row_seq = b->seq + c0;

    /* Rows per sequence and llama.cpp's n_kv: they pick ggml's summation orders. */
    for (int32_t s = 0; s < kv->n_seq; s++) d->seq_rows[s] = 0;
    for (int32_t r = 0; r < n; r++) {
        const int32_t s = d->row_seq[r];
        d->seq_rows[s]++;
        d->seq_n_kv[s] = (d->row_pos[r] + 1 + 31) & ~31; /* rows are in position order: the last one wins */
    }

    /* Input: token embeddings, or embedding rows (an image) as they are. */
    for (int32_t r = 0; r < n; r++) {
        const int32_t tok = b->tokens ? b->tokens[c0 + r] : VLM_BATCH_EMBD_ROW;
        float *xr = d->x + (size_t)r * n_embd;
        if (tok == VLM_BATCH_EMBD_ROW)
            memcpy(xr, b->embd + (size_t)(c0 + r) * n_embd, (size_t)n_embd * sizeof(float));
        else
            vlm_llama_embed_token(m, tok, xr, NULL);
    }
    trace(d, "inp_embd", -1, d->x, n, n_embd);

    /* RoPE angles of each row's position, shared by all layers. */
    for (int32_t r = 0; r < n; r++) rope_table(m, d->row_pos[r], d->rope + (size_t)r * hp->n_rot);

    /* Attention work items, the same in every layer. */
    build_attn_items(d, n);

    /* The rows whose logits are wanted, in logits order. */
    int32_t n_out = 0;
    for (int32_t i = 0; i < b->n_logits; i++) {
        const int32_t r = b->logits_rows[i] - c0;
        if (r < 0 || r >= n) continue;
        d->out_idx[n_out++] = i;
    }

    int32_t n_act = n;
    /* Attention norm of layer 0 (later layers get theirs with the residual). */
    rows_run(d, ROWS_NORM, n_act, m->layers[0].attn_norm);
    trace(d, "attn_norm", 0, d->xn, n_act, n_embd);
    for (int32_t l = 0; l < hp->n_layer; l++) {
        const vlm__llama_layer_t *L = &m->layers[l];

        /* Q, K, V projections of every row, in one parallel section. */
        {
            const vlm_weight_t *const ws[3] = {&L->wq, &L->wk, &L->wv};
            float *const ys[3] = {d->q, d->k, d->v};
            const int rc = vlm_matmul_multi(d->pool, ws, 3, d->xn, n_act, ys);
            if (rc != VLM_OK) return matmul_failed(err, rc, l, "attn_q/attn_k/attn_v", n_act);
        }

        /* RoPE on Q and K, then K and V into the cache, before any row attends
         * (rows see earlier rows of the batch). */
        d->layer = l;
        rows_run(d, ROWS_ROPE, n_act, NULL);
        rows_run(d, ROWS_KV_STORE, n_act, NULL);

        /* In the last layer without logits rows nothing more is needed. */
        if (l == hp->n_layer - 1 && n_out == 0) return VLM_OK;

        /* Attention, work items across the pool. */
        d->n_act = n_act;
        atomic_store(&d->next_item, 0);
        vlm_pool_run(d->pool, attend_worker, d);

        /* Output projection of every row (llama.cpp selects rows only after it, and the
         * batch size can change a matmul's summation order). */
        int rc = vlm_matmul(d->pool, &L->wo, d->attn, n_act, d->proj);
        if (rc != VLM_OK) return matmul_failed(err, rc, l, "attn_output", n_act);

        /* Residual, ffn_inp = attn_output(attn) + x, and the FFN norm. The rows that go
         * on are all of them, or in the last layer the logits rows in logits order: those
         * are gathered through xn (free here: Q, K and V have been computed from it). */
        if (l == hp->n_layer - 1) {
            for (int32_t i = 0; i < n_out; i++) {
                const size_t r = (size_t)(b->logits_rows[d->out_idx[i]] - c0) * n_embd;
                float *yr = d->xn + (size_t)i * n_embd;
                for (int32_t c = 0; c < n_embd; c++) yr[c] = d->proj[r + c] + d->x[r + c];
            }
            n_act = n_out;
            memcpy(d->x, d->xn, (size_t)n_act * n_embd * sizeof(float));
            rows_run(d, ROWS_NORM, n_act, L->ffn_norm);
        } else {
            rows_run(d, ROWS_ADD_NORM, n_act, L->ffn_norm);
        }
        trace(d, "ffn_inp", l, d->x, n_act, n_embd);

        /* SwiGLU: down(silu(gate(x)) * up(x)). */
        {
            const vlm_weight_t *const ws[2] = {&L->ffn_gate, &L->ffn_up};
            float *const ys[2] = {d->gate, d->up};
            rc = vlm_matmul_multi(d->pool, ws, 2, d->xn, n_act, ys);
            if (rc != VLM_OK) return matmul_failed(err, rc, l, "ffn_gate/ffn_up", n_act);
        }
        rows_run(d, ROWS_SILU, n_act, NULL);
        rc = vlm_matmul(d->pool, &L->ffn_down, d->gate, n_act, d->proj);
        if (rc != VLM_OK) return matmul_failed(err, rc, l, "ffn_down", n_act);

        /* Residual, l_out = ffn_out + ffn_inp, and the next norm (the next layer's
         * attention norm, or the final norm). */
        const bool last = l == hp->n_layer - 1;
        rows_run(d, ROWS_ADD_NORM, n_act, last ? m->output_norm : m->layers[l + 1].attn_norm);
        trace(d, "l_out", l, d->x, n_act, n_embd);
        if (!last) trace(d, "attn_norm", l + 1, d->xn, n_act, n_embd);
    }
    trace(d, "result_norm", -1, d->xn, n_act, n_embd);

    /* Logits, one matmul per run of consecutive logits indexes (normally one). */
    for (int32_t i = 0; i < n_act;) {
        int32_t j = i + 1;
        while (j < n_act && d->out_idx[j] == d->out_idx[j - 1] + 1) j++;
        const int rc = vlm_matmul(d->pool, &m->output, d->xn + (size_t)i * n_embd, j - i,
                                  logits + (size_t)d->out_idx[i] * hp->n_vocab);
        if (rc != VLM_OK) return matmul_failed(err, rc, -1, "output", j - i);
        i = j;
    }
    return VLM_OK;
}

/* Checks the whole batch before anything runs, so errors leave the cache as it was. */
static int validate_batch(vlm_decoder_t *d, const vlm_batch_t *b, const float *logits, vlm_error_t *err) {
    const vlm_kv_cache_t *kv = d->kv;
    const vlm_llama_hparams_t *hp = &d->m->hp;
    if (b->n < 0) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "batch: %d rows", (int)b->n);
    if (b->n_logits < 0 || (b->n_logits > 0 && (!b->logits_rows || !logits)))
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "batch: %d logits rows without row indexes or an output buffer",
                             (int)b->n_logits);
    if (b->n == 0) {
        if (b->n_logits > 0) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "batch: logits wanted from an empty batch");
        return VLM_OK;
    }
    if (!b->pos || !b->seq) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "batch: positions and sequence ids are required");
    if (!b->tokens && !b->embd) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "batch: neither tokens nor embedding rows");
    for (int32_t s = 0; s < kv->n_seq; s++) d->seq_next[s] = -1;
    for (int32_t i = 0; i < b->n; i++) {
        const int32_t s = b->seq[i], p = b->pos[i];
        if (s < 0 || s >= kv->n_seq)
            return vlm_error_set(err, VLM_ERR_INVALID_ARG, "batch row %d: sequence id %d is outside [0, %d)", (int)i,
                                 (int)s, (int)kv->n_seq);
        if (p < 0) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "batch row %d: negative position %d", (int)i, (int)p);
        if (p >= kv->n_ctx)
            return vlm_error_set(err, VLM_ERR_CONTEXT_OVERFLOW,
                                 "batch row %d: position %d of sequence %d is past the context of %d positions",
                                 (int)i, (int)p, (int)s, (int)kv->n_ctx);
        if (b->tokens) {
            const int32_t t = b->tokens[i];
            if (t == VLM_BATCH_EMBD_ROW) {
                if (!b->embd)
                    return vlm_error_set(err, VLM_ERR_INVALID_ARG, "batch row %d: an embedding row but no embd array",
                                         (int)i);
            } else if (t < 0 || t >= hp->n_vocab) {
                return vlm_error_set(err, VLM_ERR_INVALID_ARG, "batch row %d: token id %d is outside the vocabulary [0, %d)",
                                     (int)i, (int)t, (int)hp->n_vocab);
            }
        }
        if (d->seq_next[s] < 0) {
            if (p > kv->seq_len[s])
                return vlm_error_set(err, VLM_ERR_INVALID_ARG,
                                     "batch row %d: sequence %d starts at position %d but holds only %d positions",
                                     (int)i, (int)s, (int)p, (int)kv->seq_len[s]);
        } else if (p != d->seq_next[s]) {
            return vlm_error_set(err, VLM_ERR_INVALID_ARG,
                                 "batch row %d: position %d of sequence %d does not follow position %d", (int)i, (int)p,
                                 (int)s, (int)d->seq_next[s] - 1);
        }
        d->seq_next[s] = p + 1;
    }
    for (int32_t i = 0; i < b->n_logits; i++)
        if (b->logits_rows[i] < 0 || b->logits_rows[i] >= b->n)
            return vlm_error_set(err, VLM_ERR_INVALID_ARG, "batch: logits row %d is outside [0, %d)",
                                 (int)b->logits_rows[i], (int)b->n);
    return VLM_OK;
}

int vlm_decoder_forward(vlm_decoder_t *d, const vlm_batch_t *b, float *logits, vlm_error_t *err) {
    VLM_ASSERT(d != NULL && b != NULL);
    int rc = validate_batch(d, b, logits, err);
    if (rc || b->n == 0) return rc;
    for (int32_t c0 = 0; c0 < b->n; c0 += d->n_batch_max) {
        const int32_t n = b->n - c0 < d->n_batch_max ? b->n - c0 : d->n_batch_max;
        rc = forward_chunk(d, b, c0, n, logits, err);
        if (rc != VLM_OK) {
            /* Out of memory in a matmul. A sequence keeps its length, unless
             * the batch started inside it: then the cells from its first row
             * on may be half rewritten, and only those before stay. */
            for (int32_t i = 0; i < b->n; i++) {
                int32_t *len = &d->kv->seq_len[b->seq[i]];
                if (b->pos[i] < *len) *len = b->pos[i];
            }
            return rc;
        }
    }
    /* Each sequence now ends after its last row (validate_batch left that in seq_next). */
    for (int32_t s = 0; s < d->kv->n_seq; s++)
        if (d->seq_next[s] >= 0) d->kv->seq_len[s] = d->seq_next[s];
    return VLM_OK;
}
