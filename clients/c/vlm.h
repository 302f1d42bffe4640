/* clients/c/vlm.h - libvlm, the C client of the vlmd daemon.
 *
 * libvlm speaks the vlmd wire protocol (docs/protocol.md) over one ZeroMQ
 * DEALER socket, so one client can have several jobs in flight and receive
 * their streamed pieces interleaved. It offers three layers:
 *   - blocking calls: vlm_client_ask() returns the whole answer,
 *     vlm_client_ask_stream() calls a function per streamed piece, and the
 *     ops vlm_client_health(), _stats(), _model(), _cancel();
 *   - an asynchronous pair for many jobs at once: vlm_client_submit() sends
 *     a job and vlm_client_poll() hands back its events (token, done, error)
 *     one at a time; every submitted job ends with exactly one done or error
 *     event, including the failures the client itself detects (timeout,
 *     lost connection);
 *   - error codes that mirror the daemon's stable codes, plus client-side
 *     ones, each with a sentence from vlm_client_errmsg().
 *
 * Timeouts: a client never waits forever. opts.timeout_ms bounds how long
 * the daemon may stay silent: the wait to connect, the wait for the answer
 * to an op, and, while a job runs, the wait for a sign of life (when a job
 * is quiet for half of it the client sends a health probe, which the daemon
 * answers at once even under load). A job may also carry its own deadline
 * (vlm_client_params_t.timeout_ms). A daemon that goes away while jobs run is
 * noticed at once through the socket monitor (VLM_CLIENT_ERR_CONNECT).
 *
 * Threads: the library has no global state. A client is not thread-safe:
 * use one client per thread (or guard one with your own mutex). Clients may
 * share a ZeroMQ context given in the options; otherwise each makes its own.
 *
 * Text: every text handed out (pieces, answers) is NUL-terminated and also
 * has its length, as an answer may in principle contain a NUL byte.
 */
#ifndef VLM_CLIENT_VLM_H
#define VLM_CLIENT_VLM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define VLM_CLIENT_DEFAULT_ENDPOINT "tcp://127.0.0.1:5555"
#define VLM_CLIENT_ID_MAX 128          /* bytes of a job id (the protocol's limit) */
#define VLM_CLIENT_DEFAULT_TIMEOUT_MS 10000

/* ==== Error codes ======================================================= */

/* X(enum, value, wire name, message). The first nine mirror the daemon's
 * stable error codes (docs/protocol.md); the rest happen in the client. */
#define VLM_CLIENT_ERROR_LIST(X)                                                                   \
    X(VLM_CLIENT_OK, 0, "ok", "success")                                                           \
    X(VLM_CLIENT_ERR_BAD_REQUEST, -1, "bad_request", "the daemon rejected the request")             \
    X(VLM_CLIENT_ERR_UNKNOWN_OP, -2, "unknown_op", "the daemon does not know the op")               \
    X(VLM_CLIENT_ERR_BAD_IMAGE, -3, "bad_image", "an image could not be decoded")                   \
    X(VLM_CLIENT_ERR_TOO_LARGE, -4, "too_large", "an input is over the daemon's limits")            \
    X(VLM_CLIENT_ERR_CONTEXT_OVERFLOW, -5, "context_overflow", "the prompt does not fit the context") \
    X(VLM_CLIENT_ERR_BUSY, -6, "busy", "the daemon is busy")                                        \
    X(VLM_CLIENT_ERR_CANCELLED, -7, "cancelled", "the job was cancelled")                           \
    X(VLM_CLIENT_ERR_SHUTTING_DOWN, -8, "shutting_down", "the daemon is shutting down")             \
    X(VLM_CLIENT_ERR_INTERNAL, -9, "internal", "internal error in the daemon")                      \
    X(VLM_CLIENT_ERR_TIMEOUT, -10, "timeout", "the daemon did not answer in time")                  \
    X(VLM_CLIENT_ERR_CONNECT, -11, "connect", "no connection to the daemon")                        \
    X(VLM_CLIENT_ERR_PROTOCOL, -12, "protocol", "the daemon's answer broke the protocol")           \
    X(VLM_CLIENT_ERR_IO, -13, "io", "input/output error")                                           \
    X(VLM_CLIENT_ERR_INVALID_ARG, -14, "invalid_arg", "invalid argument")                           \
    X(VLM_CLIENT_ERR_NOMEM, -15, "nomem", "out of memory")

typedef enum vlm_client_status {
#define VLM__CLIENT_ERR_ENUM(e, value, name, msg) e = value,
    VLM_CLIENT_ERROR_LIST(VLM__CLIENT_ERR_ENUM)
#undef VLM__CLIENT_ERR_ENUM
} vlm_client_status_t;

