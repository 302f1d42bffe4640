/* core/fgemm_x86.h - the F32 / F16 / BF16 weight GEMM (fgemm.h) for x86,
 * written once and compiled twice.
 *
 * kernels_x86.h includes this file after setting VLM_K_AVX512, and the
 * includer (kernels_avx2.c / kernels_avx512.c) names the entry point with
 * VLM_K_FGEMM. Every output is one 16-lane accumulator that sees its terms
 * in tinyBLAS's order (fgemm.h); the tiles only decide which outputs are
 * computed together, never the order inside one, so any tiling, token
 * blocking or thread split gives the same bits.
 *
 *   AVX-512: a tile is FG_RM = 4 weight rows x FG_RN = 6 tokens, 24 __m512
 *            accumulators (tinyBLAS's own 4 x 6 tile on 32 registers);
 *   AVX2:    a tile is 2 x 3, each accumulator two __m256 (lanes 0-7 and
 *            8-15), 12 of the 16 registers.
 * Tiles run token block by token block (FG_TB tokens, whose activations stay
 * in L2), then row block by row block (FG_MB rows) and, when the caller gave
 * scratch for it (g->lanes) and k is long, k block by k block (FG_KC_BYTES
 * of each weight row): the tiles of a row block run over one k block, park
 * their 16-lane accumulators in g->lanes, and pick them up for the next k
 * block. Each lane still sees its terms in increasing order, so the order
 * does not change, but a tile's weights and activations for one k block fit
 * in L1. Weight rows are read from memory once per token block. (Measured
 * on Zen 5, one thread, 512 tokens: 192-token blocks and k blocks together
 * gave +50% for f32 and +30% for f16 over 48-token blocks without.)
 *
 * Weights are read in their file type: F32 directly, F16 widened with
 * vcvtph2ps, BF16 split into its odd and even elements (the dpbf16 pairing)
 * with a mask and a shift after subnormals are replaced by zero. The
 * activations were rounded, widened and (for BF16) split by matmul.c, so
 * every operand is an f32 here.
 */
#include "fgemm.h"

#if VLM_K_AVX512
#define FG_H 1  /* vectors per 16-lane accumulator */
#define FG_RM 4 /* weight rows per tile */
#define FG_RN 6 /* tokens per tile */
typedef __m512 fg_v;
#define FG_LOADF(p) _mm512_loadu_ps(p)
#define FG_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define FG_ZERO() _mm512_setzero_ps()
#define FG_STOREF(p, v) _mm512_storeu_ps(p, v)
#else
#define FG_H 2
#define FG_RM 2
#define FG_RN 3
typedef __m256 fg_v;
#define FG_LOADF(p) _mm256_loadu_ps(p)
#define FG_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define FG_ZERO() _mm256_setzero_ps()
#define FG_STOREF(p, v) _mm256_storeu_ps(p, v)
#endif
#define FG_VW (16 / FG_H) /* floats per vector */
#define FG_TB 192         /* tokens per block: a multiple of FG_RN */
#define FG_MB 16          /* rows per block when k is split: a multiple of FG_RM */
#define FG_KC_BYTES 2048  /* weight bytes per row and k block */
#define FG_LANES (FG_RM * FG_RN * 16) /* floats of one tile's lanes */
/* g->lanes holds one slot of FG_TB / FG_RN tiles per row tile of a block,
 * single-row tiles included */
#define FG_SLOT (FG_TB / FG_RN * FG_LANES)
_Static_assert((FG_MB / FG_RM + FG_RM - 1) * FG_SLOT <= VLM__FGEMM_LANES_FLOATS, "g->lanes too small");

/* Vector h of the 16-element chunk at element l of an F32 or F16 row. */
K_INLINE fg_v fg_load_w(const int type, const uint8_t *row, int64_t l, int h) {
    if (type == VLM_DTYPE_F32) return FG_LOADF((const float *)row + l + FG_VW * h);
#if VLM_K_AVX512
    (void)h;
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + l)));
#else
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + l + 8 * h)));
#endif
}

/* BF16 weights: vector h of the 32-element chunk at element l, as 16-bit
 * values with subnormals replaced by (signed) zero, as dpbf16 reads them.
 * With branch, the replacement is skipped when no value has a zero
 * exponent (faster for large tiles, slower when streaming for decode). */
