/* vision/clip.c - the CLIP ViT encoder of a LLaVA-1.5 mmproj (see clip.h).
 *
 * Layout conventions (row-major throughout, ggml ne = {row length, rows}):
 *   activations  x: [n_tok][n_embd]  one row per token; the tokens of the
 *                images of one forward pass are stacked: image b owns rows
 *                [b * n_pos, (b + 1) * n_pos), row 0 of each is its class token
 *   weights      W: [n_out][n_in]    y = x W^T, i.e.
 *                cblas_sgemm(RowMajor, NoTrans, Trans, n_tok, n_out, n_in,
 *                            1, x, n_in, W, n_in, 0, y, n_out)
 *   attention    head h of q/k/v is the column block [h * d_head, (h+1) * d_head)
 *                of the [n_tok][n_embd] matrices, used in place through the
 *                leading dimension (no permute copies).
 *
 * The loader validates every key and tensor first (the last, unused layer
 * included, as llama.cpp loads it), then widens whatever is not usable in
 * place (F16, misaligned F32) into one arena.
 *
 * The forward pass is clip_forward(); every GEMM is a cblas_sgemm call from
 * the calling thread, and everything element-wise is a rows_job run on the
 * pool between GEMMs.
 */
#include "vision/clip.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "vision/vit_ops.h"

/* ==== model ============================================================ */

typedef struct clip_layer {
    const float *ln1_w, *ln1_b;   /* [n_embd] */
    const float *q_w, *q_b;       /* [n_embd][n_embd], [n_embd] */
    const float *k_w, *k_b;       /* [n_embd][n_embd], [n_embd] */
    const float *v_w, *v_b;       /* [n_embd][n_embd], [n_embd] */
    const float *o_w, *o_b;       /* [n_embd][n_embd], [n_embd] */
    const float *ln2_w, *ln2_b;   /* [n_embd] */
    const float *fc1_w, *fc1_b;   /* v.blk.N.ffn_down: [n_ff][n_embd], [n_ff] */
    const float *fc2_w, *fc2_b;   /* v.blk.N.ffn_up:   [n_embd][n_ff], [n_embd] */
    const float *qkv_w;           /* [3 * n_embd][n_embd] when q_w, k_w, v_w are one block
                                   * (in some order), else NULL */
    /* With opts.keep_f16 the F16 matrices stay in the mapping: these point
     * there and the f32 pointers above are NULL (the forward pass widens
     * each one into a scratch panel right before its GEMM). */
    const uint16_t *q_h, *k_h, *v_h, *o_h, *fc1_h, *fc2_h;
    int qkv_col[3];               /* column of q, k, v in the [n_tok][3 * n_embd] output */
} clip_layer_t;

struct vlm_clip {
    const vlm_gguf_t *g;          /* borrowed mapping */
    vlm_clip_hparams_t hp;
    int32_t max_batch;            /* images per forward pass */
    const float *patch_w;         /* [n_embd][3 * p * p], column (c * p + ky) * p + kx */
    const float *class_embd;      /* [n_embd] */
    const float *pos_embd;        /* [n_pos][n_embd] (first n_pos rows of the tensor) */
    const float *pre_ln_w, *pre_ln_b;   /* [n_embd] or NULL */
    const float *post_ln_w, *post_ln_b; /* [n_embd] or NULL */
    clip_layer_t *layers;         /* [n_layer_run] */
    float *arena;                 /* widened copies, 64-byte aligned */
    size_t extra_bytes;
    size_t panel_floats;          /* scratch for one kept-F16 matrix (q, k, v together), or 0 */
};

/* ==== loading: metadata ================================================ */

#define CLIP_MAX_IMAGE_SIZE 8192
#define CLIP_MAX_EMBD 65536
#define CLIP_MAX_LAYERS 1024
#define CLIP_MAX_PATCHES 16384  /* keeps n_pos^2 score matrices and int GEMM sizes sane */
#define CLIP_MAX_BATCH 64

static int get_dim(const vlm_gguf_t *g, const char *key, int32_t lo, int32_t hi, int32_t *out,
                   vlm_error_t *err) {
    uint32_t v;
    int rc = vlm_gguf_get_u32(g, key, &v, err);
    if (rc) return rc;
    if (v < (uint32_t)lo || v > (uint32_t)hi)
        return vlm_error_set(err, VLM_ERR_FORMAT, "%s: key '%s' = %u is out of range [%d, %d]",
                             vlm_gguf_path(g), key, v, lo, hi);
    *out = (int32_t)v;
    return VLM_OK;
}

static int get_rgb(const vlm_gguf_t *g, const char *key, float out[3], vlm_error_t *err) {
    const vlm_gguf_kv_t *kv;
    int rc = vlm_gguf_get_arr(g, key, VLM_GGUF_TYPE_FLOAT32, &kv, err);
    if (rc) return rc;
    if (kv->arr_n != 3)
        return vlm_error_set(err, VLM_ERR_FORMAT, "%s: key '%s' has %llu elements, expected 3",
                             vlm_gguf_path(g), key, (unsigned long long)kv->arr_n);
    for (int i = 0; i < 3; i++) {
        out[i] = (float)vlm_gguf_arr_f64(kv, (uint64_t)i);
        if (!isfinite(out[i]))
            return vlm_error_set(err, VLM_ERR_FORMAT, "%s: key '%s' has a non-finite element",
                                 vlm_gguf_path(g), key);
    }
    return VLM_OK;
}