/* The static message of a code ("the daemon is busy"); never NULL. */
const char *vlm_client_strerror(int code);

/* The wire name of a code ("bad_image", "timeout"); "internal" for a value
 * that is not a code. Static. */
const char *vlm_client_err_name(int code);

/* The code for a wire name; VLM_CLIENT_ERR_INTERNAL for an unknown name
 * (a newer daemon's code is still an error). */
int vlm_client_err_from_name(const char *name);

/* ==== Requests and results ============================================== */

/* One image: bytes (data, size; not copied beyond the call) or a path read
 * when the request is sent. JPEG, PNG or binary PPM/PGM, as in a file. */
typedef struct vlm_client_image {
    const void *data;      /* NULL: use path */
    size_t size;
    const char *path;
} vlm_client_image_t;

/* What to ask. Set it up with vlm_client_params_init(), which marks every
 * optional field as unset (the daemon's default is then used), then fill in
 * what you need. The strings and arrays are borrowed for the call. */
typedef struct vlm_client_params {
    const char *prompt;                 /* required; may hold <image> markers */
    const vlm_client_image_t *images;          /* [n_images] */
    size_t n_images;
    const char *system;                 /* NULL: the template's */
    const char *template_name;          /* NULL: the model's */
    const char *preprocess;             /* "hf", "llamacpp", NULL: the daemon's */
    int32_t max_tokens;                 /* <= 0: the daemon's (256) */
    double temperature;                 /* < 0: the daemon's (0, greedy) */
    int32_t top_k;                      /* < 0: the daemon's */
    double top_p;                       /* < 0: the daemon's */
    double min_p;                       /* < 0: the daemon's */
    double repeat_penalty;              /* < 0: the daemon's */
    int32_t repeat_last_n;              /* < 0: the daemon's */
    int64_t seed;                       /* < 0: the daemon's */
    const char *const *stop;            /* [n_stop] extra stop strings */
    size_t n_stop;
    bool stream;                        /* vlm_client_submit(): send token events */
    int32_t timeout_ms;                 /* deadline for the whole job; 0: none */
} vlm_client_params_t;

void vlm_client_params_init(vlm_client_params_t *p);

typedef struct vlm_client_usage {
    int64_t prompt_tokens;
    int64_t image_tokens;
    int64_t completion_tokens;
} vlm_client_usage_t;

typedef struct vlm_client_timings {
    double queue_ms, image_decode_ms, encode_ms, prefill_ms, decode_ms, total_ms;
} vlm_client_timings_t;

/* A finished job (the done event). Caller-owned: vlm_client_result_init() before
 * use, vlm_client_result_deinit() after; the calls that fill it free what it held. */
typedef struct vlm_client_result {
    char *text;                 /* the whole answer, NUL-terminated, owned */
    size_t text_len;
    char finish_reason[16];     /* "stop", "length" or "cancelled" */
    vlm_client_usage_t usage;
    vlm_client_timings_t timings;
    char *json;                 /* the done event as received, owned */
} vlm_client_result_t;

void vlm_client_result_init(vlm_client_result_t *r);
void vlm_client_result_deinit(vlm_client_result_t *r);

typedef enum vlm_client_event_type {
    VLM_CLIENT_EVENT_NONE = 0,
    VLM_CLIENT_EVENT_TOKEN,            /* a streamed piece: index, text */
    VLM_CLIENT_EVENT_DONE,             /* the job ended: result */
    VLM_CLIENT_EVENT_ERROR,            /* the job failed: error, message */
} vlm_client_event_type_t;

/* One event of a submitted job. Caller-owned: vlm_client_event_init() before use,
 * vlm_client_event_deinit() after; vlm_client_poll() frees what it held. */
typedef struct vlm_client_event {
    vlm_client_event_type_t type;
    char job_id[VLM_CLIENT_ID_MAX + 1];
    void *user;                 /* the pointer given to vlm_client_submit() */
    int64_t index;              /* TOKEN: 0, 1, 2, ... */
    char *text;                 /* TOKEN: the piece, NUL-terminated, owned */
    size_t text_len;
    vlm_client_result_t result;        /* DONE */
    int error;                  /* ERROR: a negative VLM_CLIENT_ERR_* code */
    char code[32];              /* ERROR: the wire name ("bad_image") */
    char message[512];          /* ERROR: the daemon's or the client's sentence */
} vlm_client_event_t;

void vlm_client_event_init(vlm_client_event_t *ev);
void vlm_client_event_deinit(vlm_client_event_t *ev);

/* The answer to a health op. */
typedef struct vlm_client_health {
    char status[16];            /* "ok" or "stopping" */
    double uptime_s;
    int64_t active, queued;
} vlm_client_health_t;

/* ==== Client ============================================================ */

typedef struct vlm_client vlm_client_t;

