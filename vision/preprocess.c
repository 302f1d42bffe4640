/* vision/preprocess.c - u8 RGB image -> normalised f32 image (HF and
 * llama.cpp modes).
 *
 * Both modes pad the image to a square without building the square: a
 * "canvas" describes the image placed at (ox, oy) on a pad-coloured
 * rectangle, and pixels outside the image read as the pad colour. The HF mode
 * runs Pillow's separable fixed-point bicubic over that canvas; the
 * llama.cpp mode samples it bilinearly at pixel centres. The final
 * u8 -> float step goes through a 256-entry table per channel computed with
 * exactly the reference expression, so it costs a load per value and gives
 * the same bits. See preprocess.h for the recipes.
 */
#include "preprocess.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Longest canvas side the HF resize accepts: its coefficient tables grow
 * with the side (about 4 * side entries), so absurd aspect ratios such as
 * 64M x 1 are refused instead of allocating gigabytes. */
#define HF_MAX_SIDE 65536

/* ==== Params and small types ============================================ */

int vlm_preprocess_params_init(vlm_preprocess_params_t *p, vlm_preprocess_mode_t mode,
                               int32_t image_size, const float mean[3], const float std[3],
                               vlm_error_t *err) {
    if (!p || !mean || !std)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "vlm_preprocess_params_init: NULL argument");
    memset(p, 0, sizeof *p);
    p->mode = mode;
    p->image_size = image_size;
    for (int c = 0; c < 3; c++) {
        p->image_mean[c] = mean[c];
        p->image_std[c] = std[c];
    }
    if ((unsigned)mode >= VLM_PREPROCESS_MODE_COUNT)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "unknown preprocessing mode %d", (int)mode);
    if (image_size < 1 || image_size > VLM_PREPROCESS_MAX_SIZE)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "image size %d is outside 1..%d",
                             (int)image_size, VLM_PREPROCESS_MAX_SIZE);
    for (int c = 0; c < 3; c++)
        if (!isfinite(mean[c]) || !isfinite(std[c]) || !(std[c] > 0.0f))
            return vlm_error_set(err, VLM_ERR_INVALID_ARG,
                                 "channel %d: mean %g / std %g (std must be finite and > 0)", c,
                                 (double)mean[c], (double)std[c]);
    return 0;
}

static int check_params(const vlm_preprocess_params_t *p, vlm_error_t *err) {
    if (!p) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "preprocess params are NULL");
    vlm_preprocess_params_t tmp;
    return vlm_preprocess_params_init(&tmp, p->mode, p->image_size, p->image_mean, p->image_std, err);
}

int vlm_preprocess_mode_from_name(const char *name) {
    if (!name) return -1;
    if (strcmp(name, "hf") == 0) return VLM_PREPROCESS_HF;
    if (strcmp(name, "llamacpp") == 0) return VLM_PREPROCESS_LLAMACPP;
    return -1;
}

const char *vlm_preprocess_mode_name(vlm_preprocess_mode_t mode) {
    switch (mode) {
    case VLM_PREPROCESS_HF: return "hf";
    case VLM_PREPROCESS_LLAMACPP: return "llamacpp";
    default: return "unknown";
    }
}

void vlm_preprocess_pad_color(const vlm_preprocess_params_t *p, uint8_t rgb[3]) {
    if (p->mode == VLM_PREPROCESS_LLAMACPP) {
        rgb[0] = 122, rgb[1] = 116, rgb[2] = 104; /* fixed in clip.cpp */
        return;
    }
    /* LLaVA: tuple(int(x * 255) for x in image_mean), in double. */
    for (int c = 0; c < 3; c++) {
        double v = (double)p->image_mean[c] * 255.0;
        rgb[c] = v <= 0.0 ? 0 : v >= 255.0 ? 255 : (uint8_t)(int)v;
    }
}

