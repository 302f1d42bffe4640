/* daemon/protocol.c - request parsing and event writing for the vlmd
 * protocol (docs/protocol.md), with jansson doing all the JSON.
 *
 * Parsing is strict about types and ranges and lenient about the rest:
 * unknown fields are ignored and a JSON null counts as an absent field, so
 * clients in any language can send their defaults as null.
 */
#include "daemon/protocol.h"

#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/utf8.h"
#include "text/chat.h"
#include "vision/preprocess.h"

/* Real numbers are written with 9 significant digits (timings, uptime). */
#define DUMP_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION(9))

/* ==== Error codes ======================================================= */

static const char *const error_names[] = {
#define VLM__PROTO_NAME(e, name) name,
    VLM_PROTO_ERROR_LIST(VLM__PROTO_NAME)
#undef VLM__PROTO_NAME
};

const char *vlm_proto_error_name(vlm_proto_error_t code) {
    if ((int)code < 0 || code >= VLM_PROTO_ERROR_COUNT) return "internal";
    return error_names[code];
}

vlm_proto_error_t vlm_proto_error_from_status(int status) {
    switch (status) {
    case VLM_ERR_IMAGE: return VLM_PROTO_BAD_IMAGE;
    case VLM_ERR_TOO_LARGE: return VLM_PROTO_TOO_LARGE;
    case VLM_ERR_CONTEXT_OVERFLOW: return VLM_PROTO_CONTEXT_OVERFLOW;
    case VLM_ERR_INVALID_ARG: return VLM_PROTO_BAD_REQUEST;
    case VLM_ERR_BUSY: return VLM_PROTO_BUSY;
    case VLM_ERR_CANCELLED: return VLM_PROTO_CANCELLED;
    case VLM_ERR_SHUTTING_DOWN: return VLM_PROTO_SHUTTING_DOWN;
    default: return VLM_PROTO_INTERNAL;
    }
}

/* ==== Requests ========================================================== */

void vlm_request_init(vlm_request_t *r) {
    memset(r, 0, sizeof *r);
    r->op = VLM_OP_NONE;
    r->preprocess = -1;
    r->max_tokens = VLM_PROTO_DEFAULT_MAX_TOKENS;
    vlm_sampler_params_default(&r->sampling);
    /* The protocol's defaults differ from llama.cpp's in two places: greedy
     * unless asked, and a fixed seed so the same request gives the same
     * answer. */
    r->sampling.temperature = 0.0f;
    r->sampling.seed = 0;
}

void vlm_request_deinit(vlm_request_t *r) {
    if (!r) return;
    free(r->id);
    free(r->prompt);
    free(r->system);
    free(r->template_name);
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
    free(r->stop);
    free(r->stop_len);
    free(r->target);
    vlm_request_init(r);
}

/* A parse failure: the code and its sentence. */
typedef struct parse_ctx {
    char *msg;
    size_t cap;
} parse_ctx_t;

static int bad(parse_ctx_t *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int bad(parse_ctx_t *c, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->msg, c->cap, fmt, ap);
    va_end(ap);
    return code;
}

/* The field key of o, or NULL when absent or null. */
static json_t *field(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return v && !json_is_null(v) ? v : NULL;
}

/* Copies string field key into *out (NULL when absent). Returns -1 or an
 * error code. */
static int get_string(parse_ctx_t *c, json_t *o, const char *key, bool required, size_t min_len,
                      size_t max_len, char **out) {
    json_t *v = field(o, key);
    if (!v) {
        if (required) return bad(c, VLM_PROTO_BAD_REQUEST, "missing field \"%s\"", key);
        return -1;
    }
    if (!json_is_string(v)) return bad(c, VLM_PROTO_BAD_REQUEST, "field \"%s\" must be a string", key);
    size_t n = json_string_length(v);
    if (n < min_len || n > max_len)
        return bad(c, VLM_PROTO_BAD_REQUEST, "field \"%s\" must be %zu to %zu bytes long (got %zu)", key,
                   min_len, max_len, n);
    *out = strdup(json_string_value(v));
    if (!*out) return bad(c, VLM_PROTO_INTERNAL, "out of memory");
    return -1;
}

/* Reads integer field key in [lo, hi] into *out (unchanged when absent).
 * A real with an integral value is accepted. */
static int get_int(parse_ctx_t *c, json_t *o, const char *key, int64_t lo, int64_t hi, int64_t *out) {
    json_t *v = field(o, key);
    if (!v) return -1;
    int64_t x;
    if (json_is_integer(v)) {
        x = (int64_t)json_integer_value(v);
    } else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
               fabs(json_real_value(v)) < 9e15) {
        x = (int64_t)json_real_value(v);
    } else {
        return bad(c, VLM_PROTO_BAD_REQUEST, "field \"%s\" must be an integer", key);
    }
    if (x < lo || x > hi)
        return bad(c, VLM_PROTO_BAD_REQUEST, "field \"%s\" must be in [%lld, %lld] (got %lld)", key,
                   (long long)lo, (long long)hi, (long long)x);
    *out = x;
    return -1;
}

