/* tests/test_image.c - image decoding from memory.
 *
 * Golden: every PNG of every case decodes to its .rgb.u8 (alpha dropped) and
 * every JPEG to its .rgb_pil.u8 (libjpeg-turbo = PIL), exactly. Synthetic:
 * PNG variants written here with libpng (16-bit, palette, 1-bit gray,
 * gray+alpha, interlaced, tRNS, eXIf) with expected pixels computed from the
 * source; JPEGs written with TurboJPEG (EXIF orientations 1-8 spliced in as
 * APP1, CMYK/YCCK); a JPEG with sampling factors that TurboJPEG's header call
 * rejects, against a hash of PIL's decode; PGM/PPM variants. Robustness:
 * truncation at many cut points, seeded bit flips, mislabelled and random
 * data, empty input, headers claiming huge sizes (must fail fast with
 * VLM_ERR_TOO_LARGE), a scan bomb, benign JPEG warnings. */
#include <jansson.h>
#include <png.h>
#include <stdint.h>
#include <time.h>
#include <turbojpeg.h>
#include <unistd.h>

#include "core/error.h"
#include "tests/harness.h"
#include "vision/image.h"

static const char *const cases[] = {"micro-f32", "small-q8_0", "small-q4_0", "small-q4_k_m"};
#define N_CASES (sizeof cases / sizeof cases[0])

/* ==== Helpers ============================================================ */

typedef struct buf {
    uint8_t *p;
    size_t n, cap;
} buf_t;

static void buf_put(buf_t *b, const void *d, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}

static void buf_free(buf_t *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng(void) { /* xorshift64*, seeded above: deterministic */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *read_golden(const char *cs, const char *name, size_t *n) {
    char path[512];
    snprintf(path, sizeof path, "%s/golden/%s/%s", VLM_TEST_DATA, cs, name);
    return harness_read_file(path, n);
}

/* "<stem><suffix>" for a file name "<stem>.<ext>". */
static void dump_name(const char *file, const char *suffix, char *out, size_t cap) {
    char stem[128];
    snprintf(stem, sizeof stem, "%s", file);
    char *dot = strrchr(stem, '.');
    if (dot) *dot = '\0';
    snprintf(out, cap, "%s%s", stem, suffix);
}

static vlm_image_decode_opts_t opts_drop(bool exif) {
    vlm_image_decode_opts_t o;
    vlm_image_decode_opts_default(&o);
    o.alpha = VLM_ALPHA_DROP;
    o.apply_exif_orientation = exif;
    return o;
}

static const uint8_t *px_at(const vlm_image_u8_t *im, int x, int y) {
    return im->rgb + 3 * ((size_t)y * im->w + x);
}

/* CRC-32 (PNG / zlib polynomial), for hand-made PNG chunks. */
static uint32_t crc32_png(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1)));
    }
    return c ^ 0xFFFFFFFFu;
}

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}

/* ==== PNG writer (libpng, into memory) =================================== */

static void png_mem_write(png_structp png, png_bytep d, size_t n) { buf_put(png_get_io_ptr(png), d, n); }
static void png_mem_flush(png_structp png) { (void)png; }

typedef struct png_spec {
    int w, h, depth, ctype;
    bool interlace;
    const uint8_t *rows;           /* [h][rowbytes] as libpng wants them (big-endian 16-bit) */
    const png_color *palette;      /* PLTE */
    int n_palette;
    const uint8_t *trns_alpha;     /* tRNS for palettes */
    int n_trns;
    const png_color_16 *trns_color; /* tRNS colour key for gray/RGB */
    const uint8_t *exif;           /* eXIf payload (TIFF) */
    uint32_t exif_len;
} png_spec_t;

static buf_t write_png(const png_spec_t *s) {
    buf_t b = {0};
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        buf_free(&b);
        return b;
    }
    png_set_write_fn(png, &b, png_mem_write, png_mem_flush);
    png_set_IHDR(png, info, s->w, s->h, s->depth, s->ctype,
                 s->interlace ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
                 PNG_FILTER_TYPE_DEFAULT);
    if (s->palette) png_set_PLTE(png, info, s->palette, s->n_palette);
    if (s->trns_alpha || s->trns_color)
        png_set_tRNS(png, info, s->trns_alpha, s->n_trns, (png_color_16p)s->trns_color);
    if (s->exif) png_set_eXIf_1(png, info, s->exif_len, (png_bytep)s->exif);
    png_write_info(png, info);
    const size_t rowbytes = png_get_rowbytes(png, info);
    png_bytep *rp = malloc((size_t)s->h * sizeof *rp);
    for (int y = 0; y < s->h; y++) rp[y] = (png_bytep)s->rows + (size_t)y * rowbytes;
    png_write_image(png, rp);
    png_write_end(png, info);
    free(rp);
    png_destroy_write_struct(&png, &info);
    return b;
}

/* ==== JPEG writer (TurboJPEG) ============================================ */

static buf_t write_jpeg(const uint8_t *px, int w, int h, int pf, int subsamp, int quality, int flags) {
    buf_t b = {0};
    tjhandle tj = tjInitCompress();
    unsigned char *jpeg = NULL;
    unsigned long n = 0;
    if (tj && tjCompress2(tj, px, w, 0, h, pf, &jpeg, &n, subsamp, quality, flags) == 0) buf_put(&b, jpeg, n);
    else fprintf(stderr, "  tjCompress2: %s\n", tj ? tjGetErrorStr2(tj) : "no handle");
    tjFree(jpeg);
    if (tj) tjDestroy(tj);
    return b;
}

/* Builds a TIFF (the payload after "Exif\0\0") whose IFD0 holds only the
 * orientation tag, big- or little-endian. Returns its length (26). */
static size_t make_tiff_orientation(uint8_t *t, int orientation, bool le) {
    memset(t, 0, 26);
    if (le) {
        memcpy(t, "II*\0\x08\0\0\0", 8);
        t[8] = 1;                            /* one entry */
        t[10] = 0x12, t[11] = 0x01;          /* tag 0x0112 */
        t[12] = 3;                           /* SHORT */
        t[14] = 1;                           /* count 1 */
        t[18] = (uint8_t)orientation;        /* value */
    } else {
        memcpy(t, "MM\0*\0\0\0\x08", 8);
        t[9] = 1;
        t[10] = 0x01, t[11] = 0x12;
        t[13] = 3;
        t[17] = 1;
        t[19] = (uint8_t)orientation;
    }
    return 26; /* 8 header + 2 count + 12 entry + 4 next-IFD */
}

/* Copies jpeg with an APP1 "Exif\0\0" + tiff segment right after SOI. */
static buf_t splice_app1(const buf_t *jpeg, const uint8_t *tiff, size_t tiff_len) {
    buf_t b = {0};
    buf_put(&b, jpeg->p, 2);
    uint8_t hdr[10] = {0xFF, 0xE1, 0, 0, 'E', 'x', 'i', 'f', 0, 0};
    size_t len = 2 + 6 + tiff_len;
    hdr[2] = (uint8_t)(len >> 8), hdr[3] = (uint8_t)len;
    buf_put(&b, hdr, sizeof hdr);
    buf_put(&b, tiff, tiff_len);
    buf_put(&b, jpeg->p + 2, jpeg->n - 2);
    return b;
}

