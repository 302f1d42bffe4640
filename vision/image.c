/* vision/image.c - decode JPEG, PNG and binary PNM bytes into 8-bit RGB.
 *
 * One decoder per format, chosen by magic bytes. Each one reads the header
 * first, checks the pixel budget, and only then allocates the pixels, so a
 * decompression bomb costs nothing. JPEG goes through TurboJPEG with default
 * flags (bit-exact with PIL on libjpeg-turbo); a small marker walk of our own
 * finds the EXIF segment, counts the scans and notices a missing EOI. PNG goes
 * through libpng from memory, with its setjmp error handling confined to one
 * function whose state lives in the caller's frame, so nothing leaks. The
 * EXIF orientation and alpha compositing are applied after decoding.
 * See image.h for the policies.
 */
#include "image.h"

#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <png.h>
#include <turbojpeg.h>

/* ==== Small helpers ==================================================== */

void vlm_image_decode_opts_default(vlm_image_decode_opts_t *opts) {
    memset(opts, 0, sizeof *opts);
    opts->max_pixels = VLM_IMAGE_DEFAULT_MAX_PIXELS;
    opts->max_bytes = VLM_IMAGE_DEFAULT_MAX_BYTES;
    opts->alpha = VLM_ALPHA_DROP;
    opts->alpha_color[0] = 122;
    opts->alpha_color[1] = 116;
    opts->alpha_color[2] = 104;
    opts->apply_exif_orientation = true;
}

void vlm_image_u8_init(vlm_image_u8_t *img) {
    if (img) memset(img, 0, sizeof *img);
}

void vlm_image_u8_deinit(vlm_image_u8_t *img) {
    if (!img) return;
    free(img->rgb);
    memset(img, 0, sizeof *img);
}

int vlm_image_u8_alloc(vlm_image_u8_t *img, int32_t w, int32_t h, vlm_error_t *err) {
    if (!img || w < 1 || h < 1)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "image size %dx%d is not positive",
                             (int)w, (int)h);
    vlm_image_u8_init(img);
    size_t n = (size_t)w * (size_t)h * 3;
    img->rgb = malloc(n);
    if (!img->rgb)
        return vlm_error_set(err, VLM_ERR_NOMEM, "out of memory for a %dx%d image (%zu bytes)",
                             (int)w, (int)h, n);
    img->w = w;
    img->h = h;
    return 0;
}

/* Fails unless 1 <= w, h and w*h is within the budget. */
static int check_budget(int64_t w, int64_t h, const vlm_image_decode_opts_t *o,
                        const char *what, vlm_error_t *err) {
    if (w < 1 || h < 1)
        return vlm_error_set(err, VLM_ERR_IMAGE, "%s header gives an empty image (%lldx%lld)",
                             what, (long long)w, (long long)h);
    if (w > INT32_MAX || h > INT32_MAX || w * h > o->max_pixels)
        return vlm_error_set(err, VLM_ERR_TOO_LARGE,
                             "%s image is %lldx%lld = %lld pixels, over the budget of %lld pixels",
                             what, (long long)w, (long long)h, (long long)(w * h),
                             (long long)o->max_pixels);
    return 0;
}

static uint32_t rd16be(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }

/* ==== Format detection ================================================== */

static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};

