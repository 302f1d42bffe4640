/* clients/run/vlm-run.c - the offline tool: one prompt (and images) in,
 * generated text out, with no daemon in between.
 *
 * It does what llama.cpp's llama-cli (`-no-cnv -p PROMPT`) does for a text
 * prompt and what llama-llava-cli does for an image prompt, so its output
 * can be compared token for token with theirs:
 *   1. parse the flags (a stable interface; see usage());
 *   2. load the text GGUF (tokenizer, weights, KV cache) and, for images,
 *      the mmproj (CLIP encoder and projector);
 *   3. decode and preprocess each image, encode and project it;
 *   4. format the prompt into segments (text/chat.h), tokenize the text
 *      parts (parse_special on, BOS on the first) and prefill the decoder
 *      one segment at a time, as llava-cli evaluates system text, image
 *      rows and user text;
 *   5. sample token after token (greedy at --temp 0), stream each piece to
 *      stdout, stop at an end-of-generation token, a stop string or -n;
 *   6. with --json, print one JSON object instead of the stream.
 *
 * Template choice: --template NAME wins. Otherwise an image prompt uses
 * the chat template detected from the GGUF, with LLaVA-1.5's (vicuna) as
 * the fallback, as llava-cli formats every model; a text-only prompt uses
 * the GGUF's own template when it declares a supported one, and is fed raw
 * otherwise, as llama-cli -no-cnv does (so the golden text-only check
 * reproduces with or without --template raw).
 *
 * Repetition penalties look at the generated tokens in image mode
 * (llava-cli) and also at the prompt in text mode (llama-cli).
 *
 * Printing: in image mode pieces are printed with their control-token text
 * (llava-cli prints "<s>"); in text mode control tokens print nothing, as
 * llama-cli does, unless --special. Stop strings apply in image mode and
 * with a chat template, not to a raw text prompt (llama-cli has none).
 *
 * Errors print one line "vlm-run: ..." on stderr and exit with status 1.
 */
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/args.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/gguf.h"
#include "core/pool.h"
#include "core/utf8.h"
#include "projector/projector.h"
#include "text/chat.h"
#include "core/matmul.h"
#include "text/llama.h"
#include "text/sampler.h"
#include "text/tokenizer.h"
#include "vision/clip.h"
#include "vision/image.h"
#include "vision/preprocess.h"

#define RUN_MAX_IMAGES 64
#define RUN_N_UBATCH 512       /* llama.cpp's default n_ubatch */
#define RUN_DEFAULT_CTX 4096   /* llava-cli's default n_ctx */
#define RUN_IMAGE_N_PREDICT 256 /* llava-cli's length when -n is negative */

/* ==== Errors ============================================================ */

/* Prints "vlm-run: <message>" on one line of stderr (newlines in the
 * message become spaces) and returns 1, the exit status. */
static int fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int fail(const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *c = msg; *c; c++)
        if (*c == '\n' || *c == '\r') *c = ' ';
    fprintf(stderr, "vlm-run: %s\n", msg);
    return 1;
}

/* A failure about a file: the error text, prefixed by the path unless the
 * text already names it. */
