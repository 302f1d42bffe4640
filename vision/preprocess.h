/* vision/preprocess.h - a decoded u8 RGB image -> the normalised f32 image
 * the vision encoder takes.
 *
 * Two modes for LLaVA-1.5 style models (a square S x S input):
 *   - VLM_PREPROCESS_HF (default): what LLaVA-1.5 was trained with. LLaVA's
 *     expand2square (pad to a centred square of side max(w, h) with the mean
 *     colour (int)(mean[c] * 255), the odd extra row/column at the
 *     bottom/right), then transformers' CLIPImageProcessor on PIL: resize the
 *     shortest edge to S with Pillow's BICUBIC filter (Resample.c, 8-bit
 *     path: separable, horizontal pass first stored as u8, 22-bit fixed-point
 *     coefficients, support widened by the scale when shrinking), centre crop
 *     S x S at ((w' - S) // 2, (h' - S) // 2), rescale u8 * (1/255) in double
 *     rounded to float, normalise (v - mean) / std in float. Bit-exact with
 *     the golden .pre_hf.f32 files from .rgb_pil.u8.
 *   - VLM_PREPROCESS_LLAMACPP: what llama.cpp c392e50 (clip.cpp
 *     clip_image_preprocess) computes, for token-exact parity: pad to a
 *     square at the top-left with (122, 116, 104), bilinear resize on pixel
 *     centres in float32 with roundf and a clamp to u8, then
 *     (u8 / 255.0f - mean) / std. Bit-exact with the golden .pre.f32 files
 *     from .rgb.u8 (the build uses -ffp-contract=off).
 * vlm_preprocess_decode_opts() gives the decoder policy that goes with each
 * mode (alpha and EXIF handling, see image.h).
 *
 * Room to grow: a mode is an enum value, and a run produces a list of f32
 * images (vlm_image_f32_list_t), so LLaVA-NeXT's anyres tiles (overview +
 * tiles) or Pixtral's native resolution (one w_bar x h_bar image, sides
 * multiples of the patch size; it needs patch_size and min/max patch counts
 * in the params) can be added as new modes without changing the callers.
 */
#ifndef VLM_VISION_PREPROCESS_H
#define VLM_VISION_PREPROCESS_H

#include <stdint.h>

#include "core/error.h"
#include "vision/image.h"

/* A normalised float image; caller-owned struct, the data is owned by it. */
typedef struct vlm_image_f32 {
    int32_t w, h;
    float *data;   /* [h][w][3], interleaved RGB (HWC), normalised */
} vlm_image_f32_t;

/* The output of one preprocessing run: n images in the order the encoder
 * takes them (one for the LLaVA-1.5 modes). */
typedef struct vlm_image_f32_list {
    int32_t n;
    vlm_image_f32_t *images;   /* [n], owned */
} vlm_image_f32_list_t;

typedef enum vlm_preprocess_mode {
    VLM_PREPROCESS_HF = 0,      /* LLaVA expand2square + Pillow bicubic (default) */
    VLM_PREPROCESS_LLAMACPP,    /* llama.cpp c392e50 clip_image_preprocess */
    VLM_PREPROCESS_MODE_COUNT
} vlm_preprocess_mode_t;

/* Filled from the mmproj (clip.vision.image_size / image_mean / image_std). */
typedef struct vlm_preprocess_params {
    vlm_preprocess_mode_t mode;
    int32_t image_size;     /* S: the output is S x S */
    float image_mean[3];    /* per channel, on the 0..1 scale */
    float image_std[3];     /* per channel, > 0 */
} vlm_preprocess_params_t;

/* Largest S accepted (a sanity bound, far above any CLIP's 336..1024). */
#define VLM_PREPROCESS_MAX_SIZE 8192

/* Fills p with mode and the given values and checks them (S in
 * 1..VLM_PREPROCESS_MAX_SIZE, finite mean, finite std > 0).
 * Returns 0 or VLM_ERR_INVALID_ARG. */
int vlm_preprocess_params_init(vlm_preprocess_params_t *p, vlm_preprocess_mode_t mode,
                               int32_t image_size, const float mean[3], const float std[3],
                               vlm_error_t *err);

/* "hf" -> VLM_PREPROCESS_HF, "llamacpp" -> VLM_PREPROCESS_LLAMACPP; returns
 * -1 for any other name (or NULL). */
int vlm_preprocess_mode_from_name(const char *name);

/* "hf" / "llamacpp" / "unknown"; never NULL. */
const char *vlm_preprocess_mode_name(vlm_preprocess_mode_t mode);

/* The decoder options that go with p's mode, on top of the defaults:
 * LLAMACPP drops alpha and ignores EXIF (stb_image); HF composites alpha over
 * the mean colour (int)(mean[c] * 255) and applies the EXIF orientation. */
void vlm_preprocess_decode_opts(const vlm_preprocess_params_t *p, vlm_image_decode_opts_t *opts);

/* The padding colour of p's mode: (122, 116, 104) for LLAMACPP (fixed in
 * clip.cpp), (int)(mean[c] * 255) for HF. */
void vlm_preprocess_pad_color(const vlm_preprocess_params_t *p, uint8_t rgb[3]);

void vlm_image_f32_init(vlm_image_f32_t *img);
/* Frees the data and empties img; NULL-safe. */
void vlm_image_f32_deinit(vlm_image_f32_t *img);

void vlm_image_f32_list_init(vlm_image_f32_list_t *list);
/* Frees every image and the array, and empties list; NULL-safe. */
void vlm_image_f32_list_deinit(vlm_image_f32_list_t *list);

/* Preprocesses in into one S x S image *out (treated as uninitialised and
 * overwritten; free it with vlm_image_f32_deinit()). For modes that make
 * several images this returns VLM_ERR_UNSUPPORTED: use vlm_preprocess_list().
 * Returns 0, VLM_ERR_INVALID_ARG (bad params, empty image), VLM_ERR_TOO_LARGE
 * (hf mode: a padded side over 65536, e.g. a 1 x 100000 strip) or
 * VLM_ERR_NOMEM; on failure *out is empty. */
int vlm_preprocess(const vlm_preprocess_params_t *p, const vlm_image_u8_t *in,
                   vlm_image_f32_t *out, vlm_error_t *err);

/* Preprocesses in into the list of images p's mode makes (*out treated as
 * uninitialised; free it with vlm_image_f32_list_deinit()). */
int vlm_preprocess_list(const vlm_preprocess_params_t *p, const vlm_image_u8_t *in,
                        vlm_image_f32_list_t *out, vlm_error_t *err);

/* Pillow's 8-bit BICUBIC resize (Image.resize(..., BICUBIC) on an RGB image)
 * of in to w x h into *out (treated as uninitialised). Exposed for tests and
 * future modes. Returns 0, VLM_ERR_INVALID_ARG or VLM_ERR_NOMEM. */
int vlm_preprocess_resize_bicubic_pil(const vlm_image_u8_t *in, int32_t w, int32_t h,
                                      vlm_image_u8_t *out, vlm_error_t *err);

#endif
