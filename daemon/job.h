/* daemon/job.h - one generate job as it crosses from the I/O thread to the
 * engine thread, and the bounded queue between them.
 *
 * A job is created by the I/O thread from a request (the parsed header and
 * the raw image frames, moved in without copying) and shared with the engine
 * through a reference count: the I/O thread keeps one reference in its table
 * of jobs in flight (for cancel and duplicate ids), the queue and then the
 * engine hold the other. The only field written after creation is `cancel`,
 * an atomic the I/O thread sets and the engine reads between decode steps.
 */
#ifndef VLM_DAEMON_JOB_H
#define VLM_DAEMON_JOB_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <zmq.h>

#include "daemon/protocol.h"

#define VLM_JOB_MAX_RID 256  /* ZeroMQ routing ids are at most 255 bytes */

/* Why a job should stop early (the values of vlm_job_t.cancel). */
typedef enum vlm_job_cancel {
    VLM_JOB_RUNNING = 0,
    VLM_JOB_CANCEL_REQUESTED = 1, /* a cancel op: ends with done/cancelled */
    VLM_JOB_CLIENT_GONE = 2,      /* nobody to answer: ends with done/cancelled, dropped */
    VLM_JOB_SHUTDOWN = 3,         /* grace period over: ends with error shutting_down */
} vlm_job_cancel_t;

typedef struct vlm_job {
    atomic_int refs;
    atomic_int cancel;             /* vlm_job_cancel_t, set by the I/O thread */
    vlm_request_t req;             /* the parsed header */
    uint8_t rid[VLM_JOB_MAX_RID];  /* routing id of the client's connection */
    size_t rid_len;
    uint64_t conn;                 /* connection serial (0: unknown), for disconnects */
    zmq_msg_t *images;             /* [n_images] raw image frames */
    int n_images;
    double t_received;             /* vlm_now_ms() when the request arrived */
    struct vlm_job *next;          /* link in the I/O thread's table (its own use) */
} vlm_job_t;

/* Creates a job with one reference, taking over *req (left empty) and the
 * n_images messages of images[] (each left empty, as zmq_msg_move does).
 * Returns NULL when out of memory (the inputs are then left untouched). */
vlm_job_t *vlm_job_new(vlm_request_t *req, const uint8_t *rid, size_t rid_len, uint64_t conn,
                       zmq_msg_t *images, int n_images, double t_received);

/* Adds a reference and returns job. */
vlm_job_t *vlm_job_ref(vlm_job_t *job);

/* Drops the caller's reference and frees the job with the last one;
 * NULL-safe, sets *self_p to NULL. */
void vlm_job_destroy(vlm_job_t **self_p);

/* Milliseconds on the monotonic clock. */
double vlm_now_ms(void);

/* ==== Queue ============================================================= */

/* A bounded FIFO of jobs, safe between two threads (one mutex). */
typedef struct vlm_queue vlm_queue_t;

/* Creates a queue for at most capacity jobs (>= 1); NULL when out of memory. */
vlm_queue_t *vlm_queue_new(int capacity);

/* Frees the queue and drops the references of the jobs still in it;
 * NULL-safe, sets *self_p to NULL. */
void vlm_queue_destroy(vlm_queue_t **self_p);

/* Appends *job_p, taking over the reference (*job_p becomes NULL). Returns
 * VLM_OK, or VLM_ERR_BUSY when full (then *job_p is left as it was). */
int vlm_queue_push(vlm_queue_t *q, vlm_job_t **job_p);

/* Removes and returns the oldest job (the caller owns the reference), or
 * NULL when empty. */
vlm_job_t *vlm_queue_pop(vlm_queue_t *q);

/* Removes and returns the oldest job whose cancel flag is set, or NULL. */
vlm_job_t *vlm_queue_pop_cancelled(vlm_queue_t *q);

/* Number of jobs waiting. */
int vlm_queue_len(vlm_queue_t *q);

#endif