static int fail_file(const char *path, const vlm_error_t *err, int rc) {
    const char *msg = err->msg[0] ? err->msg : vlm_strerror(rc);
    if (strstr(msg, path)) return fail("%s", msg);
    return fail("%s: %s", path, msg);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* ==== Options =========================================================== */

typedef struct run_opts {
    const char *model;
    const char *mmproj;
    const char *images[RUN_MAX_IMAGES];
    int n_images;
    const char *prompt;
    const char *system;            /* NULL: the template's default */
    const char *template_name;     /* NULL: chosen as in the file header */
    int32_t n_predict;             /* < 0: until EOG / context (256 with images) */
    vlm_sampler_params_t sampling;
    bool seed_given;
    int n_threads;
    bool ignore_eos;
    bool json;
    bool tokenize;
    bool no_bos;
    bool special;
    bool fast_order;        /* --fast-order: VLM_WEIGHT_PREPARE_FAST_ORDER */
    const char *dump_logits;
    vlm_preprocess_mode_t preprocess;
    int32_t n_ctx;                 /* 0: min(4096, n_ctx_train) */
    uint32_t kv_type;
} run_opts_t;

static void usage(FILE *f) {
    fputs(
        "usage: vlm-run -m|--model FILE [--mmproj FILE] [--image FILE]... -p|--prompt TEXT\n"
        "               [-n|--max-tokens N] [--temp T] [--top-k K] [--top-p P] [--min-p P]\n"
        "               [--repeat-penalty R] [--seed S] [-t|--threads N]\n"
        "               [--template NAME|raw] [--ignore-eos] [--json] [--tokenize] [--no-bos]\n"
        "               [--special] [--dump-logits FILE] [--preprocess hf|llamacpp]\n"
        "               [--ctx N] [--kv-type f16|f32] [--fast-order] [--system TEXT] [-h|--help]\n"
        "\n"
        "  -m, --model FILE        text model GGUF (LLaMA family)\n"
        "      --mmproj FILE       vision encoder + projector GGUF (needed for --image)\n"
        "      --image FILE        an image (JPEG, PNG, binary PGM/PPM; '-' = stdin); repeatable.\n"
        "                          \"<image>\" markers in the prompt place them (placeholder mode)\n"
        "  -p, --prompt TEXT       the prompt\n"
        "  -n, --max-tokens N      tokens to generate (default -1: until end of generation or\n"
        "                          a full context; 256 with images, as llava-cli)\n"
        "      --temp T            temperature, 0 = greedy (default 0.8)\n"
        "      --top-k K           0 = off (default 40)\n"
        "      --top-p P           1 = off (default 0.95)\n"
        "      --min-p P           0 = off (default 0.05)\n"
        "      --repeat-penalty R  over the last 64 tokens, 1 = off (default 1)\n"
        "      --seed S            sampling seed (default: random, printed in --json)\n"
        "  -t, --threads N         worker threads (default: online CPUs)\n"
        "      --template NAME     raw, vicuna (llava), llama2, llama3, mistral-v1, chatml.\n"
        "                          Default: with images, the GGUF's chat template (vicuna if it\n"
        "                          has none); text only, the GGUF's template if supported, else raw\n"
        "      --system TEXT       system text for the template\n"
        "      --ignore-eos        never sample end-of-generation tokens\n"
        "      --json              print one JSON object (ids, text, stop reason, timings)\n"
        "      --tokenize          print the prompt's token ids as a JSON array and exit\n"
        "      --no-bos            do not add BOS\n"
        "      --special           --tokenize: parse special-token text; generation: print\n"
        "                          control tokens\n"
        "      --dump-logits FILE  write the last prompt position's logits (f32 LE)\n"
        "      --preprocess MODE   hf (LLaVA's own, default) or llamacpp (llama.cpp's)\n"
        "      --ctx N             context length (default min(4096, the model's))\n"
        "      --kv-type TYPE      KV cache type: f16 (default) or f32\n"
        "      --fast-order        sum quantized dot products in vlmd's faster order (prefill of\n"
        "                          Q8_0 / K-quant weights about 2x faster; logits then differ\n"
        "                          from llama.cpp's in the last bits)\n"
        "  -h, --help              this text\n",
        f);
}

/* vlm_args_walk()'s callback: applies the option at the cursor to ctx (a
 * run_opts_t). Returns false, with the message in a->err, on an unknown
 * option or a bad value. */
static bool parse_option(vlm_args_t *a, void *ctx) {
    run_opts_t *o = ctx;
    vlm_sampler_params_t *sp = &o->sampling;
    const char *v;
    if (vlm_args_is(a, "-m", "--model")) return (o->model = vlm_args_value(a)) != NULL;
    if (vlm_args_is(a, NULL, "--mmproj")) return (o->mmproj = vlm_args_value(a)) != NULL;
    if (vlm_args_is(a, NULL, "--image")) {
        if (!(v = vlm_args_value(a))) return false;
        if (o->n_images == RUN_MAX_IMAGES) return vlm_args_error(a, "at most %d images", RUN_MAX_IMAGES);
        o->images[o->n_images++] = v;
        return true;
    }
    if (vlm_args_is(a, "-p", "--prompt")) return (o->prompt = vlm_args_value(a)) != NULL;
    if (vlm_args_is(a, NULL, "--system")) return (o->system = vlm_args_value(a)) != NULL;
    if (vlm_args_is(a, "-n", "--max-tokens")) return vlm_args_value_i32(a, -1, INT32_MAX, &o->n_predict);
    if (vlm_args_is(a, NULL, "--temp")) return vlm_args_value_f32(a, -INFINITY, INFINITY, &sp->temperature);
    if (vlm_args_is(a, NULL, "--top-k")) return vlm_args_value_i32(a, INT32_MIN, INT32_MAX, &sp->top_k);
    if (vlm_args_is(a, NULL, "--top-p")) return vlm_args_value_f32(a, -INFINITY, INFINITY, &sp->top_p);
    if (vlm_args_is(a, NULL, "--min-p")) return vlm_args_value_f32(a, -INFINITY, INFINITY, &sp->min_p);
    if (vlm_args_is(a, NULL, "--repeat-penalty"))
        return vlm_args_value_f32(a, -INFINITY, INFINITY, &sp->repeat_penalty);
    if (vlm_args_is(a, NULL, "--seed")) return (o->seed_given = vlm_args_value_u64(a, 0, INT64_MAX, &sp->seed));
    if (vlm_args_is(a, "-t", "--threads")) return vlm_args_value_i32(a, 1, 1024, &o->n_threads);
    if (vlm_args_is(a, NULL, "--template")) {
        if (!(v = vlm_args_value(a))) return false;
        if (vlm_chat_template_from_name(v) == VLM_CHAT_TEMPLATE_UNKNOWN)
            return vlm_args_bad_value(a, "raw, vicuna, llama2, llama3, mistral-v1 or chatml");
        o->template_name = v;
        return true;
    }
    if (vlm_args_is(a, NULL, "--ignore-eos")) return vlm_args_flag(a, &o->ignore_eos);
    if (vlm_args_is(a, NULL, "--json")) return vlm_args_flag(a, &o->json);
    if (vlm_args_is(a, NULL, "--tokenize")) return vlm_args_flag(a, &o->tokenize);
    if (vlm_args_is(a, NULL, "--no-bos")) return vlm_args_flag(a, &o->no_bos);
    if (vlm_args_is(a, NULL, "--special")) return vlm_args_flag(a, &o->special);
    if (vlm_args_is(a, NULL, "--fast-order")) return vlm_args_flag(a, &o->fast_order);
    if (vlm_args_is(a, NULL, "--dump-logits")) return (o->dump_logits = vlm_args_value(a)) != NULL;
    if (vlm_args_is(a, NULL, "--preprocess")) {
        if (!(v = vlm_args_value(a))) return false;
        const int m = vlm_preprocess_mode_from_name(v);
        if (m < 0) return vlm_args_bad_value(a, "hf or llamacpp");
        o->preprocess = (vlm_preprocess_mode_t)m;
        return true;
    }
    if (vlm_args_is(a, NULL, "--ctx")) return vlm_args_value_i32(a, 1, INT32_MAX, &o->n_ctx);
    if (vlm_args_is(a, NULL, "--kv-type")) {
        if (!(v = vlm_args_value(a))) return false;
        if (strcmp(v, "f16") == 0) o->kv_type = VLM_DTYPE_F16;
        else if (strcmp(v, "f32") == 0) o->kv_type = VLM_DTYPE_F32;
        else return vlm_args_bad_value(a, "f16 or f32");
        return true;
    }
    return vlm_args_error(a, "unknown option '%s' (see --help)", a->arg);
}

/* Parses argv into o. Returns 0 to run, 2 when help was printed, 1 on a bad
 * flag (after printing the error). */
static int parse_args(int argc, char **argv, run_opts_t *o) {
    memset(o, 0, sizeof *o);
    vlm_sampler_params_default(&o->sampling);
    o->n_predict = -1;
    o->preprocess = VLM_PREPROCESS_HF;
    o->kv_type = VLM_DTYPE_F16;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    o->n_threads = ncpu > 0 ? (int)(ncpu > 256 ? 256 : ncpu) : 1;

    vlm_args_t a;
    const int walked = vlm_args_walk(&a, argc, argv, parse_option, o);
    if (walked < 0) return fail("%s", a.err);
    if (walked > 0) {
        usage(stdout);
        return 2;
    }

    if (!o->model) return fail("no model given (-m FILE; see --help)");
    if (!o->prompt) return fail("no prompt given (-p TEXT; see --help)");
    if (o->n_images > 0 && !o->mmproj && !o->tokenize)
        return fail("--image needs --mmproj (the vision encoder GGUF)");
    int n_stdin = 0;
    for (int i = 0; i < o->n_images; i++) n_stdin += strcmp(o->images[i], "-") == 0;
    if (n_stdin > 1) return fail("only one --image can be read from stdin ('-')");
    const int n_markers = vlm_chat_count_markers(o->prompt);
    if (!o->tokenize && n_markers > 0 && n_markers != o->n_images)
        return fail("the prompt has %d \"" VLM_CHAT_IMAGE_MARKER "\" marker%s but %d --image%s given",
                    n_markers, n_markers == 1 ? "" : "s", o->n_images, o->n_images == 1 ? " was" : "s were");
    vlm_error_t err;
    if (vlm_sampler_params_validate(&o->sampling, &err) != VLM_OK) return fail("%s", err.msg);
    if (!o->seed_given) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        o->sampling.seed = (((uint64_t)ts.tv_sec * 1000000007ull) ^ (uint64_t)ts.tv_nsec ^
                            ((uint64_t)getpid() << 32)) & (uint64_t)INT64_MAX;
    }
    return 0;
}