/* An optional bool key: absent -> dflt. */
static int get_bool_opt(const vlm_gguf_t *g, const char *key, bool dflt, bool *out,
                        vlm_error_t *err) {
    if (!vlm_gguf_find_kv(g, key)) {
        *out = dflt;
        return VLM_OK;
    }
    return vlm_gguf_get_bool(g, key, out, err);
}

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* Reads and checks every hyperparameter. */
static int load_hparams(const vlm_gguf_t *g, const vlm_clip_opts_t *opts, vlm_clip_hparams_t *hp,
                        vlm_error_t *err) {
    const char *path = vlm_gguf_path(g);
    const char *s;
    size_t len;
    int rc;

    rc = vlm_gguf_get_str(g, "general.architecture", &s, &len, err);
    if (rc) return rc;
    if (len != 4 || memcmp(s, "clip", 4) != 0)
        return vlm_error_set(err, VLM_ERR_UNSUPPORTED,
                             "%s: general.architecture is \"%.*s\", expected \"clip\" (an mmproj file)",
                             path, (int)(len > 64 ? 64 : len), s);

    /* llama.cpp treats a missing projector type as "mlp". */
    if (vlm_gguf_find_kv(g, "clip.projector_type")) {
        rc = vlm_gguf_get_str(g, "clip.projector_type", &s, &len, err);
        if (rc) return rc;
        if (len != 3 || memcmp(s, "mlp", 3) != 0)
            return vlm_error_set(err, VLM_ERR_UNSUPPORTED,
                                 "%s: clip.projector_type \"%.*s\" is not supported (supported: \"mlp\", LLaVA-1.5)",
                                 path, (int)(len > 64 ? 64 : len), s);
    }

    bool has_vision, has_text, has_llava;
    if ((rc = vlm_gguf_get_bool(g, "clip.has_vision_encoder", &has_vision, err))) return rc;
    if (!has_vision)
        return vlm_error_set(err, VLM_ERR_UNSUPPORTED, "%s: clip.has_vision_encoder is false: no vision encoder in this file", path);
    if ((rc = get_bool_opt(g, "clip.has_text_encoder", false, &has_text, err))) return rc;
    if (has_text)
        return vlm_error_set(err, VLM_ERR_UNSUPPORTED, "%s: clip.has_text_encoder is true: CLIP text encoders are not supported", path);
    if ((rc = vlm_gguf_get_bool(g, "clip.has_llava_projector", &has_llava, err))) return rc;
    if (!has_llava)
        return vlm_error_set(err, VLM_ERR_UNSUPPORTED, "%s: clip.has_llava_projector is false: only LLaVA projectors are supported", path);
    static const char *const other_projectors[] = {
        "clip.has_minicpmv_projector", "clip.has_glm_projector", "clip.has_qwen2vl_merger"};
    for (size_t i = 0; i < sizeof other_projectors / sizeof *other_projectors; i++) {
        bool b;
        if ((rc = get_bool_opt(g, other_projectors[i], false, &b, err))) return rc;
        if (b) return vlm_error_set(err, VLM_ERR_UNSUPPORTED, "%s: %s is true: not supported", path, other_projectors[i]);
    }

    if ((rc = get_dim(g, "clip.vision.image_size", 1, CLIP_MAX_IMAGE_SIZE, &hp->image_size, err))) return rc;
    if ((rc = get_dim(g, "clip.vision.patch_size", 1, CLIP_MAX_IMAGE_SIZE, &hp->patch_size, err))) return rc;
    if ((rc = get_dim(g, "clip.vision.embedding_length", 1, CLIP_MAX_EMBD, &hp->n_embd, err))) return rc;
    if ((rc = get_dim(g, "clip.vision.feed_forward_length", 1, 4 * CLIP_MAX_EMBD, &hp->n_ff, err))) return rc;
    if ((rc = get_dim(g, "clip.vision.projection_dim", 0, 4 * CLIP_MAX_EMBD, &hp->projection_dim, err))) return rc;
    if ((rc = get_dim(g, "clip.vision.attention.head_count", 1, CLIP_MAX_EMBD, &hp->n_head, err))) return rc;
    if ((rc = get_dim(g, "clip.vision.block_count", 1, CLIP_MAX_LAYERS, &hp->n_layer, err))) return rc;
    if ((rc = vlm_gguf_get_f32(g, "clip.vision.attention.layer_norm_epsilon", &hp->eps, err))) return rc;
    if (!(hp->eps >= 0.0f) || !isfinite(hp->eps))
        return vlm_error_set(err, VLM_ERR_FORMAT, "%s: clip.vision.attention.layer_norm_epsilon must be finite and >= 0", path);
    if ((rc = get_rgb(g, "clip.vision.image_mean", hp->mean, err))) return rc;
    if ((rc = get_rgb(g, "clip.vision.image_std", hp->std, err))) return rc;
    for (int i = 0; i < 3; i++)
        if (hp->std[i] == 0.0f)
            return vlm_error_set(err, VLM_ERR_FORMAT, "%s: clip.vision.image_std[%d] is 0", path, i);
    if ((rc = vlm_gguf_get_bool(g, "clip.use_gelu", &hp->use_gelu, err))) return rc;
    bool use_silu;
    if ((rc = get_bool_opt(g, "clip.use_silu", false, &use_silu, err))) return rc;
    if (use_silu && !hp->use_gelu)
        return vlm_error_set(err, VLM_ERR_UNSUPPORTED, "%s: clip.use_silu: a SiLU vision MLP is not supported by the CLIP encoder", path);

    if (hp->image_size % hp->patch_size != 0)
        return vlm_error_set(err, VLM_ERR_UNSUPPORTED,
                             "%s: clip.vision.patch_size %d does not divide clip.vision.image_size %d",
                             path, hp->patch_size, hp->image_size);
    if (hp->n_embd % hp->n_head != 0)
        return vlm_error_set(err, VLM_ERR_UNSUPPORTED,
                             "%s: clip.vision.attention.head_count %d does not divide clip.vision.embedding_length %d",
                             path, hp->n_head, hp->n_embd);
    hp->n_patches_side = hp->image_size / hp->patch_size;
    if ((int64_t)hp->n_patches_side * hp->n_patches_side > CLIP_MAX_PATCHES)
        return vlm_error_set(err, VLM_ERR_UNSUPPORTED, "%s: %d x %d patches per image is more than the supported %d",
                             path, hp->n_patches_side, hp->n_patches_side, CLIP_MAX_PATCHES);
    hp->n_patches = hp->n_patches_side * hp->n_patches_side;
    hp->n_pos = hp->n_patches + 1;
    hp->d_head = hp->n_embd / hp->n_head;

    /* Which hidden states make the features (see clip.h). */
    if (vlm_gguf_find_kv(g, "clip.vision.feature_layer")) {
        const vlm_gguf_kv_t *kv;
        if ((rc = vlm_gguf_get_arr(g, "clip.vision.feature_layer", VLM_GGUF_TYPE_COUNT, &kv, err))) return rc;
        if (kv->arr_n < 1 || kv->arr_n > VLM_CLIP_MAX_FEATURE_LAYERS ||
            kv->arr_type == VLM_GGUF_TYPE_STRING || kv->arr_type == VLM_GGUF_TYPE_FLOAT32 ||
            kv->arr_type == VLM_GGUF_TYPE_FLOAT64 || kv->arr_type == VLM_GGUF_TYPE_BOOL)
            return vlm_error_set(err, VLM_ERR_FORMAT,
                                 "%s: clip.vision.feature_layer must be an array of 1 to %d integers",
                                 path, VLM_CLIP_MAX_FEATURE_LAYERS);
        int n = 0;
        for (uint64_t i = 0; i < kv->arr_n; i++) {
            int64_t v = vlm_gguf_arr_i64(kv, i);
            if (v < 0 || v > hp->n_layer)
                return vlm_error_set(err, VLM_ERR_FORMAT,
                                     "%s: clip.vision.feature_layer[%llu] = %lld is outside [0, %d] (block_count)",
                                     path, (unsigned long long)i, (long long)v, hp->n_layer);
            bool dup = false;
            for (int j = 0; j < n; j++) dup |= hp->feature_layers[j] == (int32_t)v;
            if (!dup) hp->feature_layers[n++] = (int32_t)v;
        }
        qsort(hp->feature_layers, (size_t)n, sizeof(int32_t), cmp_i32);
        hp->n_feature_layers = n;
    } else {
        hp->n_feature_layers = 1;
        hp->feature_layers[0] = opts->run_all_layers ? hp->n_layer : hp->n_layer - 1;
    }
    hp->n_layer_run = hp->feature_layers[hp->n_feature_layers - 1];
    hp->n_embd_out = hp->n_embd * hp->n_feature_layers;
    return VLM_OK;
}

