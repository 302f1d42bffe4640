/* tests/test_clip.c - the CLIP encoder and the LLaVA projector against
 * llama.cpp's image embeddings, plus batching and load-time errors.
 *
 * Golden check: for every case under tests/data/golden and every image of
 * its case.json, the preprocessed image (<image>.pre.f32, exactly what
 * llama.cpp fed its encoder) goes through vlm_clip_encode and
 * vlm_projector_apply, and the result is compared with llama.cpp's
 * <image>.emb.f32 as max|diff| / max|ref|: at most 2e-3 for an F32 mmproj
 * and 5e-3 for an F16 one (shared/golden/README.md; an independent f32
 * implementation measured 4e-4 and 5.5e-4).
 *
 * The golden check runs twice: on the SIMD kernels, then in a child
 * process with VLM_ISA=scalar on the portable ones.
 *
 * Error checks rebuild the micro-f32 mmproj in memory with one thing
 * changed (core/gguf_write.h) and require the right code and a message
 * naming the key, value or tensor.
 */
#include <dirent.h>
#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/dtype.h"
#include "core/error.h"
#include "core/gguf.h"
#include "core/gguf_write.h"
#include "core/pool.h"
#include "core/quant.h"
#include "projector/projector.h"
#include "tests/harness.h"
#include "vision/clip.h"
#include "vision/encoder.h"

#define MAX_IMAGES 8

/* One golden case: the mmproj, the text width and the images. */
typedef struct golden_case {
    char name[64];
    char dir[512];
    int32_t n_embd_text;
    int n_images;
    char pre[MAX_IMAGES][128];   /* file names */
    char emb[MAX_IMAGES][128];
    int emb_rows[MAX_IMAGES], emb_cols[MAX_IMAGES];
} golden_case_t;

static vlm_pool_t *g_pool;

static int load_case(const char *name, golden_case_t *gc) {
    memset(gc, 0, sizeof *gc);
    snprintf(gc->name, sizeof gc->name, "%s", name);
    snprintf(gc->dir, sizeof gc->dir, "%s/golden/%s", VLM_TEST_DATA, name);
    char path[700];
    snprintf(path, sizeof path, "%s/case.json", gc->dir);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root) return -1;
    json_t *imgs = json_object_get(root, "images");
    for (size_t i = 0; i < json_array_size(imgs) && gc->n_images < MAX_IMAGES; i++) {
        json_t *im = json_array_get(imgs, i);
        const char *pre = json_string_value(json_object_get(im, "preprocessed_f32"));
        const char *emb = json_string_value(json_object_get(im, "embeddings_f32"));
        json_t *shape = json_object_get(im, "embeddings_shape");
        if (!pre || !emb || json_array_size(shape) != 2) continue;
        int k = gc->n_images++;
        snprintf(gc->pre[k], sizeof gc->pre[k], "%s", pre);
        snprintf(gc->emb[k], sizeof gc->emb[k], "%s", emb);
        gc->emb_rows[k] = (int)json_integer_value(json_array_get(shape, 0));
        gc->emb_cols[k] = (int)json_integer_value(json_array_get(shape, 1));
    }
    json_decref(root);

    snprintf(path, sizeof path, "%s/text.gguf", gc->dir);
    vlm_gguf_t *tg = NULL;
    vlm_error_t err;
    if (vlm_gguf_open(path, &tg, &err)) return -1;
    uint32_t n_embd = 0;
    int rc = vlm_gguf_get_u32(tg, "llama.embedding_length", &n_embd, &err);
    vlm_gguf_destroy(&tg);
    gc->n_embd_text = (int32_t)n_embd;
    return rc ? -1 : 0;
}

/* Lists the case folders (those with an mmproj.gguf), sorted. */
static int list_cases(char names[][64], int max) {
    char path[600];
    snprintf(path, sizeof path, "%s/golden", VLM_TEST_DATA);
    DIR *d = opendir(path);
    if (!d) return 0;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) && n < max) {
        if (de->d_name[0] == '.') continue;
        char p[900];
        snprintf(p, sizeof p, "%s/%s/mmproj.gguf", path, de->d_name);
        FILE *f = fopen(p, "rb");
        if (!f) continue;
        fclose(f);
        snprintf(names[n++], 64, "%.63s", de->d_name);
    }
    closedir(d);
    qsort(names, (size_t)n, 64, (int (*)(const void *, const void *))strcmp);
    return n;
}

static double rel_diff(const float *a, const float *ref, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fabs((double)ref[i]) > m ? fabs((double)ref[i]) : m;
    return harness_max_abs_diff(a, ref, n) / (m > 0 ? m : 1);
}

/* ==== golden embeddings ================================================ */