typedef struct vlm_client_opts {
    int32_t timeout_ms;         /* longest silence from the daemon; <= 0: the default (10 s) */
    void *zmq_ctx;              /* a ZeroMQ context to share (the caller keeps it), NULL: own */
} vlm_client_opts_t;

void vlm_client_opts_init(vlm_client_opts_t *o);

/* Makes a client for endpoint (NULL: $VLM_ENDPOINT, else
 * VLM_CLIENT_DEFAULT_ENDPOINT); opts may be NULL. Connecting happens in the
 * background, so a daemon that is not there yet is only noticed by the
 * first call. Returns NULL on failure (bad endpoint, no memory) with a
 * sentence in err[err_cap] (err may be NULL). Destroy with
 * vlm_client_destroy(). */
vlm_client_t *vlm_client_new(const char *endpoint, const vlm_client_opts_t *opts, char *err, size_t err_cap);

/* Cancels the jobs still in flight (best effort), closes the socket and
 * frees the client; NULL-safe, clears *self_p. */
void vlm_client_destroy(vlm_client_t **self_p);

/* The sentence about the last failure of this client (static until the
 * next call on it); "" when there was none. */
const char *vlm_client_errmsg(const vlm_client_t *c);

/* The endpoint the client connects to (owned by the client). */
const char *vlm_client_endpoint(const vlm_client_t *c);

/* Sets the timeout of the later calls (see the file header); <= 0 restores
 * the default. */
void vlm_client_set_timeout(vlm_client_t *c, int32_t timeout_ms);

/* ==== Blocking calls ==================================================== */

/* Asks and waits for the whole answer, which goes into out (which must have
 * been initialised; what it held is freed). Returns 0, or a negative code
 * with the sentence in vlm_client_errmsg(): a daemon code when the job
 * failed there, a client code for timeouts and connection trouble. */
int vlm_client_ask(vlm_client_t *c, const vlm_client_params_t *p, vlm_client_result_t *out);

/* Called for each streamed piece (len bytes, NUL-terminated, valid UTF-8;
 * the pieces join to the final text). Return 0 to go on, non-zero to cancel
 * the job. */
typedef int (*vlm_client_token_fn)(const char *piece, size_t len, void *user);

/* vlm_client_ask() with streaming: fn(piece, len, user) is called for each
 * piece in order. When fn asks to cancel, a cancel op is sent and the job's
 * done event awaited; the call then returns 0 with finish_reason
 * "cancelled" and the text so far. out may be NULL. */
int vlm_client_ask_stream(vlm_client_t *c, const vlm_client_params_t *p, vlm_client_token_fn fn, void *user,
                          vlm_client_result_t *out);

/* Asks the daemon to cancel job job_id of this client and waits for the
 * answer; *found (may be NULL) says whether the daemon still had the job.
 * The job itself then ends with a done event, finish_reason "cancelled". */
int vlm_client_cancel(vlm_client_t *c, const char *job_id, bool *found);

/* The health op: parsed into out (may be NULL) and/or the whole event as
 * JSON text in *json_out (may be NULL; caller frees with free()). */
int vlm_client_health(vlm_client_t *c, vlm_client_health_t *out, char **json_out);

/* The stats and model ops: the whole event as JSON text in *json_out
 * (caller frees with free()). */
int vlm_client_stats(vlm_client_t *c, char **json_out);
int vlm_client_model(vlm_client_t *c, char **json_out);

/* Any op by name (no payload), for ops this library does not know yet:
 * the answer event as JSON text in *json_out (may be NULL; caller frees). */
int vlm_client_op(vlm_client_t *c, const char *op, char **json_out);

/* ==== Asynchronous jobs ================================================= */

/* Sends a generate request and returns at once. The job id goes into
 * job_id[VLM_CLIENT_ID_MAX + 1] (may be NULL); user comes back in each of
 * its events. Waits at most the client's timeout for a connection. Returns
 * 0 or a negative code. */
int vlm_client_submit(vlm_client_t *c, const vlm_client_params_t *p, void *user, char *job_id);

/* Waits at most timeout_ms (< 0: until an event) for the next event of a
 * submitted job and puts it in ev (initialised by the caller; what it held
 * is freed). Returns 1 with an event, 0 when none came in time (at once when
 * no job is in flight), or a negative code for a failure of the client
 * itself. Jobs the client gives up on (deadline, lost daemon) get an ERROR
 * event with a client code, so each job ends with exactly one DONE or
 * ERROR. */
int vlm_client_poll(vlm_client_t *c, int timeout_ms, vlm_client_event_t *ev);

/* The number of submitted jobs that have not ended yet. */
int vlm_client_pending(const vlm_client_t *c);

#ifdef __cplusplus
}
#endif

#endif
