/* bench/bench_text.c - text decoder speed and memory, as fractions of this
 * machine's limits.
 *
 * For each model file: prompt processing of -p tokens in one batch (tokens/s
 * and GFLOP/s against the OpenBLAS sgemm peak), generation of -n tokens one
 * at a time from an empty cache (tokens/s and GiB/s of weights streamed
 * against the triad bandwidth), and the peak RSS against file size plus KV
 * cache. It measures what llama-bench's pp512/tg128 measure, the same way
 * (random tokens, a short warm-up, the cache cleared before each run, logits
 * of the last prompt row only), so the two can be compared on the same file.
 *
 * Each model runs in a forked child so its peak RSS is its own, and the
 * limits are measured before and after the models (the machine drifts);
 * fractions use the mean of the two.
 *
 *   bench_text [-m FILE]... [--models-dir DIR] [-t THREADS] [-p N] [-n N] [-r REPS]
 *              [--kv f16|f32] [--prepare FLAGS] [--no-limits] [-o table|tsv]
 *
 * Without -m it runs the standard set from --models-dir (default
 * $VLM_MODELS_DIR, else /work/models): tinyllama-q4_0, tinyllama-q8_0,
 * tinyllama-q4_k_m and llava7b-q4_k_m .gguf, skipping files that are absent
 * (bench/README.md shows how make-test-model writes them).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench/limits.h"
#include "core/dtype.h"
#include "core/gguf.h"
#include "core/pool.h"
#include "text/llama.h"

#define MAX_REPS 32
#define MAX_MODELS 32

typedef struct bench_opts {
    int n_threads, n_prompt, n_gen, reps;
    int prepare_flags;         /* vlm_llama_opts_t.prepare_flags (VLM_WEIGHT_PREPARE_*) */
    uint32_t kv_type;
    bool limits;
    bool tsv;
} bench_opts_t;

/* What a child reports back through its pipe. */
typedef struct model_result {
    int rc;
    char err[512];
    int reps;
    double pp_tps[MAX_REPS];   /* prompt tokens per second, per repetition */
    double tg_tps[MAX_REPS];   /* generated tokens per second, per repetition */
    double load_s;
    double pp_flops;           /* floating-point operations of one prompt run */
    size_t tg_weight_bytes;    /* matmul weight bytes read per generated token */
    size_t file_bytes;
    size_t model_bytes;        /* vlm_llama_weight_bytes */
    size_t kv_bytes;
    size_t peak_rss;
    char desc[64];             /* "Q4_K_M 22L 2048" */
} model_result_t;

/* ==== one model, in the child ============================================ */

static const char *ftype_name(uint32_t ft) {
    switch (ft) {
    case 0: return "F32";
    case 1: return "F16";
    case 2: return "Q4_0";
    case 3: return "Q4_1";
    case 7: return "Q8_0";
    case 8: return "Q5_0";
    case 9: return "Q5_1";
    case 14: return "Q4_K_S";
    case 15: return "Q4_K_M";
    case 16: return "Q5_K_S";
    case 17: return "Q5_K_M";
    case 18: return "Q6_K";
    case 32: return "BF16";
    default: return "?";
    }
}

static uint32_t rng_next(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*s >> 33);
}

/* Sums the bytes of the matmul weights one decode step reads: every 2-D
 * tensor of the blocks, and the output matrix (token_embd when tied). */
static size_t decode_weight_bytes(const vlm_gguf_t *g, bool tied) {
    size_t sum = 0;
    for (size_t i = 0; i < vlm_gguf_n_tensors(g); i++) {
        const vlm_gguf_tensor_t *t = vlm_gguf_tensor_at(g, i);
        if ((!strncmp(t->name, "blk.", 4) && t->n_dims >= 2) || !strcmp(t->name, "output.weight") ||
            (tied && !strcmp(t->name, "token_embd.weight")))
            sum += (size_t)t->nbytes;
    }
    return sum;
}

/* Multiply-adds x 2 of one prompt of n tokens: the block matmuls for every
 * row, causal attention (QK^T and PV over positions 0..i), and the output
 * matrix for the last row only. */