static bool is_pnm_space(uint8_t c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

vlm_image_format_t vlm_image_detect(const void *data, size_t size) {
    const uint8_t *p = data;
    if (!p) return VLM_IMAGE_FORMAT_UNKNOWN;
    if (size >= 3 && p[0] == 0xFF && p[1] == 0xD8 && p[2] == 0xFF) return VLM_IMAGE_FORMAT_JPEG;
    if (size >= 8 && memcmp(p, png_sig, 8) == 0) return VLM_IMAGE_FORMAT_PNG;
    if (size >= 3 && p[0] == 'P' && (p[1] == '5' || p[1] == '6') && is_pnm_space(p[2]))
        return VLM_IMAGE_FORMAT_PNM;
    return VLM_IMAGE_FORMAT_UNKNOWN;
}

const char *vlm_image_format_name(vlm_image_format_t format) {
    switch (format) {
    case VLM_IMAGE_FORMAT_JPEG: return "jpeg";
    case VLM_IMAGE_FORMAT_PNG: return "png";
    case VLM_IMAGE_FORMAT_PNM: return "pnm";
    default: return "unknown";
    }
}

/* Names formats we do not decode, for the error message; NULL if unknown. */
static const char *guess_foreign(const uint8_t *p, size_t n) {
    if (n >= 4 && memcmp(p, "GIF8", 4) == 0) return "GIF";
    if (n >= 12 && memcmp(p, "RIFF", 4) == 0 && memcmp(p + 8, "WEBP", 4) == 0) return "WebP";
    if (n >= 12 && memcmp(p + 4, "ftyp", 4) == 0) {
        if (memcmp(p + 8, "avif", 4) == 0 || memcmp(p + 8, "avis", 4) == 0) return "AVIF";
        if (memcmp(p + 8, "hei", 3) == 0 || memcmp(p + 8, "mif1", 4) == 0 ||
            memcmp(p + 8, "msf1", 4) == 0 || memcmp(p + 8, "hev", 3) == 0)
            return "HEIF/HEIC";
        return "ISO media (MP4/HEIF)";
    }
    if (n >= 4 && (memcmp(p, "II*\0", 4) == 0 || memcmp(p, "MM\0*", 4) == 0)) return "TIFF";
    if (n >= 2 && p[0] == 'B' && p[1] == 'M') return "BMP";
    if (n >= 2 && p[0] == 0xFF && p[1] == 0x0A) return "JPEG XL";
    if (n >= 12 && memcmp(p, "\0\0\0\x0cJXL ", 8) == 0) return "JPEG XL";
    if (n >= 4 && memcmp(p, "\0\0\1\0", 4) == 0) return "ICO";
    if (n >= 4 && memcmp(p, "8BPS", 4) == 0) return "PSD";
    if (n >= 4 && memcmp(p, "qoif", 4) == 0) return "QOI";
    if (n >= 4 && memcmp(p, "%PDF", 4) == 0) return "PDF";
    if (n >= 2 && p[0] == 'P' && p[1] && strchr("12347", p[1])) return "ASCII PNM or PAM (only binary P5/P6 are read)";
    if (n >= 2 && p[0] == 'P' && (p[1] == '5' || p[1] == '6')) return "PNM with a bad header";
    if (n >= 1 && p[0] == '<') return "SVG/XML/HTML";
    if (n >= 2 && p[0] == 0xFF && p[1] == 0xD8) return "truncated JPEG";
    if (n < 8 && n >= 1 && memcmp(p, png_sig, n) == 0) return "truncated PNG";
    return NULL;
}

static int unsupported_format(const uint8_t *p, size_t n, vlm_error_t *err) {
    char hex[4 * 3 + 1] = "";
    size_t o = 0;
    for (size_t i = 0; i < n && i < 4; i++)
        o += (size_t)snprintf(hex + o, sizeof hex - o, "%s%02x", i ? " " : "", p[i]);
    const char *g = guess_foreign(p, n);
    return vlm_error_set(err, VLM_ERR_IMAGE,
                         "unsupported image format (%zu bytes, first bytes %s%s%s); "
                         "JPEG, PNG and binary PPM/PGM are supported",
                         n, hex, g ? ": " : "", g ? g : "");
}

/* ==== EXIF orientation ================================================== */

/* Tag 0x0112 from IFD0 of a TIFF structure (what follows "Exif\0\0"), or 1.
 * Every offset is checked against n. */
static int tiff_orientation(const uint8_t *t, size_t n) {
    if (!t || n < 8) return 1;
    bool le;
    if (t[0] == 'I' && t[1] == 'I') le = true;
    else if (t[0] == 'M' && t[1] == 'M') le = false;
    else return 1;
#define RD16(q) (le ? (uint32_t)(q)[0] | (uint32_t)(q)[1] << 8 : (uint32_t)(q)[0] << 8 | (uint32_t)(q)[1])
#define RD32(q) (le ? (uint32_t)(q)[0] | (uint32_t)(q)[1] << 8 | (uint32_t)(q)[2] << 16 | (uint32_t)(q)[3] << 24 \
                    : (uint32_t)(q)[0] << 24 | (uint32_t)(q)[1] << 16 | (uint32_t)(q)[2] << 8 | (uint32_t)(q)[3])
    if (RD16(t + 2) != 42) return 1;
    uint64_t ifd = RD32(t + 4);
    if (ifd + 2 > n) return 1;
    uint32_t count = RD16(t + ifd);
    for (uint32_t i = 0; i < count; i++) {
        uint64_t e = ifd + 2 + 12 * (uint64_t)i;
        if (e + 12 > n) break;
        if (RD16(t + e) != 0x0112) continue;
        uint32_t type = RD16(t + e + 2), cnt = RD32(t + e + 4);
        uint32_t v = 0;
        if (cnt >= 1 && type == 3) v = RD16(t + e + 8);        /* SHORT */
        else if (cnt >= 1 && type == 4) v = RD32(t + e + 8);   /* LONG (nonstandard) */
        return v >= 1 && v <= 8 ? (int)v : 1;
    }
#undef RD16
#undef RD32
    return 1;
}

