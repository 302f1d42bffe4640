/* daemon/server.c - the I/O thread: one zmq_poll loop over the ROUTER
 * socket, the engine's PAIR socket, the connection monitor and the
 * signal pipe (see server.h for what it does and why).
 *
 * One loop iteration:
 *   1. wait for any of the four (10 ms at most while a client has a backlog);
 *   2. read signals: the first stops admission and tells the engine to stop
 *      with the grace period, the second to stop now;
 *   3. forward every event the engine has sent; a final one (done or error)
 *      removes its job from the table of jobs in flight;
 *   4. read connection events (accepted: a new connection serial for the
 *      file descriptor; disconnected: cancel the jobs that came on it);
 *   5. handle up to ROUTER_BATCH requests, reading connection events before
 *      each one so a reused file descriptor is never confused with the one
 *      it replaced;
 *   6. retry the backlogs of slow clients and give up on those past the
 *      reply timeout.
 */
#include "daemon/server.h"

#include <errno.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MONITOR_ENDPOINT "inproc://vlmd-monitor"
#define ROUTER_BATCH 64              /* requests per loop iteration */
#define FLUSH_AT_EXIT_MS 2000.0      /* how long backlogs may delay the exit */
#define BACKLOG_MAX_BYTES (64u << 20) /* events held for one slow client */
#define DUMP_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION(9))

void vlm_server_opts_default(vlm_server_opts_t *o) {
    memset(o, 0, sizeof *o);
    o->endpoint = "tcp://127.0.0.1:5555";
    o->limits.max_header_bytes = 1u << 20;
    o->limits.max_image_bytes = 32u << 20;
    o->limits.max_images = 16;
    o->grace_s = 10.0;
    o->reply_timeout_s = 30.0;
    o->heartbeat_ms = 5000;
    o->sndhwm = 10000;
}

/* ==== State ============================================================= */

/* An event waiting for a slow client. */
typedef struct outmsg {
    struct outmsg *next;
    zmq_msg_t body;
} outmsg_t;

/* The events of one client whose pipe was full, in order. */
typedef struct backlog {
    struct backlog *next;
    uint8_t rid[VLM_JOB_MAX_RID];
    size_t rid_len;
    outmsg_t *head, *tail;
    size_t bytes;
    double t_progress;       /* when the last event went out (or the backlog began) */
} backlog_t;

struct vlm_server {
    vlm_server_opts_t o;
    void *zctx;
    vlm_engine_t *engine;
    vlm_queue_t *queue;
    void *router;            /* clients */
    void *engine_sock;       /* PAIR to the engine thread */
    void *monitor;           /* PAIR receiving the router's connection events */
    int sigfd;               /* read end of the self-pipe main's signal handler writes */
    char endpoint[256];
    double t_start;

    vlm_job_t *jobs;         /* generate jobs in flight, linked by job->next */
    int n_jobs;
    int capacity;            /* slots + queue: more in flight is busy */

    uint64_t *conn_serial;   /* [n_fds] serial of the connection on each fd, 0 = none */
    size_t n_fds;
    uint64_t next_serial;
    backlog_t *backlogs;

    bool stopping;
    bool engine_exited;

    int64_t n_requests, n_generate, n_done, n_clients_gone;
    int64_t n_errors[VLM_PROTO_ERROR_COUNT];

    zmq_msg_t *frames;       /* [cap_frames] the request being read */
    int cap_frames;
};

/* ==== Sending =========================================================== */

static void free_text(void *data, void *hint) {
    (void)hint;
    free(data);
}

/* Wraps a malloc'd JSON text in a message (taking it over). */
static void msg_from_text(zmq_msg_t *m, char *json) {
    zmq_msg_init_data(m, json, strlen(json), free_text, NULL);
}

/* Sends body to rid without blocking. Returns 0 (body moved out), or the
 * errno of the routing frame (EAGAIN: pipe full, EHOSTUNREACH: no such
 * peer), body untouched. */
