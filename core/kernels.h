/* core/kernels.h - internal interface between quant.c / matmul.c and the
 * per-instruction-set kernel files (kernels_avx2.c, kernels_avx512.c).
 *
 * Each ISA exports one constant table of function pointers. quant.c holds
 * the scalar table (the reference) and picks a table at run time; matmul.c
 * uses the table's panel kernels on weights repacked into "panels".
 *
 * Panels. A panel is NR consecutive weight rows (NR = 16 for AVX-512, 8 for
 * AVX2) stored interleaved so that one vector register holds 4 consecutive
 * quants of each of the NR rows ("a group": NR x 4 bytes). A dot kernel then
 * broadcasts 4 activation bytes of one token to every lane and accumulates
 * NR row sums at once (vpdpbusd on AVX-512 VNNI), with no horizontal sums:
 * lane r of the result is output row r. Rows past n_out in the last panel are
 * zero. The exact byte layout of each type is described in matmul.c, which
 * writes it (vlm__panel_pack), and read by the kernels.
 *
 * Activations for panel kernels are quantized exactly as ggml does (Q8_0,
 * Q8_1 or Q8_K values, bit for bit) and then stored "planar" (vlm__qact_t) so
 * a kernel can broadcast 4 bytes or one scale with a single load.
 *
 * Summation order. The integer sums are exact, but float sums depend on
 * their order, and llama.cpp's logits on quantized models are only
 * reproduced bit for bit when every dot product adds its float terms in
 * ggml's order (a last-bit difference flips some int8 activation roundings
 * in the next layer). The `panel` kernels therefore follow ggml's order for
 * each type (c392e50, x86 AVX2/AVX-512 build): Q4_0 as its repacked 8x8
 * gemv/gemm, Q8_0/Q5_0 as vec_dot/tinyBLAS (8 float lanes of 4 products
 * each, then ggml's horizontal sum), Q4_1/Q5_1/Q4_K/Q5_K/Q6_K as their AVX2
 * vec_dot. `panel_fast` kernels sum each block's integer total once, which
 * is about twice as fast for prefill but not bit-identical to llama.cpp.
 */
#ifndef VLM_CORE_KERNELS_H
#define VLM_CORE_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "matmul.h"
#include "quant.h"

/* Quantized activations of n_tok rows in planar form. Built by matmul.c from
 * ggml-exact Q8_0 / Q8_1 / Q8_K blocks. */
typedef struct vlm__qact {
    const int8_t *qs;       /* [n_tok][n_in] the int8 values */
    const float *d;         /* [n_tok][n_in/32] scale of each 32-block (Q8_K: the 256-block's d repeated) */
    const int32_t *corr;    /* [n_tok][n_corr] -offset * sum(qs) per sub-block (offset types), else NULL */
    const float *ds;        /* [n_tok][n_in/32] min-term factor per 32-block: Q8_1 s, or d*sum(qs) for Q8_K; else NULL */
    const int32_t *lane_corr; /* [n_tok][n_in/4] -offset * sum of each 4 values (ggml-order kernels), or NULL */
    const int32_t *spair;   /* [n_tok][n_in/64] Q8_K 32-sums S_2l, S_2l+1 as two int16 (ggml-order Q4_K/Q5_K) */
    int64_t n_in;
    int64_t n_corr;         /* sub-blocks per row in corr: n_in/32, or n_in/16 for Q6_K */
} vlm__qact_t;

/* Computes y[t * ldy + r] = dot(panel row r, activation row t) for the
 * tokens t0 <= t < t0 + nt and rows r < nvalid of one panel. */
typedef void (*vlm__panel_fn)(const void *panel, const vlm__qact_t *a, int64_t t0, int64_t nt,
                              float *y, int64_t ldy, int nvalid);

/* Converters between f32 rows and other float formats / quantized blocks. */
typedef void (*vlm__row_fn)(const float *x, void *y, int64_t n);
typedef void (*vlm__widen_fn)(const void *x, float *y, int64_t n);

typedef struct vlm__kernel_table {
    vlm_isa_t isa;
    vlm_vec_dot_fn vec_dot[VLM_DTYPE_COUNT];      /* by weight type, original ggml layout */
    vlm__row_fn quantize_act[VLM_DTYPE_COUNT];    /* by vec_dot type: ggml-exact activation conversion */
    vlm__widen_fn widen[VLM_DTYPE_COUNT];         /* F16/BF16 rows to f32 (exact) */
    int panel_rows;                               /* NR, 0 when there are no panel kernels */
    bool panel_q8_0_signed;                       /* Q8_0 panels keep signed quants (else q ^ 0x80) */
    vlm__panel_fn panel[VLM_DTYPE_COUNT];         /* by weight type, ggml's summation order; NULL = none */
    vlm__panel_fn panel_fast[VLM_DTYPE_COUNT];    /* by weight type, faster, another summation order */
} vlm__kernel_table_t;

extern const vlm__kernel_table_t vlm__kernels_scalar;
extern const vlm__kernel_table_t vlm__kernels_avx2;
extern const vlm__kernel_table_t vlm__kernels_avx512;

/* The table for an ISA (falls back to scalar when the CPU lacks it). */
const vlm__kernel_table_t *vlm__kernels_get(vlm_isa_t isa);

/* matmul.c entry points with an explicit ISA (tests compare them). The
 * panels of a prepared weight carry the ISA they were packed for, which
 * then wins over the isa argument of vlm__matmul_isa. The matmuls return
 * VLM_OK or VLM_ERR_NOMEM as vlm_matmul(). */
int vlm__weight_prepare_isa(vlm_weight_t *w, int flags, vlm_isa_t isa, size_t *extra_bytes, vlm_error_t *err);
int vlm__matmul_isa(vlm_pool_t *pool, const vlm_weight_t *w, const float *x, int64_t n_tok, float *y,
                    vlm_isa_t isa);
int vlm__matmul_multi_isa(vlm_pool_t *pool, const vlm_weight_t *const *ws, int n_w, const float *x,
                          int64_t n_tok, float *const *ys, vlm_isa_t isa);

/* Test hook: the n-th scratch allocation of vlm_matmul / vlm_matmul_multi
 * from now on fails (n = 1: the next one), so the call making it returns
 * VLM_ERR_NOMEM; n <= 0 disarms it. Process-wide; for tests only. A call
 * normally makes one scratch allocation (two with more than 8 weights or
 * with sgemm-prepared F16 / BF16 weights). */
void vlm__matmul_fail_next_alloc(int n);

/* Block size and block bytes of the types this module handles; 0 for others. */
int vlm__block_size(uint32_t type);
size_t vlm__block_bytes(uint32_t type);

#endif