/* Offset of the first marker m (0xFF m) after SOI, walking segments; 0 if none. */
static size_t find_marker(const buf_t *j, uint8_t m) {
    size_t pos = 2;
    while (pos + 4 <= j->n && j->p[pos] == 0xFF) {
        if (j->p[pos + 1] == m) return pos;
        if (j->p[pos + 1] == 0xDA) return 0;
        pos += 2 + ((size_t)j->p[pos + 2] << 8 | j->p[pos + 3]);
    }
    return 0;
}

/* ==== Golden files ======================================================= */

static void test_golden_decode(void) {
    int n_png = 0, n_jpg = 0;
    for (size_t ci = 0; ci < N_CASES; ci++) {
        char path[512];
        snprintf(path, sizeof path, "%s/golden/%s/case.json", VLM_TEST_DATA, cases[ci]);
        json_t *root = json_load_file(path, 0, NULL);
        REQUIRE(root != NULL, "cannot read %s", path);
        json_t *imgs = json_object_get(root, "images");
        for (size_t i = 0; i < json_array_size(imgs); i++) {
            json_t *im = json_array_get(imgs, i);
            const char *file = json_string_value(json_object_get(im, "file"));
            const int W = (int)json_integer_value(json_object_get(im, "width"));
            const int H = (int)json_integer_value(json_object_get(im, "height"));
            const bool is_png = strstr(file, ".png") != NULL;
            char name[160];
            size_t n = 0, nref = 0, nstb = 0;
            uint8_t *data = read_golden(cases[ci], file, &n);
            dump_name(file, ".rgb_pil.u8", name, sizeof name);
            uint8_t *ref = read_golden(cases[ci], name, &nref);
            dump_name(file, ".rgb.u8", name, sizeof name);
            uint8_t *stb = read_golden(cases[ci], name, &nstb);
            CHECK(data && ref && stb && nref == (size_t)W * H * 3 && nstb == nref, "%s", file);
            vlm_image_u8_t img;
            vlm_error_t err;
            vlm_image_decode_opts_t o = opts_drop(true);
            int rc = data ? vlm_image_decode(data, n, &o, &img, &err) : -1;
            CHECK(rc == 0, "%s/%s: %s", cases[ci], file, err.msg);
            if (rc == 0 && ref && stb) {
                CHECK(img.w == W && img.h == H, "%s: %dx%d", file, img.w, img.h);
                CHECK(vlm_image_detect(data, n) == (is_png ? VLM_IMAGE_FORMAT_PNG : VLM_IMAGE_FORMAT_JPEG));
                int maxd = 0;
                size_t ndiff = 0;
                for (size_t k = 0; k < nref; k++) {
                    int d = abs((int)img.rgb[k] - (int)ref[k]);
                    maxd = d > maxd ? d : maxd;
                    ndiff += d != 0;
                }
                CHECK(ndiff == 0, "%s/%s vs .rgb_pil.u8: %zu values differ (max %d)", cases[ci], file, ndiff, maxd);
                if (is_png) {
                    CHECK(memcmp(img.rgb, stb, nstb) == 0, "%s: PNG must equal .rgb.u8", file);
                    CHECK(img.had_alpha == (strstr(file, "rgba") != NULL));
                    n_png++;
                } else {
                    int maxs = 0;
                    for (size_t k = 0; k < nstb; k++) {
                        int d = abs((int)img.rgb[k] - (int)stb[k]);
                        maxs = d > maxs ? d : maxs;
                    }
                    fprintf(stderr, "  %s/%s: equals PIL; vs stb_image max diff %d levels\n", cases[ci], file, maxs);
                    CHECK(!img.had_alpha);
                    n_jpg++;
                }
                if (strstr(file, "gray")) { /* grayscale expands to R = G = B */
                    size_t bad = 0;
                    for (size_t k = 0; k < (size_t)W * H; k++)
                        bad += img.rgb[3 * k] != img.rgb[3 * k + 1] || img.rgb[3 * k] != img.rgb[3 * k + 2];
                    CHECK(bad == 0);
                }
            }
            vlm_image_u8_deinit(&img);
            /* the file path entry point gives the same pixels */
            snprintf(path, sizeof path, "%s/golden/%s/%s", VLM_TEST_DATA, cases[ci], file);
            vlm_image_u8_t img2;
            rc = vlm_image_load_file(path, &o, &img2, &err);
            CHECK(rc == 0 && ref && memcmp(img2.rgb, ref, nref) == 0, "load_file %s: %s", path, err.msg);
            vlm_image_u8_deinit(&img2);
            free(data);
            free(ref);
            free(stb);
        }
        json_decref(root);
    }
    CHECK(n_png == 8 && n_jpg == 12, "png %d jpg %d", n_png, n_jpg);
}

/* ==== Robustness ========================================================= */

static const char *const robust_files[] = {"exact.png", "rgba_77x45.png", "photo_200x150.jpg",
                                           "gray_96x128.jpg", "prog_131x97.jpg"};

static void test_truncated(void) {
    for (size_t f = 0; f < 5; f++) {
        size_t n = 0;
        uint8_t *data = read_golden("micro-f32", robust_files[f], &n);
        REQUIRE(data != NULL);
        int tried = 0, failed_ok = 0;
        for (size_t cut = 0; cut < n; cut++) {
            /* every cut in the first 600 and last 80 bytes, every 7th elsewhere */
            if (cut > 600 && cut + 80 < n && cut % 7) continue;
            uint8_t *copy = malloc(cut ? cut : 1); /* exact size, so ASan sees overreads */
            memcpy(copy, data, cut);
            vlm_image_u8_t img;
            vlm_error_t err;
            int rc = vlm_image_decode(copy, cut, NULL, &img, &err);
            tried++;
            if (rc == VLM_ERR_IMAGE && img.rgb == NULL && img.w == 0) failed_ok++;
            else CHECK(0, "%s cut at %zu of %zu: rc %d (%s)", robust_files[f], cut, n, rc, err.msg);
            if (cut == n - 1 || cut == n / 2)
                fprintf(stderr, "  %s cut at %zu/%zu: %s\n", robust_files[f], cut, n, err.msg);
            vlm_image_u8_deinit(&img);
            free(copy);
        }
        CHECK(failed_ok == tried);
        free(data);
    }
}

static void test_bitflips(void) {
    rng_state = 12345;
    int n_ok = 0, n_err = 0;
    for (size_t f = 0; f < 5; f++) {
        size_t n = 0;
        uint8_t *data = read_golden("micro-f32", robust_files[f], &n);
        REQUIRE(data != NULL);
        uint8_t *copy = malloc(n);
        for (int trial = 0; trial < 300; trial++) {
            memcpy(copy, data, n);
            int flips = 1 + (int)(rng() % 4);
            for (int k = 0; k < flips; k++) {
                size_t at = (size_t)(rng() % n);
                if (trial % 2 && at < 8) at += 8; /* half the trials keep the magic intact */
                copy[at % n] ^= (uint8_t)(1u << (rng() % 8));
            }
            vlm_image_u8_t img;
            vlm_error_t err;
            int rc = vlm_image_decode(copy, n, NULL, &img, &err);
            CHECK(rc == 0 || rc == VLM_ERR_IMAGE || rc == VLM_ERR_TOO_LARGE, "%s trial %d: rc %d %s",
                  robust_files[f], trial, rc, err.msg);
            if (rc == 0) {
                CHECK(img.w > 0 && img.h > 0 && img.rgb != NULL);
                volatile uint8_t sink = img.rgb[(size_t)img.w * img.h * 3 - 1]; /* ASan: fully allocated */
                (void)sink;
                n_ok++;
            } else {
                CHECK(img.rgb == NULL && err.msg[0] != '\0');
                n_err++;
            }
            vlm_image_u8_deinit(&img);
        }
        free(copy);
        free(data);
    }
    fprintf(stderr, "  1500 bit-flipped files: %d decoded, %d refused\n", n_ok, n_err);
}