/* ==== loading: tensors ================================================= */

/* A validated tensor and where its f32 pointer goes. */
typedef struct tensor_ref {
    const vlm_gguf_tensor_t *t;
    const float **dst;
} tensor_ref_t;



typedef struct ref_list {
    tensor_ref_t *v;
    size_t n, cap;
} ref_list_t;

/* Validates tensor `name` (n_dims dims ne, F32 or F16) and, when dst is not
 * NULL, queues it for loading into *dst. */
static int want(const vlm_gguf_t *g, ref_list_t *refs, const char *name, int n_dims,
                const int64_t *ne, const float **dst, vlm_error_t *err) {
    const vlm_gguf_tensor_t *t;
    int rc = vlm_gguf_expect_tensor(g, name, n_dims, ne, VIT_WEIGHT_TYPES, &t, err);
    if (rc) return rc;
    if (!dst) return VLM_OK;
    VLM_ASSERT(refs->n < refs->cap);
    refs->v[refs->n].t = t;
    refs->v[refs->n].dst = dst;
    refs->n++;
    return VLM_OK;
}

/* An optional weight/bias pair: both or neither. */
static int want_pair_opt(const vlm_gguf_t *g, ref_list_t *refs, const char *prefix, int64_t n,
                         const float **w, const float **b, bool *present, vlm_error_t *err) {
    char wn[96], bn[96];
    snprintf(wn, sizeof wn, "%s.weight", prefix);
    snprintf(bn, sizeof bn, "%s.bias", prefix);
    bool hw = vlm_gguf_find_tensor(g, wn) != NULL, hb = vlm_gguf_find_tensor(g, bn) != NULL;
    *present = hw && hb;
    if (!hw && !hb) return VLM_OK;
    int64_t ne[1] = {n};
    int rc = want(g, refs, wn, 1, ne, w, err);
    if (rc) return rc;
    return want(g, refs, bn, 1, ne, b, err);
}

static int want_layer(const vlm_gguf_t *g, ref_list_t *refs, int il, const vlm_clip_hparams_t *hp,
                      clip_layer_t *L /* NULL: validate only */, bool keep_f16, vlm_error_t *err) {
    const int64_t E = hp->n_embd, F = hp->n_ff;
    struct {
        const char *suffix;
        int n_dims;
        int64_t ne0, ne1;
        const float **dst;
        const uint16_t **dst16;   /* matrices: where the f16 pointer goes when kept */
    } spec[] = {
        /* q, k, v weights first and together: F16 ones are widened next to
         * each other, which lets the forward pass run them as one GEMM. */
        {"attn_q.weight", 2, E, E, L ? &L->q_w : NULL, L ? &L->q_h : NULL},
        {"attn_k.weight", 2, E, E, L ? &L->k_w : NULL, L ? &L->k_h : NULL},
        {"attn_v.weight", 2, E, E, L ? &L->v_w : NULL, L ? &L->v_h : NULL},
        {"ln1.weight", 1, E, 1, L ? &L->ln1_w : NULL, NULL},
        {"ln1.bias", 1, E, 1, L ? &L->ln1_b : NULL, NULL},
        {"attn_q.bias", 1, E, 1, L ? &L->q_b : NULL, NULL},
        {"attn_k.bias", 1, E, 1, L ? &L->k_b : NULL, NULL},
        {"attn_v.bias", 1, E, 1, L ? &L->v_b : NULL, NULL},
        {"attn_out.weight", 2, E, E, L ? &L->o_w : NULL, L ? &L->o_h : NULL},
        {"attn_out.bias", 1, E, 1, L ? &L->o_b : NULL, NULL},
        {"ln2.weight", 1, E, 1, L ? &L->ln2_w : NULL, NULL},
        {"ln2.bias", 1, E, 1, L ? &L->ln2_b : NULL, NULL},
        {"ffn_down.weight", 2, E, F, L ? &L->fc1_w : NULL, L ? &L->fc1_h : NULL}, /* fc1: n_embd -> n_ff */
        {"ffn_down.bias", 1, F, 1, L ? &L->fc1_b : NULL, NULL},
        {"ffn_up.weight", 2, F, E, L ? &L->fc2_w : NULL, L ? &L->fc2_h : NULL},   /* fc2: n_ff -> n_embd */
        {"ffn_up.bias", 1, E, 1, L ? &L->fc2_b : NULL, NULL},
    };
    for (size_t i = 0; i < sizeof spec / sizeof *spec; i++) {
        char name[96];
        snprintf(name, sizeof name, "v.blk.%d.%s", il, spec[i].suffix);
        int64_t ne[2] = {spec[i].ne0, spec[i].ne1};
        int rc = want(g, refs, name, spec[i].n_dims, ne, spec[i].dst, err);
        if (rc) return rc;
        const vlm_gguf_tensor_t *t = spec[i].dst ? refs->v[refs->n - 1].t : NULL;
        if (keep_f16 && t && spec[i].dst16 && t->type == VLM_DTYPE_F16 &&
            ((uintptr_t)t->data % _Alignof(uint16_t)) == 0) {
            refs->n--; /* not widened: the forward pass reads the f16 original */
            *spec[i].dst16 = (const uint16_t *)t->data;
        }
    }
    return VLM_OK;
}

