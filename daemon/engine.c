/* daemon/engine.c - model loading and the engine thread's continuous
 * batching loop (the steps are listed in engine.h).
 *
 * Everything below the "Engine thread" banner runs on the engine thread
 * alone and needs no locks; the few things the I/O thread reads (the queue,
 * the active count, the counters) are behind the queue's mutex, an atomic
 * and stats_mu.
 *
 * A job's prompt and generation follow vlm-run step for step (template
 * choice, segment tokenization, the chunks the prompt is fed in, the stop
 * rules, which pieces print control-token text), so the daemon answers what
 * vlm-run answers for the same input.
 */
#include "daemon/engine.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "core/gguf.h"
#include "core/pool.h"
#include "projector/projector.h"
#include "text/chat.h"
#include "core/matmul.h"
#include "text/llama.h"
#include "text/sampler.h"
#include "text/tokenizer.h"
#include "vision/clip.h"
#include "vision/image.h"

#define PIECE_ROWS 512        /* vlm-run's n_ubatch: the decoder chunk of a prompt segment */
#define DEFAULT_CTX 4096      /* vlm-run's (and llava-cli's) default context */

void vlm_engine_opts_default(vlm_engine_opts_t *o) {
    memset(o, 0, sizeof *o);
    o->n_threads = 1;
    o->n_parallel = 4;
    o->queue_size = 16;
    o->image_cache = 32;
    o->preprocess = VLM_PREPROCESS_HF;
    o->max_pixels = VLM_IMAGE_DEFAULT_MAX_PIXELS;
    o->max_image_bytes = 32u << 20;
    o->kv_type = VLM_DTYPE_F16;
    o->prefill_budget = PIECE_ROWS;
    o->max_encode_batch = 16;
}

/* ==== Slots ============================================================= */

typedef enum slot_state {
    SLOT_FREE = 0,
    SLOT_NEW,       /* admitted; prompt and images not prepared yet */
    SLOT_PREFILL,   /* feeding prompt pieces */
    SLOT_DECODE,    /* one row per step */
} slot_state_t;

/* Rows [start, start + n) of prompt segment seg, fed in one forward call. */
typedef struct piece {
    int32_t seg, start, n;
} piece_t;

typedef struct slot {
    slot_state_t state;
    vlm_job_t *job;             /* the engine's reference */
    uint64_t order;             /* admission order: older jobs prefill first */

    /* Prompt. */
    vlm_chat_template_t tmpl;   /* the layout applied (RAW in placeholder mode) */
    vlm_chat_prompt_t chat;
    int32_t **ids;              /* [n_segments] token ids of text segments */
    size_t *n_ids;              /* [n_segments] */
    vlm_embd_t **images;        /* [n_images] projected embeddings */
    int n_images;
    int *image_item;            /* [n_images] work item while preparing, -1 when cached */
    int32_t n_text_tokens, n_image_rows, n_positions;
    piece_t *pieces;            /* [n_pieces] */
    int n_pieces, next_piece;
    bool print_special;         /* pieces of control tokens print their text (image mode) */
    bool use_stops;             /* the template's stop strings apply */

    /* Generation. */
    vlm_sampler_t *smp;
    int32_t n_past;             /* positions in the slot's KV cache */
    int32_t last_token;         /* to feed in the next decode row */
    int32_t logits_index;       /* row of this step's logits, -1 when none */
    bool in_step;
    int32_t *tokens;            /* [n_tokens] sampled ids */
    size_t n_tokens, cap_tokens;
    char *text;                 /* [text_len] raw answer bytes (not sanitized) */
    size_t text_len, text_cap;
    size_t sent;                /* text bytes already streamed */
    int64_t n_events;           /* token events sent */
    size_t max_stop_len;        /* longest client stop string */

    /* Timings (vlm_now_ms). */
    double t_admitted, t_prefill0, t_prefilled;
    double image_decode_ms, encode_ms;
    int64_t cache_hits;
} slot_t;

struct vlm_engine {
    vlm_engine_opts_t o;

    /* Model (read-only once loaded). */
    vlm_gguf_t *gguf;
    vlm_tokenizer_t *tok;
    vlm_llama_t *llama;
    vlm_kv_cache_t kv;          /* n_parallel slots */
    vlm_pool_t *pool;
    vlm_decoder_t *dec;
    vlm_gguf_t *mm_gguf;
    vlm_clip_t *clip;
    vlm_projector_t *proj;
    int32_t n_vocab, n_embd, n_ctx;
    int32_t n_patches, n_embd_vit;
    vlm_preprocess_params_t pp[VLM_PREPROCESS_MODE_COUNT];
    vlm_image_decode_opts_t dopts[VLM_PREPROCESS_MODE_COUNT];
    vlm_chat_template_t tmpl_forced;  /* --template, or UNKNOWN */
    vlm_chat_template_t tmpl_image;   /* the model's layout for image prompts */
    vlm_chat_template_t tmpl_text;    /* the model's declared template, or RAW */
    json_t *model_info;
    char summary[512];

    /* Shared with the I/O thread. */
    vlm_queue_t *queue;
    atomic_int n_active;
    pthread_mutex_t stats_mu;
    vlm_engine_stats_t stats;

    /* Thread. */
    void *zctx;
    void *sock;                 /* PAIR to the I/O thread */
    pthread_t thread;
    bool started;

    /* Engine-thread state. */
    slot_t *slots;              /* [n_parallel] */
    vlm_image_cache_t *cache;
    uint64_t next_order;
    bool stopping;
    double deadline;            /* when running jobs are ended (stopping only) */
    int32_t n_batch;            /* rows a forward call may hold */
    int32_t *b_tokens;          /* [n_batch] */
    int32_t *b_pos;             /* [n_batch] */
    int32_t *b_seq;             /* [n_batch] */
    int32_t *b_logits_rows;     /* [n_parallel] */
    float *b_embd;              /* [n_batch][n_embd] */
    float *logits;              /* [n_parallel][n_vocab] */
    char *piece;                /* token text scratch */
    size_t piece_cap;
};

/* ==== Loading =========================================================== */

