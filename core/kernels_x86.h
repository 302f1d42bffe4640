/* core/kernels_x86.h - the x86 SIMD kernels, written once and compiled twice.
 *
 * kernels_avx2.c includes this file with VLM_K_AVX512 = 0 (AVX2 + FMA +
 * F16C) and kernels_avx512.c with VLM_K_AVX512 = 1 (AVX-512 F/BW/VL/DQ +
 * VNNI). Everything here is static except the kernel table at the end, whose
 * name the includer chooses with VLM_K_TABLE, and the float GEMM named by
 * VLM_K_FGEMM. Four kinds of kernels:
 *
 * 1. Activation converters, bit-exact with ggml's x86 CPU backend (and with
 *    the scalar ones in quant.c, which tests check): Q8_0/Q8_1 as ggml's
 *    AVX2 quantize_row_q8_0/q8_1, Q8_K as quantize_row_q8_K_ref, F16 with
 *    F16C round-to-nearest-even.
 * 2. Dot kernels on ggml's own block layout (vlm_vec_dot_fn), 256 bits wide,
 *    with ggml's AVX2 vec_dot structure, so their results are bit-identical
 *    to llama.cpp's (the scalar reference differs by float rounding).
 * 3. Panel kernels (see kernels.h): NR rows of a repacked weight times up to
 *    TMAX tokens at once. The per-type panel layouts are written by
 *    panel_pack() in matmul.c; each kernel below restates the layout it
 *    reads. Two sets: ggml's summation order (bit-identical to llama.cpp,
 *    the default) and a faster one (see kernels.h).
 * 4. The GEMM for F32 / F16 / BF16 weights in llamafile tinyBLAS's
 *    summation order (fgemm_x86.h, entry point named VLM_K_FGEMM).
 *
 * The "dpbusd" step (4 u8 x s8 products summed into an int32 lane) is one
 * VNNI instruction on AVX-512 and maddubs + madd on AVX2; the latter
 * saturates at 2 * 255 * 127 > 32767, so on AVX2 unsigned weight operands
 * must stay <= 128 (all types but Q8_0, which uses the sign trick there).
 */
#ifndef VLM_K_AVX512
#error "define VLM_K_AVX512 before including kernels_x86.h"
#endif

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dtype.h"
#include "kernels.h"

#define K_INLINE static inline __attribute__((always_inline))

static inline int32_t ld32(const void *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* ==== 256-bit helpers ==================================================== */

K_INLINE __m256i dot4_256(__m256i acc, __m256i u, __m256i s) {
#if VLM_K_AVX512
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* Signed x signed bytes (|x| <= 128 fits the unsigned side after abs). */
K_INLINE __m256i dot4_256_ss(__m256i acc, __m256i x, __m256i y) {
    return dot4_256(acc, _mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
}

K_INLINE float hsum_f32_8(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

K_INLINE int32_t hsum_i32_8(__m256i v) {
    __m128i r = _mm_add_epi32(_mm256_extracti128_si256(v, 1), _mm256_castsi256_si128(v));
    r = _mm_add_epi32(r, _mm_unpackhi_epi64(r, r));
    r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0x55));
    return _mm_cvtsi128_si32(r);
}

/* 32 bytes: byte j = 0xFF when bit j of the 32-bit word is set, else 0. */
K_INLINE __m256i bits_to_bytes(uint32_t bits) {
    const __m256i spread = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101,
                                              0x0202020202020202, 0x0303030303030303);
    const __m256i sel = _mm256_set1_epi64x((int64_t)0x8040201008040201ull);
    const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int32_t)bits), spread);
    return _mm256_cmpeq_epi8(_mm256_and_si256(b, sel), sel);
}

/* 16 nibbles packed as ggml's Q4 "qs": element j in the low nibble of byte
 * j, element j + 16 in the high nibble. Returns the 32 values as bytes. */
K_INLINE __m256i unpack_nibbles_32(const uint8_t *qs) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qs);
    const __m128i m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

/* ==== Activation converters (ggml-exact) ================================= */

/* ggml's AVX2 quantize_row_q8_0/q8_1 block: amax over |x|, d = amax/127
 * (f16), id = 127/amax or 0, round half to even, cvtps (NaN/overflow give
 * INT_MIN), pack with signed saturation. Returns the int32 sum of the values
 * before packing (what Q8_1's s is computed from). */
K_INLINE int32_t q8_block_x86(const float *x, uint16_t *dh, int8_t *qs, float *d_out) {
    __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
    __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 ma = _mm256_andnot_ps(sign, v0);
    ma = _mm256_max_ps(ma, _mm256_andnot_ps(sign, v1));
    ma = _mm256_max_ps(ma, _mm256_andnot_ps(sign, v2));
    ma = _mm256_max_ps(ma, _mm256_andnot_ps(sign, v3));
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(ma, 1), _mm256_castps256_ps128(ma));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 127.f;
    *dh = (uint16_t)_cvtss_sh(d, 0);
    *d_out = d;
    const __m256 mul = _mm256_set1_ps(amax != 0.0f ? 127.f / amax : 0.0f);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const int32_t sum = hsum_i32_8(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
    i0 = _mm256_packs_epi32(i0, i1);
    i2 = _mm256_packs_epi32(i2, i3);
    i0 = _mm256_packs_epi16(i0, i2);
    i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)qs, i0);
    return sum;
}

static void act_q8_0(const float *x, void *vy, int64_t n) {
    vlm_block_q8_0 *y = vy;
    for (int64_t i = 0; i < n / 32; i++) {
        float d;
        (void)q8_block_x86(x + 32 * i, &y[i].d, y[i].qs, &d);
    }
}

static void act_q8_1(const float *x, void *vy, int64_t n) {
    vlm_block_q8_1 *y = vy;
    for (int64_t i = 0; i < n / 32; i++) {
        float d;
        const int32_t sum = q8_block_x86(x + 32 * i, &y[i].d, y[i].qs, &d);
        y[i].s = (uint16_t)_cvtss_sh(d * (float)sum, 0);
    }
}

/* quantize_row_q8_K_ref: the value with the largest |x| (first one on
 * ties) sets iscale = -127/max; q = nearest_int(iscale * x) (round half to
 * even, which cvtps gives for the finite |v| <= 127 that occur); bsums are
 * sums of 16. Blocks where iscale is not finite (amax tiny) take the scalar
 * path in quant.c's semantics: all zero quants. */
static void act_q8_K(const float *x, void *vy, int64_t n) {
    vlm_block_q8_K *y = vy;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / VLM_QK_K; i++, x += VLM_QK_K) {
        __m256 ma = _mm256_setzero_ps();
        for (int j = 0; j < VLM_QK_K; j += 8) ma = _mm256_max_ps(ma, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
        __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(ma, 1), _mm256_castps256_ps128(ma));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        if (!(amax > 0.0f)) {
            /* all zero (or NaN input: not reproduced) */
            y[i].d = 0;
            memset(y[i].qs, 0, sizeof y[i].qs);
            memset(y[i].bsums, 0, sizeof y[i].bsums);
            continue;
        }
        float max = 0;
        const __m256 va = _mm256_set1_ps(amax);
        for (int j = 0; j < VLM_QK_K; j += 8) {
            const __m256 v = _mm256_loadu_ps(x + j);
            const int msk = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, v), va, _CMP_EQ_OQ));
            if (msk) {
                max = x[j + __builtin_ctz((unsigned)msk)];
                break;
            }
        }
        const float iscale = -127.f / max;
        if (!isfinite(iscale)) {
            /* nearest_int(+-inf or NaN) is -4194304 or 0, both 0 as int8 */
            memset(y[i].qs, 0, sizeof y[i].qs);
            memset(y[i].bsums, 0, sizeof y[i].bsums);
            y[i].d = 1 / iscale;
            continue;
        }
        const __m256 mul = _mm256_set1_ps(iscale);
        const __m256i lim = _mm256_set1_epi32(127);
        for (int j = 0; j < VLM_QK_K; j += 32) {
            __m256i i0 = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j), mul)), lim);
            __m256i i1 = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8), mul)), lim);
            __m256i i2 = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 16), mul)), lim);
            __m256i i3 = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 24), mul)), lim);
            y[i].bsums[j / 16] = (int16_t)hsum_i32_8(_mm256_add_epi32(i0, i1));
            y[i].bsums[j / 16 + 1] = (int16_t)hsum_i32_8(_mm256_add_epi32(i2, i3));
            i0 = _mm256_packs_epi32(i0, i1);
            i2 = _mm256_packs_epi32(i2, i3);
            i0 = _mm256_packs_epi16(i0, i2);
            i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(y[i].qs + j), i0);
        }
        y[i].d = 1 / iscale;
    }
}

static void act_f16(const float *x, void *vy, int64_t n) {
    uint16_t *y = vy;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = (uint16_t)_cvtss_sh(x[i], 0);
}