static double prompt_flops(const vlm_llama_hparams_t *hp, int n) {
    double q = (double)hp->n_head * hp->head_dim, kv = (double)hp->n_head_kv * hp->head_dim;
    double per_layer = (double)hp->n_embd * (q + 2.0 * kv) + q * hp->n_embd + 3.0 * hp->n_embd * (double)hp->n_ff;
    double attn = 2.0 * 2.0 * q * ((double)n * (n + 1) / 2.0);
    return hp->n_layer * (2.0 * n * per_layer + attn) + 2.0 * hp->n_embd * (double)hp->n_vocab;
}

static int run_model(const char *path, const bench_opts_t *o, model_result_t *r) {
    vlm_error_t err = {0};
    vlm_gguf_t *g = NULL;
    vlm_llama_t *m = NULL;
    vlm_kv_cache_t kv = {0};
    vlm_pool_t *pool = NULL;
    vlm_decoder_t *d = NULL;
    int32_t *tok = NULL, *pos = NULL, *seq = NULL;
    float *logits = NULL;
    int rc;

    struct stat st;
    r->file_bytes = stat(path, &st) == 0 ? (size_t)st.st_size : 0;
    double t0 = vlm_limits_now();
    if ((rc = vlm_gguf_open(path, &g, &err)) != VLM_OK) goto done;
    vlm_llama_opts_t lo = {.prepare_flags = o->prepare_flags};
    if ((rc = vlm_llama_load(g, &lo, &m, &err)) != VLM_OK) goto done;
    const vlm_llama_hparams_t *hp = vlm_llama_hparams(m);
    int n_ctx = o->n_prompt + o->n_gen;
    if (n_ctx > hp->n_ctx_train) n_ctx = hp->n_ctx_train;
    if ((rc = vlm_kv_cache_init(&kv, m, 1, n_ctx, o->kv_type, &err)) != VLM_OK) goto done;
    pool = vlm_pool_new(o->n_threads);
    if (!pool) { rc = vlm_error_set(&err, VLM_ERR_NOMEM, "cannot start %d threads", o->n_threads); goto done; }
    int n_batch = o->n_prompt > 0 ? o->n_prompt : 1;
    if (n_batch > 512) n_batch = 512; /* llama-bench's default ubatch */
    if ((rc = vlm_decoder_new(m, &kv, pool, n_batch, &d, &err)) != VLM_OK) goto done;
    r->load_s = vlm_limits_now() - t0;
    r->model_bytes = vlm_llama_weight_bytes(m);
    r->kv_bytes = vlm_kv_cache_bytes(&kv);
    r->tg_weight_bytes = decode_weight_bytes(g, hp->tied_output);
    r->pp_flops = prompt_flops(hp, o->n_prompt);
    snprintf(r->desc, sizeof r->desc, "%s", ftype_name(hp->ftype_hint));

    int n_max = o->n_prompt > 1 ? o->n_prompt : 1;
    tok = malloc((size_t)n_max * sizeof *tok);
    pos = malloc((size_t)n_max * sizeof *pos);
    seq = calloc((size_t)n_max, sizeof *seq);
    logits = malloc((size_t)hp->n_vocab * sizeof *logits);
    if (!tok || !pos || !seq || !logits) { rc = vlm_error_set(&err, VLM_ERR_NOMEM, "out of memory"); goto done; }
    uint64_t rs = 42;
    for (int i = 0; i < n_max; i++) pos[i] = i;

    /* Warm-up as llama-bench does: a short prompt and one generated token. */
    {
        int nw = o->n_prompt < 32 ? o->n_prompt : 32;
        if (nw < 1) nw = 1;
        for (int i = 0; i < nw; i++) tok[i] = (int32_t)(rng_next(&rs) % (uint32_t)hp->n_vocab);
        int32_t last = nw - 1;
        vlm_batch_t b = {.n = nw, .tokens = tok, .pos = pos, .seq = seq, .n_logits = 1, .logits_rows = &last};
        if ((rc = vlm_decoder_forward(d, &b, logits, &err)) != VLM_OK) goto done;
        vlm_kv_cache_seq_clear(&kv, 0);
    }

    r->reps = o->reps;
    for (int rep = 0; rep < o->reps; rep++) {
        if (o->n_prompt > 0) {
            vlm_kv_cache_seq_clear(&kv, 0);
            tok[0] = 1; /* BOS, as llama-bench */
            for (int i = 1; i < o->n_prompt; i++) tok[i] = (int32_t)(rng_next(&rs) % (uint32_t)hp->n_vocab);
            int32_t last = o->n_prompt - 1;
            vlm_batch_t b = {.n = o->n_prompt, .tokens = tok, .pos = pos, .seq = seq, .n_logits = 1,
                             .logits_rows = &last};
            double t1 = vlm_limits_now();
            if ((rc = vlm_decoder_forward(d, &b, logits, &err)) != VLM_OK) goto done;
            r->pp_tps[rep] = o->n_prompt / (vlm_limits_now() - t1);
        }
        if (o->n_gen > 0) {
            vlm_kv_cache_seq_clear(&kv, 0);
            int32_t t = 1, row = 0, s0 = 0;
            double t1 = vlm_limits_now();
            for (int i = 0; i < o->n_gen; i++) {
                int32_t p = i;
                vlm_batch_t b = {.n = 1, .tokens = &t, .pos = &p, .seq = &s0, .n_logits = 1, .logits_rows = &row};
                if ((rc = vlm_decoder_forward(d, &b, logits, &err)) != VLM_OK) goto done;
                t = (int32_t)(rng_next(&rs) % (uint32_t)hp->n_vocab);
            }
            r->tg_tps[rep] = o->n_gen / (vlm_limits_now() - t1);
        }
    }
    rc = VLM_OK;
done:
    r->rc = rc;
    if (rc != VLM_OK) snprintf(r->err, sizeof r->err, "%s", err.msg[0] ? err.msg : vlm_strerror(rc));
    r->peak_rss = vlm_limits_peak_rss();
    free(logits);
    free(seq);
    free(pos);
    free(tok);
    vlm_decoder_destroy(&d);
    vlm_pool_destroy(&pool);
    vlm_kv_cache_deinit(&kv);
    vlm_llama_destroy(&m);
    vlm_gguf_destroy(&g);
    return rc;
}

