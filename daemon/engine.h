/* daemon/engine.h - the inference engine of vlmd: one model, n KV slots and
 * a thread that runs continuous batching over them.
 *
 * The engine owns everything that computes: the text model, its KV cache of
 * `n_parallel` slots, the decoder scratch, the CLIP encoder and projector,
 * the thread pool and the image-embedding cache. Its thread loops:
 *   1. read commands from the I/O thread (wake-up, stop, stop now);
 *   2. end cancelled jobs, queued or running, and, once the grace period of
 *      a shutdown is over, every running job;
 *   3. move queued jobs into free slots;
 *   4. prepare the new jobs: format and tokenize the prompt (context
 *      overflow is caught here, before any work), then decode and
 *      preprocess every image not in the cache (in parallel on the pool),
 *      encode and project them: one image per CLIP call by default, so an
 *      image's embeddings never depend on the other images in flight
 *      (OpenBLAS rounds a row differently in a taller matrix); all pending
 *      images of all new jobs in one call with batch_images;
 *   5. run one forward pass holding one decode row of every generating job
 *      and up to `prefill_budget` prompt rows of jobs still prefilling;
 *   6. sample each job's next token, stream its text, check stop strings
 *      and lengths, and end finished jobs with their `done` event.
 * Each job's prompt is fed in the same pieces as vlm-run feeds it (one
 * segment at a time, cut into 512-row chunks), and the decoder picks its
 * attention summation order per sequence from the rows that sequence has in
 * a call. With quantized weights the matmuls are exact per row too, so a
 * job's tokens do not depend on what else runs beside it. (F32/F16 weights
 * go through OpenBLAS sgemm from 16 rows per call, whose rounding of a row
 * depends on the others: there a batched job's logits may differ from its
 * solo run by ~1e-5.)
 *
 * The I/O thread talks to the engine through the job queue and one inproc
 * PAIR socket (VLM_ENGINE_ENDPOINT, bound by the I/O thread): commands go
 * in, events come out as two frames, a vlm_engine_event_t header and the
 * JSON text of the event.
 */
#ifndef VLM_DAEMON_ENGINE_H
#define VLM_DAEMON_ENGINE_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "core/error.h"
#include "daemon/image_cache.h"
#include "daemon/job.h"
#include "vision/preprocess.h"

#define VLM_ENGINE_ENDPOINT "inproc://vlmd-engine"

typedef struct vlm_engine_opts {
    const char *model_path;            /* text model GGUF */
    const char *mmproj_path;           /* vision GGUF, or NULL for text only */
    int n_threads;                     /* pool threads (caller included) */
    int32_t n_ctx;                     /* positions per slot; 0: min(4096, n_ctx_train) */
    int n_parallel;                    /* KV slots = jobs generating at once */
    int queue_size;                    /* jobs waiting beyond the slots */
    int image_cache;                   /* cached embeddings (entries) */
    vlm_preprocess_mode_t preprocess;  /* default mode */
    int64_t max_pixels;                /* decoded image budget (w * h) */
    size_t max_image_bytes;            /* encoded image budget */
    uint32_t kv_type;                  /* VLM_DTYPE_F16 or VLM_DTYPE_F32 */
    bool fast_order;                   /* quantized weights summed in vlmd's faster order
                                        * (VLM_WEIGHT_PREPARE_FAST_ORDER), not ggml's */
    const char *template_name;         /* NULL: chosen as vlm-run chooses */
    int32_t prefill_budget;            /* prompt rows per forward pass; >= 512 */
    int max_encode_batch;              /* images prepared per engine iteration (batch_images) */
    bool batch_images;                 /* encode the pending images of several jobs in one
                                        * CLIP call (faster; not bit-exact, see above) */
} vlm_engine_opts_t;

/* Fills o with the defaults (no paths). */
void vlm_engine_opts_default(vlm_engine_opts_t *o);

/* ==== Messages on the inproc socket ===================================== */

