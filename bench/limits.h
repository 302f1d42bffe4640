/* bench/limits.h - this machine's physical limits, measured in the same run.
 *
 * The machines vlmd is benchmarked on vary by up to 2x between hosts and
 * drift by 30-40% over minutes, so an absolute figure means little on its
 * own. Every benchmark therefore first measures the limits that bound it,
 * memory bandwidth (a STREAM-like triad) and the OpenBLAS sgemm peak, and
 * then prints its own figures as fractions of them. The CPU family (Zen 4,
 * Zen 5, ...) and the kernel set OpenBLAS picked are reported too, because
 * they explain most of the differences between hosts.
 */
#ifndef VLM_BENCH_LIMITS_H
#define VLM_BENCH_LIMITS_H

#include <stddef.h>
#include <stdio.h>

#include "core/error.h"

typedef struct vlm_limits {
    int n_threads;             /* threads used for both measurements */
    double triad_gibs;         /* best triad bandwidth, GiB/s (3 x 8 bytes per element) */
    double triad_median_gibs;  /* median over the repetitions */
    int sgemm_n;               /* matrix size of the sgemm measurement */
    double sgemm_gflops;       /* best n^3 cblas_sgemm, GFLOP/s (2 n^3 flops) */
    double sgemm_median_gflops;
    char blas_core[64];        /* openblas_get_corename(): "Haswell", "SkylakeX", "Zen", ... */
    char blas_coretype_env[64];/* OPENBLAS_CORETYPE at start-up, "" if unset */
    char cpu_model[128];       /* /proc/cpuinfo "model name" */
    int cpu_family;            /* /proc/cpuinfo "cpu family" (decimal) */
    int cpu_model_id;          /* /proc/cpuinfo "model" */
    char uarch[32];            /* "Zen 5", "Zen 4", "Zen 3", ... or "unknown" */
    int has_avx512f;           /* 1 if the CPU reports AVX-512F */
} vlm_limits_t;

/* Fills lim with the CPU description only (no measurement, instant). */
void vlm_limits_describe_cpu(vlm_limits_t *lim);

/* Measures the triad bandwidth with n_threads threads on arrays of
 * array_mib MiB each (3 arrays; use 0 for the default, 256 MiB, far larger
 * than any L3 here), best and median of reps repetitions. Returns VLM_OK or
 * VLM_ERR_NOMEM / VLM_ERR_INTERNAL with err filled. */
int vlm_limits_measure_bandwidth(vlm_limits_t *lim, int n_threads, size_t array_mib,
                                 int reps, vlm_error_t *err);

/* Measures cblas_sgemm on n x n x n (n = 2048 when 0) with OpenBLAS set to
 * n_threads threads, best and median of reps runs after one warm-up. */
int vlm_limits_measure_sgemm(vlm_limits_t *lim, int n_threads, int n, int reps,
                             vlm_error_t *err);

/* Describes the CPU and measures both limits with defaults. */
int vlm_limits_measure(vlm_limits_t *lim, int n_threads, vlm_error_t *err);

/* Prints the limits as a small block of "key: value" lines, each prefixed
 * with prefix (for example "# "), to f. */
void vlm_limits_print(const vlm_limits_t *lim, FILE *f, const char *prefix);

/* Monotonic wall clock in seconds. */
double vlm_limits_now(void);

/* Peak resident set size of this process so far, in bytes (VmHWM). */
size_t vlm_limits_peak_rss(void);

/* Current resident set size in bytes (VmRSS). */
size_t vlm_limits_rss(void);

/* Median of n doubles (sorts v in place); 0 when n is 0. */
double vlm_limits_median(double *v, int n);

#endif
