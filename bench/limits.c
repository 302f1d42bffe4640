/* bench/limits.c - measures memory bandwidth and the sgemm peak (see limits.h).
 *
 * The triad follows STREAM: a[i] = b[i] + s * c[i] on doubles, counted as 24
 * bytes moved per element (write-allocate traffic is not counted, as in
 * STREAM). Each thread first-touches and then streams its own slice, and a
 * barrier brackets every repetition so the time is that of the slowest
 * thread. The sgemm is a plain row-major cblas_sgemm on square matrices.
 */
#include "bench/limits.h"

#include <cblas.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ==== clocks, memory, statistics ======================================= */

double vlm_limits_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Reads a "Key:   N kB" line of /proc/self/status; 0 if absent. */
static size_t read_status_kb(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    size_t klen = strlen(key), kb = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, key, klen) == 0 && line[klen] == ':') {
            kb = (size_t)strtoull(line + klen + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return kb * 1024;
}

size_t vlm_limits_peak_rss(void) { return read_status_kb("VmHWM"); }
size_t vlm_limits_rss(void) { return read_status_kb("VmRSS"); }

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double vlm_limits_median(double *v, int n) {
    if (n <= 0) return 0.0;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* ==== CPU description =================================================== */

/* AMD family/model to microarchitecture, from AMD's published model ranges. */
static const char *amd_uarch(int family, int model) {
    if (family == 0x17) return model >= 0x30 ? "Zen 2" : "Zen/Zen+";
    if (family == 0x19) {
        if ((model >= 0x10 && model <= 0x1f) || (model >= 0x60 && model <= 0x7f) ||
            (model >= 0xa0 && model <= 0xaf))
            return "Zen 4";
        return "Zen 3";
    }
    if (family == 0x1a) return "Zen 5";
    return "unknown";
}

void vlm_limits_describe_cpu(vlm_limits_t *lim) {
    snprintf(lim->uarch, sizeof lim->uarch, "unknown");
    lim->cpu_model[0] = '\0';
    lim->cpu_family = -1;
    lim->cpu_model_id = -1;
    lim->has_avx512f = 0;
    int is_amd = 0, is_intel = 0;
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char line[4096];
        while (fgets(line, sizeof line, f)) {
            char *colon = strchr(line, ':');
            if (!colon) {
                if (lim->cpu_family >= 0) break; /* end of the first processor */
                continue;
            }
            char *val = colon + 1;
            while (*val == ' ' || *val == '\t') val++;
            val[strcspn(val, "\n")] = '\0';
            if (strncmp(line, "vendor_id", 9) == 0) {
                is_amd = strstr(val, "AMD") != NULL;
                is_intel = strstr(val, "Intel") != NULL;
            } else if (strncmp(line, "cpu family", 10) == 0) {
                lim->cpu_family = atoi(val);
            } else if (strncmp(line, "model name", 10) == 0) {
                snprintf(lim->cpu_model, sizeof lim->cpu_model, "%s", val);
            } else if (strncmp(line, "model", 5) == 0 && (line[5] == '\t' || line[5] == ' ')) {
                lim->cpu_model_id = atoi(val);
            } else if (strncmp(line, "flags", 5) == 0) {
                lim->has_avx512f = strstr(val, " avx512f") != NULL;
            }
        }
        fclose(f);
    }
    if (is_amd)
        snprintf(lim->uarch, sizeof lim->uarch, "%s", amd_uarch(lim->cpu_family, lim->cpu_model_id));
    else if (is_intel)
        snprintf(lim->uarch, sizeof lim->uarch, "Intel %d/%d", lim->cpu_family, lim->cpu_model_id);

    const char *core = openblas_get_corename();
    snprintf(lim->blas_core, sizeof lim->blas_core, "%s", core ? core : "?");
    const char *env = getenv("OPENBLAS_CORETYPE");
    snprintf(lim->blas_coretype_env, sizeof lim->blas_coretype_env, "%s", env ? env : "");
}

/* ==== triad ============================================================== */

typedef struct triad_ctx {
    double *a, *b, *c;          /* [n] each */
    size_t n;
    int n_threads;
    int reps;
    pthread_barrier_t barrier;
    double *times;              /* [reps], written by thread 0 */
} triad_ctx_t;

typedef struct triad_arg {
    triad_ctx_t *ctx;
    int ith;
} triad_arg_t;

static void triad_slice(const triad_ctx_t *ctx, int ith, size_t *lo, size_t *hi) {
    size_t q = ctx->n / (size_t)ctx->n_threads, r = ctx->n % (size_t)ctx->n_threads;
    size_t i = (size_t)ith;
    *lo = i * q + (i < r ? i : r);
    *hi = *lo + q + (i < r ? 1 : 0);
}

static void *triad_thread(void *p) {
    triad_arg_t *arg = p;
    triad_ctx_t *ctx = arg->ctx;
    size_t lo, hi;
    triad_slice(ctx, arg->ith, &lo, &hi);
    double *restrict a = ctx->a, *restrict b = ctx->b, *restrict c = ctx->c;
    for (size_t i = lo; i < hi; i++) { /* first touch on this thread */
        a[i] = 0.0;
        b[i] = 1.0;
        c[i] = 2.0;
    }
    const double s = 3.0;
    for (int rep = 0; rep < ctx->reps; rep++) {
        pthread_barrier_wait(&ctx->barrier);
        double t0 = vlm_limits_now();
        for (size_t i = lo; i < hi; i++) a[i] = b[i] + s * c[i];
        pthread_barrier_wait(&ctx->barrier);
        if (arg->ith == 0) ctx->times[rep] = vlm_limits_now() - t0;
    }
    return NULL;
}

int vlm_limits_measure_bandwidth(vlm_limits_t *lim, int n_threads, size_t array_mib,
                                 int reps, vlm_error_t *err) {
    if (n_threads < 1 || reps < 1)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "triad: need n_threads >= 1 and reps >= 1");
    if (array_mib == 0) array_mib = 256;
    triad_ctx_t ctx = {0};
    ctx.n = array_mib * 1024 * 1024 / sizeof(double);
    ctx.n_threads = n_threads;
    ctx.reps = reps;
    int rc = VLM_OK;
    pthread_t *tids = calloc((size_t)n_threads, sizeof *tids);
    triad_arg_t *args = calloc((size_t)n_threads, sizeof *args);
    ctx.times = calloc((size_t)reps, sizeof *ctx.times);
    ctx.a = aligned_alloc(64, ctx.n * sizeof(double));
    ctx.b = aligned_alloc(64, ctx.n * sizeof(double));
    ctx.c = aligned_alloc(64, ctx.n * sizeof(double));
    if (!tids || !args || !ctx.times || !ctx.a || !ctx.b || !ctx.c) {
        rc = vlm_error_set(err, VLM_ERR_NOMEM, "triad: cannot allocate 3 x %zu MiB", array_mib);
        goto fail_alloc;
    }
    if (pthread_barrier_init(&ctx.barrier, NULL, (unsigned)n_threads) != 0) {
        rc = vlm_error_set(err, VLM_ERR_INTERNAL, "triad: pthread_barrier_init failed");
        goto fail_alloc;
    }
    int started = 1;
    for (int t = 1; t < n_threads; t++) {
        args[t] = (triad_arg_t){&ctx, t};
        if (pthread_create(&tids[t], NULL, triad_thread, &args[t]) != 0) break;
        started++;
    }
    if (started != n_threads) {
        /* The barrier counts n_threads, so a partial start would deadlock:
         * this only happens when the system is out of threads. */
        rc = vlm_error_set(err, VLM_ERR_INTERNAL, "triad: could only start %d of %d threads",
                           started, n_threads);
        for (int t = 1; t < started; t++) pthread_cancel(tids[t]);
        for (int t = 1; t < started; t++) pthread_join(tids[t], NULL);
        goto fail_barrier;
    }
    args[0] = (triad_arg_t){&ctx, 0};
    triad_thread(&args[0]);
    for (int t = 1; t < n_threads; t++) pthread_join(tids[t], NULL);

    {
        double bytes = 3.0 * (double)sizeof(double) * (double)ctx.n;
        double *gibs = ctx.times; /* reuse: convert times to GiB/s in place */
        double best = 0.0;
        for (int r = 0; r < reps; r++) {
            gibs[r] = gibs[r] > 0 ? bytes / gibs[r] / (1024.0 * 1024.0 * 1024.0) : 0.0;
            if (gibs[r] > best) best = gibs[r];
        }
        lim->triad_gibs = best;
        lim->triad_median_gibs = vlm_limits_median(gibs, reps);
        lim->n_threads = n_threads;
    }

fail_barrier:
    pthread_barrier_destroy(&ctx.barrier);
fail_alloc:
    free(ctx.c);
    free(ctx.b);
    free(ctx.a);
    free(ctx.times);
    free(args);
    free(tids);
    return rc;
}

