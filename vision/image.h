/* vision/image.h - image bytes in memory -> an 8-bit RGB image.
 *
 * The daemon receives images as byte frames, so everything decodes from a
 * memory buffer; vlm_image_load_file() only reads a file and calls
 * vlm_image_decode(). The format comes from the magic bytes alone, never from
 * a file name:
 *   - JPEG through libjpeg-turbo's TurboJPEG API with its default settings
 *     (accurate ISLOW IDCT, fancy upsampling, library colour conversion), which
 *     reproduces PIL's Image.open(f).convert("RGB") exactly. Baseline,
 *     progressive, arithmetic, grayscale and CMYK/YCCK. 4-component JPEGs are
 *     read as Adobe-inverted CMYK, as PIL does for every CMYK JPEG (it uses
 *     rawmode "CMYK;I" unconditionally), then converted to RGB with PIL's
 *     formula R = (255-K) - (C*(255-K) rounded /255), with C, M, Y, K the
 *     un-inverted ink amounts.
 *   - PNG through libpng: every colour type and bit depth, interlaced, tRNS.
 *     16-bit samples keep their high byte, as stb_image (llama.cpp) does and
 *     as PIL does for 16-bit colour. (PIL clips 16-bit grayscale to 255
 *     instead; we do not copy that quirk.)
 *   - Binary PGM/PPM (P5/P6) as `ffmpeg -f image2pipe -c:v ppm` writes it:
 *     comments in the header, maxval 1..65535, samples scaled to 0..255 with
 *     rounding (v * 255 + maxval / 2) / maxval, 16-bit samples big-endian.
 *
 * Grayscale always becomes R = G = B. The alpha channel (PNG colour types with
 * alpha, or tRNS) is handled as opts->alpha says:
 *   - VLM_ALPHA_DROP: alpha is thrown away, what llama.cpp's stb_image and
 *     PIL's convert("RGB") do; the golden .rgb.u8 / .rgb_pil.u8 hold this.
 *   - VLM_ALPHA_OVER_COLOR / VLM_ALPHA_OVER_WHITE: each pixel is composited
 *     over a solid colour: out = (c * a + bg * (255 - a) + 127) / 255, which
 *     gives the same bytes as PIL's Image.alpha_composite over that colour.
 * Which pipeline uses which (vlm_preprocess_decode_opts() in preprocess.h
 * fills these): the `llamacpp` mode drops alpha and ignores EXIF, for
 * token-exact parity with llama.cpp; the `hf` mode (the default) composites
 * over the model's mean colour (122, 116, 104 for CLIP), since transparent
 * pixels otherwise leak whatever RGB the encoder left in them, and applies
 * the EXIF orientation. vlm_image_decode(..., NULL, ...) uses the neutral
 * defaults of vlm_image_decode_opts_default(): drop alpha, apply EXIF.
 *
 * EXIF orientation (tag 0x0112 of IFD0 in a JPEG APP1 "Exif" segment or a PNG
 * eXIf chunk, values 1..8) is applied when opts->apply_exif_orientation is
 * set, so phone photos come out upright, as PIL's ImageOps.exif_transpose
 * would make them.
 *
 * Limits: the pixel count from the header is checked against a budget
 * (default 64 megapixels) before any large allocation, so a small file that
 * claims 100000 x 100000 pixels fails at once with VLM_ERR_TOO_LARGE.
 * Truncated or corrupt data fails with VLM_ERR_IMAGE; libjpeg-turbo's
 * "premature end of data" warning counts as an error. Benign JPEG warnings
 * (extraneous bytes before a marker, an unknown JFIF revision, a bad ICC
 * marker) are tolerated when the file does end with an EOI marker.
 *
 * Thread safety: every call is independent (no global state).
 */
#ifndef VLM_VISION_IMAGE_H
#define VLM_VISION_IMAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

/* An 8-bit RGB image; caller-owned struct, the pixels are owned by it. */
typedef struct vlm_image_u8 {
    int32_t w, h;
    uint8_t *rgb;     /* [h][w][3], RGB, row-major, no row padding */
    bool had_alpha;   /* the source had an alpha channel or tRNS */
} vlm_image_u8_t;

