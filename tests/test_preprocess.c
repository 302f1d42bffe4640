/* tests/test_preprocess.c - both preprocessing modes against the golden
 * files: llamacpp from .rgb.u8 must give .pre.f32 bit for bit; hf from
 * .rgb_pil.u8 must give .pre_hf.f32 bit for bit (the issue allows one u8
 * level, 1/255/std <= 0.0150; the max diff is printed). Also Pillow's bicubic
 * resize on synthetic images against hashes of Pillow's own output, and the
 * parameter checks. */
#include <jansson.h>
#include <stdint.h>

#include "core/error.h"
#include "tests/harness.h"
#include "vision/image.h"
#include "vision/preprocess.h"

static const char *const cases[] = {"micro-f32", "small-q8_0", "small-q4_0", "small-q4_k_m"};
#define N_CASES (sizeof cases / sizeof cases[0])

/* Golden params of one case: S, mean, std from the mmproj metadata. */
typedef struct golden_case {
    json_t *root;
    int32_t S;
    float mean[3], std[3];
} golden_case_t;

static int load_case(const char *name, golden_case_t *gc) {
    char path[512];
    snprintf(path, sizeof path, "%s/golden/%s/case.json", VLM_TEST_DATA, name);
    json_error_t jerr;
    gc->root = json_load_file(path, 0, &jerr);
    if (!gc->root) return -1;
    json_t *md = json_object_get(json_object_get(gc->root, "hparams"), "mmproj_gguf_metadata");
    gc->S = (int32_t)json_integer_value(json_object_get(md, "clip.vision.image_size"));
    json_t *m = json_object_get(md, "clip.vision.image_mean"), *s = json_object_get(md, "clip.vision.image_std");
    for (int c = 0; c < 3; c++) {
        gc->mean[c] = (float)json_real_value(json_array_get(m, c));
        gc->std[c] = (float)json_real_value(json_array_get(s, c));
    }
    return gc->S > 0 ? 0 : -1;
}

/* Reads <case>/<stem><suffix> and checks its size. */
static void *load_dump(const char *cs, const char *file, const char *suffix, size_t want) {
    char stem[128], path[512];
    snprintf(stem, sizeof stem, "%s", file);
    char *dot = strrchr(stem, '.');
    if (dot) *dot = '\0';
    snprintf(path, sizeof path, "%s/golden/%s/%s%s", VLM_TEST_DATA, cs, stem, suffix);
    size_t n = 0;
    void *buf = harness_read_file(path, &n);
    if (buf && n != want) {
        fprintf(stderr, "  %s: %zu bytes, expected %zu\n", path, n, want);
        free(buf);
        return NULL;
    }
    return buf;
}

/* Runs mode over every golden image: input dump in_suffix, reference
 * ref_suffix; returns the max abs diff over all images (INFINITY on error). */