static void act_f32(const float *x, void *y, int64_t n) { memcpy(y, x, (size_t)n * sizeof(float)); }

static void widen_f16(const void *vx, float *y, int64_t n) {
    const uint16_t *x = vx;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
    for (; i < n; i++) y[i] = _cvtsh_ss(x[i]);
}

K_INLINE __m256 bf16x8_to_f32(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static void widen_bf16(const void *vx, float *y, int64_t n) {
    const uint16_t *x = vx;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, bf16x8_to_f32(x + i));
    for (; i < n; i++) {
        const uint32_t b = (uint32_t)x[i] << 16;
        memcpy(&y[i], &b, sizeof b);
    }
}

/* ==== Dot kernels on ggml's block layout ================================= */

static void dot_f32(int64_t n, float *s, const void *vw, const void *va) {
    const float *w = vw, *a = va;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(a + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(a + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(a + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(a + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(a + i), acc0);
    float sum = hsum_f32_8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; i++) sum += w[i] * a[i];
    *s = sum;
}

static void dot_f16(int64_t n, float *s, const void *vw, const void *va) {
    const uint16_t *w = vw, *a = va;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
#define F16X8(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(F16X8(w + i), F16X8(a + i), acc0);
        acc1 = _mm256_fmadd_ps(F16X8(w + i + 8), F16X8(a + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(F16X8(w + i + 16), F16X8(a + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(F16X8(w + i + 24), F16X8(a + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(F16X8(w + i), F16X8(a + i), acc0);
#undef F16X8
    float sum = hsum_f32_8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; i++) sum += _cvtsh_ss(w[i]) * _cvtsh_ss(a[i]);
    *s = sum;
}

static void dot_bf16(int64_t n, float *s, const void *vw, const void *va) {
    const uint16_t *w = vw, *a = va;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(bf16x8_to_f32(w + i), bf16x8_to_f32(a + i), acc0);
        acc1 = _mm256_fmadd_ps(bf16x8_to_f32(w + i + 8), bf16x8_to_f32(a + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(bf16x8_to_f32(w + i), bf16x8_to_f32(a + i), acc0);
    float sum = hsum_f32_8(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) {
        const uint32_t bw = (uint32_t)w[i] << 16, ba = (uint32_t)a[i] << 16;
        float fw, fa;
        memcpy(&fw, &bw, 4);
        memcpy(&fa, &ba, 4);
        sum += fw * fa;
    }
    *s = sum;
}

static void dot_q4_0(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q4_0 *x = vw;
    const vlm_block_q8_0 *y = va;
    const __m256i eight = _mm256_set1_epi8(8);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / 32; i++) {
        const __m256i q = unpack_nibbles_32(x[i].qs);
        const __m256i a = _mm256_loadu_si256((const __m256i *)y[i].qs);
        const __m256i p = _mm256_sub_epi32(dot4_256(_mm256_setzero_si256(), q, a),
                                           dot4_256(_mm256_setzero_si256(), eight, a));
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(x[i].d) * _cvtsh_ss(y[i].d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
    }
    *s = hsum_f32_8(acc);
}

static void dot_q4_1(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q4_1 *x = vw;
    const vlm_block_q8_1 *y = va;
    __m256 acc = _mm256_setzero_ps();
    float summs = 0;
    for (int64_t i = 0; i < n / 32; i++) {
        const __m256i q = unpack_nibbles_32(x[i].qs);
        const __m256i a = _mm256_loadu_si256((const __m256i *)y[i].qs);
        const __m256i p = dot4_256(_mm256_setzero_si256(), q, a);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(x[i].d) * _cvtsh_ss(y[i].d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
        summs = fmaf(_cvtsh_ss(x[i].m), _cvtsh_ss(y[i].s), summs); /* ggml's build contracts this */
    }
    *s = hsum_f32_8(acc) + summs;
}

static void dot_q5_0(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q5_0 *x = vw;
    const vlm_block_q8_0 *y = va;
    const __m256i sixteen = _mm256_set1_epi8(16);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / 32; i++) {
        uint32_t qh;
        memcpy(&qh, x[i].qh, sizeof qh);
        const __m256i q = _mm256_or_si256(unpack_nibbles_32(x[i].qs), _mm256_and_si256(bits_to_bytes(qh), sixteen));
        const __m256i a = _mm256_loadu_si256((const __m256i *)y[i].qs);
        const __m256i p = _mm256_sub_epi32(dot4_256(_mm256_setzero_si256(), q, a),
                                           dot4_256(_mm256_setzero_si256(), sixteen, a));
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(x[i].d) * _cvtsh_ss(y[i].d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
    }
    *s = hsum_f32_8(acc);
}

static void dot_q5_1(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q5_1 *x = vw;
    const vlm_block_q8_1 *y = va;
    const __m256i sixteen = _mm256_set1_epi8(16);
    __m256 acc = _mm256_setzero_ps();
    float summs = 0;
    for (int64_t i = 0; i < n / 32; i++) {
        uint32_t qh;
        memcpy(&qh, x[i].qh, sizeof qh);
        const __m256i q = _mm256_or_si256(unpack_nibbles_32(x[i].qs), _mm256_and_si256(bits_to_bytes(qh), sixteen));
        const __m256i a = _mm256_loadu_si256((const __m256i *)y[i].qs);
        const __m256i p = dot4_256(_mm256_setzero_si256(), q, a);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(x[i].d) * _cvtsh_ss(y[i].d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
        summs = fmaf(_cvtsh_ss(x[i].m), _cvtsh_ss(y[i].s), summs);
    }
    *s = hsum_f32_8(acc) + summs;
}

static void dot_q8_0(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q8_0 *x = vw;
    const vlm_block_q8_0 *y = va;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / 32; i++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)x[i].qs);
        const __m256i a = _mm256_loadu_si256((const __m256i *)y[i].qs);
        const __m256i p = dot4_256_ss(_mm256_setzero_si256(), q, a);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(x[i].d) * _cvtsh_ss(y[i].d));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
    }
    *s = hsum_f32_8(acc);
}

/* The 8 (scale, min) pairs of a Q4_K/Q5_K block as bytes. */
K_INLINE void k4_scales(const uint8_t *q, uint8_t sc[8], uint8_t m[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = q[j] & 63;
        m[j] = q[j + 4] & 63;
        sc[j + 4] = (uint8_t)((q[j + 8] & 0xF) | ((q[j] >> 6) << 4));
        m[j + 4] = (uint8_t)((q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4));
    }
}

/* The K-quant dot kernels keep ggml's AVX2 structure exactly, so that their
 * float results are bit-identical to llama.cpp's: 8 int32 lanes per
 * 256-block (lane i sums elements 4i..4i+3 of every 32-element group, times
 * its sub-block scale), one fma per block into 8 float lanes, and the same
 * horizontal sums at the end. The mins of Q4_K go into 4 float lanes (m_2l
 * S_2l + m_2l+1 S_2l+1 with S the 32-sums of the activations), those of
 * Q5_K into one float (a contracted fma in ggml's build). */
static void dot_q4_K(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q4_K *x = vw;
    const vlm_block_q8_K *y = va;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    __m128 acc_m = _mm_setzero_ps();
    for (int64_t i = 0; i < n / VLM_QK_K; i++) {
        uint8_t sc[8], m[8];
        k4_scales(x[i].scales, sc, m);
        const float d = y[i].d * _cvtsh_ss(x[i].d);
        const float dmin = -y[i].d * _cvtsh_ss(x[i].dmin);
        int32_t prod[4];
        for (int l = 0; l < 4; l++)
            prod[l] = m[2 * l] * (y[i].bsums[4 * l] + y[i].bsums[4 * l + 1]) +
                      m[2 * l + 1] * (y[i].bsums[4 * l + 2] + y[i].bsums[4 * l + 3]);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(_mm_loadu_si128((const __m128i *)prod)), acc_m);
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i qb = _mm256_loadu_si256((const __m256i *)(x[i].qs + 32 * j));
            const __m256i a0 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * j));
            const __m256i a1 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * j + 32));
            const __m256i p0 = dot4_256(_mm256_setzero_si256(), _mm256_and_si256(qb, m4), a0);
            const __m256i p1 = dot4_256(_mm256_setzero_si256(), _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4), a1);
            sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p0, _mm256_set1_epi32(sc[2 * j])));
            sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p1, _mm256_set1_epi32(sc[2 * j + 1])));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));
    *s = hsum_f32_8(acc) + _mm_cvtss_f32(acc_m);
}