/* Rotates/flips img in place (new buffer) so that EXIF orientation o becomes
 * 1. Output pixel (x, y) takes source pixel (sx, sy) with
 *   2: (W-1-x, y)   3: (W-1-x, H-1-y)   4: (x, H-1-y)   5: (y, x)
 *   6: (y, H-1-x)   7: (W-1-y, H-1-x)   8: (W-1-y, x)
 * which are PIL's exif_transpose: FLIP_LEFT_RIGHT, ROTATE_180,
 * FLIP_TOP_BOTTOM, TRANSPOSE, ROTATE_270, TRANSVERSE, ROTATE_90. */
static int apply_orientation(vlm_image_u8_t *img, int o, vlm_error_t *err) {
    if (o <= 1 || o > 8) return 0;
    const int64_t W = img->w, H = img->h;
    /* sx = ax*x + bx*y + cx, sy = ay*x + by*y + cy */
    static const int8_t tab[9][4] = {
        /* ax bx ay by */
        {0, 0, 0, 0}, {1, 0, 0, 1}, {-1, 0, 0, 1}, {-1, 0, 0, -1}, {1, 0, 0, -1},
        {0, 1, 1, 0}, {0, 1, -1, 0}, {0, -1, -1, 0}, {0, -1, 1, 0},
    };
    const int64_t ax = tab[o][0], bx = tab[o][1], ay = tab[o][2], by = tab[o][3];
    const int64_t cx = (ax < 0 || bx < 0) ? W - 1 : 0;
    const int64_t cy = (ay < 0 || by < 0) ? H - 1 : 0;
    const int32_t ow = o >= 5 ? img->h : img->w, oh = o >= 5 ? img->w : img->h;
    uint8_t *dst = malloc((size_t)ow * (size_t)oh * 3);
    if (!dst) return vlm_error_set(err, VLM_ERR_NOMEM, "out of memory rotating a %dx%d image", (int)W, (int)H);
    const int64_t step_x = ay * W + ax, step_y = by * W + bx;
    int64_t row = cy * W + cx;
    uint8_t *d = dst;
    for (int32_t y = 0; y < oh; y++, row += step_y) {
        int64_t s = row;
        for (int32_t x = 0; x < ow; x++, s += step_x, d += 3) {
            const uint8_t *sp = img->rgb + 3 * s;
            d[0] = sp[0];
            d[1] = sp[1];
            d[2] = sp[2];
        }
    }
    free(img->rgb);
    img->rgb = dst;
    img->w = ow;
    img->h = oh;
    return 0;
}

/* ==== Alpha ============================================================= */

/* Turns [n][4] RGBA into [n][3] RGB in place, by opts->alpha. */
static void rgba_to_rgb(uint8_t *px, size_t n, const vlm_image_decode_opts_t *o) {
    uint32_t bg[3] = {255, 255, 255};
    if (o->alpha == VLM_ALPHA_OVER_COLOR)
        for (int c = 0; c < 3; c++) bg[c] = o->alpha_color[c];
    for (size_t i = 0; i < n; i++) {
        const uint8_t *s = px + 4 * i;
        uint8_t *d = px + 3 * i;
        uint32_t a = s[3];
        uint32_t r = s[0], g = s[1], b = s[2];
        if (o->alpha == VLM_ALPHA_DROP) {
            d[0] = (uint8_t)r, d[1] = (uint8_t)g, d[2] = (uint8_t)b;
        } else {
            d[0] = (uint8_t)((r * a + bg[0] * (255 - a) + 127) / 255);
            d[1] = (uint8_t)((g * a + bg[1] * (255 - a) + 127) / 255);
            d[2] = (uint8_t)((b * a + bg[2] * (255 - a) + 127) / 255);
        }
    }
}

/* ==== JPEG ============================================================== */

/* What our own marker walk learns about a JPEG stream. */
typedef struct jpeg_scan_info {
    const uint8_t *exif;   /* TIFF data after "Exif\0\0" in the first such APP1, or NULL */
    size_t exif_len;
    int32_t sof_w, sof_h, sof_ncomp; /* from the first SOFn; 0 if none */
    int n_scans;           /* number of SOS markers */
    bool has_eoi;          /* an EOI marker after the first scan */
} jpeg_scan_info_t;

