/* clients/c/vlm.c - libvlm: the vlmd protocol (docs/protocol.md) over a
 * ZeroMQ DEALER socket, with jansson for every JSON text.
 *
 * How a client works:
 *   1. vlm_client_new() makes (or borrows) a context, a DEALER socket with
 *      ZMQ_IMMEDIATE (nothing is queued for a daemon that is not there, so
 *      a send waits for a real connection, at most the timeout) and ZMTP
 *      heartbeats, and a socket monitor that reports lost connections;
 *   2. every request (a job or an op) becomes an entry with its id and an
 *      optional deadline; an entry lives until its last event arrives;
 *   3. pump() waits for one thing to happen: a message from the daemon
 *      (queued in arrival order), a lost connection or a timer. When the
 *      daemon stays quiet while entries wait, it sends a health probe at
 *      half the timeout and gives every entry a "timeout" error at the full
 *      timeout; a job past its own deadline gets its own "timeout" error and
 *      a best-effort cancel. So every entry ends, and no call waits forever;
 *   4. the blocking calls take their own events out of the queue by id and
 *      leave the others for vlm_client_poll().
 */
#include "clients/c/vlm.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#define PROTO_VERSION 1
#define LINGER_MS 200           /* how long a closing socket may still send cancels */
#define MIN_TIMEOUT_MS 50

/* ==== Error codes ======================================================= */

typedef struct err_info {
    int code;
    const char *name;
    const char *msg;
} err_info_t;

static const err_info_t err_table[] = {
#define VLM__CLIENT_ERR_ROW(e, value, name, msg) {value, name, msg},
    VLM_CLIENT_ERROR_LIST(VLM__CLIENT_ERR_ROW)
#undef VLM__CLIENT_ERR_ROW
};
#define N_ERR (sizeof err_table / sizeof err_table[0])

const char *vlm_client_strerror(int code) {
    for (size_t i = 0; i < N_ERR; i++)
        if (err_table[i].code == code) return err_table[i].msg;
    return "unknown error";
}

const char *vlm_client_err_name(int code) {
    for (size_t i = 0; i < N_ERR; i++)
        if (err_table[i].code == code) return err_table[i].name;
    return "internal";
}

int vlm_client_err_from_name(const char *name) {
    if (name)
        for (size_t i = 1; i < N_ERR; i++)
            if (strcmp(err_table[i].name, name) == 0) return err_table[i].code;
    return VLM_CLIENT_ERR_INTERNAL;
}

/* ==== Small structs ===================================================== */

void vlm_client_params_init(vlm_client_params_t *p) {
    memset(p, 0, sizeof *p);
    p->max_tokens = 0;
    p->temperature = -1.0;
    p->top_k = -1;
    p->top_p = -1.0;
    p->min_p = -1.0;
    p->repeat_penalty = -1.0;
    p->repeat_last_n = -1;
    p->seed = -1;
}

void vlm_client_result_init(vlm_client_result_t *r) { memset(r, 0, sizeof *r); }

void vlm_client_result_deinit(vlm_client_result_t *r) {
    if (!r) return;
    free(r->text);
    free(r->json);
    memset(r, 0, sizeof *r);
}

void vlm_client_event_init(vlm_client_event_t *ev) { memset(ev, 0, sizeof *ev); }

void vlm_client_event_deinit(vlm_client_event_t *ev) {
    if (!ev) return;
    free(ev->text);
    vlm_client_result_deinit(&ev->result);
    memset(ev, 0, sizeof *ev);
}

void vlm_client_opts_init(vlm_client_opts_t *o) {
    memset(o, 0, sizeof *o);
    o->timeout_ms = VLM_CLIENT_DEFAULT_TIMEOUT_MS;
}

/* ==== The client ======================================================== */

typedef enum entry_kind { ENTRY_JOB, ENTRY_OP } entry_kind_t;

/* A request waiting for its last event. */
typedef struct entry {
    char id[VLM_CLIENT_ID_MAX + 1];
    entry_kind_t kind;
    void *user;
    int64_t deadline;            /* monotonic ms; 0: none */
} entry_t;

/* A received (or synthesized) event not yet handed out, in arrival order. */
typedef struct item {
    struct item *next;
    json_t *obj;                 /* the event object */
    char *raw;                   /* its text as received; NULL when synthesized */
    char id[VLM_CLIENT_ID_MAX + 1];
    entry_kind_t kind;
    void *user;
} item_t;

