/* core/matmul.h - y = W x for a batch of activation rows.
 *
 * Layout convention for the whole project (see also core/gguf.h):
 *   W: [n_out][n_in] in its file type, one row per output (ggml ne = {n_in, n_out})
 *   X: [n_tok][n_in] f32, row-major, one row per token / patch
 *   Y: [n_tok][n_out] f32, row-major
 *   Y[t][o] = sum_i W[o][i] * X[t][i]   (i.e. Y = X W^T)
 *
 * Each X row is first converted to the weight's vec_dot type exactly as
 * ggml does (Q8_0/Q8_1/Q8_K, f16, bf16). Quantized weights then use int8
 * kernels on repacked panels (or on the file's layout) that add their float
 * terms in the same order as llama.cpp's x86 CPU backend (c392e50), so the
 * results are bit-identical to its.
 *
 * F32 / F16 / BF16 weights use our own GEMM kernels (core/fgemm.h), which
 * add every output's terms in the order of llama.cpp's llamafile tinyBLAS
 * (16 FMA lanes, then _mm512_reduce_add_ps's tree; BF16 in dpbf16's order)
 * at EVERY batch size. So:
 *  - results are batch-invariant: row t of an n-row call equals, bit for
 *    bit, the same row computed alone or next to any other rows (the
 *    daemon's greedy outputs do not depend on how requests are batched);
 *  - batches of 2 or more rows are bit-identical to llama.cpp's (which uses
 *    tinyBLAS for them when n_in % 16 == 0 (32 for BF16) and n_out % 4 == 0);
 *  - single rows (decode steps) differ from llama.cpp's in the last bits,
 *    since llama.cpp computes a 1-row product with ggml_vec_dot_f32 /
 *    _f16 / _bf16, whose order is another (4 x 16 lanes over n & ~63, then
 *    the remainder). That includes a prompt's last row when only its logits
 *    are wanted: llama.cpp drops the other rows before the last layer's FFN,
 *    so that FFN and the output projection run on one row there.
 * Speed (Zen 5): 1.3-1.8x OpenBLAS's sgemm (Haswell kernels there) on 512
 * rows, 1.5-3x on 16 rows; on AVX2-only CPUs about 0.6-1x. Weights prepared
 * with VLM_WEIGHT_PREPARE_SGEMM give invariance up for raw speed: their
 * batches of 16 rows or more go through OpenBLAS cblas_sgemm.
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

/* Optional load-time preparation. Quantized weights are repacked into
 * interleaved panels (kernels.h) in anonymous memory of about the weight's
 * own size; from then on vlm_matmul reads only that copy, never w->data, so
 * the caller may drop the file mapping of those bytes. Float weights need
 * no preparation (their kernels read w->data), except with
 * VLM_WEIGHT_PREPARE_SGEMM. Returns the bytes added in *extra_bytes (0 when
 * there is nothing to prepare, e.g. F32 or a CPU without AVX2).
 * vlm_weight_release() frees it; preparing twice releases the first copy.
 * Not thread-safe against concurrent vlm_matmul on w. */
int vlm_weight_prepare(vlm_weight_t *w, int flags, size_t *extra_bytes, vlm_error_t *err);
void vlm_weight_release(vlm_weight_t *w);
/* Float weights: batches of 16 rows or more through OpenBLAS cblas_sgemm
 * (F16 / BF16 weights get an f32 copy for it), faster for large batches but
 * neither batch-invariant nor in llama.cpp's order; smaller batches still
 * use the tinyBLAS-order kernels. No effect on quantized weights. */
#define VLM_WEIGHT_PREPARE_SGEMM 1
#define VLM_WEIGHT_PREPARE_SGEMM_F32 VLM_WEIGHT_PREPARE_SGEMM /* former name */
/* Quantized weights: sum in a faster order instead of ggml's. Results then
 * differ from llama.cpp's in the last bits (which int8 activation roundings
 * of later layers can amplify); by default every quantized product is
 * bit-identical to what llama.cpp's CPU backend computes on x86. */
#define VLM_WEIGHT_PREPARE_FAST_ORDER 2

/* Y = X W^T as above. pool may be NULL (single thread). Each call
 * allocates its scratch (the converted activations, a few rows per thread)
 * and frees it before returning. Returns VLM_OK (also for n_tok <= 0, which
 * does nothing) or VLM_ERR_NOMEM when that scratch cannot be allocated; Y
 * is then partly written and must not be used. There is no error detail:
 * the caller knows which layer and how many rows, and says so. */
int vlm_matmul(vlm_pool_t *pool, const vlm_weight_t *w, const float *x, int64_t n_tok, float *y);

/* Y_k = X W_k^T for n_w weights that share X (same n_in): ys[k] is
 * [n_tok][ws[k]->n_out]. Same results as n_w vlm_matmul() calls, but X is
 * converted once per activation type and all weights run in one parallel
 * section, so use it for Q/K/V and for FFN gate/up. Returns VLM_OK or
 * VLM_ERR_NOMEM as vlm_matmul() (then every ys[k] is to be discarded). */
int vlm_matmul_multi(vlm_pool_t *pool, const vlm_weight_t *const *ws, int n_w, const float *x, int64_t n_tok,
                     float *const *ys);

/* Reference path: dequantize W to f32 rows and use plain loops (for tests
 * only: it aborts if its one row of scratch cannot be allocated). */
void vlm_matmul_ref(const vlm_weight_t *w, const float *x, int64_t n_tok, float *y);

#endif