/* Walks the marker segments of p[0..n) (SOI already checked). Entropy-coded
 * data is skipped by looking for 0xFF followed by a byte that is neither a
 * stuffed 0x00 nor an RSTn, which can only be a marker. Never fails: what it
 * cannot parse, libjpeg will judge. */
static void jpeg_walk(const uint8_t *p, size_t n, jpeg_scan_info_t *ji) {
    memset(ji, 0, sizeof *ji);
    size_t pos = 2;
    while (pos + 1 < n) {
        if (p[pos] != 0xFF) { /* extraneous bytes: find the next 0xFF */
            const uint8_t *q = memchr(p + pos, 0xFF, n - pos);
            if (!q) return;
            pos = (size_t)(q - p);
            continue;
        }
        if (p[pos + 1] == 0xFF) { pos++; continue; } /* fill byte */
        uint8_t m = p[pos + 1];
        if (m == 0xD9) { if (ji->n_scans > 0) ji->has_eoi = true; return; }
        if (m == 0x01 || m == 0xD8 || (m >= 0xD0 && m <= 0xD7) || m == 0x00) { pos += 2; continue; }
        if (pos + 4 > n) return;
        size_t len = rd16be(p + pos + 2);
        if (len < 2 || pos + 2 + len > n) return;
        const uint8_t *seg = p + pos + 4;
        size_t seg_len = len - 2;
        if (m == 0xE1 && !ji->exif && seg_len >= 6 && memcmp(seg, "Exif\0\0", 6) == 0) {
            ji->exif = seg + 6;
            ji->exif_len = seg_len - 6;
        }
        if (m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC && !ji->sof_ncomp &&
            seg_len >= 6) {
            ji->sof_h = (int32_t)rd16be(seg + 1);
            ji->sof_w = (int32_t)rd16be(seg + 3);
            ji->sof_ncomp = seg[5];
        }
        pos += 2 + len;
        if (m != 0xDA) continue;
        /* SOS: skip the entropy-coded data up to the next real marker. */
        ji->n_scans++;
        if (ji->n_scans > VLM_IMAGE_MAX_JPEG_SCANS) return;
        for (;;) {
            const uint8_t *q = pos < n ? memchr(p + pos, 0xFF, n - pos) : NULL;
            if (!q) return;
            size_t f = (size_t)(q - p);
            while (f + 1 < n && p[f + 1] == 0xFF) f++;
            if (f + 1 >= n) return;
            uint8_t mm = p[f + 1];
            if (mm == 0x00 || (mm >= 0xD0 && mm <= 0xD7)) { pos = f + 2; continue; }
            pos = f;
            break;
        }
    }
}

int vlm_image_jpeg_exif_orientation(const void *data, size_t size) {
    if (vlm_image_detect(data, size) != VLM_IMAGE_FORMAT_JPEG) return 1;
    jpeg_scan_info_t ji;
    jpeg_walk(data, size, &ji);
    return tiff_orientation(ji.exif, ji.exif_len);
}

/* libjpeg warnings that do not mean lost pixels. Anything else ("Premature
 * end of JPEG file", "Corrupt JPEG data: bad Huffman code", a fatal error
 * reported after a warning, ...) fails the decode. */
static bool jpeg_warning_is_benign(const char *msg) {
    static const char *const ok[] = {
        "extraneous bytes before marker", "Unknown Adobe color transform code",
        "unknown JFIF revision number", "bad ICC marker",
        "thumbnail image size does not match data length",
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
        if (strstr(msg, ok[i])) return true;
    return false;
}

/* Adobe-inverted CMYK [n][4] -> RGB [n][3], in place, with PIL's cmyk2rgb on
 * the un-inverted ink amounts: with nk = 255 - K,
 * R = nk - (C*nk + 128 + ((C*nk + 128) >> 8)) >> 8, likewise G, B. */
static void cmyk_inverted_to_rgb(uint8_t *px, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const uint8_t *s = px + 4 * i;
        uint8_t *d = px + 3 * i;
        int nk = s[3]; /* stored K is inverted: 255 - ink = nk */
        int out[3];
        for (int c = 0; c < 3; c++) {
            int ink = 255 - s[c];
            int t = ink * nk + 128;
            int v = nk - (((t >> 8) + t) >> 8);
            out[c] = v < 0 ? 0 : v > 255 ? 255 : v;
        }
        d[0] = (uint8_t)out[0], d[1] = (uint8_t)out[1], d[2] = (uint8_t)out[2];
    }
}

