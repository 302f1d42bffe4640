/* daemon/main.c - vlmd, the vision-language daemon: init, loop, teardown.
 *
 *   init:     parse the flags, route SIGTERM/SIGINT into a self-pipe that
 *             the I/O thread reads (the handler does nothing else), load
 *             the model into an engine, bind the sockets,
 *             start the engine thread, log "vlmd: ready on ...";
 *   loop:     the I/O thread (this one) serves until a signal has stopped
 *             admission and every job has ended (daemon/server.c);
 *   teardown: close the sockets, join the engine, exit 0.
 *
 * The engine (daemon/engine.c) owns the model and runs continuous batching
 * on its own thread; the protocol is in docs/protocol.md.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "core/args.h"
#include "core/dtype.h"
#include "daemon/engine.h"
#include "daemon/server.h"
#include "text/chat.h"

#ifndef VLMD_DEFAULT_MODEL_DIR
#define VLMD_DEFAULT_MODEL_DIR "models/default"
#endif

/* ==== Options =========================================================== */

typedef struct vlmd_opts {
    vlm_engine_opts_t engine;
    vlm_server_opts_t server;
    char default_text[PATH_MAX];
    char default_mmproj[PATH_MAX];
} vlmd_opts_t;

static void usage(FILE *f) {
    fputs(
        "usage: vlmd [-m|--model FILE [--mmproj FILE]] [--endpoint EP] [-t|--threads N]\n"
        "            [--ctx N] [--parallel N] [--queue N] [--image-cache N]\n"
        "            [--preprocess hf|llamacpp] [--max-pixels N] [--max-image-bytes N]\n"
        "            [--max-images N] [--grace S] [--reply-timeout S] [--heartbeat MS]\n"
        "            [--kv-type f16|f32] [--fast-order]\n"
        "            [--template NAME] [--prefill-batch N] [--batch-images] [-h|--help]\n"
        "\n"
        "Serves one vision-language model over ZeroMQ (protocol: docs/protocol.md).\n"
        "\n"
        "  -m, --model FILE         text model GGUF (LLaMA family); without -m and --mmproj\n"
        "                           the bundled default model is served (" VLMD_DEFAULT_MODEL_DIR ")\n"
        "      --mmproj FILE        vision encoder + projector GGUF (omit for text only)\n"
        "      --endpoint EP        ZeroMQ endpoint to bind (default tcp://127.0.0.1:5555;\n"
        "                           tcp://127.0.0.1:* picks a free port, ipc://PATH a socket file)\n"
        "  -t, --threads N          compute threads (default: online CPUs)\n"
        "      --ctx N              context positions per slot (default min(4096, the model's))\n"
        "      --parallel N         jobs generating at once, one KV slot each (default 4)\n"
        "      --queue N            jobs waiting beyond the slots before 'busy' (default 16)\n"
        "      --image-cache N      projected image embeddings kept (default 32; 0 = off)\n"
        "      --preprocess MODE    default image preprocessing: hf (default) or llamacpp\n"
        "      --max-pixels N       largest decoded image, width x height (default 67108864)\n"
        "      --max-image-bytes N  largest image frame (default 33554432)\n"
        "      --max-images N       images per request (default 16)\n"
        "      --grace S            on SIGTERM/SIGINT, running jobs may finish for S seconds\n"
        "                           (default 10); a second signal ends them at once\n"
        "      --reply-timeout S    a client that reads nothing for S seconds while its\n"
        "                           events pile up is dropped and its jobs cancelled (default 30)\n"
        "      --heartbeat MS       ZMTP heartbeat interval; a client silent for 3 intervals is\n"
        "                           disconnected and its jobs cancelled (default 5000; 0 = off)\n"
        "      --kv-type TYPE       KV cache type: f16 (default, as llama.cpp) or f32\n"
        "      --fast-order         sum quantized dot products in vlmd's faster order (prefill of\n"
        "                           Q8_0 / K-quant weights about 2x faster; logits then differ from\n"
        "                           llama.cpp's in the last bits; default: ggml's order)\n"
        "      --template NAME      chat template for every job: vicuna, llama2, llama3,\n"
        "                           mistral, chatml, raw (default: the model's, as vlm-run)\n"
        "      --prefill-batch N    prompt rows per forward pass (default 512, at least 512)\n"
        "      --batch-images       encode the images of several new jobs in one encoder call:\n"
        "                           faster under load, but an answer may then differ in the\n"
        "                           last bits from vlm-run's (default: one image per call)\n"
        "  -h, --help               this text\n",
        f);
}