static void test_mislabelled_and_random(void) {
    size_t npng = 0, njpg = 0;
    uint8_t *png = read_golden("micro-f32", "exact.png", &npng);
    uint8_t *jpg = read_golden("micro-f32", "photo_200x150.jpg", &njpg);
    REQUIRE(png && jpg);
    vlm_image_u8_t img;
    vlm_error_t err;

    /* a PNG saved under a .jpg name: detection is by content */
    char path[256];
    snprintf(path, sizeof path, "/tmp/vlm_test_image_%d.jpg", (int)getpid());
    FILE *f = fopen(path, "wb");
    REQUIRE(f != NULL);
    fwrite(png, 1, npng, f);
    fclose(f);
    CHECK(vlm_image_load_file(path, NULL, &img, &err) == 0, "%s", err.msg);
    CHECK(img.w == 56 && img.h == 56);
    vlm_image_u8_deinit(&img);
    unlink(path);
    CHECK(vlm_image_load_file("/nonexistent/x.png", NULL, &img, &err) == VLM_ERR_IO);
    CHECK(strstr(err.msg, "/nonexistent/x.png") != NULL, "%s", err.msg);

    /* a JPEG header (SOI + APP0) followed by a whole PNG */
    buf_t b = {0};
    buf_put(&b, jpg, 20);
    buf_put(&b, png, npng);
    CHECK(vlm_image_decode(b.p, b.n, NULL, &img, &err) == VLM_ERR_IMAGE);
    fprintf(stderr, "  JPEG header + PNG: %s\n", err.msg);
    buf_free(&b);
    /* a PNG signature followed by JPEG data */
    buf_put(&b, png, 8);
    buf_put(&b, jpg, njpg);
    CHECK(vlm_image_decode(b.p, b.n, NULL, &img, &err) == VLM_ERR_IMAGE);
    buf_free(&b);

    /* random bytes of many lengths (first byte kept away from the magics) */
    rng_state = 777;
    for (int t = 0; t < 200; t++) {
        size_t n = 1 + (size_t)(rng() % 4000);
        uint8_t *r = malloc(n);
        for (size_t i = 0; i < n; i++) r[i] = (uint8_t)rng();
        if (r[0] == 0xFF || r[0] == 0x89 || r[0] == 'P') r[0] = 0x42;
        CHECK(vlm_image_decode(r, n, NULL, &img, &err) == VLM_ERR_IMAGE);
        CHECK(strstr(err.msg, "unsupported image format") != NULL, "%s", err.msg);
        /* random bytes behind each real magic */
        for (int m = 0; m < 3; m++) {
            static const uint8_t magic[3][8] = {{0xFF, 0xD8, 0xFF}, {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A},
                                                {'P', '6', '\n'}};
            static const size_t mlen[3] = {3, 8, 3};
            uint8_t *r2 = malloc(n + 8);
            memcpy(r2, magic[m], mlen[m]);
            memcpy(r2 + mlen[m], r, n);
            int rc = vlm_image_decode(r2, n + mlen[m], NULL, &img, &err);
            CHECK(rc == VLM_ERR_IMAGE || rc == VLM_ERR_TOO_LARGE, "magic %d: rc %d %s", m, rc, err.msg);
            vlm_image_u8_deinit(&img);
            free(r2);
        }
        free(r);
    }

    /* named foreign formats */
    static const struct { const char *bytes; size_t n; const char *hint; } foreign[] = {
        {"GIF89a\x01\0\x01\0", 10, "47 49 46 38: GIF"},
        {"RIFF\0\0\0\0WEBPVP8 ", 16, "WebP"},
        {"BM\0\0\0\0\0\0\0\0", 10, "BMP"},
        {"\0\0\0\x18" "ftypheic\0\0\0\0", 16, "HEIF"},
        {"II*\0\x08\0\0\0", 8, "TIFF"},
        {"P3\n1 1\n255\n0 0 0\n", 17, "ASCII"},
        {"\x89PN", 3, "truncated PNG"},
    };
    for (size_t i = 0; i < sizeof foreign / sizeof foreign[0]; i++) {
        CHECK(vlm_image_detect(foreign[i].bytes, foreign[i].n) == VLM_IMAGE_FORMAT_UNKNOWN);
        CHECK(vlm_image_decode(foreign[i].bytes, foreign[i].n, NULL, &img, &err) == VLM_ERR_IMAGE);
        CHECK(strstr(err.msg, foreign[i].hint) != NULL, "%s", err.msg);
    }
    fprintf(stderr, "  GIF: %s\n", err.msg);
    free(png);
    free(jpg);
}

static void test_empty_and_args(void) {
    vlm_image_u8_t img;
    vlm_error_t err;
    uint8_t one = 0xFF;
    CHECK(vlm_image_decode(NULL, 0, NULL, &img, &err) == VLM_ERR_IMAGE);
    CHECK(strstr(err.msg, "empty") != NULL, "%s", err.msg);
    CHECK(vlm_image_decode(&one, 0, NULL, &img, &err) == VLM_ERR_IMAGE);
    CHECK(vlm_image_decode(&one, 1, NULL, &img, &err) == VLM_ERR_IMAGE);
    CHECK(vlm_image_decode(NULL, 5, NULL, &img, &err) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_image_decode(&one, 1, NULL, NULL, &err) == VLM_ERR_INVALID_ARG);
    vlm_image_decode_opts_t o = opts_drop(false);
    o.alpha = (vlm_image_alpha_t)9;
    CHECK(vlm_image_decode(&one, 1, &o, &img, &err) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_image_detect(NULL, 10) == VLM_IMAGE_FORMAT_UNKNOWN);
    CHECK(strcmp(vlm_image_format_name(VLM_IMAGE_FORMAT_PNG), "png") == 0);
    CHECK(strcmp(vlm_image_format_name(VLM_IMAGE_FORMAT_JPEG), "jpeg") == 0);
    CHECK(strcmp(vlm_image_format_name(VLM_IMAGE_FORMAT_PNM), "pnm") == 0);
    CHECK(strcmp(vlm_image_format_name((vlm_image_format_t)99), "unknown") == 0);
    vlm_image_u8_deinit(NULL);
    CHECK(vlm_image_u8_alloc(&img, 0, 3, &err) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_image_u8_alloc(&img, 2, 3, &err) == 0 && img.rgb && img.w == 2 && img.h == 3);
    vlm_image_u8_deinit(&img);
    CHECK(img.rgb == NULL && img.w == 0);
}