static int decode_jpeg(const uint8_t *p, size_t n, const vlm_image_decode_opts_t *o,
                       vlm_image_u8_t *out, vlm_error_t *err) {
    int rc = 0;
    uint8_t *buf = NULL;
    jpeg_scan_info_t ji;
    jpeg_walk(p, n, &ji);
    if (ji.n_scans > VLM_IMAGE_MAX_JPEG_SCANS)
        return vlm_error_set(err, VLM_ERR_IMAGE, "JPEG has more than %d scans; refused",
                             VLM_IMAGE_MAX_JPEG_SCANS);
    if (n > ULONG_MAX) return vlm_error_set(err, VLM_ERR_TOO_LARGE, "JPEG data too large");

    tjhandle tj = tjInitDecompress();
    if (!tj) return vlm_error_set(err, VLM_ERR_NOMEM, "cannot create a TurboJPEG decompressor");

    int w = 0, h = 0, subsamp = -1, cs = -1;
    if (tjDecompressHeader3(tj, p, (unsigned long)n, &w, &h, &subsamp, &cs) != 0) {
        const char *msg = tjGetErrorStr2(tj);
        bool header_ok = w > 0 && h > 0 && ji.sof_w == w && ji.sof_h == h;
        if (header_ok && tjGetErrorCode(tj) == TJERR_WARNING && jpeg_warning_is_benign(msg)) {
            /* a benign warning while reading the header: go on */
        } else if (header_ok && strstr(msg, "subsampling type") &&
                   (ji.sof_ncomp == 1 || ji.sof_ncomp == 3 || ji.sof_ncomp == 4)) {
            /* TurboJPEG 2.1 rejects unusual sampling factors in the header call,
             * but libjpeg decodes them; the SOF tells the colour space. */
            cs = ji.sof_ncomp == 4 ? TJCS_CMYK : ji.sof_ncomp == 1 ? TJCS_GRAY : TJCS_YCbCr;
        } else {
            rc = vlm_error_set(err, VLM_ERR_IMAGE, "corrupt or unsupported JPEG header: %s", msg);
            goto fail;
        }
    }
    if ((rc = check_budget(w, h, o, "JPEG", err)) != 0) goto fail;

    const bool cmyk = cs == TJCS_CMYK || cs == TJCS_YCCK;
    const size_t npx = (size_t)w * (size_t)h;
    buf = malloc(npx * (cmyk ? 4 : 3));
    if (!buf) {
        rc = vlm_error_set(err, VLM_ERR_NOMEM, "out of memory for a %dx%d JPEG", w, h);
        goto fail;
    }
    /* flags 0: ISLOW IDCT and fancy upsampling, as PIL decodes. */
    if (tjDecompress2(tj, p, (unsigned long)n, buf, w, 0, h, cmyk ? TJPF_CMYK : TJPF_RGB, 0) != 0) {
        const char *msg = tjGetErrorStr2(tj);
        bool warning = tjGetErrorCode(tj) == TJERR_WARNING;
        if (warning && jpeg_warning_is_benign(msg) && ji.has_eoi) {
            /* pixels complete */
        } else if (strstr(msg, "Premature end") || (warning && !ji.has_eoi)) {
            rc = vlm_error_set(err, VLM_ERR_IMAGE, "truncated JPEG data (%zu bytes): %s", n, msg);
            goto fail;
        } else {
            rc = vlm_error_set(err, VLM_ERR_IMAGE, "corrupt JPEG data: %s", msg);
            goto fail;
        }
    }
    if (cmyk) {
        cmyk_inverted_to_rgb(buf, npx);
        uint8_t *shrunk = realloc(buf, npx * 3);
        if (shrunk) buf = shrunk;
    }
    tjDestroy(tj);
    out->w = w;
    out->h = h;
    out->rgb = buf;
    out->had_alpha = false;
    if (o->apply_exif_orientation)
        return apply_orientation(out, tiff_orientation(ji.exif, ji.exif_len), err);
    return 0;

fail:
    free(buf);
    tjDestroy(tj);
    return rc;
}

/* ==== PNG =============================================================== */

/* State of one PNG decode. It lives in the caller of png_decode_body(), the
 * function that calls setjmp, so its fields are well defined after a
 * longjmp (C11 7.13.2.1 only spares objects outside that function). */
