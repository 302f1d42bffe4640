/* projector/projector.c - the LLaVA MLP projector (see projector.h).
 *
 * Layout: features x [n_rows][n_in]; mm.0.weight [n_hidden][n_in] (ggml ne
 * {n_in, n_hidden}); mm.2.weight [n_out][n_hidden]; each product is
 * y = x W^T through cblas_sgemm(RowMajor, NoTrans, Trans). Rows are
 * processed in chunks so the hidden buffer stays bounded for large batches.
 */
#include "projector/projector.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "vision/vit_ops.h"

struct vlm_projector {
    vlm_projector_type_t type;
    int32_t n_in, n_hidden, n_out;
    const float *w0, *b0;   /* mm.0: [n_hidden][n_in], [n_hidden] */
    const float *w2, *b2;   /* mm.2: [n_out][n_hidden], [n_out] */
    float *arena;           /* f32 copies of non-F32 weights, 64-byte aligned */
    size_t extra_bytes;
};

#define PROJECTOR_CHUNK_ROWS 2048

static const char *const type_names[VLM_PROJECTOR_COUNT] = {
    [VLM_PROJECTOR_LLAVA_MLP] = "mlp",
};

int vlm_projector_type_parse(const char *s, size_t len, vlm_projector_type_t *out, vlm_error_t *err) {
    for (int t = 0; t < VLM_PROJECTOR_COUNT; t++)
        if (strlen(type_names[t]) == len && memcmp(type_names[t], s, len) == 0) {
            *out = (vlm_projector_type_t)t;
            return VLM_OK;
        }
    return vlm_error_set(err, VLM_ERR_UNSUPPORTED,
                         "clip.projector_type \"%.*s\" is not supported (supported: \"mlp\", LLaVA-1.5)",
                         (int)(len > 64 ? 64 : len), s);
}

const char *vlm_projector_type_name(vlm_projector_type_t type) {
    return (unsigned)type < VLM_PROJECTOR_COUNT ? type_names[type] : "unknown";
}

int vlm_projector_load(const vlm_gguf_t *g, int32_t n_embd_vit, int32_t n_embd_text,
                       vlm_projector_t **out, vlm_error_t *err) {
    VLM_ASSERT(g && out);
    *out = NULL;
    const char *path = vlm_gguf_path(g);
    if (n_embd_vit <= 0 || n_embd_text <= 0)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "vlm_projector_load: widths must be positive (got %d, %d)",
                             n_embd_vit, n_embd_text);
    vit_ops_init();

    vlm_projector_type_t type = VLM_PROJECTOR_LLAVA_MLP;
    int rc;
    if (vlm_gguf_find_kv(g, "clip.projector_type")) {
        const char *s;
        size_t len;
        if ((rc = vlm_gguf_get_str(g, "clip.projector_type", &s, &len, err))) return rc;
        vlm_error_t e2;
        if ((rc = vlm_projector_type_parse(s, len, &type, &e2)))
            return vlm_error_set(err, rc, "%s: %s", path, e2.msg);
    }
    /* llama.cpp turns "mlp" with an mm.3 layer into MLP_NORM (Yi-VL). */
    if (vlm_gguf_find_tensor(g, "mm.3.weight"))
        return vlm_error_set(err, VLM_ERR_UNSUPPORTED,
                             "%s: mm.3.weight present: the \"mlp_norm\" projector (Yi-VL) is not supported", path);

    const vlm_gguf_tensor_t *t0w, *t0b, *t2w, *t2b;
    int64_t ne[2] = {-1, -1};
    if ((rc = vlm_gguf_expect_tensor(g, "mm.0.weight", 2, ne, VIT_WEIGHT_TYPES, &t0w, err))) return rc;
    if (t0w->ne[0] != n_embd_vit)
        return vlm_error_set(err, VLM_ERR_SHAPE,
                             "%s: mm.0.weight takes %lld-wide features but the vision encoder produces %d",
                             path, (long long)t0w->ne[0], n_embd_vit);
    const int64_t n_hidden = t0w->ne[1];
    ne[0] = n_hidden;
    if ((rc = vlm_gguf_expect_tensor(g, "mm.0.bias", 1, ne, VIT_WEIGHT_TYPES, &t0b, err))) return rc;
    ne[0] = n_hidden, ne[1] = -1;
    if ((rc = vlm_gguf_expect_tensor(g, "mm.2.weight", 2, ne, VIT_WEIGHT_TYPES, &t2w, err))) return rc;
    if (t2w->ne[1] != n_embd_text)
        return vlm_error_set(err, VLM_ERR_SHAPE, "%s: mmproj projects to %lld but the text model's n_embd is %d",
                             path, (long long)t2w->ne[1], n_embd_text);
    ne[0] = n_embd_text;
    if ((rc = vlm_gguf_expect_tensor(g, "mm.2.bias", 1, ne, VIT_WEIGHT_TYPES, &t2b, err))) return rc;
    if (n_hidden > INT32_MAX)
        return vlm_error_set(err, VLM_ERR_SHAPE, "%s: mm.0.weight is too large", path);

    vlm_projector_t *p = calloc(1, sizeof *p);
    if (!p) return vlm_error_set(err, VLM_ERR_NOMEM, "vlm_projector_load: out of memory");
    p->type = type;
    p->n_in = n_embd_vit;
    p->n_hidden = (int32_t)n_hidden;
    p->n_out = n_embd_text;
    const vlm_gguf_tensor_t *ts[4] = {t0w, t0b, t2w, t2b};
    const float **dst[4] = {&p->w0, &p->b0, &p->w2, &p->b2};
    size_t n_floats = 0;
    for (int i = 0; i < 4; i++) n_floats += (vit_tensor_copy_floats(ts[i]) + 15) & ~(size_t)15;
    if (n_floats) {
        p->arena = aligned_alloc(64, n_floats * sizeof(float));
        if (!p->arena) {
            free(p);
            return vlm_error_set(err, VLM_ERR_NOMEM, "vlm_projector_load: out of memory widening the weights");
        }
        p->extra_bytes = n_floats * sizeof(float);
    }
    float *cursor = p->arena;
    for (int i = 0; i < 4; i++) *dst[i] = vit_tensor_f32(ts[i], &cursor);
    *out = p;
    vlm_error_clear(err);
    return VLM_OK;
}