/* ==== children ============================================================ */

static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_all(int fd, void *buf, size_t n) {
    char *p = buf;
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

typedef enum job_kind { JOB_MODEL, JOB_LIMITS } job_kind_t;

/* Runs one model (or the limits) in a child process and copies its result
 * back, so each model's peak RSS is measured alone. */
static int run_in_child(job_kind_t kind, const char *path, const bench_opts_t *o, void *out, size_t out_size) {
    int fds[2];
    if (pipe(fds) != 0) return -1;
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) { close(fds[0]); close(fds[1]); return -1; }
    if (pid == 0) {
        close(fds[0]);
        if (kind == JOB_MODEL) {
            model_result_t r;
            memset(&r, 0, sizeof r);
            run_model(path, o, &r);
            _exit(write_all(fds[1], &r, sizeof r) == 0 ? 0 : 1);
        } else {
            vlm_limits_t lim;
            memset(&lim, 0, sizeof lim);
            vlm_error_t err = {0};
            int rc = vlm_limits_measure(&lim, o->n_threads, &err);
            if (rc != VLM_OK) fprintf(stderr, "bench_text: limits: %s\n", err.msg);
            _exit(rc == VLM_OK && write_all(fds[1], &lim, sizeof lim) == 0 ? 0 : 1);
        }
    }
    close(fds[1]);
    int rr = read_all(fds[0], out, out_size);
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    if (rr != 0) {
        if (WIFSIGNALED(status))
            fprintf(stderr, "bench_text: child for %s died with signal %d\n", path ? path : "limits", WTERMSIG(status));
        return -1;
    }
    return 0;
}

/* ==== report ============================================================== */

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