/* ==== Small helpers ===================================================== */

/* Reads a whole stream into a malloc'd buffer. Returns 0 or an errno. */
static int read_stream(FILE *f, uint8_t **data, size_t *size) {
    size_t cap = 1 << 16, n = 0;
    uint8_t *buf = malloc(cap);
    if (!buf) return ENOMEM;
    for (;;) {
        if (n == cap) {
            if (cap > VLM_IMAGE_DEFAULT_MAX_BYTES) break; /* the decoder refuses it with a message */
            uint8_t *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                return ENOMEM;
            }
            buf = nb;
            cap *= 2;
        }
        size_t k = fread(buf + n, 1, cap - n, f);
        n += k;
        if (k == 0) {
            if (ferror(f)) {
                int e = errno ? errno : EIO;
                free(buf);
                return e;
            }
            break;
        }
    }
    *data = buf;
    *size = n;
    return 0;
}

/* Appends the bytes of s[0..n) to a growing buffer. Returns false when out
 * of memory. */
typedef struct bytes {
    char *data;
    size_t len, cap;
} bytes_t;

static bool bytes_append(bytes_t *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) return false;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
    return true;
}

static char *hex_of(const char *s, size_t n) {
    char *h = malloc(2 * n + 1);
    if (!h) return NULL;
    for (size_t i = 0; i < n; i++) snprintf(h + 2 * i, 3, "%02x", (unsigned char)s[i]);
    h[2 * n] = '\0';
    return h;
}