void vlm_preprocess_decode_opts(const vlm_preprocess_params_t *p, vlm_image_decode_opts_t *opts) {
    vlm_image_decode_opts_default(opts);
    if (p->mode == VLM_PREPROCESS_LLAMACPP) {
        opts->alpha = VLM_ALPHA_DROP;
        opts->apply_exif_orientation = false;
    } else {
        opts->alpha = VLM_ALPHA_OVER_COLOR;
        vlm_preprocess_pad_color(p, opts->alpha_color);
        opts->apply_exif_orientation = true;
    }
}

void vlm_image_f32_init(vlm_image_f32_t *img) {
    if (img) memset(img, 0, sizeof *img);
}

void vlm_image_f32_deinit(vlm_image_f32_t *img) {
    if (!img) return;
    free(img->data);
    memset(img, 0, sizeof *img);
}

void vlm_image_f32_list_init(vlm_image_f32_list_t *list) {
    if (list) memset(list, 0, sizeof *list);
}

void vlm_image_f32_list_deinit(vlm_image_f32_list_t *list) {
    if (!list) return;
    for (int32_t i = 0; i < list->n; i++) vlm_image_f32_deinit(&list->images[i]);
    free(list->images);
    memset(list, 0, sizeof *list);
}

static int f32_alloc(vlm_image_f32_t *img, int32_t w, int32_t h, vlm_error_t *err) {
    img->data = malloc((size_t)w * (size_t)h * 3 * sizeof(float));
    if (!img->data)
        return vlm_error_set(err, VLM_ERR_NOMEM, "out of memory for a %dx%d float image", (int)w, (int)h);
    img->w = w;
    img->h = h;
    return 0;
}

/* An image placed at (ox, oy) on a W x H rectangle of colour pad; the image
 * lies inside the rectangle. */
typedef struct canvas {
    const vlm_image_u8_t *img;
    int64_t W, H, ox, oy;
    uint8_t pad[3];
} canvas_t;

/* Writes canvas row y ([W][3]) into row, or returns the image row itself
 * when the image spans the whole width. */
static const uint8_t *canvas_row(const canvas_t *cv, int64_t y, uint8_t *row) {
    const vlm_image_u8_t *im = cv->img;
    const bool in = y >= cv->oy && y < cv->oy + im->h;
    const uint8_t *src = in ? im->rgb + (size_t)(y - cv->oy) * (size_t)im->w * 3 : NULL;
    if (in && cv->ox == 0 && im->w == cv->W) return src;
    for (int64_t x = 0; x < cv->W; x++) memcpy(row + 3 * x, cv->pad, 3);
    if (in) memcpy(row + 3 * cv->ox, src, (size_t)im->w * 3);
    return row;
}

/* ==== Pillow BICUBIC (Resample.c, 8 bits per channel) =================== */

#define PIL_PRECISION_BITS (32 - 8 - 2)

/* Coefficients of one axis: output o reads taps[o] inputs from first[o]. */
typedef struct pil_axis {
    int32_t ksize;
    int32_t *first;   /* [n_out] */
    int32_t *taps;    /* [n_out] */
    int32_t *k;       /* [n_out][ksize], fixed point, 22 fractional bits */
} pil_axis_t;

static double pil_bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

static void pil_axis_free(pil_axis_t *ax) {
    free(ax->first);
    free(ax->taps);
    free(ax->k);
    memset(ax, 0, sizeof *ax);
}

/* precompute_coeffs() + normalize_coeffs_8bpc() for the box [0, n_in), in
 * Pillow's operation order (the weight argument is multiplied by 1/fs). */