#define CLIP_REFS_PER_LAYER 16

/* When the q, k and v weights are adjacent [n_embd][n_embd] blocks (widened
 * F16 weights are, by construction; F32 ones when the file stores them so),
 * one GEMM with 3 * n_embd outputs computes all three. The blocks may come
 * in any order: the column of each follows from its place. */
static void fuse_qkv(clip_layer_t *L, int32_t n_embd) {
    const float *w[3] = {L->q_w, L->k_w, L->v_w};
    if (!w[0] || !w[1] || !w[2]) { /* kept F16 (any of them): widened per pass */
        L->qkv_w = NULL;
        L->qkv_col[0] = 0, L->qkv_col[1] = n_embd, L->qkv_col[2] = 2 * n_embd;
        return;
    }
    /* Addresses as integers: the blocks may lie in different objects. */
    const uintptr_t blk = (uintptr_t)n_embd * (uintptr_t)n_embd * sizeof(float);
    uintptr_t base = (uintptr_t)w[0];
    for (int i = 1; i < 3; i++) base = (uintptr_t)w[i] < base ? (uintptr_t)w[i] : base;
    bool seen[3] = {false, false, false};
    for (int i = 0; i < 3; i++) {
        uintptr_t d = (uintptr_t)w[i] - base;
        if (d % blk != 0 || d / blk > 2 || seen[d / blk]) {
            L->qkv_w = NULL;
            L->qkv_col[0] = 0, L->qkv_col[1] = n_embd, L->qkv_col[2] = 2 * n_embd;
            return;
        }
        seen[d / blk] = true;
        L->qkv_col[i] = (int)(d / blk) * n_embd;
    }
    L->qkv_w = (const float *)base;
}

int vlm_clip_load(const vlm_gguf_t *g, const vlm_clip_opts_t *opts, vlm_clip_t **out,
                  vlm_error_t *err) {
    VLM_ASSERT(g && out);
    *out = NULL;
    vlm_clip_opts_t dflt = vlm_clip_opts_default();
    if (!opts) opts = &dflt;
    if (opts->max_batch < 0)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "vlm_clip_load: max_batch %d is negative", opts->max_batch);
    vit_ops_init();

    int rc;
    ref_list_t refs = {0};
    vlm_clip_t *c = calloc(1, sizeof *c);
    if (!c) return vlm_error_set(err, VLM_ERR_NOMEM, "vlm_clip_load: out of memory");
    c->g = g;
    c->max_batch = opts->max_batch ? opts->max_batch : 8;
    if (c->max_batch > CLIP_MAX_BATCH) c->max_batch = CLIP_MAX_BATCH;
    vlm_clip_hparams_t *hp = &c->hp;
    if ((rc = load_hparams(g, opts, hp, err))) goto fail;

    /* 1. Validate every tensor and queue the ones that are used. */
    refs.cap = 8 + (size_t)hp->n_layer_run * CLIP_REFS_PER_LAYER;
    refs.v = calloc(refs.cap, sizeof *refs.v);
    c->layers = calloc((size_t)(hp->n_layer_run ? hp->n_layer_run : 1), sizeof *c->layers);
    if (!refs.v || !c->layers) {
        rc = vlm_error_set(err, VLM_ERR_NOMEM, "vlm_clip_load: out of memory");
        goto fail;
    }
    const int64_t E = hp->n_embd, p = hp->patch_size;
    {
        int64_t ne_patch[4] = {p, p, 3, E};
        if ((rc = want(g, &refs, "v.patch_embd.weight", 4, ne_patch, &c->patch_w, err))) goto fail;
        hp->patch_f16 = refs.v[refs.n - 1].t->type == VLM_DTYPE_F16;
        int64_t ne_vec[1] = {E};
        if ((rc = want(g, &refs, "v.class_embd", 1, ne_vec, &c->class_embd, err))) goto fail;
        int64_t ne_pos[2] = {E, -1};
        if ((rc = want(g, &refs, "v.position_embd.weight", 2, ne_pos, &c->pos_embd, err))) goto fail;
        const vlm_gguf_tensor_t *tp = refs.v[refs.n - 1].t;
        if (tp->ne[1] < hp->n_pos) {
            rc = vlm_error_set(err, VLM_ERR_SHAPE,
                               "%s: v.position_embd.weight has %lld positions, the image needs %d (%d patches + class token)",
                               vlm_gguf_path(g), (long long)tp->ne[1], hp->n_pos, hp->n_patches);
            goto fail;
        }
        if ((rc = want_pair_opt(g, &refs, "v.pre_ln", E, &c->pre_ln_w, &c->pre_ln_b, &hp->has_pre_ln, err))) goto fail;
        if ((rc = want_pair_opt(g, &refs, "v.post_ln", E, &c->post_ln_w, &c->post_ln_b, &hp->has_post_ln, err))) goto fail;
        for (int il = 0; il < hp->n_layer; il++) {
            clip_layer_t *L = il < hp->n_layer_run ? &c->layers[il] : NULL;
            if ((rc = want_layer(g, &refs, il, hp, L, opts->keep_f16, err))) goto fail;
        }
    }

    /* 2. One arena for everything not usable in place. */
    size_t n_floats = 0;
    for (size_t i = 0; i < refs.n; i++) n_floats += (vit_tensor_copy_floats(refs.v[i].t) + 15) & ~(size_t)15;
    if (n_floats) {
        c->arena = aligned_alloc(64, n_floats * sizeof(float));
        if (!c->arena) {
            rc = vlm_error_set(err, VLM_ERR_NOMEM, "vlm_clip_load: out of memory widening %zu MiB of weights to f32",
                               n_floats * sizeof(float) >> 20);
            goto fail;
        }
        c->extra_bytes = n_floats * sizeof(float);
    }
    float *cursor = c->arena;
    for (size_t i = 0; i < refs.n; i++) *refs.v[i].dst = vit_tensor_f32(refs.v[i].t, &cursor);
    free(refs.v);
    for (int il = 0; il < hp->n_layer_run; il++) {
        clip_layer_t *L = &c->layers[il];
        fuse_qkv(L, hp->n_embd);
        if (L->q_h || L->k_h || L->v_h || L->o_h || L->fc1_h || L->fc2_h) {
            size_t qkv = 3 * (size_t)hp->n_embd * hp->n_embd, ff = (size_t)hp->n_embd * hp->n_ff;
            c->panel_floats = qkv > ff ? qkv : ff;
        }
    }
    *out = c;
    vlm_error_clear(err);
    return VLM_OK;