struct vlm_client {
    void *ctx;
    bool own_ctx;
    void *sock;                  /* DEALER */
    void *mon;                   /* PAIR fed by zmq_socket_monitor() */
    char *endpoint;
    int32_t timeout_ms;
    char prefix[24];             /* random per client: ids are "<prefix>-<seq>" */
    uint64_t seq;
    entry_t *entries;            /* [n_entries], in submission order */
    size_t n_entries, cap_entries;
    item_t *q_head, *q_tail;
    int64_t last_heard;          /* monotonic ms of the daemon's last message (or of the first wait) */
    bool probe_out;              /* a health probe is unanswered */
    char err[512];
};

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int seterr(vlm_client_t *c, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int seterr(vlm_client_t *c, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    return code;
}

const char *vlm_client_errmsg(const vlm_client_t *c) { return c ? c->err : "no client"; }

const char *vlm_client_endpoint(const vlm_client_t *c) { return c ? c->endpoint : ""; }

void vlm_client_set_timeout(vlm_client_t *c, int32_t timeout_ms) {
    if (!c) return;
    c->timeout_ms = timeout_ms > 0 ? (timeout_ms < MIN_TIMEOUT_MS ? MIN_TIMEOUT_MS : timeout_ms)
                                   : VLM_CLIENT_DEFAULT_TIMEOUT_MS;
}

int vlm_client_pending(const vlm_client_t *c) {
    int n = 0;
    for (size_t i = 0; c && i < c->n_entries; i++) n += c->entries[i].kind == ENTRY_JOB;
    return n;
}

/* A fresh id "<prefix>-<tag><seq>" into out[VLM_CLIENT_ID_MAX + 1]. */
static void next_id(vlm_client_t *c, const char *tag, char *out) {
    snprintf(out, VLM_CLIENT_ID_MAX + 1, "%s-%s%llu", c->prefix, tag, (unsigned long long)++c->seq);
}

static void random_prefix(vlm_client_t *c) {
    uint64_t r = 0;
    if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        r = (uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid() << 32 ^ (uint64_t)(uintptr_t)c;
    }
    snprintf(c->prefix, sizeof c->prefix, "%012llx", (unsigned long long)(r & 0xFFFFFFFFFFFFull));
}

vlm_client_t *vlm_client_new(const char *endpoint, const vlm_client_opts_t *opts, char *err, size_t err_cap) {
    vlm_client_opts_t defaults;
    if (!opts) {
        vlm_client_opts_init(&defaults);
        opts = &defaults;
    }
    if (!endpoint || !*endpoint) endpoint = getenv("VLM_ENDPOINT");
    if (!endpoint || !*endpoint) endpoint = VLM_CLIENT_DEFAULT_ENDPOINT;
    const char *what = "out of memory";
    char mon_addr[96];

    vlm_client_t *c = calloc(1, sizeof *c);
    if (!c) goto fail_alloc;
    c->endpoint = strdup(endpoint);
    if (!c->endpoint) goto fail_endpoint;
    vlm_client_set_timeout(c, opts->timeout_ms);
    random_prefix(c);

    c->ctx = opts->zmq_ctx;
    if (!c->ctx) {
        c->ctx = zmq_ctx_new();
        c->own_ctx = true;
        what = "cannot make a ZeroMQ context";
        if (!c->ctx) goto fail_ctx;
    }
    what = "cannot make a ZeroMQ socket";
    c->sock = zmq_socket(c->ctx, ZMQ_DEALER);
    if (!c->sock) goto fail_sock;
    const int one = 1, linger = LINGER_MS;
    /* ZMTP heartbeats drop a connection whose peer vanished without a word
     * (the monitor then fails its jobs); the daemon's I/O thread answers
     * them even while it computes. Kept above a second or two so a loaded
     * machine does not drop a healthy daemon. */
    const int hb_ivl = c->timeout_ms / 4 > 500 ? c->timeout_ms / 4 : 500;
    const int hb_timeout = c->timeout_ms > 2000 ? c->timeout_ms : 2000;
    zmq_setsockopt(c->sock, ZMQ_IMMEDIATE, &one, sizeof one);
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(c->sock, ZMQ_HEARTBEAT_IVL, &hb_ivl, sizeof hb_ivl);
    zmq_setsockopt(c->sock, ZMQ_HEARTBEAT_TIMEOUT, &hb_timeout, sizeof hb_timeout);

    /* The monitor reports a dropped connection, so jobs on it fail at once. */
    snprintf(mon_addr, sizeof mon_addr, "inproc://vlm-client-monitor-%s-%p", c->prefix, (void *)c);
    what = "cannot monitor the ZeroMQ socket";
    if (zmq_socket_monitor(c->sock, mon_addr, ZMQ_EVENT_DISCONNECTED) != 0) goto fail_monitor;
    c->mon = zmq_socket(c->ctx, ZMQ_PAIR);
    if (!c->mon) goto fail_mon_sock;
    zmq_setsockopt(c->mon, ZMQ_LINGER, &(int){0}, sizeof(int));
    if (zmq_connect(c->mon, mon_addr) != 0) goto fail_mon_connect;

    if (zmq_connect(c->sock, c->endpoint) != 0) {
        if (err && err_cap)
            snprintf(err, err_cap, "cannot connect to endpoint '%s': %s", c->endpoint, zmq_strerror(errno));
        what = NULL;
        goto fail_connect;
    }
    return c;

fail_connect:
fail_mon_connect:
    zmq_close(c->mon);
fail_mon_sock:
    zmq_socket_monitor(c->sock, NULL, 0);
fail_monitor:
    zmq_setsockopt(c->sock, ZMQ_LINGER, &(int){0}, sizeof(int));
    zmq_close(c->sock);
fail_sock:
    if (c->own_ctx) zmq_ctx_term(c->ctx);
fail_ctx:
    free(c->endpoint);
fail_endpoint:
    free(c);
fail_alloc:
    if (what && err && err_cap) snprintf(err, err_cap, "%s", what);
    return NULL;
}

/* ==== Queue and entries ================================================= */

static void item_free(item_t *it) {
    if (!it) return;
    json_decref(it->obj);
    free(it->raw);
    free(it);
}

static void queue_push(vlm_client_t *c, item_t *it) {
    it->next = NULL;
    if (c->q_tail) c->q_tail->next = it;
    else c->q_head = it;
    c->q_tail = it;
}

/* Removes and returns the first queued item with id (any id when id is
 * NULL, then only of kind), or NULL. */
static item_t *queue_take(vlm_client_t *c, const char *id, entry_kind_t kind) {
    item_t *prev = NULL;
    for (item_t *it = c->q_head; it; prev = it, it = it->next) {
        if (id ? strcmp(it->id, id) != 0 : it->kind != kind) continue;
        if (prev) prev->next = it->next;
        else c->q_head = it->next;
        if (c->q_tail == it) c->q_tail = prev;
        it->next = NULL;
        return it;
    }
    return NULL;
}

static int find_entry(const vlm_client_t *c, const char *id) {
    for (size_t i = 0; i < c->n_entries; i++)
        if (strcmp(c->entries[i].id, id) == 0) return (int)i;
    return -1;
}

static int add_entry(vlm_client_t *c, const char *id, entry_kind_t kind, void *user, int64_t deadline) {
    if (c->n_entries == c->cap_entries) {
        size_t cap = c->cap_entries ? 2 * c->cap_entries : 8;
        entry_t *e = realloc(c->entries, cap * sizeof *e);
        if (!e) return seterr(c, VLM_CLIENT_ERR_NOMEM, "out of memory");
        c->entries = e;
        c->cap_entries = cap;
    }
    /* A wait begins: the daemon's silence counts from now. */
    if (c->n_entries == 0) {
        c->last_heard = now_ms();
        c->probe_out = false;
    }
    entry_t *e = &c->entries[c->n_entries++];
    snprintf(e->id, sizeof e->id, "%s", id);
    e->kind = kind;
    e->user = user;
    e->deadline = deadline;
    return 0;
}

static void remove_entry(vlm_client_t *c, size_t i) {
    memmove(&c->entries[i], &c->entries[i + 1], (c->n_entries - i - 1) * sizeof *c->entries);
    c->n_entries--;
}

/* ==== Sending =========================================================== */

/* Sends frames[n] as one multipart message, waiting at most the timeout for
 * a connection. The first frame is the header. */
static int send_frames(vlm_client_t *c, const void *const *data, const size_t *size, size_t n, bool wait) {
    const int64_t until = now_ms() + (wait ? c->timeout_ms : 0);
    for (;;) {
        int rc = zmq_send(c->sock, data[0], size[0], ZMQ_DONTWAIT | (n > 1 ? ZMQ_SNDMORE : 0));
        if (rc >= 0) break;
        if (errno != EAGAIN && errno != EINTR)
            return seterr(c, VLM_CLIENT_ERR_IO, "sending to %s: %s", c->endpoint, zmq_strerror(errno));
        const int64_t left = until - now_ms();
        if (left <= 0)
            return seterr(c, VLM_CLIENT_ERR_TIMEOUT, "no daemon answered at %s within %.1f s (is vlmd running?)",
                          c->endpoint, c->timeout_ms / 1000.0);
        zmq_pollitem_t it = {c->sock, 0, ZMQ_POLLOUT, 0};
        zmq_poll(&it, 1, (long)(left < 100 ? left : 100));
    }
    /* Once the first part is queued, the rest of the message follows it. */
    for (size_t i = 1; i < n; i++) {
        int rc;
        do rc = zmq_send(c->sock, data[i], size[i], i + 1 < n ? ZMQ_SNDMORE : 0);
        while (rc < 0 && errno == EINTR);
        if (rc < 0) return seterr(c, VLM_CLIENT_ERR_IO, "sending to %s: %s", c->endpoint, zmq_strerror(errno));
    }
    return 0;
}

/* Sends the JSON object o (stolen) as a one-frame request. */
static int send_json(vlm_client_t *c, json_t *o, bool wait) {
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!s) return seterr(c, VLM_CLIENT_ERR_NOMEM, "out of memory");
    const void *d[1] = {s};
    size_t n[1] = {strlen(s)};
    int rc = send_frames(c, d, n, 1, wait);
    free(s);
    return rc;
}

