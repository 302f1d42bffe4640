/* daemon/server.h - the I/O thread of vlmd: the ROUTER socket, request
 * checking, the cheap ops, and forwarding of the engine's events.
 *
 * The server never computes: it parses each request (daemon/protocol.h),
 * answers health, stats, model, cancel and every bad request at once, and
 * hands generate jobs to the engine through its bounded queue plus a
 * wake-up on the inproc PAIR socket. Events from the engine come back on the
 * same socket and are sent to the client that asked.
 *
 * Clients that go away are noticed three ways, and their jobs cancelled
 * (the engine frees the slot at its next step):
 *   - a send fails with EHOSTUNREACH (ZMQ_ROUTER_MANDATORY);
 *   - the connection closes (a socket monitor reports DISCONNECTED for the
 *     file descriptor the requests came from; ZMTP heartbeats close
 *     connections to peers that stopped answering);
 *   - the client stops reading: its send pipe stays full (EAGAIN) for
 *     longer than the reply timeout. Until then its events wait, in order,
 *     in a per-client backlog, so the I/O thread never blocks on a slow
 *     client.
 *
 * Shutdown: a SIGTERM or SIGINT (one byte each from main's self-pipe)
 * stops admission (generate gets shutting_down, health says "stopping") and
 * tells the engine to stop with the grace period; a second signal ends every
 * job at once.
 * vlm_server_run() returns once the engine has ended every job and their
 * final events have been sent.
 */
#ifndef VLM_DAEMON_SERVER_H
#define VLM_DAEMON_SERVER_H

#include "core/error.h"
#include "daemon/engine.h"
#include "daemon/protocol.h"

typedef struct vlm_server_opts {
    const char *endpoint;          /* tcp:// or ipc:// endpoint to bind */
    vlm_request_limits_t limits;
    double grace_s;                /* running jobs may finish this long after a stop */
    double reply_timeout_s;        /* a client whose pipe stays full this long is gone */
    int heartbeat_ms;              /* ZMTP heartbeat interval; the timeout is 3x */
    int sndhwm;                    /* messages queued per client before EAGAIN */
} vlm_server_opts_t;

void vlm_server_opts_default(vlm_server_opts_t *o);

typedef struct vlm_server vlm_server_t;

/* Binds the ROUTER socket at o->endpoint and the engine's inproc socket,
 * and sets up the connection monitor. signal_fd is the non-blocking read end
 * of a pipe that gets one byte (the signal number) per SIGTERM or SIGINT
 * (borrowed). engine is borrowed. Returns VLM_OK or
 * VLM_ERR_IO (the endpoint cannot be bound; err says why). */
int vlm_server_new(void *zctx, vlm_engine_t *engine, const vlm_server_opts_t *o, int signal_fd,
                   vlm_server_t **out, vlm_error_t *err);

/* The endpoint actually bound (with the port chosen for "tcp://host:*"). */
const char *vlm_server_endpoint(const vlm_server_t *s);

/* Serves until a signal has stopped the daemon and every job has ended.
 * Returns 0. */
int vlm_server_run(vlm_server_t *s);

/* Closes the sockets (sending what is still queued, within a linger
 * period) and frees; NULL-safe, clears *self_p. */
void vlm_server_destroy(vlm_server_t **self_p);

#endif