/* Reads number field key into *out (unchanged when absent); the range check
 * is the caller's. */
static int get_number(parse_ctx_t *c, json_t *o, const char *key, double *out, bool *present) {
    json_t *v = field(o, key);
    *present = false;
    if (!v) return -1;
    if (!json_is_number(v)) return bad(c, VLM_PROTO_BAD_REQUEST, "field \"%s\" must be a number", key);
    *out = json_number_value(v);
    *present = true;
    return -1;
}

/* Parses the fields of a generate request into r. */
static int parse_generate(parse_ctx_t *c, json_t *o, int n_images, const size_t *image_sizes,
                          const vlm_request_limits_t *lim, vlm_request_t *r) {
    int rc;
    if ((rc = get_string(c, o, "prompt", true, 0, SIZE_MAX, &r->prompt)) >= 0) return rc;
    if ((rc = get_string(c, o, "system", false, 0, SIZE_MAX, &r->system)) >= 0) return rc;
    if ((rc = get_string(c, o, "template", false, 1, 64, &r->template_name)) >= 0) return rc;
    if (r->template_name && vlm_chat_template_from_name(r->template_name) == VLM_CHAT_TEMPLATE_UNKNOWN)
        return bad(c, VLM_PROTO_BAD_REQUEST,
                   "unknown template \"%s\" (vicuna, llama2, llama3, mistral, chatml, raw)", r->template_name);
    char *pre = NULL;
    if ((rc = get_string(c, o, "preprocess", false, 1, 64, &pre)) >= 0) return rc;
    if (pre) {
        r->preprocess = vlm_preprocess_mode_from_name(pre);
        if (r->preprocess < 0) {
            rc = bad(c, VLM_PROTO_BAD_REQUEST, "field \"preprocess\" must be \"hf\" or \"llamacpp\" (got \"%s\")", pre);
            free(pre);
            return rc;
        }
        free(pre);
    }

    int64_t iv = r->max_tokens;
    if ((rc = get_int(c, o, "max_tokens", 1, VLM_PROTO_MAX_TOKENS, &iv)) >= 0) return rc;
    r->max_tokens = (int32_t)iv;
    vlm_sampler_params_t *sp = &r->sampling;
    iv = sp->top_k;
    if ((rc = get_int(c, o, "top_k", 0, INT32_MAX, &iv)) >= 0) return rc;
    sp->top_k = (int32_t)iv;
    iv = sp->penalty_last_n;
    if ((rc = get_int(c, o, "repeat_last_n", 0, 1 << 20, &iv)) >= 0) return rc;
    sp->penalty_last_n = (int32_t)iv;
    iv = (int64_t)sp->seed;
    if ((rc = get_int(c, o, "seed", 0, INT64_MAX, &iv)) >= 0) return rc;
    sp->seed = (uint64_t)iv;

    double x;
    bool present;
    if ((rc = get_number(c, o, "temperature", &x, &present)) >= 0) return rc;
    if (present) {
        if (!(x >= 0.0 && x <= 1e6))
            return bad(c, VLM_PROTO_BAD_REQUEST, "field \"temperature\" must be a number >= 0 (got %g)", x);
        sp->temperature = (float)x;
    }
    if ((rc = get_number(c, o, "top_p", &x, &present)) >= 0) return rc;
    if (present) {
        if (!(x > 0.0 && x <= 1.0))
            return bad(c, VLM_PROTO_BAD_REQUEST, "field \"top_p\" must be in (0, 1] (got %g)", x);
        sp->top_p = (float)x;
    }
    if ((rc = get_number(c, o, "min_p", &x, &present)) >= 0) return rc;
    if (present) {
        if (!(x >= 0.0 && x <= 1.0))
            return bad(c, VLM_PROTO_BAD_REQUEST, "field \"min_p\" must be in [0, 1] (got %g)", x);
        sp->min_p = (float)x;
    }
    if ((rc = get_number(c, o, "repeat_penalty", &x, &present)) >= 0) return rc;
    if (present) {
        if (!(x > 0.0 && x <= 10.0))
            return bad(c, VLM_PROTO_BAD_REQUEST, "field \"repeat_penalty\" must be in (0, 10] (got %g)", x);
        sp->repeat_penalty = (float)x;
    }
    vlm_error_t err;
    if (vlm_sampler_params_validate(sp, &err) != VLM_OK) return bad(c, VLM_PROTO_BAD_REQUEST, "%s", err.msg);

    json_t *v = field(o, "stream");
    if (v) {
        if (!json_is_boolean(v)) return bad(c, VLM_PROTO_BAD_REQUEST, "field \"stream\" must be true or false");
        r->stream = json_is_true(v);
    }
    v = field(o, "stop");
    if (v) {
        if (!json_is_array(v)) return bad(c, VLM_PROTO_BAD_REQUEST, "field \"stop\" must be an array of strings");
        size_t n = json_array_size(v);
        if (n > VLM_PROTO_MAX_STOP)
            return bad(c, VLM_PROTO_BAD_REQUEST, "at most %d stop strings (got %zu)", VLM_PROTO_MAX_STOP, n);
        if (n) {
            r->stop = calloc(n, sizeof *r->stop);
            r->stop_len = calloc(n, sizeof *r->stop_len);
            if (!r->stop || !r->stop_len) return bad(c, VLM_PROTO_INTERNAL, "out of memory");
        }
        for (size_t i = 0; i < n; i++) {
            json_t *s = json_array_get(v, i);
            if (!json_is_string(s)) return bad(c, VLM_PROTO_BAD_REQUEST, "stop string %zu is not a string", i);
            size_t len = json_string_length(s);
            if (len == 0 || len > VLM_PROTO_MAX_STOP_LEN)
                return bad(c, VLM_PROTO_BAD_REQUEST, "stop string %zu must be 1 to %d bytes long", i,
                           VLM_PROTO_MAX_STOP_LEN);
            r->stop[i] = strdup(json_string_value(s));
            if (!r->stop[i]) return bad(c, VLM_PROTO_INTERNAL, "out of memory");
            r->stop_len[i] = len;
            r->n_stop++;
        }
    }

    /* The image frames. */
    if (n_images > lim->max_images)
        return bad(c, VLM_PROTO_TOO_LARGE, "%d images is more than the limit of %d per request", n_images,
                   lim->max_images);
    for (int i = 0; i < n_images; i++) {
        if (image_sizes[i] == 0) return bad(c, VLM_PROTO_BAD_IMAGE, "image %d: the frame is empty", i + 1);
        if (image_sizes[i] > lim->max_image_bytes)
            return bad(c, VLM_PROTO_TOO_LARGE, "image %d: %zu bytes is more than the limit of %zu", i + 1,
                       image_sizes[i], lim->max_image_bytes);
    }
    const int n_markers = vlm_chat_count_markers(r->prompt);
    if (n_markers > 0 && n_markers != n_images)
        return bad(c, VLM_PROTO_BAD_REQUEST, "the prompt has %d \"<image>\" markers but %d image frames came",
                   n_markers, n_images);
    r->n_images = n_images;
    return -1;
}