static void dot_q5_K(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q5_K *x = vw;
    const vlm_block_q8_K *y = va;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i bit4 = _mm256_set1_epi8(0x10);
    __m256 acc = _mm256_setzero_ps();
    float summs = 0.f;
    for (int64_t i = 0; i < n / VLM_QK_K; i++) {
        uint8_t sc[8], m[8];
        k4_scales(x[i].scales, sc, m);
        const float d = y[i].d * _cvtsh_ss(x[i].d);
        const float dmin = -y[i].d * _cvtsh_ss(x[i].dmin);
        int32_t mins = 0;
        for (int j = 0; j < 8; j++) mins += m[j] * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        summs = fmaf(dmin, (float)mins, summs); /* ggml's build contracts this */
        const __m256i qh = _mm256_loadu_si256((const __m256i *)x[i].qh);
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i qb = _mm256_loadu_si256((const __m256i *)(x[i].qs + 32 * j));
            const __m256i a0 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * j));
            const __m256i a1 = _mm256_loadu_si256((const __m256i *)(y[i].qs + 64 * j + 32));
            /* bit (2j) of qh[l] is the 5th bit of sub-block 2j, bit 2j+1 of 2j+1 */
            const __m256i h0 = _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * j), 4), bit4);
            const __m256i h1 = _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * j + 1), 4), bit4);
            const __m256i q0 = _mm256_or_si256(_mm256_and_si256(qb, m4), h0);
            const __m256i q1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qb, 4), m4), h1);
            const __m256i p0 = dot4_256(_mm256_setzero_si256(), q0, a0);
            const __m256i p1 = dot4_256(_mm256_setzero_si256(), q1, a1);
            sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p0, _mm256_set1_epi32(sc[2 * j])));
            sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p1, _mm256_set1_epi32(sc[2 * j + 1])));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_f32_8(acc) + summs;
}

static void dot_q6_K(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q6_K *x = vw;
    const vlm_block_q8_K *y = va;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i m2 = _mm256_set1_epi8(0x30);
    const __m256i m32 = _mm256_set1_epi8(32);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / VLM_QK_K; i++) {
        __m256i sumi = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = x[i].ql + 64 * h;
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(x[i].qh + 32 * h));
            const __m256i A = _mm256_loadu_si256((const __m256i *)ql);
            const __m256i B = _mm256_loadu_si256((const __m256i *)(ql + 32));
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(A, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2));
            q[1] = _mm256_or_si256(_mm256_and_si256(B, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), m4), _mm256_and_si256(qh, m2));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), m4), _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2));
            for (int k = 0; k < 4; k++) {
                const int sb = 8 * h + 2 * k; /* 16-element sub-blocks sb (lanes 0-3) and sb+1 (lanes 4-7) */
                const __m256i a = _mm256_loadu_si256((const __m256i *)(y[i].qs + 128 * h + 32 * k));
                /* per lane: sum (q - 32) * a over its 4 elements */
                const __m256i p = _mm256_sub_epi32(dot4_256(_mm256_setzero_si256(), q[k], a),
                                                   dot4_256(_mm256_setzero_si256(), m32, a));
                const __m256i scv = _mm256_setr_epi32(x[i].scales[sb], x[i].scales[sb], x[i].scales[sb], x[i].scales[sb],
                                                      x[i].scales[sb + 1], x[i].scales[sb + 1], x[i].scales[sb + 1], x[i].scales[sb + 1]);
                sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(p, scv));
            }
        }
        const float d = y[i].d * _cvtsh_ss(x[i].d);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_f32_8(acc);
}

/* ==== Panel kernels ====================================================== */

#if VLM_K_AVX512
#define NR 16
#define TMAX 8
typedef __m512i vi_t;
typedef __m512 vf_t;
#define VI_LOAD(p) _mm512_loadu_si512((const void *)(p))
#define VI_SET1(x) _mm512_set1_epi32(x)
#define VI_SET1B(x) _mm512_set1_epi8(x)
#define VI_ZERO() _mm512_setzero_si512()
#define VI_AND(a, b) _mm512_and_si512(a, b)
#define VI_OR(a, b) _mm512_or_si512(a, b)
#define VI_SRL16(a, n) _mm512_srli_epi16(a, n)
#define VI_SLL16(a, n) _mm512_slli_epi16(a, n)
#define VI_SRL32(a, n) _mm512_srli_epi32(a, n)
#define VI_SLL32(a, n) _mm512_slli_epi32(a, n)
#define VI_DPBUSD(acc, u, s) _mm512_dpbusd_epi32(acc, u, s)
#define VF_CVT(i) _mm512_cvtepi32_ps(i)
#define VF_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VF_FNMA(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define VF_MUL(a, b) _mm512_mul_ps(a, b)
#define VF_SET1(x) _mm512_set1_ps(x)
#define VF_ZERO() _mm512_setzero_ps()
#define VF_LOAD_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define VF_LOAD_U8(p) _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define VF_LOAD_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define VF_ADD(a, b) _mm512_add_ps(a, b)
#define VI_ADD(a, b) _mm512_add_epi32(a, b)
#define VI_MULLO(a, b) _mm512_mullo_epi32(a, b)
#define VI_MADDUBS(u, s) _mm512_maddubs_epi16(u, s)
#define VI_DPWSSD(acc, a, b) _mm512_dpwssd_epi32(acc, a, b)
#define VI_ZX8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define VI_SX8(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define TX 2 /* tokens per tile of the ggml-order kernels */
K_INLINE void vf_store_n(float *y, vf_t v, int n) {
    if (n == NR) _mm512_storeu_ps(y, v);
    else _mm512_mask_storeu_ps(y, (__mmask16)((1u << n) - 1), v);
}
#else
#define NR 8
#define TMAX 4
typedef __m256i vi_t;
typedef __m256 vf_t;
#define VI_LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define VI_SET1(x) _mm256_set1_epi32(x)
#define VI_SET1B(x) _mm256_set1_epi8(x)
#define VI_ZERO() _mm256_setzero_si256()
#define VI_AND(a, b) _mm256_and_si256(a, b)
#define VI_OR(a, b) _mm256_or_si256(a, b)
#define VI_SRL16(a, n) _mm256_srli_epi16(a, n)
#define VI_SLL16(a, n) _mm256_slli_epi16(a, n)
#define VI_SRL32(a, n) _mm256_srli_epi32(a, n)
#define VI_SLL32(a, n) _mm256_slli_epi32(a, n)
#define VI_DPBUSD(acc, u, s) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#define VF_CVT(i) _mm256_cvtepi32_ps(i)
#define VF_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VF_FNMA(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define VF_MUL(a, b) _mm256_mul_ps(a, b)
#define VF_SET1(x) _mm256_set1_ps(x)
#define VF_ZERO() _mm256_setzero_ps()
#define VF_LOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define VF_LOAD_U8(p) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define VF_LOAD_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define VF_ADD(a, b) _mm256_add_ps(a, b)
#define VI_ADD(a, b) _mm256_add_epi32(a, b)
#define VI_MULLO(a, b) _mm256_mullo_epi32(a, b)
#define VI_MADDUBS(u, s) _mm256_maddubs_epi16(u, s)
#define VI_DPWSSD(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#define VI_ZX8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define VI_SX8(p) _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define TX 1
K_INLINE void vf_store_n(float *y, vf_t v, int n) {
    if (n == NR) {
        _mm256_storeu_ps(y, v);
    } else {
        float tmp[NR];
        _mm256_storeu_ps(tmp, v);
        memcpy(y, tmp, (size_t)n * sizeof(float));
    }
}
#endif

#define GB (4 * NR) /* bytes of one group: 4 quants of each of NR rows */

/* A panel comes from memory once per call, in the first token tile; later
 * tiles re-read it from L1/L2. Prefetching PF_AHEAD bytes ahead in that
 * first pass (pf) keeps enough cache-line requests in flight for decoding
 * and small batches (several decode streams), where the stream dominates. */
#define PF_AHEAD 4096
K_INLINE void prefetch_bytes(const uint8_t *p, size_t n, int pf) {
    if (!pf) return;
    for (size_t o = 0; o < n; o += 64) _mm_prefetch((const char *)(p + PF_AHEAD + o), _MM_HINT_T0);
}

/* Per-token pointers into the planar activations. */
#define ACT_QS(A, t) ((A)->qs + (t) * (A)->n_in)
#define ACT_D(A, t) ((A)->d + (t) * ((A)->n_in / 32))
#define ACT_DS(A, t) ((A)->ds + (t) * ((A)->n_in / 32))
#define ACT_CORR(A, t) ((A)->corr + (t) * (A)->n_corr)

K_INLINE void store_tile(vf_t *acc, int T, float *y, int64_t ldy, int nvalid) {
    for (int t = 0; t < T; t++) vf_store_n(y + t * ldy, acc[t], nvalid);
}

/* The inner step shared by the 32-element-block types: 8 groups of NR x 4
 * weight bytes (W) against one 32-block of each token, starting the int32
 * sums from corr (the -offset * sum(a) of offset types, else 0), then
 * acc[t] += float(sum) * (dw * da[t]). */