#if VLM_K_AVX512
typedef __m512i fg_vi;
K_INLINE fg_vi fg_load_bf16(const uint8_t *row, int64_t l, int h, const int branch) {
    (void)h;
    __m512i raw = _mm512_loadu_si512((const void *)((const uint16_t *)row + l));
    const __mmask32 e0 = _mm512_testn_epi16_mask(raw, _mm512_set1_epi16(0x7F80));
    if (!branch || __builtin_expect(e0 != 0, 0))
        raw = _mm512_mask_mov_epi16(raw, e0, _mm512_and_si512(raw, _mm512_set1_epi16((short)0x8000)));
    return raw;
}

/* Its odd (p = 0) or even (p = 1) elements as f32: lane j holds element
 * 2j + 1 (or 2j) of the chunk, as dpbf16 pairs them. */
K_INLINE fg_v fg_split_bf16(fg_vi raw, int p) {
    return _mm512_castsi512_ps(p == 0 ? _mm512_and_si512(raw, _mm512_set1_epi32((int)0xFFFF0000u))
                                      : _mm512_slli_epi32(raw, 16));
}
#else
typedef __m256i fg_vi;
K_INLINE fg_vi fg_load_bf16(const uint8_t *row, int64_t l, int h, const int branch) {
    (void)branch;
    const __m256i raw = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + l + 16 * h));
    const __m256i sub = _mm256_cmpeq_epi16(_mm256_and_si256(raw, _mm256_set1_epi16(0x7F80)), _mm256_setzero_si256());
    return _mm256_andnot_si256(_mm256_andnot_si256(_mm256_set1_epi16((short)0x8000), sub), raw);
}

K_INLINE fg_v fg_split_bf16(fg_vi raw, int p) {
    return _mm256_castsi256_ps(p == 0 ? _mm256_and_si256(raw, _mm256_set1_epi32((int)0xFFFF0000u))
                                      : _mm256_slli_epi32(raw, 16));
}
#endif

/* _mm512_reduce_add_ps's tree on the 16 lanes of one accumulator. */
K_INLINE float fg_hsum(const fg_v *a) {
#if VLM_K_AVX512
    const __m256 lo = _mm512_castps512_ps256(a[0]);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[0]), 1));
    return hsum_f32_8(_mm256_add_ps(lo, hi));
#else
    return hsum_f32_8(_mm256_add_ps(a[0], a[1]));
#endif
}

/* One chunk (16 elements, 32 for BF16) of every accumulator of an RM x RN
 * tile: weight rows wr[] at element lw, activation rows xr[] at lx. */
K_INLINE void fg_step(const int type, const int RM, const int RN, const uint8_t *const *wr, int64_t lw,
                      const float *const *xr, int64_t lx, fg_v acc[FG_RM][FG_RN][FG_H]) {
    if (type != VLM_DTYPE_BF16) {
#pragma GCC unroll 2
        for (int h = 0; h < FG_H; h++) {
            fg_v a[FG_RM];
#pragma GCC unroll 8
            for (int r = 0; r < RM; r++) a[r] = fg_load_w(type, wr[r], lw, h);
#pragma GCC unroll 8
            for (int j = 0; j < RN; j++) {
                const fg_v b = FG_LOADF(xr[j] + lx + FG_VW * h);
#pragma GCC unroll 8
                for (int r = 0; r < RM; r++) acc[r][j][h] = FG_FMA(a[r], b, acc[r][j][h]);
            }
        }
    } else if (RN <= 3) {
        /* the odd elements of the chunk before the even ones, in every lane;
         * few accumulators: keep the raw rows in registers for both halves */
#pragma GCC unroll 2
        for (int h = 0; h < FG_H; h++) {
            fg_vi raw[FG_RM];
#pragma GCC unroll 8
            for (int r = 0; r < RM; r++) raw[r] = fg_load_bf16(wr[r], lw, h, 0);
#pragma GCC unroll 2
            for (int p = 0; p < 2; p++) {
                fg_v a[FG_RM];
#pragma GCC unroll 8
                for (int r = 0; r < RM; r++) a[r] = fg_split_bf16(raw[r], p);
#pragma GCC unroll 8
                for (int j = 0; j < RN; j++) {
                    const fg_v b = FG_LOADF(xr[j] + lx + 16 * p + FG_VW * h);
#pragma GCC unroll 8
                    for (int r = 0; r < RM; r++) acc[r][j][h] = FG_FMA(a[r], b, acc[r][j][h]);
                }
            }
        }
    } else {
        /* the same, reading each raw row once per half (registers) */
#pragma GCC unroll 2
        for (int p = 0; p < 2; p++) {
#pragma GCC unroll 2
            for (int h = 0; h < FG_H; h++) {
                fg_v a[FG_RM];
#pragma GCC unroll 8
                for (int r = 0; r < RM; r++) a[r] = fg_split_bf16(fg_load_bf16(wr[r], lw, h, 1), p);
#pragma GCC unroll 8
                for (int j = 0; j < RN; j++) {
                    const fg_v b = FG_LOADF(xr[j] + lx + 16 * p + FG_VW * h);
#pragma GCC unroll 8
                    for (int r = 0; r < RM; r++) acc[r][j][h] = FG_FMA(a[r], b, acc[r][j][h]);
                }
            }
        }
    }
}