/* Headers that claim huge images must fail at once, before allocating. */
static void test_huge_headers(void) {
    vlm_image_u8_t img;
    vlm_error_t err;
    /* PNG: IHDR 100000 x 100000 RGB8, then the start of an IDAT */
    uint8_t p[8 + 25 + 14];
    memcpy(p, "\x89PNG\r\n\x1a\n", 8);
    uint8_t *ihdr = p + 8;
    put_be32(ihdr, 13);
    memcpy(ihdr + 4, "IHDR", 4);
    put_be32(ihdr + 8, 100000);
    put_be32(ihdr + 12, 100000);
    ihdr[16] = 8, ihdr[17] = 2, ihdr[18] = 0, ihdr[19] = 0, ihdr[20] = 0;
    put_be32(ihdr + 21, crc32_png(ihdr + 4, 17));
    uint8_t *idat = p + 33;
    put_be32(idat, 2);
    memcpy(idat + 4, "IDAT\x78\x9c", 6);
    put_be32(idat + 10, crc32_png(idat + 4, 6));
    double t0 = now_s();
    CHECK(vlm_image_decode(p, sizeof p, NULL, &img, &err) == VLM_ERR_TOO_LARGE, "%s", err.msg);
    CHECK(strstr(err.msg, "100000x100000") && strstr(err.msg, "67108864"), "%s", err.msg);
    fprintf(stderr, "  PNG: %s\n", err.msg);

    /* PPM: 100000 x 100000 with a few bytes of data */
    const char *ppm = "P6\n100000 100000\n255\n\x01\x02\x03";
    CHECK(vlm_image_decode(ppm, strlen(ppm), NULL, &img, &err) == VLM_ERR_TOO_LARGE, "%s", err.msg);
    CHECK(strstr(err.msg, "100000x100000") != NULL, "%s", err.msg);

    /* JPEG: a real file with its SOF patched to 60000 x 60000 (JPEG's limit is 65500) */
    size_t n = 0;
    uint8_t *jpg = read_golden("micro-f32", "photo_200x150.jpg", &n);
    REQUIRE(jpg != NULL);
    buf_t j = {0};
    buf_put(&j, jpg, n);
    size_t sof = find_marker(&j, 0xC0);
    REQUIRE(sof > 0);
    j.p[sof + 5] = 60000 >> 8, j.p[sof + 6] = 60000 & 255, j.p[sof + 7] = 60000 >> 8, j.p[sof + 8] = 60000 & 255;
    CHECK(vlm_image_decode(j.p, j.n, NULL, &img, &err) == VLM_ERR_TOO_LARGE, "%s", err.msg);
    CHECK(strstr(err.msg, "60000x60000") != NULL, "%s", err.msg);
    const double dt = now_s() - t0;
    CHECK(dt < 0.5, "three refusals took %.3f s", dt);

    /* the budget itself: exactly at the limit passes, one pixel under fails */
    vlm_image_decode_opts_t o = opts_drop(false);
    o.max_pixels = 200 * 150;
    CHECK(vlm_image_decode(jpg, n, &o, &img, &err) == 0, "%s", err.msg);
    vlm_image_u8_deinit(&img);
    o.max_pixels = 200 * 150 - 1;
    CHECK(vlm_image_decode(jpg, n, &o, &img, &err) == VLM_ERR_TOO_LARGE);
    CHECK(strstr(err.msg, "200x150") != NULL, "%s", err.msg);
    o.max_pixels = 0; /* 0 = default */
    o.max_bytes = 100;
    CHECK(vlm_image_decode(jpg, n, &o, &img, &err) == VLM_ERR_TOO_LARGE);
    buf_free(&j);
    free(jpg);
}

/* Benign JPEG warnings pass, with the same pixels; truncation behind them is
 * still caught; a file with hundreds of scans is refused. */
static void test_jpeg_warnings_and_scans(void) {
    size_t n = 0, nref = 0;
    uint8_t *jpg = read_golden("micro-f32", "photo_200x150.jpg", &n);
    uint8_t *ref = read_golden("micro-f32", "photo_200x150.rgb_pil.u8", &nref);
    REQUIRE(jpg && ref);
    buf_t j = {0};
    buf_put(&j, jpg, n);
    size_t dqt = find_marker(&j, 0xDB);
    REQUIRE(dqt > 0);
    buf_t g = {0}; /* 3 garbage bytes before the DQT marker */
    buf_put(&g, jpg, dqt);
    buf_put(&g, "xyz", 3);
    buf_put(&g, jpg + dqt, n - dqt);
    vlm_image_u8_t img;
    vlm_error_t err;
    CHECK(vlm_image_decode(g.p, g.n, NULL, &img, &err) == 0, "%s", err.msg);
    CHECK(img.rgb && nref == (size_t)img.w * img.h * 3 && memcmp(img.rgb, ref, nref) == 0);
    vlm_image_u8_deinit(&img);
    for (size_t cut = g.n - 300; cut < g.n; cut += 37) {
        CHECK(vlm_image_decode(g.p, cut, NULL, &img, &err) == VLM_ERR_IMAGE, "cut %zu", cut);
    }
    /* trailing bytes after EOI are ignored */
    buf_put(&j, "trailing junk", 13);
    CHECK(vlm_image_decode(j.p, j.n, NULL, &img, &err) == 0, "%s", err.msg);
    CHECK(img.rgb && memcmp(img.rgb, ref, nref) == 0);
    vlm_image_u8_deinit(&img);

    /* scan bomb: the first scan of the progressive file repeated 600 times */
    size_t np = 0;
    uint8_t *prog = read_golden("micro-f32", "prog_131x97.jpg", &np);
    REQUIRE(prog != NULL);
    buf_t pj = {0};
    buf_put(&pj, prog, np);
    size_t sos = find_marker(&pj, 0xDA);
    REQUIRE(sos > 0);
    size_t end = sos + 2 + ((size_t)prog[sos + 2] << 8 | prog[sos + 3]);
    while (end + 1 < np && !(prog[end] == 0xFF && prog[end + 1] != 0 && (prog[end + 1] < 0xD0 || prog[end + 1] > 0xD7)))
        end++;
    buf_t bomb = {0};
    buf_put(&bomb, prog, sos);
    for (int i = 0; i < 600; i++) buf_put(&bomb, prog + sos, end - sos);
    buf_put(&bomb, prog + end, np - end);
    CHECK(vlm_image_decode(bomb.p, bomb.n, NULL, &img, &err) == VLM_ERR_IMAGE);
    CHECK(strstr(err.msg, "scans") != NULL, "%s", err.msg);
    buf_free(&bomb);
    buf_free(&pj);
    buf_free(&g);
    buf_free(&j);
    free(prog);
    free(jpg);
    free(ref);
}

/* ==== Unusual chroma sampling ============================================ */

/* A 19 x 13 JPEG written with libjpeg's own API with sampling factors
 * Y 1x2, Cb 2x1, Cr 1x1, which TurboJPEG 2.1's header call rejects ("Could
 * not determine subsampling type") although libjpeg decodes it. Expected:
 * FNV-1a 64 of PIL 9.4's Image.open(f).convert("RGB").tobytes(). */