K_INLINE void step32(const vi_t W[8], vf_t dw, const vlm__qact_t *A, int64_t t0, int T, int64_t b,
                     int use_corr, vf_t *acc) {
#pragma GCC unroll 16
    for (int t = 0; t < T; t++) {
        const int8_t *a = ACT_QS(A, t0 + t) + 32 * b;
        vi_t s = use_corr ? VI_SET1(ACT_CORR(A, t0 + t)[b]) : VI_ZERO();
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) s = VI_DPBUSD(s, W[k], VI_SET1(ld32(a + 4 * k)));
        acc[t] = VF_FMA(VF_CVT(s), VF_MUL(dw, VF_SET1(ACT_D(A, t0 + t)[b])), acc[t]);
    }
}

/* Q4_0 panel, per 32-block: d[NR] f16, then 4 groups; group k holds bytes
 * qs[4k..4k+3] of each row: low nibbles are elements 4k.., high nibbles
 * elements 16+4k... Weights are used unsigned (0..15); corr = -8 * sum(a). */
K_INLINE void tile_q4_0(const uint8_t *p, const vlm__qact_t *A, int64_t t0, int T, float *y, int64_t ldy, int nvalid, int pf) {
    vf_t acc[TMAX];
    for (int t = 0; t < T; t++) acc[t] = VF_ZERO();
    const vi_t m4 = VI_SET1B(0x0F);
    const int64_t nb = A->n_in / 32;
    for (int64_t b = 0; b < nb; b++, p += 2 * NR + 4 * GB) {
        prefetch_bytes(p, 2 * NR + 4 * GB, pf);
        const vf_t dw = VF_LOAD_F16(p);
        vi_t W[8];
        for (int k = 0; k < 4; k++) {
            const vi_t r = VI_LOAD(p + 2 * NR + k * GB);
            W[k] = VI_AND(r, m4);
            W[k + 4] = VI_AND(VI_SRL16(r, 4), m4);
        }
        step32(W, dw, A, t0, T, b, 1, acc);
    }
    store_tile(acc, T, y, ldy, nvalid);
}

/* Q4_1 panel, per 32-block: d[NR] f16, m[NR] f16, 4 groups as Q4_0.
 * acc += d*da*sum(q*a) + m * s_a, with s_a the Q8_1 block's s. */
K_INLINE void tile_q4_1(const uint8_t *p, const vlm__qact_t *A, int64_t t0, int T, float *y, int64_t ldy, int nvalid, int pf) {
    vf_t acc[TMAX];
    for (int t = 0; t < T; t++) acc[t] = VF_ZERO();
    const vi_t m4 = VI_SET1B(0x0F);
    const int64_t nb = A->n_in / 32;
    for (int64_t b = 0; b < nb; b++, p += 4 * NR + 4 * GB) {
        prefetch_bytes(p, 4 * NR + 4 * GB, pf);
        const vf_t dw = VF_LOAD_F16(p);
        const vf_t mw = VF_LOAD_F16(p + 2 * NR);
        vi_t W[8];
        for (int k = 0; k < 4; k++) {
            const vi_t r = VI_LOAD(p + 4 * NR + k * GB);
            W[k] = VI_AND(r, m4);
            W[k + 4] = VI_AND(VI_SRL16(r, 4), m4);
        }
        step32(W, dw, A, t0, T, b, 0, acc);
        for (int t = 0; t < T; t++) acc[t] = VF_FMA(mw, VF_SET1(ACT_DS(A, t0 + t)[b]), acc[t]);
    }
    store_tile(acc, T, y, ldy, nvalid);
}

/* The 5th bits of a Q5_0/Q5_1 panel block: one 32-bit word per row,
 * rearranged so that byte e, bit c holds the high bit of element 4c + e.
 * Chunk c (elements 4c..4c+3) then needs bit c of each byte moved to bit 4. */
K_INLINE vi_t q5_hbits(vi_t h, int c) {
    const vi_t b4 = VI_SET1B(0x10);
    return VI_AND(c <= 4 ? VI_SLL32(h, 4 - c) : VI_SRL32(h, c - 4), b4);
}

/* Q5_0 panel, per 32-block: d[NR] f16, qh[NR] u32 (rearranged, see
 * q5_hbits), 4 nibble groups as Q4_0. corr = -16 * sum(a). */
K_INLINE void tile_q5_0(const uint8_t *p, const vlm__qact_t *A, int64_t t0, int T, float *y, int64_t ldy, int nvalid, int pf) {
    vf_t acc[TMAX];
    for (int t = 0; t < T; t++) acc[t] = VF_ZERO();
    const vi_t m4 = VI_SET1B(0x0F);
    const int64_t nb = A->n_in / 32;
    for (int64_t b = 0; b < nb; b++, p += 6 * NR + 4 * GB) {
        prefetch_bytes(p, 6 * NR + 4 * GB, pf);
        const vf_t dw = VF_LOAD_F16(p);
        const vi_t h = VI_LOAD(p + 2 * NR);
        vi_t W[8];
        for (int k = 0; k < 4; k++) {
            const vi_t r = VI_LOAD(p + 6 * NR + k * GB);
            W[k] = VI_OR(VI_AND(r, m4), q5_hbits(h, k));
            W[k + 4] = VI_OR(VI_AND(VI_SRL16(r, 4), m4), q5_hbits(h, k + 4));
        }
        step32(W, dw, A, t0, T, b, 1, acc);
    }
    store_tile(acc, T, y, ldy, nvalid);
}

/* Q5_1 panel, per 32-block: d[NR], m[NR] f16, qh[NR] u32, 4 nibble groups. */
K_INLINE void tile_q5_1(const uint8_t *p, const vlm__qact_t *A, int64_t t0, int T, float *y, int64_t ldy, int nvalid, int pf) {
    vf_t acc[TMAX];
    for (int t = 0; t < T; t++) acc[t] = VF_ZERO();
    const vi_t m4 = VI_SET1B(0x0F);
    const int64_t nb = A->n_in / 32;
    for (int64_t b = 0; b < nb; b++, p += 8 * NR + 4 * GB) {
        prefetch_bytes(p, 8 * NR + 4 * GB, pf);
        const vf_t dw = VF_LOAD_F16(p);
        const vf_t mw = VF_LOAD_F16(p + 2 * NR);
        const vi_t h = VI_LOAD(p + 4 * NR);
        vi_t W[8];
        for (int k = 0; k < 4; k++) {
            const vi_t r = VI_LOAD(p + 8 * NR + k * GB);
            W[k] = VI_OR(VI_AND(r, m4), q5_hbits(h, k));
            W[k + 4] = VI_OR(VI_AND(VI_SRL16(r, 4), m4), q5_hbits(h, k + 4));
        }
        step32(W, dw, A, t0, T, b, 0, acc);
        for (int t = 0; t < T; t++) acc[t] = VF_FMA(mw, VF_SET1(ACT_DS(A, t0 + t)[b]), acc[t]);
    }
    store_tile(acc, T, y, ldy, nvalid);
}

/* Q8_0 panel, per 32-block: d[NR] f16, 8 groups (bytes qs[4k..4k+3] of each
 * row). AVX-512 stores q ^ 0x80 (unsigned, q + 128) with corr = -128 sum(a);
 * AVX2 keeps signed q and uses the sign trick (maddubs would saturate). */
K_INLINE void tile_q8_0(const uint8_t *p, const vlm__qact_t *A, int64_t t0, int T, float *y, int64_t ldy, int nvalid, int pf) {
    vf_t acc[TMAX];
    for (int t = 0; t < T; t++) acc[t] = VF_ZERO();
    const int64_t nb = A->n_in / 32;
    for (int64_t b = 0; b < nb; b++, p += 2 * NR + 8 * GB) {
        prefetch_bytes(p, 2 * NR + 8 * GB, pf);
        const vf_t dw = VF_LOAD_F16(p);
#if VLM_K_AVX512
        vi_t W[8];
        for (int k = 0; k < 8; k++) W[k] = VI_LOAD(p + 2 * NR + k * GB);
        step32(W, dw, A, t0, T, b, 1, acc);
#else
        const uint8_t *q = p + 2 * NR;
        vi_t W[8];
        for (int k = 0; k < 8; k++) {
            const vi_t r = VI_LOAD(q + k * GB);
            W[k] = _mm256_sign_epi8(r, r);
        }
#pragma GCC unroll 16
        for (int t = 0; t < T; t++) {
            const int8_t *a = ACT_QS(A, t0 + t) + 32 * b;
            vi_t s = VI_ZERO();
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++)
                s = VI_DPBUSD(s, W[k], _mm256_sign_epi8(VI_SET1(ld32(a + 4 * k)), VI_LOAD(q + k * GB)));
            acc[t] = VF_FMA(VF_CVT(s), VF_MUL(dw, VF_SET1(ACT_D(A, t0 + t)[b])), acc[t]);
        }
#endif
    }
    store_tile(acc, T, y, ldy, nvalid);
}