/* Returns a JSON array of ids[0..n), or NULL when out of memory. */
static json_t *json_ids(const int32_t *ids, size_t n) {
    json_t *a = json_array();
    for (size_t i = 0; a && i < n; i++)
        if (json_array_append_new(a, json_integer(ids[i])) != 0) {
            json_decref(a);
            return NULL;
        }
    return a;
}

/* ==== Model ============================================================= */

typedef struct run_model {
    vlm_gguf_t *gguf;           /* text model file (mapping) */
    vlm_tokenizer_t *tok;
    vlm_llama_t *llama;
    vlm_kv_cache_t kv;
    vlm_pool_t *pool;
    vlm_decoder_t *dec;
    vlm_gguf_t *mm_gguf;        /* mmproj file, when images are given */
    vlm_clip_t *clip;
    vlm_projector_t *proj;
    int32_t n_vocab;
    int32_t n_embd;
} run_model_t;

static void model_free(run_model_t *m) {
    vlm_projector_destroy(&m->proj);
    vlm_clip_destroy(&m->clip);
    vlm_gguf_destroy(&m->mm_gguf);
    vlm_decoder_destroy(&m->dec);
    vlm_pool_destroy(&m->pool);
    vlm_kv_cache_deinit(&m->kv);
    vlm_llama_destroy(&m->llama);
    vlm_tokenizer_destroy(&m->tok);
    vlm_gguf_destroy(&m->gguf);
}

/* Loads what o asks for: only the tokenizer for --tokenize, else the text
 * model, and the vision side when there are images. Returns 0 or the exit
 * status after printing the error. */
static int model_load(const run_opts_t *o, run_model_t *m) {
    vlm_error_t err;
    vlm_error_clear(&err);
    memset(m, 0, sizeof *m);
    int rc = vlm_gguf_open(o->model, &m->gguf, &err);
    if (rc != VLM_OK) return fail_file(o->model, &err, rc);
    rc = vlm_tokenizer_load(m->gguf, &m->tok, &err);
    if (rc != VLM_OK) return fail_file(o->model, &err, rc);
    if (o->tokenize) return 0;

    const vlm_llama_opts_t lopts = {.prepare_flags = o->fast_order ? VLM_WEIGHT_PREPARE_FAST_ORDER : 0};
    rc = vlm_llama_load(m->gguf, &lopts, &m->llama, &err);
    if (rc != VLM_OK) return fail_file(o->model, &err, rc);
    const vlm_llama_hparams_t *hp = vlm_llama_hparams(m->llama);
    m->n_vocab = hp->n_vocab;
    m->n_embd = hp->n_embd;
    if (vlm_tokenizer_n_vocab(m->tok) > m->n_vocab)
        return fail("%s: the tokenizer has %d tokens but the model only %d rows of logits", o->model,
                    (int)vlm_tokenizer_n_vocab(m->tok), (int)m->n_vocab);
    int32_t n_ctx = o->n_ctx;
    if (n_ctx == 0) n_ctx = hp->n_ctx_train < RUN_DEFAULT_CTX ? hp->n_ctx_train : RUN_DEFAULT_CTX;
    if (n_ctx > hp->n_ctx_train)
        return fail("--ctx %d is larger than the model's context length %d", (int)n_ctx,
                    (int)hp->n_ctx_train);
    rc = vlm_kv_cache_init(&m->kv, m->llama, 1, n_ctx, o->kv_type, &err);
    if (rc != VLM_OK) return fail("KV cache: %s", err.msg);
    m->pool = vlm_pool_new(o->n_threads);
    if (!m->pool) return fail("cannot start %d threads", o->n_threads);
    rc = vlm_decoder_new(m->llama, &m->kv, m->pool, RUN_N_UBATCH, &m->dec, &err);
    if (rc != VLM_OK) return fail("decoder: %s", err.msg);

    if (o->n_images > 0) {
        rc = vlm_gguf_open(o->mmproj, &m->mm_gguf, &err);
        if (rc != VLM_OK) return fail_file(o->mmproj, &err, rc);
        rc = vlm_clip_load(m->mm_gguf, NULL, &m->clip, &err);
        if (rc != VLM_OK) return fail_file(o->mmproj, &err, rc);
        rc = vlm_projector_load(m->mm_gguf, vlm_clip_hparams(m->clip)->n_embd_out, m->n_embd,
                                &m->proj, &err);
        if (rc != VLM_OK) return fail_file(o->mmproj, &err, rc);
    }
    return 0;
}

/* ==== Images ============================================================ */

/* The projected embeddings of every image, in order. */
typedef struct run_images {
    float *embd;        /* [n_images][n_rows][n_embd] */
    int32_t n_rows;     /* rows per image */
    double decode_ms;   /* reading, decoding and preprocessing */
    double encode_ms;   /* CLIP and projector */
} run_images_t;

