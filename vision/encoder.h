/* vision/encoder.h - the interface every vision encoder family implements.
 *
 * The image pipeline is: decoded image (u8) -> preprocessed image (f32,
 * vision/preprocess) -> ViT features (this interface) -> projected
 * embeddings (projector/) -> decoder. An encoder takes preprocessed f32
 * images in HWC layout and writes, per image, a [n_rows][n_embd_out] matrix
 * of features; the projector then maps each row to the text model's width.
 *
 * Families differ in what sizes they accept and how many rows an image
 * gives: CLIP (LLaVA-1.5) takes only image_size x image_size and always
 * gives (image_size / patch)^2 rows; a native-resolution family (Pixtral,
 * planned) takes any multiple of its patch size and gives (w/p) * (h/p)
 * rows. Callers therefore ask n_rows() per image before they size the
 * output. A family is an enum value plus a table of functions, so the
 * daemon holds one vlm_encoder_t whatever the model is, with no
 * clip_is_xyz() predicates.
 */
#ifndef VLM_VISION_ENCODER_H
#define VLM_VISION_ENCODER_H

#include <stdint.h>

#include "core/error.h"
#include "core/pool.h"

/* Vision encoder families. */
typedef enum vlm_vision_arch {
    VLM_VISION_ARCH_CLIP = 0,   /* CLIP ViT: square input, class token, learned positions */
    /* VLM_VISION_ARCH_PIXTRAL: native resolution, 2D RoPE (planned) */
    VLM_VISION_ARCH_COUNT
} vlm_vision_arch_t;

static inline const char *vlm_vision_arch_name(vlm_vision_arch_t arch) {
    switch (arch) {
    case VLM_VISION_ARCH_CLIP: return "clip";
    default: return "unknown";
    }
}

/* One preprocessed image, borrowed by the encoder for the duration of a call. */
typedef struct vlm_vision_input {
    const float *pixels;   /* [height][width][3] f32, interleaved RGB (HWC), normalised */
    int32_t width;
    int32_t height;
} vlm_vision_input_t;

/* The functions of one family; self is the family's own object. */
typedef struct vlm_encoder_ops {
    vlm_vision_arch_t arch;
    /* Width of a feature row (what the projector consumes). */
    int32_t (*n_embd_out)(const void *self);
    /* Rows of features an image of width x height gives, or VLM_ERR_SHAPE
     * (with err naming the accepted sizes) when the family cannot take it. */
    int (*n_rows)(const void *self, int32_t width, int32_t height, int32_t *n_rows,
                  vlm_error_t *err);
    /* Encodes n_images images; features receives, image after image, each
     * image's [n_rows][n_embd_out] matrix (caller-allocated). pool may be
     * NULL (one thread). Thread-safe: scratch memory is per call. */
    int (*encode)(const void *self, vlm_pool_t *pool, const vlm_vision_input_t *images,
                  int n_images, float *features, vlm_error_t *err);
} vlm_encoder_ops_t;

/* A borrowed view of an encoder: it does not own self and must not outlive
 * it. Obtain one from the family (vlm_clip_encoder()). */
typedef struct vlm_encoder {
    const vlm_encoder_ops_t *ops;
    const void *self;
} vlm_encoder_t;

static inline vlm_vision_arch_t vlm_encoder_arch(vlm_encoder_t e) { return e.ops->arch; }

static inline int32_t vlm_encoder_n_embd_out(vlm_encoder_t e) { return e.ops->n_embd_out(e.self); }

static inline int vlm_encoder_n_rows(vlm_encoder_t e, int32_t width, int32_t height,
                                     int32_t *n_rows, vlm_error_t *err) {
    return e.ops->n_rows(e.self, width, height, n_rows, err);
}

static inline int vlm_encoder_encode(vlm_encoder_t e, vlm_pool_t *pool,
                                     const vlm_vision_input_t *images, int n_images,
                                     float *features, vlm_error_t *err) {
    return e.ops->encode(e.self, pool, images, n_images, features, err);
}

#endif