static const uint8_t odd_sampling_jpeg[] = {
    0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10, 0x4a, 0x46, 0x49, 0x46, 0x00, 0x01, 0x01, 0x00, 0x00, 0x01,
    0x00, 0x01, 0x00, 0x00, 0xff, 0xdb, 0x00, 0x43, 0x00, 0x03, 0x02, 0x02, 0x03, 0x02, 0x02, 0x03,
    0x03, 0x03, 0x03, 0x04, 0x03, 0x03, 0x04, 0x05, 0x08, 0x05, 0x05, 0x04, 0x04, 0x05, 0x0a, 0x07,
    0x07, 0x06, 0x08, 0x0c, 0x0a, 0x0c, 0x0c, 0x0b, 0x0a, 0x0b, 0x0b, 0x0d, 0x0e, 0x12, 0x10, 0x0d,
    0x0e, 0x11, 0x0e, 0x0b, 0x0b, 0x10, 0x16, 0x10, 0x11, 0x13, 0x14, 0x15, 0x15, 0x15, 0x0c, 0x0f,
    0x17, 0x18, 0x16, 0x14, 0x18, 0x12, 0x14, 0x15, 0x14, 0xff, 0xdb, 0x00, 0x43, 0x01, 0x03, 0x04,
    0x04, 0x05, 0x04, 0x05, 0x09, 0x05, 0x05, 0x09, 0x14, 0x0d, 0x0b, 0x0d, 0x14, 0x14, 0x14, 0x14,
    0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14,
    0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14,
    0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0x14, 0xff, 0xc0,
    0x00, 0x11, 0x08, 0x00, 0x0d, 0x00, 0x13, 0x03, 0x01, 0x12, 0x00, 0x02, 0x21, 0x01, 0x03, 0x11,
    0x01, 0xff, 0xc4, 0x00, 0x16, 0x00, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, 0x06, 0x09, 0xff, 0xc4, 0x00, 0x24, 0x10, 0x00, 0x00,
    0x02, 0x08, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02,
    0x01, 0x05, 0x06, 0x12, 0x13, 0x22, 0x41, 0x51, 0x03, 0x04, 0x11, 0x21, 0x23, 0xa1, 0xb1, 0xff,
    0xc4, 0x00, 0x17, 0x01, 0x01, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x06, 0x00, 0x04, 0x05, 0xff, 0xc4, 0x00, 0x1c, 0x11, 0x00, 0x01, 0x04,
    0x03, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01,
    0x04, 0x11, 0x03, 0x05, 0x06, 0x14, 0xff, 0xda, 0x00, 0x0c, 0x03, 0x01, 0x00, 0x02, 0x11, 0x03,
    0x11, 0x00, 0x3f, 0x00, 0xce, 0xb5, 0x0b, 0x2f, 0x11, 0xd9, 0x3a, 0x0a, 0x8c, 0x9a, 0x9f, 0x00,
    0xf0, 0xf5, 0xf0, 0x54, 0x84, 0x5e, 0x9a, 0xb4, 0xfe, 0x16, 0x84, 0x24, 0xd5, 0xac, 0xb8, 0x5b,
    0x92, 0x0a, 0x52, 0xc5, 0x63, 0x25, 0x47, 0x1d, 0x2c, 0x1a, 0xc8, 0xa1, 0xcb, 0xba, 0x8d, 0xa9,
    0x60, 0xbc, 0x38, 0x8c, 0x44, 0x2c, 0xf4, 0xca, 0x24, 0xed, 0xd0, 0x1d, 0x2f, 0xff, 0xd9,
};

static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static void test_jpeg_unusual_sampling(void) {
    vlm_image_u8_t img;
    vlm_error_t err;
    REQUIRE(vlm_image_decode(odd_sampling_jpeg, sizeof odd_sampling_jpeg, NULL, &img, &err) == 0, "%s", err.msg);
    CHECK(img.w == 19 && img.h == 13);
    CHECK(fnv1a(img.rgb, (size_t)img.w * img.h * 3) == 0x684f5924c7899e8full, "pixels differ from PIL");
    vlm_image_u8_deinit(&img);
    /* truncated, it still fails */
    CHECK(vlm_image_decode(odd_sampling_jpeg, sizeof odd_sampling_jpeg - 40, NULL, &img, &err) == VLM_ERR_IMAGE);
}

/* ==== EXIF orientation =================================================== */

/* A 32 x 16 JPEG with four 16 x 8 quadrants: TL red, TR green, BL blue,
 * BR white (block-aligned, 4:4:4, quality 100, so colours stay clean). */
static buf_t quadrant_jpeg(void) {
    static const uint8_t col[4][3] = {{255, 0, 0}, {0, 255, 0}, {0, 0, 255}, {255, 255, 255}};
    uint8_t px[16][32][3];
    for (int y = 0; y < 16; y++)
        for (int x = 0; x < 32; x++) memcpy(px[y][x], col[(y >= 8) * 2 + (x >= 16)], 3);
    return write_jpeg(&px[0][0][0], 32, 16, TJPF_RGB, TJSAMP_444, 100, 0);
}

/* Index (0 R, 1 G, 2 B, 3 W) of the reference colour nearest to p. */
static int nearest_quadrant_colour(const uint8_t *p) {
    static const uint8_t col[4][3] = {{255, 0, 0}, {0, 255, 0}, {0, 0, 255}, {255, 255, 255}};
    int best = -1, bd = 1 << 30;
    for (int c = 0; c < 4; c++) {
        int d = 0;
        for (int k = 0; k < 3; k++) d += abs((int)p[k] - col[c][k]) * abs((int)p[k] - col[c][k]);
        if (d < bd) bd = d, best = c;
    }
    return bd < 3 * 10 * 10 ? best : -1;
}

/* Expected corner colours (TL, TR, BL, BR) after applying orientation o,
 * worked out by hand from the EXIF definitions (= PIL exif_transpose). */
static const int expect_corners[9][4] = {
    {0, 0, 0, 0},
    {0, 1, 2, 3}, /* 1 as stored */
    {1, 0, 3, 2}, /* 2 mirror left-right */
    {3, 2, 1, 0}, /* 3 rotate 180 */
    {2, 3, 0, 1}, /* 4 mirror top-bottom */
    {0, 2, 1, 3}, /* 5 transpose */
    {2, 0, 3, 1}, /* 6 rotate 90 clockwise */
    {3, 1, 2, 0}, /* 7 transverse */
    {1, 3, 0, 2}, /* 8 rotate 90 counter-clockwise */
};

static void check_corners(const vlm_image_u8_t *img, int o, const char *what) {
    const bool swap = o >= 5;
    CHECK(img->w == (swap ? 16 : 32) && img->h == (swap ? 32 : 16), "%s o=%d: %dx%d", what, o, img->w, img->h);
    if (img->w != (swap ? 16 : 32)) return;
    /* sample the centre of each quadrant */
    const int qx[2] = {img->w / 4, img->w * 3 / 4}, qy[2] = {img->h / 4, img->h * 3 / 4};
    for (int q = 0; q < 4; q++) {
        int got = nearest_quadrant_colour(px_at(img, qx[q & 1], qy[q >> 1]));
        CHECK(got == expect_corners[o][q], "%s orientation %d corner %d: colour %d, expected %d", what, o, q,
              got, expect_corners[o][q]);
    }
}