int vlm_request_parse(const void *header, size_t size, int n_images, const size_t *image_sizes,
                      const vlm_request_limits_t *lim, vlm_request_t *r, char *msg, size_t msg_cap) {
    parse_ctx_t c = {msg, msg_cap};
    vlm_request_init(r);
    msg[0] = '\0';
    /* An oversize header is still read (it is in memory already, and parsing
     * costs milliseconds) when it is not absurdly large, so that the error
     * can name the job. */
    const bool too_large = size > lim->max_header_bytes;
    if (too_large && size > 16 * lim->max_header_bytes)
        return bad(&c, VLM_PROTO_TOO_LARGE, "the header frame is %zu bytes, more than the limit of %zu", size,
                   lim->max_header_bytes);
    json_error_t jerr;
    json_t *o = json_loadb(header, size, JSON_REJECT_DUPLICATES, &jerr);
    if (too_large) {
        if (o && json_is_object(o)) get_string(&c, o, "id", false, 1, VLM_PROTO_MAX_ID, &r->id);
        json_decref(o);
        return bad(&c, VLM_PROTO_TOO_LARGE, "the header frame is %zu bytes, more than the limit of %zu", size,
                   lim->max_header_bytes);
    }
    if (!o) return bad(&c, VLM_PROTO_BAD_REQUEST, "the header is not valid JSON: %s", jerr.text);
    int rc = -1;
    if (!json_is_object(o)) {
        rc = bad(&c, VLM_PROTO_BAD_REQUEST, "the header must be a JSON object");
        goto done;
    }
    /* The id first, so that later errors can name the job. */
    if ((rc = get_string(&c, o, "id", true, 1, VLM_PROTO_MAX_ID, &r->id)) >= 0) goto done;
    json_t *v = field(o, "v");
    if (!v) {
        rc = bad(&c, VLM_PROTO_BAD_REQUEST, "missing field \"v\" (the protocol version, %d)", VLM_PROTO_VERSION);
        goto done;
    }
    if (!json_is_integer(v) || json_integer_value(v) != VLM_PROTO_VERSION) {
        rc = bad(&c, VLM_PROTO_BAD_REQUEST, "unsupported protocol version (this daemon speaks v=%d)",
                 VLM_PROTO_VERSION);
        goto done;
    }
    v = field(o, "op");
    if (!v) {
        rc = bad(&c, VLM_PROTO_BAD_REQUEST, "missing field \"op\"");
        goto done;
    }
    if (!json_is_string(v)) {
        rc = bad(&c, VLM_PROTO_BAD_REQUEST, "field \"op\" must be a string");
        goto done;
    }
    const char *op = json_string_value(v);
    if (strcmp(op, "generate") == 0) {
        r->op = VLM_OP_GENERATE;
        rc = parse_generate(&c, o, n_images, image_sizes, lim, r);
    } else if (strcmp(op, "cancel") == 0) {
        r->op = VLM_OP_CANCEL;
        rc = get_string(&c, o, "target", true, 1, VLM_PROTO_MAX_ID, &r->target);
    } else if (strcmp(op, "health") == 0) {
        r->op = VLM_OP_HEALTH;
    } else if (strcmp(op, "stats") == 0) {
        r->op = VLM_OP_STATS;
    } else if (strcmp(op, "model") == 0) {
        r->op = VLM_OP_MODEL;
    } else {
        char shown[64];
        snprintf(shown, sizeof shown, "%s", op);
        rc = bad(&c, VLM_PROTO_UNKNOWN_OP, "unknown op \"%s\" (generate, cancel, health, stats, model)", shown);
    }
done:
    json_decref(o);
    return rc;
}