static double run_golden(vlm_preprocess_mode_t mode, const char *in_suffix, const char *ref_suffix,
                         int *n_images, int *n_exact) {
    double worst = 0;
    *n_images = *n_exact = 0;
    for (size_t ci = 0; ci < N_CASES; ci++) {
        golden_case_t gc;
        if (load_case(cases[ci], &gc) != 0) {
            CHECK(0, "cannot load case %s", cases[ci]);
            return INFINITY;
        }
        vlm_preprocess_params_t p;
        vlm_error_t err;
        CHECK(vlm_preprocess_params_init(&p, mode, gc.S, gc.mean, gc.std, &err) == 0, "%s", err.msg);
        json_t *imgs = json_object_get(gc.root, "images");
        for (size_t i = 0; i < json_array_size(imgs); i++) {
            json_t *im = json_array_get(imgs, i);
            const char *file = json_string_value(json_object_get(im, "file"));
            json_t *shape = json_object_get(im, "decoded_shape_hwc");
            int32_t H = (int32_t)json_integer_value(json_array_get(shape, 0));
            int32_t W = (int32_t)json_integer_value(json_array_get(shape, 1));
            const size_t nref = (size_t)gc.S * gc.S * 3;
            uint8_t *rgb = load_dump(cases[ci], file, in_suffix, (size_t)W * H * 3);
            float *ref = load_dump(cases[ci], file, ref_suffix, nref * sizeof(float));
            CHECK(rgb && ref, "%s/%s: dumps missing", cases[ci], file);
            if (rgb && ref) {
                vlm_image_u8_t in = {.w = W, .h = H, .rgb = rgb};
                vlm_image_f32_t out;
                int rc = vlm_preprocess(&p, &in, &out, &err);
                CHECK(rc == 0, "%s/%s: %s", cases[ci], file, err.msg);
                if (rc == 0) {
                    CHECK(out.w == gc.S && out.h == gc.S);
                    double d = harness_max_abs_diff(out.data, ref, nref);
                    bool exact = memcmp(out.data, ref, nref * sizeof(float)) == 0;
                    fprintf(stderr, "  %-5s %-12s %-18s %4dx%-4d -> %d: max diff %.3g%s\n",
                            vlm_preprocess_mode_name(mode), cases[ci], file, (int)W, (int)H,
                            (int)gc.S, d, exact ? " (bit-exact)" : "");
                    if (d > worst) worst = d;
                    (*n_images)++;
                    *n_exact += exact;
                    vlm_image_f32_deinit(&out);
                }
            }
            free(rgb);
            free(ref);
        }
        json_decref(gc.root);
    }
    return worst;
}

static void test_llamacpp_golden_exact(void) {
    int n, exact;
    double d = run_golden(VLM_PREPROCESS_LLAMACPP, ".rgb.u8", ".pre.f32", &n, &exact);
    fprintf(stderr, "  llamacpp: %d images, %d bit-exact, max diff %g\n", n, exact, d);
    CHECK(n == 20, "expected 5 images x 4 cases, got %d", n);
    CHECK(d == 0.0 && exact == n, "llamacpp mode must be bit-exact");
}

static void test_hf_golden(void) {
    int n, exact;
    double d = run_golden(VLM_PREPROCESS_HF, ".rgb_pil.u8", ".pre_hf.f32", &n, &exact);
    fprintf(stderr, "  hf: %d images, %d bit-exact, max diff %g\n", n, exact, d);
    CHECK(n == 20, "expected 5 images x 4 cases, got %d", n);
    CHECK(d <= 0.0150, "hf mode must be within one u8 level (0.0150), got %g", d);
    CHECK(exact == n, "hf mode is an exact reimplementation of Pillow: expected bit-exact");
}

/* The list API gives the same single image. */
static void test_list_matches_single(void) {
    static uint8_t px[7 * 5 * 3];
    for (size_t i = 0; i < sizeof px; i++) px[i] = (uint8_t)(i * 37 + 11);
    vlm_image_u8_t in = {.w = 7, .h = 5, .rgb = px};
    const float mean[3] = {0.5f, 0.5f, 0.5f}, std[3] = {0.5f, 0.5f, 0.5f};
    for (int m = 0; m < VLM_PREPROCESS_MODE_COUNT; m++) {
        vlm_preprocess_params_t p;
        REQUIRE(vlm_preprocess_params_init(&p, m, 9, mean, std, NULL) == 0);
        vlm_image_f32_t one;
        vlm_image_f32_list_t list;
        REQUIRE(vlm_preprocess(&p, &in, &one, NULL) == 0);
        REQUIRE(vlm_preprocess_list(&p, &in, &list, NULL) == 0);
        CHECK(list.n == 1 && list.images[0].w == 9 && list.images[0].h == 9);
        CHECK(memcmp(one.data, list.images[0].data, 9 * 9 * 3 * sizeof(float)) == 0);
        vlm_image_f32_deinit(&one);
        vlm_image_f32_list_deinit(&list);
        CHECK(list.n == 0 && list.images == NULL);
    }
}

