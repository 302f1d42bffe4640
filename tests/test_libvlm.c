/* tests/test_libvlm.c - libvlm (clients/c/vlm.h) against a real vlmd.
 *
 * Starts build/daemon/vlmd on the micro golden model on a free loopback
 * port (SKIP when it is not built) and checks the library's calls:
 *   - vlm_client_ask() and vlm_client_ask_stream() give vlm-run's greedy
 *     answers (text and token ids, from `vlm-run --json`) for golden
 *     prompts with and without <image> markers, images as bytes and paths;
 *     the streamed pieces join to the final text;
 *   - a callback that returns non-zero cancels the job and the call still
 *     returns its done result;
 *   - submit/poll with several jobs in flight: each ends once, un-mixed;
 *   - health/stats/model/op, cancel of an unknown job;
 *   - daemon error codes (bad_image, bad_request, unknown_op) and client
 *     codes (io, invalid_arg, timeout with no daemon, within the timeout);
 *   - the error-name table, NULL-safe destroy, a shared ZeroMQ context.
 * Every wait is bounded by the client's timeout.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "clients/c/vlm.h"
#include "tests/harness.h"

#define GOLDEN VLM_TEST_DATA "/golden/micro-f32"

static char g_endpoint[64];
static pid_t g_daemon = -1;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int free_port(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    int port = -1;
    if (s >= 0 && bind(s, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(s, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    if (s >= 0) close(s);
    return port;
}

/* Runs argv with stdout captured into *out (caller frees); returns the exit
 * status or -1. */
static int run_capture(char *const argv[], char **out) {
    int fd[2];
    *out = NULL;
    if (pipe(fd) != 0) return -1;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        dup2(fd[1], 1);
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) dup2(devnull, 2);
        close(fd[0]);
        execv(argv[0], argv);
        _exit(127);
    }
    close(fd[1]);
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    ssize_t k;
    while (buf && (k = read(fd[0], buf + n, cap - n - 1)) > 0) {
        n += (size_t)k;
        if (n + 1 == cap) {
            char *b = realloc(buf, cap * 2);
            if (!b) break;
            buf = b;
            cap *= 2;
        }
    }
    close(fd[0]);
    if (buf) buf[n] = '\0';
    int st;
    waitpid(pid, &st, 0);
    *out = buf;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* vlm-run --json for one or two images (greedy, llamacpp preprocessing,
 * 24 tokens); the parsed object (caller decrefs) or NULL. */
static json_t *reference(const char *prompt, const char *img1, const char *img2) {
    char exe[512];
    snprintf(exe, sizeof exe, "%s/clients/vlm-run", VLM_BUILD_DIR);
    char *argv[32];
    int n = 0;
    argv[n++] = exe;
    argv[n++] = "-m";
    argv[n++] = GOLDEN "/text.gguf";
    argv[n++] = "--mmproj";
    argv[n++] = GOLDEN "/mmproj.gguf";
    argv[n++] = "-p";
    argv[n++] = (char *)prompt;
    argv[n++] = "--image";
    argv[n++] = (char *)img1;
    if (img2) {
        argv[n++] = "--image";
        argv[n++] = (char *)img2;
    }
    char *fixed[] = {"--preprocess", "llamacpp", "--temp", "0", "-n", "24", "-t", "2", "--json", NULL};
    for (int i = 0; fixed[i]; i++) argv[n++] = fixed[i];
    argv[n] = NULL;
    char *out = NULL;
    int rc = run_capture(argv, &out);
    json_t *j = rc == 0 && out ? json_loads(out, 0, NULL) : NULL;
    free(out);
    return j;
}

/* Starts vlmd and waits (at most 60 s) until it answers health. */
static bool start_daemon(void) {
    char exe[512];
    snprintf(exe, sizeof exe, "%s/daemon/vlmd", VLM_BUILD_DIR);
    if (access(exe, X_OK) != 0) return false;
    int port = free_port();
    if (port < 0) return false;
    snprintf(g_endpoint, sizeof g_endpoint, "tcp://127.0.0.1:%d", port);
    g_daemon = fork();
    if (g_daemon < 0) return false;
    if (g_daemon == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) {
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        execl(exe, exe, "-m", GOLDEN "/text.gguf", "--mmproj", GOLDEN "/mmproj.gguf", "--endpoint", g_endpoint,
              "-t", "2", (char *)NULL);
        _exit(127);
    }
    vlm_client_opts_t o;
    vlm_client_opts_init(&o);
    o.timeout_ms = 500;
    vlm_client_t *c = vlm_client_new(g_endpoint, &o, NULL, 0);
    bool ok = false;
    for (double t0 = now_s(); c && now_s() - t0 < 60 && !ok;) {
        ok = vlm_client_health(c, NULL, NULL) == 0;
        if (waitpid(g_daemon, NULL, WNOHANG) == g_daemon) {
            g_daemon = -1;
            break;
        }
    }
    vlm_client_destroy(&c);
    return ok;
}