static void test_exif_orientation_jpeg(void) {
    buf_t base = quadrant_jpeg();
    REQUIRE(base.n > 0);
    for (int o = 1; o <= 8; o++)
        for (int le = 0; le < 2; le++) {
            uint8_t tiff[32];
            size_t tl = make_tiff_orientation(tiff, o, le);
            buf_t j = splice_app1(&base, tiff, tl);
            CHECK(vlm_image_jpeg_exif_orientation(j.p, j.n) == o);
            vlm_image_u8_t img;
            vlm_error_t err;
            vlm_image_decode_opts_t opt = opts_drop(true);
            REQUIRE(vlm_image_decode(j.p, j.n, &opt, &img, &err) == 0, "%s", err.msg);
            check_corners(&img, o, le ? "JPEG II" : "JPEG MM");
            vlm_image_u8_deinit(&img);
            /* the llamacpp pipeline ignores EXIF, as stb_image does */
            opt.apply_exif_orientation = false;
            REQUIRE(vlm_image_decode(j.p, j.n, &opt, &img, &err) == 0, "%s", err.msg);
            check_corners(&img, 1, "EXIF ignored");
            vlm_image_u8_deinit(&img);
            buf_free(&j);
        }
    /* malformed EXIF is ignored (orientation 1), never read out of bounds */
    static const struct { const char *t; size_t n; } bad[] = {
        {"MM\0*\0\0\0\x08\0\x05\x01\x12\0\x03\0\0\0\x01\0\x06", 20}, /* 5 entries claimed, 1 partial */
        {"MM\0*\xff\xff\xff\xf0", 8},                                 /* IFD offset far out */
        {"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x09\0\0", 22}, /* value 9 */
        {"XX\0*\0\0\0\x08", 8},                                        /* bad byte order */
        {"MM\0+\0\0\0\x08", 8},                                        /* bad magic */
        {"MM", 2},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint8_t *t = malloc(bad[i].n);
        memcpy(t, bad[i].t, bad[i].n);
        buf_t j = splice_app1(&base, t, bad[i].n);
        CHECK(vlm_image_jpeg_exif_orientation(j.p, j.n) == 1, "bad EXIF %zu", i);
        vlm_image_u8_t img;
        CHECK(vlm_image_decode(j.p, j.n, NULL, &img, NULL) == 0);
        check_corners(&img, 1, "bad EXIF");
        vlm_image_u8_deinit(&img);
        buf_free(&j);
        free(t);
    }
    buf_free(&base);
}

/* ==== CMYK JPEG ========================================================== */

/* Reference for PIL's convert("RGB") of a CMYK JPEG: stored values are
 * Adobe-inverted (ink = 255 - stored), then R = (255-K) - ink_C*(255-K)/255
 * rounded to nearest. */
static void cmyk_expect(const uint8_t *stored, uint8_t *rgb) {
    int nk = stored[3];
    for (int c = 0; c < 3; c++) {
        int ink = 255 - stored[c];
        rgb[c] = (uint8_t)(nk - (ink * nk + 127) / 255);
    }
}

static void test_cmyk_jpeg(void) {
    /* 5 colour patches, 16 x 16 each, stored (Adobe) CMYK values */
    static const uint8_t patch[5][4] = {
        {255, 255, 255, 255}, /* no ink: white */
        {0, 255, 255, 255},   /* full cyan: (0, 255, 255) */
        {255, 255, 255, 0},   /* full black */
        {255, 0, 255, 127},   /* magenta at half K: (127, 0, 127) */
        {200, 100, 50, 180},  /* mixed: (141, 71, 35) */
    };
    static const uint8_t hand[5][3] = {{255, 255, 255}, {0, 255, 255}, {0, 0, 0}, {127, 0, 127}, {141, 71, 35}};
    const int W = 80, H = 16;
    uint8_t *px = malloc((size_t)W * H * 4);
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) memcpy(px + 4 * ((size_t)y * W + x), patch[x / 16], 4);
    buf_t j = write_jpeg(px, W, H, TJPF_CMYK, TJSAMP_444, 100, 0);
    REQUIRE(j.n > 0, "TurboJPEG cannot write CMYK");
    vlm_image_u8_t img;
    vlm_error_t err;
    REQUIRE(vlm_image_decode(j.p, j.n, NULL, &img, &err) == 0, "%s", err.msg);
    REQUIRE(img.w == W && img.h == H);
    for (int k = 0; k < 5; k++) {
        uint8_t e[3];
        cmyk_expect(patch[k], e);
        CHECK(memcmp(e, hand[k], 3) == 0, "formula vs hand values, patch %d", k);
        const uint8_t *p = px_at(&img, 16 * k + 8, 8);
        for (int c = 0; c < 3; c++)
            CHECK(abs((int)p[c] - hand[k][c]) <= 3, "patch %d channel %d: %d, expected %d", k, c, p[c], hand[k][c]);
    }
    /* exactness: apply the reference to libjpeg's own CMYK output */
    tjhandle tj = tjInitDecompress();
    uint8_t *cmyk = malloc((size_t)W * H * 4);
    REQUIRE(tjDecompress2(tj, j.p, j.n, cmyk, W, 0, H, TJPF_CMYK, 0) == 0);
    size_t bad = 0;
    for (size_t i = 0; i < (size_t)W * H; i++) {
        uint8_t e[3];
        cmyk_expect(cmyk + 4 * i, e);
        bad += memcmp(e, img.rgb + 3 * i, 3) != 0;
    }
    CHECK(bad == 0, "%zu pixels differ from PIL's CMYK conversion", bad);
    tjDestroy(tj);
    free(cmyk);
    vlm_image_u8_deinit(&img);
    buf_free(&j);
    free(px);
}

/* ==== PNG variants ======================================================= */

static int decode_png_spec(const png_spec_t *s, const vlm_image_decode_opts_t *o, vlm_image_u8_t *img) {
    buf_t b = write_png(s);
    if (!b.n) return -999;
    vlm_error_t err;
    int rc = vlm_image_decode(b.p, b.n, o, img, &err);
    if (rc) fprintf(stderr, "  decode: %s\n", err.msg);
    buf_free(&b);
    return rc;
}

static uint8_t over(uint8_t c, uint8_t a, uint8_t bg) { return (uint8_t)((c * a + bg * (255 - a) + 127) / 255); }