static void test_golden_embeddings(void) {
    char names[16][64];
    int n_cases = list_cases(names, 16);
    REQUIRE(n_cases > 0, "no golden cases under %s/golden", VLM_TEST_DATA);
    for (int ci = 0; ci < n_cases; ci++) {
        golden_case_t gc;
        REQUIRE(load_case(names[ci], &gc) == 0, "%s: cannot read case.json / text.gguf", names[ci]);
        char path[700];
        snprintf(path, sizeof path, "%s/mmproj.gguf", gc.dir);
        vlm_gguf_t *g = NULL;
        vlm_error_t err;
        REQUIRE(vlm_gguf_open(path, &g, &err) == 0, "%s", err.msg);
        vlm_clip_t *clip = NULL;
        REQUIRE(vlm_clip_load(g, NULL, &clip, &err) == 0, "%s", err.msg);
        const vlm_clip_hparams_t *hp = vlm_clip_hparams(clip);
        vlm_projector_t *proj = NULL;
        REQUIRE(vlm_projector_load(g, hp->n_embd_out, gc.n_embd_text, &proj, &err) == 0, "%s", err.msg);
        CHECK(hp->n_layer_run == hp->n_layer - 1, "llama.cpp runs block_count - 1 layers");
        const double limit = hp->patch_f16 ? 5e-3 : 2e-3;

        const size_t S = (size_t)hp->image_size;
        float *feat = malloc((size_t)hp->n_patches * hp->n_embd_out * sizeof(float));
        float *emb = malloc((size_t)hp->n_patches * gc.n_embd_text * sizeof(float));
        REQUIRE(feat && emb);
        double worst = 0;
        for (int i = 0; i < gc.n_images; i++) {
            char p1[900], p2[900];
            snprintf(p1, sizeof p1, "%s/%s", gc.dir, gc.pre[i]);
            snprintf(p2, sizeof p2, "%s/%s", gc.dir, gc.emb[i]);
            size_t n_pre = 0, n_emb = 0;
            float *pre = harness_read_file(p1, &n_pre);
            float *ref = harness_read_file(p2, &n_emb);
            CHECK(pre && n_pre == S * S * 3 * sizeof(float), "%s", p1);
            CHECK(ref && gc.emb_rows[i] == hp->n_patches && gc.emb_cols[i] == gc.n_embd_text &&
                      n_emb == (size_t)hp->n_patches * gc.n_embd_text * sizeof(float), "%s", p2);
            if (pre && ref && n_pre == S * S * 3 * sizeof(float) &&
                n_emb == (size_t)hp->n_patches * gc.n_embd_text * sizeof(float)) {
                CHECK(vlm_clip_encode(clip, g_pool, pre, 1, feat, &err) == 0, "%s", err.msg);
                CHECK(vlm_projector_apply(proj, g_pool, feat, hp->n_patches, emb, &err) == 0, "%s", err.msg);
                double d = rel_diff(emb, ref, (size_t)hp->n_patches * gc.n_embd_text);
                printf("  %-14s %-22s max|diff|/max|ref| = %.3e (limit %.0e, %s kernels)\n", gc.name, gc.emb[i],
                       d, limit, vlm_isa_name(vlm_isa_best()));
                CHECK(d <= limit, "%s/%s: %.3e > %.0e", gc.name, gc.emb[i], d, limit);
                worst = d > worst ? d : worst;
            }
            free(pre);
            free(ref);
        }
        printf("  %-14s worst %.3e over %d images (extra bytes: clip %zu, projector %zu)\n", gc.name, worst,
               gc.n_images, vlm_clip_extra_bytes(clip), vlm_projector_extra_bytes(proj));
        free(feat);
        free(emb);
        vlm_projector_destroy(&proj);
        vlm_clip_destroy(&clip);
        CHECK(clip == NULL && proj == NULL);
        vlm_gguf_destroy(&g);
    }
}

/* ==== batching ========================================================= */

/* Reads all preprocessed images of a case into one [n][S][S][3] buffer. */
static float *read_all_images(const golden_case_t *gc, size_t S, int *n_out) {
    float *all = malloc((size_t)gc->n_images * S * S * 3 * sizeof(float));
    if (!all) return NULL;
    for (int i = 0; i < gc->n_images; i++) {
        char p[900];
        snprintf(p, sizeof p, "%s/%s", gc->dir, gc->pre[i]);
        size_t n = 0;
        float *img = harness_read_file(p, &n);
        if (!img || n != S * S * 3 * sizeof(float)) {
            free(img);
            free(all);
            return NULL;
        }
        memcpy(all + (size_t)i * S * S * 3, img, n);
        free(img);
    }
    *n_out = gc->n_images;
    return all;
}

/* Batched and one-by-one encodes agree to rounding noise, not bit for bit:
 * OpenBLAS's result for a row depends on the matrix's other dimensions
 * (edge kernels, K blocking), and ggml's fp16 activation tables turn a
 * 1-ulp difference into a 1-f16-ulp jump now and then, so these random
 * models show about 1e-4. The limit is half the golden one. */
#define BATCH_TOL 1e-3