static int stop_daemon(void) {
    if (g_daemon <= 0) return -1;
    kill(g_daemon, SIGTERM);
    int st = 0;
    for (int i = 0; i < 200; i++) {
        if (waitpid(g_daemon, &st, WNOHANG) == g_daemon) {
            g_daemon = -1;
            return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
        }
        usleep(100000);
    }
    kill(g_daemon, SIGKILL);
    waitpid(g_daemon, &st, 0);
    g_daemon = -1;
    return -1;
}

static vlm_client_t *client(int timeout_ms) {
    vlm_client_opts_t o;
    vlm_client_opts_init(&o);
    o.timeout_ms = timeout_ms;
    char err[256] = "";
    vlm_client_t *c = vlm_client_new(g_endpoint, &o, err, sizeof err);
    if (!c) fprintf(stderr, "  vlm_client_new: %s\n", err);
    return c;
}

static void greedy(vlm_client_params_t *p, const char *prompt) {
    vlm_client_params_init(p);
    p->prompt = prompt;
    p->preprocess = "llamacpp";
    p->temperature = 0;
    p->max_tokens = 24;
}

/* True when the done event's "tokens" equal vlm-run's. */
static bool same_tokens(const char *done_json, json_t *ref) {
    json_t *d = json_loads(done_json, 0, NULL);
    json_t *t = json_object_get(d, "tokens");
    bool ok = !t || json_equal(t, json_object_get(ref, "tokens"));
    json_decref(d);
    return ok;
}

/* ==== Tests ============================================================= */

typedef struct pieces {
    char text[8192];
    size_t len;
    int n;
    int cancel_after;           /* > 0: ask to cancel after this many pieces */
} pieces_t;

static int on_piece(const char *piece, size_t len, void *user) {
    pieces_t *p = user;
    if (p->len + len < sizeof p->text) {
        memcpy(p->text + p->len, piece, len);
        p->len += len;
        p->text[p->len] = '\0';
    }
    p->n++;
    return p->cancel_after > 0 && p->n >= p->cancel_after;
}

static void test_ask_equals_vlm_run(void) {
    struct {
        const char *prompt, *img1, *img2;
    } cases[] = {
        {"describe the image in detail.", GOLDEN "/exact.png", NULL},
        {"What color is the big circle? Answer with one word.", GOLDEN "/photo_200x150.jpg", NULL},
        {"A chat between a curious human and an artificial intelligence assistant.\nUSER: <image>\nhow many "
         "squares are there?\nASSISTANT:",
         GOLDEN "/rgba_77x45.png", NULL},
        {"describe the image in detail.", GOLDEN "/prog_131x97.jpg", NULL},
        {"Compare them.", GOLDEN "/exact.png", GOLDEN "/gray_96x128.jpg"},
        {"USER: <image> or <image>?\nASSISTANT:", GOLDEN "/gray_96x128.jpg", GOLDEN "/exact.png"},
    };
    vlm_client_t *c = client(30000);
    REQUIRE(c);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *ref = reference(cases[i].prompt, cases[i].img1, cases[i].img2);
        CHECK(ref, "vlm-run failed for case %zu", i);
        if (!ref) continue;
        const char *want = json_string_value(json_object_get(ref, "text"));
        /* Blocking ask, images by path. */
        vlm_client_image_t img[2] = {{.path = cases[i].img1}, {.path = cases[i].img2}};
        vlm_client_params_t p;
        greedy(&p, cases[i].prompt);
        p.images = img;
        p.n_images = cases[i].img2 ? 2 : 1;
        vlm_client_result_t r;
        vlm_client_result_init(&r);
        int rc = vlm_client_ask(c, &p, &r);
        CHECK(rc == 0, "case %zu: %s", i, vlm_client_errmsg(c));
        CHECK(rc == 0 && strcmp(r.text, want) == 0, "case %zu: got '%s', want '%s'", i, r.text, want);
        CHECK(rc == 0 && same_tokens(r.json, ref), "case %zu: token ids differ", i);
        CHECK(rc == 0 && r.usage.completion_tokens == (int64_t)json_array_size(json_object_get(ref, "tokens")));
        CHECK(rc == 0 && r.usage.image_tokens == json_integer_value(json_object_get(ref, "n_image_tokens")));
        CHECK(rc == 0 && (strcmp(r.finish_reason, "stop") == 0 || strcmp(r.finish_reason, "length") == 0));
        CHECK(rc == 0 && r.timings.total_ms > 0);
        /* Streaming, images as bytes. */
        size_t n1 = 0, n2 = 0;
        void *b1 = harness_read_file(cases[i].img1, &n1);
        void *b2 = cases[i].img2 ? harness_read_file(cases[i].img2, &n2) : NULL;
        img[0] = (vlm_client_image_t){.data = b1, .size = n1};
        img[1] = (vlm_client_image_t){.data = b2, .size = n2};
        pieces_t pc;
        memset(&pc, 0, sizeof pc);
        rc = vlm_client_ask_stream(c, &p, on_piece, &pc, &r);
        CHECK(rc == 0, "case %zu stream: %s", i, vlm_client_errmsg(c));
        CHECK(rc == 0 && strcmp(r.text, want) == 0 && strcmp(pc.text, want) == 0 && pc.n >= 1,
              "case %zu stream: pieces '%s', text '%s', want '%s'", i, pc.text, r.text, want);
        free(b1);
        free(b2);
        vlm_client_result_deinit(&r);
        json_decref(ref);
    }
    vlm_client_destroy(&c);
    CHECK(c == NULL);
}