/* Prints "vlmd: <message>" and returns 1, the exit status. */
static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("vlmd: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 1;
}

static bool file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* vlm_args_walk()'s callback: applies the option at the cursor to ctx (a
 * vlmd_opts_t). Returns false, with the message in a->err, on an unknown
 * option or a bad value. */
static bool parse_option(vlm_args_t *a, void *ctx) {
    vlmd_opts_t *o = ctx;
    vlm_engine_opts_t *e = &o->engine;
    vlm_server_opts_t *s = &o->server;
    const double year_s = 86400.0 * 365;
    const char *v;
    int64_t n;
    if (vlm_args_is(a, "-m", "--model")) return (e->model_path = vlm_args_value(a)) != NULL;
    if (vlm_args_is(a, NULL, "--mmproj")) return (e->mmproj_path = vlm_args_value(a)) != NULL;
    if (vlm_args_is(a, NULL, "--endpoint")) return (s->endpoint = vlm_args_value(a)) != NULL;
    if (vlm_args_is(a, "-t", "--threads")) return vlm_args_value_i32(a, 1, 1024, &e->n_threads);
    if (vlm_args_is(a, NULL, "--ctx")) return vlm_args_value_i32(a, 1, INT32_MAX, &e->n_ctx);
    if (vlm_args_is(a, NULL, "--parallel")) return vlm_args_value_i32(a, 1, 256, &e->n_parallel);
    if (vlm_args_is(a, NULL, "--queue")) return vlm_args_value_i32(a, 0, 65536, &e->queue_size);
    if (vlm_args_is(a, NULL, "--image-cache")) return vlm_args_value_i32(a, 0, 1 << 20, &e->image_cache);
    if (vlm_args_is(a, NULL, "--preprocess")) {
        if (!(v = vlm_args_value(a))) return false;
        const int m = vlm_preprocess_mode_from_name(v);
        if (m < 0) return vlm_args_bad_value(a, "hf or llamacpp");
        e->preprocess = (vlm_preprocess_mode_t)m;
        return true;
    }
    if (vlm_args_is(a, NULL, "--max-pixels")) return vlm_args_value_i64(a, 1, INT64_MAX, &e->max_pixels);
    if (vlm_args_is(a, NULL, "--max-image-bytes")) {
        if (!vlm_args_value_i64(a, 1, INT64_C(1) << 30, &n)) return false;
        s->limits.max_image_bytes = (size_t)n;
        return true;
    }
    if (vlm_args_is(a, NULL, "--max-images")) return vlm_args_value_i32(a, 0, 1024, &s->limits.max_images);
    if (vlm_args_is(a, NULL, "--grace")) return vlm_args_value_double(a, 0, year_s, &s->grace_s);
    if (vlm_args_is(a, NULL, "--reply-timeout")) return vlm_args_value_double(a, 0, year_s, &s->reply_timeout_s);
    if (vlm_args_is(a, NULL, "--heartbeat")) return vlm_args_value_i32(a, 0, 3600000, &s->heartbeat_ms);
    if (vlm_args_is(a, NULL, "--kv-type")) {
        if (!(v = vlm_args_value(a))) return false;
        if (strcmp(v, "f16") == 0) e->kv_type = VLM_DTYPE_F16;
        else if (strcmp(v, "f32") == 0) e->kv_type = VLM_DTYPE_F32;
        else return vlm_args_bad_value(a, "f16 or f32");
        return true;
    }
    if (vlm_args_is(a, NULL, "--template")) {
        if (!(v = vlm_args_value(a))) return false;
        if (vlm_chat_template_from_name(v) == VLM_CHAT_TEMPLATE_UNKNOWN)
            return vlm_args_bad_value(a, "vicuna, llama2, llama3, mistral, chatml or raw");
        e->template_name = v;
        return true;
    }
    if (vlm_args_is(a, NULL, "--batch-images")) return vlm_args_flag(a, &e->batch_images);
    if (vlm_args_is(a, NULL, "--fast-order")) return vlm_args_flag(a, &e->fast_order);
    if (vlm_args_is(a, NULL, "--prefill-batch")) return vlm_args_value_i32(a, 512, 65536, &e->prefill_budget);
    return vlm_args_error(a, "unknown option '%s' (see --help)", a->arg);
}