/* Outputs [t, t + RN) x [o, o + RM), elements [k0, k1) of their sums
 * (k0, k1 multiples of the chunk, or k1 = k = n_in). Without split, the
 * whole of k. With split, the lanes start from lanes[] ([RM][RN][16]
 * floats, what the previous range left there) when k0 > 0, and are stored
 * back there instead of reduced when k1 < k. */
K_INLINE void fg_tile(const int type, const int RM, const int RN, const int split, const vlm__fgemm_t *g,
                      int64_t o, int64_t t, int64_t k, int64_t k0, int64_t k1, float *lanes) {
    const int step = VLM__FGEMM_STEP(type);
    const size_t esz = type == VLM_DTYPE_F32 ? 4 : 2;
    if (!split) {
        k0 = 0;
        k1 = k;
    }
    const int64_t kfull = k / step * step, kend = k1 < kfull ? k1 : kfull;
    const uint8_t *wr[FG_RM];
    const float *xr[FG_RN];
#pragma GCC unroll 8
    for (int r = 0; r < RM; r++) wr[r] = g->w + (size_t)(o + r) * g->row_bytes;
#pragma GCC unroll 8
    for (int j = 0; j < RN; j++) xr[j] = g->x + (size_t)(t + j) * g->ldx;
    fg_v acc[FG_RM][FG_RN][FG_H];
#pragma GCC unroll 8
    for (int r = 0; r < RM; r++)
#pragma GCC unroll 8
        for (int j = 0; j < RN; j++)
#pragma GCC unroll 2
            for (int h = 0; h < FG_H; h++)
                acc[r][j][h] = !split || k0 == 0 ? FG_ZERO() : FG_LOADF(lanes + (r * RN + j) * 16 + FG_VW * h);
    for (int64_t l = k0; l < kend; l += step) fg_step(type, RM, RN, wr, l, xr, l, acc);
    if (split && k1 < k) {
#pragma GCC unroll 8
        for (int r = 0; r < RM; r++)
#pragma GCC unroll 8
            for (int j = 0; j < RN; j++)
#pragma GCC unroll 2
                for (int h = 0; h < FG_H; h++) FG_STOREF(lanes + (r * RN + j) * 16 + FG_VW * h, acc[r][j][h]);
        return;
    }
    if (kfull < k) {
        /* the last, partial chunk of each row, zero-padded */
        _Alignas(64) uint8_t tail[FG_RM][32 * 4];
        const uint8_t *tr[FG_RM];
        for (int r = 0; r < RM; r++) {
            memset(tail[r], 0, (size_t)step * esz);
            memcpy(tail[r], wr[r] + (size_t)kfull * esz, (size_t)(k - kfull) * esz);
            tr[r] = tail[r];
        }
        fg_step(type, RM, RN, tr, 0, xr, kfull, acc);
    }
#pragma GCC unroll 8
    for (int j = 0; j < RN; j++)
#pragma GCC unroll 8
        for (int r = 0; r < RM; r++) g->y[(size_t)(t + j) * g->ldy + o + r] = fg_hsum(acc[r][j]);
}

/* Tokens [t0, t1) of rows [o, o + RM), elements [k0, k1): full tiles, then
 * one narrower; with split, tile i keeps its lanes at slot + i * FG_LANES. */