typedef struct png_state {
    const uint8_t *data;
    size_t size, pos;
    const vlm_image_decode_opts_t *opts;
    png_structp png;
    png_infop info;
    uint8_t *buf;       /* [h][w][channels] while reading */
    int32_t w, h;
    int channels;       /* 3 or 4 after the transforms */
    bool had_alpha;
    int orientation;
    int rc;             /* a non-libpng failure (budget, memory) */
    vlm_error_t *err;
    char msg[256];      /* libpng's error message */
} png_state_t;

static void png_on_error(png_structp png, png_const_charp msg) {
    png_state_t *st = png_get_error_ptr(png);
    snprintf(st->msg, sizeof st->msg, "%s", msg ? msg : "unknown libpng error");
    png_longjmp(png, 1);
}

static void png_on_warning(png_structp png, png_const_charp msg) {
    (void)png;
    (void)msg; /* warnings (bad ancillary CRC, ...) do not cost pixels */
}

static void png_read_mem(png_structp png, png_bytep dst, size_t len) {
    png_state_t *st = png_get_io_ptr(png);
    if (len > st->size - st->pos) png_error(png, "unexpected end of PNG data (truncated file)");
    memcpy(dst, st->data + st->pos, len);
    st->pos += len;
}

/* Returns 0 when the pixels are in st->buf, -1 after a libpng error (message
 * in st->msg), or a VLM_ERR_* code (st->rc) for our own failures. */