fail:
    free(refs.v);
    vlm_clip_destroy(&c);
    return rc;
}

void vlm_clip_destroy(vlm_clip_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_clip_t *c = *self_p;
    free(c->arena);
    free(c->layers);
    free(c);
    *self_p = NULL;
}

const vlm_clip_hparams_t *vlm_clip_hparams(const vlm_clip_t *c) { return &c->hp; }

size_t vlm_clip_extra_bytes(const vlm_clip_t *c) { return c->extra_bytes; }

double vlm_clip_flops_per_image(const vlm_clip_t *c) {
    const vlm_clip_hparams_t *hp = &c->hp;
    const double T = hp->n_pos, E = hp->n_embd, F = hp->n_ff, P = hp->n_patches;
    const double K = 3.0 * hp->patch_size * hp->patch_size;
    double per_layer = 2 * T * E * E * 4   /* q, k, v, attn_out */
                     + 2 * T * T * E * 2   /* q k^T and p v over all heads */
                     + 2 * T * E * F * 2;  /* fc1, fc2 */
    return 2 * P * K * E + per_layer * hp->n_layer_run;
}

/* ==== element-wise jobs ================================================ */

typedef enum rows_op {
    OP_IM2COL,        /* patches of the images -> im2col rows */
    OP_EMBED,         /* class token + patch rows + positions -> x */
    OP_LAYERNORM,     /* y = LN(x) * w + b */
    OP_BIAS_ACT,      /* y = act(y + b) * scale */
    OP_QKV_BIAS,      /* q = (q + b_q) * scale, k += b_k, v += b_v in [n_tok][3 * n_embd] */
    OP_BIAS_RESIDUAL, /* x = x + (t + b); then, when ln_w is set, xn = LN(x) * ln_w + ln_b */
    OP_SOFTMAX,       /* y = softmax(y) per row */
    OP_GATHER,        /* features: patch rows of x into a column block */
    OP_WIDEN,         /* y = f32(h): n_rows blocks of WIDEN_BLOCK halves */
} rows_op_t;

typedef struct rows_job {
    rows_op_t op;
    long n_rows;          /* rows to split over the threads */
    int n;                /* row length */
    float *y;             /* output rows */
    const float *x;       /* input rows */
    const float *w, *b;   /* per-column weight / bias, or NULL */
    float eps, scale;
    vit_act_t act;
    const vlm_clip_t *c;
    const float *const *images; /* OP_IM2COL: [n_img] pointers to [S][S][3] */
    int ld_out;           /* OP_GATHER: row stride of the output (n_embd_out) */
    const clip_layer_t *layer; /* OP_QKV_BIAS */
    const float *ln_w, *ln_b;  /* OP_BIAS_RESIDUAL: the LayerNorm that follows, or NULL */
    float *ln_y;               /* OP_BIAS_RESIDUAL: its output rows */
    const uint16_t *h;         /* OP_WIDEN: source halves */
    size_t n_total;            /* OP_WIDEN: number of halves */
} rows_job_t;

#define WIDEN_BLOCK 16384