static void test_stream_cancel(void) {
    vlm_client_t *c = client(30000);
    REQUIRE(c);
    vlm_client_image_t img = {.path = GOLDEN "/photo_200x150.jpg"};
    vlm_client_params_t p;
    greedy(&p, "Tell me a very long story about the picture.");
    p.max_tokens = 2000;
    p.images = &img;
    p.n_images = 1;
    pieces_t pc;
    memset(&pc, 0, sizeof pc);
    pc.cancel_after = 1;
    vlm_client_result_t r;
    vlm_client_result_init(&r);
    int rc = vlm_client_ask_stream(c, &p, on_piece, &pc, &r);
    CHECK(rc == 0, "%s", vlm_client_errmsg(c));
    CHECK(pc.n == 1, "the callback was called again after asking to cancel (%d)", pc.n);
    /* The micro model may finish before the cancel lands. */
    harness_note("  cancel after the first piece: finish_reason %s, %lld tokens", r.finish_reason,
                 (long long)r.usage.completion_tokens);
    CHECK(strcmp(r.finish_reason, "cancelled") == 0 || strcmp(r.finish_reason, "stop") == 0 ||
          strcmp(r.finish_reason, "length") == 0);
    vlm_client_health_t h;
    CHECK(vlm_client_health(c, &h, NULL) == 0 && strcmp(h.status, "ok") == 0);
    bool found = true;
    CHECK(vlm_client_cancel(c, "no-such-job", &found) == 0 && !found, "%s", vlm_client_errmsg(c));
    vlm_client_result_deinit(&r);
    vlm_client_destroy(&c);
}