static int pil_axis_init(pil_axis_t *ax, int64_t n_in, int32_t n_out, vlm_error_t *err) {
    memset(ax, 0, sizeof *ax);
    const double scale = (double)((float)n_in - 0.0f) / n_out;
    const double filterscale = scale < 1.0 ? 1.0 : scale;
    const double support = 2.0 * filterscale;
    const int32_t ksize = (int32_t)ceil(support) * 2 + 1;
    double *w = malloc((size_t)ksize * sizeof *w);
    ax->ksize = ksize;
    ax->first = malloc((size_t)n_out * sizeof *ax->first);
    ax->taps = malloc((size_t)n_out * sizeof *ax->taps);
    ax->k = calloc((size_t)n_out * (size_t)ksize, sizeof *ax->k);
    if (!w || !ax->first || !ax->taps || !ax->k) {
        free(w);
        pil_axis_free(ax);
        return vlm_error_set(err, VLM_ERR_NOMEM, "out of memory for resize coefficients (%d taps)", (int)ksize);
    }
    for (int32_t o = 0; o < n_out; o++) {
        const double center = 0.0 + (o + 0.5) * scale;
        const double ss = 1.0 / filterscale;
        int64_t xmin = (int64_t)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int64_t xmax = (int64_t)(center + support + 0.5);
        if (xmax > n_in) xmax = n_in;
        xmax -= xmin;
        if (xmax > ksize) xmax = ksize; /* cannot happen; keeps the table in bounds */
        double ww = 0.0;
        for (int64_t x = 0; x < xmax; x++) {
            w[x] = pil_bicubic(((double)(x + xmin) - center + 0.5) * ss);
            ww += w[x];
        }
        int32_t *k = ax->k + (size_t)o * (size_t)ksize;
        for (int64_t x = 0; x < xmax; x++) {
            double v = ww != 0.0 ? w[x] / ww : w[x];
            k[x] = v < 0 ? (int32_t)(-0.5 + v * (1 << PIL_PRECISION_BITS))
                         : (int32_t)(0.5 + v * (1 << PIL_PRECISION_BITS));
        }
        ax->first[o] = (int32_t)xmin;
        ax->taps[o] = (int32_t)xmax;
    }
    free(w);
    return 0;
}

static inline uint8_t pil_clip8(int32_t acc) {
    if (acc < 0) return 0;
    int32_t v = acc >> PIL_PRECISION_BITS;
    return v > 255 ? 255 : (uint8_t)v;
}

/* Horizontal pass on one row: dst[i] = output column x0 + i, i < n. */
static void pil_hpass_row(const pil_axis_t *ax, const uint8_t *src, int32_t x0, int32_t n,
                          uint8_t *dst) {
    for (int32_t i = 0; i < n; i++) {
        const int32_t o = x0 + i;
        const int32_t *k = ax->k + (size_t)o * (size_t)ax->ksize;
        const uint8_t *s = src + 3 * (size_t)ax->first[o];
        int32_t a0 = 1 << (PIL_PRECISION_BITS - 1), a1 = a0, a2 = a0;
        for (int32_t t = 0; t < ax->taps[o]; t++, s += 3) {
            a0 += s[0] * k[t];
            a1 += s[1] * k[t];
            a2 += s[2] * k[t];
        }
        dst[3 * i + 0] = pil_clip8(a0);
        dst[3 * i + 1] = pil_clip8(a1);
        dst[3 * i + 2] = pil_clip8(a2);
    }
}

/* Resizes the canvas to out_w x out_h with Pillow's BICUBIC and writes the
 * crop [cy, cy+ch) x [cx, cx+cw) of the result to dst ([ch][cw][3]). A pass
 * whose size does not change is skipped, as Pillow skips it. Horizontal pass
 * first, stored as u8, then the vertical pass on that. Rows of the canvas
 * outside the image are all pad colour, so their horizontal result is
 * computed once. */
