/* daemon/protocol.h - the vlmd wire protocol (docs/protocol.md) in C:
 * request headers parsed and checked with jansson, events written as JSON,
 * the stable error codes, and the UTF-8 rules for streamed text.
 *
 * Nothing here touches a socket or the model, so the I/O thread and the
 * engine thread share it, and every rule of the protocol lives in one place.
 */
#ifndef VLM_DAEMON_PROTOCOL_H
#define VLM_DAEMON_PROTOCOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/utf8.h"
#include "text/sampler.h"

#define VLM_PROTO_VERSION 1
#define VLM_PROTO_MAX_ID 128          /* bytes of a job id */
#define VLM_PROTO_MAX_STOP 16         /* stop strings per request */
#define VLM_PROTO_MAX_STOP_LEN 256    /* bytes of one stop string */
#define VLM_PROTO_MAX_TOKENS 65536    /* largest max_tokens */
#define VLM_PROTO_DEFAULT_MAX_TOKENS 256

/* ==== Error codes ======================================================= */

/* X(enum, wire name). The wire names are stable: clients switch on them. */
#define VLM_PROTO_ERROR_LIST(X)                          \
    X(VLM_PROTO_BAD_REQUEST, "bad_request")              \
    X(VLM_PROTO_UNKNOWN_OP, "unknown_op")                \
    X(VLM_PROTO_BAD_IMAGE, "bad_image")                  \
    X(VLM_PROTO_TOO_LARGE, "too_large")                  \
    X(VLM_PROTO_CONTEXT_OVERFLOW, "context_overflow")    \
    X(VLM_PROTO_BUSY, "busy")                            \
    X(VLM_PROTO_CANCELLED, "cancelled")                  \
    X(VLM_PROTO_SHUTTING_DOWN, "shutting_down")          \
    X(VLM_PROTO_INTERNAL, "internal")

typedef enum vlm_proto_error {
#define VLM__PROTO_ENUM(e, name) e,
    VLM_PROTO_ERROR_LIST(VLM__PROTO_ENUM)
#undef VLM__PROTO_ENUM
    VLM_PROTO_ERROR_COUNT
} vlm_proto_error_t;

/* The wire name of an error code ("bad_image"); "internal" for values out
 * of range. Static. */
const char *vlm_proto_error_name(vlm_proto_error_t code);

/* The protocol code for a library status (VLM_ERR_IMAGE -> bad_image,
 * VLM_ERR_TOO_LARGE -> too_large, VLM_ERR_CONTEXT_OVERFLOW ->
 * context_overflow, VLM_ERR_INVALID_ARG -> bad_request, others -> internal). */
vlm_proto_error_t vlm_proto_error_from_status(int status);

/* ==== Requests ========================================================== */

typedef enum vlm_op {
    VLM_OP_NONE = -1,           /* not (yet) known */
    VLM_OP_GENERATE = 0,
    VLM_OP_CANCEL,
    VLM_OP_HEALTH,
    VLM_OP_STATS,
    VLM_OP_MODEL,
} vlm_op_t;

/* Limits a request is checked against (the daemon's flags). */
typedef struct vlm_request_limits {
    size_t max_header_bytes;   /* header frame size */
    size_t max_image_bytes;    /* one image frame */
    int max_images;            /* image frames per request */
} vlm_request_limits_t;

/* A parsed request header; caller-owned, released with vlm_request_deinit().
 * Strings are NUL-terminated copies owned by the struct. */
typedef struct vlm_request {
    vlm_op_t op;
    char *id;                    /* 1..VLM_PROTO_MAX_ID bytes */
    /* generate */
    char *prompt;
    char *system;                /* NULL: the template's default */
    char *template_name;         /* NULL: the daemon's choice */
    int preprocess;              /* vlm_preprocess_mode_t, or -1 for the daemon's default */
    int32_t max_tokens;          /* 1..VLM_PROTO_MAX_TOKENS */
    vlm_sampler_params_t sampling;
    char **stop;                 /* [n_stop] extra stop strings */
    size_t *stop_len;            /* [n_stop] */
    int n_stop;
    bool stream;
    int n_images;                /* image frames that came with the header */
    /* cancel */
    char *target;
} vlm_request_t;

void vlm_request_init(vlm_request_t *r);
/* Frees every string and empties r; NULL-safe. */
void vlm_request_deinit(vlm_request_t *r);

/* Parses and checks a header frame of size bytes that came with n_images
 * image frames (their sizes in image_sizes[n_images]). Returns -1 when the
 * request is valid (r filled), else the protocol error code, with a sentence
 * in msg[msg_cap]; r->id is set whenever the header had a usable id, so the
 * error can be addressed to the job. r is initialised here. */
int vlm_request_parse(const void *header, size_t size, int n_images, const size_t *image_sizes,
                      const vlm_request_limits_t *lim, vlm_request_t *r, char *msg, size_t msg_cap);

/* ==== Events ============================================================ */

/* Each builder returns a malloc'd NUL-terminated compact JSON text (the
 * caller frees it), or NULL when out of memory. Strings given here must be
 * valid UTF-8 (ids and texts from parsed requests always are). */

/* {"v":1,"id":id,"event":"error","code":..,"message":..}; id NULL gives "". */
char *vlm_event_error(const char *id, vlm_proto_error_t code, const char *message);

/* {"v":1,"id":id,"event":"token","index":index,"text":text[,"token":token]};
 * token < 0 leaves "token" out (a flush of held-back text). */
char *vlm_event_token(const char *id, int64_t index, const char *text, size_t len, int32_t token);

/* The usage and timings of a finished job. */
typedef struct vlm_job_report {
    const char *finish_reason;   /* "stop", "length", "cancelled" */
    int64_t prompt_tokens, image_tokens, completion_tokens;
    const int32_t *tokens;       /* [n_tokens] sampled ids, or NULL */
    size_t n_tokens;
    double queue_ms, image_decode_ms, encode_ms, prefill_ms, decode_ms, total_ms;
    int64_t image_cache_hits;    /* images of this job found in the cache */
} vlm_job_report_t;

/* {"v":1,"id":..,"event":"done","text":..,"finish_reason":..,"usage":{..},
 * "timings":{..},"tokens":[..]}; text must be valid UTF-8. */
char *vlm_event_done(const char *id, const char *text, size_t len, const vlm_job_report_t *rep);

/* {"v":1,"id":id,"event":"cancel","target":target,"found":found}. */
char *vlm_event_cancel(const char *id, const char *target, bool found);

/* UTF-8 sanitizing and stream cuts: core/utf8.h (vlm_utf8_sanitize,
 * vlm_utf8_stream_cut), shared with vlm-run. */

#endif