static void test_submit_poll(void) {
    const char *images[] = {GOLDEN "/exact.png", GOLDEN "/rgba_77x45.png", GOLDEN "/photo_200x150.jpg",
                            GOLDEN "/gray_96x128.jpg", GOLDEN "/prog_131x97.jpg"};
    enum { N = 5 };
    const char *prompt = "describe the image in detail.";
    json_t *refs[N];
    for (int i = 0; i < N; i++) refs[i] = reference(prompt, images[i], NULL);
    vlm_client_t *c = client(30000);
    REQUIRE(c);
    char ids[N][VLM_CLIENT_ID_MAX + 1];
    char text[N][4096];
    int ended[N] = {0};
    for (int i = 0; i < N; i++) {
        vlm_client_image_t img = {.path = images[i]};
        vlm_client_params_t p;
        greedy(&p, prompt);
        p.images = &img;
        p.n_images = 1;
        p.stream = true;
        text[i][0] = '\0';
        CHECK(vlm_client_submit(c, &p, &ended[i], ids[i]) == 0, "%s", vlm_client_errmsg(c));
    }
    CHECK(vlm_client_pending(c) == N);
    for (int i = 0; i < N; i++)
        for (int k = 0; k < i; k++) CHECK(strcmp(ids[i], ids[k]) != 0, "job ids must be unique");
    vlm_client_event_t ev;
    vlm_client_event_init(&ev);
    int n_done = 0;
    for (double t0 = now_s(); n_done < N && now_s() - t0 < 60;) {
        int got = vlm_client_poll(c, 1000, &ev);
        CHECK(got >= 0, "%s", vlm_client_errmsg(c));
        if (got <= 0) continue;
        int i = (int)((int *)ev.user - ended);
        REQUIRE(i >= 0 && i < N);
        CHECK(strcmp(ev.job_id, ids[i]) == 0);
        if (ev.type == VLM_CLIENT_EVENT_TOKEN) {
            CHECK(!ended[i], "a piece after the end");
            strncat(text[i], ev.text, sizeof text[i] - strlen(text[i]) - 1);
            continue;
        }
        CHECK(ev.type == VLM_CLIENT_EVENT_DONE, "job %d: %s", i, ev.message);
        CHECK(!ended[i], "job %d ended twice", i);
        ended[i] = 1;
        n_done++;
        const char *want = json_string_value(json_object_get(refs[i], "text"));
        CHECK(ev.type == VLM_CLIENT_EVENT_DONE && want && strcmp(ev.result.text, want) == 0 &&
                  strcmp(text[i], want) == 0,
              "job %d: '%s' / '%s', want '%s'", i, ev.result.text, text[i], want);
    }
    CHECK(n_done == N && vlm_client_pending(c) == 0);
    CHECK(vlm_client_poll(c, 1000, &ev) == 0, "nothing in flight: poll returns 0 at once");
    vlm_client_event_deinit(&ev);
    vlm_client_destroy(&c);
    for (int i = 0; i < N; i++) json_decref(refs[i]);
}

static void test_ops(void) {
    vlm_client_t *c = client(10000);
    REQUIRE(c);
    vlm_client_health_t h;
    char *json = NULL;
    CHECK(vlm_client_health(c, &h, &json) == 0 && strcmp(h.status, "ok") == 0 && h.uptime_s > 0);
    CHECK(json && strstr(json, "\"health\""));
    free(json);
    CHECK(vlm_client_stats(c, &json) == 0 && json && strstr(json, "\"stats\""), "%s", vlm_client_errmsg(c));
    free(json);
    CHECK(vlm_client_model(c, &json) == 0 && json && strstr(json, "\"model\""), "%s", vlm_client_errmsg(c));
    free(json);
    CHECK(strcmp(vlm_client_endpoint(c), g_endpoint) == 0);
    vlm_client_destroy(&c);
}

static void test_errors(void) {
    vlm_client_t *c = client(10000);
    REQUIRE(c);
    vlm_client_params_t p;
    greedy(&p, "What is this?");
    vlm_client_image_t img = {.data = "definitely not an image", .size = 23};
    p.images = &img;
    p.n_images = 1;
    vlm_client_result_t r;
    vlm_client_result_init(&r);
    CHECK(vlm_client_ask(c, &p, &r) == VLM_CLIENT_ERR_BAD_IMAGE && *vlm_client_errmsg(c), "%s",
          vlm_client_errmsg(c));
    p.prompt = "<image> and <image>";
    CHECK(vlm_client_ask(c, &p, &r) == VLM_CLIENT_ERR_BAD_REQUEST, "%s", vlm_client_errmsg(c));
    CHECK(vlm_client_op(c, "frobnicate", NULL) == VLM_CLIENT_ERR_UNKNOWN_OP, "%s", vlm_client_errmsg(c));
    img = (vlm_client_image_t){.path = "/nonexistent/x.png"};
    p.prompt = "x";
    CHECK(vlm_client_ask(c, &p, &r) == VLM_CLIENT_ERR_IO && strstr(vlm_client_errmsg(c), "/nonexistent/x.png"));
    p.prompt = NULL;
    CHECK(vlm_client_ask(c, &p, &r) == VLM_CLIENT_ERR_INVALID_ARG);
    p.prompt = "\xff\xfe not UTF-8";
    p.n_images = 0;
    CHECK(vlm_client_ask(c, &p, &r) == VLM_CLIENT_ERR_INVALID_ARG);
    /* The same client still works. */
    vlm_client_health_t h;
    CHECK(vlm_client_health(c, &h, NULL) == 0);
    vlm_client_result_deinit(&r);
    vlm_client_destroy(&c);
}