static void test_batch_equals_one_by_one(void) {
    static const char *cases[] = {"micro-f32", "small-q8_0"};
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        golden_case_t gc;
        if (load_case(cases[ci], &gc) != 0) SKIP("%s missing", cases[ci]);
        char path[700];
        snprintf(path, sizeof path, "%s/mmproj.gguf", gc.dir);
        vlm_gguf_t *g = NULL;
        vlm_error_t err;
        REQUIRE(vlm_gguf_open(path, &g, &err) == 0, "%s", err.msg);
        vlm_clip_opts_t opts = vlm_clip_opts_default();
        vlm_clip_t *clip = NULL, *clip2 = NULL;
        REQUIRE(vlm_clip_load(g, &opts, &clip, &err) == 0, "%s", err.msg);
        opts.max_batch = 2; /* 5 images -> passes of 2, 2, 1 */
        REQUIRE(vlm_clip_load(g, &opts, &clip2, &err) == 0, "%s", err.msg);
        const vlm_clip_hparams_t *hp = vlm_clip_hparams(clip);
        const size_t S = (size_t)hp->image_size, per = (size_t)hp->n_patches * hp->n_embd_out;
        int n = 0;
        float *imgs = read_all_images(&gc, S, &n);
        REQUIRE(imgs && n >= 3);
        float *one = malloc((size_t)n * per * sizeof(float));
        float *all = malloc((size_t)n * per * sizeof(float));
        float *all2 = malloc((size_t)n * per * sizeof(float));
        float *via = malloc((size_t)n * per * sizeof(float));
        REQUIRE(one && all && all2 && via);
        for (int i = 0; i < n; i++)
            CHECK(vlm_clip_encode(clip, g_pool, imgs + (size_t)i * S * S * 3, 1, one + (size_t)i * per, &err) == 0);
        CHECK(vlm_clip_encode(clip, g_pool, imgs, n, all, &err) == 0, "%s", err.msg);
        CHECK(vlm_clip_encode(clip2, NULL, imgs, n, all2, &err) == 0, "%s", err.msg);
        double d1 = rel_diff(all, one, (size_t)n * per), d2 = rel_diff(all2, one, (size_t)n * per);
        printf("  %s: batch of %d vs one by one: %.3e; max_batch 2, no pool: %.3e\n", gc.name, n, d1, d2);
        CHECK(d1 <= BATCH_TOL && d2 <= BATCH_TOL);

        /* The same through the family-independent interface. */
        vlm_encoder_t enc = vlm_clip_encoder(clip);
        CHECK(vlm_encoder_arch(enc) == VLM_VISION_ARCH_CLIP);
        CHECK(vlm_encoder_n_embd_out(enc) == hp->n_embd_out);
        int32_t rows = 0;
        CHECK(vlm_encoder_n_rows(enc, hp->image_size, hp->image_size, &rows, &err) == 0 && rows == hp->n_patches);
        CHECK(vlm_encoder_n_rows(enc, hp->image_size + 1, hp->image_size, &rows, &err) == VLM_ERR_SHAPE);
        CHECK(strstr(err.msg, "takes") != NULL, "%s", err.msg);
        vlm_vision_input_t in[MAX_IMAGES];
        for (int i = 0; i < n; i++)
            in[i] = (vlm_vision_input_t){imgs + (size_t)i * S * S * 3, hp->image_size, hp->image_size};
        CHECK(vlm_encoder_encode(enc, g_pool, in, n, via, &err) == 0, "%s", err.msg);
        CHECK(rel_diff(via, one, (size_t)n * per) <= BATCH_TOL);
        in[1].width = 7;
        CHECK(vlm_encoder_encode(enc, g_pool, in, n, via, &err) == VLM_ERR_SHAPE);

        /* Argument checks. */
        CHECK(vlm_clip_encode(clip, g_pool, NULL, 1, all, &err) == VLM_ERR_INVALID_ARG);
        CHECK(vlm_clip_encode(clip, g_pool, imgs, 0, all, &err) == VLM_OK);

        free(one);
        free(all);
        free(all2);
        free(via);
        free(imgs);
        vlm_clip_destroy(&clip);
        vlm_clip_destroy(&clip2);
        vlm_gguf_destroy(&g);
    }
}

/* ==== rebuilding an mmproj with one change ============================= */

typedef struct edit {
    const char *drop_tensor;     /* leave this tensor out */
    const char *retype_tensor;   /* store this tensor as BF16 zeros */
    const char *transpose_tensor;/* swap ne[0] and ne[1] of this 2-D tensor */
    const char *add_tensor;      /* add an F32 [4] zero tensor with this name */
    const char *str_key, *str_val;   /* set a string pair */
    const char *u32_key;             /* set a UINT32 pair */
    uint32_t u32_val;
    const char *i32_arr_key;         /* set an INT32 array pair */
    const int32_t *i32_arr;
    int n_i32_arr;
    const char *drop_key;            /* leave this pair out */
    const char *const *first;        /* NULL-terminated: add these tensors first, in this order */
} edit_t;

