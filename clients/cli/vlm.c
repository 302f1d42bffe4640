/* clients/cli/vlm.c - `vlm`, the command line of the vlmd daemon, built on
 * libvlm (clients/c/vlm.h).
 *
 *   vlm ask IMAGE... "question"   stream an answer to stdout (IMAGE '-' = stdin)
 *   vlm watch - "question"        ask about the newest frame of an MJPEG/PPM
 *                                 stream every --interval seconds
 *   vlm caption DIR               caption a folder tree of JPEG/PNG files
 *   vlm health | stats | model    the daemon's state, pretty-printed
 *
 * Options are "--name value" or "--name=value" (core/args.h), before or
 * after the positional arguments; "--" ends them, so `vlm ask -- -x.jpg Q`
 * reads "-x.jpg" as an image. The endpoint comes from --endpoint, else
 * $VLM_ENDPOINT, else tcp://127.0.0.1:5555. Exit status: 0 ok, 1 a job or
 * the daemon failed, 2 usage error, 3 no connection or a timeout, 130
 * interrupted (SIGINT).
 *
 * Frames on stdin (`ask -`, `watch -`) are split by their own structure:
 * JPEG by its marker segments (SOI FFD8 ... EOI FFD9, skipping each
 * segment by its length, so a thumbnail inside an EXIF segment does not end
 * the frame), PNG by its chunks up to IEND, PPM/PGM (P6/P5) by the header's
 * width, height and maxval. Bytes between frames are skipped.
 */
#include <dirent.h>
#include <errno.h>
#include <float.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "clients/c/vlm.h"
#include "core/args.h"

#define EXIT_JOB 1
#define EXIT_USAGE 2
#define EXIT_CONN 3
#define EXIT_INTERRUPTED 130

#define MAX_IMAGES 64
#define MAX_STOP 16
#define MAX_FRAME_BYTES (64u << 20)   /* a stdin frame larger than this is dropped */
#define DEFAULT_TIMEOUT_S 10.0

static volatile sig_atomic_t g_interrupted;

static void on_sigint(int sig) {
    (void)sig;
    g_interrupted = 1;
}

/* SIGINT and SIGTERM set a flag (no SA_RESTART, so waits return early);
 * SIGPIPE is ignored so a closed stdout is a write error, not a death. */
static void install_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* ==== Messages ========================================================== */

static const char *g_cmd = "vlm";

static void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void warn(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", g_cmd);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* Prints a usage error and returns EXIT_USAGE. */
static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", g_cmd);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (see %s --help)\n", g_cmd);
    return EXIT_USAGE;
}

/* The exit status for a libvlm code. */
static int exit_for(int code) {
    if (code == 0) return 0;
    if (code == VLM_CLIENT_ERR_TIMEOUT || code == VLM_CLIENT_ERR_CONNECT) return EXIT_CONN;
    if (code == VLM_CLIENT_ERR_INVALID_ARG) return EXIT_USAGE;
    return EXIT_JOB;
}

/* Reports a failed libvlm call ("vlm ask: bad_image: image 1: ...") and
 * returns its exit status. */
static int fail_client(int code, const char *msg) {
    warn("%s: %s", vlm_client_err_name(code), msg && *msg ? msg : vlm_client_strerror(code));
    return exit_for(code);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ==== Options =========================================================== */

static const char common_help[] =
    "Common options:\n"
    "  --endpoint URL        the daemon (default: $VLM_ENDPOINT, else tcp://127.0.0.1:5555)\n"
    "  --timeout SEC         longest silence from the daemon: to connect, to answer an op,\n"
    "                        to show a sign of life during a job (default 10)\n"
    "  -h, --help            this text\n";

static const char gen_help[] =
    "Generation options (the daemon's defaults when not given):\n"
    "  -n, --max-tokens N    completion tokens at most (daemon default 256)\n"
    "  --temp T              temperature, 0 = greedy (daemon default 0)\n"
    "  --top-k K  --top-p P  --min-p P  --repeat-penalty R  --repeat-last-n N  --seed S\n"
    "  --template NAME       chat template: vicuna, llama2, llama3, mistral, chatml, raw\n"
    "  --preprocess MODE     hf or llamacpp\n"
    "  --system TEXT         system text of the template\n"
    "  --stop TEXT           an extra stop string (repeatable, at most 16)\n"
    "  --job-timeout SEC     give up on a job after SEC seconds (default: no limit)\n";

static const char exit_help[] =
    "Exit status: 0 ok, 1 a job or the daemon failed, 2 usage error,\n"
    "3 no connection or timeout, 130 interrupted.\n";

typedef struct cli {
    const char *endpoint;
    double timeout_s;
    vlm_client_params_t params;
    const char *stops[MAX_STOP];
} cli_t;

static void cli_init(cli_t *o) {
    memset(o, 0, sizeof *o);
    o->timeout_s = DEFAULT_TIMEOUT_S;
    vlm_client_params_init(&o->params);
    o->params.stop = o->stops;
}

/* --stop TEXT: one more non-empty stop string. */
static bool add_stop(vlm_args_t *a, cli_t *o) {
    const char *v = vlm_args_value(a);
    if (!v) return false;
    if (o->params.n_stop == MAX_STOP) return vlm_args_error(a, "at most %d --stop strings", MAX_STOP);
    if (!*v) return vlm_args_bad_value(a, "a non-empty string");
    o->stops[o->params.n_stop++] = v;
    return true;
}

/* Tries the common and (when gen) the generation options at the cursor.
 * Returns 1 when consumed, 0 when not one of them, -1 on a bad value (the
 * message is in a->err). */
static int parse_shared(vlm_args_t *a, cli_t *o, bool gen) {
    const double year_s = 86400.0 * 365;
    vlm_client_params_t *p = &o->params;
    const char *v;
    double ms;
    bool ok;
    if (vlm_args_is(a, NULL, "--endpoint")) {
        ok = (o->endpoint = vlm_args_value(a)) != NULL;
    } else if (vlm_args_is(a, NULL, "--timeout")) {
        ok = vlm_args_value_double(a, 0.05, year_s, &o->timeout_s);
    } else if (!gen) {
        return 0;
    } else if (vlm_args_is(a, "-n", "--max-tokens")) {
        ok = vlm_args_value_i32(a, 1, 65536, &p->max_tokens);
    } else if (vlm_args_is(a, NULL, "--temp") || vlm_args_is(a, NULL, "--temperature")) {
        ok = vlm_args_value_double(a, 0, 1e6, &p->temperature);
    } else if (vlm_args_is(a, NULL, "--top-k")) {
        ok = vlm_args_value_i32(a, 0, INT32_MAX, &p->top_k);
    } else if (vlm_args_is(a, NULL, "--top-p")) {
        ok = vlm_args_value_double(a, DBL_TRUE_MIN, 1, &p->top_p);
    } else if (vlm_args_is(a, NULL, "--min-p")) {
        ok = vlm_args_value_double(a, 0, 1, &p->min_p);
    } else if (vlm_args_is(a, NULL, "--repeat-penalty")) {
        ok = vlm_args_value_double(a, DBL_TRUE_MIN, 10, &p->repeat_penalty);
    } else if (vlm_args_is(a, NULL, "--repeat-last-n")) {
        ok = vlm_args_value_i32(a, 0, 1 << 20, &p->repeat_last_n);
    } else if (vlm_args_is(a, NULL, "--seed")) {
        ok = vlm_args_value_i64(a, 0, INT64_MAX, &p->seed);
    } else if (vlm_args_is(a, NULL, "--template")) {
        ok = (p->template_name = vlm_args_value(a)) != NULL;
    } else if (vlm_args_is(a, NULL, "--preprocess")) {
        ok = (v = vlm_args_value(a)) != NULL;
        if (ok && strcmp(v, "hf") != 0 && strcmp(v, "llamacpp") != 0) ok = vlm_args_bad_value(a, "hf or llamacpp");
        if (ok) p->preprocess = v;
    } else if (vlm_args_is(a, NULL, "--system")) {
        ok = (p->system = vlm_args_value(a)) != NULL;
    } else if (vlm_args_is(a, NULL, "--stop")) {
        ok = add_stop(a, o);
    } else if (vlm_args_is(a, NULL, "--job-timeout")) {
        ok = vlm_args_value_double(a, 0.001, year_s, &ms);
        if (ok) p->timeout_ms = (int32_t)fmin(ms * 1000.0, (double)INT32_MAX);
    } else {
        return 0;
    }
    return ok ? 1 : -1;
}

static bool is_help(const vlm_args_t *a) { return vlm_args_is(a, "-h", "--help"); }

/* A client for the options; NULL after a message. */
static vlm_client_t *make_client(const cli_t *o) {
    vlm_client_opts_t copts;
    vlm_client_opts_init(&copts);
    copts.timeout_ms = (int32_t)fmin(o->timeout_s * 1000.0, (double)INT32_MAX);
    char err[256] = "";
    vlm_client_t *c = vlm_client_new(o->endpoint, &copts, err, sizeof err);
    if (!c) warn("connect: %s", err);
    return c;
}

/* ==== Bytes and UTF-8 =================================================== */

typedef struct buf {
    uint8_t *data;
    size_t len, cap;
} buf_t;

static bool buf_append(buf_t *b, const void *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1) cap *= 2;
        uint8_t *d = realloc(b->data, cap);
        if (!d) return false;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
    return true;
}

