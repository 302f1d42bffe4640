/* core/fgemm.h - internal: the GEMM kernels for F32 / F16 / BF16 weights.
 *
 * Why a kernel of our own. llama.cpp (c392e50, x86 with AVX-512) multiplies
 * float weights with llamafile's tinyBLAS whenever a batch has two or more
 * rows, and every output of tinyBLAS adds its terms in a fixed order. These
 * kernels add them in that same order for every batch size, so that
 *   - a row's result never depends on which other rows share the call (the
 *     daemon's batched and unbatched greedy outputs stay equal), and
 *   - prefill results are bit-identical to llama.cpp's.
 * (llama.cpp computes single-row products with ggml_vec_dot instead, so our
 * decode rows differ from its in the last bits; see matmul.h.)
 *
 * The order, for output y = sum_i w[i] x[i] over k = n_in elements:
 *   F32, F16: 16 float lanes; lane j accumulates w[i] * x[i] for every
 *     i = j (mod 16), in increasing i, with one fused multiply-add each
 *     (tinyBLAS<16, __m512>: _mm512_fmadd_ps). F16 values (weights, and
 *     activations rounded to f16 as ggml does) are widened exactly first.
 *   BF16: the order of _mm512_dpbf16_ps (tinyBLAS<32, __m512bh>, which the
 *     reference machine's AVX512_BF16 selects): per 32-element chunk at c,
 *     lane j first adds w[c+2j+1] x[c+2j+1], then w[c+2j] x[c+2j], each a
 *     fused multiply-add, with bf16 subnormal inputs read as zero. (The
 *     instruction also flushes subnormal partial sums to zero; we do not,
 *     which only matters for sums below 1.2e-38. tests/test_quant.c checks
 *     all of this against the instruction itself where the CPU has it.)
 *   Then the 16 lanes are reduced as _mm512_reduce_add_ps does:
 *     s8[j] = l[j] + l[j+8]; s4[j] = s8[j] + s8[j+4];
 *     y = (s4[0] + s4[2]) + (s4[1] + s4[3]).
 * tinyBLAS itself needs k % 16 == 0 (k % 32 for BF16); when k is not a
 * multiple, the last chunk is zero-padded here. (llama.cpp would use
 * ggml_vec_dot for such a weight whatever the batch size, and also when
 * n_out % 4 != 0; we keep this order for those too, so their results
 * differ from llama.cpp's in the last bits at every batch size.)
 *
 * The kernels exist for AVX-512 (tiles of 4 weight rows x 6 tokens of
 * __m512 accumulators, like tinyBLAS), AVX2 (2 x 3 tiles, each 16-lane
 * accumulator held in two __m256) and in scalar C (matmul.c); all three give
 * the same bits.
 */
#ifndef VLM_CORE_FGEMM_H
#define VLM_CORE_FGEMM_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"

/* One product Y = X W^T (see matmul.h for the layout). */
typedef struct vlm__fgemm {
    uint32_t type;        /* VLM_DTYPE_F32, VLM_DTYPE_F16 or VLM_DTYPE_BF16 */
    const uint8_t *w;     /* [n_out][row_bytes] weight rows in the file's type */
    size_t row_bytes;     /* bytes from one weight row to the next */
    int64_t n_in;         /* k: elements per weight row */
    const float *x;       /* [n_tok][ldx] activations in the layout below */
    int64_t ldx;          /* >= vlm__fgemm_k_pad(type, n_in) */
    float *y;             /* [n_tok][ldy] */
    int64_t ldy;
    float *lanes;         /* NULL, or VLM__FGEMM_LANES_FLOATS floats of scratch for this thread alone
                           * (64-byte aligned): lets the x86 kernels split long rows into blocks */
} vlm__fgemm_t;

/* Scratch per thread in vlm__fgemm_t.lanes (336 KiB). */
#define VLM__FGEMM_LANES_FLOATS (7 * 32 * 384)

/* Activation layout. Row t of x holds X[t] rounded to the weight's type
 * (f16 or bf16, round to nearest even as ggml's from_float; bf16
 * subnormals then read as zero), stored as f32 and zero-padded to
 * k_pad = n_in rounded up to VLM__FGEMM_STEP(type) elements. For BF16 each
 * 32-element chunk is stored as its 16 odd-index elements (in order) and
 * then its 16 even-index elements, which is how the dpbf16 order pairs them
 * with the lanes. matmul.c builds it (vlm__fgemm_act_row). */
#define VLM__FGEMM_STEP(type) ((type) == VLM_DTYPE_BF16 ? 32 : 16)

/* Computes y[t * ldy + o] for rows o0 <= o < o1 and tokens t0 <= t < t1. */
typedef void (*vlm__fgemm_fn)(const vlm__fgemm_t *g, int64_t o0, int64_t o1, int64_t t0, int64_t t1);

void vlm__fgemm_scalar(const vlm__fgemm_t *g, int64_t o0, int64_t o1, int64_t t0, int64_t t1);
void vlm__fgemm_avx2(const vlm__fgemm_t *g, int64_t o0, int64_t o1, int64_t t0, int64_t t1);
void vlm__fgemm_avx512(const vlm__fgemm_t *g, int64_t o0, int64_t o1, int64_t t0, int64_t t1);

#endif