static int copy_kv(vlm_gguf_writer_t *w, const vlm_gguf_kv_t *kv) {
    switch (kv->type) {
    case VLM_GGUF_TYPE_UINT8: { uint8_t v = (uint8_t)kv->v.u64; return vlm_gguf_writer_set_val(w, kv->key, kv->type, &v); }
    case VLM_GGUF_TYPE_INT8: { int8_t v = (int8_t)kv->v.i64; return vlm_gguf_writer_set_val(w, kv->key, kv->type, &v); }
    case VLM_GGUF_TYPE_UINT16: { uint16_t v = (uint16_t)kv->v.u64; return vlm_gguf_writer_set_val(w, kv->key, kv->type, &v); }
    case VLM_GGUF_TYPE_INT16: { int16_t v = (int16_t)kv->v.i64; return vlm_gguf_writer_set_val(w, kv->key, kv->type, &v); }
    case VLM_GGUF_TYPE_UINT32: { uint32_t v = (uint32_t)kv->v.u64; return vlm_gguf_writer_set_val(w, kv->key, kv->type, &v); }
    case VLM_GGUF_TYPE_INT32: { int32_t v = (int32_t)kv->v.i64; return vlm_gguf_writer_set_val(w, kv->key, kv->type, &v); }
    case VLM_GGUF_TYPE_UINT64: { uint64_t v = kv->v.u64; return vlm_gguf_writer_set_val(w, kv->key, kv->type, &v); }
    case VLM_GGUF_TYPE_INT64: { int64_t v = kv->v.i64; return vlm_gguf_writer_set_val(w, kv->key, kv->type, &v); }
    case VLM_GGUF_TYPE_FLOAT32: { float v = (float)kv->v.f64; return vlm_gguf_writer_set_val(w, kv->key, kv->type, &v); }
    case VLM_GGUF_TYPE_FLOAT64: { double v = kv->v.f64; return vlm_gguf_writer_set_val(w, kv->key, kv->type, &v); }
    case VLM_GGUF_TYPE_BOOL: { bool v = kv->v.u64 != 0; return vlm_gguf_writer_set_val(w, kv->key, kv->type, &v); }
    case VLM_GGUF_TYPE_STRING: {
        char *s = malloc(kv->str_len + 1);
        if (!s) return VLM_ERR_NOMEM;
        memcpy(s, kv->str, kv->str_len);
        s[kv->str_len] = '\0';
        int rc = vlm_gguf_writer_set_str(w, kv->key, s);
        free(s);
        return rc;
    }
    case VLM_GGUF_TYPE_ARRAY:
        if (kv->arr_type == VLM_GGUF_TYPE_STRING) {
            const char **strs = malloc((kv->arr_n ? kv->arr_n : 1) * sizeof *strs);
            size_t *lens = malloc((kv->arr_n ? kv->arr_n : 1) * sizeof *lens);
            if (!strs || !lens) return VLM_ERR_NOMEM;
            for (uint64_t i = 0; i < kv->arr_n; i++) {
                uint64_t len;
                strs[i] = vlm_gguf_arr_str(kv, i, &len);
                lens[i] = (size_t)len;
            }
            int rc = vlm_gguf_writer_set_arr_str(w, kv->key, strs, lens, kv->arr_n);
            free(strs);
            free(lens);
            return rc;
        }
        return vlm_gguf_writer_set_arr(w, kv->key, kv->arr_type, kv->arr_data, kv->arr_n);
    default:
        return VLM_ERR_INVALID_ARG;
    }
}

/* Writes src with edit e applied into memory and opens it. *buf must be
 * freed after the reader is destroyed. */
static int rebuild(const vlm_gguf_t *src, const edit_t *e, void **buf, vlm_gguf_t **out) {
    vlm_gguf_writer_t *w = vlm_gguf_writer_new();
    vlm_error_t err;
    void *zeros = calloc(1, 1 << 20);
    int rc = w && zeros ? VLM_OK : VLM_ERR_NOMEM;
    for (size_t i = 0; rc == VLM_OK && i < vlm_gguf_n_kv(src); i++) {
        const vlm_gguf_kv_t *kv = vlm_gguf_kv_at(src, i);
        if (e->drop_key && strcmp(kv->key, e->drop_key) == 0) continue;
        rc = copy_kv(w, kv);
    }
    if (rc == VLM_OK && e->str_key) rc = vlm_gguf_writer_set_str(w, e->str_key, e->str_val);
    if (rc == VLM_OK && e->u32_key) rc = vlm_gguf_writer_set_u32(w, e->u32_key, e->u32_val);
    if (rc == VLM_OK && e->i32_arr_key)
        rc = vlm_gguf_writer_set_arr(w, e->i32_arr_key, VLM_GGUF_TYPE_INT32, e->i32_arr, (uint64_t)e->n_i32_arr);
    for (int k = 0; rc == VLM_OK && e->first && e->first[k]; k++) {
        const vlm_gguf_tensor_t *t = vlm_gguf_find_tensor(src, e->first[k]);
        if (!t) return VLM_ERR_NOT_FOUND;
        rc = vlm_gguf_writer_add_tensor(w, t->name, t->type, (int)t->n_dims, t->ne, t->data, &err);
    }
    for (size_t i = 0; rc == VLM_OK && i < vlm_gguf_n_tensors(src); i++) {
        const vlm_gguf_tensor_t *t = vlm_gguf_tensor_at(src, i);
        if (e->drop_tensor && strcmp(t->name, e->drop_tensor) == 0) continue;
        bool moved = false;
        for (int k = 0; e->first && e->first[k]; k++) moved |= strcmp(t->name, e->first[k]) == 0;
        if (moved) continue;
        int64_t ne[4] = {t->ne[0], t->ne[1], t->ne[2], t->ne[3]};
        if (e->retype_tensor && strcmp(t->name, e->retype_tensor) == 0) {
            rc = vlm_gguf_writer_add_tensor(w, t->name, VLM_DTYPE_BF16, (int)t->n_dims, ne, zeros, &err);
            continue;
        }
        if (e->transpose_tensor && strcmp(t->name, e->transpose_tensor) == 0) {
            int64_t tmp = ne[0];
            ne[0] = ne[1];
            ne[1] = tmp;
        }
        rc = vlm_gguf_writer_add_tensor(w, t->name, t->type, (int)t->n_dims, ne, t->data, &err);
    }
    if (rc == VLM_OK && e->add_tensor) {
        int64_t ne[1] = {4};
        rc = vlm_gguf_writer_add_tensor(w, e->add_tensor, VLM_DTYPE_F32, 1, ne, zeros, &err);
    }
    size_t size = 0;
    *buf = NULL;
    if (rc == VLM_OK) rc = vlm_gguf_writer_write_mem(w, buf, &size, &err);
    if (rc == VLM_OK) rc = vlm_gguf_open_buffer(*buf, size, out, &err);
    vlm_gguf_writer_destroy(&w);
    free(zeros);
    return rc;
}