static void test_png_variants(void) {
    const int W = 37, H = 29;
    rng_state = 4242;
    vlm_image_u8_t img;
    vlm_image_decode_opts_t drop = opts_drop(false);
    vlm_image_decode_opts_t white = drop, colour = drop;
    white.alpha = VLM_ALPHA_OVER_WHITE;
    colour.alpha = VLM_ALPHA_OVER_COLOR;
    colour.alpha_color[0] = 122, colour.alpha_color[1] = 116, colour.alpha_color[2] = 104;

    /* 16-bit RGB, interlaced and not: high byte kept */
    uint8_t *rgb16 = malloc((size_t)W * H * 6);
    for (size_t i = 0; i < (size_t)W * H * 6; i++) rgb16[i] = (uint8_t)rng();
    for (int il = 0; il < 2; il++) {
        png_spec_t s = {.w = W, .h = H, .depth = 16, .ctype = PNG_COLOR_TYPE_RGB, .interlace = il, .rows = rgb16};
        REQUIRE(decode_png_spec(&s, &drop, &img) == 0);
        size_t bad = 0;
        for (size_t i = 0; i < (size_t)W * H * 3; i++) bad += img.rgb[i] != rgb16[2 * i];
        CHECK(img.w == W && img.h == H && bad == 0 && !img.had_alpha, "16-bit RGB il=%d: %zu bad", il, bad);
        vlm_image_u8_deinit(&img);
    }
    /* 16-bit gray: high byte, replicated */
    {
        png_spec_t s = {.w = W, .h = H, .depth = 16, .ctype = PNG_COLOR_TYPE_GRAY, .rows = rgb16};
        REQUIRE(decode_png_spec(&s, &drop, &img) == 0);
        size_t bad = 0;
        for (size_t i = 0; i < (size_t)W * H; i++)
            for (int c = 0; c < 3; c++) bad += img.rgb[3 * i + c] != rgb16[2 * i];
        CHECK(bad == 0, "16-bit gray: %zu bad", bad);
        vlm_image_u8_deinit(&img);
    }
    /* 8-bit RGB, Adam7 interlaced: exact */
    uint8_t *rgb8 = malloc((size_t)W * H * 3);
    for (size_t i = 0; i < (size_t)W * H * 3; i++) rgb8[i] = (uint8_t)rng();
    {
        png_spec_t s = {.w = W, .h = H, .depth = 8, .ctype = PNG_COLOR_TYPE_RGB, .interlace = true, .rows = rgb8};
        REQUIRE(decode_png_spec(&s, &drop, &img) == 0);
        CHECK(memcmp(img.rgb, rgb8, (size_t)W * H * 3) == 0, "interlaced RGB8");
        vlm_image_u8_deinit(&img);
    }
    /* 4-bit palette with tRNS: drop gives the palette colours; over white composites */
    static const png_color pal[5] = {{10, 20, 30}, {200, 100, 0}, {0, 255, 0}, {255, 255, 255}, {1, 2, 3}};
    static const uint8_t pal_a[5] = {255, 0, 128, 7, 255};
    const size_t rb4 = (W + 1) / 2;
    uint8_t *idx = calloc(rb4 * H, 1);
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) idx[y * rb4 + x / 2] |= (uint8_t)(((x + 2 * y) % 5) << (x % 2 ? 0 : 4));
    for (int il = 0; il < 2; il++) {
        png_spec_t s = {.w = W, .h = H, .depth = 4, .ctype = PNG_COLOR_TYPE_PALETTE, .interlace = il, .rows = idx,
                        .palette = pal, .n_palette = 5, .trns_alpha = pal_a, .n_trns = 5};
        REQUIRE(decode_png_spec(&s, &drop, &img) == 0);
        CHECK(img.had_alpha);
        size_t bad = 0;
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) {
                const png_color *e = &pal[(x + 2 * y) % 5];
                const uint8_t *p = px_at(&img, x, y);
                bad += p[0] != e->red || p[1] != e->green || p[2] != e->blue;
            }
        CHECK(bad == 0, "palette drop il=%d: %zu bad", il, bad);
        vlm_image_u8_deinit(&img);
        REQUIRE(decode_png_spec(&s, &white, &img) == 0);
        bad = 0;
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) {
                int k = (x + 2 * y) % 5;
                const uint8_t *p = px_at(&img, x, y);
                bad += p[0] != over(pal[k].red, pal_a[k], 255) || p[1] != over(pal[k].green, pal_a[k], 255) ||
                       p[2] != over(pal[k].blue, pal_a[k], 255);
            }
        CHECK(bad == 0, "palette over white il=%d: %zu bad", il, bad);
        vlm_image_u8_deinit(&img);
    }
    /* 1-bit gray: 0 -> 0, 1 -> 255 */
    {
        const size_t rb1 = (W + 7) / 8;
        uint8_t *bits = calloc(rb1 * H, 1);
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++)
                if ((x * y + x) % 3 == 0) bits[y * rb1 + x / 8] |= (uint8_t)(0x80 >> (x % 8));
        png_spec_t s = {.w = W, .h = H, .depth = 1, .ctype = PNG_COLOR_TYPE_GRAY, .rows = bits};
        REQUIRE(decode_png_spec(&s, &drop, &img) == 0);
        size_t bad = 0;
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) {
                uint8_t e = (x * y + x) % 3 == 0 ? 255 : 0;
                const uint8_t *p = px_at(&img, x, y);
                bad += p[0] != e || p[1] != e || p[2] != e;
            }
        CHECK(bad == 0, "1-bit gray: %zu bad", bad);
        vlm_image_u8_deinit(&img);
        free(bits);
    }
    /* gray + alpha 8-bit: drop, and over the mean colour */
    {
        uint8_t *ga = malloc((size_t)W * H * 2);
        for (size_t i = 0; i < (size_t)W * H * 2; i++) ga[i] = (uint8_t)rng();
        png_spec_t s = {.w = W, .h = H, .depth = 8, .ctype = PNG_COLOR_TYPE_GRAY_ALPHA, .rows = ga};
        REQUIRE(decode_png_spec(&s, &drop, &img) == 0);
        size_t bad = 0;
        for (size_t i = 0; i < (size_t)W * H; i++)
            for (int c = 0; c < 3; c++) bad += img.rgb[3 * i + c] != ga[2 * i];
        CHECK(bad == 0 && img.had_alpha, "gray+alpha drop: %zu bad", bad);
        vlm_image_u8_deinit(&img);
        REQUIRE(decode_png_spec(&s, &colour, &img) == 0);
        bad = 0;
        for (size_t i = 0; i < (size_t)W * H; i++)
            for (int c = 0; c < 3; c++) bad += img.rgb[3 * i + c] != over(ga[2 * i], ga[2 * i + 1], colour.alpha_color[c]);
        CHECK(bad == 0, "gray+alpha over colour: %zu bad", bad);
        vlm_image_u8_deinit(&img);
        free(ga);
    }
    /* RGBA 16-bit over white (high bytes, then composite) */
    {
        uint8_t *rgba16 = malloc((size_t)W * H * 8);
        for (size_t i = 0; i < (size_t)W * H * 8; i++) rgba16[i] = (uint8_t)rng();
        png_spec_t s = {.w = W, .h = H, .depth = 16, .ctype = PNG_COLOR_TYPE_RGBA, .interlace = true, .rows = rgba16};
        REQUIRE(decode_png_spec(&s, &white, &img) == 0);
        size_t bad = 0;
        for (size_t i = 0; i < (size_t)W * H; i++)
            for (int c = 0; c < 3; c++) bad += img.rgb[3 * i + c] != over(rgba16[8 * i + 2 * c], rgba16[8 * i + 6], 255);
        CHECK(bad == 0, "RGBA16 over white: %zu bad", bad);
        vlm_image_u8_deinit(&img);
        REQUIRE(decode_png_spec(&s, &drop, &img) == 0);
        bad = 0;
        for (size_t i = 0; i < (size_t)W * H; i++)
            for (int c = 0; c < 3; c++) bad += img.rgb[3 * i + c] != rgba16[8 * i + 2 * c];
        CHECK(bad == 0, "RGBA16 drop: %zu bad", bad);
        vlm_image_u8_deinit(&img);
        free(rgba16);
    }
    /* RGB with a tRNS colour key: drop leaves it, over colour replaces the key pixels */
    {
        for (int x = 0; x < W; x += 3) memcpy(rgb8 + 3 * (5 * W + x), "\x11\x22\x33", 3);
        png_color_16 key = {.red = 0x11, .green = 0x22, .blue = 0x33};
        png_spec_t s = {.w = W, .h = H, .depth = 8, .ctype = PNG_COLOR_TYPE_RGB, .rows = rgb8, .trns_color = &key};
        REQUIRE(decode_png_spec(&s, &drop, &img) == 0);
        CHECK(img.had_alpha && memcmp(img.rgb, rgb8, (size_t)W * H * 3) == 0, "tRNS key drop");
        vlm_image_u8_deinit(&img);
        REQUIRE(decode_png_spec(&s, &colour, &img) == 0);
        size_t bad = 0;
        for (size_t i = 0; i < (size_t)W * H; i++) {
            bool is_key = memcmp(rgb8 + 3 * i, "\x11\x22\x33", 3) == 0;
            bad += memcmp(img.rgb + 3 * i, is_key ? colour.alpha_color : rgb8 + 3 * i, 3) != 0;
        }
        CHECK(bad == 0, "tRNS key over colour: %zu bad", bad);
        vlm_image_u8_deinit(&img);
    }
    /* eXIf orientation 6 in a PNG */
    {
        static const uint8_t col[4][3] = {{255, 0, 0}, {0, 255, 0}, {0, 0, 255}, {255, 255, 255}};
        uint8_t q[16][32][3];
        for (int y = 0; y < 16; y++)
            for (int x = 0; x < 32; x++) memcpy(q[y][x], col[(y >= 8) * 2 + (x >= 16)], 3);
        uint8_t tiff[32];
        size_t tl = make_tiff_orientation(tiff, 6, false);
        png_spec_t s = {.w = 32, .h = 16, .depth = 8, .ctype = PNG_COLOR_TYPE_RGB, .rows = &q[0][0][0],
                        .exif = tiff, .exif_len = (uint32_t)tl};
        vlm_image_decode_opts_t ex = opts_drop(true);
        REQUIRE(decode_png_spec(&s, &ex, &img) == 0);
        check_corners(&img, 6, "PNG eXIf");
        vlm_image_u8_deinit(&img);
        REQUIRE(decode_png_spec(&s, &drop, &img) == 0);
        check_corners(&img, 1, "PNG eXIf ignored");
        vlm_image_u8_deinit(&img);
    }
    free(idx);
    free(rgb8);
    free(rgb16);
}