/* Builds the object the model op returns. */
static json_t *model_info_new(const vlm_engine_t *e) {
    const vlm_llama_hparams_t *hp = vlm_llama_hparams(e->llama);
    const char *arch = "llama";
    size_t arch_len = 5;
    vlm_gguf_get_str(e->gguf, "general.architecture", &arch, &arch_len, NULL);
    json_t *text = json_pack("{s:s, s:s%, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:I, s:I}",
                             "path", e->o.model_path, "architecture", arch, arch_len, "n_vocab", hp->n_vocab,
                             "n_embd", hp->n_embd, "n_layer", hp->n_layer, "n_head", hp->n_head, "n_head_kv",
                             hp->n_head_kv, "n_ctx_train", hp->n_ctx_train, "n_ff", hp->n_ff, "size_bytes",
                             (json_int_t)vlm_gguf_file_size(e->gguf), "weight_bytes",
                             (json_int_t)vlm_llama_weight_bytes(e->llama));
    if (text)
        json_object_set_new(text, "file_type",
                            hp->ftype_hint == UINT32_MAX ? json_null() : json_integer(hp->ftype_hint));
    json_t *vision = json_null();
    if (e->clip) {
        const vlm_clip_hparams_t *cp = vlm_clip_hparams(e->clip);
        json_decref(vision);
        vision = json_pack("{s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:s, s:I}", "path", e->o.mmproj_path,
                           "image_size", cp->image_size, "patch_size", cp->patch_size, "n_patches",
                           cp->n_patches, "n_embd", cp->n_embd, "n_layer", cp->n_layer, "n_layer_run",
                           cp->n_layer_run, "projector_type", vlm_projector_type_name(vlm_projector_type(e->proj)),
                           "size_bytes", (json_int_t)vlm_gguf_file_size(e->mm_gguf));
    }
    const char *tmpl = vlm_chat_template_name(e->tmpl_forced != VLM_CHAT_TEMPLATE_UNKNOWN ? e->tmpl_forced
                                                                                         : e->tmpl_image);
    return json_pack("{s:o*, s:o*, s:i, s:i, s:i, s:s, s:s, s:s, s:I}", "text", text, "vision", vision,
                     "n_ctx", e->n_ctx, "slots", e->o.n_parallel, "queue", e->o.queue_size, "template", tmpl,
                     "kv_type", vlm_dtype_name(e->kv.type), "preprocess",
                     vlm_preprocess_mode_name(e->o.preprocess), "max_pixels", (json_int_t)e->o.max_pixels);
}

/* Prefixes err's message with path unless it already names it. */
static int fail_file(vlm_error_t *err, const char *path, int rc) {
    if (!strstr(err->msg, path)) {
        char msg[2 * sizeof err->msg + 64];
        snprintf(msg, sizeof msg, "%s: %s", path, err->msg[0] ? err->msg : vlm_strerror(rc));
        size_t n = strlen(msg);
        if (n >= sizeof err->msg) n = sizeof err->msg - 1;
        memcpy(err->msg, msg, n);
        err->msg[n] = '\0';
    }
    err->code = rc;
    return rc;
}