/* Loads the micro mmproj rebuilt with edit e into clip (and projector with
 * the given widths); returns the clip code, fills the messages. */
static int try_load(const vlm_gguf_t *micro, const edit_t *e, int32_t n_text, int *proj_rc,
                    vlm_error_t *clip_err, vlm_error_t *proj_err) {
    void *buf = NULL;
    vlm_gguf_t *g = NULL;
    int rc = rebuild(micro, e, &buf, &g);
    if (rc) {
        free(buf);
        snprintf(clip_err->msg, sizeof clip_err->msg, "rebuild failed: %s", vlm_error_name(rc));
        return 1;
    }
    vlm_clip_t *clip = NULL;
    vlm_projector_t *proj = NULL;
    rc = vlm_clip_load(g, NULL, &clip, clip_err);
    if (proj_rc) *proj_rc = vlm_projector_load(g, 48, n_text, &proj, proj_err);
    vlm_clip_destroy(&clip);
    vlm_projector_destroy(&proj);
    vlm_gguf_destroy(&g);
    free(buf);
    return rc;
}

static void test_load_errors(void) {
    char path[600];
    snprintf(path, sizeof path, "%s/golden/micro-f32/mmproj.gguf", VLM_TEST_DATA);
    vlm_gguf_t *micro = NULL;
    vlm_error_t err, perr;
    if (vlm_gguf_open(path, &micro, &err)) SKIP("%s: %s", path, err.msg);
    int prc = 0;

    /* Unchanged copy loads (the rebuild itself is sound). */
    edit_t none = {0};
    CHECK(try_load(micro, &none, 64, &prc, &err, &perr) == VLM_OK, "%s", err.msg);
    CHECK(prc == VLM_OK, "%s", perr.msg);

    /* Projector width vs the text model. */
    {
        vlm_projector_t *proj = NULL;
        CHECK(vlm_projector_load(micro, 48, 2048, &proj, &perr) == VLM_ERR_SHAPE && proj == NULL);
        CHECK(strstr(perr.msg, "mmproj projects to 64 but the text model's n_embd is 2048") != NULL, "%s", perr.msg);
        printf("  width mismatch: %s\n", perr.msg);
        CHECK(vlm_projector_load(micro, 96, 64, &proj, &perr) == VLM_ERR_SHAPE && proj == NULL);
        CHECK(strstr(perr.msg, "48") && strstr(perr.msg, "96"), "%s", perr.msg);
        CHECK(vlm_projector_load(micro, 48, 64, &proj, &perr) == VLM_OK, "%s", perr.msg);
        CHECK(vlm_projector_type(proj) == VLM_PROJECTOR_LLAVA_MLP && vlm_projector_n_in(proj) == 48 &&
              vlm_projector_n_out(proj) == 64);
        CHECK(vlm_projector_extra_bytes(proj) == 0, "F32 weights are used in place");
        vlm_projector_destroy(&proj);
    }

    /* A missing tensor. */
    edit_t e1 = {.drop_tensor = "v.blk.1.attn_k.weight"};
    CHECK(try_load(micro, &e1, 64, NULL, &err, &perr) == VLM_ERR_NOT_FOUND, "%s", err.msg);
    CHECK(strstr(err.msg, "v.blk.1.attn_k.weight") != NULL, "%s", err.msg);
    printf("  missing tensor: %s\n", err.msg);
    /* The unused last layer is still required, as llama.cpp loads it. */
    edit_t e1b = {.drop_tensor = "v.blk.2.ffn_up.bias"};
    CHECK(try_load(micro, &e1b, 64, NULL, &err, &perr) == VLM_ERR_NOT_FOUND, "%s", err.msg);
    edit_t e1c = {.drop_tensor = "mm.2.bias"};
    CHECK(try_load(micro, &e1c, 64, &prc, &err, &perr) == VLM_OK, "%s", err.msg);
    CHECK(prc == VLM_ERR_NOT_FOUND && strstr(perr.msg, "mm.2.bias"), "%s", perr.msg);
    /* Half of an optional pair. */
    edit_t e1d = {.drop_tensor = "v.pre_ln.bias"};
    CHECK(try_load(micro, &e1d, 64, NULL, &err, &perr) == VLM_ERR_NOT_FOUND && strstr(err.msg, "v.pre_ln.bias"), "%s", err.msg);

    /* Unsupported projector type, named. */
    edit_t e2 = {.str_key = "clip.projector_type", .str_val = "ldp"};
    CHECK(try_load(micro, &e2, 64, &prc, &err, &perr) == VLM_ERR_UNSUPPORTED, "%s", err.msg);
    CHECK(strstr(err.msg, "\"ldp\"") != NULL, "%s", err.msg);
    CHECK(prc == VLM_ERR_UNSUPPORTED && strstr(perr.msg, "\"ldp\"") != NULL, "%s", perr.msg);
    printf("  projector type: %s\n", err.msg);
    /* "mlp" with an mm.3 layer is llama.cpp's MLP_NORM. */
    edit_t e2b = {.add_tensor = "mm.3.weight"};
    CHECK(try_load(micro, &e2b, 64, &prc, &err, &perr) == VLM_OK, "%s", err.msg);
    CHECK(prc == VLM_ERR_UNSUPPORTED && strstr(perr.msg, "mm.3.weight"), "%s", perr.msg);
    /* Another architecture. */
    edit_t e2c = {.str_key = "general.architecture", .str_val = "llama"};
    CHECK(try_load(micro, &e2c, 64, NULL, &err, &perr) == VLM_ERR_UNSUPPORTED && strstr(err.msg, "llama"), "%s", err.msg);

    /* Patch size not dividing the image size. */
    edit_t e3 = {.u32_key = "clip.vision.patch_size", .u32_val = 15};
    CHECK(try_load(micro, &e3, 64, NULL, &err, &perr) == VLM_ERR_UNSUPPORTED, "%s", err.msg);
    CHECK(strstr(err.msg, "patch_size 15") != NULL, "%s", err.msg);
    /* Heads not dividing the width. */
    edit_t e3b = {.u32_key = "clip.vision.attention.head_count", .u32_val = 5};
    CHECK(try_load(micro, &e3b, 64, NULL, &err, &perr) == VLM_ERR_UNSUPPORTED && strstr(err.msg, "head_count"), "%s", err.msg);
    /* A patch size that divides but disagrees with the kernel. */
    edit_t e3c = {.u32_key = "clip.vision.patch_size", .u32_val = 28};
    CHECK(try_load(micro, &e3c, 64, NULL, &err, &perr) == VLM_ERR_SHAPE && strstr(err.msg, "v.patch_embd.weight"), "%s", err.msg);

    /* Wrong type and wrong shape. */
    edit_t e4 = {.retype_tensor = "v.blk.0.attn_q.weight"};
    CHECK(try_load(micro, &e4, 64, NULL, &err, &perr) == VLM_ERR_TYPE, "%s", err.msg);
    CHECK(strstr(err.msg, "v.blk.0.attn_q.weight") && strstr(err.msg, "BF16"), "%s", err.msg);
    edit_t e5 = {.transpose_tensor = "v.blk.0.ffn_down.weight"};
    CHECK(try_load(micro, &e5, 64, NULL, &err, &perr) == VLM_ERR_SHAPE, "%s", err.msg);
    CHECK(strstr(err.msg, "v.blk.0.ffn_down.weight") != NULL, "%s", err.msg);

    /* Missing and mistyped keys. */
    edit_t e6 = {.drop_key = "clip.vision.block_count"};
    CHECK(try_load(micro, &e6, 64, NULL, &err, &perr) == VLM_ERR_MISSING_KEY && strstr(err.msg, "block_count"), "%s", err.msg);
    edit_t e7 = {.drop_key = "clip.use_gelu"};
    CHECK(try_load(micro, &e7, 64, NULL, &err, &perr) == VLM_ERR_MISSING_KEY && strstr(err.msg, "clip.use_gelu"), "%s", err.msg);
    edit_t e8 = {.str_key = "clip.vision.image_size", .str_val = "big"};
    CHECK(try_load(micro, &e8, 64, NULL, &err, &perr) == VLM_ERR_TYPE && strstr(err.msg, "image_size"), "%s", err.msg);
    int32_t bad_layers[1] = {7};
    edit_t e9 = {.i32_arr_key = "clip.vision.feature_layer", .i32_arr = bad_layers, .n_i32_arr = 1};
    CHECK(try_load(micro, &e9, 64, NULL, &err, &perr) == VLM_ERR_FORMAT && strstr(err.msg, "feature_layer"), "%s", err.msg);

    vlm_gguf_destroy(&micro);
}