static int send_now(vlm_server_t *s, const uint8_t *rid, size_t rid_len, zmq_msg_t *body) {
    if (zmq_send(s->router, rid, rid_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) return zmq_errno();
    /* The router checks the peer at the first frame; the rest follows. */
    if (zmq_msg_send(body, s->router, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(body);
        zmq_msg_init(body);
    }
    return 0;
}

static backlog_t *backlog_find(vlm_server_t *s, const uint8_t *rid, size_t rid_len) {
    for (backlog_t *b = s->backlogs; b; b = b->next)
        if (b->rid_len == rid_len && memcmp(b->rid, rid, rid_len) == 0) return b;
    return NULL;
}

static void backlog_drop(vlm_server_t *s, backlog_t *b) {
    for (backlog_t **p = &s->backlogs; *p; p = &(*p)->next)
        if (*p == b) {
            *p = b->next;
            break;
        }
    while (b->head) {
        outmsg_t *m = b->head;
        b->head = m->next;
        zmq_msg_close(&m->body);
        free(m);
    }
    free(b);
}

static void wake_engine(vlm_server_t *s, vlm_engine_cmd_type_t type, double arg) {
    vlm_engine_cmd_t cmd = {(int32_t)type, arg};
    zmq_send(s->engine_sock, &cmd, sizeof cmd, ZMQ_DONTWAIT);
}

/* Cancels every running job of the client rid (its events go nowhere from
 * now on) and drops its backlog. */
static void client_gone(vlm_server_t *s, const uint8_t *rid, size_t rid_len) {
    int n = 0;
    for (vlm_job_t *j = s->jobs; j; j = j->next) {
        if (j->rid_len != rid_len || memcmp(j->rid, rid, rid_len) != 0) continue;
        int expected = VLM_JOB_RUNNING;
        if (atomic_compare_exchange_strong(&j->cancel, &expected, VLM_JOB_CLIENT_GONE)) n++;
        else atomic_store(&j->cancel, VLM_JOB_CLIENT_GONE);
    }
    backlog_t *b = backlog_find(s, rid, rid_len);
    if (b) backlog_drop(s, b);
    s->n_clients_gone++;
    if (n > 0) wake_engine(s, VLM_ENGINE_CMD_WAKE, 0);
}

/* Sends body (moved) to rid, or queues it behind the client's backlog. */
static void deliver(vlm_server_t *s, const uint8_t *rid, size_t rid_len, zmq_msg_t *body) {
    backlog_t *b = backlog_find(s, rid, rid_len);
    if (!b) {
        int rc = send_now(s, rid, rid_len, body);
        if (rc == 0) return;
        if (rc != EAGAIN) {
            zmq_msg_close(body);
            client_gone(s, rid, rid_len);
            return;
        }
        b = calloc(1, sizeof *b);
        if (!b) {
            zmq_msg_close(body);
            client_gone(s, rid, rid_len);
            return;
        }
        memcpy(b->rid, rid, rid_len);
        b->rid_len = rid_len;
        b->t_progress = vlm_now_ms();
        b->next = s->backlogs;
        s->backlogs = b;
    }
    outmsg_t *m = calloc(1, sizeof *m);
    if (!m || b->bytes + zmq_msg_size(body) > BACKLOG_MAX_BYTES) {
        free(m);
        zmq_msg_close(body);
        client_gone(s, rid, rid_len);
        return;
    }
    zmq_msg_init(&m->body);
    zmq_msg_move(&m->body, body);
    zmq_msg_close(body);
    b->bytes += zmq_msg_size(&m->body);
    if (b->tail) b->tail->next = m;
    else b->head = m;
    b->tail = m;
}

/* Delivers a JSON text (taken over); a NULL text (out of memory) is
 * dropped. */
static void deliver_text(vlm_server_t *s, const uint8_t *rid, size_t rid_len, char *json) {
    if (!json) return;
    zmq_msg_t m;
    msg_from_text(&m, json);
    deliver(s, rid, rid_len, &m);
}

/* Answers a request that is not a job with an error event. */
static void reply_error(vlm_server_t *s, const uint8_t *rid, size_t rid_len, const char *id, vlm_proto_error_t code,
                        const char *msg) {
    s->n_errors[code]++;
    deliver_text(s, rid, rid_len, vlm_event_error(id, code, msg));
}

/* Sends every backlog that can go now; gives up on clients that have not
 * read anything for the reply timeout. */
static void retry_backlogs(vlm_server_t *s) {
    const double now = vlm_now_ms();
    backlog_t *b = s->backlogs;
    while (b) {
        backlog_t *next = b->next;
        int rc = 0;
        while (b->head) {
            outmsg_t *m = b->head;
            size_t size = zmq_msg_size(&m->body);
            rc = send_now(s, b->rid, b->rid_len, &m->body);
            if (rc != 0) break;
            b->head = m->next;
            if (!b->head) b->tail = NULL;
            b->bytes -= size;
            zmq_msg_close(&m->body);
            free(m);
            b->t_progress = now;
        }
        if (!b->head) backlog_drop(s, b);
        else if (rc != EAGAIN || now - b->t_progress > s->o.reply_timeout_s * 1000.0)
            client_gone(s, b->rid, b->rid_len); /* drops b */
        b = next;
    }
}

/* ==== Jobs in flight ==================================================== */

static vlm_job_t *job_find(vlm_server_t *s, const uint8_t *rid, size_t rid_len, const char *id) {
    for (vlm_job_t *j = s->jobs; j; j = j->next)
        if (j->rid_len == rid_len && memcmp(j->rid, rid, rid_len) == 0 && strcmp(j->req.id, id) == 0) return j;
    return NULL;
}

static void job_remove(vlm_server_t *s, vlm_job_t *job) {
    for (vlm_job_t **p = &s->jobs; *p; p = &(*p)->next)
        if (*p == job) {
            *p = job->next;
            job->next = NULL;
            s->n_jobs--;
            return;
        }
}

/* Forwards every event the engine has sent. */
static void forward_engine_events(vlm_server_t *s) {
    for (;;) {
        vlm_engine_event_t ev;
        int n = zmq_recv(s->engine_sock, &ev, sizeof ev, ZMQ_DONTWAIT);
        if (n < 0) break;
        zmq_msg_t body;
        zmq_msg_init(&body);
        zmq_msg_recv(&body, s->engine_sock, 0);
        if (n != (int)sizeof ev || ev.kind == VLM_ENGINE_EV_EXIT || !ev.job) {
            if (n == (int)sizeof ev && ev.kind == VLM_ENGINE_EV_EXIT) s->engine_exited = true;
            zmq_msg_close(&body);
            continue;
        }
        vlm_job_t *job = ev.job;
        const bool final = ev.kind == VLM_ENGINE_EV_DONE || ev.kind == VLM_ENGINE_EV_ERROR;
        if (final && zmq_msg_size(&body) == 0) {
            /* The engine could not write the event (out of memory). */
            char *json = vlm_event_error(job->req.id, VLM_PROTO_INTERNAL, "out of memory writing the answer");
            ev.kind = VLM_ENGINE_EV_ERROR;
            ev.code = VLM_PROTO_INTERNAL;
            if (json) {
                zmq_msg_close(&body);
                msg_from_text(&body, json);
            }
        }
        if (atomic_load(&job->cancel) == VLM_JOB_CLIENT_GONE || zmq_msg_size(&body) == 0)
            zmq_msg_close(&body); /* nobody to tell */
        else
            deliver(s, job->rid, job->rid_len, &body);
        if (final) {
            if (ev.kind == VLM_ENGINE_EV_DONE) s->n_done++;
            else if (ev.code >= 0 && ev.code < VLM_PROTO_ERROR_COUNT) s->n_errors[ev.code]++;
            job_remove(s, job);
            vlm_job_destroy(&job);
        }
    }
}

/* ==== Connections and signals =========================================== */

static uint64_t conn_of_fd(const vlm_server_t *s, int fd) {
    return fd >= 0 && (size_t)fd < s->n_fds ? s->conn_serial[fd] : 0;
}

/* Reads the router's connection events. */
static void drain_monitor(vlm_server_t *s) {
    for (;;) {
        zmq_msg_t a, b;
        zmq_msg_init(&a);
        if (zmq_msg_recv(&a, s->monitor, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&a);
            return;
        }
        uint16_t event = 0;
        uint32_t value = 0;
        if (zmq_msg_size(&a) >= 6) {
            memcpy(&event, zmq_msg_data(&a), 2);
            memcpy(&value, (const char *)zmq_msg_data(&a) + 2, 4);
        }
        const bool more = zmq_msg_more(&a);
        zmq_msg_close(&a);
        if (more) {
            zmq_msg_init(&b);
            zmq_msg_recv(&b, s->monitor, 0);
            zmq_msg_close(&b);
        }
        const int fd = (int)value;
        if (event == ZMQ_EVENT_ACCEPTED && fd >= 0 && fd < (1 << 24)) {
            if ((size_t)fd >= s->n_fds) {
                size_t n = (size_t)fd + 64;
                uint64_t *c = realloc(s->conn_serial, n * sizeof *c);
                if (!c) continue;
                memset(c + s->n_fds, 0, (n - s->n_fds) * sizeof *c);
                s->conn_serial = c;
                s->n_fds = n;
            }
            s->conn_serial[fd] = ++s->next_serial;
        } else if (event == ZMQ_EVENT_DISCONNECTED) {
            const uint64_t serial = conn_of_fd(s, fd);
            if (serial == 0) continue;
            s->conn_serial[fd] = 0;
            /* Cancel the jobs that came on this connection. */
            bool again = true;
            while (again) {
                again = false;
                for (vlm_job_t *j = s->jobs; j; j = j->next)
                    if (j->conn == serial && atomic_load(&j->cancel) != VLM_JOB_CLIENT_GONE) {
                        client_gone(s, j->rid, j->rid_len);
                        again = true;
                        break;
                    }
            }
        }
    }
}

static void handle_signals(vlm_server_t *s) {
    unsigned char sig;
    while (read(s->sigfd, &sig, 1) == 1) {
        const char *name = sig == SIGINT ? "SIGINT" : "SIGTERM";
        if (!s->stopping) {
            s->stopping = true;
            fprintf(stderr, "vlmd: %s: stopping (%d jobs in flight, grace %.1f s)\n", name, s->n_jobs,
                    s->o.grace_s);
            wake_engine(s, VLM_ENGINE_CMD_STOP, s->o.grace_s);
        } else {
            fprintf(stderr, "vlmd: %s again: ending every job now\n", name);
            wake_engine(s, VLM_ENGINE_CMD_STOP_NOW, 0);
        }
    }
}

/* ==== Requests ========================================================== */

static char *event_health(vlm_server_t *s, const char *id) {
    json_t *o = json_pack("{s:i, s:s, s:s, s:s, s:f, s:i, s:i, s:i}", "v", VLM_PROTO_VERSION, "id", id, "event",
                          "health", "status", s->stopping ? "stopping" : "ok", "uptime_s",
                          (vlm_now_ms() - s->t_start) / 1000.0, "active", vlm_engine_active(s->engine), "queued",
                          vlm_queue_len(s->queue), "slots", vlm_engine_n_parallel(s->engine));
    char *text = o ? json_dumps(o, DUMP_FLAGS) : NULL;
    json_decref(o);
    return text;
}

static char *event_stats(vlm_server_t *s, const char *id) {
    vlm_engine_stats_t st;
    vlm_engine_get_stats(s->engine, &st);
    json_t *errors = json_object();
    for (int c = 0; errors && c < VLM_PROTO_ERROR_COUNT; c++)
        json_object_set_new(errors, vlm_proto_error_name((vlm_proto_error_t)c), json_integer(s->n_errors[c]));
    const double tps = st.decode_pass_ms > 0 ? (double)st.decode_rows * 1000.0 / st.decode_pass_ms : 0.0;
    json_t *o = json_pack(
        "{s:i, s:s, s:s, s:f, s:I, s:{s:I, s:I, s:o*, s:i}, s:I, s:I, s:I, s:I, s:I, s:{s:I, s:I, s:i, s:i},"
        " s:{s:i, s:i}, s:{s:i, s:i}, s:I, s:I, s:I, s:f, s:I}",
        "v", VLM_PROTO_VERSION, "id", id, "event", "stats", "uptime_s", (vlm_now_ms() - s->t_start) / 1000.0,
        "requests", (json_int_t)s->n_requests, "jobs", "received", (json_int_t)s->n_generate, "done",
        (json_int_t)s->n_done, "errors", errors, "in_flight", s->n_jobs, "tokens_generated",
        (json_int_t)st.tokens_generated, "prompt_tokens", (json_int_t)st.prompt_tokens, "image_tokens",
        (json_int_t)st.image_tokens, "images_encoded", (json_int_t)st.images_encoded, "encode_batches",
        (json_int_t)st.encode_batches, "image_cache", "hits", (json_int_t)st.cache.hits, "misses",
        (json_int_t)st.cache.misses, "entries", st.cache.entries, "capacity", st.cache.capacity, "slots", "total",
        vlm_engine_n_parallel(s->engine), "active", st.active, "queue", "length", vlm_queue_len(s->queue),
        "capacity", s->capacity - vlm_engine_n_parallel(s->engine), "forward_passes",
        (json_int_t)st.forward_passes, "decode_passes", (json_int_t)st.decode_passes, "decode_rows",
        (json_int_t)st.decode_rows, "decode_tokens_per_s", tps, "clients_gone", (json_int_t)s->n_clients_gone);
    char *text = o ? json_dumps(o, DUMP_FLAGS) : NULL;
    json_decref(o);
    return text;
}

static char *event_model(vlm_server_t *s, const char *id) {
    json_t *o = json_pack("{s:i, s:s, s:s}", "v", VLM_PROTO_VERSION, "id", id, "event", "model");
    if (o) json_object_update(o, (json_t *)vlm_engine_model_info(s->engine));
    char *text = o ? json_dumps(o, DUMP_FLAGS) : NULL;
    json_decref(o);
    return text;
}

/* Admits a parsed generate request (taking over *req and the image frames)
 * or answers why not. */
static void admit_generate(vlm_server_t *s, const uint8_t *rid, size_t rid_len, uint64_t conn, vlm_request_t *req,
                           zmq_msg_t *images, int n_images, double t_received) {
    if (s->stopping) {
        reply_error(s, rid, rid_len, req->id, VLM_PROTO_SHUTTING_DOWN, "the daemon is shutting down");
        return;
    }
    if (job_find(s, rid, rid_len, req->id)) {
        char msg[200];
        snprintf(msg, sizeof msg, "a job with id \"%.128s\" is already in flight on this connection", req->id);
        reply_error(s, rid, rid_len, req->id, VLM_PROTO_BAD_REQUEST, msg);
        return;
    }
    if (s->n_jobs >= s->capacity) {
        char msg[160];
        snprintf(msg, sizeof msg, "all %d slots and the queue of %d are full; try again later",
                 vlm_engine_n_parallel(s->engine), s->capacity - vlm_engine_n_parallel(s->engine));
        reply_error(s, rid, rid_len, req->id, VLM_PROTO_BUSY, msg);
        return;
    }
    char id[VLM_PROTO_MAX_ID + 1];
    snprintf(id, sizeof id, "%s", req->id);
    vlm_job_t *job = vlm_job_new(req, rid, rid_len, conn, images, n_images, t_received);
    if (!job) {
        reply_error(s, rid, rid_len, id, VLM_PROTO_INTERNAL, "out of memory");
        return;
    }
    vlm_job_t *for_queue = vlm_job_ref(job);
    if (vlm_queue_push(s->queue, &for_queue) != VLM_OK) {
        /* Cannot happen: the queue holds capacity jobs and n_jobs counts them. */
        vlm_job_destroy(&for_queue);
        vlm_job_destroy(&job);
        reply_error(s, rid, rid_len, id, VLM_PROTO_BUSY, "the queue is full; try again later");
        return;
    }
    job->next = s->jobs;
    s->jobs = job;
    s->n_jobs++;
    wake_engine(s, VLM_ENGINE_CMD_WAKE, 0);
}

/* Handles one request of n frames (frames[0] is the routing id). */
static void handle_request(vlm_server_t *s, zmq_msg_t *frames, int n) {
    const double t_received = vlm_now_ms();
    const size_t rid_len = zmq_msg_size(&frames[0]);
    if (n < 2 || rid_len == 0 || rid_len > VLM_JOB_MAX_RID) return;
    uint8_t rid[VLM_JOB_MAX_RID];
    memcpy(rid, zmq_msg_data(&frames[0]), rid_len);
    s->n_requests++;

    /* A REQ socket puts an empty delimiter first and can take only one
     * reply, with the delimiter: answer it that way, once. */
    if (zmq_msg_size(&frames[1]) == 0 && n >= 3) {
        vlm_request_t r;
        char msg[256];
        vlm_request_parse(zmq_msg_data(&frames[2]), zmq_msg_size(&frames[2]), 0, NULL, &s->o.limits, &r, msg,
                          sizeof msg);
        char *json = vlm_event_error(r.id, VLM_PROTO_BAD_REQUEST,
                                     "REQ sockets are not supported: connect a DEALER socket (see docs/protocol.md)");
        vlm_request_deinit(&r);
        s->n_errors[VLM_PROTO_BAD_REQUEST]++;
        if (!json) return;
        zmq_msg_t body;
        msg_from_text(&body, json);
        if (zmq_send(s->router, rid, rid_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0) {
            zmq_send(s->router, "", 0, ZMQ_SNDMORE);
            zmq_msg_send(&body, s->router, 0);
        }
        zmq_msg_close(&body);
        return;
    }

    const int n_images = n - 2;
    size_t *sizes = n_images > 0 ? malloc((size_t)n_images * sizeof *sizes) : NULL;
    if (n_images > 0 && !sizes) {
        reply_error(s, rid, rid_len, NULL, VLM_PROTO_INTERNAL, "out of memory");
        return;
    }
    for (int i = 0; i < n_images; i++) sizes[i] = zmq_msg_size(&frames[2 + i]);
    vlm_request_t req;
    char msg[512];
    int code = vlm_request_parse(zmq_msg_data(&frames[1]), zmq_msg_size(&frames[1]), n_images, sizes,
                                 &s->o.limits, &req, msg, sizeof msg);
    free(sizes);
    if (code >= 0) {
        if (req.op == VLM_OP_GENERATE) s->n_generate++;
        reply_error(s, rid, rid_len, req.id, (vlm_proto_error_t)code, msg);
        vlm_request_deinit(&req);
        return;
    }
    switch (req.op) {
    case VLM_OP_HEALTH:
        deliver_text(s, rid, rid_len, event_health(s, req.id));
        break;
    case VLM_OP_STATS:
        deliver_text(s, rid, rid_len, event_stats(s, req.id));
        break;
    case VLM_OP_MODEL:
        deliver_text(s, rid, rid_len, event_model(s, req.id));
        break;
    case VLM_OP_CANCEL: {
        vlm_job_t *j = job_find(s, rid, rid_len, req.target);
        bool found = false;
        if (j) {
            int expected = VLM_JOB_RUNNING;
            found = atomic_compare_exchange_strong(&j->cancel, &expected, VLM_JOB_CANCEL_REQUESTED) ||
                    expected == VLM_JOB_CANCEL_REQUESTED;
            wake_engine(s, VLM_ENGINE_CMD_WAKE, 0);
        }
        deliver_text(s, rid, rid_len, vlm_event_cancel(req.id, req.target, found));
        break;
    }
    case VLM_OP_NONE:
        break;
    case VLM_OP_GENERATE: {
        s->n_generate++;
        const int fd = zmq_msg_get(&frames[1], ZMQ_SRCFD);
        admit_generate(s, rid, rid_len, conn_of_fd(s, fd), &req, frames + 2, n_images, t_received);
        break;
    }
    }
    vlm_request_deinit(&req);
}

/* Reads and handles one request if one is waiting. Returns false when none
 * was. */
static bool handle_one_request(vlm_server_t *s) {
    int n = 0;
    for (;;) {
        if (n == s->cap_frames) {
            int cap = s->cap_frames ? 2 * s->cap_frames : 16;
            zmq_msg_t *f = realloc(s->frames, (size_t)cap * sizeof *f);
            if (!f) break; /* the rest of the message is dropped below */
            s->frames = f;
            s->cap_frames = cap;
        }
        zmq_msg_init(&s->frames[n]);
        if (zmq_msg_recv(&s->frames[n], s->router, n == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            zmq_msg_close(&s->frames[n]);
            if (n == 0) return false;
            break;
        }
        const bool more = zmq_msg_more(&s->frames[n]);
        n++;
        if (!more) break;
    }
    /* Out of memory mid-message: read and drop the rest. */
    int more = 0;
    size_t more_size = sizeof more;
    zmq_getsockopt(s->router, ZMQ_RCVMORE, &more, &more_size);
    bool complete = !more;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, s->router, 0) < 0) break;
        more = zmq_msg_more(&m);
        zmq_msg_close(&m);
    }
    if (complete) handle_request(s, s->frames, n);
    for (int i = 0; i < n; i++) zmq_msg_close(&s->frames[i]);
    return true;
}

/* ==== Server ============================================================ */

int vlm_server_new(void *zctx, vlm_engine_t *engine, const vlm_server_opts_t *o, int signal_fd,
                   vlm_server_t **out, vlm_error_t *err) {
    *out = NULL;
    vlm_server_t *s = calloc(1, sizeof *s);
    if (!s) return vlm_error_set(err, VLM_ERR_NOMEM, "out of memory");
    s->o = *o;
    s->zctx = zctx;
    s->engine = engine;
    s->queue = vlm_engine_queue(engine);
    s->sigfd = signal_fd;
    s->t_start = vlm_now_ms();
    int rc = VLM_OK;

    s->engine_sock = zmq_socket(zctx, ZMQ_PAIR);
    s->router = zmq_socket(zctx, ZMQ_ROUTER);
    s->monitor = zmq_socket(zctx, ZMQ_PAIR);
    if (!s->engine_sock || !s->router || !s->monitor) {
        rc = vlm_error_set(err, VLM_ERR_INTERNAL, "cannot create sockets: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    int zero = 0, one = 1;
    zmq_setsockopt(s->engine_sock, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(s->engine_sock, ZMQ_RCVHWM, &zero, sizeof zero);
    if (zmq_bind(s->engine_sock, VLM_ENGINE_ENDPOINT) != 0) {
        rc = vlm_error_set(err, VLM_ERR_INTERNAL, "%s: %s", VLM_ENGINE_ENDPOINT, zmq_strerror(zmq_errno()));
        goto fail;
    }

    /* The client socket: unroutable sends fail instead of vanishing,
     * heartbeats find dead peers, frames far over the limits cut the
     * connection before they fill memory (those a little over get an
     * error), and queued events still go out for a while at close. */
    zmq_setsockopt(s->router, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(s->router, ZMQ_SNDHWM, &s->o.sndhwm, sizeof s->o.sndhwm);
    int rcvhwm = 1000;
    zmq_setsockopt(s->router, ZMQ_RCVHWM, &rcvhwm, sizeof rcvhwm);
    if (o->heartbeat_ms > 0) {
        int ivl = o->heartbeat_ms, timeout = 3 * o->heartbeat_ms;
        zmq_setsockopt(s->router, ZMQ_HEARTBEAT_IVL, &ivl, sizeof ivl);
        zmq_setsockopt(s->router, ZMQ_HEARTBEAT_TIMEOUT, &timeout, sizeof timeout);
        zmq_setsockopt(s->router, ZMQ_HEARTBEAT_TTL, &timeout, sizeof timeout);
    }
    size_t biggest = o->limits.max_image_bytes > o->limits.max_header_bytes ? o->limits.max_image_bytes
                                                                            : o->limits.max_header_bytes;
    int64_t maxmsg = (int64_t)biggest * 4 + (1 << 20);
    zmq_setsockopt(s->router, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    int linger = 1000;
    zmq_setsockopt(s->router, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_socket_monitor(s->router, MONITOR_ENDPOINT, ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED) != 0 ||
        zmq_connect(s->monitor, MONITOR_ENDPOINT) != 0) {
        rc = vlm_error_set(err, VLM_ERR_INTERNAL, "connection monitor: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    if (zmq_bind(s->router, o->endpoint) != 0) {
        rc = vlm_error_set(err, VLM_ERR_IO, "cannot bind %s: %s", o->endpoint, zmq_strerror(zmq_errno()));
        goto fail;
    }
    size_t len = sizeof s->endpoint;
    if (zmq_getsockopt(s->router, ZMQ_LAST_ENDPOINT, s->endpoint, &len) != 0)
        snprintf(s->endpoint, sizeof s->endpoint, "%s", o->endpoint);
    s->capacity = vlm_engine_capacity(engine);
    *out = s;
    return VLM_OK;

fail:
    vlm_server_destroy(&s);
    return rc;
}

const char *vlm_server_endpoint(const vlm_server_t *s) { return s->endpoint; }

int vlm_server_run(vlm_server_t *s) {
    double t_exit = 0;
    for (;;) {
        /* 1. Wait. */
        if (s->engine_exited) {
            if (!s->backlogs) break;
            if (t_exit == 0) t_exit = vlm_now_ms();
            if (vlm_now_ms() - t_exit > FLUSH_AT_EXIT_MS) break;
        }
        zmq_pollitem_t items[4] = {
            {s->router, 0, ZMQ_POLLIN, 0},
            {s->engine_sock, 0, ZMQ_POLLIN, 0},
            {s->monitor, 0, ZMQ_POLLIN, 0},
            {NULL, s->sigfd, ZMQ_POLLIN, 0},
        };
        zmq_poll(items, 4, s->backlogs ? 10 : -1);
        /* 2-6. */
        if (items[3].revents & ZMQ_POLLIN) handle_signals(s);
        forward_engine_events(s);
        drain_monitor(s);
        for (int k = 0; k < ROUTER_BATCH; k++) {
            drain_monitor(s);
            if (!handle_one_request(s)) break;
        }
        if (s->backlogs) retry_backlogs(s);
    }
    return 0;
}

void vlm_server_destroy(vlm_server_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_server_t *s = *self_p;
    *self_p = NULL;
    if (s->router) {
        zmq_socket_monitor(s->router, NULL, 0);
        zmq_close(s->router);
    }
    if (s->monitor) zmq_close(s->monitor);
    if (s->engine_sock) zmq_close(s->engine_sock);
    while (s->backlogs) backlog_drop(s, s->backlogs);
    while (s->jobs) {
        vlm_job_t *j = s->jobs;
        s->jobs = j->next;
        vlm_job_destroy(&j);
    }
    free(s->conn_serial);
    free(s->frames);
    free(s);
}