/* One 32-element sub-block of a K-quant with a float scale and min per row:
 * acc[t] += float(sum(W*a)) * sw * da[t] - mw * ds[t], where ds = d*sum(a)
 * of that 32-block. */
K_INLINE void step32_min(const vi_t W[8], vf_t sw, vf_t mw, const vlm__qact_t *A, int64_t t0, int T,
                         int64_t b, vf_t *acc) {
#pragma GCC unroll 16
    for (int t = 0; t < T; t++) {
        const int8_t *a = ACT_QS(A, t0 + t) + 32 * b;
        vi_t s = VI_ZERO();
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) s = VI_DPBUSD(s, W[k], VI_SET1(ld32(a + 4 * k)));
        acc[t] = VF_FMA(VF_CVT(s), VF_MUL(sw, VF_SET1(ACT_D(A, t0 + t)[b])), acc[t]);
        acc[t] = VF_FNMA(mw, VF_SET1(ACT_DS(A, t0 + t)[b]), acc[t]);
    }
}

/* Q4_K panel, per 256-block: d[NR], dmin[NR] f16, sc[8][NR] u8, m[8][NR] u8
 * (the unpacked 6-bit scales and mins), then 32 groups: group (j, k), j =
 * 0..3, k = 0..7, holds bytes qs[32j + 4k ..] of each row, whose low nibbles
 * are sub-block 2j and high nibbles sub-block 2j + 1. */
K_INLINE void tile_q4_K(const uint8_t *p, const vlm__qact_t *A, int64_t t0, int T, float *y, int64_t ldy, int nvalid, int pf) {
    vf_t acc[TMAX];
    for (int t = 0; t < T; t++) acc[t] = VF_ZERO();
    const vi_t m4 = VI_SET1B(0x0F);
    const int64_t nsb = A->n_in / VLM_QK_K;
    for (int64_t ib = 0; ib < nsb; ib++, p += 20 * NR + 32 * GB) {
        prefetch_bytes(p, 20 * NR + 32 * GB, pf);
        const vf_t d = VF_LOAD_F16(p);
        const vf_t dmin = VF_LOAD_F16(p + 2 * NR);
        const uint8_t *sc = p + 4 * NR, *mn = p + 12 * NR, *q = p + 20 * NR;
        for (int j = 0; j < 4; j++) {
            vi_t W[8];
            for (int k = 0; k < 8; k++) W[k] = VI_AND(VI_LOAD(q + (8 * j + k) * GB), m4);
            step32_min(W, VF_MUL(d, VF_LOAD_U8(sc + (2 * j) * NR)), VF_MUL(dmin, VF_LOAD_U8(mn + (2 * j) * NR)),
                       A, t0, T, 8 * ib + 2 * j, acc);
            for (int k = 0; k < 8; k++) W[k] = VI_AND(VI_SRL16(VI_LOAD(q + (8 * j + k) * GB), 4), m4);
            step32_min(W, VF_MUL(d, VF_LOAD_U8(sc + (2 * j + 1) * NR)), VF_MUL(dmin, VF_LOAD_U8(mn + (2 * j + 1) * NR)),
                       A, t0, T, 8 * ib + 2 * j + 1, acc);
        }
    }
    store_tile(acc, T, y, ldy, nvalid);
}

/* Q5_K panel, per 256-block: d, dmin, sc[8][NR], m[8][NR] as Q4_K, then 8
 * qh groups (bytes qh[4k..4k+3] of each row; bit j is the 5th bit of
 * sub-block j), then the 32 nibble groups as Q4_K. */
K_INLINE void tile_q5_K(const uint8_t *p, const vlm__qact_t *A, int64_t t0, int T, float *y, int64_t ldy, int nvalid, int pf) {
    vf_t acc[TMAX];
    for (int t = 0; t < T; t++) acc[t] = VF_ZERO();
    const vi_t m4 = VI_SET1B(0x0F);
    const vi_t b4 = VI_SET1B(0x10);
    const int64_t nsb = A->n_in / VLM_QK_K;
    for (int64_t ib = 0; ib < nsb; ib++, p += 20 * NR + 40 * GB) {
        prefetch_bytes(p, 20 * NR + 40 * GB, pf);
        const vf_t d = VF_LOAD_F16(p);
        const vf_t dmin = VF_LOAD_F16(p + 2 * NR);
        const uint8_t *sc = p + 4 * NR, *mn = p + 12 * NR, *qh = p + 20 * NR, *q = p + 20 * NR + 8 * GB;
        for (int j = 0; j < 8; j++) {
            vi_t W[8];
            for (int k = 0; k < 8; k++) {
                const vi_t r = VI_LOAD(q + (8 * (j / 2) + k) * GB);
                const vi_t lo = (j & 1) ? VI_AND(VI_SRL16(r, 4), m4) : VI_AND(r, m4);
                const vi_t h = VI_LOAD(qh + k * GB);
                const vi_t hb = VI_AND(j <= 4 ? VI_SLL32(h, 4 - j) : VI_SRL32(h, j - 4), b4);
                W[k] = VI_OR(lo, hb);
            }
            step32_min(W, VF_MUL(d, VF_LOAD_U8(sc + j * NR)), VF_MUL(dmin, VF_LOAD_U8(mn + j * NR)), A, t0, T,
                       8 * ib + j, acc);
        }
    }
    store_tile(acc, T, y, ldy, nvalid);
}

/* The 8 groups (NR x 4 weights each, values 0..63) of quarter qi of half h
 * of a Q6_K panel block at p, laid out as described below. */
K_INLINE void q6_quarter(const uint8_t *p, int h, int qi, vi_t W[8]) {
    const vi_t m4 = VI_SET1B(0x0F);
    const vi_t m2 = VI_SET1B(0x30);
    const uint8_t *ga = p + 18 * NR + h * 24 * GB, *gb = ga + 8 * GB, *gh = ga + 16 * GB;
    for (int k = 0; k < 8; k++) {
        const vi_t src = VI_LOAD((qi & 1 ? gb : ga) + k * GB);
        const vi_t lo = qi < 2 ? VI_AND(src, m4) : VI_AND(VI_SRL16(src, 4), m4);
        const vi_t hr = VI_LOAD(gh + k * GB);
        const vi_t hi = qi == 0 ? VI_SLL16(hr, 4) : qi == 1 ? VI_SLL16(hr, 2) : qi == 2 ? hr : VI_SRL16(hr, 2);
        W[k] = VI_OR(lo, VI_AND(hi, m2));
    }
}

/* Q6_K panel, per 256-block: d[NR] f16, sc[16][NR] i8, then for each half h
 * (128 elements): 8 groups of ql[64h + 4k ..] ("A"), 8 groups of
 * ql[64h + 32 + 4k ..] ("B"), 8 groups of qh[32h + 4k ..] ("H"). Quarter 0
 * of the half is A's low nibbles with H bits 0-1, quarter 1 B's low nibbles
 * with bits 2-3, quarter 2 A's high nibbles with bits 4-5, quarter 3 B's high
 * nibbles with bits 6-7. Values are 0..63 (unsigned); corr = -32 * sum(a)
 * per 16-element sub-block, each with its own scale. */
K_INLINE void tile_q6_K(const uint8_t *p, const vlm__qact_t *A, int64_t t0, int T, float *y, int64_t ldy, int nvalid, int pf) {
    vf_t acc[TMAX];
    for (int t = 0; t < T; t++) acc[t] = VF_ZERO();
    const int64_t nsb = A->n_in / VLM_QK_K;
    for (int64_t ib = 0; ib < nsb; ib++, p += 18 * NR + 48 * GB) {
        prefetch_bytes(p, 18 * NR + 48 * GB, pf);
        const vf_t d = VF_LOAD_F16(p);
        const int8_t *sc = (const int8_t *)(p + 2 * NR);
        for (int h = 0; h < 2; h++) {
            for (int qi = 0; qi < 4; qi++) {
                vi_t W[8];
                q6_quarter(p, h, qi, W);
                const int s16 = 8 * h + 2 * qi; /* first 16-element sub-block of this quarter */
                const vf_t sw0 = VF_MUL(d, VF_LOAD_I8(sc + s16 * NR));
                const vf_t sw1 = VF_MUL(d, VF_LOAD_I8(sc + (s16 + 1) * NR));
                const int64_t b32 = 8 * ib + 4 * h + qi; /* the 32-block, for the scale da */
                const int64_t c16 = 16 * ib + s16;
#pragma GCC unroll 16
                for (int t = 0; t < T; t++) {
                    const int8_t *a = ACT_QS(A, t0 + t) + 32 * b32;
                    const int32_t *corr = ACT_CORR(A, t0 + t) + c16;
                    vi_t s0 = VI_SET1(corr[0]), s1 = VI_SET1(corr[1]);
#pragma GCC unroll 4
                    for (int k = 0; k < 4; k++) {
                        s0 = VI_DPBUSD(s0, W[k], VI_SET1(ld32(a + 4 * k)));
                        s1 = VI_DPBUSD(s1, W[k + 4], VI_SET1(ld32(a + 16 + 4 * k)));
                    }
                    const vf_t da = VF_SET1(ACT_D(A, t0 + t)[b32]);
                    acc[t] = VF_FMA(VF_CVT(s0), VF_MUL(sw0, da), acc[t]);
                    acc[t] = VF_FMA(VF_CVT(s1), VF_MUL(sw1, da), acc[t]);
                }
            }
        }
    }
    store_tile(acc, T, y, ldy, nvalid);
}