/* {"v":1,"id":id,"op":op}, or NULL when out of memory. */
static json_t *op_header(const char *id, const char *op) {
    return json_pack("{s:i, s:s, s:s}", "v", PROTO_VERSION, "id", id, "op", op);
}

/* A best-effort cancel of job target; its answer is not awaited. */
static void send_cancel_nowait(vlm_client_t *c, const char *target) {
    char id[VLM_CLIENT_ID_MAX + 1];
    next_id(c, "c", id);
    json_t *o = op_header(id, "cancel");
    if (o) json_object_set_new(o, "target", json_string(target));
    char saved[sizeof c->err];
    memcpy(saved, c->err, sizeof saved);
    send_json(c, o, false);
    memcpy(c->err, saved, sizeof saved);
}

/* ==== Receiving ========================================================= */

/* Queues a synthesized error event for entry i and removes the entry; a
 * job is also cancelled in the daemon (best effort). */
static void fail_entry(vlm_client_t *c, size_t i, int code, const char *msg) {
    entry_t e = c->entries[i];
    remove_entry(c, i);
    if (e.kind == ENTRY_JOB && code != VLM_CLIENT_ERR_CONNECT) send_cancel_nowait(c, e.id);
    item_t *it = calloc(1, sizeof *it);
    if (!it) return;
    it->obj = json_pack("{s:i, s:s, s:s, s:s, s:s}", "v", PROTO_VERSION, "id", e.id, "event", "error", "code",
                        vlm_client_err_name(code), "message", msg);
    if (!it->obj) {
        free(it);
        return;
    }
    snprintf(it->id, sizeof it->id, "%s", e.id);
    it->kind = e.kind;
    it->user = e.user;
    queue_push(c, it);
}

