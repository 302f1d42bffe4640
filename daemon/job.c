/* daemon/job.c - jobs (reference counted) and the bounded job queue (a ring
 * buffer under one mutex; the engine and the I/O thread each hold it for a
 * few instructions at a time). */
#include "daemon/job.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/error.h"

double vlm_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* ==== Jobs ============================================================== */

vlm_job_t *vlm_job_new(vlm_request_t *req, const uint8_t *rid, size_t rid_len, uint64_t conn,
                       zmq_msg_t *images, int n_images, double t_received) {
    VLM_ASSERT(rid_len <= VLM_JOB_MAX_RID && n_images >= 0);
    vlm_job_t *job = calloc(1, sizeof *job);
    if (!job) return NULL;
    if (n_images > 0) {
        job->images = calloc((size_t)n_images, sizeof *job->images);
        if (!job->images) {
            free(job);
            return NULL;
        }
    }
    atomic_init(&job->refs, 1);
    atomic_init(&job->cancel, VLM_JOB_RUNNING);
    job->req = *req;
    vlm_request_init(req);
    memcpy(job->rid, rid, rid_len);
    job->rid_len = rid_len;
    job->conn = conn;
    for (int i = 0; i < n_images; i++) {
        zmq_msg_init(&job->images[i]);
        zmq_msg_move(&job->images[i], &images[i]);
    }
    job->n_images = n_images;
    job->t_received = t_received;
    return job;
}

vlm_job_t *vlm_job_ref(vlm_job_t *job) {
    atomic_fetch_add(&job->refs, 1);
    return job;
}

void vlm_job_destroy(vlm_job_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_job_t *job = *self_p;
    *self_p = NULL;
    if (atomic_fetch_sub(&job->refs, 1) != 1) return;
    for (int i = 0; i < job->n_images; i++) zmq_msg_close(&job->images[i]);
    free(job->images);
    vlm_request_deinit(&job->req);
    free(job);
}

/* ==== Queue ============================================================= */

struct vlm_queue {
    pthread_mutex_t mu;
    vlm_job_t **ring;   /* [capacity] */
    int capacity;
    int head;           /* index of the oldest job */
    int len;
};

vlm_queue_t *vlm_queue_new(int capacity) {
    VLM_ASSERT(capacity >= 1);
    vlm_queue_t *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->ring = calloc((size_t)capacity, sizeof *q->ring);
    if (!q->ring) {
        free(q);
        return NULL;
    }
    q->capacity = capacity;
    pthread_mutex_init(&q->mu, NULL);
    return q;
}

void vlm_queue_destroy(vlm_queue_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_queue_t *q = *self_p;
    *self_p = NULL;
    for (int i = 0; i < q->len; i++) vlm_job_destroy(&q->ring[(q->head + i) % q->capacity]);
    pthread_mutex_destroy(&q->mu);
    free(q->ring);
    free(q);
}

int vlm_queue_push(vlm_queue_t *q, vlm_job_t **job_p) {
    pthread_mutex_lock(&q->mu);
    int rc = VLM_ERR_BUSY;
    if (q->len < q->capacity) {
        q->ring[(q->head + q->len) % q->capacity] = *job_p;
        q->len++;
        *job_p = NULL;
        rc = VLM_OK;
    }
    pthread_mutex_unlock(&q->mu);
    return rc;
}

vlm_job_t *vlm_queue_pop(vlm_queue_t *q) {
    pthread_mutex_lock(&q->mu);
    vlm_job_t *job = NULL;
    if (q->len > 0) {
        job = q->ring[q->head];
        q->ring[q->head] = NULL;
        q->head = (q->head + 1) % q->capacity;
        q->len--;
    }
    pthread_mutex_unlock(&q->mu);
    return job;
}

vlm_job_t *vlm_queue_pop_cancelled(vlm_queue_t *q) {
    pthread_mutex_lock(&q->mu);
    vlm_job_t *job = NULL;
    for (int i = 0; i < q->len; i++) {
        vlm_job_t *j = q->ring[(q->head + i) % q->capacity];
        if (atomic_load(&j->cancel) == VLM_JOB_RUNNING) continue;
        job = j;
        /* Close the gap, keeping the order of the others. */
        for (int k = i; k + 1 < q->len; k++)
            q->ring[(q->head + k) % q->capacity] = q->ring[(q->head + k + 1) % q->capacity];
        q->ring[(q->head + q->len - 1) % q->capacity] = NULL;
        q->len--;
        break;
    }
    pthread_mutex_unlock(&q->mu);
    return job;
}

int vlm_queue_len(vlm_queue_t *q) {
    pthread_mutex_lock(&q->mu);
    int n = q->len;
    pthread_mutex_unlock(&q->mu);
    return n;
}
