/* core/matmul.h - y = W x for a batch of activation rows.
 *
 * Layout convention for the whole project (see also core/gguf.h):
 *   W: [n_out][n_in] in its file type, one row per output (ggml ne = {n_in, n_out})
 *   X: [n_tok][n_in] f32, row-major, one row per token / patch
 *   Y: [n_tok][n_out] f32, row-major
 *   Y[t][o] = sum_i W[o][i] * X[t][i]   (i.e. Y = X W^T)
 *
 * Small batches (decoding) quantize each X row to the weight's vec_dot type
 * and run the dot kernels over output rows split across the pool. Large
 * batches of F32/F16/BF16 weights go through OpenBLAS cblas_sgemm on
 * dequantized weight panels; quantized weights use int8 kernels. Either path
 * reproduces ggml's activation rounding.
 */
#ifndef VLM_CORE_MATMUL_H
#define VLM_CORE_MATMUL_H

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "pool.h"

typedef struct vlm_weight {
    const char *name;      /* tensor name, for errors (borrowed) */
    uint32_t type;         /* vlm_dtype_t */
    int64_t n_in;          /* row length (ggml ne[0]) */
    int64_t n_out;         /* rows (ggml ne[1]) */
    size_t row_bytes;      /* vlm_dtype_row_size(type, n_in) */
    const void *data;      /* [n_out][row_bytes], usually inside the GGUF mapping */
    void *priv;            /* matmul's own load-time data (repacked/widened copy), or NULL */
} vlm_weight_t;

/* Fills w from a 2-D GGUF tensor (or a 3-D one whose trailing dims are
 * flattened into rows). Checks the type is supported and n_in is a multiple
 * of its block size. Borrowed pointers: the reader must outlive w. */
int vlm_weight_from_tensor(vlm_weight_t *w, const vlm_gguf_tensor_t *t, vlm_error_t *err);

/* Optional load-time preparation (widening F16 to F32 for sgemm, repacking
 * quantized rows for faster kernels). Costs memory; returns the bytes added
 * in *extra_bytes. vlm_weight_release() frees it. */
int vlm_weight_prepare(vlm_weight_t *w, int flags, size_t *extra_bytes, vlm_error_t *err);
void vlm_weight_release(vlm_weight_t *w);
#define VLM_WEIGHT_PREPARE_SGEMM_F32 1  /* keep an f32 copy of F16/BF16 weights for sgemm */

/* Y = X W^T as above. pool may be NULL (single thread). */
void vlm_matmul(vlm_pool_t *pool, const vlm_weight_t *w, const float *x, int64_t n_tok, float *y);

/* Y_k = X W_k^T for n_w weights that share X (same n_in): ys[k] is
 * [n_tok][ws[k]->n_out]. Same results as n_w vlm_matmul() calls, but X is
 * converted once per activation type and all weights run in one parallel
 * section, so use it for Q/K/V and for FFN gate/up. */
void vlm_matmul_multi(vlm_pool_t *pool, const vlm_weight_t *const *ws, int n_w, const float *x, int64_t n_tok,
                      float *const *ys);

/* Reference path: dequantize W to f32 rows and use plain loops (for tests). */
void vlm_matmul_ref(const vlm_weight_t *w, const float *x, int64_t n_tok, float *y);

#endif