/* Drops the first n bytes. */
static void buf_consume(buf_t *b, size_t n) {
    if (n >= b->len) {
        b->len = 0;
        return;
    }
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

/* A copy of s as valid UTF-8 (each invalid byte becomes U+FFFD), so that a
 * file name of any bytes can go into JSON. Caller frees. */
static char *utf8_copy(const char *s) {
    size_t n = strlen(s);
    char *out = malloc(3 * n + 1);
    if (!out) return NULL;
    const unsigned char *u = (const unsigned char *)s;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        size_t need = c < 0x80 ? 0 : c >= 0xC2 && c <= 0xDF ? 1 : c >= 0xE0 && c <= 0xEF ? 2
                    : c >= 0xF0 && c <= 0xF4 ? 3 : 9;
        bool ok = need != 9 && i + need < n + (need ? 0 : 1);
        for (size_t k = 1; ok && k <= need; k++) {
            unsigned b = u[i + k];
            unsigned lo = 0x80, hi = 0xBF;
            if (k == 1 && c == 0xE0) lo = 0xA0;
            if (k == 1 && c == 0xED) hi = 0x9F;
            if (k == 1 && c == 0xF0) lo = 0x90;
            if (k == 1 && c == 0xF4) hi = 0x8F;
            ok = b >= lo && b <= hi;
        }
        if (ok) {
            memcpy(out + o, s + i, need + 1);
            o += need + 1;
            i += need + 1;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    out[o] = '\0';
    return out;
}

/* ==== Frames on a stream ================================================ */

typedef enum scan_result { SCAN_FRAME, SCAN_MORE, SCAN_BAD } scan_result_t;

static size_t be16(const uint8_t *p) { return (size_t)p[0] << 8 | p[1]; }
static size_t be32(const uint8_t *p) { return (size_t)p[0] << 24 | (size_t)p[1] << 16 | (size_t)p[2] << 8 | p[3]; }

/* A JPEG at b[0..n) (b[0..1] = FFD8): its length in *len, walking the
 * marker segments by their lengths and the entropy-coded data byte by
 * byte (FF00 stuffing and RSTn do not end it). */
static scan_result_t scan_jpeg(const uint8_t *b, size_t n, size_t *len) {
    size_t i = 2;
    for (;;) {
        if (i + 2 > n) return SCAN_MORE;
        if (b[i] != 0xFF) return SCAN_BAD;
        if (b[i + 1] == 0xFF) { /* fill byte */
            i++;
            continue;
        }
        const uint8_t m = b[i + 1];
        if (m == 0xD9) {
            *len = i + 2;
            return SCAN_FRAME;
        }
        if (m == 0xD8 || m == 0x00) return SCAN_BAD;
        if ((m >= 0xD0 && m <= 0xD7) || m == 0x01) {
            i += 2;
            continue;
        }
        if (i + 4 > n) return SCAN_MORE;
        const size_t seg = be16(b + i + 2);
        if (seg < 2) return SCAN_BAD;
        i += 2 + seg;
        if (i > MAX_FRAME_BYTES) return SCAN_BAD;
        if (m != 0xDA) continue;
        /* Entropy-coded data up to the next real marker. */
        for (;;) {
            if (i + 2 > n) return SCAN_MORE;
            if (b[i] != 0xFF) {
                i++;
                continue;
            }
            const uint8_t x = b[i + 1];
            if (x == 0x00 || (x >= 0xD0 && x <= 0xD7)) i += 2;
            else if (x == 0xFF) i++;
            else break;
            if (i > MAX_FRAME_BYTES) return SCAN_BAD;
        }
    }
}

/* A PNG at b[0..n) (b starts with the signature): chunk by chunk to IEND. */
static scan_result_t scan_png(const uint8_t *b, size_t n, size_t *len) {
    size_t i = 8;
    for (;;) {
        if (i + 8 > n) return SCAN_MORE;
        const size_t clen = be32(b + i);
        if (clen > MAX_FRAME_BYTES) return SCAN_BAD;
        const bool iend = memcmp(b + i + 4, "IEND", 4) == 0;
        i += 12 + clen;
        if (i > MAX_FRAME_BYTES) return SCAN_BAD;
        if (iend) {
            if (i > n) return SCAN_MORE;
            *len = i;
            return SCAN_FRAME;
        }
    }
}

/* A binary PPM (P6) or PGM (P5) at b[0..n): the header's three numbers
 * (comments allowed), one whitespace byte, then the pixels. */
static scan_result_t scan_pnm(const uint8_t *b, size_t n, size_t *len) {
    size_t v[3];
    size_t i = 2;
    for (int k = 0; k < 3; k++) {
        for (;;) { /* whitespace and comments */
            if (i >= n) return SCAN_MORE;
            if (b[i] == '#') {
                while (i < n && b[i] != '\n' && b[i] != '\r') i++;
                if (i >= n) return SCAN_MORE;
            } else if (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r' || b[i] == '\v' ||
                       b[i] == '\f') {
                i++;
            } else {
                break;
            }
            if (i > 4096) return SCAN_BAD;
        }
        if (b[i] < '0' || b[i] > '9') return SCAN_BAD;
        size_t x = 0;
        while (i < n && b[i] >= '0' && b[i] <= '9') {
            x = x * 10 + (size_t)(b[i] - '0');
            if (x > 1u << 20) return SCAN_BAD;
            i++;
        }
        if (i >= n) return SCAN_MORE;
        v[k] = x;
    }
    if (v[0] == 0 || v[1] == 0 || v[2] == 0 || v[2] > 65535) return SCAN_BAD;
    i++; /* the single whitespace byte after maxval */
    const size_t pixel = (b[1] == '6' ? 3u : 1u) * (v[2] > 255 ? 2u : 1u);
    if (v[0] * v[1] > MAX_FRAME_BYTES / pixel) return SCAN_BAD;
    const size_t total = i + v[0] * v[1] * pixel;
    if (total > n) return SCAN_MORE;
    *len = total;
    return SCAN_FRAME;
}

static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};

/* Whether a frame may start at b[0..n); *more when n is too short to say. */
static bool frame_start(const uint8_t *b, size_t n, bool *more) {
    *more = false;
    if (b[0] == 0xFF) {
        if (n < 3) return *more = true, false;
        return b[1] == 0xD8 && b[2] == 0xFF;
    }
    if (b[0] == 0x89) {
        if (n < 8) return *more = true, false;
        return memcmp(b, png_sig, 8) == 0;
    }
    if (b[0] == 'P') {
        if (n < 3) return *more = true, false;
        return (b[1] == '5' || b[1] == '6') &&
               (b[2] == ' ' || b[2] == '\n' || b[2] == '\r' || b[2] == '\t' || b[2] == '#');
    }
    return false;
}

/* Looks for the first whole frame in b[0..n). SCAN_FRAME: it is
 * b[*start .. *start + *len). SCAN_MORE: none yet; the first *start bytes
 * are garbage that can be dropped. */
static scan_result_t scan_frame(const uint8_t *b, size_t n, size_t *start, size_t *len) {
    size_t i = 0;
    while (i < n) {
        bool more;
        if (!frame_start(b + i, n - i, &more)) {
            if (more) break;
            i++;
            continue;
        }
        scan_result_t r = b[i] == 0xFF ? scan_jpeg(b + i, n - i, len)
                        : b[i] == 0x89 ? scan_png(b + i, n - i, len)
                                       : scan_pnm(b + i, n - i, len);
        if (r == SCAN_FRAME) {
            *start = i;
            return SCAN_FRAME;
        }
        if (r == SCAN_MORE) break;
        i++; /* a broken frame: resynchronise after its first byte */
    }
    *start = i;
    return SCAN_MORE;
}

/* Reads all of stdin. */
static int read_stdin(buf_t *b) {
    uint8_t chunk[65536];
    for (;;) {
        ssize_t k = read(STDIN_FILENO, chunk, sizeof chunk);
        if (k == 0) return 0;
        if (k < 0) {
            if (errno == EINTR && !g_interrupted) continue;
            return errno ? errno : EIO;
        }
        if (!buf_append(b, chunk, (size_t)k)) return ENOMEM;
    }
}

/* ==== ask =============================================================== */

static const char ask_help[] =
    "usage: vlm ask [options] [IMAGE...] QUESTION\n"
    "       vlm ask [options] -p QUESTION [IMAGE...]\n"
    "\n"
    "Asks the daemon about the images (JPEG, PNG or binary PPM/PGM files, or '-' for\n"
    "stdin) and streams the answer to stdout. \"<image>\" markers in the question place\n"
    "the images; without them the chat template places them. When stdin holds a stream\n"
    "of several frames (MJPEG, PPM), the last whole frame is used, e.g.\n"
    "  ffmpeg -f v4l2 -i /dev/video0 -frames:v 1 -f image2pipe -c:v mjpeg - |\n"
    "      vlm ask - \"What is on my desk?\"\n"
    "\n"
    "  -p, --prompt TEXT     the question (then every positional argument is an image)\n"
    "  --json                print the done event (one JSON line) instead of the stream\n";

/* The last whole frame of stdin (or all of it when no frame can be found,
 * so the daemon can say what is wrong with it). */
static int stdin_image(buf_t *out) {
    buf_t all = {0};
    int e = read_stdin(&all);
    if (e) {
        free(all.data);
        warn("reading stdin: %s", strerror(e));
        return EXIT_JOB;
    }
    size_t pos = 0, last_start = 0, last_len = 0;
    bool found = false;
    for (;;) {
        size_t start, len;
        if (scan_frame(all.data + pos, all.len - pos, &start, &len) != SCAN_FRAME) break;
        last_start = pos + start;
        last_len = len;
        found = true;
        pos += start + len;
    }
    if (found) {
        memmove(all.data, all.data + last_start, last_len);
        all.len = last_len;
    }
    *out = all;
    return 0;
}

/* Writes a piece to stdout; false when stdout is gone. */
static bool write_out(const char *s, size_t n) {
    if (n && fwrite(s, 1, n, stdout) != n) return false;
    return fflush(stdout) == 0;
}

static int cmd_ask(int argc, char **argv) {
    g_cmd = "vlm ask";
    cli_t o;
    cli_init(&o);
    const char *prompt = NULL;
    const char *pos[MAX_IMAGES + 1];
    int n_pos = 0;
    bool json = false;
    vlm_args_t a;
    vlm_args_init(&a, argc, argv);
    while (vlm_args_next(&a)) {
        if (!vlm_args_is_option(&a)) {
            if (n_pos == MAX_IMAGES + 1) return usage_error("at most %d images", MAX_IMAGES);
            pos[n_pos++] = a.arg;
            continue;
        }
        if (is_help(&a)) {
            printf("%s\n%s\n%s\n%s", ask_help, gen_help, common_help, exit_help);
            return 0;
        }
        int r = parse_shared(&a, &o, true);
        if (r == 0) {
            r = 1;
            if (vlm_args_is(&a, "-p", "--prompt")) r = (prompt = vlm_args_value(&a)) ? 1 : -1;
            else if (vlm_args_is(&a, NULL, "--json")) r = vlm_args_flag(&a, &json) ? 1 : -1;
            else return usage_error("unknown option '%s'", a.arg);
        }
        if (r < 0) return usage_error("%s", a.err);
    }
    if (!prompt) {
        if (n_pos == 0) return usage_error("no question given");
        prompt = pos[--n_pos];
    }
    if (n_pos > MAX_IMAGES) return usage_error("at most %d images", MAX_IMAGES);
    int n_stdin = 0;
    for (int i = 0; i < n_pos; i++) n_stdin += strcmp(pos[i], "-") == 0;
    if (n_stdin > 1) return usage_error("only one image can come from stdin ('-')");

    vlm_client_image_t images[MAX_IMAGES];
    buf_t in = {0};
    for (int i = 0; i < n_pos; i++) {
        memset(&images[i], 0, sizeof images[i]);
        if (strcmp(pos[i], "-") == 0) {
            int rc = stdin_image(&in);
            if (rc) return rc;
            images[i].data = in.data ? (const void *)in.data : (const void *)"";
            images[i].size = in.len;
        } else {
            images[i].path = pos[i];
        }
    }
    o.params.prompt = prompt;
    o.params.images = images;
    o.params.n_images = (size_t)n_pos;
    o.params.stream = !json;

    install_signals();
    vlm_client_t *c = make_client(&o);
    if (!c) {
        free(in.data);
        return EXIT_CONN;
    }
    char job[VLM_CLIENT_ID_MAX + 1];
    int status = 0;
    int rc = vlm_client_submit(c, &o.params, NULL, job);
    free(in.data);
    if (rc) {
        status = fail_client(rc, vlm_client_errmsg(c));
        goto done;
    }
    vlm_client_event_t ev;
    vlm_client_event_init(&ev);
    bool cancelled = false, wrote = false;
    for (;;) {
        if (g_interrupted && !cancelled) {
            cancelled = true;
            vlm_client_cancel(c, job, NULL); /* the job then ends with done/cancelled */
        }
        int got = vlm_client_poll(c, 200, &ev);
        if (got < 0) {
            status = fail_client(got, vlm_client_errmsg(c));
            break;
        }
        if (got == 0) continue;
        if (ev.type == VLM_CLIENT_EVENT_TOKEN) {
            if (!write_out(ev.text, ev.text_len) && !cancelled) {
                cancelled = true; /* stdout closed: stop the job */
                vlm_client_cancel(c, job, NULL);
            }
            wrote = true;
        } else if (ev.type == VLM_CLIENT_EVENT_DONE) {
            if (json) {
                write_out(ev.result.json, strlen(ev.result.json));
                write_out("\n", 1);
            } else {
                if (!wrote) write_out(ev.result.text, ev.result.text_len);
                write_out("\n", 1);
            }
            if (cancelled) status = EXIT_INTERRUPTED;
            break;
        } else {
            if (wrote) write_out("\n", 1);
            status = fail_client(ev.error, ev.message);
            break;
        }
    }
    vlm_client_event_deinit(&ev);
done:
    vlm_client_destroy(&c);
    return status;
}

/* ==== health, stats, model ============================================== */

static int cmd_op(int argc, char **argv, const char *op) {
    static char name[32];
    snprintf(name, sizeof name, "vlm %s", op);
    g_cmd = name;
    cli_t o;
    cli_init(&o);
    vlm_args_t a;
    vlm_args_init(&a, argc, argv);
    while (vlm_args_next(&a)) {
        if (!vlm_args_is_option(&a)) return usage_error("unexpected argument '%s'", a.arg);
        if (is_help(&a)) {
            printf("usage: vlm %s [options]\n\nPrints the daemon's answer to the %s op as indented JSON%s.\n\n%s\n%s",
                   op, op, strcmp(op, "health") == 0 ? " (exit 0 when its status is ok)" : "", common_help,
                   exit_help);
            return 0;
        }
        int r = parse_shared(&a, &o, false);
        if (r == 0) return usage_error("unknown option '%s'", a.arg);
        if (r < 0) return usage_error("%s", a.err);
    }
    vlm_client_t *c = make_client(&o);
    if (!c) return EXIT_CONN;
    char *text = NULL;
    int rc = vlm_client_op(c, op, &text);
    int status = 0;
    if (rc) {
        status = fail_client(rc, vlm_client_errmsg(c));
    } else {
        json_t *j = json_loads(text, 0, NULL);
        char *pretty = j ? json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
        printf("%s\n", pretty ? pretty : text);
        if (strcmp(op, "health") == 0) {
            const char *st = json_string_value(json_object_get(j, "status"));
            if (!st || strcmp(st, "ok") != 0) status = EXIT_JOB;
        }
        free(pretty);
        json_decref(j);
    }
    free(text);
    vlm_client_destroy(&c);
    return status;
}

/* ==== watch ============================================================= */

static const char watch_help[] =
    "usage: vlm watch [options] - QUESTION\n"
    "       vlm watch [options] --prompt QUESTION -\n"
    "\n"
    "Reads a stream of frames from stdin (MJPEG: concatenated JPEGs; PNGs; binary\n"
    "PPM/PGM) and asks QUESTION about the newest frame every --interval seconds. One\n"
    "job runs at a time; frames that arrive meanwhile are dropped but the newest. Each\n"
    "answer is one line on stdout: the local time the frame was read, then the answer\n"
    "(newlines become spaces), e.g. \"2026-11-23T12:00:01 a cat on a desk\".\n"
    "At end of input the running job finishes, the newest frame is asked about if it\n"
    "was not yet, and vlm exits (0, or 1 when a job failed); SIGINT cancels and exits 130.\n"
    "  ffmpeg -f v4l2 -i /dev/video0 -f image2pipe -c:v mjpeg - | vlm watch - \"Who is there?\"\n"
    "\n"
    "  -p, --prompt TEXT     the question\n"
    "  --interval SEC        seconds between questions (default 2)\n";

/* The stdin reader thread: splits frames, keeps the newest. */
typedef struct watch_reader {
    pthread_mutex_t mu;
    buf_t latest;               /* the newest whole frame */
    uint64_t seq;               /* frames seen */
    time_t when;                /* wall time the newest frame was read */
    bool eof;
    int error;                  /* errno of a failed read */
    volatile sig_atomic_t stop;
} watch_reader_t;

static void *watch_read(void *arg) {
    watch_reader_t *r = arg;
    buf_t b = {0};
    uint8_t chunk[65536];
    int err = 0;
    while (!r->stop) {
        struct pollfd pfd = {STDIN_FILENO, POLLIN, 0};
        int pr = poll(&pfd, 1, 100);
        if (pr < 0 && errno != EINTR) {
            err = errno;
            break;
        }
        if (pr <= 0) continue;
        ssize_t k = read(STDIN_FILENO, chunk, sizeof chunk);
        if (k == 0) break;
        if (k < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            err = errno;
            break;
        }
        if (!buf_append(&b, chunk, (size_t)k)) {
            err = ENOMEM;
            break;
        }
        for (;;) {
            size_t start, len;
            scan_result_t s = scan_frame(b.data, b.len, &start, &len);
            if (s != SCAN_FRAME) {
                buf_consume(&b, start);
                /* A frame that will never end is dropped. */
                if (b.len > MAX_FRAME_BYTES) b.len = 0;
                break;
            }
            pthread_mutex_lock(&r->mu);
            r->latest.len = 0;
            bool ok = buf_append(&r->latest, b.data + start, len);
            if (ok) {
                r->seq++;
                r->when = time(NULL);
            }
            pthread_mutex_unlock(&r->mu);
            buf_consume(&b, start + len);
            if (!ok) {
                err = ENOMEM;
                goto out;
            }
        }
    }
out:
    free(b.data);
    pthread_mutex_lock(&r->mu);
    r->eof = true;
    r->error = err;
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

/* Prints "<time> <answer>" with the answer on one line. */
static void print_answer(time_t when, const char *text, size_t len) {
    char ts[32];
    struct tm tm;
    localtime_r(&when, &tm);
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
    size_t a = 0, b = len;
    while (a < b && (text[a] == ' ' || text[a] == '\n' || text[a] == '\r' || text[a] == '\t')) a++;
    while (b > a && (text[b - 1] == ' ' || text[b - 1] == '\n' || text[b - 1] == '\r' || text[b - 1] == '\t')) b--;
    printf("%s ", ts);
    for (size_t i = a; i < b; i++) putchar(text[i] == '\n' || text[i] == '\r' ? ' ' : text[i]);
    putchar('\n');
    fflush(stdout);
}

static int cmd_watch(int argc, char **argv) {
    g_cmd = "vlm watch";
    cli_t o;
    cli_init(&o);
    const char *prompt = NULL;
    const char *pos[2];
    int n_pos = 0;
    double interval = 2.0;
    vlm_args_t a;
    vlm_args_init(&a, argc, argv);
    while (vlm_args_next(&a)) {
        if (!vlm_args_is_option(&a)) {
            if (n_pos == 2) return usage_error("unexpected argument '%s'", a.arg);
            pos[n_pos++] = a.arg;
            continue;
        }
        if (is_help(&a)) {
            printf("%s\n%s\n%s\n%s", watch_help, gen_help, common_help, exit_help);
            return 0;
        }
        int r = parse_shared(&a, &o, true);
        if (r == 0) {
            if (vlm_args_is(&a, "-p", "--prompt")) r = (prompt = vlm_args_value(&a)) ? 1 : -1;
            else if (vlm_args_is(&a, NULL, "--interval")) r = vlm_args_value_double(&a, 0, 86400, &interval) ? 1 : -1;
            else return usage_error("unknown option '%s'", a.arg);
        }
        if (r < 0) return usage_error("%s", a.err);
    }
    int n_src = 0;
    for (int i = 0; i < n_pos; i++) {
        if (strcmp(pos[i], "-") == 0) {
            n_src++;
        } else if (!prompt) {
            prompt = pos[i];
        } else {
            return usage_error("only '-' (stdin) can be watched, got '%s'", pos[i]);
        }
    }
    if (n_src != 1) return usage_error("give '-' to watch stdin");
    if (!prompt) return usage_error("no question given");

    install_signals();
    vlm_client_t *c = make_client(&o);
    if (!c) return EXIT_CONN;

    watch_reader_t rd;
    memset(&rd, 0, sizeof rd);
    pthread_mutex_init(&rd.mu, NULL);
    pthread_t th;
    if (pthread_create(&th, NULL, watch_read, &rd) != 0) {
        warn("cannot start the reader thread");
        pthread_mutex_destroy(&rd.mu);
        vlm_client_destroy(&c);
        return EXIT_JOB;
    }

    vlm_client_image_t image;
    memset(&image, 0, sizeof image);
    buf_t frame = {0};
    time_t frame_time = 0;
    uint64_t asked = 0;
    bool inflight = false, cancelled = false;
    char job[VLM_CLIENT_ID_MAX + 1] = "";
    double next_ask = now_s();
    int status = 0, n_failed = 0;
    vlm_client_event_t ev;
    vlm_client_event_init(&ev);
    for (;;) {
        if (g_interrupted) {
            if (!inflight) {
                status = EXIT_INTERRUPTED;
                break;
            }
            if (!cancelled) {
                cancelled = true;
                vlm_client_cancel(c, job, NULL);
            }
        }
        pthread_mutex_lock(&rd.mu);
        const uint64_t seq = rd.seq;
        const bool eof = rd.eof;
        const int rerr = rd.error;
        bool take = !inflight && !g_interrupted && seq > asked && (eof || now_s() >= next_ask);
        if (take) {
            frame.len = 0;
            take = buf_append(&frame, rd.latest.data, rd.latest.len);
            frame_time = rd.when;
        }
        pthread_mutex_unlock(&rd.mu);
        if (take) {
            image.data = frame.data;
            image.size = frame.len;
            o.params.prompt = prompt;
            o.params.images = &image;
            o.params.n_images = 1;
            int rc = vlm_client_submit(c, &o.params, NULL, job);
            asked = seq;
            next_ask = now_s() + interval;
            if (rc) {
                status = fail_client(rc, vlm_client_errmsg(c));
                if (status == EXIT_CONN) break;
                n_failed++;
            } else {
                inflight = true;
            }
        }
        if (!inflight && eof && asked == seq) {
            if (rerr) {
                warn("reading stdin: %s", strerror(rerr));
                n_failed++;
            }
            if (seq == 0) warn("no frame found on stdin (MJPEG, PNG or PPM expected)");
            break;
        }
        int got = inflight ? vlm_client_poll(c, 50, &ev) : 0;
        if (!inflight) {
            struct timespec ts = {0, 20 * 1000000};
            nanosleep(&ts, NULL);
        }
        if (got < 0) {
            status = fail_client(got, vlm_client_errmsg(c));
            break;
        }
        if (got == 0 || ev.type == VLM_CLIENT_EVENT_TOKEN) continue;
        inflight = false;
        if (ev.type == VLM_CLIENT_EVENT_DONE) {
            if (!cancelled) print_answer(frame_time, ev.result.text, ev.result.text_len);
        } else if (ev.error == VLM_CLIENT_ERR_BUSY) {
            warn("the daemon is busy; frame dropped");
        } else {
            int st = fail_client(ev.error, ev.message);
            if (st == EXIT_CONN || ev.error == VLM_CLIENT_ERR_SHUTTING_DOWN) {
                status = st;
                break;
            }
            n_failed++;
        }
    }
    vlm_client_event_deinit(&ev);
    rd.stop = 1;
    pthread_join(th, NULL);
    pthread_mutex_destroy(&rd.mu);
    free(rd.latest.data);
    free(frame.data);
    vlm_client_destroy(&c);
    if (status == 0 && g_interrupted) status = EXIT_INTERRUPTED;
    if (status == 0 && n_failed) status = EXIT_JOB;
    return status;
}

/* ==== caption =========================================================== */

static const char caption_help[] =
    "usage: vlm caption [options] DIR\n"
    "\n"
    "Captions every JPEG and PNG file in the folder tree DIR. Candidates are the files\n"
    "whose names end in .jpg, .jpeg or .png (any case); the daemon reads the format from\n"
    "the bytes, so a file that is not an image is recorded as a failure (bad_image).\n"
    "Symbolic links to files are followed, links to folders are not. Files are done in\n"
    "byte order of their paths (DIR/sub/name), several at once in the daemon.\n"
    "\n"
    "Output: one JSON line per image, flushed as it is written:\n"
    "  {\"path\": \"DIR/a.jpg\", \"caption\": \"...\", \"tokens\": 12, \"ms\": 850.2}\n"
    "  {\"path\": \"DIR/b.png\", \"error\": {\"code\": \"bad_image\", \"message\": \"...\"}}\n"
    "(tokens: completion tokens; ms: the daemon's time for the job, queueing included).\n"
    "With --sidecar the caption goes to a .txt file beside each image instead (a.jpg ->\n"
    "a.txt; when two images share a stem, the later one in path order uses a.png.txt);\n"
    "failures then go to stderr (and to --out when given). Progress goes to stderr: a bar\n"
    "on a terminal, a line every 10 images otherwise; a summary line ends the run.\n"
    "Exit status 1 when any image failed. A lost daemon stops the run (exit 3) without\n"
    "recording the unfinished images, so --resume finishes them.\n"
    "\n"
    "  -p, --prompt TEXT     the question (default \"Describe the image.\")\n"
    "  --inflight N          jobs kept in the daemon at once (default 4)\n"
    "  -o, --out FILE        the JSON lines file (default stdout)\n"
    "  --sidecar             write DIR/.../name.txt files\n"
    "  --resume              skip the images already done: those with a line in --out\n"
    "                        (a cut-off last line is removed first) or, with --sidecar,\n"
    "                        those whose .txt exists\n";

typedef struct cap_item {
    char *path;                 /* as found: DIR/rel */
    char *key;                  /* path as valid UTF-8: written as "path" and matched by --resume */
    char *sidecar;              /* with --sidecar */
    bool done;                  /* already in the output (--resume) */
    int busy_tries;
    double not_before;          /* a busy image is retried after this time */
} cap_item_t;

typedef struct cap_list {
    cap_item_t *v;
    size_t n, cap;
} cap_list_t;

static bool has_image_ext(const char *name) {
    const char *dot = strrchr(name, '.');
    return dot && (strcasecmp(dot, ".jpg") == 0 || strcasecmp(dot, ".jpeg") == 0 || strcasecmp(dot, ".png") == 0);
}

/* Collects the candidate files under dir into l. Returns 0 or an errno
 * after a message. */
static int walk(const char *dir, cap_list_t *l) {
    DIR *d = opendir(dir);
    if (!d) {
        int e = errno;
        warn("%s: %s", dir, strerror(e));
        return e;
    }
    int rc = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
        size_t n = strlen(dir) + strlen(de->d_name) + 2;
        char *p = malloc(n);
        if (!p) {
            rc = ENOMEM;
            break;
        }
        snprintf(p, n, "%s/%s", dir, de->d_name);
        struct stat st, lst;
        if (lstat(p, &lst) != 0 || stat(p, &st) != 0) {
            free(p); /* a dangling link or a file that went away */
            continue;
        }
        if (S_ISDIR(lst.st_mode)) {
            rc = walk(p, l);
            free(p);
            if (rc) break;
        } else if (S_ISREG(st.st_mode) && has_image_ext(de->d_name)) {
            if (l->n == l->cap) {
                size_t cap = l->cap ? 2 * l->cap : 64;
                cap_item_t *v = realloc(l->v, cap * sizeof *v);
                if (!v) {
                    free(p);
                    rc = ENOMEM;
                    break;
                }
                l->v = v;
                l->cap = cap;
            }
            memset(&l->v[l->n], 0, sizeof l->v[l->n]);
            l->v[l->n++].path = p;
        } else {
            free(p);
        }
    }
    closedir(d);
    if (rc == ENOMEM) warn("out of memory");
    return rc;
}

static int cmp_items(const void *a, const void *b) {
    return strcmp(((const cap_item_t *)a)->path, ((const cap_item_t *)b)->path);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* "DIR/a.jpg" -> "DIR/a.txt". */
static char *sidecar_of(const char *path, bool full) {
    const char *dot = strrchr(path, '.');
    size_t stem = full || !dot ? strlen(path) : (size_t)(dot - path);
    char *s = malloc(stem + 5);
    if (!s) return NULL;
    memcpy(s, path, stem);
    memcpy(s + stem, ".txt", 5);
    return s;
}

/* Gives each item its sidecar name; a stem already taken by an earlier
 * item makes the later one use its full name plus .txt. */
static bool assign_sidecars(cap_list_t *l) {
    char **seen = calloc(l->n ? l->n : 1, sizeof *seen);
    if (!seen) return false;
    for (size_t i = 0; i < l->n; i++) {
        char *s = sidecar_of(l->v[i].path, false);
        if (!s) {
            free(seen);
            return false;
        }
        for (size_t k = 0; k < i; k++)
            if (strcmp(seen[k], s) == 0) {
                free(s);
                s = sidecar_of(l->v[i].path, true);
                if (!s) {
                    free(seen);
                    return false;
                }
                break;
            }
        seen[i] = s;
        l->v[i].sidecar = s;
    }
    free(seen);
    return true;
}

/* --resume with a JSON lines file: removes a cut-off last line, then marks
 * every item whose path has a line as done. Returns 0 or an exit status. */
static int resume_from_jsonl(const char *path, cap_list_t *l, size_t *n_done) {
    FILE *f = fopen(path, "r+b");
    if (!f) {
        if (errno == ENOENT) return 0;
        warn("%s: %s", path, strerror(errno));
        return EXIT_JOB;
    }
    buf_t b = {0};
    uint8_t chunk[65536];
    size_t k;
    while ((k = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (!buf_append(&b, chunk, k)) {
            fclose(f);
            free(b.data);
            warn("out of memory");
            return EXIT_JOB;
        }
    size_t keep = b.len;
    while (keep > 0 && b.data[keep - 1] != '\n') keep--;
    if (keep < b.len) {
        warn("%s: removing a cut-off last line (%zu bytes)", path, b.len - keep);
        fflush(f);
        if (ftruncate(fileno(f), (off_t)keep) != 0) {
            warn("%s: %s", path, strerror(errno));
            fclose(f);
            free(b.data);
            return EXIT_JOB;
        }
    }
    fclose(f);
    /* The paths already recorded, sorted for lookup. */
    char **keys = NULL;
    size_t n_keys = 0, cap_keys = 0;
    for (size_t pos = 0; pos < keep;) {
        size_t end = pos;
        while (end < keep && b.data[end] != '\n') end++;
        json_t *j = json_loadb((const char *)b.data + pos, end - pos, 0, NULL);
        const char *p = json_string_value(json_object_get(j, "path"));
        if (p) {
            if (n_keys == cap_keys) {
                cap_keys = cap_keys ? 2 * cap_keys : 64;
                char **nk = realloc(keys, cap_keys * sizeof *nk);
                if (!nk) break;
                keys = nk;
            }
            keys[n_keys] = strdup(p);
            if (keys[n_keys]) n_keys++;
        } else if (end > pos) {
            warn("%s: ignoring a line that is not a result", path);
        }
        json_decref(j);
        pos = end + 1;
    }
    free(b.data);
    if (n_keys) qsort(keys, n_keys, sizeof *keys, cmp_str);
    for (size_t i = 0; i < l->n; i++) {
        const char *key = l->v[i].key;
        if (n_keys && bsearch(&key, keys, n_keys, sizeof *keys, cmp_str)) {
            l->v[i].done = true;
            (*n_done)++;
        }
    }
    for (size_t i = 0; i < n_keys; i++) free(keys[i]);
    free(keys);
    return 0;
}

/* Writes text to path atomically (a temporary file renamed over it). */
static bool write_sidecar(const char *path, const char *text, size_t len) {
    size_t n = strlen(path) + 16;
    char *tmp = malloc(n);
    if (!tmp) return false;
    snprintf(tmp, n, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    bool ok = f && fwrite(text, 1, len, f) == len && fputc('\n', f) != EOF;
    if (f && fclose(f) != 0) ok = false;
    if (ok && rename(tmp, path) != 0) ok = false;
    if (!ok) unlink(tmp);
    free(tmp);
    return ok;
}

/* Writes one JSON line (o is stolen) and flushes it. */
static bool write_line(FILE *out, json_t *o) {
    char *s = o ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(o);
    if (!s) return false;
    size_t n = strlen(s);
    s[n] = '\n'; /* the NUL becomes the newline: one write for the whole line */
    bool ok = fwrite(s, 1, n + 1, out) == n + 1 && fflush(out) == 0;
    free(s);
    return ok;
}

typedef struct progress {
    bool tty;
    size_t total, finished, failed;
    double t0, last_draw;
} progress_t;

static void progress_draw(progress_t *pg, bool final) {
    const double now = now_s();
    if (pg->tty) {
        if (!final && now - pg->last_draw < 0.1) return;
    } else if (final || pg->finished == 0 || pg->finished % 10 != 0) {
        return;
    }
    pg->last_draw = now;
    const double el = now - pg->t0;
    const double rate = el > 0 ? pg->finished / el : 0;
    const double eta = rate > 0 ? (pg->total - pg->finished) / rate : 0;
    if (pg->tty) {
        char bar[31];
        size_t fill = pg->total ? pg->finished * 30 / pg->total : 30;
        for (size_t i = 0; i < 30; i++) bar[i] = i < fill ? '#' : '.';
        bar[30] = '\0';
        fprintf(stderr, "\r\033[K[%s] %zu/%zu %3.0f%% %.2f img/s ETA %d:%02d", bar, pg->finished, pg->total,
                pg->total ? 100.0 * pg->finished / pg->total : 100.0, rate, (int)eta / 60, (int)eta % 60);
        if (pg->failed) fprintf(stderr, " (%zu failed)", pg->failed);
        if (final) fputc('\n', stderr);
    } else {
        fprintf(stderr, "vlm caption: %zu/%zu done, %zu failed, %.2f img/s, ETA %.0f s\n", pg->finished, pg->total,
                pg->failed, rate, eta);
    }
    fflush(stderr);
}

static int cmd_caption(int argc, char **argv) {
    g_cmd = "vlm caption";
    cli_t o;
    cli_init(&o);
    const char *prompt = "Describe the image.", *dir = NULL, *out_path = NULL;
    int32_t inflight = 4;
    bool sidecar = false, resume = false;
    vlm_args_t a;
    vlm_args_init(&a, argc, argv);
    while (vlm_args_next(&a)) {
        if (!vlm_args_is_option(&a)) {
            if (dir) return usage_error("one folder only (got '%s' and '%s')", dir, a.arg);
            dir = a.arg;
            continue;
        }
        if (is_help(&a)) {
            printf("%s\n%s\n%s\n%s", caption_help, gen_help, common_help, exit_help);
            return 0;
        }
        int r = parse_shared(&a, &o, true);
        if (r == 0) {
            r = 1;
            if (vlm_args_is(&a, "-p", "--prompt")) r = (prompt = vlm_args_value(&a)) ? 1 : -1;
            else if (vlm_args_is(&a, "-o", "--out")) r = (out_path = vlm_args_value(&a)) ? 1 : -1;
            else if (vlm_args_is(&a, NULL, "--inflight")) r = vlm_args_value_i32(&a, 1, 1024, &inflight) ? 1 : -1;
            else if (vlm_args_is(&a, NULL, "--sidecar")) r = vlm_args_flag(&a, &sidecar) ? 1 : -1;
            else if (vlm_args_is(&a, NULL, "--resume")) r = vlm_args_flag(&a, &resume) ? 1 : -1;
            else return usage_error("unknown option '%s'", a.arg);
        }
        if (r < 0) return usage_error("%s", a.err);
    }
    if (!dir) return usage_error("no folder given");
    if (resume && !sidecar && (!out_path || strcmp(out_path, "-") == 0))
        return usage_error("--resume needs --out FILE or --sidecar");
    if (out_path && strcmp(out_path, "-") == 0) out_path = NULL;

    /* DIR without trailing slashes, so paths read DIR/a.jpg. */
    char *root = strdup(dir);
    if (!root) return EXIT_JOB;
    for (size_t n = strlen(root); n > 1 && root[n - 1] == '/'; n--) root[n - 1] = '\0';

    int status = 0;
    cap_list_t l = {0};
    FILE *out = NULL;
    vlm_client_t *c = NULL;
    size_t n_skipped = 0;
    struct stat st;
    if (stat(root, &st) != 0 || !S_ISDIR(st.st_mode)) {
        status = usage_error("'%s' is not a folder", root);
        goto done;
    }
    if (walk(root, &l)) {
        status = EXIT_JOB;
        goto done;
    }
    if (l.n) qsort(l.v, l.n, sizeof *l.v, cmp_items);
    for (size_t i = 0; i < l.n; i++)
        if (!(l.v[i].key = utf8_copy(l.v[i].path))) {
            status = EXIT_JOB;
            goto done;
        }
    if (sidecar && !assign_sidecars(&l)) {
        status = EXIT_JOB;
        goto done;
    }
    if (resume) {
        if (sidecar) {
            for (size_t i = 0; i < l.n; i++)
                if (access(l.v[i].sidecar, F_OK) == 0) {
                    l.v[i].done = true;
                    n_skipped++;
                }
        } else if ((status = resume_from_jsonl(out_path, &l, &n_skipped))) {
            goto done;
        }
    }
    if (out_path) {
        out = fopen(out_path, resume ? "ab" : "wb");
        if (!out) {
            warn("%s: %s", out_path, strerror(errno));
            status = EXIT_JOB;
            goto done;
        }
    } else if (!sidecar) {
        out = stdout;
    }

    install_signals();
    if (!(c = make_client(&o))) {
        status = EXIT_CONN;
        goto done;
    }

    progress_t pg = {.tty = isatty(STDERR_FILENO) == 1, .total = l.n - n_skipped, .t0 = now_s()};
    size_t next = 0, n_ok = 0, n_failed = 0;
    size_t *retry = calloc(l.n ? l.n : 1, sizeof *retry); /* busy images waiting to go again */
    size_t n_retry = 0;
    int running = 0;
    bool stop = false;
    vlm_client_event_t ev;
    vlm_client_event_init(&ev);
    o.params.prompt = prompt;
    if (!retry) {
        status = EXIT_JOB;
        goto done;
    }
    progress_draw(&pg, false);
    for (;;) {
        if (g_interrupted && !stop) {
            stop = true;
            status = EXIT_INTERRUPTED;
            warn("interrupted: the unfinished images are not recorded (--resume does them)");
            break; /* destroying the client cancels the running jobs */
        }
        /* Keep up to --inflight jobs in the daemon: busy retries first. */
        while (!stop && running < inflight) {
            size_t idx = SIZE_MAX;
            const double now = now_s();
            for (size_t r = 0; r < n_retry; r++)
                if (l.v[retry[r]].not_before <= now) {
                    idx = retry[r];
                    retry[r] = retry[--n_retry];
                    break;
                }
            if (idx == SIZE_MAX) {
                while (next < l.n && l.v[next].done) next++;
                if (next == l.n) break;
                idx = next++;
            }
            vlm_client_image_t img = {.path = l.v[idx].path};
            o.params.images = &img;
            o.params.n_images = 1;
            int rc = vlm_client_submit(c, &o.params, &l.v[idx], NULL);
            if (rc == 0) {
                running++;
                continue;
            }
            if (exit_for(rc) == EXIT_CONN) {
                status = fail_client(rc, vlm_client_errmsg(c));
                stop = true;
                break;
            }
            /* A file that cannot be read: recorded like a daemon error. */
            ev.type = VLM_CLIENT_EVENT_ERROR;
            ev.user = &l.v[idx];
            ev.error = rc;
            snprintf(ev.code, sizeof ev.code, "%s", vlm_client_err_name(rc));
            snprintf(ev.message, sizeof ev.message, "%s", vlm_client_errmsg(c));
            goto record;
        }
        if (running == 0 && (stop || (next >= l.n && n_retry == 0))) break;
        {
            int got = vlm_client_poll(c, 100, &ev);
            if (got < 0) {
                status = fail_client(got, vlm_client_errmsg(c));
                break;
            }
            if (got == 0 || ev.type == VLM_CLIENT_EVENT_TOKEN) continue;
            running--;
        }
    record:;
        cap_item_t *it = ev.user;
        if (ev.type == VLM_CLIENT_EVENT_ERROR) {
            if (ev.error == VLM_CLIENT_ERR_BUSY && it->busy_tries < 20) {
                /* Other clients fill the daemon: try again a little later. */
                it->busy_tries++;
                it->not_before = now_s() + fmin(0.25 * it->busy_tries, 2.0);
                retry[n_retry++] = (size_t)(it - l.v);
                continue;
            }
            if (exit_for(ev.error) == EXIT_CONN || ev.error == VLM_CLIENT_ERR_SHUTTING_DOWN) {
                /* The daemon is gone or going: stop, record nothing more. */
                if (!stop) status = fail_client(ev.error, ev.message);
                stop = true;
                continue;
            }
            n_failed++;
            pg.failed++;
            pg.finished++;
            if (sidecar) warn("%s: %s: %s", it->key, ev.code, ev.message);
            if (out) {
                json_t *line = json_pack("{s:s, s:{s:s, s:s}}", "path", it->key, "error", "code", ev.code,
                                         "message", ev.message);
                if (!write_line(out, line)) {
                    warn("writing the output: %s", strerror(errno));
                    status = EXIT_JOB;
                    stop = true;
                }
            }
        } else {
            bool ok = true;
            if (sidecar && !write_sidecar(it->sidecar, ev.result.text, ev.result.text_len)) {
                warn("%s: %s", it->sidecar, strerror(errno));
                ok = false;
            }
            if (out) {
                json_t *line = json_pack("{s:s, s:s%, s:I, s:f}", "path", it->key, "caption", ev.result.text,
                                         ev.result.text_len, "tokens", (json_int_t)ev.result.usage.completion_tokens,
                                         "ms", round(ev.result.timings.total_ms * 10.0) / 10.0);
                if (!write_line(out, line)) {
                    warn("writing the output: %s", strerror(errno));
                    ok = false;
                }
            }
            if (!ok) {
                status = EXIT_JOB;
                stop = true;
                continue;
            }
            n_ok++;
            pg.finished++;
        }
        progress_draw(&pg, false);
    }
    vlm_client_event_deinit(&ev);
    free(retry);
    progress_draw(&pg, true);
    const double el = now_s() - pg.t0;
    fprintf(stderr, "vlm caption: %zu captioned, %zu failed, %zu skipped (already done), %zu not done, "
            "in %.1f s (%.2f img/s)\n", n_ok, n_failed, n_skipped, l.n - n_skipped - n_ok - n_failed, el,
            el > 0 ? n_ok / el : 0.0);
    if (status == 0 && n_failed) status = EXIT_JOB;

done:
    vlm_client_destroy(&c);
    if (out && out != stdout) fclose(out);
    for (size_t i = 0; i < l.n; i++) {
        free(l.v[i].path);
        free(l.v[i].key);
        free(l.v[i].sidecar);
    }
    free(l.v);
    free(root);
    return status;
}

/* ==== main ============================================================== */

static const char main_help[] =
    "usage: vlm [--endpoint URL] [--timeout SEC] COMMAND [options] [args]\n"
    "\n"
    "The command line of the vlmd vision-language daemon.\n"
    "\n"
    "Commands:\n"
    "  ask IMAGE... QUESTION   stream an answer (IMAGE '-' = stdin, e.g. a webcam frame)\n"
    "  watch - QUESTION        ask about the newest frame of an MJPEG/PPM stream on stdin\n"
    "                          every --interval seconds\n"
    "  caption DIR             caption a folder tree of JPEG/PNG images (JSON lines)\n"
    "  health | stats | model  the daemon's state as JSON\n"
    "\n"
    "`vlm COMMAND --help` describes each command.\n"
    "Environment: VLM_ENDPOINT, the default endpoint (else tcp://127.0.0.1:5555).\n";

int main(int argc, char **argv) {
    /* Global options before the command are handed on to it. */
    const char *global[8];
    int n_global = 0;
    vlm_args_t a;
    vlm_args_init(&a, argc, argv);
    while (vlm_args_next(&a) && vlm_args_is_option(&a)) {
        if (is_help(&a)) {
            printf("%s\n%s\n%s", main_help, common_help, exit_help);
            return 0;
        }
        if (!vlm_args_is(&a, NULL, "--endpoint") && !vlm_args_is(&a, NULL, "--timeout"))
            return usage_error("unknown option '%s' before the command", a.arg);
        const int from = a.i; /* "--name=value", or "--name" and its value */
        if (!vlm_args_value(&a)) return usage_error("%s", a.err);
        if (n_global + (a.i - from + 1) > 8) return usage_error("too many options before the command");
        for (int i = from; i <= a.i; i++) global[n_global++] = argv[i];
    }
    if (!a.arg) {
        fprintf(stderr, "%s", main_help);
        return EXIT_USAGE;
    }
    const int first = a.i;
    const char *cmd = argv[first];
    /* argv for the command: its name, the global options, then its own. */
    char **sub = calloc((size_t)(argc - first + n_global + 1), sizeof *sub);
    if (!sub) return EXIT_JOB;
    int n = 0;
    sub[n++] = argv[first];
    for (int i = 0; i < n_global; i++) sub[n++] = (char *)global[i];
    for (int i = first + 1; i < argc; i++) sub[n++] = argv[i];
    sub[n] = NULL;

    int status;
    if (strcmp(cmd, "ask") == 0) status = cmd_ask(n, sub);
    else if (strcmp(cmd, "watch") == 0) status = cmd_watch(n, sub);
    else if (strcmp(cmd, "caption") == 0) status = cmd_caption(n, sub);
    else if (strcmp(cmd, "health") == 0 || strcmp(cmd, "stats") == 0 || strcmp(cmd, "model") == 0)
        status = cmd_op(n, sub, cmd);
    else if (strcmp(cmd, "help") == 0) {
        printf("%s\n%s\n%s", main_help, common_help, exit_help);
        status = 0;
    } else
        status = usage_error("unknown command '%s'", cmd);
    free(sub);
    return status;
}