/* Decodes, preprocesses, encodes and projects o's images into *im. Returns
 * 0 or the exit status after printing the error. */
static int images_embed(const run_opts_t *o, run_model_t *m, run_images_t *im) {
    vlm_error_t err;
    vlm_error_clear(&err);
    memset(im, 0, sizeof *im);
    const vlm_clip_hparams_t *hp = vlm_clip_hparams(m->clip);
    vlm_preprocess_params_t pp;
    int rc = vlm_preprocess_params_init(&pp, o->preprocess, hp->image_size, hp->mean, hp->std, &err);
    if (rc != VLM_OK) return fail_file(o->mmproj, &err, rc);
    vlm_image_decode_opts_t dopts;
    vlm_preprocess_decode_opts(&pp, &dopts);

    const int n = o->n_images;
    vlm_image_f32_t *pre = calloc((size_t)n, sizeof *pre);
    const float **ptrs = calloc((size_t)n, sizeof *ptrs);
    float *feat = malloc((size_t)n * (size_t)hp->n_patches * (size_t)hp->n_embd_out * sizeof *feat);
    im->embd = malloc((size_t)n * (size_t)hp->n_patches * (size_t)m->n_embd * sizeof *im->embd);
    int status = 0;
    if (!pre || !ptrs || !feat || !im->embd) {
        status = fail("out of memory for %d images", n);
        goto done;
    }
    im->n_rows = hp->n_patches;

    double t0 = now_ms();
    for (int i = 0; i < n; i++) {
        const char *path = o->images[i];
        const char *shown = strcmp(path, "-") == 0 ? "<stdin>" : path;
        uint8_t *data = NULL;
        size_t size = 0;
        FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
        if (!f) {
            status = fail("%s: cannot open: %s", shown, strerror(errno));
            goto done;
        }
        int e = read_stream(f, &data, &size);
        if (f != stdin) fclose(f);
        if (e) {
            status = fail("%s: cannot read: %s", shown, strerror(e));
            goto done;
        }
        vlm_image_u8_t img;
        rc = vlm_image_decode(data, size, &dopts, &img, &err);
        free(data);
        if (rc != VLM_OK) {
            status = fail("%s: %s: %s", shown, vlm_strerror(rc), err.msg);
            goto done;
        }
        rc = vlm_preprocess(&pp, &img, &pre[i], &err);
        vlm_image_u8_deinit(&img);
        if (rc != VLM_OK) {
            status = fail("%s: preprocessing failed: %s", shown, err.msg);
            goto done;
        }
        ptrs[i] = pre[i].data;
    }
    im->decode_ms = now_ms() - t0;

    /* One image per encoder call, as vlmd does by default: OpenBLAS's
     * results depend on the matrix sizes, so encoding images together
     * would change their embeddings in the last bits, and the answers
     * would no longer equal the daemon's. */
    t0 = now_ms();
    for (int i = 0; i < n; i++) {
        const size_t feat_rows = (size_t)hp->n_patches;
        float *img_feat = feat + (size_t)i * feat_rows * (size_t)hp->n_embd_out;
        rc = vlm_clip_encode_ptrs(m->clip, m->pool, &ptrs[i], 1, img_feat, &err);
        if (rc != VLM_OK) {
            status = fail("image encoder: %s", err.msg);
            goto done;
        }
        rc = vlm_projector_apply(m->proj, m->pool, img_feat, hp->n_patches,
                                 im->embd + (size_t)i * feat_rows * (size_t)m->n_embd, &err);
        if (rc != VLM_OK) {
            status = fail("projector: %s", err.msg);
            goto done;
        }
    }
    im->encode_ms = now_ms() - t0;

done:
    for (int i = 0; pre && i < n; i++) vlm_image_f32_deinit(&pre[i]);
    free(pre);
    free(ptrs);
    free(feat);
    if (status) {
        free(im->embd);
        im->embd = NULL;
    }
    return status;
}

/* ==== Prompt and prefill ================================================ */

/* The tokenized prompt: one entry per segment. */
typedef struct run_prompt {
    vlm_chat_prompt_t chat;
    int32_t **ids;          /* [n_segments] token ids of text segments (NULL for images) */
    size_t *n_ids;          /* [n_segments] */
    int32_t *text_ids;      /* all text ids in order (for the JSON output) */
    size_t n_text_ids;
    int32_t n_positions;    /* total rows: text tokens plus image rows */
    int32_t n_image_rows;
} run_prompt_t;

static void prompt_free(run_prompt_t *p) {
    for (int i = 0; p->ids && i < p->chat.n_segments; i++) free(p->ids[i]);
    free(p->ids);
    free(p->n_ids);
    free(p->text_ids);
    vlm_chat_prompt_deinit(&p->chat);
    memset(p, 0, sizeof *p);
}

