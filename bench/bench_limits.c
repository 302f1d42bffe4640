/* bench/bench_limits.c - prints this machine's limits: triad bandwidth,
 * OpenBLAS sgemm peak, the kernel set OpenBLAS picked and the CPU family.
 *
 * The other benches measure the same limits in their own run and print
 * their figures as fractions of them; this program shows the limits alone,
 * for example to compare hosts or to see what OPENBLAS_CORETYPE changes.
 *
 *   bench_limits [-t THREADS] [--array-mib MIB] [--reps N] [--sgemm-n N]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/limits.h"

static void usage(FILE *f) {
    fprintf(f, "usage: bench_limits [-t THREADS] [--array-mib MIB] [--reps N] [--sgemm-n N]\n"
               "  -t THREADS     threads for both measurements (default 2)\n"
               "  --array-mib    size of each of the 3 triad arrays (default 256)\n"
               "  --reps N       triad repetitions (default 20; sgemm runs N/4, at least 3)\n"
               "  --sgemm-n N    sgemm size (default 2048)\n");
}

int main(int argc, char **argv) {
    int n_threads = 2, reps = 20, sgemm_n = 2048;
    long array_mib = 256;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if ((!strcmp(a, "-t") || !strcmp(a, "--threads")) && v) n_threads = atoi(argv[++i]);
        else if (!strcmp(a, "--array-mib") && v) array_mib = atol(argv[++i]);
        else if (!strcmp(a, "--reps") && v) reps = atoi(argv[++i]);
        else if (!strcmp(a, "--sgemm-n") && v) sgemm_n = atoi(argv[++i]);
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else { fprintf(stderr, "bench_limits: unknown or incomplete option '%s'\n", a); usage(stderr); return 2; }
    }
    if (n_threads < 1 || reps < 1 || array_mib < 1 || sgemm_n < 16) {
        fprintf(stderr, "bench_limits: threads, reps, array size and sgemm size must be positive\n");
        return 2;
    }

    vlm_limits_t lim = {0};
    vlm_error_t err = {0};
    vlm_limits_describe_cpu(&lim);
    if (vlm_limits_measure_bandwidth(&lim, n_threads, (size_t)array_mib, reps, &err) != VLM_OK ||
        vlm_limits_measure_sgemm(&lim, n_threads, sgemm_n, reps / 4 < 3 ? 3 : reps / 4, &err) != VLM_OK) {
        fprintf(stderr, "bench_limits: %s\n", err.msg);
        return 1;
    }

    printf("%-22s %s\n", "cpu", lim.cpu_model);
    printf("%-22s %s (family %d, model %d)%s\n", "microarchitecture", lim.uarch,
           lim.cpu_family, lim.cpu_model_id, lim.has_avx512f ? ", AVX-512F" : "");
    printf("%-22s %d\n", "threads", n_threads);
    printf("%-22s %8.1f GiB/s best  %8.1f median  (3 x %ld MiB arrays, %d reps)\n",
           "triad bandwidth", lim.triad_gibs, lim.triad_median_gibs, array_mib, reps);
    printf("%-22s %8.1f GFLOP/s best %8.1f median  (%d^3)\n", "sgemm peak",
           lim.sgemm_gflops, lim.sgemm_median_gflops, sgemm_n);
    printf("%-22s %s\n", "openblas core", lim.blas_core);
    printf("%-22s %s\n", "OPENBLAS_CORETYPE", lim.blas_coretype_env[0] ? lim.blas_coretype_env : "(unset)");
    if (lim.has_avx512f && strstr(lim.blas_core, "Haswell"))
        printf("note: this CPU has AVX-512F but OpenBLAS runs its %s kernels%s; "
               "OPENBLAS_CORETYPE=SkylakeX may raise the sgemm peak\n", lim.blas_core,
               lim.blas_coretype_env[0] ? " (forced by OPENBLAS_CORETYPE)" : "");
    return 0;
}