static int pil_bicubic_canvas(const canvas_t *cv, int32_t out_w, int32_t out_h, int32_t cx,
                              int32_t cy, int32_t cw, int32_t ch, uint8_t *dst, vlm_error_t *err) {
    const bool need_h = out_w != cv->W, need_v = out_h != cv->H;
    const int32_t img_h = cv->img->h;
    int rc = 0;
    pil_axis_t axx = {0}, axy = {0};
    uint8_t *row = malloc((size_t)cv->W * 3);                              /* [W][3] */
    uint8_t *hpad = malloc((size_t)cw * 3);                                /* [cw][3] */
    uint8_t *himg = malloc((size_t)img_h * (size_t)cw * 3);                /* [img_h][cw][3] */
    int32_t *acc = malloc((size_t)cw * 3 * sizeof *acc);                   /* [cw * 3] */
    if (!row || !hpad || !himg || !acc) {
        rc = vlm_error_set(err, VLM_ERR_NOMEM, "out of memory resizing a %lldx%lld canvas",
                           (long long)cv->W, (long long)cv->H);
        goto done;
    }
    if (need_h && (rc = pil_axis_init(&axx, cv->W, out_w, err)) != 0) goto done;
    if (need_v && (rc = pil_axis_init(&axy, cv->H, out_h, err)) != 0) goto done;

    /* Horizontal pass: one pad row (if the canvas has any), then every
     * image row. */
    if (img_h < cv->H) {
        const uint8_t *src = canvas_row(cv, cv->oy > 0 ? 0 : cv->H - 1, row);
        if (need_h) pil_hpass_row(&axx, src, cx, cw, hpad);
        else memcpy(hpad, src + 3 * (size_t)cx, (size_t)cw * 3);
    }
    for (int32_t r = 0; r < img_h; r++) {
        const uint8_t *src = canvas_row(cv, cv->oy + r, row);
        uint8_t *out = himg + (size_t)r * (size_t)cw * 3;
        if (need_h) pil_hpass_row(&axx, src, cx, cw, out);
        else memcpy(out, src + 3 * (size_t)cx, (size_t)cw * 3);
    }

    /* Vertical pass over the rows of the horizontal result. */
    const size_t n = (size_t)cw * 3;
    for (int32_t yy = 0; yy < ch; yy++) {
        const int32_t o = cy + yy;
        uint8_t *d = dst + (size_t)yy * n;
        if (!need_v) {
            int64_t y = o;
            const uint8_t *s = (y >= cv->oy && y < cv->oy + img_h) ? himg + (size_t)(y - cv->oy) * n : hpad;
            memcpy(d, s, n);
            continue;
        }
        const int32_t *k = axy.k + (size_t)o * (size_t)axy.ksize;
        for (size_t i = 0; i < n; i++) acc[i] = 1 << (PIL_PRECISION_BITS - 1);
        for (int32_t t = 0; t < axy.taps[o]; t++) {
            int64_t y = (int64_t)axy.first[o] + t;
            const uint8_t *s = (y >= cv->oy && y < cv->oy + img_h) ? himg + (size_t)(y - cv->oy) * n : hpad;
            const int32_t kt = k[t];
            for (size_t i = 0; i < n; i++) acc[i] += s[i] * kt;
        }
        for (size_t i = 0; i < n; i++) d[i] = pil_clip8(acc[i]);
    }

done:
    pil_axis_free(&axx);
    pil_axis_free(&axy);
    free(row);
    free(hpad);
    free(himg);
    free(acc);
    return rc;
}

static int check_input(const vlm_image_u8_t *in, vlm_error_t *err) {
    if (!in || in->w < 1 || in->h < 1 || !in->rgb)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "input image is empty (%dx%d)",
                             in ? (int)in->w : 0, in ? (int)in->h : 0);
    return 0;
}

int vlm_preprocess_resize_bicubic_pil(const vlm_image_u8_t *in, int32_t w, int32_t h,
                                      vlm_image_u8_t *out, vlm_error_t *err) {
    int rc;
    if (!out) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "output image is NULL");
    vlm_image_u8_init(out);
    if ((rc = check_input(in, err)) != 0) return rc;
    if (w < 1 || h < 1 || w > VLM_PREPROCESS_MAX_SIZE || h > VLM_PREPROCESS_MAX_SIZE ||
        in->w > HF_MAX_SIDE || in->h > HF_MAX_SIDE)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "cannot resize %dx%d to %dx%d", (int)in->w,
                             (int)in->h, (int)w, (int)h);
    if ((rc = vlm_image_u8_alloc(out, w, h, err)) != 0) return rc;
    canvas_t cv = {.img = in, .W = in->w, .H = in->h};
    if ((rc = pil_bicubic_canvas(&cv, w, h, 0, 0, w, h, out->rgb, err)) != 0) vlm_image_u8_deinit(out);
    return rc;
}