/* The template per the rules in the file header. */
static vlm_chat_template_t choose_template(const run_opts_t *o, const run_model_t *m) {
    if (o->template_name) return vlm_chat_template_from_name(o->template_name);
    if (o->n_images > 0) return vlm_chat_template_detect(m->gguf);
    const char *s;
    size_t n;
    if (vlm_gguf_get_str(m->gguf, "tokenizer.chat_template", &s, &n, NULL) != VLM_OK)
        return VLM_CHAT_TEMPLATE_RAW;
    vlm_chat_template_t t = vlm_chat_template_detect_text(s, n);
    return t == VLM_CHAT_TEMPLATE_UNKNOWN ? VLM_CHAT_TEMPLATE_RAW : t;
}

/* Formats and tokenizes the prompt. Returns 0 or the exit status. */
static int prompt_build(const run_opts_t *o, const run_model_t *m, int32_t rows_per_image,
                        run_prompt_t *p) {
    vlm_error_t err;
    memset(p, 0, sizeof *p);
    const vlm_chat_template_t tmpl = choose_template(o, m);
    int rc = vlm_chat_build(tmpl, o->system, o->prompt, o->n_images, &p->chat, &err);
    if (rc != VLM_OK) return fail("prompt: %s", err.msg);
    const int ns = p->chat.n_segments;
    p->ids = calloc((size_t)ns, sizeof *p->ids);
    p->n_ids = calloc((size_t)ns, sizeof *p->n_ids);
    if (!p->ids || !p->n_ids) return fail("out of memory tokenizing the prompt");
    size_t total = 0;
    for (int i = 0; i < ns; i++) {
        const vlm_chat_segment_t *seg = &p->chat.segments[i];
        if (seg->kind == VLM_CHAT_SEGMENT_IMAGE) {
            p->n_positions += rows_per_image;
            p->n_image_rows += rows_per_image;
            continue;
        }
        rc = vlm_tokenizer_encode(m->tok, seg->text, seg->text_len, seg->add_bos && !o->no_bos,
                                  true, &p->ids[i], &p->n_ids[i], &err);
        if (rc != VLM_OK) return fail("tokenizer: %s", err.msg);
        total += p->n_ids[i];
        if (total > (size_t)INT32_MAX / 2) return fail("the prompt is too long");
        p->n_positions += (int32_t)p->n_ids[i];
    }
    p->text_ids = malloc((total ? total : 1) * sizeof *p->text_ids);
    if (!p->text_ids) return fail("out of memory tokenizing the prompt");
    for (int i = 0; i < ns; i++)
        if (p->n_ids[i]) {
            memcpy(p->text_ids + p->n_text_ids, p->ids[i], p->n_ids[i] * sizeof(int32_t));
            p->n_text_ids += p->n_ids[i];
        }
    if (p->n_positions == 0) return fail("the prompt is empty: it gives no tokens");
    return 0;
}

/* Feeds n rows (tokens, or embedding rows when tokens is NULL) at
 * positions pos0.. of sequence 0. Writes the last row's logits when logits
 * is non-NULL. Returns 0 or the exit status. */
static int feed(run_model_t *m, const int32_t *tokens, const float *embd, int32_t n, int32_t pos0,
                float *logits) {
    vlm_error_t err;
    int32_t *pos = malloc((size_t)n * sizeof *pos);
    int32_t *seq = calloc((size_t)n, sizeof *seq);
    if (!pos || !seq) {
        free(pos);
        free(seq);
        return fail("out of memory feeding %d rows", (int)n);
    }
    for (int32_t i = 0; i < n; i++) pos[i] = pos0 + i;
    const int32_t last = n - 1;
    vlm_batch_t b = {
        .n = n,
        .tokens = tokens,
        .embd = embd,
        .pos = pos,
        .seq = seq,
        .n_logits = logits ? 1 : 0,
        .logits_rows = logits ? &last : NULL,
    };
    int rc = vlm_decoder_forward(m->dec, &b, logits, &err);
    free(pos);
    free(seq);
    if (rc != VLM_OK) return fail("decoder: %s", err.msg);
    return 0;
}

/* ==== Generation ======================================================== */

typedef struct run_result {
    int32_t *tokens;        /* generated ids (EOG included, as llava-cli samples it) */
    size_t n_tokens, cap_tokens;
    bytes_t text;           /* what was printed */
    const char *stop_reason;
    double prefill_ms, decode_ms;
    int32_t n_decoded;      /* tokens fed after the prompt */
} run_result_t;

static bool result_push(run_result_t *r, int32_t id) {
    if (r->n_tokens == r->cap_tokens) {
        size_t cap = r->cap_tokens ? 2 * r->cap_tokens : 64;
        int32_t *t = realloc(r->tokens, cap * sizeof *t);
        if (!t) return false;
        r->tokens = t;
        r->cap_tokens = cap;
    }
    r->tokens[r->n_tokens++] = id;
    return true;
}

