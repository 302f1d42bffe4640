/* vision/clip.h - the CLIP ViT encoder of a LLaVA-1.5 "mmproj" GGUF.
 *
 * Loads the vision tower of an mmproj file (arch "clip", projector type
 * "mlp") and computes what llama.cpp c392e50 (examples/llava/clip.cpp)
 * computes before its projector:
 *   1. patch embedding: a stride-p convolution without bias, done as one
 *      GEMM over im2col rows [n_patches][3 * p * p]; with an F16 kernel the
 *      pixel values are rounded to f16 first, as ggml's F16 im2col does;
 *   2. prepend v.class_embd, add v.position_embd (row 0 = class token);
 *   3. v.pre_ln (LayerNorm; skipped when the file has none, as llama.cpp);
 *   4. clip.vision.block_count - 1 pre-norm transformer layers (see below):
 *      ln1 -> q, k, v (+bias) -> q / sqrt(d_head) -> softmax(q k^T) v per
 *      head -> attn_out (+bias) -> residual; ln2 -> ffn_down (+bias; this is
 *      fc1, n_embd -> n_ff despite its name) -> quick-GELU, or tanh-GELU when
 *      clip.use_gelu -> ffn_up (+bias; fc2) -> residual;
 *   5. v.post_ln when the file has it (llama.cpp c392e50 applies it whenever
 *      present; LLaVA-1.5 files have none);
 *   6. the class token is dropped: the features are the n_patches patch rows
 *      in raster order.
 *
 * The layer quirk: llama.cpp runs only block_count - 1 of the layers stored
 * in the file (ggml-org/llama.cpp issue #25817). The official converter
 * already stores num_hidden_layers - 1 layers for LLaVA (whose features are
 * the output of layer -2), so a real LLaVA-1.5 mmproj has block_count 23 and
 * llama.cpp computes its features one layer short. We reproduce this by
 * default because the reference embeddings depend on it; the last stored
 * layer is validated but never loaded. vlm_clip_opts_t.run_all_layers runs
 * all stored layers instead (what LLaVA itself computes). A file with
 * clip.vision.feature_layer (later llama.cpp, granite) runs up to the deepest
 * listed layer and concatenates the hidden states after each listed number
 * of layers (0 = the pre-LN output), the deepest one after post_ln.
 *
 * Numerics: all weight products are f32 OpenBLAS cblas_sgemm calls made from
 * the calling thread. F16 weights are widened to f32 once at load time
 * (vlm_clip_extra_bytes() reports the cost), or, with keep_f16, matrix by
 * matrix during the forward pass (same results); LayerNorm, softmax and residual
 * adds are f32 with ggml's accumulation (vision/vit_ops.h); the activations
 * use ggml's fp16 lookup tables. Element-wise work runs on a vlm_pool_t.
 * Against llama.cpp's own embeddings (encoder + projector) this gives
 * max|diff|/max|ref| of 1.3e-4 with the F32 mmproj and 5.7e-4 with the F16
 * one of tests/data/golden (tests/test_clip.c prints the figures). Results
 * of a batch match one-by-one encodes to rounding noise, not bit for bit
 * (OpenBLAS's summation order depends on the matrix sizes).
 */
#ifndef VLM_VISION_CLIP_H
#define VLM_VISION_CLIP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "core/gguf.h"
#include "core/pool.h"
#include "vision/encoder.h"

#define VLM_CLIP_MAX_FEATURE_LAYERS 8

typedef struct vlm_clip vlm_clip_t;

/* Load options; start from vlm_clip_opts_default() (equal to a zeroed struct). */
typedef struct vlm_clip_opts {
    bool run_all_layers;  /* false: llama.cpp's block_count - 1 layers; true: all of them */
    bool keep_f16;        /* false: widen F16 layer matrices to f32 once at load time;
                           * true: keep them in the mapping and widen each into a
                           * scratch panel right before its GEMM (saves 2x their F16
                           * size, 1.1 GiB at ViT-L, for a few percent per image) */
    int32_t max_batch;    /* images per forward pass (bounds scratch memory); 0 = 8, at most 64 */
} vlm_clip_opts_t;

static inline vlm_clip_opts_t vlm_clip_opts_default(void) {
    vlm_clip_opts_t o = {false, false, 0};
    return o;
}