static void rows_worker(void *arg, int ith, int nth) {
    const rows_job_t *j = arg;
    long lo, hi;
    vlm_pool_range(j->n_rows, ith, nth, &lo, &hi);
    if (lo >= hi) return;
    const long nr = hi - lo;
    switch (j->op) {
    case OP_IM2COL: {
        /* Row r = image b, patch (py, px); column (c * p + ky) * p + kx, the
         * element order of the [p][p][3][n_embd] (ggml ne) kernel. */
        const vlm_clip_hparams_t *hp = &j->c->hp;
        const int p = hp->patch_size, S = hp->image_size, np = hp->n_patches_side;
        const int K = 3 * p * p;
        for (long r = lo; r < hi; r++) {
            const long b = r / hp->n_patches, i = r % hp->n_patches;
            const int py = (int)(i / np), px = (int)(i % np);
            const float *img = j->images[b];
            float *dst = j->y + (size_t)r * K;
            for (int ch = 0; ch < 3; ch++)
                for (int ky = 0; ky < p; ky++) {
                    const float *src = img + ((size_t)(py * p + ky) * S + (size_t)px * p) * 3 + ch;
                    float *d = dst + (ch * p + ky) * p;
                    for (int kx = 0; kx < p; kx++) d[kx] = src[(size_t)kx * 3];
                }
            if (hp->patch_f16) vit_round_f16_inplace(dst, (size_t)K);
        }
        break;
    }
    case OP_EMBED: {
        /* x row (b, t): t = 0 class token, else patch t - 1; plus position t. */
        const vlm_clip_t *c = j->c;
        const int n_pos = c->hp.n_pos, E = j->n;
        for (long r = lo; r < hi; r++) {
            const long b = r / n_pos, t = r % n_pos;
            const float *src = t == 0 ? c->class_embd : j->x + ((size_t)b * (n_pos - 1) + (size_t)(t - 1)) * E;
            const float *pos = c->pos_embd + (size_t)t * E;
            float *dst = j->y + (size_t)r * E;
            for (int e = 0; e < E; e++) dst[e] = src[e] + pos[e];
        }
        break;
    }
    case OP_LAYERNORM:
        vit_layernorm_rows(j->y + (size_t)lo * j->n, j->x + (size_t)lo * j->n, nr, j->n, j->w, j->b, j->eps);
        break;
    case OP_BIAS_ACT:
        vit_bias_act_rows(j->y + (size_t)lo * j->n, j->b, nr, j->n, j->act, j->scale);
        break;
    case OP_BIAS_RESIDUAL:
        /* Row by row, so the LayerNorm reads the row while it is in cache. */
        for (long r = lo; r < hi; r++) {
            float *xr = j->y + (size_t)r * j->n;
            vit_bias_residual_rows(xr, j->x + (size_t)r * j->n, j->b, 1, j->n);
            if (j->ln_w) vit_layernorm_rows(j->ln_y + (size_t)r * j->n, xr, 1, j->n, j->ln_w, j->ln_b, j->eps);
        }
        break;
    case OP_QKV_BIAS: {
        const clip_layer_t *L = j->layer;
        const int E = j->n, ld = 3 * E;
        float *y = j->y + (size_t)lo * ld;
        vit_bias_act_rows_ld(y + L->qkv_col[0], ld, L->q_b, nr, E, VIT_ACT_NONE, j->scale);
        vit_bias_act_rows_ld(y + L->qkv_col[1], ld, L->k_b, nr, E, VIT_ACT_NONE, 1.0f);
        vit_bias_act_rows_ld(y + L->qkv_col[2], ld, L->v_b, nr, E, VIT_ACT_NONE, 1.0f);
        break;
    }
    case OP_SOFTMAX:
        vit_softmax_rows(j->y + (size_t)lo * j->n, nr, j->n);
        break;
    case OP_WIDEN: {
        size_t a = (size_t)lo * WIDEN_BLOCK, e = (size_t)hi * WIDEN_BLOCK;
        if (e > j->n_total) e = j->n_total;
        vit_f16_to_f32(j->h + a, j->y + a, e - a);
        break;
    }
    case OP_GATHER: {
        /* Output row r = image b, patch i <- x row b * n_pos + 1 + i. */
        const int n_patches = j->c->hp.n_patches, n_pos = j->c->hp.n_pos;
        for (long r = lo; r < hi; r++) {
            const long b = r / n_patches, i = r % n_patches;
            memcpy(j->y + (size_t)r * j->ld_out, j->x + ((size_t)b * n_pos + 1 + (size_t)i) * j->n,
                   (size_t)j->n * sizeof(float));
        }
        break;
    }
    }
}

static void run_rows(vlm_pool_t *pool, rows_job_t *job) { vlm_pool_run(pool, rows_worker, job); }

/* y[m][n] = x[m][k] w[n][k]^T, row strides ldx / ldy. */
static void gemm_xwt(int m, int n, int k, const float *x, int ldx, const float *w, float *y, int ldy) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x, ldx, w, k, 0.0f, y, ldy);
}

/* ==== forward pass ===================================================== */

/* A matrix as f32 for sgemm: w32 when the encoder holds it (in place or
 * widened at load time), else its kept F16 original w16 (n values) widened
 * into panel on the pool. */
static const float *mat_f32(vlm_pool_t *pool, const float *w32, const uint16_t *w16, size_t n, float *panel) {
    if (w32) return w32;
    rows_job_t j = {.op = OP_WIDEN, .n_rows = (long)((n + WIDEN_BLOCK - 1) / WIDEN_BLOCK), .h = w16,
                    .y = panel, .n_total = n};
    run_rows(pool, &j);
    return panel;
}

/* Scratch of one forward pass over n_img images (T = n_img * n_pos rows). */
typedef struct clip_scratch {
    float *x;       /* [T][n_embd] residual stream */
    float *xn;      /* [T][n_embd] normed input of a sub-block, then attention output */
    float *qkv;     /* [T][3 * n_embd] q, k, v (columns qkv_col[]); then [T][n_embd]
                     * output of the attn_out and fc2 GEMMs */
    float *ff;      /* [T][n_ff] */
    float *scores;  /* [heads_per_group][n_pos][n_pos] */
    float *cols;    /* [n_img * n_patches][3 * p * p] im2col rows */
    float *patches; /* [n_img * n_patches][n_embd] patch embeddings */
    float *panel;   /* [panel_floats] one kept-F16 matrix widened, or NULL */
} clip_scratch_t;

static void scratch_free(clip_scratch_t *s) {
    free(s->x);
    free(s->xn);
    free(s->qkv);
    free(s->ff);
    free(s->scores);
    free(s->cols);
    free(s->patches);
    free(s->panel);
    memset(s, 0, sizeof *s);
}

static float *alloc_floats(size_t n) { return aligned_alloc(64, ((n * sizeof(float)) + 63) & ~(size_t)63); }

/* Heads whose score matrices are computed before one softmax pass: enough to
 * amortise the pool hand-off, few enough to stay near the caches. */
static int heads_per_group(const vlm_clip_hparams_t *hp) {
    size_t per_head = (size_t)hp->n_pos * (size_t)hp->n_pos * sizeof(float);
    size_t g = ((size_t)8 << 20) / per_head;
    if (g < 1) g = 1;
    if (g > (size_t)hp->n_head) g = (size_t)hp->n_head;
    return (int)g;
}

/* Copies the patch rows of x into column block `slot` of features. */
static void gather_features(const vlm_clip_t *c, vlm_pool_t *pool, const float *x, int n_img,
                            int slot, float *features) {
    rows_job_t j = {.op = OP_GATHER, .c = c, .n_rows = (long)n_img * c->hp.n_patches,
                    .n = c->hp.n_embd, .x = x, .y = features + (size_t)slot * c->hp.n_embd,
                    .ld_out = c->hp.n_embd_out};
    run_rows(pool, &j);
}