/* Simple known values: a uniform image stays uniform in both modes and
 * normalises to (v/255 - mean)/std; the hf pad colour is (int)(mean*255). */
static void test_uniform_and_pad(void) {
    const float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
    const float std[3] = {0.26862954f, 0.26130258f, 0.27577711f};
    vlm_preprocess_params_t p;
    REQUIRE(vlm_preprocess_params_init(&p, VLM_PREPROCESS_HF, 4, mean, std, NULL) == 0);
    uint8_t pad[3];
    vlm_preprocess_pad_color(&p, pad);
    CHECK(pad[0] == 122 && pad[1] == 116 && pad[2] == 104, "%d %d %d", pad[0], pad[1], pad[2]);
    vlm_image_decode_opts_t o;
    vlm_preprocess_decode_opts(&p, &o);
    CHECK(o.alpha == VLM_ALPHA_OVER_COLOR && o.alpha_color[0] == 122 && o.apply_exif_orientation);
    p.mode = VLM_PREPROCESS_LLAMACPP;
    vlm_preprocess_decode_opts(&p, &o);
    CHECK(o.alpha == VLM_ALPHA_DROP && !o.apply_exif_orientation);

    /* a square uniform image, up- and downscaled, in both modes */
    for (int m = 0; m < 2; m++)
        for (int side = 1; side <= 40; side += 13) {
            uint8_t *px = malloc((size_t)side * side * 3);
            for (int i = 0; i < side * side; i++) px[3 * i] = 200, px[3 * i + 1] = 10, px[3 * i + 2] = 99;
            vlm_image_u8_t in = {.w = side, .h = side, .rgb = px};
            p.mode = m;
            p.image_size = 17;
            vlm_image_f32_t out;
            REQUIRE(vlm_preprocess(&p, &in, &out, NULL) == 0);
            const uint8_t v[3] = {200, 10, 99};
            int bad = 0;
            for (int i = 0; i < 17 * 17 * 3; i++) {
                float want = ((float)v[i % 3] / 255.0f - mean[i % 3]) / std[i % 3];
                bad += out.data[i] != want;
            }
            CHECK(bad == 0, "mode %d side %d: %d values differ", m, side, bad);
            vlm_image_f32_deinit(&out);
            free(px);
        }

    /* hf pads centred, llamacpp at the top-left. A white 9x2 strip (and its
     * 2x9 transpose) with S = 9, so nothing is resized: the padding is 7,
     * odd, so hf puts 3 pad rows above and 4 below (LLaVA's
     * (n - h) // 2), llamacpp 7 below. */
    uint8_t strip[9 * 2 * 3];
    memset(strip, 255, sizeof strip);
    p.image_size = 9;
    const float white[3] = {(1.0f - mean[0]) / std[0], (1.0f - mean[1]) / std[1], (1.0f - mean[2]) / std[2]};
    for (int m = 0; m < 2; m++)
        for (int tr = 0; tr < 2; tr++) {
            vlm_image_u8_t in = {.w = tr ? 2 : 9, .h = tr ? 9 : 2, .rgb = strip};
            p.mode = m;
            vlm_image_f32_t out;
            REQUIRE(vlm_preprocess(&p, &in, &out, NULL) == 0);
            const int first = m == VLM_PREPROCESS_HF ? 3 : 0;
            int bad = 0;
            for (int y = 0; y < 9; y++)
                for (int x = 0; x < 9; x++) {
                    const int along = tr ? x : y; /* the padded axis */
                    const bool img = along >= first && along < first + 2;
                    for (int c = 0; c < 3; c++) {
                        float v = out.data[((size_t)y * 9 + x) * 3 + c];
                        const float pv = m == VLM_PREPROCESS_HF
                            ? ((float)((double)pad[c] * (1.0 / 255.0)) - mean[c]) / std[c]
                            : ((float)pad[c] / 255.0f - mean[c]) / std[c];
                        bad += img ? v != white[c] : v != pv;
                    }
                }
            CHECK(bad == 0, "mode %d transposed %d: %d values misplaced", m, tr, bad);
            vlm_image_f32_deinit(&out);
        }
}