/* ==== layer selection ================================================== */

/* clip.vision.feature_layer = [1, 2] on micro (block_count 3): the second
 * column block is llama.cpp's default output (after 2 layers), the first
 * the hidden state after 1 layer; run_all_layers changes the output. */
static void test_feature_layers(void) {
    char path[600];
    snprintf(path, sizeof path, "%s/golden/micro-f32/mmproj.gguf", VLM_TEST_DATA);
    vlm_gguf_t *micro = NULL, *g2 = NULL;
    vlm_error_t err;
    if (vlm_gguf_open(path, &micro, &err)) SKIP("%s: %s", path, err.msg);
    int32_t layers[2] = {2, 1};
    edit_t e = {.i32_arr_key = "clip.vision.feature_layer", .i32_arr = layers, .n_i32_arr = 2};
    void *buf = NULL;
    REQUIRE(rebuild(micro, &e, &buf, &g2) == VLM_OK);
    vlm_clip_t *c1 = NULL, *c2 = NULL, *c3 = NULL;
    vlm_clip_opts_t all = vlm_clip_opts_default();
    all.run_all_layers = true;
    CHECK(vlm_clip_load(micro, NULL, &c1, &err) == 0, "%s", err.msg);
    CHECK(vlm_clip_load(g2, NULL, &c2, &err) == 0, "%s", err.msg);
    CHECK(vlm_clip_load(micro, &all, &c3, &err) == 0, "%s", err.msg);
    if (c1 && c2 && c3) {
        const vlm_clip_hparams_t *h1 = vlm_clip_hparams(c1), *h2 = vlm_clip_hparams(c2), *h3 = vlm_clip_hparams(c3);
        CHECK(h1->n_layer_run == 2 && h3->n_layer_run == 3 && h2->n_layer_run == 2);
        CHECK(h2->n_feature_layers == 2 && h2->feature_layers[0] == 1 && h2->n_embd_out == 96);
        const size_t S = (size_t)h1->image_size, P = (size_t)h1->n_patches, E = (size_t)h1->n_embd;
        char p[700];
        snprintf(p, sizeof p, "%s/golden/micro-f32/exact.pre.f32", VLM_TEST_DATA);
        size_t n = 0;
        float *img = harness_read_file(p, &n);
        float *f1 = malloc(P * E * sizeof(float)), *f2 = malloc(P * 2 * E * sizeof(float));
        float *f3 = malloc(P * E * sizeof(float));
        if (img && n == S * S * 3 * sizeof(float) && f1 && f2 && f3) {
            CHECK(vlm_clip_encode(c1, g_pool, img, 1, f1, &err) == 0);
            CHECK(vlm_clip_encode(c2, g_pool, img, 1, f2, &err) == 0);
            CHECK(vlm_clip_encode(c3, g_pool, img, 1, f3, &err) == 0);
            double same = 0, diff_first = 0, diff_all = 0;
            for (size_t r = 0; r < P; r++)
                for (size_t k = 0; k < E; k++) {
                    double a = f1[r * E + k];
                    same = fmax(same, fabs(a - f2[r * 2 * E + E + k]));
                    diff_first = fmax(diff_first, fabs(a - f2[r * 2 * E + k]));
                    diff_all = fmax(diff_all, fabs(a - f3[r * E + k]));
                }
            CHECK(same == 0, "deepest feature block differs from the default output by %g", same);
            CHECK(diff_first > 1e-3 && diff_all > 1e-3, "%g %g", diff_first, diff_all);
        } else {
            CHECK(0, "cannot read %s", p);
        }
        free(img);
        free(f1);
        free(f2);
        free(f3);
    }
    vlm_clip_destroy(&c1);
    vlm_clip_destroy(&c2);
    vlm_clip_destroy(&c3);
    vlm_gguf_destroy(&g2);
    free(buf);
    vlm_gguf_destroy(&micro);
}