/* Exported panel kernels: tiles of TMAX tokens, then 8, 4, 2, 1. */
#define DEFINE_PANEL(name, tile)                                                                   \
    static void name(const void *panel, const vlm__qact_t *A, int64_t t0, int64_t nt, float *y,   \
                     int64_t ldy, int nvalid) {                                                    \
        const uint8_t *p = panel;                                                                  \
        int64_t t = t0;                                                                            \
        const int64_t end = t0 + nt;                                                               \
        for (; t + TMAX <= end; t += TMAX) tile(p, A, t, TMAX, y + (t - t0) * ldy, ldy, nvalid, t == t0); \
        if (TMAX > 8 && t + 8 <= end) {                                                            \
            tile(p, A, t, 8, y + (t - t0) * ldy, ldy, nvalid, t == t0);                           \
            t += 8;                                                                                \
        }                                                                                          \
        if (TMAX > 4 && t + 4 <= end) {                                                            \
            tile(p, A, t, 4, y + (t - t0) * ldy, ldy, nvalid, t == t0);                           \
            t += 4;                                                                                \
        }                                                                                          \
        if (t + 2 <= end) {                                                                        \
            tile(p, A, t, 2, y + (t - t0) * ldy, ldy, nvalid, t == t0);                           \
            t += 2;                                                                                \
        }                                                                                          \
        if (t < end) tile(p, A, t, 1, y + (t - t0) * ldy, ldy, nvalid, t == t0);                  \
    }

DEFINE_PANEL(panel_q4_0, tile_q4_0) /* also ggml's order: that of its repacked Q4_0 8x8 kernels */
DEFINE_PANEL(fast_q4_1, tile_q4_1)
DEFINE_PANEL(fast_q5_0, tile_q5_0)
DEFINE_PANEL(fast_q5_1, tile_q5_1)
DEFINE_PANEL(fast_q8_0, tile_q8_0)
DEFINE_PANEL(fast_q4_K, tile_q4_K)
DEFINE_PANEL(fast_q5_K, tile_q5_K)
DEFINE_PANEL(fast_q6_K, tile_q6_K)

/* ==== Panel kernels in ggml's summation order ============================ */

/* ggml's hsum_float_8 of a vector whose lane i is x[i]: ((x0 + x4) +
 * (x2 + x6)) + ((x1 + x5) + (x3 + x7)); here lane r of every x[i] is row r. */
K_INLINE vf_t hsum8_lanes(const vf_t x[8]) {
    const vf_t a0 = VF_ADD(x[0], x[4]), a1 = VF_ADD(x[1], x[5]);
    const vf_t a2 = VF_ADD(x[2], x[6]), a3 = VF_ADD(x[3], x[7]);
    return VF_ADD(VF_ADD(a0, a2), VF_ADD(a1, a3));
}

/* Q4_1 / Q5_0 / Q5_1 / Q8_0 in ggml's vec_dot (and tinyBLAS) order: for
 * each row 8 float lanes, lane k += (d_w * d_a) * (sum of the 4 products of
 * elements 4k..4k+3 of the block), one fma per block; Q4_1/Q5_1 add
 * m_w * s_a into a separate float (an fma in ggml's build); at the end ggml's
 * horizontal sum. Offsets (Q5_0: 16, Q8_0: 128 in the q + 128 layout) are
 * removed per lane with lane_corr. */
K_INLINE void tile_lanes32(const int type, const uint8_t *p, const vlm__qact_t *A, int64_t t0, int T, float *y,
                           int64_t ldy, int nvalid, int pf) {
    vf_t acc[TX][8], summ[TX];
    for (int t = 0; t < T; t++) {
        for (int k = 0; k < 8; k++) acc[t][k] = VF_ZERO();
        summ[t] = VF_ZERO();
    }
    const vi_t m4 = VI_SET1B(0x0F);
    const int has_m = type == VLM_DTYPE_Q4_1 || type == VLM_DTYPE_Q5_1;
    const size_t head = type == VLM_DTYPE_Q8_0 ? 2 * NR : type == VLM_DTYPE_Q4_1 ? 4 * NR
                      : type == VLM_DTYPE_Q5_0 ? 6 * NR : 8 * NR;
    const size_t bbytes = head + (type == VLM_DTYPE_Q8_0 ? 8 : 4) * GB;
    const int64_t nb = A->n_in / 32;
    for (int64_t b = 0; b < nb; b++, p += bbytes) {
        prefetch_bytes(p, bbytes, pf);
        const vf_t dw = VF_LOAD_F16(p);
        const vf_t mw = has_m ? VF_LOAD_F16(p + 2 * NR) : VF_ZERO();
        const uint8_t *q = p + head;
        vi_t W[8];
        if (type == VLM_DTYPE_Q8_0) {
            for (int k = 0; k < 8; k++) {
                W[k] = VI_LOAD(q + k * GB);
#if !VLM_K_AVX512
                W[k] = _mm256_sign_epi8(W[k], W[k]);
#endif
            }
        } else {
            const vi_t h = type == VLM_DTYPE_Q5_0 ? VI_LOAD(p + 2 * NR) : type == VLM_DTYPE_Q5_1 ? VI_LOAD(p + 4 * NR)
                                                                                                : VI_ZERO();
            for (int k = 0; k < 4; k++) {
                const vi_t r = VI_LOAD(q + k * GB);
                W[k] = VI_AND(r, m4);
                W[k + 4] = VI_AND(VI_SRL16(r, 4), m4);
                if (type == VLM_DTYPE_Q5_0 || type == VLM_DTYPE_Q5_1) {
                    W[k] = VI_OR(W[k], q5_hbits(h, k));
                    W[k + 4] = VI_OR(W[k + 4], q5_hbits(h, k + 4));
                }
            }
        }
        const int use_corr = type == VLM_DTYPE_Q5_0 || (type == VLM_DTYPE_Q8_0 && VLM_K_AVX512);
#pragma GCC unroll 2
        for (int t = 0; t < T; t++) {
            const int8_t *a = ACT_QS(A, t0 + t) + 32 * b;
            const int32_t *lc = use_corr ? A->lane_corr + (t0 + t) * (A->n_in / 4) + 8 * b : NULL;
            const vf_t dv = VF_MUL(dw, VF_SET1(ACT_D(A, t0 + t)[b]));
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++) {
                vi_t s;
#if !VLM_K_AVX512
                if (type == VLM_DTYPE_Q8_0)
                    s = VI_DPBUSD(VI_ZERO(), W[k], _mm256_sign_epi8(VI_SET1(ld32(a + 4 * k)), VI_LOAD(q + k * GB)));
                else
#endif
                    s = VI_DPBUSD(use_corr ? VI_SET1(lc[k]) : VI_ZERO(), W[k], VI_SET1(ld32(a + 4 * k)));
                acc[t][k] = VF_FMA(dv, VF_CVT(s), acc[t][k]);
            }
            if (has_m) summ[t] = VF_FMA(mw, VF_SET1(ACT_DS(A, t0 + t)[b]), summ[t]);
        }
    }
    for (int t = 0; t < T; t++) {
        vf_t r = hsum8_lanes(acc[t]);
        if (has_m) r = VF_ADD(r, summ[t]);
        vf_store_n(y + t * ldy, r, nvalid);
    }
}

/* Q4_K / Q5_K / Q6_K in the order of ggml's AVX2 vec_dot: per 256-block, 8
 * int32 lanes per row (lane k sums, over the 8 groups of 32, scale times the
 * 4 products of elements 4k..4k+3), then lane k += (d_a * d_w) * lane, one
 * fma per block. Q4_K's mins go into 4 float lanes (m_2l S_2l + m_2l+1
 * S_2l+1 times -d_a * dmin_w), Q5_K's into one (a contracted fma in ggml's
 * build); Q6_K's -32 offsets are removed per lane with lane_corr. The scale
 * products use vpmaddubsw + vpdpwssd (Q4_K/Q5_K) or vpmulld (Q6_K). */