/* Parses argv into o. Returns 0 to run, 2 after --help, 1 on a bad flag. */
static int parse_args(int argc, char **argv, vlmd_opts_t *o) {
    memset(o, 0, sizeof *o);
    vlm_engine_opts_default(&o->engine);
    vlm_server_opts_default(&o->server);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    o->engine.n_threads = ncpu > 0 ? (int)(ncpu > 256 ? 256 : ncpu) : 1;

    vlm_args_t a;
    const int walked = vlm_args_walk(&a, argc, argv, parse_option, o);
    if (walked < 0) return fail("%s", a.err);
    if (walked > 0) {
        usage(stdout);
        return 2;
    }
    o->engine.max_image_bytes = o->server.limits.max_image_bytes;

    if (!o->engine.model_path && o->engine.mmproj_path)
        return fail("--mmproj needs -m/--model (the text model GGUF)");
    if (!o->engine.model_path) {
        /* The bundled default model. */
        snprintf(o->default_text, sizeof o->default_text, "%s/text.gguf", VLMD_DEFAULT_MODEL_DIR);
        snprintf(o->default_mmproj, sizeof o->default_mmproj, "%s/mmproj.gguf", VLMD_DEFAULT_MODEL_DIR);
        if (!file_exists(o->default_text) || !file_exists(o->default_mmproj))
            return fail("no model given, and the bundled default model is not installed (%s/text.gguf and "
                        "mmproj.gguf not found); start vlmd with -m TEXT.gguf --mmproj MMPROJ.gguf",
                        VLMD_DEFAULT_MODEL_DIR);
        o->engine.model_path = o->default_text;
        o->engine.mmproj_path = o->default_mmproj;
    }
    return 0;
}

/* ==== main ============================================================== */

static int signal_pipe[2] = {-1, -1};

/* Async-signal-safe: one byte into the pipe, nothing else. */
static void on_signal(int sig) {
    const int saved = errno;
    const unsigned char b = (unsigned char)sig;
    if (write(signal_pipe[1], &b, 1) < 0) {
        /* The pipe is full of earlier signals: this one changes nothing. */
    }
    errno = saved;
}

int main(int argc, char **argv) {
    /* Init. */
    vlmd_opts_t opts;
    int status = parse_args(argc, argv, &opts);
    if (status) return status == 2 ? 0 : status;

    /* Signals go through a self-pipe: the handler writes the signal number
     * and the I/O thread reads it. (A signalfd would need the signals
     * blocked in every thread, and OpenBLAS starts its threads before main.) */
    if (pipe2(signal_pipe, O_NONBLOCK | O_CLOEXEC) != 0) return fail("pipe: %s", strerror(errno));
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    void *zctx = zmq_ctx_new();
    vlm_engine_t *engine = NULL;
    vlm_server_t *server = NULL;
    vlm_error_t err;
    vlm_error_clear(&err);
    if (!zctx) {
        status = fail("cannot create the ZeroMQ context: %s", zmq_strerror(zmq_errno()));
        goto teardown;
    }
    if (vlm_engine_new(zctx, &opts.engine, &engine, &err) != VLM_OK) {
        status = fail("%s", err.msg);
        goto teardown;
    }
    if (vlm_server_new(zctx, engine, &opts.server, signal_pipe[0], &server, &err) != VLM_OK) {
        status = fail("%s", err.msg);
        goto teardown;
    }
    if (vlm_engine_start(engine, &err) != VLM_OK) {
        status = fail("%s", err.msg);
        goto teardown;
    }
    fprintf(stderr, "vlmd: ready on %s (%s)\n", vlm_server_endpoint(server), vlm_engine_summary(engine));
    fflush(stderr);

    /* Loop. */
    vlm_server_run(server);

teardown:
    /* The engine thread has returned when the loop ends; destroying the
     * engine joins it. If start-up failed, it was never started. */
    vlm_server_destroy(&server);
    vlm_engine_destroy(&engine);
    if (zctx) zmq_ctx_term(zctx);
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    close(signal_pipe[0]);
    close(signal_pipe[1]);
    if (status == 0) fprintf(stderr, "vlmd: stopped\n");
    return status;
}