static void test_no_daemon(void) {
    char ep[64];
    snprintf(ep, sizeof ep, "tcp://127.0.0.1:%d", free_port());
    vlm_client_opts_t o;
    vlm_client_opts_init(&o);
    o.timeout_ms = 300;
    vlm_client_t *c = vlm_client_new(ep, &o, NULL, 0);
    REQUIRE(c);
    double t0 = now_s();
    CHECK(vlm_client_health(c, NULL, NULL) == VLM_CLIENT_ERR_TIMEOUT);
    vlm_client_params_t p;
    greedy(&p, "x");
    vlm_client_result_t r;
    vlm_client_result_init(&r);
    CHECK(vlm_client_ask(c, &p, &r) == VLM_CLIENT_ERR_TIMEOUT, "%s", vlm_client_errmsg(c));
    double el = now_s() - t0;
    CHECK(el < 2.0, "two calls with a 0.3 s timeout took %.2f s", el);
    vlm_client_destroy(&c);
    char err[128] = "";
    CHECK(vlm_client_new("nonsense://x", NULL, err, sizeof err) == NULL && strstr(err, "nonsense"));
}

static void test_names_and_context(void) {
    const int codes[] = {VLM_CLIENT_ERR_BAD_REQUEST, VLM_CLIENT_ERR_UNKNOWN_OP, VLM_CLIENT_ERR_BAD_IMAGE,
                         VLM_CLIENT_ERR_TOO_LARGE, VLM_CLIENT_ERR_CONTEXT_OVERFLOW, VLM_CLIENT_ERR_BUSY,
                         VLM_CLIENT_ERR_CANCELLED, VLM_CLIENT_ERR_SHUTTING_DOWN, VLM_CLIENT_ERR_INTERNAL,
                         VLM_CLIENT_ERR_TIMEOUT, VLM_CLIENT_ERR_CONNECT, VLM_CLIENT_ERR_PROTOCOL};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        CHECK(vlm_client_err_from_name(vlm_client_err_name(codes[i])) == codes[i], "%d", codes[i]);
    CHECK(strcmp(vlm_client_err_name(VLM_CLIENT_ERR_BAD_IMAGE), "bad_image") == 0);
    CHECK(strcmp(vlm_client_err_name(VLM_CLIENT_ERR_CONTEXT_OVERFLOW), "context_overflow") == 0);
    CHECK(vlm_client_err_from_name("some_new_code") == VLM_CLIENT_ERR_INTERNAL);
    CHECK(strcmp(vlm_client_strerror(VLM_CLIENT_ERR_BUSY), "the daemon is busy") == 0);
    vlm_client_destroy(NULL);
    vlm_client_t *none = NULL;
    vlm_client_destroy(&none);

    /* Two clients on the caller's context. */
    void *ctx = zmq_ctx_new();
    REQUIRE(ctx);
    vlm_client_opts_t o;
    vlm_client_opts_init(&o);
    o.zmq_ctx = ctx;
    vlm_client_t *a = vlm_client_new(g_endpoint, &o, NULL, 0);
    vlm_client_t *b = vlm_client_new(g_endpoint, &o, NULL, 0);
    CHECK(a && b);
    vlm_client_health_t h;
    CHECK(a && vlm_client_health(a, &h, NULL) == 0);
    CHECK(b && vlm_client_health(b, &h, NULL) == 0);
    vlm_client_destroy(&a);
    vlm_client_destroy(&b);
    zmq_ctx_term(ctx);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    RUN(test_no_daemon);
    if (!start_daemon()) {
        fprintf(stderr, "  SKIP: vlmd is not built or did not start (%s/daemon/vlmd)\n", VLM_BUILD_DIR);
        harness_skipped++;
        stop_daemon();
        return harness_report();
    }
    RUN(test_ask_equals_vlm_run);
    RUN(test_stream_cancel);
    RUN(test_submit_poll);
    RUN(test_ops);
    RUN(test_errors);
    RUN(test_names_and_context);
    int rc = stop_daemon();
    if (rc != 0) {
        fprintf(stderr, "  FAIL: vlmd exited with %d on SIGTERM\n", rc);
        harness_failed++;
    }
    return harness_report();
}