K_INLINE void fg_tiles(const int type, const int RM, const int split, const vlm__fgemm_t *g, int64_t o, int64_t t0,
                       int64_t t1, int64_t k, int64_t k0, int64_t k1, float *slot) {
    int64_t t = t0, i = 0;
    for (; t + FG_RN <= t1; t += FG_RN, i++)
        fg_tile(type, RM, FG_RN, split, g, o, t, k, k0, k1, split ? slot + i * FG_LANES : NULL);
    float *ln = split ? slot + i * FG_LANES : NULL;
    switch (t1 - t) {
    case 1: fg_tile(type, RM, 1, split, g, o, t, k, k0, k1, ln); break;
    case 2: fg_tile(type, RM, 2, split, g, o, t, k, k0, k1, ln); break;
#if FG_RN > 3
    case 3: fg_tile(type, RM, 3, split, g, o, t, k, k0, k1, ln); break;
    case 4: fg_tile(type, RM, 4, split, g, o, t, k, k0, k1, ln); break;
    case 5: fg_tile(type, RM, 5, split, g, o, t, k, k0, k1, ln); break;
#endif
    default: break;
    }
}

K_INLINE void fg_run(const int type, const vlm__fgemm_t *g, int64_t o0, int64_t o1, int64_t t0, int64_t t1) {
    const int64_t k = g->n_in;
    const int64_t kc = FG_KC_BYTES / (type == VLM_DTYPE_F32 ? 4 : 2);
    if (!g->lanes || k <= kc + kc / 2) {
        /* one pass over k */
        for (int64_t tb = t0; tb < t1; tb += FG_TB) {
            const int64_t te = t1 - tb < FG_TB ? t1 : tb + FG_TB;
            int64_t o = o0;
            for (; o + FG_RM <= o1; o += FG_RM) fg_tiles(type, FG_RM, 0, g, o, tb, te, k, 0, k, NULL);
            for (; o < o1; o++) fg_tiles(type, 1, 0, g, o, tb, te, k, 0, k, NULL);
        }
        return;
    }
    /* k in blocks of kc: each tile's lanes wait in g->lanes between blocks */
    for (int64_t tb = t0; tb < t1; tb += FG_TB) {
        const int64_t te = t1 - tb < FG_TB ? t1 : tb + FG_TB;
        for (int64_t ob = o0; ob < o1; ob += FG_MB) {
            const int64_t oe = o1 - ob < FG_MB ? o1 : ob + FG_MB;
            for (int64_t k0 = 0; k0 < k; k0 += kc) {
                const int64_t k1 = k - k0 < kc + kc / 2 ? k : k0 + kc;
                float *ln = g->lanes;
                int64_t o = ob;
                for (; o + FG_RM <= oe; o += FG_RM, ln += FG_SLOT)
                    fg_tiles(type, FG_RM, 1, g, o, tb, te, k, k0, k1, ln);
                for (; o < oe; o++, ln += FG_SLOT) fg_tiles(type, 1, 1, g, o, tb, te, k, k0, k1, ln);
                if (k1 == k) break;
            }
        }
    }
}

static void fg_run_f32(const vlm__fgemm_t *g, int64_t o0, int64_t o1, int64_t t0, int64_t t1) {
    fg_run(VLM_DTYPE_F32, g, o0, o1, t0, t1);
}

static void fg_run_f16(const vlm__fgemm_t *g, int64_t o0, int64_t o1, int64_t t0, int64_t t1) {
    fg_run(VLM_DTYPE_F16, g, o0, o1, t0, t1);
}

static void fg_run_bf16(const vlm__fgemm_t *g, int64_t o0, int64_t o1, int64_t t0, int64_t t1) {
    fg_run(VLM_DTYPE_BF16, g, o0, o1, t0, t1);
}

void VLM_K_FGEMM(const vlm__fgemm_t *g, int64_t o0, int64_t o1, int64_t t0, int64_t t1) {
    switch (g->type) {
    case VLM_DTYPE_F32: fg_run_f32(g, o0, o1, t0, t1); break;
    case VLM_DTYPE_F16: fg_run_f16(g, o0, o1, t0, t1); break;
    case VLM_DTYPE_BF16: fg_run_bf16(g, o0, o1, t0, t1); break;
    default: VLM_ASSERT(!"fgemm: not a float weight type"); break;
    }
}

#undef FG_H
#undef FG_RM
#undef FG_RN
#undef FG_LOADF
#undef FG_FMA
#undef FG_ZERO
#undef FG_VW
#undef FG_TB
#undef FG_STOREF
#undef FG_LANES
#undef FG_SLOT
#undef FG_KC_BYTES
#undef FG_MB