/* FNV-1a over bytes. */
static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

/* Pillow's Image.resize(BICUBIC) on synthetic RGB images against hashes of
 * Pillow 9.4.0's output (Debian 12 python3-pil), computed once with:
 *   px[y][x] = ((x*7 + y*13) ^ (x*y)) & 255, ((x*x + 3*y) * 5) & 255,
 *              (x*31 + y*y*3 + 17) & 255
 *   Image.frombytes("RGB", (w, h), bytes).resize((ow, oh), Image.BICUBIC)
 * and FNV-1a 64 of tobytes(). Covers shrinking, enlarging, mixed axes and a
 * single-axis resize. */
static void test_pil_bicubic_known(void) {
    static const struct { int w, h, ow, oh; uint64_t hash; } cases_[] = {
        {37, 23, 16, 29, 0xd53ec6f50ab99328ull},
        {200, 150, 56, 56, 0x0df705c42d0b5de0ull},
        {77, 77, 112, 112, 0xe70442821ca53acdull},
        {131, 97, 131, 40, 0xff685a697fa9f7f1ull},
        {64, 48, 64, 48, 0x1737be18234a9283ull},
        {5, 3, 61, 17, 0xfb32b73108f249e0ull},
        {333, 41, 17, 9, 0x1692315623c7fa70ull},
        {1920, 64, 336, 12, 0xcf52ef9eb5bb7167ull},
        {29, 301, 300, 29, 0x4ab4a7675b51848eull},
        {1, 1, 7, 7, 0x354ff90318602e2eull},
    };
    for (size_t i = 0; i < sizeof cases_ / sizeof cases_[0]; i++) {
        const int w = cases_[i].w, h = cases_[i].h;
        uint8_t *px = malloc((size_t)w * h * 3);
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++) {
                uint8_t *d = px + 3 * ((size_t)y * w + x);
                d[0] = (uint8_t)(((x * 7 + y * 13) ^ (x * y)) & 255);
                d[1] = (uint8_t)(((x * x + 3 * y) * 5) & 255);
                d[2] = (uint8_t)((x * 31 + y * y * 3 + 17) & 255);
            }
        vlm_image_u8_t in = {.w = w, .h = h, .rgb = px}, out;
        vlm_error_t err;
        int rc = vlm_preprocess_resize_bicubic_pil(&in, cases_[i].ow, cases_[i].oh, &out, &err);
        CHECK(rc == 0, "%s", err.msg);
        if (rc == 0) {
            uint64_t hsh = fnv1a(out.rgb, (size_t)out.w * out.h * 3);
            CHECK(hsh == cases_[i].hash, "%dx%d -> %dx%d: hash %016llx, Pillow %016llx", w, h,
                  cases_[i].ow, cases_[i].oh, (unsigned long long)hsh,
                  (unsigned long long)cases_[i].hash);
        }
        vlm_image_u8_deinit(&out);
        free(px);
    }
}