/* ==== PGM / PPM ========================================================== */

static void test_pnm(void) {
    vlm_image_u8_t img;
    vlm_error_t err;
    /* P6 8-bit with comments, as ffmpeg's ppm encoder writes it plus comments */
    const char p6[] = "P6\n# made by a test\n3 2 # width height\n255\n"
                      "\x01\x02\x03\x04\x05\x06\x07\x08\x09"
                      "\xff\xfe\xfd\x00\x00\x00\x80\x81\x82";
    REQUIRE(vlm_image_decode(p6, sizeof p6 - 1, NULL, &img, &err) == 0, "%s", err.msg);
    CHECK(img.w == 3 && img.h == 2 && memcmp(img.rgb, p6 + sizeof p6 - 1 - 18, 18) == 0);
    CHECK(vlm_image_detect(p6, sizeof p6 - 1) == VLM_IMAGE_FORMAT_PNM);
    vlm_image_u8_deinit(&img);
    /* trailing bytes (the next frame of an image2pipe stream) are ignored */
    char p6b[sizeof p6 + 4];
    memcpy(p6b, p6, sizeof p6 - 1);
    memcpy(p6b + sizeof p6 - 1, "P6\n1", 4);
    CHECK(vlm_image_decode(p6b, sizeof p6b - 1, NULL, &img, &err) == 0, "%s", err.msg);
    vlm_image_u8_deinit(&img);

    /* P5 gray -> R = G = B */
    const char p5[] = "P5 2 2 255\n\x00\x10\x80\xff";
    REQUIRE(vlm_image_decode(p5, sizeof p5 - 1, NULL, &img, &err) == 0, "%s", err.msg);
    static const uint8_t g[4] = {0x00, 0x10, 0x80, 0xff};
    for (int i = 0; i < 4; i++)
        CHECK(img.rgb[3 * i] == g[i] && img.rgb[3 * i + 1] == g[i] && img.rgb[3 * i + 2] == g[i]);
    vlm_image_u8_deinit(&img);

    /* 16-bit big-endian, maxval 65535: v * 255 / 65535 rounded */
    const char p6_16[] = "P6\n2 1\n65535\n\x00\x00\xff\xff\x80\x00\x01\x00\x7f\xff\x12\x34";
    REQUIRE(vlm_image_decode(p6_16, sizeof p6_16 - 1, NULL, &img, &err) == 0, "%s", err.msg);
    static const uint16_t v16[6] = {0x0000, 0xffff, 0x8000, 0x0100, 0x7fff, 0x1234};
    for (int i = 0; i < 6; i++) {
        uint8_t e = (uint8_t)(((uint32_t)v16[i] * 255 + 32767) / 65535);
        CHECK(img.rgb[i] == e, "16-bit sample %d: %d, expected %d", i, img.rgb[i], e);
    }
    CHECK(img.rgb[0] == 0 && img.rgb[1] == 255 && img.rgb[2] == 128);
    vlm_image_u8_deinit(&img);
    /* maxval 1000 (two bytes) and maxval 15 (one byte): scaled with rounding */
    const char p5_1000[] = "P5 3 1 1000\n\x00\x00\x01\xf4\x03\xe8";
    REQUIRE(vlm_image_decode(p5_1000, sizeof p5_1000 - 1, NULL, &img, &err) == 0, "%s", err.msg);
    CHECK(img.rgb[0] == 0 && img.rgb[3] == 128 && img.rgb[6] == 255, "%d %d %d", img.rgb[0], img.rgb[3], img.rgb[6]);
    vlm_image_u8_deinit(&img);
    const char p5_15[] = "P5 3 1 15\n\x00\x07\x0f";
    REQUIRE(vlm_image_decode(p5_15, sizeof p5_15 - 1, NULL, &img, &err) == 0, "%s", err.msg);
    CHECK(img.rgb[0] == 0 && img.rgb[3] == 119 && img.rgb[6] == 255, "%d %d %d", img.rgb[0], img.rgb[3], img.rgb[6]);
    vlm_image_u8_deinit(&img);

    /* errors */
    static const struct { const char *d; size_t n; const char *why; } bad[] = {
        {"P6\n2 2\n0\n\0\0\0\0\0\0\0\0\0\0\0\0", 21, "maxval"},
        {"P6\n1 1\n70000\n\0\0\0\0\0\0", 19, "maxval"},
        {"P6\n2 2\n255\n\0\0\0", 14, "truncated"},
        {"P6\n2 2\n255", 10, "header"},
        {"P6\n2 2", 6, "header"},
        {"P6\n2 x 255\n\0", 12, "header"},
        {"P6\n0 2\n255\n", 11, "empty"},
        {"P5 2 1 100\n\x10\x65", 13, "exceeds maxval"},
        {"P6\n1234567890 1 255\n", 20, "header"},
        {"P6\n2 2 255#c\n\0\0\0\0\0\0\0\0\0\0\0\0", 25, "header"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = vlm_image_decode(bad[i].d, bad[i].n, NULL, &img, &err);
        CHECK(rc == VLM_ERR_IMAGE && strstr(err.msg, bad[i].why), "case %zu: rc %d %s", i, rc, err.msg);
        CHECK(img.rgb == NULL);
    }
}

int main(void) {
    RUN(test_golden_decode);
    RUN(test_truncated);
    RUN(test_bitflips);
    RUN(test_mislabelled_and_random);
    RUN(test_empty_and_args);
    RUN(test_huge_headers);
    RUN(test_jpeg_warnings_and_scans);
    RUN(test_jpeg_unusual_sampling);
    RUN(test_exif_orientation_jpeg);
    RUN(test_cmyk_jpeg);
    RUN(test_png_variants);
    RUN(test_pnm);
    return harness_report();
}