static int png_decode_body(png_state_t *st) {
    png_structp png = st->png;
    png_infop info = st->info;
    if (setjmp(png_jmpbuf(png))) return -1;

    png_set_read_fn(png, st, png_read_mem);
    png_set_user_limits(png, 0x7fffffffu, 0x7fffffffu); /* our own budget decides */
    png_read_info(png, info);

    png_uint_32 w, h;
    int depth, ctype, interlace;
    png_get_IHDR(png, info, &w, &h, &depth, &ctype, &interlace, NULL, NULL);
    if ((st->rc = check_budget(w, h, st->opts, "PNG", st->err)) != 0) return st->rc;

    const bool has_trns = png_get_valid(png, info, PNG_INFO_tRNS) != 0;
    const bool drop = st->opts->alpha == VLM_ALPHA_DROP;
    st->had_alpha = (ctype & PNG_COLOR_MASK_ALPHA) || has_trns;
    if (ctype == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
    if (ctype == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
    if (has_trns && !drop) png_set_tRNS_to_alpha(png);
    if ((ctype & PNG_COLOR_MASK_ALPHA) && drop) png_set_strip_alpha(png);
    if (depth == 16) png_set_strip_16(png); /* keeps the high byte */
    if (!(ctype & PNG_COLOR_MASK_COLOR)) png_set_gray_to_rgb(png);
    const int passes = png_set_interlace_handling(png);
    png_read_update_info(png, info);

    st->channels = png_get_channels(png, info);
    const size_t rowbytes = png_get_rowbytes(png, info);
    if ((st->channels != 3 && st->channels != 4) || png_get_bit_depth(png, info) != 8 ||
        rowbytes != (size_t)w * (size_t)st->channels) {
        st->rc = vlm_error_set(st->err, VLM_ERR_INTERNAL,
                               "PNG transforms gave %d channels, depth %d, row %zu bytes",
                               st->channels, png_get_bit_depth(png, info), rowbytes);
        return st->rc;
    }
    st->buf = malloc(rowbytes * h);
    if (!st->buf) {
        st->rc = vlm_error_set(st->err, VLM_ERR_NOMEM, "out of memory for a %ux%u PNG",
                               (unsigned)w, (unsigned)h);
        return st->rc;
    }
    st->w = (int32_t)w;
    st->h = (int32_t)h;
    /* Row by row, pass by pass: interlaced passes merge into the rows
     * already read, so no row-pointer array is needed. */
    for (int pass = 0; pass < passes; pass++)
        for (png_uint_32 y = 0; y < h; y++) png_read_row(png, st->buf + rowbytes * y, NULL);
    png_read_end(png, info); /* reaches IEND: a file cut after IDAT fails too */

    st->orientation = 1;
#ifdef PNG_eXIf_SUPPORTED
    png_bytep exif = NULL;
    png_uint_32 exif_len = png_get_eXIf_1(png, info, &exif_len, &exif) ? exif_len : 0;
    if (exif && exif_len) st->orientation = tiff_orientation(exif, exif_len);
#endif
    return 0;
}

static int decode_png(const uint8_t *p, size_t n, const vlm_image_decode_opts_t *o,
                      vlm_image_u8_t *out, vlm_error_t *err) {
    png_state_t st = {.data = p, .size = n, .opts = o, .err = err};
    st.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &st, png_on_error, png_on_warning);
    if (!st.png) return vlm_error_set(err, VLM_ERR_NOMEM, "cannot create a libpng reader");
    st.info = png_create_info_struct(st.png);
    if (!st.info) {
        png_destroy_read_struct(&st.png, NULL, NULL);
        return vlm_error_set(err, VLM_ERR_NOMEM, "cannot create a libpng info struct");
    }
    int rc = png_decode_body(&st);
    png_destroy_read_struct(&st.png, &st.info, NULL);
    if (rc == -1) rc = vlm_error_set(err, VLM_ERR_IMAGE, "corrupt or truncated PNG: %s", st.msg);
    if (rc != 0) {
        free(st.buf);
        return rc;
    }
    const size_t npx = (size_t)st.w * (size_t)st.h;
    if (st.channels == 4) {
        rgba_to_rgb(st.buf, npx, o);
        uint8_t *shrunk = realloc(st.buf, npx * 3);
        if (shrunk) st.buf = shrunk;
    }
    out->w = st.w;
    out->h = st.h;
    out->rgb = st.buf;
    out->had_alpha = st.had_alpha;
    if (o->apply_exif_orientation) return apply_orientation(out, st.orientation, err);
    return 0;
}

/* ==== PNM (P5 / P6) ===================================================== */

/* Skips whitespace and '#' comments; returns false at the end of data. */
static bool pnm_skip_space(const uint8_t *p, size_t n, size_t *pos) {
    while (*pos < n) {
        if (is_pnm_space(p[*pos])) {
            (*pos)++;
        } else if (p[*pos] == '#') {
            while (*pos < n && p[*pos] != '\n' && p[*pos] != '\r') (*pos)++;
        } else {
            return true;
        }
    }
    return false;
}

/* Reads one decimal header field (at most 9 digits) that must end in
 * whitespace or a comment; -1 if malformed. */
static int64_t pnm_field(const uint8_t *p, size_t n, size_t *pos) {
    if (!pnm_skip_space(p, n, pos)) return -1;
    int64_t v = 0;
    int digits = 0;
    while (*pos < n && p[*pos] >= '0' && p[*pos] <= '9') {
        if (++digits > 9) return -1;
        v = v * 10 + (p[*pos] - '0');
        (*pos)++;
    }
    if (!digits || *pos >= n || !(is_pnm_space(p[*pos]) || p[*pos] == '#')) return -1;
    return v;
}

static int decode_pnm(const uint8_t *p, size_t n, const vlm_image_decode_opts_t *o,
                      vlm_image_u8_t *out, vlm_error_t *err) {
    const int ch = p[1] == '6' ? 3 : 1;
    const char *what = ch == 3 ? "PPM" : "PGM";
    size_t pos = 2;
    int64_t w = pnm_field(p, n, &pos);
    int64_t h = w < 0 ? -1 : pnm_field(p, n, &pos);
    int64_t maxval = h < 0 ? -1 : pnm_field(p, n, &pos);
    if (maxval < 0 || p[pos] == '#')
        return vlm_error_set(err, VLM_ERR_IMAGE,
                             "malformed or truncated %s header (width, height, maxval and one "
                             "whitespace byte expected)", what);
    pos++; /* exactly one whitespace byte before the raster */
    if (maxval < 1 || maxval > 65535)
        return vlm_error_set(err, VLM_ERR_IMAGE, "%s maxval %lld is outside 1..65535", what,
                             (long long)maxval);
    int rc = check_budget(w, h, o, what, err);
    if (rc) return rc;
    const size_t bps = maxval < 256 ? 1 : 2;
    const size_t nsamp = (size_t)w * (size_t)h * (size_t)ch;
    if (n - pos < nsamp * bps)
        return vlm_error_set(err, VLM_ERR_IMAGE,
                             "truncated %s data: %lldx%lld needs %zu bytes of samples, %zu present",
                             what, (long long)w, (long long)h, nsamp * bps, n - pos);
    if ((rc = vlm_image_u8_alloc(out, (int32_t)w, (int32_t)h, err)) != 0) return rc;
    const uint8_t *s = p + pos;
    const uint32_t mv = (uint32_t)maxval;
    uint8_t *d = out->rgb;
    for (size_t i = 0; i < nsamp; i++) {
        uint32_t v = bps == 1 ? s[i] : rd16be(s + 2 * i);
        if (v > mv) {
            vlm_image_u8_deinit(out);
            return vlm_error_set(err, VLM_ERR_IMAGE, "%s sample %u exceeds maxval %u", what, v, mv);
        }
        uint8_t b = mv == 255 ? (uint8_t)v : (uint8_t)((v * 255 + mv / 2) / mv);
        if (ch == 3) {
            d[i] = b;
        } else {
            d[3 * i] = d[3 * i + 1] = d[3 * i + 2] = b;
        }
    }
    return 0;
}

/* ==== Entry points ====================================================== */

int vlm_image_decode(const void *data, size_t size, const vlm_image_decode_opts_t *opts,
                     vlm_image_u8_t *out, vlm_error_t *err) {
    if (!out) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "vlm_image_decode: out is NULL");
    vlm_image_u8_init(out);
    if (!data && size) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "vlm_image_decode: data is NULL");
    vlm_image_decode_opts_t o;
    if (opts) {
        o = *opts;
        if (o.max_pixels <= 0) o.max_pixels = VLM_IMAGE_DEFAULT_MAX_PIXELS;
        if (o.max_bytes == 0) o.max_bytes = VLM_IMAGE_DEFAULT_MAX_BYTES;
        if (o.alpha != VLM_ALPHA_DROP && o.alpha != VLM_ALPHA_OVER_COLOR && o.alpha != VLM_ALPHA_OVER_WHITE)
            return vlm_error_set(err, VLM_ERR_INVALID_ARG, "unknown alpha mode %d", (int)o.alpha);
    } else {
        vlm_image_decode_opts_default(&o);
    }
    if (size == 0) return vlm_error_set(err, VLM_ERR_IMAGE, "empty image data (0 bytes)");
    if (size > o.max_bytes)
        return vlm_error_set(err, VLM_ERR_TOO_LARGE, "image data is %zu bytes, over the budget of %zu",
                             size, o.max_bytes);
    int rc;
    switch (vlm_image_detect(data, size)) {
    case VLM_IMAGE_FORMAT_JPEG: rc = decode_jpeg(data, size, &o, out, err); break;
    case VLM_IMAGE_FORMAT_PNG: rc = decode_png(data, size, &o, out, err); break;
    case VLM_IMAGE_FORMAT_PNM: rc = decode_pnm(data, size, &o, out, err); break;
    default: rc = unsupported_format(data, size, err); break;
    }
    if (rc != 0) vlm_image_u8_deinit(out);
    return rc;
}