static void fail_all(vlm_client_t *c, int code, const char *msg) {
    while (c->n_entries) fail_entry(c, 0, code, msg);
}

/* Deadlines and liveness. Returns the number of entries failed. */
static int check_timers(vlm_client_t *c, int64_t now) {
    if (!c->n_entries) return 0;
    int failed = 0;
    char msg[256];
    for (size_t i = 0; i < c->n_entries;) {
        if (c->entries[i].deadline && now >= c->entries[i].deadline) {
            snprintf(msg, sizeof msg, "%s did not end within its time limit",
                     c->entries[i].kind == ENTRY_JOB ? "the job" : "the daemon's answer");
            fail_entry(c, i, VLM_CLIENT_ERR_TIMEOUT, msg);
            failed++;
        } else {
            i++;
        }
    }
    if (c->n_entries && now - c->last_heard >= c->timeout_ms) {
        failed += (int)c->n_entries;
        snprintf(msg, sizeof msg, "no answer from the daemon at %s within %.1f s", c->endpoint,
                 c->timeout_ms / 1000.0);
        fail_all(c, VLM_CLIENT_ERR_TIMEOUT, msg);
    } else if (c->n_entries && !c->probe_out && now - c->last_heard >= c->timeout_ms / 2) {
        /* A quiet daemon is asked for a sign of life; it answers health at
         * once even while it computes. */
        char id[VLM_CLIENT_ID_MAX + 1];
        next_id(c, "h", id);
        char saved[sizeof c->err];
        memcpy(saved, c->err, sizeof saved);
        send_json(c, op_header(id, "health"), false);
        c->probe_out = true; /* sent or not: the full timeout decides next */
        memcpy(c->err, saved, sizeof saved);
    }
    return failed;
}

/* The next time check_timers() has something to do; -1: never. */
static int64_t next_timer(const vlm_client_t *c) {
    if (!c->n_entries) return -1;
    int64_t t = c->last_heard + (c->probe_out ? c->timeout_ms : c->timeout_ms / 2);
    for (size_t i = 0; i < c->n_entries; i++)
        if (c->entries[i].deadline && c->entries[i].deadline < t) t = c->entries[i].deadline;
    return t;
}

/* Reads the monitor's events; a lost connection fails every entry (their
 * answers would never come). Returns the number of entries failed. */
static int drain_monitor(vlm_client_t *c) {
    int failed = 0;
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, c->mon, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return failed;
        }
        uint16_t event = 0;
        if (zmq_msg_size(&m) >= 2) memcpy(&event, zmq_msg_data(&m), sizeof event);
        int more = zmq_msg_more(&m);
        zmq_msg_close(&m);
        while (more) { /* the endpoint frame */
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, c->mon, 0) < 0) more = 0;
            else more = zmq_msg_more(&m);
            zmq_msg_close(&m);
        }
        if (event == ZMQ_EVENT_DISCONNECTED && c->n_entries) {
            char msg[256];
            snprintf(msg, sizeof msg, "lost the connection to the daemon at %s", c->endpoint);
            failed += (int)c->n_entries;
            fail_all(c, VLM_CLIENT_ERR_CONNECT, msg);
        }
    }
}

/* Takes one message off the socket and queues it when it belongs to an
 * entry. Returns 1 when queued, 0 when dropped, < 0 on a socket error. */
static int receive_one(vlm_client_t *c) {
    zmq_msg_t m;
    zmq_msg_init(&m);
    int rc = zmq_msg_recv(&m, c->sock, ZMQ_DONTWAIT);
    if (rc < 0) {
        zmq_msg_close(&m);
        if (errno == EAGAIN || errno == EINTR) return 0;
        return seterr(c, VLM_CLIENT_ERR_IO, "receiving from %s: %s", c->endpoint, zmq_strerror(errno));
    }
    int more = zmq_msg_more(&m);
    json_error_t jerr;
    json_t *obj = json_loadb(zmq_msg_data(&m), zmq_msg_size(&m), 0, &jerr);
    char *raw = obj ? strndup(zmq_msg_data(&m), zmq_msg_size(&m)) : NULL;
    zmq_msg_close(&m);
    while (more) { /* events are one frame; drop anything extra */
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, c->sock, 0) < 0) more = 0;
        else more = zmq_msg_more(&m);
        zmq_msg_close(&m);
    }
    c->last_heard = now_ms();
    c->probe_out = false;
    if (!obj || !json_is_object(obj) || !raw) {
        seterr(c, VLM_CLIENT_ERR_PROTOCOL, "ignored a message from the daemon that is not a JSON object");
        json_decref(obj);
        free(raw);
        return 0;
    }
    const char *id = json_string_value(json_object_get(obj, "id"));
    const char *event = json_string_value(json_object_get(obj, "event"));
    int idx = id ? find_entry(c, id) : -1;
    /* An error the daemon could not address (it could not read our id)
     * goes to the oldest request. */
    if (idx < 0 && (!id || !*id) && event && strcmp(event, "error") == 0 && c->n_entries) idx = 0;
    if (idx < 0) { /* a probe's answer, or an event of a job given up on */
        json_decref(obj);
        free(raw);
        return 0;
    }
    item_t *it = calloc(1, sizeof *it);
    if (!it) {
        json_decref(obj);
        free(raw);
        return seterr(c, VLM_CLIENT_ERR_NOMEM, "out of memory");
    }
    entry_t *e = &c->entries[idx];
    it->obj = obj;
    it->raw = raw;
    snprintf(it->id, sizeof it->id, "%s", e->id);
    it->kind = e->kind;
    it->user = e->user;
    const bool last = e->kind == ENTRY_OP || !event || strcmp(event, "token") != 0;
    if (last) remove_entry(c, (size_t)idx);
    queue_push(c, it);
    return 1;
}