typedef enum vlm_engine_cmd_type {
    VLM_ENGINE_CMD_WAKE = 1,      /* a job was queued or a cancel flag set */
    VLM_ENGINE_CMD_STOP = 2,      /* stop: arg = grace period in seconds */
    VLM_ENGINE_CMD_STOP_NOW = 3,  /* end every job now */
} vlm_engine_cmd_type_t;

typedef struct vlm_engine_cmd {
    int32_t type;                 /* vlm_engine_cmd_type_t */
    double arg;
} vlm_engine_cmd_t;

typedef enum vlm_engine_event_kind {
    VLM_ENGINE_EV_TOKEN = 0,      /* a streamed piece; the job goes on */
    VLM_ENGINE_EV_DONE = 1,       /* the job's final done event */
    VLM_ENGINE_EV_ERROR = 2,      /* the job's final error event */
    VLM_ENGINE_EV_EXIT = 3,       /* the engine thread has finished (job NULL) */
} vlm_engine_event_kind_t;

/* The first frame of an engine event; the second is the event's JSON. The
 * engine gives up its reference to job with a final (DONE or ERROR) event;
 * the I/O thread still holds its own. */
typedef struct vlm_engine_event {
    vlm_job_t *job;
    int32_t kind;                 /* vlm_engine_event_kind_t */
    int32_t code;                 /* ERROR: vlm_proto_error_t */
} vlm_engine_event_t;

/* ==== Engine ============================================================ */

typedef struct vlm_engine vlm_engine_t;

/* Counters since start, read by the I/O thread for the stats op. */
typedef struct vlm_engine_stats {
    int32_t active;                /* jobs in slots */
    int64_t jobs_finished;
    int64_t prompt_tokens;         /* text tokens prefilled */
    int64_t image_tokens;          /* image rows prefilled */
    int64_t tokens_generated;
    int64_t images_encoded;
    int64_t encode_batches;        /* CLIP calls */
    int64_t forward_passes;
    int64_t decode_passes;         /* passes that held decode rows */
    int64_t decode_rows;           /* decode rows over those passes */
    double decode_pass_ms;         /* time of passes that held decode rows */
    vlm_image_cache_counts_t cache;
} vlm_engine_stats_t;

/* Loads the models named in o and allocates the KV cache, decoder, pool and
 * queue. zctx is the ZeroMQ context the engine thread makes its socket in.
 * On failure returns a VLM_ERR_* code with err naming the file or setting at
 * fault. On success *out is owned by the caller (vlm_engine_destroy). */
int vlm_engine_new(void *zctx, const vlm_engine_opts_t *o, vlm_engine_t **out, vlm_error_t *err);

/* Starts the engine thread, which connects to VLM_ENGINE_ENDPOINT (bind it
 * first). Returns VLM_OK or VLM_ERR_INTERNAL. */
int vlm_engine_start(vlm_engine_t *e, vlm_error_t *err);

/* Joins the thread (which returns after a STOP once every job has ended)
 * and frees everything; NULL-safe, clears *self_p. */
void vlm_engine_destroy(vlm_engine_t **self_p);

/* The queue the I/O thread pushes jobs into (owned by the engine). */
vlm_queue_t *vlm_engine_queue(vlm_engine_t *e);

/* What the model op reports: a JSON object owned by the engine, built at
 * load time and never changed (read it from one thread only). */
const json_t *vlm_engine_model_info(const vlm_engine_t *e);

/* A short description for the ready line ("llama n_embd 64, ..."); static
 * storage of the engine. */
const char *vlm_engine_summary(const vlm_engine_t *e);

/* Copies the counters (thread-safe). */
void vlm_engine_get_stats(vlm_engine_t *e, vlm_engine_stats_t *out);

/* Jobs in slots now (thread-safe). */
int vlm_engine_active(vlm_engine_t *e);

int vlm_engine_n_parallel(const vlm_engine_t *e);

/* Jobs the engine takes at once: slots plus queue. */
int vlm_engine_capacity(const vlm_engine_t *e);

#endif