/* ==== The modes ========================================================= */

/* LLaVA expand2square + CLIPImageProcessor (shortest edge S, centre crop S,
 * rescale, normalise). */
static int preprocess_hf(const vlm_preprocess_params_t *p, const vlm_image_u8_t *in,
                         vlm_image_f32_t *out, vlm_error_t *err) {
    const int32_t S = p->image_size;
    const int64_t n = in->w > in->h ? in->w : in->h;
    if (n > HF_MAX_SIDE)
        return vlm_error_set(err, VLM_ERR_TOO_LARGE,
                             "image %dx%d: the padded side %lld exceeds %d for the hf resize",
                             (int)in->w, (int)in->h, (long long)n, HF_MAX_SIDE);
    canvas_t cv = {.img = in, .W = n, .H = n, .ox = (n - in->w) / 2, .oy = (n - in->h) / 2};
    vlm_preprocess_pad_color(p, cv.pad);

    /* transformers get_resize_output_image_size(default_to_square=False):
     * short side -> S, long side -> int(S * long / short). The canvas is
     * square here, so both become S; the general rule is kept for clarity. */
    const int64_t W = cv.W, H = cv.H, sh = W <= H ? W : H, lg = W <= H ? H : W;
    const int64_t new_long = (int64_t)((double)((int64_t)S * lg) / (double)sh);
    const int32_t new_w = (int32_t)(W <= H ? S : new_long), new_h = (int32_t)(W <= H ? new_long : S);
    /* transformers center_crop: top = (h - S) // 2, left = (w - S) // 2. */
    const int32_t top = (new_h - S) / 2, left = (new_w - S) / 2;

    uint8_t *px = malloc((size_t)S * (size_t)S * 3); /* [S][S][3] */
    if (!px) return vlm_error_set(err, VLM_ERR_NOMEM, "out of memory for a %dx%d image", (int)S, (int)S);
    int rc = pil_bicubic_canvas(&cv, new_w, new_h, left, top, S, S, px, err);
    if (rc == 0) rc = f32_alloc(out, S, S, err);
    if (rc == 0) {
        /* rescale: u8 * (1/255) in double, rounded to float; then normalise in float */
        float lut[3][256];
        for (int c = 0; c < 3; c++)
            for (int v = 0; v < 256; v++) {
                float r = (float)((double)v * (1.0 / 255.0));
                lut[c][v] = (r - p->image_mean[c]) / p->image_std[c];
            }
        const size_t nv = (size_t)S * (size_t)S * 3;
        for (size_t i = 0; i < nv; i++) out->data[i] = lut[i % 3][px[i]];
    }
    free(px);
    return rc;
}