/* Waits for one thing to happen: a queued message, a failed entry or the
 * absolute time until (< 0: no limit). Returns 1 when the queue grew, 0 at
 * until or on a signal, < 0 on a socket error. */
static int pump(vlm_client_t *c, int64_t until) {
    for (;;) {
        int64_t now = now_ms();
        if (drain_monitor(c) > 0) return 1;
        if (check_timers(c, now) > 0) return 1;
        if (until >= 0 && now >= until) return 0;
        int64_t wake = next_timer(c);
        if (until >= 0 && (wake < 0 || until < wake)) wake = until;
        long wait = wake < 0 ? -1 : (long)(wake > now ? wake - now : 0);
        zmq_pollitem_t items[2] = {{c->sock, 0, ZMQ_POLLIN, 0}, {c->mon, 0, ZMQ_POLLIN, 0}};
        int rc = zmq_poll(items, 2, wait);
        if (rc < 0) {
            if (errno == EINTR) return 0;
            return seterr(c, VLM_CLIENT_ERR_IO, "waiting for the daemon: %s", zmq_strerror(errno));
        }
        if (items[1].revents & ZMQ_POLLIN)
            if (drain_monitor(c) > 0) return 1;
        if (items[0].revents & ZMQ_POLLIN) {
            /* Take everything that is there, so a burst of pieces costs one
             * poll. */
            int got = 0;
            for (int k = 0; k < 64; k++) {
                int zrc = receive_one(c);
                if (zrc < 0) return zrc;
                got += zrc;
                int ev = 0;
                size_t sz = sizeof ev;
                if (zmq_getsockopt(c->sock, ZMQ_EVENTS, &ev, &sz) != 0 || !(ev & ZMQ_POLLIN)) break;
            }
            if (got) return 1;
        }
    }
}

/* Waits for the next queued item with id (its entry guarantees that one
 * comes: an answer or a synthesized failure). */
static int wait_item(vlm_client_t *c, const char *id, item_t **out) {
    for (;;) {
        item_t *it = queue_take(c, id, ENTRY_JOB);
        if (it) {
            *out = it;
            return 0;
        }
        if (find_entry(c, id) < 0)
            return seterr(c, VLM_CLIENT_ERR_INTERNAL, "libvlm: request %s is no longer tracked", id);
        int rc = pump(c, -1);
        if (rc < 0) return rc;
    }
}

/* ==== Events into structs =============================================== */

static int64_t get_int(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return json_is_number(v) ? (int64_t)json_number_value(v) : 0;
}

static double get_num(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : 0.0;
}

/* Copies the string of key (with its length) into *out; false when absent. */
static bool get_str(json_t *o, const char *key, char **out, size_t *len) {
    json_t *v = json_object_get(o, key);
    if (!json_is_string(v)) return false;
    size_t n = json_string_length(v);
    char *s = malloc(n + 1);
    if (!s) return false;
    memcpy(s, json_string_value(v), n);
    s[n] = '\0';
    free(*out);
    *out = s;
    if (len) *len = n;
    return true;
}

/* Fills r from a done event; false when it lacks its text. */
static bool fill_result(const item_t *it, vlm_client_result_t *r) {
    vlm_client_result_deinit(r);
    if (!get_str(it->obj, "text", &r->text, &r->text_len)) return false;
    const char *fr = json_string_value(json_object_get(it->obj, "finish_reason"));
    snprintf(r->finish_reason, sizeof r->finish_reason, "%s", fr ? fr : "stop");
    json_t *u = json_object_get(it->obj, "usage");
    r->usage.prompt_tokens = get_int(u, "prompt_tokens");
    r->usage.image_tokens = get_int(u, "image_tokens");
    r->usage.completion_tokens = get_int(u, "completion_tokens");
    json_t *t = json_object_get(it->obj, "timings");
    r->timings.queue_ms = get_num(t, "queue_ms");
    r->timings.image_decode_ms = get_num(t, "image_decode_ms");
    r->timings.encode_ms = get_num(t, "encode_ms");
    r->timings.prefill_ms = get_num(t, "prefill_ms");
    r->timings.decode_ms = get_num(t, "decode_ms");
    r->timings.total_ms = get_num(t, "total_ms");
    r->json = it->raw ? strdup(it->raw) : json_dumps(it->obj, JSON_COMPACT);
    return r->json != NULL;
}