/* Encodes n_img images into features [n_img][n_patches][n_embd_out]. */
static int clip_forward(const vlm_clip_t *c, vlm_pool_t *pool, const float *const *images, int n_img,
                        float *features, vlm_error_t *err) {
    const vlm_clip_hparams_t *hp = &c->hp;
    const int E = hp->n_embd, F = hp->n_ff, n_pos = hp->n_pos, dh = hp->d_head;
    const int K = 3 * hp->patch_size * hp->patch_size;
    const long T = (long)n_img * n_pos, NP = (long)n_img * hp->n_patches;
    const int G = heads_per_group(hp);
    const float kq_scale = 1.0f / sqrtf((float)dh);

    clip_scratch_t s = {0};
    s.x = alloc_floats((size_t)T * E);
    s.xn = alloc_floats((size_t)T * E);
    s.qkv = alloc_floats((size_t)T * 3 * E);
    s.ff = alloc_floats((size_t)T * F);
    s.scores = alloc_floats((size_t)G * n_pos * n_pos);
    s.cols = alloc_floats((size_t)NP * K);
    s.patches = alloc_floats((size_t)NP * E);
    if (c->panel_floats) s.panel = alloc_floats(c->panel_floats);
    if (!s.x || !s.xn || !s.qkv || !s.ff || !s.scores || !s.cols || !s.patches || (c->panel_floats && !s.panel)) {
        scratch_free(&s);
        return vlm_error_set(err, VLM_ERR_NOMEM, "vlm_clip_encode: out of memory for %d image(s)", n_img);
    }

    /* 1. Patch embedding: im2col (f16-rounded for an F16 kernel), one GEMM. */
    rows_job_t j = {.op = OP_IM2COL, .c = c, .images = images, .n_rows = NP, .y = s.cols};
    run_rows(pool, &j);
    gemm_xwt((int)NP, E, K, s.cols, K, c->patch_w, s.patches, E);
    free(s.cols);
    s.cols = NULL;

    /* 2. Class token first, then the patches; add the position embeddings. */
    j = (rows_job_t){.op = OP_EMBED, .c = c, .n_rows = T, .n = E, .x = s.patches, .y = s.x};
    run_rows(pool, &j);
    free(s.patches);
    s.patches = NULL;

    /* 3. Pre-LayerNorm. */
    if (hp->has_pre_ln) {
        j = (rows_job_t){.op = OP_LAYERNORM, .n_rows = T, .n = E, .x = s.x, .y = s.x,
                         .w = c->pre_ln_w, .b = c->pre_ln_b, .eps = hp->eps};
        run_rows(pool, &j);
    }

    int next_feature = 0;
    for (int il = 0; il < hp->n_layer_run; il++) {
        const clip_layer_t *L = &c->layers[il];

        /* Feature layers below the deepest one: the hidden state after il layers. */
        if (next_feature < hp->n_feature_layers - 1 && hp->feature_layers[next_feature] == il)
            gather_features(c, pool, s.x, n_img, next_feature++, features);

        /* 4a. ln1 (for il > 0 it was fused into the previous layer's last pass) */
        if (il == 0) {
            j = (rows_job_t){.op = OP_LAYERNORM, .n_rows = T, .n = E, .x = s.x, .y = s.xn,
                             .w = L->ln1_w, .b = L->ln1_b, .eps = hp->eps};
            run_rows(pool, &j);
        }

        /* 4b. q, k, v projections (one GEMM when the weights are one block);
         * bias, and q scaled by 1/sqrt(d_head). */
        const size_t EE = (size_t)E * E, EF = (size_t)E * F;
        if (L->qkv_w) {
            gemm_xwt((int)T, 3 * E, E, s.xn, E, L->qkv_w, s.qkv, 3 * E);
        } else if (L->q_h && L->k_h && L->v_h) { /* kept F16: widen the three side by side */
            mat_f32(pool, NULL, L->q_h, EE, s.panel);
            mat_f32(pool, NULL, L->k_h, EE, s.panel + EE);
            mat_f32(pool, NULL, L->v_h, EE, s.panel + 2 * EE);
            gemm_xwt((int)T, 3 * E, E, s.xn, E, s.panel, s.qkv, 3 * E);
        } else {
            gemm_xwt((int)T, E, E, s.xn, E, mat_f32(pool, L->q_w, L->q_h, EE, s.panel), s.qkv + L->qkv_col[0], 3 * E);
            gemm_xwt((int)T, E, E, s.xn, E, mat_f32(pool, L->k_w, L->k_h, EE, s.panel), s.qkv + L->qkv_col[1], 3 * E);
            gemm_xwt((int)T, E, E, s.xn, E, mat_f32(pool, L->v_w, L->v_h, EE, s.panel), s.qkv + L->qkv_col[2], 3 * E);
        }
        j = (rows_job_t){.op = OP_QKV_BIAS, .n_rows = T, .n = E, .y = s.qkv, .layer = L, .scale = kq_scale};
        run_rows(pool, &j);

        /* 4c. Attention per image and head, G heads per softmax pass; the
         * output of head h goes to columns [h * dh, (h+1) * dh) of xn. */
        for (int b = 0; b < n_img; b++) {
            const float *qb = s.qkv + (size_t)b * n_pos * 3 * E;
            float *ob = s.xn + (size_t)b * n_pos * E;
            for (int h0 = 0; h0 < hp->n_head; h0 += G) {
                const int g_n = hp->n_head - h0 < G ? hp->n_head - h0 : G;
                for (int g = 0; g < g_n; g++) {
                    const int col = (h0 + g) * dh;
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n_pos, n_pos, dh, 1.0f,
                                qb + L->qkv_col[0] + col, 3 * E, qb + L->qkv_col[1] + col, 3 * E, 0.0f,
                                s.scores + (size_t)g * n_pos * n_pos, n_pos);
                }
                j = (rows_job_t){.op = OP_SOFTMAX, .n_rows = (long)g_n * n_pos, .n = n_pos, .y = s.scores};
                run_rows(pool, &j);
                for (int g = 0; g < g_n; g++) {
                    const int col = (h0 + g) * dh;
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n_pos, dh, n_pos, 1.0f,
                                s.scores + (size_t)g * n_pos * n_pos, n_pos, qb + L->qkv_col[2] + col, 3 * E,
                                0.0f, ob + col, E);
                }
            }
        }

        /* 4d. Output projection, bias, residual; 4e. ln2 in the same pass. */
        gemm_xwt((int)T, E, E, s.xn, E, mat_f32(pool, L->o_w, L->o_h, EE, s.panel), s.qkv, E);
        j = (rows_job_t){.op = OP_BIAS_RESIDUAL, .n_rows = T, .n = E, .y = s.x, .x = s.qkv, .b = L->o_b,
                         .ln_w = L->ln2_w, .ln_b = L->ln2_b, .ln_y = s.xn, .eps = hp->eps};
        run_rows(pool, &j);

        /* 4f. fc1 (ffn_down), bias, activation through ggml's fp16 table. */
        gemm_xwt((int)T, F, E, s.xn, E, mat_f32(pool, L->fc1_w, L->fc1_h, EF, s.panel), s.ff, F);
        j = (rows_job_t){.op = OP_BIAS_ACT, .n_rows = T, .n = F, .y = s.ff, .b = L->fc1_b,
                         .act = hp->use_gelu ? VIT_ACT_GELU : VIT_ACT_GELU_QUICK, .scale = 1.0f};
        run_rows(pool, &j);

        /* 4g. fc2 (ffn_up), bias, residual; and the next layer's ln1. */
        gemm_xwt((int)T, E, F, s.ff, F, mat_f32(pool, L->fc2_w, L->fc2_h, EF, s.panel), s.qkv, E);
        const clip_layer_t *next = il + 1 < hp->n_layer_run ? &c->layers[il + 1] : NULL;
        j = (rows_job_t){.op = OP_BIAS_RESIDUAL, .n_rows = T, .n = E, .y = s.x, .x = s.qkv, .b = L->fc2_b,
                         .ln_w = next ? next->ln1_w : NULL, .ln_b = next ? next->ln1_b : NULL,
                         .ln_y = s.xn, .eps = hp->eps};
        run_rows(pool, &j);
    }

    /* 5. Post-LayerNorm (only when the file has one). */
    if (hp->has_post_ln) {
        j = (rows_job_t){.op = OP_LAYERNORM, .n_rows = T, .n = E, .x = s.x, .y = s.x,
                         .w = c->post_ln_w, .b = c->post_ln_b, .eps = hp->eps};
        run_rows(pool, &j);
    }

    /* 6. Drop the class token: the patch rows are the (last) feature block. */
    gather_features(c, pool, s.x, n_img, hp->n_feature_layers - 1, features);
    scratch_free(&s);
    return VLM_OK;
}