static void test_param_errors(void) {
    const float mean[3] = {0.5f, 0.5f, 0.5f}, std[3] = {0.25f, 0.25f, 0.25f};
    const float bad_std[3] = {0.25f, 0.0f, 0.25f}, nan_mean[3] = {NAN, 0.5f, 0.5f};
    vlm_preprocess_params_t p;
    vlm_error_t err;
    CHECK(vlm_preprocess_params_init(&p, VLM_PREPROCESS_HF, 0, mean, std, &err) == VLM_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "image size 0") != NULL, "%s", err.msg);
    CHECK(vlm_preprocess_params_init(&p, VLM_PREPROCESS_HF, -3, mean, std, &err) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_preprocess_params_init(&p, VLM_PREPROCESS_HF, 100000, mean, std, &err) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_preprocess_params_init(&p, VLM_PREPROCESS_HF, 16, mean, bad_std, &err) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_preprocess_params_init(&p, VLM_PREPROCESS_HF, 16, nan_mean, std, &err) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_preprocess_params_init(&p, (vlm_preprocess_mode_t)7, 16, mean, std, &err) == VLM_ERR_INVALID_ARG);

    CHECK(vlm_preprocess_mode_from_name("hf") == VLM_PREPROCESS_HF);
    CHECK(vlm_preprocess_mode_from_name("llamacpp") == VLM_PREPROCESS_LLAMACPP);
    CHECK(vlm_preprocess_mode_from_name("HF") == -1);
    CHECK(vlm_preprocess_mode_from_name("") == -1);
    CHECK(vlm_preprocess_mode_from_name(NULL) == -1);
    CHECK(strcmp(vlm_preprocess_mode_name(VLM_PREPROCESS_LLAMACPP), "llamacpp") == 0);

    uint8_t px[3] = {1, 2, 3};
    vlm_image_u8_t one = {.w = 1, .h = 1, .rgb = px};
    vlm_image_u8_t empty = {0}, zero_w = {.w = 0, .h = 5, .rgb = px}, no_px = {.w = 1, .h = 1};
    vlm_image_f32_t out;
    for (int m = 0; m < 2; m++) {
        REQUIRE(vlm_preprocess_params_init(&p, m, 8, mean, std, NULL) == 0);
        CHECK(vlm_preprocess(&p, &empty, &out, &err) == VLM_ERR_INVALID_ARG);
        CHECK(out.data == NULL && out.w == 0);
        CHECK(vlm_preprocess(&p, &zero_w, &out, &err) == VLM_ERR_INVALID_ARG);
        CHECK(vlm_preprocess(&p, &no_px, &out, &err) == VLM_ERR_INVALID_ARG);
        CHECK(vlm_preprocess(&p, NULL, &out, &err) == VLM_ERR_INVALID_ARG);
        CHECK(vlm_preprocess(NULL, &one, &out, &err) == VLM_ERR_INVALID_ARG);
        p.image_size = 0; /* params edited by hand after init are re-checked */
        CHECK(vlm_preprocess(&p, &one, &out, &err) == VLM_ERR_INVALID_ARG);
        p.image_size = 8;
        p.image_std[2] = -1.0f;
        CHECK(vlm_preprocess(&p, &one, &out, &err) == VLM_ERR_INVALID_ARG);
        p.image_std[2] = 0.25f;
        CHECK(vlm_preprocess(&p, &one, &out, &err) == 0, "%s", err.msg); /* 1x1 upscales fine */
        vlm_image_f32_deinit(&out);
        vlm_image_f32_deinit(&out); /* twice is harmless */
    }
    /* hf refuses an absurd aspect ratio rather than allocating gigabytes */
    vlm_image_u8_t tall = {.w = 1, .h = 100000, .rgb = NULL};
    tall.rgb = calloc(100000, 3);
    REQUIRE(vlm_preprocess_params_init(&p, VLM_PREPROCESS_HF, 8, mean, std, NULL) == 0);
    CHECK(vlm_preprocess(&p, &tall, &out, &err) == VLM_ERR_TOO_LARGE, "%s", err.msg);
    p.mode = VLM_PREPROCESS_LLAMACPP; /* bilinear sampling has no such cost */
    CHECK(vlm_preprocess(&p, &tall, &out, &err) == 0, "%s", err.msg);
    vlm_image_f32_deinit(&out);
    free(tall.rgb);
}

int main(void) {
    RUN(test_llamacpp_golden_exact);
    RUN(test_hf_golden);
    RUN(test_list_matches_single);
    RUN(test_uniform_and_pad);
    RUN(test_pil_bicubic_known);
    RUN(test_param_errors);
    return harness_report();
}