/* The error code and message of an error event into ev and c->err;
 * returns the code. */
static int read_error(vlm_client_t *c, const item_t *it, vlm_client_event_t *ev) {
    const char *code = json_string_value(json_object_get(it->obj, "code"));
    const char *msg = json_string_value(json_object_get(it->obj, "message"));
    int err = vlm_client_err_from_name(code);
    if (err == VLM_CLIENT_OK) err = VLM_CLIENT_ERR_INTERNAL;
    seterr(c, err, "%s", msg && *msg ? msg : vlm_client_strerror(err));
    if (ev) {
        ev->type = VLM_CLIENT_EVENT_ERROR;
        ev->error = err;
        snprintf(ev->code, sizeof ev->code, "%s", code ? code : vlm_client_err_name(err));
        snprintf(ev->message, sizeof ev->message, "%s", c->err);
    }
    return err;
}

/* Turns a job's queued item into ev. A malformed event becomes an ERROR
 * with VLM_CLIENT_ERR_PROTOCOL. */
static void fill_event(vlm_client_t *c, const item_t *it, vlm_client_event_t *ev) {
    vlm_client_event_deinit(ev);
    snprintf(ev->job_id, sizeof ev->job_id, "%s", it->id);
    ev->user = it->user;
    const char *event = json_string_value(json_object_get(it->obj, "event"));
    if (event && strcmp(event, "token") == 0) {
        ev->type = VLM_CLIENT_EVENT_TOKEN;
        ev->index = get_int(it->obj, "index");
        if (get_str(it->obj, "text", &ev->text, &ev->text_len)) return;
    } else if (event && strcmp(event, "done") == 0) {
        ev->type = VLM_CLIENT_EVENT_DONE;
        if (fill_result(it, &ev->result)) return;
    } else if (event && strcmp(event, "error") == 0) {
        read_error(c, it, ev);
        return;
    }
    vlm_client_event_deinit(ev);
    snprintf(ev->job_id, sizeof ev->job_id, "%s", it->id);
    ev->user = it->user;
    ev->type = VLM_CLIENT_EVENT_ERROR;
    ev->error = VLM_CLIENT_ERR_PROTOCOL;
    snprintf(ev->code, sizeof ev->code, "%s", vlm_client_err_name(VLM_CLIENT_ERR_PROTOCOL));
    snprintf(ev->message, sizeof ev->message, "malformed '%s' event from the daemon", event ? event : "?");
    seterr(c, ev->error, "%s", ev->message);
}

/* ==== Requests ========================================================== */

/* Reads a whole file into *data (caller frees). */
static int read_file(vlm_client_t *c, const char *path, void **data, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return seterr(c, VLM_CLIENT_ERR_IO, "%s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    unsigned char *buf = malloc(cap);
    while (buf) {
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (n < cap) break;
        unsigned char *b = realloc(buf, cap * 2);
        if (!b) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = b;
        cap *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf) return seterr(c, VLM_CLIENT_ERR_NOMEM, "%s: out of memory", path);
    if (bad) {
        free(buf);
        return seterr(c, VLM_CLIENT_ERR_IO, "%s: read error", path);
    }
    *data = buf;
    *size = n;
    return 0;
}

/* Sets key to a string field unless s is NULL; false when s is not UTF-8. */
static bool set_opt_str(json_t *o, const char *key, const char *s) {
    if (!s) return true;
    json_t *v = json_string(s);
    return v && json_object_set_new(o, key, v) == 0;
}

/* The header of a generate request, or NULL with the code in *code and
 * the sentence in c->err. */
static json_t *generate_header(vlm_client_t *c, const char *id, const vlm_client_params_t *p, bool stream,
                               int *code) {
    json_t *o = op_header(id, "generate");
    if (!o) {
        *code = seterr(c, VLM_CLIENT_ERR_NOMEM, "out of memory");
        return NULL;
    }
    const char *bad = NULL;
    if (!set_opt_str(o, "prompt", p->prompt)) bad = "the prompt";
    else if (!set_opt_str(o, "system", p->system)) bad = "the system text";
    else if (!set_opt_str(o, "template", p->template_name)) bad = "the template name";
    else if (!set_opt_str(o, "preprocess", p->preprocess)) bad = "the preprocess mode";
    if (bad) {
        json_decref(o);
        *code = seterr(c, VLM_CLIENT_ERR_INVALID_ARG, "%s is not valid UTF-8", bad);
        return NULL;
    }
    if (p->max_tokens > 0) json_object_set_new(o, "max_tokens", json_integer(p->max_tokens));
    if (p->temperature >= 0) json_object_set_new(o, "temperature", json_real(p->temperature));
    if (p->top_k >= 0) json_object_set_new(o, "top_k", json_integer(p->top_k));
    if (p->top_p >= 0) json_object_set_new(o, "top_p", json_real(p->top_p));
    if (p->min_p >= 0) json_object_set_new(o, "min_p", json_real(p->min_p));
    if (p->repeat_penalty >= 0) json_object_set_new(o, "repeat_penalty", json_real(p->repeat_penalty));
    if (p->repeat_last_n >= 0) json_object_set_new(o, "repeat_last_n", json_integer(p->repeat_last_n));
    if (p->seed >= 0) json_object_set_new(o, "seed", json_integer(p->seed));
    if (p->n_stop) {
        json_t *a = json_array();
        for (size_t i = 0; a && i < p->n_stop; i++) {
            json_t *s = p->stop[i] ? json_string(p->stop[i]) : NULL;
            if (!s) {
                json_decref(a);
                json_decref(o);
                *code = seterr(c, VLM_CLIENT_ERR_INVALID_ARG, "stop string %zu is missing or not valid UTF-8",
                               i + 1);
                return NULL;
            }
            json_array_append_new(a, s);
        }
        json_object_set_new(o, "stop", a);
    }
    json_object_set_new(o, "stream", json_boolean(stream));
    return o;
}

/* Sends a generate request for entry id. */
static int send_generate(vlm_client_t *c, const char *id, const vlm_client_params_t *p, bool stream) {
    if (!p || !p->prompt) return seterr(c, VLM_CLIENT_ERR_INVALID_ARG, "no prompt given");
    if (p->n_images && !p->images) return seterr(c, VLM_CLIENT_ERR_INVALID_ARG, "images missing");
    for (size_t i = 0; i < p->n_images; i++)
        if (!p->images[i].data && !p->images[i].path)
            return seterr(c, VLM_CLIENT_ERR_INVALID_ARG, "image %zu has neither bytes nor a path", i + 1);

    int code = 0;
    json_t *o = generate_header(c, id, p, stream, &code);
    if (!o) return code;
    char *header = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!header) return seterr(c, VLM_CLIENT_ERR_NOMEM, "out of memory");

    const size_t n = 1 + p->n_images;
    const void **data = calloc(n, sizeof *data);
    size_t *size = calloc(n, sizeof *size);
    void **owned = calloc(n, sizeof *owned);
    int rc = 0;
    if (!data || !size || !owned) {
        rc = seterr(c, VLM_CLIENT_ERR_NOMEM, "out of memory");
        goto done;
    }
    data[0] = header;
    size[0] = strlen(header);
    for (size_t i = 0; i < p->n_images; i++) {
        if (p->images[i].data) {
            data[1 + i] = p->images[i].data;
            size[1 + i] = p->images[i].size;
        } else {
            if ((rc = read_file(c, p->images[i].path, &owned[1 + i], &size[1 + i]))) goto done;
            data[1 + i] = owned[1 + i];
        }
    }
    rc = send_frames(c, data, size, n, true);
done:
    for (size_t i = 0; owned && i < n; i++) free(owned[i]);
    free(owned);
    free(size);
    free(data);
    free(header);
    return rc;
}