/* ==== Events ============================================================ */

/* Dumps o (stolen) as compact JSON; NULL when o is NULL or out of memory. */
static char *dump(json_t *o) {
    if (!o) return NULL;
    char *s = json_dumps(o, DUMP_FLAGS);
    json_decref(o);
    return s;
}

/* Rounds a duration to microseconds, so events stay short. */
static double ms3(double ms) { return round(ms * 1000.0) / 1000.0; }

char *vlm_event_error(const char *id, vlm_proto_error_t code, const char *message) {
    /* message may come from a library and hold anything: make it UTF-8. */
    char *m = vlm_utf8_sanitize(message ? message : "", message ? strlen(message) : 0, NULL);
    if (!m) return NULL;
    char *s = dump(json_pack("{s:i, s:s, s:s, s:s, s:s}", "v", VLM_PROTO_VERSION, "id", id ? id : "", "event",
                             "error", "code", vlm_proto_error_name(code), "message", m));
    free(m);
    return s;
}

char *vlm_event_token(const char *id, int64_t index, const char *text, size_t len, int32_t token) {
    json_t *o = json_pack("{s:i, s:s, s:s, s:I, s:s%}", "v", VLM_PROTO_VERSION, "id", id, "event", "token",
                          "index", (json_int_t)index, "text", text, len);
    if (o && token >= 0 && json_object_set_new(o, "token", json_integer(token)) != 0) {
        json_decref(o);
        return NULL;
    }
    return dump(o);
}

char *vlm_event_done(const char *id, const char *text, size_t len, const vlm_job_report_t *rep) {
    json_t *ids = json_array();
    for (size_t i = 0; ids && i < rep->n_tokens; i++)
        if (json_array_append_new(ids, json_integer(rep->tokens[i])) != 0) {
            json_decref(ids);
            ids = NULL;
        }
    json_t *o = json_pack(
        "{s:i, s:s, s:s, s:s%, s:s, s:{s:I, s:I, s:I}, s:{s:f, s:f, s:f, s:f, s:f, s:f}, s:I, s:o*}",
        "v", VLM_PROTO_VERSION, "id", id, "event", "done", "text", text, len, "finish_reason",
        rep->finish_reason, "usage", "prompt_tokens", (json_int_t)rep->prompt_tokens, "image_tokens",
        (json_int_t)rep->image_tokens, "completion_tokens", (json_int_t)rep->completion_tokens, "timings",
        "queue_ms", ms3(rep->queue_ms), "image_decode_ms", ms3(rep->image_decode_ms), "encode_ms",
        ms3(rep->encode_ms), "prefill_ms", ms3(rep->prefill_ms), "decode_ms", ms3(rep->decode_ms), "total_ms",
        ms3(rep->total_ms), "image_cache_hits", (json_int_t)rep->image_cache_hits, "tokens", ids);
    return dump(o);
}

char *vlm_event_cancel(const char *id, const char *target, bool found) {
    return dump(json_pack("{s:i, s:s, s:s, s:s, s:b}", "v", VLM_PROTO_VERSION, "id", id, "event", "cancel",
                          "target", target, "found", found));
}
