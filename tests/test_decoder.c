/* tests/test_decoder.c - the LLaMA decoder against llama.cpp's golden outputs.
 *
 * The golden cases (tests/data/golden/<case>/) give token ids, image
 * embedding rows and llama.cpp's logits, so no tokenizer or vision encoder
 * is involved:
 *  - micro-f32: hidden states after every sub-layer, all-position and
 *    last-position logits, step-0 logits of the 15 image prompts, and the
 *    exact greedy tokens of all 16 checks;
 *  - the quantized cases: logits within the README's bounds and top-1
 *    agreement under teacher forcing wherever the golden margin is larger
 *    than twice the measured logit error;
 *  - continuous batching (interleaved sequences, slot reuse, rewinding,
 *    prefix copies, chunking) against each sequence run alone; scalar and
 *    AVX-512 kernels bit for bit; the F32 cache; error paths, with small
 *    models written in memory by the GGUF writer.
 * Measured differences are printed. The decoder's own numerics are exact:
 * with a matmul that sums F32 products in ggml's order, micro-f32 matches
 * llama.cpp to the bit; the bounds below leave room for vlm_matmul's order.
 */
#include <jansson.h>
#include <math.h>
#include <stdint.h>

#include "core/dtype.h"
#include "core/gguf.h"
#include "core/gguf_write.h"
#include "core/kernels.h"
#include "core/pool.h"
#include "harness.h"
#include "text/llama.h"
#include "text/llama_impl.h"

/* ==== Golden case helpers ============================================== */

typedef struct gcase {
    char dir[1024];
    json_t *root;
    vlm_gguf_t *g;
    vlm_llama_t *m;
    int32_t n_vocab, n_embd;
} gcase_t;

static void case_close(gcase_t *c) {
    vlm_llama_destroy(&c->m);
    vlm_gguf_destroy(&c->g);
    if (c->root) json_decref(c->root);
    memset(c, 0, sizeof *c);
}

/* Opens tests/data/golden/<name>: case.json, text.gguf and the model. */
static int case_open(gcase_t *c, const char *name) {
    memset(c, 0, sizeof *c);
    snprintf(c->dir, sizeof c->dir, "%s/golden/%s", VLM_TEST_DATA, name);
    char path[1200];
    snprintf(path, sizeof path, "%s/case.json", c->dir);
    json_error_t jerr;
    c->root = json_load_file(path, 0, &jerr);
    if (!c->root) {
        fprintf(stderr, "  %s: %s\n", path, jerr.text);
        return -1;
    }
    snprintf(path, sizeof path, "%s/text.gguf", c->dir);
    vlm_error_t err = {0};
    if (vlm_gguf_open(path, &c->g, &err) || vlm_llama_load(c->g, NULL, &c->m, &err)) {
        fprintf(stderr, "  %s: %s\n", path, err.msg);
        case_close(c);
        return -1;
    }
    c->n_vocab = vlm_llama_hparams(c->m)->n_vocab;
    c->n_embd = vlm_llama_hparams(c->m)->n_embd;
    return 0;
}

/* Reads exactly n floats from <case dir>/<file>; NULL otherwise. */
static float *case_read_f32(const gcase_t *c, const char *file, size_t n) {
    char path[1200];
    snprintf(path, sizeof path, "%s/%s", c->dir, file);
    size_t size = 0;
    float *v = harness_read_file(path, &size);
    if (v && size != n * sizeof(float)) {
        free(v);
        return NULL;
    }
    return v;
}

/* Copies a JSON array of integers; returns the count (ids malloc'd). */
static int32_t json_ids(json_t *arr, int32_t **ids) {
    int32_t n = (int32_t)json_array_size(arr);
    *ids = malloc((size_t)(n > 0 ? n : 1) * sizeof(int32_t));
    for (int32_t i = 0; i < n; i++) (*ids)[i] = (int32_t)json_integer_value(json_array_get(arr, (size_t)i));
    return n;
}