/* Prefills the prompt, then generates. Returns 0 or the exit status. */
static int generate(const run_opts_t *o, run_model_t *m, const run_prompt_t *p,
                    const run_images_t *im, run_result_t *r) {
    int status = 0;
    float *logits = malloc((size_t)m->n_vocab * sizeof *logits);
    vlm_sampler_t *smp = vlm_sampler_new(&o->sampling, m->n_vocab);
    int32_t *eog = malloc((size_t)m->n_vocab * sizeof *eog);
    char *piece = NULL;
    size_t piece_cap = 256;
    piece = malloc(piece_cap);
    if (!logits || !smp || !eog || !piece) {
        status = fail("out of memory for the sampler");
        goto done;
    }
    int32_t n_eog = 0;
    const int32_t n_tok_vocab = vlm_tokenizer_n_vocab(m->tok);
    for (int32_t id = 0; id < n_tok_vocab; id++)
        if (vlm_tokenizer_is_eog(m->tok, id)) eog[n_eog++] = id;

    const int32_t n_ctx = m->kv.n_ctx;
    if (p->n_positions > n_ctx) {
        status = fail("the prompt needs %d positions but the context holds %d (see --ctx)",
                      (int)p->n_positions, (int)n_ctx);
        goto done;
    }

    /* Prefill: one forward call per segment, logits only at the very end. */
    double t0 = now_ms();
    int32_t n_past = 0;
    int last_seg = -1;
    for (int i = 0; i < p->chat.n_segments; i++)
        if (p->chat.segments[i].kind == VLM_CHAT_SEGMENT_IMAGE || p->n_ids[i] > 0) last_seg = i;
    for (int i = 0; i < p->chat.n_segments; i++) {
        const vlm_chat_segment_t *seg = &p->chat.segments[i];
        float *want = i == last_seg ? logits : NULL;
        if (seg->kind == VLM_CHAT_SEGMENT_IMAGE) {
            const float *rows = im->embd + (size_t)seg->image_index * (size_t)im->n_rows * (size_t)m->n_embd;
            status = feed(m, NULL, rows, im->n_rows, n_past, want);
            n_past += im->n_rows;
        } else if (p->n_ids[i] > 0) {
            status = feed(m, p->ids[i], NULL, (int32_t)p->n_ids[i], n_past, want);
            n_past += (int32_t)p->n_ids[i];
        }
        if (status) goto done;
    }
    r->prefill_ms = now_ms() - t0;

    if (o->dump_logits) {
        FILE *f = fopen(o->dump_logits, "wb");
        if (!f || fwrite(logits, sizeof *logits, (size_t)m->n_vocab, f) != (size_t)m->n_vocab ||
            fclose(f) != 0) {
            status = fail("%s: cannot write the logits: %s", o->dump_logits, strerror(errno));
            goto done;
        }
    }

    /* Generation settings per the rules in the file header. */
    const bool image_mode = o->n_images > 0;
    const bool print_special = image_mode || o->special;
    const bool use_stops = image_mode || p->chat.tmpl != VLM_CHAT_TEMPLATE_RAW;
    int32_t n_predict = o->n_predict;
    if (n_predict < 0) n_predict = image_mode ? RUN_IMAGE_N_PREDICT : INT32_MAX;

    /* The penalty history: llama-cli also records the prompt, llava-cli
     * only the generated tokens. */
    if (!image_mode)
        for (size_t k = 0; k < p->n_text_ids; k++) vlm_sampler_accept(smp, p->text_ids[k]);

    r->stop_reason = "n_predict";
    t0 = now_ms();
    for (int32_t step = 0; step < n_predict; step++) {
        if (o->ignore_eos)
            for (int32_t k = 0; k < n_eog; k++) logits[eog[k]] = -INFINITY;
        const int32_t id = vlm_sampler_sample(smp, logits);
        vlm_sampler_accept(smp, id);
        if (!result_push(r, id)) {
            status = fail("out of memory");
            goto done;
        }
        if (vlm_tokenizer_is_eog(m->tok, id)) {
            r->stop_reason = "eos";
            break;
        }
        int len = vlm_tokenizer_piece(m->tok, id, print_special, piece, piece_cap);
        if (len < 0) {
            char *np = realloc(piece, (size_t)-len);
            if (!np) {
                status = fail("out of memory");
                goto done;
            }
            piece = np;
            piece_cap = (size_t)-len;
            len = vlm_tokenizer_piece(m->tok, id, print_special, piece, piece_cap);
        }
        /* llava-cli and llama-cli print a piece with "%s", so a piece ends
         * at its first NUL byte (the <0x00> byte token prints nothing). */
        const size_t plen = len > 0 ? strnlen(piece, (size_t)len) : 0;
        vlm_chat_stop_t stop = VLM_CHAT_STOP_NONE;
        const char *matched = NULL;
        if (use_stops) {
            /* The answer so far with this piece, for the answer-level rules. */
            const size_t keep = r->text.len;
            if (!bytes_append(&r->text, piece, plen)) {
                status = fail("out of memory");
                goto done;
            }
            stop = vlm_chat_stop_check(p->chat.tmpl, piece, plen, r->text.data, r->text.len, &matched);
            r->text.len = keep;
        }
        if (stop == VLM_CHAT_STOP_DROP_PIECE) {
            r->stop_reason = matched;
            break;
        }
        if (!bytes_append(&r->text, piece, plen)) {
            status = fail("out of memory");
            goto done;
        }
        if (!o->json && plen) {
            fwrite(piece, 1, plen, stdout);
            fflush(stdout);
        }
        if (stop == VLM_CHAT_STOP_KEEP_PIECE) {
            r->stop_reason = matched;
            break;
        }
        if (step + 1 == n_predict) break;
        if (n_past >= n_ctx) {
            r->stop_reason = "context";
            break;
        }
        status = feed(m, &id, NULL, 1, n_past, logits);
        if (status) goto done;
        n_past++;
        r->n_decoded++;
    }
    r->decode_ms = now_ms() - t0;
    if (!o->json) {
        fputc('\n', stdout);
        fflush(stdout);
    }

done:
    free(piece);
    free(eog);
    vlm_sampler_destroy(&smp);
    free(logits);
    return status;
}