/* ==== sgemm ============================================================== */

int vlm_limits_measure_sgemm(vlm_limits_t *lim, int n_threads, int n, int reps,
                             vlm_error_t *err) {
    if (n_threads < 1 || reps < 1)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "sgemm: need n_threads >= 1 and reps >= 1");
    if (n <= 0) n = 2048;
    size_t nn = (size_t)n * (size_t)n;
    float *a = aligned_alloc(64, nn * sizeof(float));  /* [n][n] */
    float *b = aligned_alloc(64, nn * sizeof(float));  /* [n][n] */
    float *c = aligned_alloc(64, nn * sizeof(float));  /* [n][n] */
    double *gflops = calloc((size_t)reps, sizeof *gflops);
    int rc = VLM_OK;
    if (!a || !b || !c || !gflops) {
        rc = vlm_error_set(err, VLM_ERR_NOMEM, "sgemm: cannot allocate 3 x %d^2 floats", n);
        goto done;
    }
    uint32_t s = 12345u;
    for (size_t i = 0; i < nn; i++) {
        s = s * 1664525u + 1013904223u;
        a[i] = (float)(s >> 8) * (1.0f / 16777216.0f) - 0.5f;
        s = s * 1664525u + 1013904223u;
        b[i] = (float)(s >> 8) * (1.0f / 16777216.0f) - 0.5f;
        c[i] = 0.0f;
    }
    openblas_set_num_threads(n_threads);
    double flops = 2.0 * (double)n * (double)n * (double)n;
    double best = 0.0;
    for (int r = -1; r < reps; r++) { /* r = -1 is the warm-up */
        double t0 = vlm_limits_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n,
                    0.0f, c, n);
        double dt = vlm_limits_now() - t0;
        if (r < 0) continue;
        gflops[r] = dt > 0 ? flops / dt * 1e-9 : 0.0;
        if (gflops[r] > best) best = gflops[r];
    }
    lim->sgemm_n = n;
    lim->sgemm_gflops = best;
    lim->sgemm_median_gflops = vlm_limits_median(gflops, reps);
    lim->n_threads = n_threads;