static int32_t argmax(const float *v, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* One prompt laid out as llava-cli evaluates it: system tokens, image rows,
 * user tokens (image and user may be absent), plus the golden answer. */
typedef struct prompt {
    int32_t *sys, *user, *expected;
    int32_t n_sys, n_user, n_img, n_expected;
    float *img;                  /* [n_img][n_embd] reference image embeddings */
    json_t *check;               /* the JSON check object (borrowed) */
    char id[32];
} prompt_t;

static void prompt_free(prompt_t *p) {
    free(p->sys);
    free(p->user);
    free(p->expected);
    free(p->img);
    memset(p, 0, sizeof *p);
}

/* Generation check gi, or the text-only check when gi < 0. */
static int prompt_load(const gcase_t *c, int gi, prompt_t *p) {
    memset(p, 0, sizeof *p);
    if (gi < 0) {
        p->check = json_object_get(c->root, "text_only_check");
        p->n_sys = json_ids(json_object_get(p->check, "prompt_ids"), &p->sys);
        p->user = malloc(sizeof(int32_t)); /* no user part */
        p->n_user = 0;
        snprintf(p->id, sizeof p->id, "text");
    } else {
        p->check = json_array_get(json_object_get(c->root, "generation_checks"), (size_t)gi);
        p->n_sys = json_ids(json_object_get(p->check, "system_ids"), &p->sys);
        p->n_user = json_ids(json_object_get(p->check, "user_ids"), &p->user);
        p->n_img = (int32_t)json_integer_value(json_object_get(p->check, "n_image_tokens"));
        snprintf(p->id, sizeof p->id, "%s", json_string_value(json_object_get(p->check, "id")));
        const char *image = json_string_value(json_object_get(p->check, "image"));
        char file[256];
        snprintf(file, sizeof file, "%.*s.emb.f32", (int)(strrchr(image, '.') - image), image);
        p->img = case_read_f32(c, file, (size_t)p->n_img * c->n_embd);
        if (!p->img) return -1;
    }
    p->n_expected = json_ids(json_object_get(p->check, "expected_ids"), &p->expected);
    return 0;
}

static int32_t prompt_len(const prompt_t *p) { return p->n_sys + p->n_img + p->n_user; }

/* Row i of the prompt: its token, or VLM_BATCH_EMBD_ROW with the row in embd. */
static int32_t prompt_row(const prompt_t *p, int32_t i, int32_t n_embd, float *embd) {
    if (i < p->n_sys) return p->sys[i];
    i -= p->n_sys;
    if (i < p->n_img) {
        memcpy(embd, p->img + (size_t)i * n_embd, (size_t)n_embd * sizeof(float));
        return VLM_BATCH_EMBD_ROW;
    }
    return p->user[i - p->n_img];
}

/* Forwards rows of one sequence at positions pos0..pos0+n-1 (tokens, or
 * embedding rows when tokens is NULL), with the last row's logits. */
static int forward_rows(vlm_decoder_t *d, int32_t seq, int32_t pos0, const int32_t *tokens, const float *embd,
                        int32_t n, float *logits_last) {
    int32_t *pos = malloc((size_t)n * sizeof(int32_t)), *sq = malloc((size_t)n * sizeof(int32_t));
    for (int32_t i = 0; i < n; i++) {
        pos[i] = pos0 + i;
        sq[i] = seq;
    }
    int32_t last = n - 1;
    vlm_batch_t b = {.n = n, .tokens = tokens, .embd = embd, .pos = pos, .seq = sq,
                     .n_logits = logits_last ? 1 : 0, .logits_rows = &last};
    vlm_error_t err = {0};
    int rc = vlm_decoder_forward(d, &b, logits_last, &err);
    if (rc) fprintf(stderr, "  forward: %s\n", err.msg);
    free(pos);
    free(sq);
    return rc;
}

/* Evaluates the prompt as llava-cli does (one call per segment) into seq,
 * leaving the last position's logits in logits. */
static int prefill_llava(vlm_decoder_t *d, int32_t seq, const prompt_t *p, float *logits) {
    int rc = forward_rows(d, seq, 0, p->sys, NULL, p->n_sys, p->n_img + p->n_user ? NULL : logits);
    if (!rc && p->n_img) rc = forward_rows(d, seq, p->n_sys, NULL, p->img, p->n_img, p->n_user ? NULL : logits);
    if (!rc && p->n_user) rc = forward_rows(d, seq, p->n_sys + p->n_img, p->user, NULL, p->n_user, logits);
    return rc;
}

/* Holds a model's cache and decoder. */
typedef struct engine {
    vlm_kv_cache_t kv;
    vlm_decoder_t *d;
} engine_t;

static int engine_init(engine_t *e, const vlm_llama_t *m, vlm_pool_t *pool, int n_seq, int n_ctx, uint32_t type,
                       int32_t n_batch) {
    vlm_error_t err = {0};
    memset(e, 0, sizeof *e);
    if (vlm_kv_cache_init(&e->kv, m, n_seq, n_ctx, type, &err) ||
        vlm_decoder_new(m, &e->kv, pool, n_batch, &e->d, &err)) {
        fprintf(stderr, "  engine: %s\n", err.msg);
        vlm_kv_cache_deinit(&e->kv);
        return -1;
    }
    return 0;
}

static void engine_deinit(engine_t *e) {
    vlm_decoder_destroy(&e->d);
    vlm_kv_cache_deinit(&e->kv);
}

static vlm_pool_t *g_pool;

/* ==== micro-f32: hidden states and logits ============================== */

typedef struct trace_store {
    char names[16][32];
    float *data[16];
    int32_t rows[16], cols[16];
    int n;
} trace_store_t;

static void trace_collect(void *user, const char *name, const float *data, int32_t n_rows, int32_t n_cols) {
    trace_store_t *ts = user;
    if (ts->n >= 16) return;
    snprintf(ts->names[ts->n], sizeof ts->names[0], "%s", name);
    ts->data[ts->n] = malloc((size_t)n_rows * n_cols * sizeof(float));
    memcpy(ts->data[ts->n], data, (size_t)n_rows * n_cols * sizeof(float));
    ts->rows[ts->n] = n_rows;
    ts->cols[ts->n] = n_cols;
    ts->n++;
}

static void test_micro_hidden_and_logits(void) {
    gcase_t c;
    REQUIRE(case_open(&c, "micro-f32") == 0);
    prompt_t p;
    REQUIRE(prompt_load(&c, -1, &p) == 0);
    const int32_t n = p.n_sys, nv = c.n_vocab;
    engine_t e;
    REQUIRE(engine_init(&e, c.m, g_pool, 1, 256, VLM_DTYPE_F16, 512) == 0);

    /* All positions with logits, tracing every named tensor. */
    trace_store_t ts = {0};
    vlm_decoder_set_trace(e.d, trace_collect, &ts);
    int32_t *pos = malloc((size_t)n * sizeof(int32_t)), *seq = calloc((size_t)n, sizeof(int32_t)),
            *rows = malloc((size_t)n * sizeof(int32_t));
    for (int32_t i = 0; i < n; i++) pos[i] = rows[i] = i;
    float *logits = malloc((size_t)n * nv * sizeof(float));
    vlm_batch_t b = {.n = n, .tokens = p.sys, .pos = pos, .seq = seq, .n_logits = n, .logits_rows = rows};
    vlm_error_t err = {0};
    CHECK(vlm_decoder_forward(e.d, &b, logits, &err) == 0, "%s", err.msg);
    vlm_decoder_set_trace(e.d, NULL, NULL);

    json_t *hs = json_object_get(json_object_get(c.root, "text_only_check"), "hidden_states");
    const char *key;
    json_t *val;
    int n_found = 0;
    json_object_foreach(hs, key, val) {
        const char *file = json_string_value(json_object_get(val, "file"));
        float *ref = case_read_f32(&c, file, (size_t)n * c.n_embd);
        CHECK(ref != NULL, "%s", file);
        for (int t = 0; ref && t < ts.n; t++) {
            if (strcmp(ts.names[t], key) != 0) continue;
            n_found++;
            CHECK(ts.rows[t] == n && ts.cols[t] == c.n_embd, "%s: %d x %d", key, ts.rows[t], ts.cols[t]);
            const double diff = harness_max_abs_diff(ts.data[t], ref, (size_t)n * c.n_embd);
            fprintf(stderr, "  micro-f32 hidden %-12s max abs diff %.3g\n", key, diff);
            CHECK(diff < 1e-4, "%s: %g", key, diff);
        }
        free(ref);
    }
    CHECK(n_found == 8, "%d of 8 hidden states traced", n_found);

    float *ref_all = case_read_f32(&c, "textonly.logits_all.f32", (size_t)n * nv);
    REQUIRE(ref_all != NULL);
    const double d_all = harness_max_abs_diff(logits, ref_all, (size_t)n * nv);
    fprintf(stderr, "  micro-f32 text-only logits_all max abs diff %.3g\n", d_all);
    CHECK(d_all < 1e-3, "%g", d_all);

    /* Only the last position, as generation computes it. */
    vlm_kv_cache_seq_clear(&e.kv, 0);
    float *last = malloc((size_t)nv * sizeof(float));
    CHECK(forward_rows(e.d, 0, 0, p.sys, NULL, n, last) == 0);
    float *ref_last = case_read_f32(&c, "textonly.logits_last.f32", (size_t)nv);
    REQUIRE(ref_last != NULL);
    const double d_last = harness_max_abs_diff(last, ref_last, (size_t)nv);
    fprintf(stderr, "  micro-f32 text-only logits_last max abs diff %.3g\n", d_last);
    CHECK(d_last < 1e-4, "%g", d_last);

    for (int t = 0; t < ts.n; t++) free(ts.data[t]);
    free(ref_all);
    free(ref_last);
    free(last);
    free(logits);
    free(pos);
    free(seq);
    free(rows);
    engine_deinit(&e);
    prompt_free(&p);
    case_close(&c);
}

/* ==== Golden generation checks ========================================= */

typedef struct run_stats {
    double step0_max;            /* max over checks of the step-0 max abs logit diff */
    double top5_max;             /* max logit error on the golden top-5 ids, all steps */
    int n_checks, n_free_equal;  /* free-running greedy sequences equal */
    int n_steps, n_agree;        /* teacher-forced top-1 agreement, all steps */
    int n_confident, n_confident_agree; /* ... on steps with margin > 2 * threshold */
    int n_text_steps_equal;
} run_stats_t;

/* Runs check gi (text-only when -1): prefill, then greedy steps either free
 * (own tokens fed back) or teacher-forced (the golden tokens fed back). */
static void run_check(const gcase_t *c, engine_t *e, int gi, bool teacher, double threshold, run_stats_t *st,
                      bool require_exact) {
    prompt_t p;
    if (prompt_load(c, gi, &p)) {
        CHECK(0, "check %d: cannot load its data", gi);
        return;
    }
    const int32_t nv = c->n_vocab;
    float *logits = malloc((size_t)nv * sizeof(float));
    vlm_kv_cache_seq_clear(&e->kv, 0);
    if (prefill_llava(e->d, 0, &p, logits)) {
        CHECK(0, "%s: prefill failed", p.id);
        goto done;
    }
    /* Step-0 logits against the golden full vector. */
    const char *l0 = json_string_value(json_object_get(p.check, gi < 0 ? "logits_last_prompt_f32" : "logits_step0_f32"));
    float *ref0 = case_read_f32(c, l0, (size_t)nv);
    CHECK(ref0 != NULL, "%s", l0);
    if (ref0) {
        const double d0 = harness_max_abs_diff(logits, ref0, (size_t)nv);
        if (d0 > st->step0_max) st->step0_max = d0;
        free(ref0);
    }
    json_t *steps = json_object_get(p.check, "steps");
    int32_t pos = prompt_len(&p), n_equal = 0;
    bool diverged = false;
    for (int32_t i = 0; i < p.n_expected; i++) {
        const int32_t got = argmax(logits, nv), want = p.expected[i];
        json_t *step = json_array_get(steps, (size_t)i);
        const double margin = json_real_value(json_object_get(step, "margin"));
        json_t *top5 = json_object_get(step, "top5");
        if (teacher || !diverged) {
            for (size_t k = 0; k < json_array_size(top5); k++) {
                json_t *pair = json_array_get(top5, k);
                const int32_t id = (int32_t)json_integer_value(json_array_get(pair, 0));
                const double ref = json_number_value(json_array_get(pair, 1));
                const double dk = fabs((double)logits[id] - ref);
                if (dk > st->top5_max) st->top5_max = dk;
            }
        }
        if (teacher) {
            st->n_steps++;
            st->n_agree += got == want;
            if (margin > 2 * threshold) {
                st->n_confident++;
                st->n_confident_agree += got == want;
                CHECK(got == want, "%s step %d: got %d, want %d (margin %.3f > 2 x %.3f)", p.id, i, got, want, margin,
                      threshold);
            }
        } else if (!diverged) {
            if (got == want) n_equal++;
            else diverged = true;
        }
        const int32_t next = teacher ? want : got;
        if (i + 1 == p.n_expected || (!teacher && next == 2)) break; /* EOS ends generation */
        if (forward_rows(e->d, 0, pos++, &next, NULL, 1, logits)) {
            CHECK(0, "%s: decode step %d failed", p.id, i);
            break;
        }
    }
    if (!teacher) {
        st->n_free_equal += n_equal == p.n_expected;
        if (gi < 0) st->n_text_steps_equal = n_equal;
        if (require_exact)
            CHECK(n_equal == p.n_expected, "%s: greedy tokens equal for %d of %d steps", p.id, n_equal, p.n_expected);
    }
    st->n_checks++;
done:
    free(logits);
    prompt_free(&p);
}

static void test_micro_greedy_exact(void) {
    gcase_t c;
    REQUIRE(case_open(&c, "micro-f32") == 0);
    engine_t e;
    REQUIRE(engine_init(&e, c.m, g_pool, 1, 512, VLM_DTYPE_F16, 512) == 0);
    run_stats_t st = {0};
    const int n_gen = (int)json_array_size(json_object_get(c.root, "generation_checks"));
    for (int gi = -1; gi < n_gen; gi++) run_check(&c, &e, gi, false, 0, &st, true);
    fprintf(stderr, "  micro-f32: free-running greedy equal %d/%d, text-only steps %d/24, "
            "step-0 max abs diff %.3g, top-5 logit error %.3g\n",
            st.n_free_equal, st.n_checks, st.n_text_steps_equal, st.step0_max, st.top5_max);
    CHECK(st.n_checks == n_gen + 1 && st.n_free_equal == st.n_checks);
    CHECK(st.step0_max < 0.02, "%g", st.step0_max);
    engine_deinit(&e);
    case_close(&c);
}

static void quantized_case(const char *name) {
    gcase_t c;
    REQUIRE(case_open(&c, name) == 0);
    engine_t e;
    REQUIRE(engine_init(&e, c.m, g_pool, 1, 512, VLM_DTYPE_F16, 512) == 0);
    const int n_gen = (int)json_array_size(json_object_get(c.root, "generation_checks"));

    /* Text-only logits at the last prompt position. */
    prompt_t p;
    REQUIRE(prompt_load(&c, -1, &p) == 0);
    float *last = malloc((size_t)c.n_vocab * sizeof(float));
    float *ref_last = case_read_f32(&c, "textonly.logits_last.f32", (size_t)c.n_vocab);
    REQUIRE(ref_last != NULL && forward_rows(e.d, 0, 0, p.sys, NULL, p.n_sys, last) == 0);
    const double d_text = harness_max_abs_diff(last, ref_last, (size_t)c.n_vocab);
    /* README: about 0.3 once activations are quantized like ggml; the
     * independent ggml-emulating implementation measured up to 0.54. */
    const double indep = json_number_value(json_object_get(
        json_object_get(json_object_get(json_object_get(c.root, "independent_reimplementation"), "text_only"),
                        "ggml_emulating"),
        "logits_last_max_abs_diff"));
    const double text_bound = fmax(0.3, 1.1 * indep);
    CHECK(d_text < text_bound, "%s text-only logits_last: %g (bound %g)", name, d_text, text_bound);
    prompt_free(&p);

    /* Free-running first: it measures the step-0 error used as threshold. */
    run_stats_t fr = {0};
    for (int gi = -1; gi < n_gen; gi++) run_check(&c, &e, gi, false, 0, &fr, false);
    const double threshold = fr.step0_max > d_text ? fr.step0_max : d_text;
    run_stats_t tf = {0};
    for (int gi = -1; gi < n_gen; gi++) run_check(&c, &e, gi, true, threshold, &tf, false);
    fprintf(stderr,
            "  %s: text-only logits_last max abs diff %.3g; step-0 max abs diff %.3g; "
            "free-running greedy equal %d/%d (text-only steps %d/24); teacher-forced top-1 %d/%d, "
            "%d/%d where margin > %.3g; top-5 logit error max %.3g\n",
            name, d_text, fr.step0_max, fr.n_free_equal, fr.n_checks, fr.n_text_steps_equal, tf.n_agree, tf.n_steps,
            tf.n_confident_agree, tf.n_confident, 2 * threshold, tf.top5_max);
    CHECK(fr.step0_max < 1.0, "%s step-0: %g", name, fr.step0_max);
    CHECK(tf.n_steps > 300);
    free(last);
    free(ref_last);
    engine_deinit(&e);
    case_close(&c);
}

static void test_small_q8_0(void) { quantized_case("small-q8_0"); }
static void test_small_q4_0(void) { quantized_case("small-q4_0"); }
static void test_small_q4_k_m(void) { quantized_case("small-q4_k_m"); }

/* ==== Continuous batching ============================================== */

#define CB_SEQS 3
#define CB_STEPS 6

/* Reference: each prompt alone (one forward for its whole prompt, then
 * CB_STEPS teacher-forced decode steps); logits [1 + CB_STEPS][n_vocab]. */
static int run_alone(const gcase_t *c, const prompt_t *p, uint32_t kv_type, float *out) {
    engine_t e;
    if (engine_init(&e, c->m, g_pool, 1, 256, kv_type, 512)) return -1;
    const int32_t n = prompt_len(p), nv = c->n_vocab;
    int32_t *tok = malloc((size_t)n * sizeof(int32_t));
    float *embd = calloc((size_t)n * c->n_embd, sizeof(float));
    for (int32_t i = 0; i < n; i++) tok[i] = prompt_row(p, i, c->n_embd, embd + (size_t)i * c->n_embd);
    int rc = forward_rows(e.d, 0, 0, tok, embd, n, out);
    for (int32_t s = 0; !rc && s < CB_STEPS; s++)
        rc = forward_rows(e.d, 0, n + s, &p->expected[s], NULL, 1, out + (size_t)(s + 1) * nv);
    free(tok);
    free(embd);
    engine_deinit(&e);
    return rc;
}

static void continuous_batching(const char *name, uint32_t kv_type, double tol) {
    gcase_t c;
    REQUIRE(case_open(&c, name) == 0);
    const int32_t nv = c.n_vocab, ne = c.n_embd;
    const int gis[CB_SEQS] = {0, -1, 5};
    prompt_t p[CB_SEQS];
    float *alone[CB_SEQS];
    for (int s = 0; s < CB_SEQS; s++) {
        REQUIRE(prompt_load(&c, gis[s], &p[s]) == 0);
        alone[s] = malloc((size_t)(1 + CB_STEPS) * nv * sizeof(float));
        REQUIRE(run_alone(&c, &p[s], kv_type, alone[s]) == 0);
    }

    /* All prompts in one batch, rows interleaved round-robin (mixed token and
     * embedding rows), into slots 0..2 of a 4-slot cache. */
    engine_t e;
    REQUIRE(engine_init(&e, c.m, g_pool, CB_SEQS + 1, 256, kv_type, 512) == 0);
    int32_t total = 0;
    for (int s = 0; s < CB_SEQS; s++) total += prompt_len(&p[s]);
    int32_t *tok = malloc((size_t)total * sizeof(int32_t)), *pos = malloc((size_t)total * sizeof(int32_t)),
            *seq = malloc((size_t)total * sizeof(int32_t)), last_row[CB_SEQS];
    float *embd = calloc((size_t)total * ne, sizeof(float));
    int32_t next[CB_SEQS] = {0}, n = 0;
    while (n < total) {
        for (int s = 0; s < CB_SEQS; s++) {
            if (next[s] >= prompt_len(&p[s])) continue;
            tok[n] = prompt_row(&p[s], next[s], ne, embd + (size_t)n * ne);
            pos[n] = next[s]++;
            seq[n] = s;
            if (next[s] == prompt_len(&p[s])) last_row[s] = n;
            n++;
        }
    }
    float *logits = malloc((size_t)CB_SEQS * nv * sizeof(float));
    vlm_batch_t b = {.n = n, .tokens = tok, .embd = embd, .pos = pos, .seq = seq, .n_logits = CB_SEQS,
                     .logits_rows = last_row};
    vlm_error_t err = {0};
    REQUIRE(vlm_decoder_forward(e.d, &b, logits, &err) == 0, "%s", err.msg);
    double dmax = 0;
    for (int s = 0; s < CB_SEQS; s++) {
        double dd = harness_max_abs_diff(logits + (size_t)s * nv, alone[s], (size_t)nv);
        dmax = dd > dmax ? dd : dmax;
        CHECK(vlm_kv_cache_seq_len(&e.kv, s) == prompt_len(&p[s]));
    }

    /* Decode steps: one row per sequence per forward. */
    for (int step = 0; step < CB_STEPS; step++) {
        int32_t t[CB_SEQS], ps[CB_SEQS], sq[CB_SEQS], rows[CB_SEQS];
        for (int s = 0; s < CB_SEQS; s++) {
            sq[s] = CB_SEQS - 1 - s; /* rows in a different order than the slots */
            t[s] = p[sq[s]].expected[step];
            ps[s] = prompt_len(&p[sq[s]]) + step;
            rows[s] = s;
        }
        vlm_batch_t bs = {.n = CB_SEQS, .tokens = t, .pos = ps, .seq = sq, .n_logits = CB_SEQS, .logits_rows = rows};
        REQUIRE(vlm_decoder_forward(e.d, &bs, logits, &err) == 0, "%s", err.msg);
        for (int s = 0; s < CB_SEQS; s++) {
            double dd = harness_max_abs_diff(logits + (size_t)s * nv, alone[sq[s]] + (size_t)(step + 1) * nv,
                                             (size_t)nv);
            dmax = dd > dmax ? dd : dmax;
        }
    }
    fprintf(stderr, "  %s %s cache: %d sequences batched vs alone, max abs logit diff %.3g\n", name,
            kv_type == VLM_DTYPE_F16 ? "F16" : "F32", CB_SEQS, dmax);
    CHECK(dmax <= tol, "%g", dmax);

    /* Slot reuse: forget sequence 1 and run prompt 2 in its slot while
     * sequence 0 decodes in the same batch. */
    vlm_kv_cache_seq_clear(&e.kv, 1);
    CHECK(vlm_kv_cache_seq_len(&e.kv, 1) == 0);
    {
        const int32_t n2 = prompt_len(&p[2]);
        int32_t *t2 = malloc((size_t)(n2 + 1) * sizeof(int32_t)), *p2 = malloc((size_t)(n2 + 1) * sizeof(int32_t)),
                *s2 = malloc((size_t)(n2 + 1) * sizeof(int32_t)), rows2[2] = {n2 - 1, n2};
        float *e2 = calloc((size_t)(n2 + 1) * ne, sizeof(float));
        for (int32_t i = 0; i < n2; i++) {
            t2[i] = prompt_row(&p[2], i, ne, e2 + (size_t)i * ne);
            p2[i] = i;
            s2[i] = 1;
        }
        t2[n2] = p[0].expected[CB_STEPS];
        p2[n2] = prompt_len(&p[0]) + CB_STEPS;
        s2[n2] = 0;
        vlm_batch_t b2 = {.n = n2 + 1, .tokens = t2, .embd = e2, .pos = p2, .seq = s2, .n_logits = 2, .logits_rows = rows2};
        REQUIRE(vlm_decoder_forward(e.d, &b2, logits, &err) == 0, "%s", err.msg);
        const double dr = harness_max_abs_diff(logits, alone[2], (size_t)nv);
        fprintf(stderr, "  %s: reused slot vs alone, max abs logit diff %.3g\n", name, dr);
        CHECK(dr <= tol, "%g", dr);

        /* Rewind sequence 1 to its first 10 positions and run the rest again. */
        vlm_kv_cache_seq_keep(&e.kv, 1, 10);
        CHECK(vlm_kv_cache_seq_len(&e.kv, 1) == 10);
        int32_t lr = n2 - 10 - 1;
        vlm_batch_t b3 = {.n = n2 - 10, .tokens = t2 + 10, .embd = e2 + (size_t)10 * ne, .pos = p2 + 10,
                          .seq = s2 + 10, .n_logits = 1, .logits_rows = &lr};
        REQUIRE(vlm_decoder_forward(e.d, &b3, logits, &err) == 0, "%s", err.msg);
        const double dw = harness_max_abs_diff(logits, alone[2], (size_t)nv);
        fprintf(stderr, "  %s: rewound and re-run vs alone, max abs logit diff %.3g\n", name, dw);
        CHECK(dw <= tol, "%g", dw);
        free(t2);
        free(p2);
        free(s2);
        free(e2);
    }

    /* Prefix sharing: copy all but the last 5 positions of prompt 0 from
     * slot 0 (which has decoded further since) to slot 3, run the last 5 rows. */
    {
        const int32_t n0 = prompt_len(&p[0]), keep = n0 - 5;
        vlm_kv_cache_seq_copy(&e.kv, 0, 3, keep);
        CHECK(vlm_kv_cache_seq_len(&e.kv, 3) == keep);
        int32_t t3[5], p3[5], s3[5], r3 = 4;
        float *e3 = calloc((size_t)5 * ne, sizeof(float));
        for (int32_t i = 0; i < 5; i++) {
            t3[i] = prompt_row(&p[0], keep + i, ne, e3 + (size_t)i * ne);
            p3[i] = keep + i;
            s3[i] = 3;
        }
        vlm_batch_t b4 = {.n = 5, .tokens = t3, .embd = e3, .pos = p3, .seq = s3, .n_logits = 1, .logits_rows = &r3};
        REQUIRE(vlm_decoder_forward(e.d, &b4, logits, &err) == 0, "%s", err.msg);
        const double dp = harness_max_abs_diff(logits, alone[0], (size_t)nv);
        fprintf(stderr, "  %s: copied prefix + 5 rows vs alone, max abs logit diff %.3g\n", name, dp);
        CHECK(dp <= tol, "%g", dp);
        free(e3);
    }

    free(logits);
    free(tok);
    free(pos);
    free(seq);
    free(embd);
    engine_deinit(&e);
    for (int s = 0; s < CB_SEQS; s++) {
        free(alone[s]);
        prompt_free(&p[s]);
    }
    case_close(&c);
}

/* Quantized weights: the matmul is row-for-row the same at any batch size,
 * so batching changes nothing (measured: 0). F32 weights: vlm_matmul uses
 * sgemm from 16 rows and dot products below, which sum in different orders
 * (~1e-6 relative); an f16 cache can turn such a difference into one f16
 * step of a K or V value, so its bound is looser. */
static void test_batching_q4_0(void) { continuous_batching("small-q4_0", VLM_DTYPE_F16, 1e-5); }
static void test_batching_micro(void) { continuous_batching("micro-f32", VLM_DTYPE_F16, 5e-3); }
static void test_batching_micro_f32_cache(void) { continuous_batching("micro-f32", VLM_DTYPE_F32, 5e-4); }

/* Chunking: a batch split into n_batch_max-row chunks gives the same logits. */
static void test_chunking(void) {
    gcase_t c;
    REQUIRE(case_open(&c, "micro-f32") == 0);
    prompt_t p;
    REQUIRE(prompt_load(&c, 3, &p) == 0);
    const int32_t n = prompt_len(&p), nv = c.n_vocab, ne = c.n_embd;
    int32_t *tok = malloc((size_t)n * sizeof(int32_t)), *pos = malloc((size_t)n * sizeof(int32_t)),
            *seq = calloc((size_t)n, sizeof(int32_t)), rows[3] = {n - 1, 4, 40};
    float *embd = calloc((size_t)n * ne, sizeof(float));
    for (int32_t i = 0; i < n; i++) {
        tok[i] = prompt_row(&p, i, ne, embd + (size_t)i * ne);
        pos[i] = i;
    }
    float *l_big = malloc(3 * (size_t)nv * sizeof(float)), *l_small = malloc(3 * (size_t)nv * sizeof(float));
    vlm_batch_t b = {.n = n, .tokens = tok, .embd = embd, .pos = pos, .seq = seq, .n_logits = 3, .logits_rows = rows};
    vlm_error_t err = {0};
    engine_t e1, e2;
    REQUIRE(engine_init(&e1, c.m, g_pool, 1, 256, VLM_DTYPE_F16, 512) == 0);
    REQUIRE(engine_init(&e2, c.m, g_pool, 1, 256, VLM_DTYPE_F16, 7) == 0);
    CHECK(vlm_decoder_forward(e1.d, &b, l_big, &err) == 0, "%s", err.msg);
    CHECK(vlm_decoder_forward(e2.d, &b, l_small, &err) == 0, "%s", err.msg);
    const double dc = harness_max_abs_diff(l_big, l_small, 3 * (size_t)nv);
    fprintf(stderr, "  micro-f32: chunks of 7 rows vs one batch of %d, max abs logit diff %.3g\n", n, dc);
    CHECK(dc < 2e-3, "%g", dc);
    float *ref0 = case_read_f32(&c, json_string_value(json_object_get(p.check, "logits_step0_f32")), (size_t)nv);
    REQUIRE(ref0 != NULL);
    const double dg = harness_max_abs_diff(l_small, ref0, (size_t)nv);
    CHECK(dg < 0.02, "%g", dg);
    free(ref0);
    engine_deinit(&e1);
    engine_deinit(&e2);
    free(l_big);
    free(l_small);
    free(tok);
    free(pos);
    free(seq);
    free(embd);
    prompt_free(&p);
    case_close(&c);
}

/* The scalar reference kernels and the AVX-512 ones give the same bits. */
static void test_reference_kernels(void) {
    gcase_t c;
    REQUIRE(case_open(&c, "small-q4_k_m") == 0);
    prompt_t p;
    REQUIRE(prompt_load(&c, 2, &p) == 0);
    const int32_t nv = c.n_vocab;
    float *la = malloc(4 * (size_t)nv * sizeof(float)), *lb = malloc(4 * (size_t)nv * sizeof(float));
    for (int v = 0; v < 2; v++) {
        engine_t e;
        REQUIRE(engine_init(&e, c.m, g_pool, 1, 256, VLM_DTYPE_F16, 512) == 0);
        vlm__decoder_use_reference_kernels(e.d, v == 1);
        float *l = v == 0 ? la : lb;
        REQUIRE(prefill_llava(e.d, 0, &p, l) == 0);
        for (int s = 0; s < 3; s++)
            REQUIRE(forward_rows(e.d, 0, prompt_len(&p) + s, &p.expected[s], NULL, 1, l + (size_t)(s + 1) * nv) == 0);
        engine_deinit(&e);
    }
    const double d = harness_max_abs_diff(la, lb, 4 * (size_t)nv);
    fprintf(stderr, "  small-q4_k_m: scalar vs SIMD attention kernels, max abs logit diff %.3g\n", d);
    CHECK(d == 0.0, "%g", d);
    free(la);
    free(lb);
    prompt_free(&p);
    case_close(&c);
}

/* F32 cache: no f16 rounding in attention; still close to llama.cpp. */
static void test_f32_cache(void) {
    gcase_t c;
    REQUIRE(case_open(&c, "micro-f32") == 0);
    engine_t e;
    REQUIRE(engine_init(&e, c.m, g_pool, 1, 512, VLM_DTYPE_F32, 512) == 0);
    /* 2 layers x 512 positions x 32 channels x K and V x 4 bytes, rows padded by at most 128 bytes. */
    const size_t want = (size_t)2 * 512 * 32 * 2 * 4;
    CHECK(vlm_kv_cache_bytes(&e.kv) >= want && vlm_kv_cache_bytes(&e.kv) <= want + 2 * 32 * 2 * 128, "%zu",
          vlm_kv_cache_bytes(&e.kv));
    run_stats_t st = {0};
    run_check(&c, &e, -1, false, 0, &st, false);
    run_check(&c, &e, 0, false, 0, &st, false);
    fprintf(stderr, "  micro-f32 F32 cache: step-0 max abs diff %.3g, greedy equal %d/%d\n", st.step0_max,
            st.n_free_equal, st.n_checks);
    CHECK(st.step0_max < 0.05, "%g", st.step0_max);
    engine_deinit(&e);
    case_close(&c);
}

/* ==== Batch errors ====================================================== */

static void test_batch_errors(void) {
    gcase_t c;
    REQUIRE(case_open(&c, "micro-f32") == 0);
    const int32_t nv = c.n_vocab;
    engine_t e;
    REQUIRE(engine_init(&e, c.m, NULL, 2, 20, VLM_DTYPE_F16, 64) == 0);
    vlm_error_t err = {0};
    float *logits = malloc((size_t)nv * sizeof(float));
    int32_t tok[24], pos[24], seq[24], last = 20;
    for (int i = 0; i < 24; i++) {
        tok[i] = 10 + i;
        pos[i] = i;
        seq[i] = 0;
    }
    /* 21 positions in a 20-position context. */
    vlm_batch_t b = {.n = 21, .tokens = tok, .pos = pos, .seq = seq, .n_logits = 1, .logits_rows = &last};
    CHECK(vlm_decoder_forward(e.d, &b, logits, &err) == VLM_ERR_CONTEXT_OVERFLOW, "%s", err.msg);
    CHECK(strstr(err.msg, "position 20") != NULL, "%s", err.msg);
    CHECK(vlm_kv_cache_seq_len(&e.kv, 0) == 0);
    /* A sequence id past the slots. */
    b.n = 3;
    last = 2;
    seq[1] = 2;
    CHECK(vlm_decoder_forward(e.d, &b, logits, &err) == VLM_ERR_INVALID_ARG, "%s", err.msg);
    seq[1] = 0;
    /* A token id past the vocabulary. */
    tok[2] = nv;
    CHECK(vlm_decoder_forward(e.d, &b, logits, &err) == VLM_ERR_INVALID_ARG, "%s", err.msg);
    CHECK(strstr(err.msg, "token id") != NULL, "%s", err.msg);
    tok[2] = 12;
    /* Positions out of order, and a start past the sequence's length. */
    pos[2] = 3;
    CHECK(vlm_decoder_forward(e.d, &b, logits, &err) == VLM_ERR_INVALID_ARG, "%s", err.msg);
    pos[2] = 2;
    for (int i = 0; i < 3; i++) pos[i] += 1;
    CHECK(vlm_decoder_forward(e.d, &b, logits, &err) == VLM_ERR_INVALID_ARG, "%s", err.msg);
    for (int i = 0; i < 3; i++) pos[i] -= 1;
    /* A logits row outside the batch. */
    last = 3;
    CHECK(vlm_decoder_forward(e.d, &b, logits, &err) == VLM_ERR_INVALID_ARG, "%s", err.msg);
    last = 2;
    /* An embedding row without embeddings. */
    tok[1] = VLM_BATCH_EMBD_ROW;
    CHECK(vlm_decoder_forward(e.d, &b, logits, &err) == VLM_ERR_INVALID_ARG, "%s", err.msg);
    tok[1] = 11;
    /* Nothing was stored; now a valid batch fills the context exactly. */
    CHECK(vlm_kv_cache_seq_len(&e.kv, 0) == 0);
    b.n = 20;
    last = 19;
    CHECK(vlm_decoder_forward(e.d, &b, logits, &err) == 0, "%s", err.msg);
    CHECK(vlm_kv_cache_seq_len(&e.kv, 0) == 20);
    /* One more position overflows. */
    int32_t p20 = 20, s0 = 0, r0 = 0;
    vlm_batch_t b1 = {.n = 1, .tokens = tok, .pos = &p20, .seq = &s0, .n_logits = 1, .logits_rows = &r0};
    CHECK(vlm_decoder_forward(e.d, &b1, logits, &err) == VLM_ERR_CONTEXT_OVERFLOW, "%s", err.msg);
    /* An empty batch is a no-op. */
    vlm_batch_t b0 = {0};
    CHECK(vlm_decoder_forward(e.d, &b0, NULL, &err) == 0, "%s", err.msg);
    /* Cache and decoder arguments. */
    vlm_kv_cache_t kv2;
    CHECK(vlm_kv_cache_init(&kv2, c.m, 1, 1 << 20, VLM_DTYPE_F16, &err) == VLM_ERR_INVALID_ARG, "%s", err.msg);
    CHECK(vlm_kv_cache_init(&kv2, c.m, 1, 16, VLM_DTYPE_Q8_0, &err) == VLM_ERR_INVALID_ARG, "%s", err.msg);
    CHECK(vlm_kv_cache_init(&kv2, c.m, 0, 16, VLM_DTYPE_F16, &err) == VLM_ERR_INVALID_ARG, "%s", err.msg);
    vlm_decoder_t *d2 = NULL;
    CHECK(vlm_decoder_new(c.m, &e.kv, NULL, 0, &d2, &err) == VLM_ERR_INVALID_ARG && d2 == NULL, "%s", err.msg);
    free(logits);
    engine_deinit(&e);
    case_close(&c);
}

/* ==== Out of memory in a matmul ========================================= */

/* Fails the k-th matmul scratch allocation of one forward pass, for every k
 * until the pass succeeds: each failure must return VLM_ERR_NOMEM with a
 * message naming the layer and the weights, leave the sequence's length as
 * it was, and the next pass must give the same logits, bit for bit, as an
 * engine that never failed. Cases: a 10-row prefill in one chunk, the same
 * in chunks of 4 rows (failures in a later chunk too), a decode step after
 * a successful prefill (the failed step's K/V cells are rewritten), and a
 * batch that rewrites the last 3 positions of the prefill (a failure there
 * shortens the sequence to the 7 positions it did not touch). */
static void test_matmul_out_of_memory(void) {
    gcase_t c;
    REQUIRE(case_open(&c, "micro-f32") == 0);
    const int32_t nv = c.n_vocab, n_layer = c.m->hp.n_layer;
    enum { N = 10 };
    int32_t tok[N + 1], pos[N + 1], seq[N + 1] = {0}, last = N - 1, r0 = 0;
    for (int32_t i = 0; i <= N; i++) {
        tok[i] = 20 + 3 * i;
        pos[i] = i;
    }
    const vlm_batch_t prefill = {.n = N, .tokens = tok, .pos = pos, .seq = seq, .n_logits = 1, .logits_rows = &last};
    const vlm_batch_t decode = {.n = 1, .tokens = tok + N, .pos = pos + N, .seq = seq, .n_logits = 1,
                                .logits_rows = &r0};
    int32_t r2 = 2;
    const vlm_batch_t rewrite = {.n = 3, .tokens = tok + N - 3, .pos = pos + N - 3, .seq = seq, .n_logits = 1,
                                 .logits_rows = &r2};
    float *ref = malloc((size_t)nv * sizeof(float)), *ref_dec = malloc((size_t)nv * sizeof(float));
    float *logits = malloc((size_t)nv * sizeof(float));
    REQUIRE(ref && ref_dec && logits);
    vlm_error_t err = {0};
    for (int chunk = 0; chunk < 4; chunk++) {
        const int32_t n_batch = chunk == 1 ? 4 : 64;
        const bool dec = chunk >= 2;
        const vlm_batch_t *b = chunk == 3 ? &rewrite : dec ? &decode : &prefill;
        engine_t e_ref, e;
        REQUIRE(engine_init(&e_ref, c.m, g_pool, 1, 64, VLM_DTYPE_F16, n_batch) == 0);
        REQUIRE(engine_init(&e, c.m, g_pool, 1, 64, VLM_DTYPE_F16, n_batch) == 0);
        REQUIRE(vlm_decoder_forward(e_ref.d, &prefill, ref, &err) == 0, "%s", err.msg);
        if (dec) {
            REQUIRE(vlm_decoder_forward(e_ref.d, b, ref_dec, &err) == 0, "%s", err.msg);
            REQUIRE(vlm_decoder_forward(e.d, &prefill, logits, &err) == 0, "%s", err.msg);
        }
        const int32_t len0 = dec ? N : 0, len_fail = chunk == 3 ? N - 3 : len0;
        const int32_t len_ok = chunk == 3 ? N : len0 + b->n;
        int n_fail = 0;
        bool saw_first = false, saw_down = false, saw_output = false;
        for (int k = 1; k < 1000; k++) {
            vlm__matmul_fail_next_alloc(k);
            vlm_error_clear(&err);
            const int rc = vlm_decoder_forward(e.d, b, logits, &err);
            vlm__matmul_fail_next_alloc(0);
            if (rc == VLM_OK) {
                CHECK(memcmp(logits, dec ? ref_dec : ref, (size_t)nv * sizeof(float)) == 0,
                      "case %d: logits differ with the hook unfired", chunk);
                break;
            }
            n_fail++;
            CHECK(rc == VLM_ERR_NOMEM && err.code == VLM_ERR_NOMEM, "case %d, allocation %d: %s", chunk, k,
                  vlm_error_name(rc));
            CHECK(strncmp(err.msg, "out of memory in matmul (", 25) == 0, "%s", err.msg);
            if (k == 1)
                saw_first = strstr(err.msg, "(layer 0 attn_q/attn_k/attn_v, ") != NULL;
            char want[80];
            snprintf(want, sizeof want, "(layer %d ffn_down, ", (int)n_layer - 1);
            saw_down |= strstr(err.msg, want) != NULL;
            saw_output |= strstr(err.msg, "(output, 1 token)") != NULL;
            CHECK(vlm_kv_cache_seq_len(&e.kv, 0) == len_fail, "case %d, allocation %d: length %d", chunk, k,
                  (int)vlm_kv_cache_seq_len(&e.kv, 0));
            /* The decoder still works: the same batch now gives the reference logits. */
            CHECK(vlm_decoder_forward(e.d, b, logits, &err) == 0, "%s", err.msg);
            CHECK(memcmp(logits, dec ? ref_dec : ref, (size_t)nv * sizeof(float)) == 0,
                  "case %d: logits differ after a failure at allocation %d", chunk, k);
            CHECK(vlm_kv_cache_seq_len(&e.kv, 0) == len_ok);
            vlm_kv_cache_seq_keep(&e.kv, 0, len0);
        }
        /* One allocation per matmul call: 4 per layer and the output; chunks of
         * 4 rows run the layers 3 times (the first 2 chunks stop after the
         * last layer's K/V). */
        const int want = chunk != 1 ? 4 * n_layer + 1 : 2 * (4 * (n_layer - 1) + 1) + 4 * n_layer + 1;
        fprintf(stderr, "  case %d: %d allocation failures, each reported\n", chunk, n_fail);
        CHECK(n_fail == want, "case %d: %d failures, expected %d", chunk, n_fail, want);
        CHECK(saw_first && saw_down && saw_output, "case %d: messages %d %d %d", chunk, saw_first, saw_down,
              saw_output);
        engine_deinit(&e_ref);
        engine_deinit(&e);
    }
    free(ref);
    free(ref_dec);
    free(logits);
    case_close(&c);
}

/* ==== Small models written in memory ==================================== */

enum tiny_variant {
    TINY_OK,
    TINY_TIED,            /* no output.weight */
    TINY_SWA,             /* llama.attention.sliding_window = 4 */
    TINY_ROPE_FREQS_ONE,  /* rope_freqs.weight, all 1 */
    TINY_ROPE_LINEAR,     /* rope.scaling.type linear, factor 2 */
    TINY_MISSING_UP,      /* blk.0.ffn_up.weight left out */
    TINY_BAD_SHAPE_K,     /* blk.0.attn_k.weight {32, 8} instead of {32, 16} */
    TINY_BAD_TYPE_NORM,   /* blk.0.attn_norm.weight stored as Q8_0 */
    TINY_ARCH_MAMBA,      /* general.architecture = "mamba" */
    TINY_NO_EMBD_LEN,     /* llama.embedding_length missing */
};

#define TINY_EMBD 32
#define TINY_VOCAB 50

static uint32_t lcg_state;
static float lcg_uniform(void) {
    lcg_state = lcg_state * 1664525u + 1013904223u;
    return ((float)(lcg_state >> 8) / (float)(1u << 24)) * 2.0f - 1.0f;
}

typedef struct tiny {
    void *buf;
    size_t size;
    void *data[64];
    int n_data;
} tiny_t;

static float *tiny_fill(tiny_t *t, size_t n, float scale, float offset) {
    VLM_ASSERT(t->n_data < 64);
    float *v = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = offset + scale * lcg_uniform();
    t->data[t->n_data++] = v;
    return v;
}

/* Shape of a tiny model: 2 heads of head_dim, 1 KV head. */
typedef struct tiny_shape {
    int head_dim, n_ff, n_layer, window;
} tiny_shape_t;

/* By default 1 layer: n_embd 32, 2 heads of 16, 1 KV head, n_ff 64, vocab 50. */
static int tiny_build_shape(tiny_t *t, enum tiny_variant var, tiny_shape_t sh) {
    memset(t, 0, sizeof *t);
    lcg_state = 1234;
    vlm_gguf_writer_t *w = vlm_gguf_writer_new();
    if (!w) return -1;
    vlm_gguf_writer_set_str(w, "general.architecture", var == TINY_ARCH_MAMBA ? "mamba" : "llama");
    vlm_gguf_writer_set_u32(w, "llama.context_length", 64);
    const int64_t d = 2 * sh.head_dim, ff = sh.n_ff, kvd = sh.head_dim, nv = TINY_VOCAB;
    if (var != TINY_NO_EMBD_LEN) vlm_gguf_writer_set_u32(w, "llama.embedding_length", (uint32_t)d);
    vlm_gguf_writer_set_u32(w, "llama.block_count", (uint32_t)sh.n_layer);
    vlm_gguf_writer_set_u32(w, "llama.feed_forward_length", (uint32_t)ff);
    vlm_gguf_writer_set_u32(w, "llama.attention.head_count", 2);
    vlm_gguf_writer_set_u32(w, "llama.attention.head_count_kv", 1);
    vlm_gguf_writer_set_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    vlm_gguf_writer_set_u32(w, "llama.vocab_size", TINY_VOCAB);
    if (var == TINY_SWA) vlm_gguf_writer_set_u32(w, "llama.attention.sliding_window", 4);
    if (sh.window > 0) vlm_gguf_writer_set_u32(w, "llama.attention.sliding_window", (uint32_t)sh.window);
    if (var == TINY_ROPE_LINEAR) {
        vlm_gguf_writer_set_str(w, "llama.rope.scaling.type", "linear");
        vlm_gguf_writer_set_f32(w, "llama.rope.scaling.factor", 2.0f);
    }
    vlm_error_t err = {0};
    struct {
        const char *name;
        int n_dims;
        int64_t ne[2];
        float scale, offset;
    } ts[] = {
        {"token_embd.weight", 2, {d, nv}, 1.0f, 0.0f},
        {"output_norm.weight", 1, {d, 1}, 0.1f, 1.0f},
        {"output.weight", 2, {d, nv}, 0.5f, 0.0f},
        {"rope_freqs.weight", 1, {kvd / 2, 1}, 0.0f, 1.0f},
        {"blk.0.attn_norm.weight", 1, {d, 1}, 0.1f, 1.0f},
        {"blk.0.attn_q.weight", 2, {d, d}, 0.5f, 0.0f},
        {"blk.0.attn_k.weight", 2, {d, var == TINY_BAD_SHAPE_K ? 8 : kvd}, 0.5f, 0.0f},
        {"blk.0.attn_v.weight", 2, {d, kvd}, 0.5f, 0.0f},
        {"blk.0.attn_output.weight", 2, {d, d}, 0.3f, 0.0f},
        {"blk.0.ffn_norm.weight", 1, {d, 1}, 0.1f, 1.0f},
        {"blk.0.ffn_gate.weight", 2, {d, ff}, 0.3f, 0.0f},
        {"blk.0.ffn_up.weight", 2, {d, ff}, 0.3f, 0.0f},
        {"blk.0.ffn_down.weight", 2, {ff, d}, 0.2f, 0.0f},
    };
    int rc = 0;
    for (int l = 0; l < sh.n_layer && !rc; l++)
    for (size_t i = 0; i < sizeof ts / sizeof ts[0] && !rc; i++) {
        const bool per_layer = !strncmp(ts[i].name, "blk.0.", 6);
        if (l > 0 && !per_layer) continue;
        char name[64];
        snprintf(name, sizeof name, "blk.%d.%s", l, ts[i].name + 6);
        if (!per_layer) snprintf(name, sizeof name, "%s", ts[i].name);
        /* Values are drawn for every tensor, so all variants share the same weights. */
        size_t n = (size_t)ts[i].ne[0] * (size_t)(ts[i].n_dims == 2 ? ts[i].ne[1] : 1);
        float *v = tiny_fill(t, n, ts[i].scale, ts[i].offset);
        if (var == TINY_TIED && !strcmp(ts[i].name, "output.weight")) continue;
        if (var != TINY_ROPE_FREQS_ONE && !strcmp(ts[i].name, "rope_freqs.weight")) continue;
        if (var == TINY_MISSING_UP && !strcmp(ts[i].name, "blk.0.ffn_up.weight")) continue;
        if (var == TINY_BAD_TYPE_NORM && !strcmp(ts[i].name, "blk.0.attn_norm.weight")) {
            void *q = malloc(vlm_dtype_row_size(VLM_DTYPE_Q8_0, d));
            memset(q, 0, vlm_dtype_row_size(VLM_DTYPE_Q8_0, d));
            t->data[t->n_data++] = q;
            rc = vlm_gguf_writer_add_tensor(w, name, VLM_DTYPE_Q8_0, 1, ts[i].ne, q, &err);
            continue;
        }
        rc = vlm_gguf_writer_add_tensor(w, name, VLM_DTYPE_F32, ts[i].n_dims, ts[i].ne, v, &err);
    }
    if (!rc) rc = vlm_gguf_writer_write_mem(w, &t->buf, &t->size, &err);
    if (rc) fprintf(stderr, "  tiny model: %s\n", err.msg);
    vlm_gguf_writer_destroy(&w);
    return rc;
}

static int tiny_build(tiny_t *t, enum tiny_variant var) {
    return tiny_build_shape(t, var, (tiny_shape_t){.head_dim = 16, .n_ff = 64, .n_layer = 1});
}

static void tiny_free(tiny_t *t) {
    for (int i = 0; i < t->n_data; i++) free(t->data[i]);
    free(t->buf);
    memset(t, 0, sizeof *t);
}

/* Loads a tiny variant; returns the load status and the error. */
static int tiny_load(enum tiny_variant var, const vlm_llama_opts_t *opts, tiny_t *t, vlm_gguf_t **g, vlm_llama_t **m,
                     vlm_error_t *err) {
    *g = NULL;
    *m = NULL;
    if (tiny_build(t, var)) return -1000;
    int rc = vlm_gguf_open_buffer(t->buf, t->size, g, err);
    if (rc) return rc;
    return vlm_llama_load(*g, opts, m, err);
}

static void test_load_errors(void) {
    struct {
        enum tiny_variant var;
        int want;
        const char *needle;
    } cases[] = {
        {TINY_MISSING_UP, VLM_ERR_NOT_FOUND, "blk.0.ffn_up.weight"},
        {TINY_BAD_SHAPE_K, VLM_ERR_SHAPE, "blk.0.attn_k.weight"},
        {TINY_BAD_TYPE_NORM, VLM_ERR_TYPE, "blk.0.attn_norm.weight"},
        {TINY_ARCH_MAMBA, VLM_ERR_UNSUPPORTED, "mamba"},
        {TINY_NO_EMBD_LEN, VLM_ERR_MISSING_KEY, "llama.embedding_length"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tiny_t t;
        vlm_gguf_t *g;
        vlm_llama_t *m;
        vlm_error_t err = {0};
        int rc = tiny_load(cases[i].var, NULL, &t, &g, &m, &err);
        CHECK(rc == cases[i].want && m == NULL, "variant %d: rc %d (%s)", (int)cases[i].var, rc, err.msg);
        CHECK(strstr(err.msg, cases[i].needle) != NULL, "variant %d: '%s' lacks '%s'", (int)cases[i].var, err.msg,
              cases[i].needle);
        fprintf(stderr, "  load error: %s\n", err.msg);
        vlm_llama_destroy(&m);
        vlm_gguf_destroy(&g);
        tiny_free(&t);
    }
}

/* Runs tokens at positions 0.. in a fresh cache; logits of the last row. */
static int tiny_run(const vlm_llama_t *m, const int32_t *tok, int32_t n, float *logits, trace_store_t *ts) {
    engine_t e;
    if (engine_init(&e, m, g_pool, 1, 64, VLM_DTYPE_F16, 64)) return -1;
    if (ts) vlm_decoder_set_trace(e.d, trace_collect, ts);
    int rc = forward_rows(e.d, 0, 0, tok, NULL, n, logits);
    engine_deinit(&e);
    return rc;
}

static void test_tiny_models(void) {
    const int32_t tok_a[10] = {3, 17, 5, 9, 44, 2, 31, 8, 12, 40};
    int32_t tok_b[10];
    memcpy(tok_b, tok_a, sizeof tok_b);
    tok_b[0] = 21;
    float la[TINY_VOCAB], lb[TINY_VOCAB], lc[TINY_VOCAB];
    vlm_error_t err = {0};
    tiny_t t;
    vlm_gguf_t *g;
    vlm_llama_t *m;

    /* The plain model: the first token changes the last logits. */
    REQUIRE(tiny_load(TINY_OK, NULL, &t, &g, &m, &err) == 0, "%s", err.msg);
    const vlm_llama_hparams_t *hp = vlm_llama_hparams(m);
    CHECK(hp->n_embd == 32 && hp->n_head == 2 && hp->n_head_kv == 1 && hp->head_dim == 16 && hp->n_rot == 16 &&
          hp->n_ff == 64 && hp->n_vocab == 50 && hp->n_ctx_train == 64 && !hp->tied_output &&
          hp->rope_freq_base == 10000.0f && hp->rope_freq_scale == 1.0f && hp->sliding_window == 0 &&
          hp->ftype_hint == UINT32_MAX);
    CHECK(vlm_llama_weight_bytes(m) > 0);
    REQUIRE(tiny_run(m, tok_a, 10, la, NULL) == 0 && tiny_run(m, tok_b, 10, lb, NULL) == 0);
    CHECK(harness_max_abs_diff(la, lb, TINY_VOCAB) > 1e-4);
    vlm_llama_destroy(&m);
    vlm_gguf_destroy(&g);
    tiny_free(&t);

    /* rope_freqs of 1 change nothing. */
    REQUIRE(tiny_load(TINY_ROPE_FREQS_ONE, NULL, &t, &g, &m, &err) == 0, "%s", err.msg);
    CHECK(vlm_llama_hparams(m)->has_rope_freqs);
    REQUIRE(tiny_run(m, tok_a, 10, lc, NULL) == 0);
    CHECK(harness_max_abs_diff(la, lc, TINY_VOCAB) == 0.0);
    vlm_llama_destroy(&m);
    vlm_gguf_destroy(&g);
    tiny_free(&t);

    /* Linear RoPE scaling: freq_scale 1/2, and different logits. */
    REQUIRE(tiny_load(TINY_ROPE_LINEAR, NULL, &t, &g, &m, &err) == 0, "%s", err.msg);
    CHECK(vlm_llama_hparams(m)->rope_freq_scale == 0.5f);
    REQUIRE(tiny_run(m, tok_a, 10, lc, NULL) == 0);
    CHECK(harness_max_abs_diff(la, lc, TINY_VOCAB) > 1e-4);
    vlm_llama_destroy(&m);
    vlm_gguf_destroy(&g);
    tiny_free(&t);

    /* Sliding window of 4 in a 1-layer model: position 9 no longer sees
     * position 0, unless the window is switched off. */
    REQUIRE(tiny_load(TINY_SWA, NULL, &t, &g, &m, &err) == 0, "%s", err.msg);
    CHECK(vlm_llama_hparams(m)->sliding_window == 4);
    REQUIRE(tiny_run(m, tok_a, 10, la, NULL) == 0 && tiny_run(m, tok_b, 10, lb, NULL) == 0);
    CHECK(harness_max_abs_diff(la, lb, TINY_VOCAB) == 0.0);
    vlm_llama_destroy(&m);
    vlm_gguf_destroy(&g);
    tiny_free(&t);
    vlm_llama_opts_t no_swa = {.no_sliding_window = true};
    REQUIRE(tiny_load(TINY_SWA, &no_swa, &t, &g, &m, &err) == 0, "%s", err.msg);
    CHECK(vlm_llama_hparams(m)->sliding_window == 0);
    REQUIRE(tiny_run(m, tok_a, 10, la, NULL) == 0 && tiny_run(m, tok_b, 10, lb, NULL) == 0);
    CHECK(harness_max_abs_diff(la, lb, TINY_VOCAB) > 1e-4);
    vlm_llama_destroy(&m);
    vlm_gguf_destroy(&g);
    tiny_free(&t);

    /* Tied output: logits = token_embd . result_norm, checked by hand. */
    REQUIRE(tiny_load(TINY_TIED, NULL, &t, &g, &m, &err) == 0, "%s", err.msg);
    CHECK(vlm_llama_hparams(m)->tied_output);
    trace_store_t ts = {0};
    REQUIRE(tiny_run(m, tok_a, 10, la, &ts) == 0);
    const float *rn = NULL;
    for (int i = 0; i < ts.n; i++)
        if (!strcmp(ts.names[i], "result_norm") && ts.rows[i] == 1) rn = ts.data[i];
    REQUIRE(rn != NULL);
    const vlm_gguf_tensor_t *te = vlm_gguf_find_tensor(g, "token_embd.weight");
    double dmax = 0;
    for (int v = 0; v < TINY_VOCAB; v++) {
        double s = 0;
        for (int i = 0; i < TINY_EMBD; i++) s += (double)rn[i] * ((const float *)te->data)[v * TINY_EMBD + i];
        dmax = fmax(dmax, fabs(s - la[v]));
    }
    CHECK(dmax < 1e-4, "tied logits off by %g", dmax);
    float emb[TINY_EMBD];
    CHECK(vlm_llama_embed_token(m, 7, emb, &err) == 0 && emb[3] == ((const float *)te->data)[7 * TINY_EMBD + 3]);
    CHECK(vlm_llama_embed_token(m, TINY_VOCAB, emb, &err) == VLM_ERR_INVALID_ARG);
    for (int i = 0; i < ts.n; i++) free(ts.data[i]);
    vlm_llama_destroy(&m);
    vlm_gguf_destroy(&g);
    tiny_free(&t);
    vlm_llama_destroy(&m); /* NULL-safe */
}

/* Scalar and AVX-512 kernels agree bit for bit on head sizes and windows
 * the golden models do not have: head_dim % 64 != 0 (vec_dot tails),
 * % 16 != 0 (K.q in vec_dot order even in a prefill), % 4 != 0 (V.P too),
 * n_ff % 16 != 0 (the SiLU tail), sliding windows, both cache types. */
static void test_kernel_shapes(void) {
    const tiny_shape_t shapes[] = {
        {.head_dim = 16, .n_ff = 72, .n_layer = 2},
        {.head_dim = 18, .n_ff = 64, .n_layer = 2},
        {.head_dim = 20, .n_ff = 64, .n_layer = 1, .window = 5},
        {.head_dim = 64, .n_ff = 80, .n_layer = 2},
        {.head_dim = 80, .n_ff = 64, .n_layer = 1, .window = 37},
        {.head_dim = 128, .n_ff = 64, .n_layer = 1},
    };
    int32_t tok[60];
    for (int i = 0; i < 60; i++) tok[i] = (i * 7 + 3) % TINY_VOCAB;
    int n_cmp = 0;
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        tiny_t t;
        REQUIRE(tiny_build_shape(&t, TINY_OK, shapes[si]) == 0);
        vlm_gguf_t *g;
        vlm_llama_t *m;
        vlm_error_t err = {0};
        REQUIRE(vlm_gguf_open_buffer(t.buf, t.size, &g, &err) == 0 && vlm_llama_load(g, NULL, &m, &err) == 0, "%s",
                err.msg);
        for (int type = 0; type < 2; type++) {
            float l[2][4][TINY_VOCAB];
            for (int v = 0; v < 2; v++) {
                engine_t e;
                REQUIRE(engine_init(&e, m, g_pool, 1, 64, type ? VLM_DTYPE_F32 : VLM_DTYPE_F16, 64) == 0);
                vlm__decoder_use_reference_kernels(e.d, v == 1);
                if (si == 0 && type == 0 && v == 0)
                    fprintf(stderr, "  comparing %s kernels with scalar ones\n", vlm__decoder_kernels_name(e.d));
                REQUIRE(forward_rows(e.d, 0, 0, tok, NULL, 50, l[v][0]) == 0);
                for (int s = 0; s < 3; s++) REQUIRE(forward_rows(e.d, 0, 50 + s, &tok[50 + s], NULL, 1, l[v][s + 1]) == 0);
                engine_deinit(&e);
            }
            const double dd = harness_max_abs_diff(&l[0][0][0], &l[1][0][0], 4 * TINY_VOCAB);
            CHECK(dd == 0.0, "head_dim %d, %s cache: %g", shapes[si].head_dim, type ? "F32" : "F16", dd);
            n_cmp++;
        }
        vlm_llama_destroy(&m);
        vlm_gguf_destroy(&g);
        tiny_free(&t);
    }
    fprintf(stderr, "  %d model/cache combinations: scalar and SIMD kernels bit-identical\n", n_cmp);
}

int main(void) {
    g_pool = vlm_pool_new(2);
    RUN(test_load_errors);
    RUN(test_tiny_models);
    RUN(test_batch_errors);
    RUN(test_matmul_out_of_memory);
    RUN(test_micro_hidden_and_logits);
    RUN(test_micro_greedy_exact);
    RUN(test_f32_cache);
    RUN(test_chunking);
    RUN(test_batching_micro);
    RUN(test_batching_micro_f32_cache);
    RUN(test_batching_q4_0);
    RUN(test_reference_kernels);
    RUN(test_kernel_shapes);
    RUN(test_small_q8_0);
    RUN(test_small_q4_0);
    RUN(test_small_q4_k_m);
    vlm_pool_destroy(&g_pool);
    return harness_report();
}