/* ==== fused q/k/v in any order ======================================== */

/* An F32 file whose v, q, k weights of every layer are stored back to back
 * (in that order) takes the fused single-GEMM path with permuted columns;
 * its embeddings must still match llama.cpp's. */
static void test_fused_qkv_permuted(void) {
    char path[600];
    snprintf(path, sizeof path, "%s/golden/micro-f32/mmproj.gguf", VLM_TEST_DATA);
    vlm_gguf_t *micro = NULL, *g2 = NULL;
    vlm_error_t err;
    if (vlm_gguf_open(path, &micro, &err)) SKIP("%s: %s", path, err.msg);
    static const char *const first[] = {"v.blk.0.attn_v.weight", "v.blk.0.attn_q.weight", "v.blk.0.attn_k.weight",
                                        "v.blk.1.attn_k.weight", "v.blk.1.attn_v.weight", "v.blk.1.attn_q.weight",
                                        NULL};
    edit_t e = {.first = first};
    void *buf = NULL;
    REQUIRE(rebuild(micro, &e, &buf, &g2) == VLM_OK);
    vlm_clip_t *c = NULL;
    vlm_projector_t *p = NULL;
    CHECK(vlm_clip_load(g2, NULL, &c, &err) == 0, "%s", err.msg);
    CHECK(vlm_projector_load(g2, 48, 64, &p, &err) == 0, "%s", err.msg);
    char p1[700], p2[700];
    snprintf(p1, sizeof p1, "%s/golden/micro-f32/photo_200x150.pre.f32", VLM_TEST_DATA);
    snprintf(p2, sizeof p2, "%s/golden/micro-f32/photo_200x150.emb.f32", VLM_TEST_DATA);
    size_t n1 = 0, n2 = 0;
    float *img = harness_read_file(p1, &n1), *ref = harness_read_file(p2, &n2);
    float feat[16 * 48], emb[16 * 64];
    if (c && p && img && ref && n1 == 56 * 56 * 3 * sizeof(float) && n2 == sizeof emb) {
        CHECK(vlm_clip_encode(c, g_pool, img, 1, feat, &err) == 0, "%s", err.msg);
        CHECK(vlm_projector_apply(p, g_pool, feat, 16, emb, &err) == 0, "%s", err.msg);
        double d = rel_diff(emb, ref, 16 * 64);
        printf("  fused q/k/v (v, q, k order): max|diff|/max|ref| = %.3e\n", d);
        CHECK(d <= 2e-3, "%.3e", d);
    } else {
        CHECK(0, "setup failed");
    }
    free(img);
    free(ref);
    vlm_projector_destroy(&p);
    vlm_clip_destroy(&c);
    vlm_gguf_destroy(&g2);
    free(buf);
    vlm_gguf_destroy(&micro);
}