typedef enum vlm_image_format {
    VLM_IMAGE_FORMAT_UNKNOWN = 0,
    VLM_IMAGE_FORMAT_JPEG,
    VLM_IMAGE_FORMAT_PNG,
    VLM_IMAGE_FORMAT_PNM,   /* binary PGM (P5) or PPM (P6) */
} vlm_image_format_t;

typedef enum vlm_image_alpha {
    VLM_ALPHA_DROP = 0,     /* throw alpha away (stb_image, PIL convert("RGB")) */
    VLM_ALPHA_OVER_COLOR,   /* composite over opts->alpha_color */
    VLM_ALPHA_OVER_WHITE,   /* composite over (255, 255, 255) */
} vlm_image_alpha_t;

#define VLM_IMAGE_DEFAULT_MAX_PIXELS ((int64_t)64 * 1024 * 1024)
#define VLM_IMAGE_DEFAULT_MAX_BYTES ((size_t)256 * 1024 * 1024)
/* Progressive JPEGs with more scans than this are refused (a scan bomb costs
 * CPU time out of proportion to the file size). */
#define VLM_IMAGE_MAX_JPEG_SCANS 500

typedef struct vlm_image_decode_opts {
    int64_t max_pixels;           /* budget on w*h from the header; 0 = default */
    size_t max_bytes;             /* budget on the encoded size; 0 = default */
    vlm_image_alpha_t alpha;      /* what to do with an alpha channel */
    uint8_t alpha_color[3];       /* background for VLM_ALPHA_OVER_COLOR */
    bool apply_exif_orientation;  /* rotate/flip by EXIF tag 0x0112 */
} vlm_image_decode_opts_t;

/* Fills opts with the defaults: 64 MP / 256 MiB budgets, VLM_ALPHA_DROP,
 * EXIF orientation applied. */
void vlm_image_decode_opts_default(vlm_image_decode_opts_t *opts);

/* Makes img empty (w = h = 0, rgb = NULL). */
void vlm_image_u8_init(vlm_image_u8_t *img);

/* Frees the pixels and makes img empty; safe on an empty or NULL image. */
void vlm_image_u8_deinit(vlm_image_u8_t *img);

/* Allocates uninitialised pixels for a w x h image (w, h >= 1) into img,
 * which is treated as empty (not freed first). Returns 0, VLM_ERR_INVALID_ARG
 * or VLM_ERR_NOMEM. */
int vlm_image_u8_alloc(vlm_image_u8_t *img, int32_t w, int32_t h, vlm_error_t *err);

/* Guesses the format from the first bytes; UNKNOWN for anything else,
 * including formats we recognise only to name them in errors (GIF, ...). */
vlm_image_format_t vlm_image_detect(const void *data, size_t size);

/* "jpeg", "png", "pnm" or "unknown"; never NULL. */
const char *vlm_image_format_name(vlm_image_format_t format);

/* Decodes size bytes at data into *out (treated as uninitialised and
 * overwritten; the caller frees it with vlm_image_u8_deinit()). opts NULL
 * means vlm_image_decode_opts_default(). Returns 0, or VLM_ERR_IMAGE
 * (unsupported format, corrupt, truncated, empty), VLM_ERR_TOO_LARGE (over
 * the pixel or byte budget), VLM_ERR_NOMEM or VLM_ERR_INVALID_ARG, with a
 * sentence in err; on failure *out is left empty. */
int vlm_image_decode(const void *data, size_t size, const vlm_image_decode_opts_t *opts,
                     vlm_image_u8_t *out, vlm_error_t *err);

/* Reads the file at path and decodes it as vlm_image_decode() does (the name
 * plays no part in choosing the decoder). VLM_ERR_IO when it cannot be read. */
int vlm_image_load_file(const char *path, const vlm_image_decode_opts_t *opts,
                        vlm_image_u8_t *out, vlm_error_t *err);

/* The EXIF orientation (1..8) found in a JPEG's APP1 Exif segment, or 1 when
 * there is none or it is malformed. Exposed for tests and diagnostics. */
int vlm_image_jpeg_exif_orientation(const void *data, size_t size);

#endif