done:
    free(gflops);
    free(c);
    free(b);
    free(a);
    return rc;
}

/* ==== both =============================================================== */

int vlm_limits_measure(vlm_limits_t *lim, int n_threads, vlm_error_t *err) {
    vlm_limits_describe_cpu(lim);
    int rc = vlm_limits_measure_bandwidth(lim, n_threads, 0, 15, err);
    if (rc != VLM_OK) return rc;
    return vlm_limits_measure_sgemm(lim, n_threads, 2048, 5, err);
}

void vlm_limits_print(const vlm_limits_t *lim, FILE *f, const char *prefix) {
    if (!prefix) prefix = "";
    fprintf(f, "%scpu: %s (family %d model %d, %s)%s\n", prefix, lim->cpu_model,
            lim->cpu_family, lim->cpu_model_id, lim->uarch,
            lim->has_avx512f ? ", AVX-512F" : "");
    fprintf(f, "%sthreads: %d\n", prefix, lim->n_threads);
    fprintf(f, "%striad bandwidth: %.1f GiB/s best, %.1f GiB/s median\n", prefix,
            lim->triad_gibs, lim->triad_median_gibs);
    fprintf(f, "%ssgemm %d^3: %.1f GFLOP/s best, %.1f GFLOP/s median (OpenBLAS core %s%s%s)\n",
            prefix, lim->sgemm_n, lim->sgemm_gflops, lim->sgemm_median_gflops, lim->blas_core,
            lim->blas_coretype_env[0] ? ", OPENBLAS_CORETYPE=" : "", lim->blas_coretype_env);
}