/* Hyperparameters as read from the file, plus derived sizes. */
typedef struct vlm_clip_hparams {
    int32_t image_size;       /* clip.vision.image_size: S, images are S x S */
    int32_t patch_size;       /* clip.vision.patch_size: p, divides S */
    int32_t n_patches_side;   /* S / p */
    int32_t n_patches;        /* (S / p)^2: feature rows per image */
    int32_t n_pos;            /* n_patches + 1 (class token) */
    int32_t n_embd;           /* clip.vision.embedding_length */
    int32_t n_head;           /* clip.vision.attention.head_count */
    int32_t d_head;           /* n_embd / n_head */
    int32_t n_ff;             /* clip.vision.feed_forward_length */
    int32_t n_layer;          /* clip.vision.block_count: layers stored in the file */
    int32_t n_layer_run;      /* layers actually run (n_layer - 1 by default, see above) */
    int32_t projection_dim;   /* clip.vision.projection_dim (informative) */
    int32_t n_feature_layers; /* hidden states concatenated into a feature row (1 for LLaVA-1.5) */
    int32_t feature_layers[VLM_CLIP_MAX_FEATURE_LAYERS]; /* ascending layer counts */
    int32_t n_embd_out;       /* feature width: n_embd * n_feature_layers */
    float eps;                /* clip.vision.attention.layer_norm_epsilon */
    float mean[3];            /* clip.vision.image_mean (for the preprocessing) */
    float std[3];             /* clip.vision.image_std */
    bool use_gelu;            /* clip.use_gelu: tanh-GELU in the MLP, else quick-GELU */
    bool has_pre_ln;          /* v.pre_ln.* present */
    bool has_post_ln;         /* v.post_ln.* present (applied after the last layer run) */
    bool patch_f16;           /* v.patch_embd.weight is F16: pixels rounded to f16 */
} vlm_clip_hparams_t;

/* Loads the vision encoder of the mmproj g. g is borrowed and must outlive
 * the encoder (F32 weights are used in place in its mapping). opts may be
 * NULL for the defaults. On failure returns a VLM_ERR_* code with err naming
 * the key or tensor at fault: VLM_ERR_UNSUPPORTED for another architecture or
 * projector type ("clip.projector_type \"ldp\" is not supported"),
 * VLM_ERR_NOT_FOUND / VLM_ERR_SHAPE / VLM_ERR_TYPE for a missing, misshapen
 * or wrongly typed tensor, VLM_ERR_MISSING_KEY / VLM_ERR_TYPE /
 * VLM_ERR_FORMAT for bad metadata. On success *out owns the widened copies. */
int vlm_clip_load(const vlm_gguf_t *g, const vlm_clip_opts_t *opts, vlm_clip_t **out,
                  vlm_error_t *err);

/* Frees the encoder; NULL-safe, and sets *self_p to NULL. */
void vlm_clip_destroy(vlm_clip_t **self_p);

/* The hyperparameters; valid as long as c. */
const vlm_clip_hparams_t *vlm_clip_hparams(const vlm_clip_t *c);

/* Bytes of memory the encoder holds beyond the file mapping: the f32
 * copies of F16 weights (about 2x the F16 weights of the layers run). */
size_t vlm_clip_extra_bytes(const vlm_clip_t *c);

/* Encodes n_images preprocessed images, contiguous [n_images][S][S][3]
 * (HWC f32), into features [n_images][n_patches][n_embd_out] (caller
 * allocated). Images are processed max_batch at a time, stacked into one
 * matrix so the weight GEMMs are larger (faster per image than one by one).
 * pool may be NULL (one thread); OpenBLAS uses its own threads. Returns
 * VLM_OK, VLM_ERR_INVALID_ARG or VLM_ERR_NOMEM. Thread-safe: all scratch
 * memory is allocated per call. */
int vlm_clip_encode(const vlm_clip_t *c, vlm_pool_t *pool, const float *images, int n_images,
                    float *features, vlm_error_t *err);

/* The same for images that are not contiguous: images[i] points to one
 * [S][S][3] image. */
int vlm_clip_encode_ptrs(const vlm_clip_t *c, vlm_pool_t *pool, const float *const *images,
                         int n_images, float *features, vlm_error_t *err);

/* FLOPs of encoding one image (2 per multiply-add of every GEMM), for
 * benchmarks. */
double vlm_clip_flops_per_image(const vlm_clip_t *c);

/* This encoder seen through the family-independent interface
 * (vision/encoder.h); the view borrows c. */
vlm_encoder_t vlm_clip_encoder(const vlm_clip_t *c);

#endif
