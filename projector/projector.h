/* projector/projector.h - maps vision features to the text model's
 * embedding space.
 *
 * The projector sits between a vision encoder (vision/encoder.h), whose
 * rows are n_embd_vit wide, and the decoder, which takes rows of the text
 * model's n_embd. Its weights live in the mmproj GGUF next to the encoder's.
 * Variants are an enum from the start; each is read from
 * clip.projector_type:
 *   VLM_PROJECTOR_LLAVA_MLP ("mlp", LLaVA-1.5): out = mm.2(gelu(mm.0(x))),
 *     both linear layers with biases, GELU = tanh approximation through
 *     ggml's fp16 table (x <= -10 -> 0, x >= 10 -> x, else
 *     f16(gelu(f16(x)))), as llama.cpp c392e50 computes it.
 * The widths are checked against each other when the projector loads, so a
 * mismatched pair of files fails then, not at the first image.
 *
 * Numerics: f32 OpenBLAS sgemm from the calling thread; F16 weights are
 * widened to f32 at load time; bias and GELU run on the pool.
 */
#ifndef VLM_PROJECTOR_PROJECTOR_H
#define VLM_PROJECTOR_PROJECTOR_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "core/gguf.h"
#include "core/pool.h"

typedef enum vlm_projector_type {
    VLM_PROJECTOR_LLAVA_MLP = 0,  /* "mlp": mm.0 -> GELU -> mm.2 */
    VLM_PROJECTOR_COUNT
} vlm_projector_type_t;

typedef struct vlm_projector vlm_projector_t;

/* Parses a clip.projector_type value (s is len bytes, not NUL-terminated).
 * Returns VLM_OK, or VLM_ERR_UNSUPPORTED with err naming the value. */
int vlm_projector_type_parse(const char *s, size_t len, vlm_projector_type_t *out,
                             vlm_error_t *err);

/* "mlp" for VLM_PROJECTOR_LLAVA_MLP; "unknown" otherwise. */
const char *vlm_projector_type_name(vlm_projector_type_t type);

/* Loads the projector of the mmproj g (borrowed: g must outlive it).
 * n_embd_vit is the width of the encoder's feature rows and n_embd_text the
 * text model's n_embd; a mismatch with the file's weights fails with
 * VLM_ERR_SHAPE naming both sizes ("mmproj projects to 4096 but the text
 * model's n_embd is 2048"). A missing key defaults to "mlp" as in llama.cpp;
 * other types give VLM_ERR_UNSUPPORTED naming the value; missing or
 * misshapen tensors give VLM_ERR_NOT_FOUND / VLM_ERR_SHAPE / VLM_ERR_TYPE
 * naming the tensor. On success *out owns its widened copies. */
int vlm_projector_load(const vlm_gguf_t *g, int32_t n_embd_vit, int32_t n_embd_text,
                       vlm_projector_t **out, vlm_error_t *err);

/* Frees the projector; NULL-safe, and sets *self_p to NULL. */
void vlm_projector_destroy(vlm_projector_t **self_p);

vlm_projector_type_t vlm_projector_type(const vlm_projector_t *p);
int32_t vlm_projector_n_in(const vlm_projector_t *p);   /* n_embd_vit */
int32_t vlm_projector_n_out(const vlm_projector_t *p);  /* n_embd_text */

/* Bytes held beyond the file mapping (f32 copies of F16 weights). */
size_t vlm_projector_extra_bytes(const vlm_projector_t *p);

/* FLOPs of projecting one row (2 per multiply-add), for benchmarks. */
double vlm_projector_flops_per_row(const vlm_projector_t *p);

/* Projects features [n_rows][n_in] into out [n_rows][n_out] (caller
 * allocated; must not overlap features). pool may be NULL. Returns VLM_OK,
 * VLM_ERR_INVALID_ARG or VLM_ERR_NOMEM. Thread-safe (scratch is per call). */
int vlm_projector_apply(const vlm_projector_t *p, vlm_pool_t *pool, const float *features,
                        int32_t n_rows, float *out, vlm_error_t *err);

#endif