int vlm_image_load_file(const char *path, const vlm_image_decode_opts_t *opts,
                        vlm_image_u8_t *out, vlm_error_t *err) {
    if (!out || !path) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "vlm_image_load_file: NULL argument");
    vlm_image_u8_init(out);
    size_t max_bytes = opts && opts->max_bytes ? opts->max_bytes : VLM_IMAGE_DEFAULT_MAX_BYTES;
    FILE *f = fopen(path, "rb");
    if (!f) return vlm_error_set(err, VLM_ERR_IO, "cannot open image %s: %s", path, strerror(errno));
    uint8_t *buf = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    for (;;) {
        if (n == cap) {
            if (cap > max_bytes) {
                rc = vlm_error_set(err, VLM_ERR_TOO_LARGE, "image file %s is over the budget of %zu bytes",
                                   path, max_bytes);
                break;
            }
            size_t ncap = cap ? cap * 2 : 1 << 16;
            uint8_t *nb = realloc(buf, ncap);
            if (!nb) {
                rc = vlm_error_set(err, VLM_ERR_NOMEM, "out of memory reading image %s", path);
                break;
            }
            buf = nb;
            cap = ncap;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) {
            if (ferror(f)) rc = vlm_error_set(err, VLM_ERR_IO, "cannot read image %s", path);
            break;
        }
    }
    fclose(f);
    if (rc == 0) {
        rc = vlm_image_decode(buf, n, opts, out, err);
        if (rc != 0 && err) {
            char tmp[2 * sizeof err->msg + 8];
            int k = snprintf(tmp, sizeof tmp, "%.400s: %s", path, err->msg);
            size_t len = k < 0 ? 0 : (size_t)k < sizeof err->msg ? (size_t)k : sizeof err->msg - 1;
            memcpy(err->msg, tmp, len);
            err->msg[len] = '\0';
        }
    }
    free(buf);
    return rc;
}