K_INLINE void tile_xk(const int type, const uint8_t *p, const vlm__qact_t *A, int64_t t0, int T, float *y,
                      int64_t ldy, int nvalid, int pf) {
    vf_t acc[TX][8], accm[TX][4];
    for (int t = 0; t < T; t++) {
        for (int k = 0; k < 8; k++) acc[t][k] = VF_ZERO();
        for (int l = 0; l < 4; l++) accm[t][l] = VF_ZERO();
    }
    const vi_t m4 = VI_SET1B(0x0F);
    const vi_t b4 = VI_SET1B(0x10);
    const size_t sbytes = type == VLM_DTYPE_Q4_K ? 20 * NR + 32 * GB : type == VLM_DTYPE_Q5_K ? 20 * NR + 40 * GB
                                                                                            : 18 * NR + 48 * GB;
    const int64_t nsb = A->n_in / VLM_QK_K;
    for (int64_t ib = 0; ib < nsb; ib++, p += sbytes) {
        prefetch_bytes(p, sbytes, pf);
        vi_t sumi[TX][8];
        float da[TX];
        const int8_t *abase[TX];
        for (int t = 0; t < T; t++) {
            for (int k = 0; k < 8; k++) sumi[t][k] = VI_ZERO();
            da[t] = ACT_D(A, t0 + t)[8 * ib];
            abase[t] = ACT_QS(A, t0 + t) + VLM_QK_K * ib;
        }
        const vf_t dw = VF_LOAD_F16(p);
        if (type == VLM_DTYPE_Q6_K) {
            const int8_t *sc = (const int8_t *)(p + 2 * NR);
            for (int h = 0; h < 2; h++) {
                for (int qi = 0; qi < 4; qi++) {
                    vi_t W[8];
                    q6_quarter(p, h, qi, W);
                    const int s16 = 8 * h + 2 * qi;
                    const vi_t sc0 = VI_SX8(sc + s16 * NR), sc1 = VI_SX8(sc + (s16 + 1) * NR);
#pragma GCC unroll 2
                    for (int t = 0; t < T; t++) {
                        const int8_t *a = abase[t] + 128 * h + 32 * qi;
                        const int32_t *lc = A->lane_corr + (t0 + t) * (A->n_in / 4) + 64 * ib + 32 * h + 8 * qi;
#pragma GCC unroll 8
                        for (int k = 0; k < 8; k++) {
                            const vi_t s = VI_DPBUSD(VI_SET1(lc[k]), W[k], VI_SET1(ld32(a + 4 * k)));
                            sumi[t][k] = VI_ADD(sumi[t][k], VI_MULLO(s, k < 4 ? sc0 : sc1));
                        }
                    }
                }
            }
        } else {
            const vf_t dminw = VF_LOAD_F16(p + 2 * NR);
            const uint8_t *sc = p + 4 * NR, *mn = p + 12 * NR, *qh = p + 20 * NR;
            const uint8_t *q = p + 20 * NR + (type == VLM_DTYPE_Q5_K ? 8 * GB : 0);
            for (int j = 0; j < 8; j++) {
                const vi_t s8 = VI_ZX8(sc + j * NR);
                const vi_t sc16 = VI_OR(s8, VI_SLL32(s8, 16)); /* (sc, sc) as two int16 */
                vi_t W[8];
                for (int k = 0; k < 8; k++) {
                    const vi_t r = VI_LOAD(q + (8 * (j / 2) + k) * GB);
                    W[k] = (j & 1) ? VI_AND(VI_SRL16(r, 4), m4) : VI_AND(r, m4);
                    if (type == VLM_DTYPE_Q5_K) {
                        const vi_t hh = VI_LOAD(qh + k * GB);
                        W[k] = VI_OR(W[k], VI_AND(j <= 4 ? VI_SLL32(hh, 4 - j) : VI_SRL32(hh, j - 4), b4));
                    }
                }
#pragma GCC unroll 2
                for (int t = 0; t < T; t++) {
                    const int8_t *a = abase[t] + 32 * j;
#pragma GCC unroll 8
                    for (int k = 0; k < 8; k++)
                        sumi[t][k] = VI_DPWSSD(sumi[t][k], VI_MADDUBS(W[k], VI_SET1(ld32(a + 4 * k))), sc16);
                }
            }
            /* mins: lane (m_2l, m_2l+1) as two int16 times (S_2l, S_2l+1) */
            vi_t psum[TX];
            for (int t = 0; t < T; t++) psum[t] = VI_ZERO();
            for (int l = 0; l < 4; l++) {
                const vi_t mp = VI_OR(VI_ZX8(mn + 2 * l * NR), VI_SLL32(VI_ZX8(mn + (2 * l + 1) * NR), 16));
                for (int t = 0; t < T; t++) {
                    const int32_t *sp = A->spair + (t0 + t) * (A->n_in / 64) + 4 * ib;
                    const vi_t prod = VI_DPWSSD(VI_ZERO(), mp, VI_SET1(sp[l]));
                    if (type == VLM_DTYPE_Q4_K)
                        accm[t][l] = VF_FMA(VF_MUL(dminw, VF_SET1(-da[t])), VF_CVT(prod), accm[t][l]);
                    else
                        psum[t] = VI_ADD(psum[t], prod);
                }
            }
            if (type == VLM_DTYPE_Q5_K)
                for (int t = 0; t < T; t++)
                    accm[t][0] = VF_FMA(VF_MUL(dminw, VF_SET1(-da[t])), VF_CVT(psum[t]), accm[t][0]);
        }
        for (int t = 0; t < T; t++) {
            const vf_t dv = VF_MUL(dw, VF_SET1(da[t]));
            for (int k = 0; k < 8; k++) acc[t][k] = VF_FMA(dv, VF_CVT(sumi[t][k]), acc[t][k]);
        }
    }
    for (int t = 0; t < T; t++) {
        vf_t r = hsum8_lanes(acc[t]);
        if (type == VLM_DTYPE_Q4_K) r = VF_ADD(r, VF_ADD(VF_ADD(accm[t][0], accm[t][2]), VF_ADD(accm[t][1], accm[t][3])));
        else if (type == VLM_DTYPE_Q5_K) r = VF_ADD(r, accm[t][0]);
        vf_store_n(y + t * ldy, r, nvalid);
    }
}

/* The same sums as tile_xk for batches: each 256-block of the panel is
 * unpacked once into an L1 buffer (8 x 8 groups, the scale vectors, the
 * mins), then every token of the tile streams over it, so the unpacking is
 * shared by T tokens while each token keeps only its 8 int32 lane sums in
 * registers. The float lane accumulators live in a small stack array. */