static void usage(FILE *f) {
    fprintf(f, "usage: bench_text [-m FILE]... [--models-dir DIR] [-t THREADS] [-p N] [-n N] [-r REPS]\n"
               "                  [--kv f16|f32] [--prepare FLAGS] [--no-limits] [-o table|tsv]\n"
               "  -m FILE         a text GGUF (repeatable); default: the standard set in --models-dir\n"
               "  --models-dir    where the standard set lives (default $VLM_MODELS_DIR or /work/models)\n"
               "  -t THREADS      threads (default 2)\n"
               "  -p N            prompt tokens per run (default 512; 0 skips)\n"
               "  -n N            generated tokens per run (default 128; 0 skips)\n"
               "  -r REPS         repetitions, medians reported (default 3)\n"
               "  --kv f16|f32    KV cache type (default f16, as llama.cpp)\n"
               "  --prepare FLAGS load-time weight preparation flags (VLM_WEIGHT_PREPARE_*, default 0)\n"
               "  --no-limits     do not measure bandwidth and sgemm peak\n"
               "  -o tsv          one tab-separated line per model instead of the table\n");
}

int main(int argc, char **argv) {
    bench_opts_t o = {.n_threads = 2, .n_prompt = 512, .n_gen = 128, .reps = 3, .kv_type = VLM_DTYPE_F16,
                      .limits = true};
    const char *models[MAX_MODELS];
    int n_models = 0;
    const char *dir = getenv("VLM_MODELS_DIR");
    if (!dir || !*dir) dir = "/work/models";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-m") && v) {
            if (n_models == MAX_MODELS) { fprintf(stderr, "bench_text: at most %d models\n", MAX_MODELS); return 2; }
            models[n_models++] = argv[++i];
        }
        else if (!strcmp(a, "--models-dir") && v) dir = argv[++i];
        else if (!strcmp(a, "-t") && v) o.n_threads = atoi(argv[++i]);
        else if (!strcmp(a, "-p") && v) o.n_prompt = atoi(argv[++i]);
        else if (!strcmp(a, "-n") && v) o.n_gen = atoi(argv[++i]);
        else if (!strcmp(a, "-r") && v) o.reps = atoi(argv[++i]);
        else if (!strcmp(a, "--kv") && v) {
            const char *k = argv[++i];
            if (!strcmp(k, "f16")) o.kv_type = VLM_DTYPE_F16;
            else if (!strcmp(k, "f32")) o.kv_type = VLM_DTYPE_F32;
            else { fprintf(stderr, "bench_text: --kv takes f16 or f32\n"); return 2; }
        }
        else if (!strcmp(a, "--prepare") && v) o.prepare_flags = atoi(argv[++i]);
        else if (!strcmp(a, "--no-limits")) o.limits = false;
        else if (!strcmp(a, "-o") && v) o.tsv = !strcmp(argv[++i], "tsv");
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else { fprintf(stderr, "bench_text: unknown or incomplete option '%s'\n", a); usage(stderr); return 2; }
    }
    if (o.n_threads < 1 || o.n_prompt < 0 || o.n_gen < 0 || o.reps < 1 || o.reps > MAX_REPS ||
        (o.n_prompt == 0 && o.n_gen == 0)) {
        fprintf(stderr, "bench_text: need -t >= 1, -p/-n >= 0 (not both 0) and 1 <= -r <= %d\n", MAX_REPS);
        return 2;
    }
    static char std_paths[4][4096];
    if (n_models == 0) {
        static const char *std_set[] = {"tinyllama-q4_0.gguf", "tinyllama-q8_0.gguf", "tinyllama-q4_k_m.gguf",
                                        "llava7b-q4_k_m.gguf"};
        for (int i = 0; i < 4; i++) {
            snprintf(std_paths[i], sizeof std_paths[i], "%s/%s", dir, std_set[i]);
            if (access(std_paths[i], R_OK) == 0) models[n_models++] = std_paths[i];
            else fprintf(stderr, "bench_text: skipping %s (absent)\n", std_paths[i]);
        }
        if (n_models == 0) { fprintf(stderr, "bench_text: no models (see bench/README.md)\n"); return 1; }
    }

    vlm_limits_t before = {0}, after = {0};
    bool have_limits = false;
    if (o.limits) {
        have_limits = run_in_child(JOB_LIMITS, NULL, &o, &before, sizeof before) == 0;
        if (!have_limits) fprintf(stderr, "bench_text: could not measure the limits\n");
    }

    model_result_t *res = calloc((size_t)n_models, sizeof *res);
    if (!res) return 1;
    for (int i = 0; i < n_models; i++) {
        if (run_in_child(JOB_MODEL, models[i], &o, &res[i], sizeof res[i]) != 0) {
            res[i].rc = VLM_ERR_INTERNAL;
            snprintf(res[i].err, sizeof res[i].err, "the benchmark process failed");
        }
        if (res[i].rc != VLM_OK) fprintf(stderr, "bench_text: %s: %s\n", models[i], res[i].err);
    }
    if (have_limits && run_in_child(JOB_LIMITS, NULL, &o, &after, sizeof after) != 0) after = before;
    double bw = have_limits ? 0.5 * (before.triad_gibs + after.triad_gibs) : 0.0;
    double peak = have_limits ? 0.5 * (before.sgemm_gflops + after.sgemm_gflops) : 0.0;

    if (!o.tsv) {
        if (have_limits) {
            printf("# %s, %s, %d threads, OpenBLAS core %s", before.cpu_model, before.uarch, o.n_threads,
                   before.blas_core);
            if (before.blas_coretype_env[0]) printf(" (OPENBLAS_CORETYPE=%s)", before.blas_coretype_env);
            printf("\n");
            printf("# limits before/after: triad %.1f / %.1f GiB/s, sgemm %.0f / %.0f GFLOP/s; fractions use the means\n",
                   before.triad_gibs, after.triad_gibs, before.sgemm_gflops, after.sgemm_gflops);
        }
        printf("# pp%d: one batch of %d tokens; tg%d: %d single-token steps from an empty cache; medians of %d runs\n",
               o.n_prompt, o.n_prompt, o.n_gen, o.n_gen, o.reps);
        printf("%-26s %-7s %9s | %9s %9s %6s | %9s %8s %6s | %9s %8s %9s\n", "model", "type", "file MiB",
               "pp t/s", "GFLOP/s", "%peak", "tg t/s", "GiB/s", "%bw", "RSS MiB", "KV MiB", "RSS/need");
    } else {
        printf("model\ttype\tfile_bytes\tpp_tps\tpp_gflops\tpp_frac_peak\ttg_tps\ttg_gibs\ttg_frac_bw\tpeak_rss\tkv_bytes\ttriad_gibs\tsgemm_gflops\n");
    }
    int failures = 0;
    for (int i = 0; i < n_models; i++) {
        model_result_t *r = &res[i];
        if (r->rc != VLM_OK) {
            failures++;
            if (!o.tsv) printf("%-26s failed: %s\n", base_name(models[i]), r->err);
            continue;
        }
        double pp = o.n_prompt > 0 ? vlm_limits_median(r->pp_tps, r->reps) : 0.0;
        double tg = o.n_gen > 0 ? vlm_limits_median(r->tg_tps, r->reps) : 0.0;
        double gflops = pp > 0 ? r->pp_flops * pp / o.n_prompt * 1e-9 : 0.0;
        double gibs = tg * (double)r->tg_weight_bytes / (1024.0 * 1024.0 * 1024.0);
        double need = (double)r->file_bytes + (double)r->kv_bytes;
        if (o.tsv) {
            printf("%s\t%s\t%zu\t%.3f\t%.2f\t%.4f\t%.3f\t%.3f\t%.4f\t%zu\t%zu\t%.2f\t%.2f\n", base_name(models[i]),
                   r->desc, r->file_bytes, pp, gflops, peak > 0 ? gflops / peak : 0.0, tg, gibs,
                   bw > 0 ? gibs / bw : 0.0, r->peak_rss, r->kv_bytes, bw, peak);
            continue;
        }
        char ppf[16] = "-", tgf[16] = "-";
        if (peak > 0 && pp > 0) snprintf(ppf, sizeof ppf, "%.0f%%", 100.0 * gflops / peak);
        if (bw > 0 && tg > 0) snprintf(tgf, sizeof tgf, "%.0f%%", 100.0 * gibs / bw);
        printf("%-26s %-7s %9.1f | %9.2f %9.1f %6s | %9.2f %8.1f %6s | %9.1f %8.1f %9.2f\n", base_name(models[i]),
               r->desc, (double)r->file_bytes / 1048576.0, pp, gflops, ppf, tg, gibs, tgf,
               (double)r->peak_rss / 1048576.0, (double)r->kv_bytes / 1048576.0,
               need > 0 ? (double)r->peak_rss / need : 0.0);
    }
    free(res);
    return failures ? 1 : 0;
}