/* ==== keep_f16 ========================================================= */

/* Widening F16 matrices per pass instead of at load time gives the same
 * f32 weights and GEMMs, hence the same bits, with less memory held. */
static void test_keep_f16_same_result(void) {
    golden_case_t gc;
    if (load_case("small-q8_0", &gc) != 0) SKIP("small-q8_0 missing");
    char path[700];
    snprintf(path, sizeof path, "%s/mmproj.gguf", gc.dir);
    vlm_gguf_t *g = NULL;
    vlm_error_t err;
    REQUIRE(vlm_gguf_open(path, &g, &err) == 0, "%s", err.msg);
    vlm_clip_opts_t opts = vlm_clip_opts_default();
    vlm_clip_t *a = NULL, *b = NULL;
    REQUIRE(vlm_clip_load(g, &opts, &a, &err) == 0, "%s", err.msg);
    opts.keep_f16 = true;
    REQUIRE(vlm_clip_load(g, &opts, &b, &err) == 0, "%s", err.msg);
    printf("  extra bytes: widened at load %zu, keep_f16 %zu\n", vlm_clip_extra_bytes(a), vlm_clip_extra_bytes(b));
    CHECK(vlm_clip_extra_bytes(b) * 4 < vlm_clip_extra_bytes(a));
    const vlm_clip_hparams_t *hp = vlm_clip_hparams(a);
    const size_t S = (size_t)hp->image_size, per = (size_t)hp->n_patches * hp->n_embd_out;
    int n = 0;
    float *imgs = read_all_images(&gc, S, &n);
    float *fa = malloc((size_t)n * per * sizeof(float)), *fb = malloc((size_t)n * per * sizeof(float));
    REQUIRE(imgs && fa && fb);
    CHECK(vlm_clip_encode(a, g_pool, imgs, n, fa, &err) == 0, "%s", err.msg);
    CHECK(vlm_clip_encode(b, g_pool, imgs, n, fb, &err) == 0, "%s", err.msg);
    CHECK(memcmp(fa, fb, (size_t)n * per * sizeof(float)) == 0, "max diff %g",
          harness_max_abs_diff(fa, fb, (size_t)n * per));
    free(imgs);
    free(fa);
    free(fb);
    vlm_clip_destroy(&a);
    vlm_clip_destroy(&b);
    vlm_gguf_destroy(&g);
}

#define CHILD_ENV "VLM_TEST_CLIP_CHILD"

/* Runs this executable again with VLM_ISA=scalar: the golden check on the
 * portable element-wise kernels. */
static void test_golden_scalar_kernels(void) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    REQUIRE(pid >= 0, "fork failed");
    if (pid == 0) {
        setenv("VLM_ISA", "scalar", 1);
        setenv(CHILD_ENV, "1", 1);
        execl("/proc/self/exe", "test_clip", (char *)NULL);
        _exit(127);
    }
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "scalar-kernel child failed (status %d)", status);
}

int main(void) {
    const bool child = getenv(CHILD_ENV) != NULL;
    g_pool = vlm_pool_new(2);
    RUN(test_golden_embeddings);
    if (!child) {
        RUN(test_batch_equals_one_by_one);
        RUN(test_load_errors);
        RUN(test_feature_layers);
        RUN(test_keep_f16_same_result);
        RUN(test_fused_qkv_permuted);
        RUN(test_golden_scalar_kernels);
    }
    vlm_pool_destroy(&g_pool);
    return harness_report();
}