void vlm_projector_destroy(vlm_projector_t **self_p) {
    if (!self_p || !*self_p) return;
    free((*self_p)->arena);
    free(*self_p);
    *self_p = NULL;
}

vlm_projector_type_t vlm_projector_type(const vlm_projector_t *p) { return p->type; }
int32_t vlm_projector_n_in(const vlm_projector_t *p) { return p->n_in; }
int32_t vlm_projector_n_out(const vlm_projector_t *p) { return p->n_out; }
size_t vlm_projector_extra_bytes(const vlm_projector_t *p) { return p->extra_bytes; }

double vlm_projector_flops_per_row(const vlm_projector_t *p) {
    return 2.0 * ((double)p->n_in * p->n_hidden + (double)p->n_hidden * p->n_out);
}

/* Bias + activation on rows, split over the pool. */
typedef struct bias_act_job {
    float *y;          /* [n_rows][n] */
    const float *b;    /* [n] */
    long n_rows;
    int n;
    vit_act_t act;
} bias_act_job_t;

static void bias_act_worker(void *arg, int ith, int nth) {
    const bias_act_job_t *j = arg;
    long lo, hi;
    vlm_pool_range(j->n_rows, ith, nth, &lo, &hi);
    if (lo < hi) vit_bias_act_rows(j->y + (size_t)lo * j->n, j->b, hi - lo, j->n, j->act, 1.0f);
}

int vlm_projector_apply(const vlm_projector_t *p, vlm_pool_t *pool, const float *features,
                        int32_t n_rows, float *out, vlm_error_t *err) {
    if (!p || n_rows < 0 || (n_rows > 0 && (!features || !out)))
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "vlm_projector_apply: invalid arguments");
    if (n_rows == 0) return VLM_OK;
    const int32_t chunk = n_rows < PROJECTOR_CHUNK_ROWS ? n_rows : PROJECTOR_CHUNK_ROWS;
    float *hidden = aligned_alloc(64, (((size_t)chunk * p->n_hidden * sizeof(float)) + 63) & ~(size_t)63);
    if (!hidden) return vlm_error_set(err, VLM_ERR_NOMEM, "vlm_projector_apply: out of memory");

    for (int32_t r0 = 0; r0 < n_rows; r0 += chunk) {
        const int32_t m = n_rows - r0 < chunk ? n_rows - r0 : chunk;
        const float *x = features + (size_t)r0 * p->n_in;
        float *y = out + (size_t)r0 * p->n_out;
        /* hidden = gelu(x mm.0^T + b0) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, p->n_hidden, p->n_in, 1.0f, x, p->n_in,
                    p->w0, p->n_in, 0.0f, hidden, p->n_hidden);
        bias_act_job_t j = {hidden, p->b0, m, p->n_hidden, VIT_ACT_GELU};
        vlm_pool_run(pool, bias_act_worker, &j);
        /* out = hidden mm.2^T + b2 */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, p->n_out, p->n_hidden, 1.0f, hidden,
                    p->n_hidden, p->w2, p->n_hidden, 0.0f, y, p->n_out);
        j = (bias_act_job_t){y, p->b2, m, p->n_out, VIT_ACT_NONE};
        vlm_pool_run(pool, bias_act_worker, &j);
    }
    free(hidden);
    return VLM_OK;
}