K_INLINE void tile_xk_buf(const int type, const uint8_t *p, const vlm__qact_t *A, int64_t t0, int T, float *y,
                          int64_t ldy, int nvalid, int pf) {
    vf_t accs[TMAX][12]; /* per token: 8 lanes, then 4 min lanes (Q4_K) or 1 (Q5_K) */
    for (int t = 0; t < T; t++)
        for (int k = 0; k < 12; k++) accs[t][k] = VF_ZERO();
    vi_t Wb[64], scv[16], mp[4];
    const vi_t m4 = VI_SET1B(0x0F);
    const vi_t b4 = VI_SET1B(0x10);
    const size_t sbytes = type == VLM_DTYPE_Q4_K ? 20 * NR + 32 * GB : type == VLM_DTYPE_Q5_K ? 20 * NR + 40 * GB
                                                                                            : 18 * NR + 48 * GB;
    const int64_t nsb = A->n_in / VLM_QK_K;
    for (int64_t ib = 0; ib < nsb; ib++, p += sbytes) {
        prefetch_bytes(p, sbytes, pf);
        const vf_t dw = VF_LOAD_F16(p);
        vf_t dminw = VF_ZERO();
        /* unpack: Wb[8g + k] is chunk k of 32-group g (sub-block g, or quarter g of Q6_K) */
        if (type == VLM_DTYPE_Q6_K) {
            const int8_t *sc = (const int8_t *)(p + 2 * NR);
            for (int i = 0; i < 16; i++) scv[i] = VI_SX8(sc + i * NR);
            for (int h = 0; h < 2; h++)
                for (int qi = 0; qi < 4; qi++) q6_quarter(p, h, qi, Wb + 8 * (4 * h + qi));
        } else {
            dminw = VF_LOAD_F16(p + 2 * NR);
            const uint8_t *sc = p + 4 * NR, *mn = p + 12 * NR, *qh = p + 20 * NR;
            const uint8_t *q = p + 20 * NR + (type == VLM_DTYPE_Q5_K ? 8 * GB : 0);
            for (int j = 0; j < 8; j++) {
                const vi_t s8 = VI_ZX8(sc + j * NR);
                scv[j] = VI_OR(s8, VI_SLL32(s8, 16));
                for (int k = 0; k < 8; k++) {
                    const vi_t r = VI_LOAD(q + (8 * (j / 2) + k) * GB);
                    vi_t w = (j & 1) ? VI_AND(VI_SRL16(r, 4), m4) : VI_AND(r, m4);
                    if (type == VLM_DTYPE_Q5_K) {
                        const vi_t hh = VI_LOAD(qh + k * GB);
                        w = VI_OR(w, VI_AND(j <= 4 ? VI_SLL32(hh, 4 - j) : VI_SRL32(hh, j - 4), b4));
                    }
                    Wb[8 * j + k] = w;
                }
            }
            for (int l = 0; l < 4; l++)
                mp[l] = VI_OR(VI_ZX8(mn + 2 * l * NR), VI_SLL32(VI_ZX8(mn + (2 * l + 1) * NR), 16));
        }
        for (int t = 0; t < T; t++) {
            const int8_t *a = ACT_QS(A, t0 + t) + VLM_QK_K * ib;
            const float da = ACT_D(A, t0 + t)[8 * ib];
            vi_t sumi[8];
            for (int k = 0; k < 8; k++) sumi[k] = VI_ZERO();
            if (type == VLM_DTYPE_Q6_K) {
                const int32_t *lc = A->lane_corr + (t0 + t) * (A->n_in / 4) + 64 * ib;
                for (int g = 0; g < 8; g++)
#pragma GCC unroll 8
                    for (int k = 0; k < 8; k++) {
                        const vi_t sv = VI_DPBUSD(VI_SET1(lc[8 * g + k]), Wb[8 * g + k], VI_SET1(ld32(a + 32 * g + 4 * k)));
                        sumi[k] = VI_ADD(sumi[k], VI_MULLO(sv, scv[2 * g + (k >= 4)]));
                    }
            } else {
                for (int g = 0; g < 8; g++)
#pragma GCC unroll 8
                    for (int k = 0; k < 8; k++)
                        sumi[k] = VI_DPWSSD(sumi[k], VI_MADDUBS(Wb[8 * g + k], VI_SET1(ld32(a + 32 * g + 4 * k))), scv[g]);
                const int32_t *sp = A->spair + (t0 + t) * (A->n_in / 64) + 4 * ib;
                const vf_t dminv = VF_MUL(dminw, VF_SET1(-da));
                if (type == VLM_DTYPE_Q4_K) {
                    for (int l = 0; l < 4; l++)
                        accs[t][8 + l] = VF_FMA(dminv, VF_CVT(VI_DPWSSD(VI_ZERO(), mp[l], VI_SET1(sp[l]))), accs[t][8 + l]);
                } else {
                    vi_t ps = VI_ZERO();
                    for (int l = 0; l < 4; l++) ps = VI_ADD(ps, VI_DPWSSD(VI_ZERO(), mp[l], VI_SET1(sp[l])));
                    accs[t][8] = VF_FMA(dminv, VF_CVT(ps), accs[t][8]);
                }
            }
            const vf_t dv = VF_MUL(dw, VF_SET1(da));
            for (int k = 0; k < 8; k++) accs[t][k] = VF_FMA(dv, VF_CVT(sumi[k]), accs[t][k]);
        }
    }
    for (int t = 0; t < T; t++) {
        vf_t r = hsum8_lanes(accs[t]);
        if (type == VLM_DTYPE_Q4_K) r = VF_ADD(r, VF_ADD(VF_ADD(accs[t][8], accs[t][10]), VF_ADD(accs[t][9], accs[t][11])));
        else if (type == VLM_DTYPE_Q5_K) r = VF_ADD(r, accs[t][8]);
        vf_store_n(y + t * ldy, r, nvalid);
    }
}

#define DEFINE_PANEL_X(name, tile, type)                                                          \
    static void name(const void *panel, const vlm__qact_t *A, int64_t t0, int64_t nt, float *y,   \
                     int64_t ldy, int nvalid) {                                                    \
        const uint8_t *p = panel;                                                                  \
        int64_t t = t0;                                                                            \
        const int64_t end = t0 + nt;                                                               \
        for (; t + TX <= end; t += TX) tile(type, p, A, t, TX, y + (t - t0) * ldy, ldy, nvalid, t == t0); \
        if (t < end) tile(type, p, A, t, 1, y + (t - t0) * ldy, ldy, nvalid, t == t0);            \
    }

/* K-quants: the register kernel for 1-2 tokens (decoding streams the panel
 * once), the buffered one for batches. */
#define DEFINE_PANEL_XK(name, type)                                                               \
    static void name(const void *panel, const vlm__qact_t *A, int64_t t0, int64_t nt, float *y,   \
                     int64_t ldy, int nvalid) {                                                    \
        const uint8_t *p = panel;                                                                  \
        if (nt <= TX) {                                                                            \
            if (nt == TX) tile_xk(type, p, A, t0, TX, y, ldy, nvalid, 1);                          \
            else tile_xk(type, p, A, t0, 1, y, ldy, nvalid, 1);                                    \
            return;                                                                                \
        }                                                                                          \
        int64_t t = t0;                                                                            \
        const int64_t end = t0 + nt;                                                               \
        for (; t + TMAX <= end; t += TMAX) tile_xk_buf(type, p, A, t, TMAX, y + (t - t0) * ldy, ldy, nvalid, t == t0); \
        if (t < end) tile_xk_buf(type, p, A, t, (int)(end - t), y + (t - t0) * ldy, ldy, nvalid, t == t0); \
    }

DEFINE_PANEL_X(panel_q4_1, tile_lanes32, VLM_DTYPE_Q4_1)
DEFINE_PANEL_X(panel_q5_0, tile_lanes32, VLM_DTYPE_Q5_0)
DEFINE_PANEL_X(panel_q5_1, tile_lanes32, VLM_DTYPE_Q5_1)
DEFINE_PANEL_X(panel_q8_0, tile_lanes32, VLM_DTYPE_Q8_0)
DEFINE_PANEL_XK(panel_q4_K, VLM_DTYPE_Q4_K)
DEFINE_PANEL_XK(panel_q5_K, VLM_DTYPE_Q5_K)
DEFINE_PANEL_XK(panel_q6_K, VLM_DTYPE_Q6_K)

/* ==== Float weights: GEMM in tinyBLAS's order ========================= */

#include "fgemm_x86.h"

const vlm__kernel_table_t VLM_K_TABLE = {
#if VLM_K_AVX512
    .isa = VLM_ISA_AVX512,
    .panel_q8_0_signed = false,
#else
    .isa = VLM_ISA_AVX2,
    .panel_q8_0_signed = true,
#endif
    .vec_dot = {
        [VLM_DTYPE_F32] = dot_f32,   [VLM_DTYPE_F16] = dot_f16,   [VLM_DTYPE_BF16] = dot_bf16,
        [VLM_DTYPE_Q4_0] = dot_q4_0, [VLM_DTYPE_Q4_1] = dot_q4_1, [VLM_DTYPE_Q5_0] = dot_q5_0,
        [VLM_DTYPE_Q5_1] = dot_q5_1, [VLM_DTYPE_Q8_0] = dot_q8_0, [VLM_DTYPE_Q4_K] = dot_q4_K,
        [VLM_DTYPE_Q5_K] = dot_q5_K, [VLM_DTYPE_Q6_K] = dot_q6_K,
    },
    .quantize_act = {
        [VLM_DTYPE_F32] = act_f32,   [VLM_DTYPE_F16] = act_f16,   [VLM_DTYPE_Q8_0] = act_q8_0,
        [VLM_DTYPE_Q8_1] = act_q8_1, [VLM_DTYPE_Q8_K] = act_q8_K,
    },
    .widen = {
        [VLM_DTYPE_F16] = widen_f16, [VLM_DTYPE_BF16] = widen_bf16,
    },
    .panel_rows = NR,
    .panel = {
        [VLM_DTYPE_Q4_0] = panel_q4_0, [VLM_DTYPE_Q4_1] = panel_q4_1, [VLM_DTYPE_Q5_0] = panel_q5_0,
        [VLM_DTYPE_Q5_1] = panel_q5_1, [VLM_DTYPE_Q8_0] = panel_q8_0, [VLM_DTYPE_Q4_K] = panel_q4_K,
        [VLM_DTYPE_Q5_K] = panel_q5_K, [VLM_DTYPE_Q6_K] = panel_q6_K,
    },
    .panel_fast = {
        [VLM_DTYPE_Q4_0] = panel_q4_0, [VLM_DTYPE_Q4_1] = fast_q4_1, [VLM_DTYPE_Q5_0] = fast_q5_0,
        [VLM_DTYPE_Q5_1] = fast_q5_1, [VLM_DTYPE_Q8_0] = fast_q8_0, [VLM_DTYPE_Q4_K] = fast_q4_K,
        [VLM_DTYPE_Q5_K] = fast_q5_K, [VLM_DTYPE_Q6_K] = fast_q6_K,
    },
};