/* ==== Output ============================================================ */

static double per_s(double n, double ms) { return ms > 0 ? n * 1000.0 / ms : 0.0; }

/* Prints the --json object. Returns 0 or the exit status. */
static int print_json(const run_opts_t *o, const run_prompt_t *p, const run_images_t *im,
                      const run_result_t *r, double load_ms) {
    /* Valid UTF-8 as Python's decode("utf-8", "replace"): the golden
     * expected_text was made that way. */
    char *text = vlm_utf8_sanitize(r->text.data ? r->text.data : "", r->text.len, NULL);
    char *hex = hex_of(r->text.data ? r->text.data : "", r->text.len);
    json_t *timings = json_pack(
        "{s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:I, s:I}",
        "load_ms", load_ms,
        "image_decode_ms", im->decode_ms,
        "image_encode_ms", im->encode_ms,
        "prefill_ms", r->prefill_ms,
        "prefill_tokens_per_s", per_s(p->n_positions, r->prefill_ms),
        "decode_ms", r->decode_ms,
        "decode_tokens_per_s", per_s(r->n_decoded, r->decode_ms),
        "n_prefill", (json_int_t)p->n_positions,
        "n_decode", (json_int_t)r->n_decoded);
    json_t *root = text && hex && timings
        ? json_pack("{s:o*, s:o*, s:s, s:s, s:I, s:I, s:s, s:s, s:s, s:I, s:o}",
                    "prompt_tokens", json_ids(p->text_ids, p->n_text_ids),
                    "tokens", json_ids(r->tokens, r->n_tokens),
                    "text", text,
                    "text_hex", hex,
                    "n_image_tokens", (json_int_t)p->n_image_rows,
                    "n_prompt_positions", (json_int_t)p->n_positions,
                    "stop_reason", r->stop_reason ? r->stop_reason : "n_predict",
                    "template", vlm_chat_template_name(p->chat.tmpl),
                    "preprocess", vlm_preprocess_mode_name(o->preprocess),
                    "seed", (json_int_t)o->sampling.seed,
                    "timings", timings)
        : NULL;
    free(text);
    free(hex);
    if (!root) return fail("out of memory writing the JSON output");
    char *s = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!s) return fail("out of memory writing the JSON output");
    puts(s);
    free(s);
    fflush(stdout);
    return 0;
}

/* --tokenize: the prompt as-is, BOS per the model unless --no-bos, special
 * tokens parsed only with --special. */
static int run_tokenize(const run_opts_t *o, const run_model_t *m) {
    vlm_error_t err;
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = vlm_tokenizer_encode(m->tok, o->prompt, strlen(o->prompt), !o->no_bos, o->special, &ids,
                                  &n, &err);
    if (rc != VLM_OK) {
        free(ids);
        return fail("tokenizer: %s", err.msg);
    }
    json_t *a = json_ids(ids, n);
    free(ids);
    char *s = a ? json_dumps(a, JSON_COMPACT) : NULL;
    json_decref(a);
    if (!s) return fail("out of memory writing the token ids");
    puts(s);
    free(s);
    return 0;
}

/* ==== main ============================================================== */

int main(int argc, char **argv) {
    run_opts_t opts;
    int status = parse_args(argc, argv, &opts);
    if (status) return status == 2 ? 0 : status;

    run_model_t model;
    run_images_t images;
    run_prompt_t prompt;
    run_result_t result;
    memset(&images, 0, sizeof images);
    memset(&prompt, 0, sizeof prompt);
    memset(&result, 0, sizeof result);

    const double t0 = now_ms();
    status = model_load(&opts, &model);
    const double load_ms = now_ms() - t0;
    if (status) goto done;
    if (opts.tokenize) {
        status = run_tokenize(&opts, &model);
        goto done;
    }
    if (opts.n_images > 0 && (status = images_embed(&opts, &model, &images))) goto done;
    if ((status = prompt_build(&opts, &model, images.n_rows, &prompt))) goto done;
    if ((status = generate(&opts, &model, &prompt, &images, &result))) goto done;
    if (opts.json) status = print_json(&opts, &prompt, &images, &result, load_ms);

done:
    free(result.tokens);
    free(result.text.data);
    prompt_free(&prompt);
    free(images.embd);
    model_free(&model);
    return status;
}