/* llama.cpp c392e50 clip_image_preprocess, LLaVA-1.5 path. */
static int preprocess_llamacpp(const vlm_preprocess_params_t *p, const vlm_image_u8_t *in,
                               vlm_image_f32_t *out, vlm_error_t *err) {
    const int32_t S = p->image_size;
    const int64_t n = in->w > in->h ? in->w : in->h;
    const int64_t iw = in->w, ih = in->h;
    int rc = 0;
    int32_t *x0 = malloc((size_t)S * sizeof *x0), *x1 = malloc((size_t)S * sizeof *x1);
    float *dx = malloc((size_t)S * sizeof *dx);
    if (!x0 || !x1 || !dx) {
        rc = vlm_error_set(err, VLM_ERR_NOMEM, "out of memory for resize tables");
        goto done;
    }
    if ((rc = f32_alloc(out, S, S, err)) != 0) goto done;

    static const uint8_t pad[3] = {122, 116, 104};
    float lut[3][256];
    for (int c = 0; c < 3; c++)
        for (int v = 0; v < 256; v++) lut[c][v] = (((float)v / 255.0f) - p->image_mean[c]) / p->image_std[c];

    /* Same float expressions as clip.cpp, in the same order. */
    const float scale = (float)n / (float)S;
    for (int32_t x = 0; x < S; x++) {
        const float sx = ((float)x + 0.5f) * scale - 0.5f;
        int32_t a = (int32_t)floorf(sx);
        if (a < 0) a = 0;
        x0[x] = a;
        x1[x] = a + 1 < n - 1 ? a + 1 : (int32_t)(n - 1);
        dx[x] = sx - (float)a;
    }
    for (int32_t y = 0; y < S; y++) {
        const float sy = ((float)y + 0.5f) * scale - 0.5f;
        int32_t y0 = (int32_t)floorf(sy);
        if (y0 < 0) y0 = 0;
        const int32_t y1 = y0 + 1 < n - 1 ? y0 + 1 : (int32_t)(n - 1);
        const float dy = sy - (float)y0;
        const uint8_t *r0 = y0 < ih ? in->rgb + (size_t)y0 * (size_t)iw * 3 : NULL;
        const uint8_t *r1 = y1 < ih ? in->rgb + (size_t)y1 * (size_t)iw * 3 : NULL;
        float *d = out->data + (size_t)y * (size_t)S * 3;
        for (int32_t x = 0; x < S; x++) {
            const int32_t a = x0[x], b = x1[x];
            for (int c = 0; c < 3; c++) {
                const float v00 = (r0 && a < iw) ? r0[3 * (size_t)a + c] : pad[c];
                const float v01 = (r0 && b < iw) ? r0[3 * (size_t)b + c] : pad[c];
                const float v10 = (r1 && a < iw) ? r1[3 * (size_t)a + c] : pad[c];
                const float v11 = (r1 && b < iw) ? r1[3 * (size_t)b + c] : pad[c];
                const float v0 = v00 * (1.0f - dx[x]) + v01 * dx[x];
                const float v1 = v10 * (1.0f - dx[x]) + v11 * dx[x];
                const float v = v0 * (1.0f - dy) + v1 * dy;
                const float rv = fminf(fmaxf(roundf(v), 0.0f), 255.0f);
                d[3 * x + c] = lut[c][(uint8_t)rv];
            }
        }
    }
done:
    free(x0);
    free(x1);
    free(dx);
    return rc;
}

int vlm_preprocess(const vlm_preprocess_params_t *p, const vlm_image_u8_t *in, vlm_image_f32_t *out,
                   vlm_error_t *err) {
    int rc;
    if (!out) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "output image is NULL");
    vlm_image_f32_init(out);
    if ((rc = check_params(p, err)) != 0) return rc;
    if ((rc = check_input(in, err)) != 0) return rc;
    switch (p->mode) {
    case VLM_PREPROCESS_HF: rc = preprocess_hf(p, in, out, err); break;
    case VLM_PREPROCESS_LLAMACPP: rc = preprocess_llamacpp(p, in, out, err); break;
    default:
        rc = vlm_error_set(err, VLM_ERR_UNSUPPORTED, "mode %s makes several images: use vlm_preprocess_list",
                           vlm_preprocess_mode_name(p->mode));
    }
    if (rc != 0) vlm_image_f32_deinit(out);
    return rc;
}

int vlm_preprocess_list(const vlm_preprocess_params_t *p, const vlm_image_u8_t *in,
                        vlm_image_f32_list_t *out, vlm_error_t *err) {
    if (!out) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "output list is NULL");
    vlm_image_f32_list_init(out);
    out->images = calloc(1, sizeof *out->images);
    if (!out->images) return vlm_error_set(err, VLM_ERR_NOMEM, "out of memory for the image list");
    int rc = vlm_preprocess(p, in, &out->images[0], err);
    if (rc != 0) {
        vlm_image_f32_list_deinit(out);
        return rc;
    }
    out->n = 1;
    return 0;
}