int vlm_client_submit(vlm_client_t *c, const vlm_client_params_t *p, void *user, char *job_id) {
    if (!c) return VLM_CLIENT_ERR_INVALID_ARG;
    c->err[0] = '\0';
    drain_monitor(c);
    char id[VLM_CLIENT_ID_MAX + 1];
    next_id(c, "", id);
    int rc = send_generate(c, id, p, p && p->stream);
    if (rc) return rc;
    int64_t deadline = p->timeout_ms > 0 ? now_ms() + p->timeout_ms : 0;
    if ((rc = add_entry(c, id, ENTRY_JOB, user, deadline))) {
        send_cancel_nowait(c, id);
        return rc;
    }
    if (job_id) snprintf(job_id, VLM_CLIENT_ID_MAX + 1, "%s", id);
    return 0;
}

int vlm_client_poll(vlm_client_t *c, int timeout_ms, vlm_client_event_t *ev) {
    if (!c || !ev) return VLM_CLIENT_ERR_INVALID_ARG;
    const int64_t until = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
    for (;;) {
        item_t *it = queue_take(c, NULL, ENTRY_JOB);
        if (it) {
            fill_event(c, it, ev);
            item_free(it);
            return 1;
        }
        if (vlm_client_pending(c) == 0) return 0;
        int rc = pump(c, until);
        if (rc < 0) return rc;
        if (rc == 0) return 0;
    }
}

int vlm_client_ask_stream(vlm_client_t *c, const vlm_client_params_t *p, vlm_client_token_fn fn, void *user,
                          vlm_client_result_t *out) {
    if (!c) return VLM_CLIENT_ERR_INVALID_ARG;
    c->err[0] = '\0';
    drain_monitor(c);
    char id[VLM_CLIENT_ID_MAX + 1];
    next_id(c, "", id);
    int rc = send_generate(c, id, p, fn != NULL);
    if (rc) return rc;
    if ((rc = add_entry(c, id, ENTRY_JOB, NULL, p->timeout_ms > 0 ? now_ms() + p->timeout_ms : 0))) {
        send_cancel_nowait(c, id);
        return rc;
    }
    bool cancelling = false;
    for (;;) {
        item_t *it = NULL;
        if ((rc = wait_item(c, id, &it))) return rc;
        const char *event = json_string_value(json_object_get(it->obj, "event"));
        if (event && strcmp(event, "token") == 0) {
            json_t *t = json_object_get(it->obj, "text");
            if (!cancelling && fn && json_is_string(t) &&
                fn(json_string_value(t), json_string_length(t), user) != 0) {
                cancelling = true;
                send_cancel_nowait(c, id);
            }
            item_free(it);
            continue;
        }
        if (event && strcmp(event, "done") == 0) {
            vlm_client_result_t tmp;
            vlm_client_result_init(&tmp);
            bool ok = fill_result(it, out ? out : &tmp);
            vlm_client_result_deinit(&tmp);
            item_free(it);
            return ok ? 0 : seterr(c, VLM_CLIENT_ERR_PROTOCOL, "malformed 'done' event from the daemon");
        }
        if (event && strcmp(event, "error") == 0) {
            rc = read_error(c, it, NULL);
            item_free(it);
            return rc;
        }
        item_free(it);
        return seterr(c, VLM_CLIENT_ERR_PROTOCOL, "unexpected '%s' event for a job", event ? event : "?");
    }
}