/* ==== public encode ==================================================== */

int vlm_clip_encode_ptrs(const vlm_clip_t *c, vlm_pool_t *pool, const float *const *images,
                         int n_images, float *features, vlm_error_t *err) {
    if (!c || n_images < 0 || (n_images > 0 && (!images || !features)))
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "vlm_clip_encode: invalid arguments");
    for (int i = 0; i < n_images; i++)
        if (!images[i]) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "vlm_clip_encode: image %d is NULL", i);
    const size_t per_image = (size_t)c->hp.n_patches * c->hp.n_embd_out;
    for (int i0 = 0; i0 < n_images; i0 += c->max_batch) {
        int n = n_images - i0 < c->max_batch ? n_images - i0 : c->max_batch;
        int rc = clip_forward(c, pool, images + i0, n, features + (size_t)i0 * per_image, err);
        if (rc) return rc;
    }
    return VLM_OK;
}

int vlm_clip_encode(const vlm_clip_t *c, vlm_pool_t *pool, const float *images, int n_images,
                    float *features, vlm_error_t *err) {
    if (!c || n_images < 0 || (n_images > 0 && (!images || !features)))
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "vlm_clip_encode: invalid arguments");
    const size_t S = (size_t)c->hp.image_size;
    const float **ptrs = malloc((size_t)(n_images ? n_images : 1) * sizeof *ptrs);
    if (!ptrs) return vlm_error_set(err, VLM_ERR_NOMEM, "vlm_clip_encode: out of memory");
    for (int i = 0; i < n_images; i++) ptrs[i] = images + (size_t)i * S * S * 3;
    int rc = vlm_clip_encode_ptrs(c, pool, ptrs, n_images, features, err);
    free(ptrs);
    return rc;
}

/* ==== the vision/encoder.h view ======================================== */

static int32_t enc_n_embd_out(const void *self) { return ((const vlm_clip_t *)self)->hp.n_embd_out; }

static int enc_n_rows(const void *self, int32_t width, int32_t height, int32_t *n_rows, vlm_error_t *err) {
    const vlm_clip_t *c = self;
    if (width != c->hp.image_size || height != c->hp.image_size)
        return vlm_error_set(err, VLM_ERR_SHAPE, "the CLIP encoder takes %dx%d images, got %dx%d",
                             c->hp.image_size, c->hp.image_size, width, height);
    *n_rows = c->hp.n_patches;
    return VLM_OK;
}

static int enc_encode(const void *self, vlm_pool_t *pool, const vlm_vision_input_t *images, int n_images,
                      float *features, vlm_error_t *err) {
    const vlm_clip_t *c = self;
    if (n_images < 0 || (n_images > 0 && !images))
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "vlm_encoder_encode: invalid arguments");
    const float **ptrs = malloc((size_t)(n_images ? n_images : 1) * sizeof *ptrs);
    if (!ptrs) return vlm_error_set(err, VLM_ERR_NOMEM, "vlm_encoder_encode: out of memory");
    int rc = VLM_OK;
    for (int i = 0; i < n_images && rc == VLM_OK; i++) {
        int32_t n_rows;
        rc = enc_n_rows(self, images[i].width, images[i].height, &n_rows, err);
        ptrs[i] = images[i].pixels;
    }
    if (rc == VLM_OK) rc = vlm_clip_encode_ptrs(c, pool, ptrs, n_images, features, err);
    free(ptrs);
    return rc;
}

static const vlm_encoder_ops_t clip_encoder_ops = {
    .arch = VLM_VISION_ARCH_CLIP,
    .n_embd_out = enc_n_embd_out,
    .n_rows = enc_n_rows,
    .encode = enc_encode,
};

vlm_encoder_t vlm_clip_encoder(const vlm_clip_t *c) {
    vlm_encoder_t e = {&clip_encoder_ops, c};
    return e;
}