int vlm_engine_new(void *zctx, const vlm_engine_opts_t *o, vlm_engine_t **out, vlm_error_t *err) {
    VLM_ASSERT(o && o->model_path && out);
    vlm_error_clear(err);
    *out = NULL;
    if (o->n_parallel < 1 || o->queue_size < 0 || o->image_cache < 0 || o->n_threads < 1 ||
        o->prefill_budget < PIECE_ROWS || o->max_encode_batch < 1)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "engine: bad options");
    vlm_engine_t *e = calloc(1, sizeof *e);
    if (!e) return vlm_error_set(err, VLM_ERR_NOMEM, "out of memory");
    e->o = *o;
    e->zctx = zctx;
    atomic_init(&e->n_active, 0);
    pthread_mutex_init(&e->stats_mu, NULL);
    int rc;

    /* Text model, as vlm-run loads it. */
    if ((rc = vlm_gguf_open(o->model_path, &e->gguf, err)) != VLM_OK) goto fail_file_text;
    if ((rc = vlm_tokenizer_load(e->gguf, &e->tok, err)) != VLM_OK) goto fail_file_text;
    const vlm_llama_opts_t lopts = {.prepare_flags = o->fast_order ? VLM_WEIGHT_PREPARE_FAST_ORDER : 0};
    if ((rc = vlm_llama_load(e->gguf, &lopts, &e->llama, err)) != VLM_OK) goto fail_file_text;
    const vlm_llama_hparams_t *hp = vlm_llama_hparams(e->llama);
    e->n_vocab = hp->n_vocab;
    e->n_embd = hp->n_embd;
    if (vlm_tokenizer_n_vocab(e->tok) > e->n_vocab) {
        rc = vlm_error_set(err, VLM_ERR_SHAPE, "%s: the tokenizer has %d tokens but the model only %d rows of logits",
                           o->model_path, (int)vlm_tokenizer_n_vocab(e->tok), (int)e->n_vocab);
        goto fail;
    }
    e->n_ctx = o->n_ctx;
    if (e->n_ctx == 0) e->n_ctx = hp->n_ctx_train > 0 && hp->n_ctx_train < DEFAULT_CTX ? hp->n_ctx_train : DEFAULT_CTX;
    if (hp->n_ctx_train > 0 && e->n_ctx > hp->n_ctx_train) {
        rc = vlm_error_set(err, VLM_ERR_INVALID_ARG, "--ctx %d is larger than the model's context length %d",
                           (int)e->n_ctx, (int)hp->n_ctx_train);
        goto fail;
    }
    if ((rc = vlm_kv_cache_init(&e->kv, e->llama, o->n_parallel, e->n_ctx, o->kv_type, err)) != VLM_OK) goto fail;
    e->pool = vlm_pool_new(o->n_threads);
    if (!e->pool) {
        rc = vlm_error_set(err, VLM_ERR_NOMEM, "cannot start %d threads", o->n_threads);
        goto fail;
    }
    e->n_batch = o->prefill_budget + o->n_parallel;
    if ((rc = vlm_decoder_new(e->llama, &e->kv, e->pool, e->n_batch, &e->dec, err)) != VLM_OK) goto fail;

    /* Vision side. */
    if (o->mmproj_path) {
        if ((rc = vlm_gguf_open(o->mmproj_path, &e->mm_gguf, err)) != VLM_OK) goto fail_file_mm;
        if ((rc = vlm_clip_load(e->mm_gguf, NULL, &e->clip, err)) != VLM_OK) goto fail_file_mm;
        const vlm_clip_hparams_t *cp = vlm_clip_hparams(e->clip);
        if ((rc = vlm_projector_load(e->mm_gguf, cp->n_embd_out, e->n_embd, &e->proj, err)) != VLM_OK)
            goto fail_file_mm;
        e->n_patches = cp->n_patches;
        e->n_embd_vit = cp->n_embd_out;
        for (int m = 0; m < VLM_PREPROCESS_MODE_COUNT; m++) {
            rc = vlm_preprocess_params_init(&e->pp[m], (vlm_preprocess_mode_t)m, cp->image_size, cp->mean, cp->std, err);
            if (rc != VLM_OK) goto fail_file_mm;
            vlm_preprocess_decode_opts(&e->pp[m], &e->dopts[m]);
            e->dopts[m].max_pixels = o->max_pixels;
            e->dopts[m].max_bytes = o->max_image_bytes;
        }
    }

    /* Templates, per vlm-run's rules. */
    e->tmpl_forced = o->template_name ? vlm_chat_template_from_name(o->template_name) : VLM_CHAT_TEMPLATE_UNKNOWN;
    if (o->template_name && e->tmpl_forced == VLM_CHAT_TEMPLATE_UNKNOWN) {
        rc = vlm_error_set(err, VLM_ERR_INVALID_ARG, "--template: unknown template '%s'", o->template_name);
        goto fail;
    }
    e->tmpl_image = vlm_chat_template_detect(e->gguf);
    e->tmpl_text = VLM_CHAT_TEMPLATE_RAW;
    const char *ct;
    size_t ct_len;
    if (vlm_gguf_get_str(e->gguf, "tokenizer.chat_template", &ct, &ct_len, NULL) == VLM_OK) {
        vlm_chat_template_t t = vlm_chat_template_detect_text(ct, ct_len);
        if (t != VLM_CHAT_TEMPLATE_UNKNOWN) e->tmpl_text = t;
    }

    /* Engine-thread state. */
    e->queue = vlm_queue_new(o->n_parallel + o->queue_size);
    e->cache = vlm_image_cache_new(o->image_cache);
    e->slots = calloc((size_t)o->n_parallel, sizeof *e->slots);
    e->b_tokens = malloc((size_t)e->n_batch * sizeof *e->b_tokens);
    e->b_pos = malloc((size_t)e->n_batch * sizeof *e->b_pos);
    e->b_seq = malloc((size_t)e->n_batch * sizeof *e->b_seq);
    e->b_logits_rows = malloc((size_t)o->n_parallel * sizeof *e->b_logits_rows);
    e->b_embd = malloc((size_t)e->n_batch * (size_t)e->n_embd * sizeof *e->b_embd);
    e->logits = malloc((size_t)o->n_parallel * (size_t)e->n_vocab * sizeof *e->logits);
    e->piece_cap = 256;
    e->piece = malloc(e->piece_cap);
    if (!e->queue || !e->cache || !e->slots || !e->b_tokens || !e->b_pos || !e->b_seq || !e->b_logits_rows ||
        !e->b_embd || !e->logits || !e->piece) {
        rc = vlm_error_set(err, VLM_ERR_NOMEM, "out of memory for the engine's buffers");
        goto fail;
    }
    for (int i = 0; i < o->n_parallel; i++) vlm_chat_prompt_init(&e->slots[i].chat);
    vlm_image_cache_counts(e->cache, &e->stats.cache);
    e->model_info = model_info_new(e);
    if (!e->model_info) {
        rc = vlm_error_set(err, VLM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    snprintf(e->summary, sizeof e->summary, "model %s%s%s, n_embd %d, %d layers, %d slots of %d positions",
             o->model_path, o->mmproj_path ? " + " : "", o->mmproj_path ? o->mmproj_path : "", (int)e->n_embd,
             (int)hp->n_layer, o->n_parallel, (int)e->n_ctx);
    *out = e;
    return VLM_OK;

fail_file_text:
    fail_file(err, o->model_path, rc);
    goto fail;
fail_file_mm:
    fail_file(err, o->mmproj_path, rc);
fail:
    vlm_engine_destroy(&e);
    return rc;
}

static void slot_release(vlm_engine_t *e, slot_t *s);
static void *engine_main(void *arg);

int vlm_engine_start(vlm_engine_t *e, vlm_error_t *err) {
    /* The socket is made and connected here, so a failure is reported to
     * the caller; the engine thread then uses it alone. */
    e->sock = zmq_socket(e->zctx, ZMQ_PAIR);
    if (!e->sock) return vlm_error_set(err, VLM_ERR_INTERNAL, "engine socket: %s", zmq_strerror(zmq_errno()));
    int zero = 0;
    zmq_setsockopt(e->sock, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(e->sock, ZMQ_RCVHWM, &zero, sizeof zero);
    if (zmq_connect(e->sock, VLM_ENGINE_ENDPOINT) != 0) {
        int rc = vlm_error_set(err, VLM_ERR_INTERNAL, "engine socket: %s", zmq_strerror(zmq_errno()));
        zmq_close(e->sock);
        e->sock = NULL;
        return rc;
    }
    if (pthread_create(&e->thread, NULL, engine_main, e) != 0) {
        zmq_close(e->sock);
        e->sock = NULL;
        return vlm_error_set(err, VLM_ERR_INTERNAL, "cannot start the engine thread");
    }
    e->started = true;
    return VLM_OK;
}

void vlm_engine_destroy(vlm_engine_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_engine_t *e = *self_p;
    *self_p = NULL;
    if (e->started) pthread_join(e->thread, NULL);
    for (int i = 0; e->slots && i < e->o.n_parallel; i++)
        if (e->slots[i].state != SLOT_FREE) slot_release(e, &e->slots[i]);
    free(e->slots);
    vlm_queue_destroy(&e->queue);
    vlm_image_cache_destroy(&e->cache);
    json_decref(e->model_info);
    free(e->b_tokens);
    free(e->b_pos);
    free(e->b_seq);
    free(e->b_logits_rows);
    free(e->b_embd);
    free(e->logits);
    free(e->piece);
    vlm_projector_destroy(&e->proj);
    vlm_clip_destroy(&e->clip);
    vlm_gguf_destroy(&e->mm_gguf);
    vlm_decoder_destroy(&e->dec);
    vlm_pool_destroy(&e->pool);
    vlm_kv_cache_deinit(&e->kv);
    vlm_llama_destroy(&e->llama);
    vlm_tokenizer_destroy(&e->tok);
    vlm_gguf_destroy(&e->gguf);
    pthread_mutex_destroy(&e->stats_mu);
    free(e);
}

vlm_queue_t *vlm_engine_queue(vlm_engine_t *e) { return e->queue; }
const json_t *vlm_engine_model_info(const vlm_engine_t *e) { return e->model_info; }
const char *vlm_engine_summary(const vlm_engine_t *e) { return e->summary; }
int vlm_engine_active(vlm_engine_t *e) { return atomic_load(&e->n_active); }
int vlm_engine_n_parallel(const vlm_engine_t *e) { return e->o.n_parallel; }
int vlm_engine_capacity(const vlm_engine_t *e) { return e->o.n_parallel + e->o.queue_size; }

void vlm_engine_get_stats(vlm_engine_t *e, vlm_engine_stats_t *out) {
    pthread_mutex_lock(&e->stats_mu);
    *out = e->stats;
    pthread_mutex_unlock(&e->stats_mu);
    out->active = atomic_load(&e->n_active);
}

/* ==== Engine thread: events ============================================ */

static void free_text(void *data, void *hint) {
    (void)hint;
    free(data);
}

/* Sends one event for job (json is taken over; NULL for an empty frame,
 * which the I/O thread turns into an internal error when it is final). A
 * final event also gives up the engine's reference to the job. */
static void send_event(vlm_engine_t *e, vlm_job_t **job_p, vlm_engine_event_kind_t kind, int code, char *json) {
    vlm_engine_event_t ev = {job_p ? *job_p : NULL, (int32_t)kind, (int32_t)code};
    zmq_msg_t body;
    if (json) zmq_msg_init_data(&body, json, strlen(json), free_text, NULL);
    else zmq_msg_init(&body);
    /* The socket has no HWM and the peer is in this process: these block
     * only while the I/O thread is starting up. */
    zmq_send(e->sock, &ev, sizeof ev, ZMQ_SNDMORE);
    zmq_msg_send(&body, e->sock, 0);
    zmq_msg_close(&body);
    /* The I/O thread took its own reference when it created the job, so
     * ours can go now, before the event is even read. */
    if (kind == VLM_ENGINE_EV_DONE || kind == VLM_ENGINE_EV_ERROR) vlm_job_destroy(job_p);
}

/* Ends a job with an error event (final). */
static void job_error(vlm_engine_t *e, vlm_job_t **job_p, vlm_proto_error_t code, const char *msg) {
    send_event(e, job_p, VLM_ENGINE_EV_ERROR, code, vlm_event_error((*job_p)->req.id, code, msg));
}

/* Ends a job that never ran with done/cancelled. */
static void job_cancelled_unstarted(vlm_engine_t *e, vlm_job_t **job_p) {
    vlm_job_report_t rep;
    memset(&rep, 0, sizeof rep);
    rep.finish_reason = "cancelled";
    rep.queue_ms = rep.total_ms = vlm_now_ms() - (*job_p)->t_received;
    send_event(e, job_p, VLM_ENGINE_EV_DONE, 0, vlm_event_done((*job_p)->req.id, "", 0, &rep));
}

/* ==== Engine thread: slots ============================================== */

/* Frees what the slot holds and forgets its KV cells; the job reference
 * must have been handed on (or is dropped here). */
static void slot_release(vlm_engine_t *e, slot_t *s) {
    const int idx = (int)(s - e->slots);
    for (int i = 0; s->ids && i < s->chat.n_segments; i++) free(s->ids[i]);
    free(s->ids);
    free(s->n_ids);
    vlm_chat_prompt_deinit(&s->chat);
    for (int i = 0; s->images && i < s->n_images; i++) vlm_embd_destroy(&s->images[i]);
    free(s->images);
    free(s->image_item);
    free(s->pieces);
    vlm_sampler_destroy(&s->smp);
    free(s->tokens);
    free(s->text);
    vlm_job_destroy(&s->job);
    memset(s, 0, sizeof *s);
    vlm_chat_prompt_init(&s->chat);
    vlm_kv_cache_seq_clear(&e->kv, idx);
    atomic_fetch_sub(&e->n_active, 1);
}

/* Ends the slot's job with an error event and frees the slot. */
static void slot_error(vlm_engine_t *e, slot_t *s, vlm_proto_error_t code, const char *msg) {
    job_error(e, &s->job, code, msg);
    slot_release(e, s);
}

static bool text_append(slot_t *s, const char *p, size_t n) {
    if (s->text_len + n + 1 > s->text_cap) {
        size_t cap = s->text_cap ? s->text_cap : 256;
        while (cap < s->text_len + n + 1) cap *= 2;
        char *t = realloc(s->text, cap);
        if (!t) return false;
        s->text = t;
        s->text_cap = cap;
    }
    memcpy(s->text + s->text_len, p, n);
    s->text_len += n;
    s->text[s->text_len] = '\0';
    return true;
}

/* Sends text[sent..cut) as one token event (sanitized); token < 0 marks a
 * flush at the end. Returns false when out of memory. */
static bool stream_send(vlm_engine_t *e, slot_t *s, size_t cut, int32_t token) {
    if (cut <= s->sent) return true;
    size_t len;
    char *piece = vlm_utf8_sanitize(s->text + s->sent, cut - s->sent, &len);
    if (!piece) return false;
    char *json = vlm_event_token(s->job->req.id, s->n_events, piece, len, token);
    free(piece);
    if (!json) return false;
    send_event(e, &s->job, VLM_ENGINE_EV_TOKEN, 0, json);
    s->n_events++;
    s->sent = cut;
    return true;
}

/* Streams what can be sent now: whole UTF-8 units, short of any tail that
 * could still grow into a client stop string. */
static bool stream_pending(vlm_engine_t *e, slot_t *s, int32_t token) {
    if (!s->job->req.stream) return true;
    const vlm_request_t *rq = &s->job->req;
    size_t hold = 0;
    const size_t avail = s->text_len - s->sent;
    for (int i = 0; i < rq->n_stop; i++) {
        size_t k = rq->stop_len[i] - 1; /* a proper prefix at most */
        if (k > avail) k = avail;
        for (; k > hold; k--)
            if (memcmp(s->text + s->text_len - k, rq->stop[i], k) == 0) break;
        if (k > hold) hold = k;
    }
    size_t cut = vlm_utf8_stream_cut(s->text, s->text_len, s->sent, s->text_len - hold);
    return stream_send(e, s, cut, token);
}

/* Ends the slot's job with its done event and frees the slot. */
static void slot_done(vlm_engine_t *e, slot_t *s, const char *reason) {
    const double now = vlm_now_ms();
    vlm_job_t *job = s->job;
    if (job->req.stream && !stream_send(e, s, s->text_len, -1)) {
        slot_error(e, s, VLM_PROTO_INTERNAL, "out of memory streaming the answer");
        return;
    }
    size_t len;
    char *text = vlm_utf8_sanitize(s->text ? s->text : "", s->text_len, &len);
    vlm_job_report_t rep;
    memset(&rep, 0, sizeof rep);
    rep.finish_reason = reason;
    rep.prompt_tokens = s->n_text_tokens;
    rep.image_tokens = s->n_image_rows;
    rep.completion_tokens = (int64_t)s->n_tokens;
    rep.tokens = s->tokens;
    rep.n_tokens = s->n_tokens;
    rep.queue_ms = s->t_admitted - job->t_received;
    rep.image_decode_ms = s->image_decode_ms;
    rep.encode_ms = s->encode_ms;
    if (s->t_prefilled > 0) {
        rep.prefill_ms = s->t_prefilled - s->t_prefill0;
        rep.decode_ms = now - s->t_prefilled;
    } else if (s->t_prefill0 > 0) {
        rep.prefill_ms = now - s->t_prefill0;
    }
    rep.total_ms = now - job->t_received;
    rep.image_cache_hits = s->cache_hits;
    char *json = text ? vlm_event_done(job->req.id, text, len, &rep) : NULL;
    free(text);
    if (!json) {
        slot_error(e, s, VLM_PROTO_INTERNAL, "out of memory writing the answer");
        return;
    }
    send_event(e, &s->job, VLM_ENGINE_EV_DONE, 0, json);
    pthread_mutex_lock(&e->stats_mu);
    e->stats.jobs_finished++;
    pthread_mutex_unlock(&e->stats_mu);
    slot_release(e, s);
}

/* Ends a job early for the reason in its cancel flag. */
static void slot_cancel(vlm_engine_t *e, slot_t *s, int why) {
    if (why == VLM_JOB_SHUTDOWN)
        slot_error(e, s, VLM_PROTO_SHUTTING_DOWN, "the daemon is shutting down and the grace period is over");
    else
        slot_done(e, s, "cancelled");
}

/* ==== Engine thread: prompts ============================================ */

/* The template per vlm-run's rules: the request's, the daemon's, then the
 * model's (for image prompts, LLaVA-1.5's when undeclared; for text, raw
 * unless the model declares a supported one). */
static vlm_chat_template_t choose_template(const vlm_engine_t *e, const vlm_job_t *job) {
    if (job->req.template_name) return vlm_chat_template_from_name(job->req.template_name);
    if (e->tmpl_forced != VLM_CHAT_TEMPLATE_UNKNOWN) return e->tmpl_forced;
    return job->n_images > 0 ? e->tmpl_image : e->tmpl_text;
}

/* Formats and tokenizes the slot's prompt and checks that it fits. Returns
 * true, or false after ending the job with an error. */
static bool prompt_prepare(vlm_engine_t *e, slot_t *s) {
    vlm_job_t *job = s->job;
    vlm_error_t err;
    vlm_error_clear(&err);
    if (job->n_images > 0 && !e->clip) {
        slot_error(e, s, VLM_PROTO_BAD_REQUEST, "this daemon serves a text-only model (started without --mmproj)");
        return false;
    }
    int rc = vlm_chat_build(choose_template(e, job), job->req.system, job->req.prompt, job->n_images, &s->chat,
                            &err);
    if (rc != VLM_OK) {
        slot_error(e, s, vlm_proto_error_from_status(rc), err.msg);
        return false;
    }
    s->tmpl = s->chat.tmpl;
    const int ns = s->chat.n_segments;
    s->ids = calloc((size_t)(ns > 0 ? ns : 1), sizeof *s->ids);
    s->n_ids = calloc((size_t)(ns > 0 ? ns : 1), sizeof *s->n_ids);
    if (!s->ids || !s->n_ids) {
        slot_error(e, s, VLM_PROTO_INTERNAL, "out of memory tokenizing the prompt");
        return false;
    }
    int64_t n_pos = 0, n_pieces = 0;
    bool partial = false; /* stopped counting at the first overflow */
    for (int i = 0; i < ns; i++) {
        const vlm_chat_segment_t *seg = &s->chat.segments[i];
        int64_t rows;
        if (seg->kind == VLM_CHAT_SEGMENT_IMAGE) {
            rows = e->n_patches;
            s->n_image_rows += e->n_patches;
        } else {
            rc = vlm_tokenizer_encode(e->tok, seg->text, seg->text_len, seg->add_bos, true, &s->ids[i], &s->n_ids[i],
                                      &err);
            if (rc != VLM_OK) {
                slot_error(e, s, vlm_proto_error_from_status(rc), err.msg);
                return false;
            }
            rows = (int64_t)s->n_ids[i];
            s->n_text_tokens += (int32_t)rows;
        }
        n_pos += rows;
        n_pieces += (rows + PIECE_ROWS - 1) / PIECE_ROWS;
        if (n_pos > e->n_ctx && i + 1 < ns) {
            partial = true; /* no need to tokenize the rest */
            break;
        }
    }
    if (n_pos == 0) {
        slot_error(e, s, VLM_PROTO_BAD_REQUEST, "the prompt is empty: it gives no tokens");
        return false;
    }
    if (n_pos > e->n_ctx) {
        char msg[256];
        snprintf(msg, sizeof msg,
                 "the prompt needs %s%lld positions (%d image rows) but the context holds %d (see --ctx)",
                 partial ? "at least " : "", (long long)n_pos, (int)s->n_image_rows, (int)e->n_ctx);
        slot_error(e, s, VLM_PROTO_CONTEXT_OVERFLOW, msg);
        return false;
    }
    s->n_positions = (int32_t)n_pos;

    /* The pieces, as vlm-run's forward calls and the decoder's chunks cut
     * them: one segment at a time, PIECE_ROWS rows at most. */
    s->pieces = calloc((size_t)n_pieces, sizeof *s->pieces);
    if (!s->pieces) {
        slot_error(e, s, VLM_PROTO_INTERNAL, "out of memory");
        return false;
    }
    for (int i = 0; i < ns; i++) {
        const vlm_chat_segment_t *seg = &s->chat.segments[i];
        const int32_t rows = seg->kind == VLM_CHAT_SEGMENT_IMAGE ? e->n_patches : (int32_t)s->n_ids[i];
        for (int32_t r = 0; r < rows; r += PIECE_ROWS)
            s->pieces[s->n_pieces++] = (piece_t){i, r, rows - r < PIECE_ROWS ? rows - r : PIECE_ROWS};
    }

    /* Generation settings, per vlm-run's rules for image and text mode. */
    const bool image_mode = job->n_images > 0;
    s->print_special = image_mode;
    s->use_stops = image_mode || s->tmpl != VLM_CHAT_TEMPLATE_RAW;
    for (int i = 0; i < job->req.n_stop; i++)
        if (job->req.stop_len[i] > s->max_stop_len) s->max_stop_len = job->req.stop_len[i];
    s->smp = vlm_sampler_new(&job->req.sampling, e->n_vocab);
    if (job->n_images > 0) {
        s->images = calloc((size_t)job->n_images, sizeof *s->images);
        s->image_item = malloc((size_t)job->n_images * sizeof *s->image_item);
        if (s->images) s->n_images = job->n_images;
    }
    if (!s->smp || (job->n_images > 0 && (!s->images || !s->image_item))) {
        slot_error(e, s, VLM_PROTO_INTERNAL, "out of memory");
        return false;
    }
    return true;
}

/* ==== Engine thread: images ============================================= */

/* One image to decode, preprocess and encode (shared by every new job that
 * sent the same bytes with the same mode). */
typedef struct image_item {
    vlm_image_key_t key;
    const void *data;
    size_t size;
    int mode;
    vlm_image_f32_t pre;     /* [S][S][3] once preprocessed */
    int rc;                  /* VLM_OK or the decode/preprocess failure */
    char msg[sizeof(((vlm_error_t *)0)->msg)];
    bool needed;             /* some job still waits for it */
    vlm_embd_t *embd;
} image_item_t;

typedef struct decode_work {
    vlm_engine_t *e;
    image_item_t *items;
    int n;
    atomic_int next;
} decode_work_t;

/* Pool worker: decodes and preprocesses items until none is left. */
static void decode_worker(void *arg, int ith, int nth) {
    (void)ith;
    (void)nth;
    decode_work_t *w = arg;
    for (;;) {
        int i = atomic_fetch_add(&w->next, 1);
        if (i >= w->n) break;
        image_item_t *it = &w->items[i];
        vlm_error_t err;
        vlm_error_clear(&err);
        vlm_image_u8_t img;
        it->rc = vlm_image_decode(it->data, it->size, &w->e->dopts[it->mode], &img, &err);
        if (it->rc == VLM_OK) {
            it->rc = vlm_preprocess(&w->e->pp[it->mode], &img, &it->pre, &err);
            vlm_image_u8_deinit(&img);
        }
        if (it->rc != VLM_OK) snprintf(it->msg, sizeof it->msg, "%s", err.msg[0] ? err.msg : vlm_strerror(it->rc));
    }
}

/* Encodes and projects the items listed in idx[0..n) in one CLIP call and
 * one projector call, and stores each result in the cache. Returns VLM_OK
 * or a failure code with err set. */
static int encode_group(vlm_engine_t *e, image_item_t *items, const int *idx, int n, vlm_error_t *err) {
    const size_t rows = (size_t)n * (size_t)e->n_patches;
    const float **ptrs = malloc((size_t)n * sizeof *ptrs);
    float *feat = malloc(rows * (size_t)e->n_embd_vit * sizeof *feat);
    float *proj = malloc(rows * (size_t)e->n_embd * sizeof *proj);
    int rc = VLM_OK;
    if (!ptrs || !feat || !proj) {
        rc = vlm_error_set(err, VLM_ERR_NOMEM, "out of memory encoding %d images", n);
        goto done;
    }
    for (int k = 0; k < n; k++) ptrs[k] = items[idx[k]].pre.data;
    if ((rc = vlm_clip_encode_ptrs(e->clip, e->pool, ptrs, n, feat, err)) != VLM_OK) goto done;
    if ((rc = vlm_projector_apply(e->proj, e->pool, feat, (int32_t)rows, proj, err)) != VLM_OK) goto done;
    for (int k = 0; k < n; k++) {
        image_item_t *it = &items[idx[k]];
        it->embd = vlm_embd_new(e->n_patches, e->n_embd);
        if (!it->embd) {
            rc = vlm_error_set(err, VLM_ERR_NOMEM, "out of memory for image embeddings");
            goto done;
        }
        memcpy(it->embd->data, proj + (size_t)k * (size_t)e->n_patches * (size_t)e->n_embd,
               (size_t)e->n_patches * (size_t)e->n_embd * sizeof(float));
        vlm_image_cache_put(e->cache, &it->key, it->embd);
    }
    pthread_mutex_lock(&e->stats_mu);
    e->stats.images_encoded += n;
    e->stats.encode_batches++;
    pthread_mutex_unlock(&e->stats_mu);
done:
    free(ptrs);
    free(feat);
    free(proj);
    return rc;
}

/* Encodes the needed items: one image per CLIP call by default, so that an
 * image's embeddings depend on its bytes alone (OpenBLAS's sgemm rounds a
 * row differently with another number of rows beside it, so the encoder's
 * output depends on what else is in the batch); all of them in one call
 * with --batch-images. Returns VLM_OK or a failure code with err set. */
static int encode_items(vlm_engine_t *e, image_item_t *items, int n_items, vlm_error_t *err) {
    int *idx = malloc((size_t)(n_items > 0 ? n_items : 1) * sizeof *idx);
    if (!idx) return vlm_error_set(err, VLM_ERR_NOMEM, "out of memory");
    int n = 0;
    for (int i = 0; i < n_items; i++)
        if (items[i].needed && items[i].rc == VLM_OK) idx[n++] = i;
    int rc = VLM_OK;
    if (n > 0 && e->o.batch_images) {
        rc = encode_group(e, items, idx, n, err);
    } else {
        for (int k = 0; k < n && rc == VLM_OK; k++) rc = encode_group(e, items, &idx[k], 1, err);
    }
    free(idx);
    return rc;
}

/* Readies every new job: prompt, then images (cache, decode, encode), then
 * the sampler; each goes to PREFILL or ends with its error. Jobs beyond
 * max_encode_batch images wait for the next iteration. */
static void prepare_new(vlm_engine_t *e) {
    const int np = e->o.n_parallel;
    int n_new = 0, n_images = 0;
    for (int i = 0; i < np; i++)
        if (e->slots[i].state == SLOT_NEW) {
            n_new++;
            n_images += e->slots[i].job->n_images;
        }
    if (n_new == 0) return;
    image_item_t *items = n_images ? calloc((size_t)n_images, sizeof *items) : NULL;
    slot_t **batch = calloc((size_t)n_new, sizeof *batch);
    if ((n_images && !items) || !batch) {
        free(items);
        free(batch);
        for (int i = 0; i < np; i++)
            if (e->slots[i].state == SLOT_NEW) slot_error(e, &e->slots[i], VLM_PROTO_INTERNAL, "out of memory");
        return;
    }

    /* 1. Prompts, cache lookups and the list of images to encode, oldest
     *    job first. Encoding one image at a time gains nothing from
     *    preparing many jobs at once, and every image encoded here delays
     *    the next token of the running jobs: then one job's images per
     *    iteration, between decode steps. */
    const int images_per_iteration = e->o.batch_images ? e->o.max_encode_batch : 1;
    int n_items = 0, n_batch = 0;
    for (;;) {
        slot_t *s = NULL;
        for (int i = 0; i < np; i++) {
            slot_t *x = &e->slots[i];
            bool taken = false;
            for (int k = 0; k < n_batch; k++) taken |= batch[k] == x;
            if (x->state == SLOT_NEW && !taken && (!s || x->order < s->order)) s = x;
        }
        if (!s) break;
        if (n_items > 0 && n_items + s->job->n_images > images_per_iteration) break;
        if (!prompt_prepare(e, s)) continue; /* ended with its error; the slot is free */
        batch[n_batch++] = s;
        const int mode = s->job->req.preprocess >= 0 ? s->job->req.preprocess : (int)e->o.preprocess;
        for (int k = 0; k < s->job->n_images; k++) {
            zmq_msg_t *m = &s->job->images[k];
            vlm_image_key_t key;
            vlm_image_key_make(&key, zmq_msg_data(m), zmq_msg_size(m), mode);
            s->image_item[k] = -1;
            s->images[k] = vlm_image_cache_get(e->cache, &key);
            if (s->images[k]) {
                s->cache_hits++;
                continue;
            }
            int it = 0;
            while (it < n_items && !vlm_image_key_equal(&items[it].key, &key)) it++;
            if (it == n_items) {
                items[it].key = key;
                items[it].data = zmq_msg_data(m);
                items[it].size = zmq_msg_size(m);
                items[it].mode = mode;
                vlm_image_f32_init(&items[it].pre);
                n_items++;
            }
            s->image_item[k] = it;
        }
    }

    /* 2. Decode and preprocess the misses, in parallel on the pool. */
    double t0 = vlm_now_ms();
    if (n_items > 0) {
        decode_work_t w = {.e = e, .items = items, .n = n_items};
        atomic_init(&w.next, 0);
        vlm_pool_run(e->pool, decode_worker, &w);
    }
    const double decode_ms = vlm_now_ms() - t0;

    /* 3. Jobs with a bad image end here; the others mark what they need. */
    for (int b = 0; b < n_batch; b++) {
        slot_t *s = batch[b];
        s->image_decode_ms = decode_ms;
        for (int k = 0; k < s->job->n_images; k++) {
            const int it = s->image_item[k];
            if (it < 0 || items[it].rc == VLM_OK) continue;
            char msg[sizeof items[it].msg + 32];
            snprintf(msg, sizeof msg, "image %d: %s", k + 1, items[it].msg);
            slot_error(e, s, vlm_proto_error_from_status(items[it].rc), msg);
            batch[b] = NULL;
            break;
        }
        if (!batch[b]) continue;
        for (int k = 0; k < s->job->n_images; k++)
            if (s->image_item[k] >= 0) items[s->image_item[k]].needed = true;
    }

    /* 4. Encode and project them together. */
    t0 = vlm_now_ms();
    vlm_error_t err;
    vlm_error_clear(&err);
    int rc = encode_items(e, items, n_items, &err);
    const double encode_ms = vlm_now_ms() - t0;

    /* 5. Hand out the embeddings; the jobs start prefilling. */
    for (int b = 0; b < n_batch; b++) {
        slot_t *s = batch[b];
        if (!s) continue;
        if (rc != VLM_OK) {
            slot_error(e, s, vlm_proto_error_from_status(rc), err.msg);
            continue;
        }
        bool encoded = false;
        for (int k = 0; k < s->job->n_images; k++) {
            const int it = s->image_item[k];
            if (it < 0) continue;
            s->images[k] = vlm_embd_ref(items[it].embd);
            encoded = true;
        }
        if (encoded) s->encode_ms = encode_ms;
        s->state = SLOT_PREFILL;
    }
    for (int i = 0; i < n_items; i++) {
        vlm_image_f32_deinit(&items[i].pre);
        vlm_embd_destroy(&items[i].embd);
    }
    free(items);
    free(batch);
    pthread_mutex_lock(&e->stats_mu);
    vlm_image_cache_counts(e->cache, &e->stats.cache);
    pthread_mutex_unlock(&e->stats_mu);
}

/* ==== Engine thread: generation ========================================= */

/* Samples the slot's next token from its logits row and applies vlm-run's
 * rules: end-of-generation, template stop strings, the client's stop
 * strings, max_tokens and the context end. */
static void on_logits(vlm_engine_t *e, slot_t *s, const float *logits) {
    const int32_t id = vlm_sampler_sample(s->smp, logits);
    vlm_sampler_accept(s->smp, id);
    if (s->n_tokens == s->cap_tokens) {
        size_t cap = s->cap_tokens ? 2 * s->cap_tokens : 64;
        int32_t *t = realloc(s->tokens, cap * sizeof *t);
        if (!t) {
            slot_error(e, s, VLM_PROTO_INTERNAL, "out of memory");
            return;
        }
        s->tokens = t;
        s->cap_tokens = cap;
    }
    s->tokens[s->n_tokens++] = id;
    pthread_mutex_lock(&e->stats_mu);
    e->stats.tokens_generated++;
    pthread_mutex_unlock(&e->stats_mu);

    if (vlm_tokenizer_is_eog(e->tok, id)) {
        slot_done(e, s, "stop");
        return;
    }
    int len = vlm_tokenizer_piece(e->tok, id, s->print_special, e->piece, e->piece_cap);
    if (len < 0) {
        char *np = realloc(e->piece, (size_t)-len);
        if (!np) {
            slot_error(e, s, VLM_PROTO_INTERNAL, "out of memory");
            return;
        }
        e->piece = np;
        e->piece_cap = (size_t)-len;
        len = vlm_tokenizer_piece(e->tok, id, s->print_special, e->piece, e->piece_cap);
    }
    const size_t plen = len > 0 ? (size_t)len : 0;
    const size_t old_len = s->text_len;
    if (!text_append(s, e->piece, plen)) {
        slot_error(e, s, VLM_PROTO_INTERNAL, "out of memory");
        return;
    }
    vlm_chat_stop_t stop = VLM_CHAT_STOP_NONE;
    if (s->use_stops) stop = vlm_chat_stop_check(s->tmpl, e->piece, plen, s->text, s->text_len, NULL);
    if (stop == VLM_CHAT_STOP_DROP_PIECE) {
        s->text_len = old_len;
        slot_done(e, s, "stop");
        return;
    }
    /* The client's stop strings: the text ends before the earliest match
     * that the new piece completes. */
    if (s->max_stop_len > 0) {
        const vlm_request_t *rq = &s->job->req;
        const size_t from = old_len + 1 > s->max_stop_len ? old_len + 1 - s->max_stop_len : 0;
        size_t best = SIZE_MAX;
        for (int i = 0; i < rq->n_stop; i++) {
            const char *m = memmem(s->text + from, s->text_len - from, rq->stop[i], rq->stop_len[i]);
            if (m && (size_t)(m - s->text) < best) best = (size_t)(m - s->text);
        }
        if (best != SIZE_MAX) {
            s->text_len = best;
            slot_done(e, s, "stop");
            return;
        }
    }
    if (!stream_pending(e, s, id)) {
        slot_error(e, s, VLM_PROTO_INTERNAL, "out of memory streaming the answer");
        return;
    }
    if (stop == VLM_CHAT_STOP_KEEP_PIECE) {
        slot_done(e, s, "stop");
        return;
    }
    if ((int64_t)s->n_tokens >= s->job->req.max_tokens || s->n_past >= e->n_ctx) {
        slot_done(e, s, "length");
        return;
    }
    s->last_token = id;
    s->state = SLOT_DECODE;
}

/* One forward pass: a decode row for every generating job, then prompt
 * pieces of prefilling jobs (oldest first) within the prefill budget. */
static void step(vlm_engine_t *e) {
    const int np = e->o.n_parallel;
    int32_t n = 0, n_logits = 0;
    for (int i = 0; i < np; i++) {
        slot_t *s = &e->slots[i];
        s->in_step = false;
        s->logits_index = -1;
        if (s->state != SLOT_DECODE) continue;
        e->b_tokens[n] = s->last_token;
        e->b_pos[n] = s->n_past;
        e->b_seq[n] = i;
        s->logits_index = n_logits;
        e->b_logits_rows[n_logits++] = n;
        s->in_step = true;
        n++;
    }
    const int32_t n_decode = n;
    bool any_embd = false;
    int32_t used = 0;
    for (;;) {
        slot_t *s = NULL;
        for (int i = 0; i < np; i++) {
            slot_t *x = &e->slots[i];
            if (x->state == SLOT_PREFILL && !x->in_step && (!s || x->order < s->order)) s = x;
        }
        if (!s) break;
        const piece_t *p = &s->pieces[s->next_piece];
        if (used > 0 && used + p->n > e->o.prefill_budget) break;
        const vlm_chat_segment_t *seg = &s->chat.segments[p->seg];
        const int idx = (int)(s - e->slots);
        for (int32_t r = 0; r < p->n; r++) {
            const int32_t row = n + r;
            e->b_pos[row] = s->n_past + r;
            e->b_seq[row] = idx;
            if (seg->kind == VLM_CHAT_SEGMENT_IMAGE) {
                const vlm_embd_t *im = s->images[seg->image_index];
                e->b_tokens[row] = VLM_BATCH_EMBD_ROW;
                memcpy(e->b_embd + (size_t)row * (size_t)e->n_embd,
                       im->data + (size_t)(p->start + r) * (size_t)e->n_embd, (size_t)e->n_embd * sizeof(float));
                any_embd = true;
            } else {
                e->b_tokens[row] = s->ids[p->seg][p->start + r];
            }
        }
        if (s->next_piece == s->n_pieces - 1) {
            s->logits_index = n_logits;
            e->b_logits_rows[n_logits++] = n + p->n - 1;
        }
        if (s->next_piece == 0) s->t_prefill0 = vlm_now_ms();
        s->in_step = true;
        n += p->n;
        used += p->n;
    }
    if (n == 0) return;

    const vlm_batch_t b = {
        .n = n,
        .tokens = e->b_tokens,
        .embd = any_embd ? e->b_embd : NULL,
        .pos = e->b_pos,
        .seq = e->b_seq,
        .n_logits = n_logits,
        .logits_rows = e->b_logits_rows,
    };
    vlm_error_t err;
    vlm_error_clear(&err);
    const double t0 = vlm_now_ms();
    int rc = vlm_decoder_forward(e->dec, &b, e->logits, &err);
    const double dt = vlm_now_ms() - t0;
    pthread_mutex_lock(&e->stats_mu);
    e->stats.forward_passes++;
    if (n_decode > 0) {
        e->stats.decode_passes++;
        e->stats.decode_rows += n_decode;
        e->stats.decode_pass_ms += dt;
    }
    pthread_mutex_unlock(&e->stats_mu);
    if (rc != VLM_OK) {
        char msg[600];
        snprintf(msg, sizeof msg, "decoder: %s", err.msg);
        for (int i = 0; i < np; i++)
            if (e->slots[i].in_step) slot_error(e, &e->slots[i], VLM_PROTO_INTERNAL, msg);
        return;
    }

    for (int i = 0; i < np; i++) {
        slot_t *s = &e->slots[i];
        if (!s->in_step) continue;
        if (s->state == SLOT_DECODE) {
            s->n_past++;
        } else {
            s->n_past += s->pieces[s->next_piece].n;
            if (++s->next_piece < s->n_pieces) continue;
            s->t_prefilled = vlm_now_ms();
            pthread_mutex_lock(&e->stats_mu);
            e->stats.prompt_tokens += s->n_text_tokens;
            e->stats.image_tokens += s->n_image_rows;
            pthread_mutex_unlock(&e->stats_mu);
        }
        on_logits(e, s, e->logits + (size_t)s->logits_index * (size_t)e->n_vocab);
    }
}

/* ==== Engine thread: the loop =========================================== */

/* Reads commands, waiting up to timeout_ms (-1: forever) for the first. */
static void read_commands(vlm_engine_t *e, long timeout_ms) {
    zmq_pollitem_t item = {e->sock, 0, ZMQ_POLLIN, 0};
    if (timeout_ms != 0 && zmq_poll(&item, 1, timeout_ms) <= 0) return;
    for (;;) {
        vlm_engine_cmd_t cmd;
        int n = zmq_recv(e->sock, &cmd, sizeof cmd, ZMQ_DONTWAIT);
        if (n < 0) break;
        if (n != (int)sizeof cmd) continue;
        if (cmd.type == VLM_ENGINE_CMD_STOP && !e->stopping) {
            e->stopping = true;
            e->deadline = vlm_now_ms() + cmd.arg * 1000.0;
        } else if (cmd.type == VLM_ENGINE_CMD_STOP_NOW) {
            e->stopping = true;
            e->deadline = vlm_now_ms();
        }
    }
}

static int busy_slots(const vlm_engine_t *e) {
    int n = 0;
    for (int i = 0; i < e->o.n_parallel; i++) n += e->slots[i].state != SLOT_FREE;
    return n;
}

/* Moves queued jobs into free slots. */
static void admit(vlm_engine_t *e) {
    for (int i = 0; i < e->o.n_parallel; i++) {
        slot_t *s = &e->slots[i];
        if (s->state != SLOT_FREE) continue;
        vlm_job_t *job = vlm_queue_pop(e->queue);
        if (!job) break;
        s->job = job;
        s->state = SLOT_NEW;
        s->order = e->next_order++;
        s->t_admitted = vlm_now_ms();
        atomic_fetch_add(&e->n_active, 1);
    }
}

static void engine_loop(vlm_engine_t *e) {
    for (;;) {
        const bool have_work = busy_slots(e) > 0 || vlm_queue_len(e->queue) > 0;
        if (e->stopping && !have_work) break;
        long timeout = -1;
        if (have_work) timeout = 0;
        read_commands(e, timeout);

        /* Cancelled jobs, queued or running. */
        vlm_job_t *job;
        while ((job = vlm_queue_pop_cancelled(e->queue))) {
            if (atomic_load(&job->cancel) == VLM_JOB_SHUTDOWN)
                job_error(e, &job, VLM_PROTO_SHUTTING_DOWN, "the daemon is shutting down");
            else
                job_cancelled_unstarted(e, &job);
        }
        for (int i = 0; i < e->o.n_parallel; i++) {
            slot_t *s = &e->slots[i];
            if (s->state == SLOT_FREE) continue;
            int why = atomic_load(&s->job->cancel);
            if (why != VLM_JOB_RUNNING) slot_cancel(e, s, why);
        }

        if (e->stopping) {
            /* Queued jobs never start; running ones have until the deadline. */
            while ((job = vlm_queue_pop(e->queue)))
                job_error(e, &job, VLM_PROTO_SHUTTING_DOWN, "the daemon is shutting down");
            if (vlm_now_ms() >= e->deadline)
                for (int i = 0; i < e->o.n_parallel; i++)
                    if (e->slots[i].state != SLOT_FREE) slot_cancel(e, &e->slots[i], VLM_JOB_SHUTDOWN);
        } else {
            admit(e);
        }
        prepare_new(e);
        step(e);
    }
}

static void *engine_main(void *arg) {
    vlm_engine_t *e = arg;
    engine_loop(e);
    send_event(e, NULL, VLM_ENGINE_EV_EXIT, 0, NULL);
    zmq_close(e->sock);
    e->sock = NULL;
    return NULL;
}