int vlm_client_ask(vlm_client_t *c, const vlm_client_params_t *p, vlm_client_result_t *out) {
    return vlm_client_ask_stream(c, p, NULL, NULL, out);
}

/* Sends op (header o, stolen, with id) and waits for its answer, which goes
 * to *obj_out (caller decrefs) and/or *json_out. */
static int run_op(vlm_client_t *c, const char *id, json_t *o, json_t **obj_out, char **json_out) {
    if (json_out) *json_out = NULL;
    if (obj_out) *obj_out = NULL;
    drain_monitor(c);
    int rc = send_json(c, o, true);
    if (rc) return rc;
    if ((rc = add_entry(c, id, ENTRY_OP, NULL, now_ms() + c->timeout_ms))) return rc;
    item_t *it = NULL;
    if ((rc = wait_item(c, id, &it))) return rc;
    const char *event = json_string_value(json_object_get(it->obj, "event"));
    if (!event || strcmp(event, "error") == 0) {
        rc = event ? read_error(c, it, NULL) : seterr(c, VLM_CLIENT_ERR_PROTOCOL, "an answer without 'event'");
        item_free(it);
        return rc;
    }
    if (json_out) {
        *json_out = it->raw ? strdup(it->raw) : json_dumps(it->obj, JSON_COMPACT);
        if (!*json_out) rc = seterr(c, VLM_CLIENT_ERR_NOMEM, "out of memory");
    }
    if (obj_out && !rc) *obj_out = json_incref(it->obj);
    item_free(it);
    return rc;
}

int vlm_client_op(vlm_client_t *c, const char *op, char **json_out) {
    if (!c || !op) return VLM_CLIENT_ERR_INVALID_ARG;
    c->err[0] = '\0';
    char id[VLM_CLIENT_ID_MAX + 1];
    next_id(c, "o", id);
    json_t *o = op_header(id, op);
    if (!o) return seterr(c, VLM_CLIENT_ERR_INVALID_ARG, "the op name is not valid UTF-8");
    return run_op(c, id, o, NULL, json_out);
}

int vlm_client_health(vlm_client_t *c, vlm_client_health_t *out, char **json_out) {
    if (!c) return VLM_CLIENT_ERR_INVALID_ARG;
    c->err[0] = '\0';
    char id[VLM_CLIENT_ID_MAX + 1];
    next_id(c, "o", id);
    json_t *obj = NULL;
    int rc = run_op(c, id, op_header(id, "health"), &obj, json_out);
    if (rc) return rc;
    if (out) {
        memset(out, 0, sizeof *out);
        const char *s = json_string_value(json_object_get(obj, "status"));
        snprintf(out->status, sizeof out->status, "%s", s ? s : "");
        out->uptime_s = get_num(obj, "uptime_s");
        out->active = get_int(obj, "active");
        out->queued = get_int(obj, "queued");
    }
    json_decref(obj);
    return 0;
}

int vlm_client_stats(vlm_client_t *c, char **json_out) { return vlm_client_op(c, "stats", json_out); }

int vlm_client_model(vlm_client_t *c, char **json_out) { return vlm_client_op(c, "model", json_out); }

int vlm_client_cancel(vlm_client_t *c, const char *job_id, bool *found) {
    if (!c || !job_id) return VLM_CLIENT_ERR_INVALID_ARG;
    c->err[0] = '\0';
    char id[VLM_CLIENT_ID_MAX + 1];
    next_id(c, "c", id);
    json_t *o = op_header(id, "cancel");
    json_t *t = json_string(job_id);
    if (!o || !t || json_object_set_new(o, "target", t) != 0) {
        json_decref(o);
        return seterr(c, VLM_CLIENT_ERR_INVALID_ARG, "the job id is not valid UTF-8");
    }
    json_t *obj = NULL;
    int rc = run_op(c, id, o, &obj, NULL);
    if (rc) return rc;
    if (found) *found = json_is_true(json_object_get(obj, "found"));
    json_decref(obj);
    return 0;
}

void vlm_client_destroy(vlm_client_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_client_t *c = *self_p;
    *self_p = NULL;
    for (size_t i = 0; i < c->n_entries; i++)
        if (c->entries[i].kind == ENTRY_JOB) send_cancel_nowait(c, c->entries[i].id);
    free(c->entries);
    while (c->q_head) item_free(queue_take(c, NULL, c->q_head->kind));
    zmq_socket_monitor(c->sock, NULL, 0);
    zmq_close(c->mon);
    zmq_close(c->sock);
    if (c->own_ctx) zmq_ctx_term(c->ctx);
    free(c->endpoint);
    free(c);
}
