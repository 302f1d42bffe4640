/* bench/bench_matmul.c - vlm_matmul speed on TinyLlama-like shapes.
 *
 * For each weight shape (n_out x n_in) and type it prints:
 *   - decode (n_tok = 1): GiB/s of weight bytes streamed per call, and that
 *     as a fraction of the triad bandwidth and of a read-only stream measured
 *     in the same run (decoding is bound by reading the weights);
 *   - prefill (n_tok = 512): GOP/s (2 * n_out * n_in * n_tok per call).
 * with 1 and 2 threads. Decode cycles through copies of the weight (160 MiB
 * in all) so that it reads from memory, as a real model's layers do, not
 * from the L3. Weights are prepared (vlm_weight_prepare: panels for
 * quantized types; nothing for float types) as the decoder does. The values
 * are random rows quantized once and repeated: speed does not depend on them.
 *
 * usage: bench_matmul [-t 1,2] [-T q4_0,q8_0,q4_k,q6_k,f16] [-s all|small]
 *                     [-p 512] [-r reps] [--raw]
 *   --raw   also time unprepared weights (ggml layout, no panels)
 *   --fast  prepare with VLM_WEIGHT_PREPARE_FAST_ORDER (not ggml's summation
 *           order, faster prefill); the default is ggml's order
 *   --sgemm prepare with VLM_WEIGHT_PREPARE_SGEMM (float weights: OpenBLAS
 *           for 16 tokens or more)
 *   -f      instead, float weights (f32, f16, bf16; -T picks among them) on
 *           2048x2048 and 5632x2048 at n_tok = 1, 16 and -p: GFLOP/s of our
 *           tinyBLAS-order kernels and of the OpenBLAS path
 *           (VLM_WEIGHT_PREPARE_SGEMM), next to the cblas_sgemm peak on
 *           2048^3 with the same threads. Weights stay in the L3 / L2 here
 *           (one copy), so n_tok = 1 measures the kernel, not memory.
 *   -m T    instead, every matmul of a TinyLlama-1.1B forward step with file
 *           type T (q4_0, q8_0 or q4_k_m mixes as llama-quantize makes them):
 *           decode tok/s and prefill tok/s of the matmuls alone
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/limits.h"
#include "core/dtype.h"
#include "core/matmul.h"
#include "core/pool.h"
#include "core/quant.h"

enum { MAX_COPIES = 64 };
#define COPIES_BYTES ((size_t)160 << 20) /* 5x the L3 */

typedef struct shape {
    const char *name;
    int64_t n_out, n_in;
} shape_t;

static const shape_t shapes[] = {
    {"attn_q/o 2048x2048", 2048, 2048},
    {"ffn_up 5632x2048", 5632, 2048},
    {"ffn_down 2048x5632", 2048, 5632},
    {"output 32000x2048", 32000, 2048},
};

typedef struct type_opt {
    const char *name;
    uint32_t type;
} type_opt_t;

static const type_opt_t types[] = {
    {"q4_0", VLM_DTYPE_Q4_0}, {"q8_0", VLM_DTYPE_Q8_0}, {"q4_k", VLM_DTYPE_Q4_K},
    {"q6_k", VLM_DTYPE_Q6_K}, {"f16", VLM_DTYPE_F16},
};

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static int prep_flags = 0; /* --fast adds VLM_WEIGHT_PREPARE_FAST_ORDER, --sgemm VLM_WEIGHT_PREPARE_SGEMM */
static float frand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) * (1.0 / 9007199254740992.0) * 2.0 - 1.0);
}

/* Read-only streaming bandwidth (sum of a large array), GiB/s, best of reps:
 * closer to what a decode matmul does than the triad. */
typedef struct read_job {
    const float *a;
    int64_t n;
    double sums[64];
} read_job_t;

static void read_slice(void *arg, int ith, int nth) {
    read_job_t *j = arg;
    long lo, hi;
    vlm_pool_range((long)j->n / 2, ith, nth, &lo, &hi);
    /* 64-bit integer adds in 8 chains: far faster than memory */
    const uint64_t *a = (const uint64_t *)j->a;
    uint64_t s[8] = {0};
    for (long i = lo; i + 8 <= hi; i += 8)
        for (int k = 0; k < 8; k++) s[k] += a[i + k];
    j->sums[ith] = (double)(s[0] ^ s[1] ^ s[2] ^ s[3] ^ s[4] ^ s[5] ^ s[6] ^ s[7]);
}

static double read_bandwidth(vlm_pool_t *pool, int reps) {
    const int64_t n = (int64_t)256 << 20 >> 2; /* 256 MiB of floats */
    float *a = malloc((size_t)n * sizeof *a);
    if (!a) return 0;
    for (int64_t i = 0; i < n; i++) a[i] = (float)(i & 7);
    read_job_t j = {.a = a, .n = n};
    double best = 0;
    for (int r = 0; r < reps; r++) {
        const double t0 = vlm_limits_now();
        vlm_pool_run(pool, read_slice, &j);
        const double dt = vlm_limits_now() - t0;
        const double gibs = (double)n * sizeof *a / dt / (1 << 30);
        if (gibs > best) best = gibs;
    }
    free(a);
    return best;
}

/* Fills w with n_out rows of type: 64 distinct quantized random rows,
 * repeated. Returns the data (caller frees). */
static uint8_t *make_weight(vlm_weight_t *w, vlm_gguf_tensor_t *t, uint32_t type, int64_t n_out, int64_t n_in) {
    const size_t rb = vlm_dtype_row_size(type, n_in);
    uint8_t *data = malloc(rb * (size_t)n_out);
    float *row = malloc((size_t)n_in * sizeof *row);
    if (!data || !row) {
        free(data);
        free(row);
        return NULL;
    }
    for (int64_t o = 0; o < n_out; o++) {
        if (o < 64) {
            for (int64_t i = 0; i < n_in; i++) row[i] = frand() * 0.05f;
            vlm_quantize_row(type, row, data + (size_t)o * rb, n_in);
        } else {
            memcpy(data + (size_t)o * rb, data + (size_t)(o % 64) * rb, rb);
        }
    }
    free(row);
    *t = (vlm_gguf_tensor_t){.name = "bench", .type = type, .n_dims = 2, .ne = {n_in, n_out, 1, 1},
                             .nbytes = rb * (size_t)n_out, .data = data};
    vlm_error_t err;
    if (vlm_weight_from_tensor(w, t, &err) != VLM_OK) {
        fprintf(stderr, "bench_matmul: %s\n", err.msg);
        free(data);
        return NULL;
    }
    return data;
}

/* Says that a matmul failed (its scratch could not be allocated) and
 * returns -1, the failed timing. */
static double matmul_failed(const char *what, int64_t n_tok) {
    fprintf(stderr, "bench_matmul: out of memory in matmul (%s, %lld tokens)\n", what, (long long)n_tok);
    return -1;
}

/* Best time of one call over reps calls (after one warm-up), seconds; -1
 * when a call fails. */
static double time_matmul(vlm_pool_t *pool, const vlm_weight_t *w, const float *x, int64_t n_tok, float *y,
                          int reps) {
    int rc = vlm_matmul(pool, w, x, n_tok, y);
    double best = 1e30;
    for (int r = 0; r < reps && rc == VLM_OK; r++) {
        const double t0 = vlm_limits_now();
        rc = vlm_matmul(pool, w, x, n_tok, y);
        const double dt = vlm_limits_now() - t0;
        if (dt < best) best = dt;
    }
    return rc == VLM_OK ? best : matmul_failed(w->name, n_tok);
}

/* Decode: one n_tok = 1 call per weight copy, round robin; the best over
 * reps rounds of the mean time per call, seconds; -1 when a call fails. */
static double time_decode(vlm_pool_t *pool, const vlm_weight_t *w, int n_copies, const float *x, float *y,
                          int reps) {
    int rc = VLM_OK;
    for (int c = 0; c < n_copies; c++) rc |= vlm_matmul(pool, &w[c], x, 1, y);
    double best = 1e30;
    const int calls = n_copies * (n_copies > 8 ? 1 : 8 / n_copies + 1);
    for (int r = 0; r < reps && rc == VLM_OK; r++) {
        const double t0 = vlm_limits_now();
        for (int i = 0; i < calls; i++) rc |= vlm_matmul(pool, &w[i % n_copies], x, 1, y);
        const double dt = (vlm_limits_now() - t0) / calls;
        if (dt < best) best = dt;
    }
    return rc == VLM_OK ? best : matmul_failed(w->name, 1);
}

/* ==== Whole-model mode: every matmul of a TinyLlama step ================ */

enum { TL_LAYERS = 22, TL_EMBD = 2048, TL_KV = 256, TL_FF = 5632, TL_VOCAB = 32000 };

typedef struct tl_model {
    vlm_weight_t w[TL_LAYERS][7]; /* q, k, v, o, gate, up, down */
    vlm_gguf_tensor_t t[TL_LAYERS][7];
    uint8_t *data[TL_LAYERS][7];
    vlm_weight_t out;
    vlm_gguf_tensor_t out_t;
    uint8_t *out_data;
    size_t bytes;                 /* prepared bytes streamed per decode step */
} tl_model_t;

/* llama-quantize's Q4_K_M rule for attn_v / ffn_down (use_more_bits). */
static int tl_more_bits(int i) { return i < TL_LAYERS / 8 || i >= 7 * TL_LAYERS / 8 || (i - TL_LAYERS / 8) % 3 == 2; }

static int tl_build(tl_model_t *m, const char *ftype) {
    static const int64_t shp[7][2] = {{TL_EMBD, TL_EMBD}, {TL_KV, TL_EMBD}, {TL_KV, TL_EMBD}, {TL_EMBD, TL_EMBD},
                                      {TL_FF, TL_EMBD},   {TL_FF, TL_EMBD}, {TL_EMBD, TL_FF}};
    memset(m, 0, sizeof *m);
    vlm_error_t err;
    size_t extra;
    for (int l = 0; l < TL_LAYERS; l++) {
        for (int k = 0; k < 7; k++) {
            uint32_t type = VLM_DTYPE_Q4_0;
            if (!strcmp(ftype, "q8_0")) type = VLM_DTYPE_Q8_0;
            else if (!strcmp(ftype, "q4_k_m")) type = (k == 2 || k == 6) && tl_more_bits(l) ? VLM_DTYPE_Q6_K : VLM_DTYPE_Q4_K;
            m->data[l][k] = make_weight(&m->w[l][k], &m->t[l][k], type, shp[k][0], shp[k][1]);
            if (!m->data[l][k] || vlm_weight_prepare(&m->w[l][k], prep_flags, &extra, &err) != VLM_OK) return -1;
            m->bytes += extra ? extra : m->t[l][k].nbytes;
        }
    }
    const uint32_t ot = !strcmp(ftype, "q8_0") ? VLM_DTYPE_Q8_0 : VLM_DTYPE_Q6_K;
    m->out_data = make_weight(&m->out, &m->out_t, ot, TL_VOCAB, TL_EMBD);
    if (!m->out_data || vlm_weight_prepare(&m->out, prep_flags, &extra, &err) != VLM_OK) return -1;
    m->bytes += extra ? extra : m->out_t.nbytes;
    return 0;
}

static void tl_free(tl_model_t *m) {
    for (int l = 0; l < TL_LAYERS; l++)
        for (int k = 0; k < 7; k++) {
            vlm_weight_release(&m->w[l][k]);
            free(m->data[l][k]);
        }
    vlm_weight_release(&m->out);
    free(m->out_data);
}

/* One forward step's matmuls for n_tok tokens (the output only for the last
 * token, as llama.cpp computes it), with Q/K/V and gate/up batched.
 * Returns VLM_OK, or VLM_ERR_NOMEM when a matmul fails. */
static int tl_step(vlm_pool_t *pool, tl_model_t *m, const float *x, const float *xff, int64_t n_tok, float **bufs) {
    int rc = VLM_OK;
    for (int l = 0; l < TL_LAYERS && rc == VLM_OK; l++) {
        const vlm_weight_t *qkv[3] = {&m->w[l][0], &m->w[l][1], &m->w[l][2]};
        float *yqkv[3] = {bufs[0], bufs[1], bufs[2]};
        rc |= vlm_matmul_multi(pool, qkv, 3, x, n_tok, yqkv);
        rc |= vlm_matmul(pool, &m->w[l][3], x, n_tok, bufs[3]);
        const vlm_weight_t *gu[2] = {&m->w[l][4], &m->w[l][5]};
        float *ygu[2] = {bufs[4], bufs[5]};
        rc |= vlm_matmul_multi(pool, gu, 2, x, n_tok, ygu);
        rc |= vlm_matmul(pool, &m->w[l][6], xff, n_tok, bufs[6]);
    }
    if (rc == VLM_OK) rc = vlm_matmul(pool, &m->out, x, 1, bufs[7]);
    return rc == VLM_OK ? VLM_OK : VLM_ERR_NOMEM;
}

static int tl_bench(const char *ftype, const int *threads, int n_threads_opts, int64_t n_prefill, int reps) {
    tl_model_t *m = malloc(sizeof *m);
    if (!m) return 1;
    printf("\n## TinyLlama-1.1B matmuls only (%s, random weights): decode step = 154 matmuls + output\n", ftype);
    if (tl_build(m, ftype) != 0) {
        fprintf(stderr, "bench_matmul: cannot build the model\n");
        return 1;
    }
    float *x = malloc((size_t)n_prefill * TL_FF * sizeof *x);
    float *bufs[8];
    for (int i = 0; i < 8; i++) bufs[i] = malloc((size_t)n_prefill * (i == 7 ? TL_VOCAB : TL_FF) * sizeof(float));
    for (int64_t i = 0; i < n_prefill * TL_FF; i++) x[i] = frand();
    int failed = 0;
    for (int ti = 0; ti < n_threads_opts; ti++) {
        vlm_pool_t *pool = vlm_pool_new(threads[ti]);
        int rc = tl_step(pool, m, x, x, 1, bufs);
        double best = 1e30;
        for (int r = 0; r < reps * 4 && rc == VLM_OK; r++) {
            const double t0 = vlm_limits_now();
            rc = tl_step(pool, m, x, x, 1, bufs);
            const double dt = vlm_limits_now() - t0;
            if (dt < best) best = dt;
        }
        double bestp = 1e30;
        for (int r = 0; r < (reps + 1) / 2 && rc == VLM_OK; r++) {
            const double t0 = vlm_limits_now();
            rc = tl_step(pool, m, x, x, n_prefill, bufs);
            const double dt = vlm_limits_now() - t0;
            if (dt < bestp) bestp = dt;
        }
        if (rc != VLM_OK) {
            fprintf(stderr, "bench_matmul: out of memory in matmul (TinyLlama step)\n");
            vlm_pool_destroy(&pool);
            failed = 1;
            break;
        }
        printf("%d thread%s: decode %.1f tok/s (%.1f GiB/s of %.0f MiB), prefill %lld tokens %.1f tok/s\n",
               threads[ti], threads[ti] > 1 ? "s" : "", 1 / best, (double)m->bytes / best / (1 << 30),
               (double)m->bytes / (1 << 20), (long long)n_prefill, (double)n_prefill / bestp);
        fflush(stdout);
        vlm_pool_destroy(&pool);
    }
    for (int i = 0; i < 8; i++) free(bufs[i]);
    free(x);
    tl_free(m);
    free(m);
    return failed;
}

/* ==== Float mode: our kernels against OpenBLAS ========================== */

/* Whether name is one of the comma-separated items of list. */
static int in_list(const char *list, const char *name) {
    const size_t n = strlen(name);
    for (const char *p = list; p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL)
        if (!strncmp(p, name, n) && (p[n] == ',' || p[n] == 0)) return 1;
    return 0;
}

static int float_bench(const char *type_list, const int *threads, int n_threads_opts, int64_t n_prefill, int reps) {
    static const type_opt_t ftypes[] = {{"f32", VLM_DTYPE_F32}, {"f16", VLM_DTYPE_F16}, {"bf16", VLM_DTYPE_BF16}};
    const int64_t toks[] = {1, 16, n_prefill};
    float *x = malloc((size_t)n_prefill * 5632 * sizeof *x);
    float *y = malloc((size_t)n_prefill * 5632 * sizeof *y);
    if (!x || !y) return 1;
    for (int64_t i = 0; i < n_prefill * 5632; i++) x[i] = frand();
    for (int ti = 0; ti < n_threads_opts; ti++) {
        const int nt = threads[ti];
        vlm_pool_t *pool = vlm_pool_new(nt);
        if (!pool) return 1;
        vlm_limits_t lim;
        vlm_error_t err;
        vlm_limits_describe_cpu(&lim);
        if (vlm_limits_measure_sgemm(&lim, nt, 2048, reps, &err) != VLM_OK) {
            fprintf(stderr, "bench_matmul: %s\n", err.msg);
            return 1;
        }
        printf("\n## %d thread%s: cblas_sgemm 2048^3 peak %.1f GFLOP/s (median %.1f)\n", nt, nt > 1 ? "s" : "",
               lim.sgemm_gflops, lim.sgemm_median_gflops);
        printf("%-20s %-5s %6s | %12s %6s | %12s %6s | %s\n", "shape", "type", "n_tok", "ours GFLOP/s", "%peak",
               "sgemm GFLOP/s", "%peak", "ours/sgemm");
        for (int si = 0; si < 2; si++) {
            const shape_t *s = &shapes[si == 0 ? 0 : 1];
            for (size_t k = 0; k < sizeof ftypes / sizeof ftypes[0]; k++) {
                if (!in_list(type_list, ftypes[k].name)) continue;
                vlm_weight_t w;
                vlm_gguf_tensor_t t;
                uint8_t *data = make_weight(&w, &t, ftypes[k].type, s->n_out, s->n_in);
                if (!data) return 1;
                for (size_t q = 0; q < sizeof toks / sizeof toks[0]; q++) {
                    const int64_t n_tok = toks[q];
                    const int r = n_tok == 1 ? reps * 20 : reps;
                    const double flop = 2.0 * (double)s->n_out * (double)s->n_in * (double)n_tok;
                    vlm_weight_release(&w);
                    const double t_ours = time_matmul(pool, &w, x, n_tok, y, r);
                    size_t extra;
                    if (vlm_weight_prepare(&w, VLM_WEIGHT_PREPARE_SGEMM, &extra, &err) != VLM_OK) {
                        fprintf(stderr, "bench_matmul: %s\n", err.msg);
                        return 1;
                    }
                    const double t_blas = time_matmul(pool, &w, x, n_tok, y, r);
                    vlm_weight_release(&w);
                    if (t_ours < 0 || t_blas < 0) return 1;
                    const double g_ours = flop / t_ours * 1e-9, g_blas = flop / t_blas * 1e-9;
                    printf("%-20s %-5s %6lld | %12.1f %5.0f%% | %12.1f %5.0f%% | %.2f%s\n", s->name, ftypes[k].name,
                           (long long)n_tok, g_ours, 100 * g_ours / lim.sgemm_gflops, g_blas,
                           100 * g_blas / lim.sgemm_gflops, g_ours / g_blas,
                           n_tok < 16 ? "  (both ours: sgemm from 16)" : "");
                    fflush(stdout);
                }
                free(data);
            }
        }
        vlm_pool_destroy(&pool);
    }
    free(x);
    free(y);
    return 0;
}

static int parse_list_int(const char *s, int *out, int max) {
    int n = 0;
    while (*s && n < max) {
        out[n++] = atoi(s);
        const char *c = strchr(s, ',');
        if (!c) break;
        s = c + 1;
    }
    return n;
}

int main(int argc, char **argv) {
    int threads[4] = {1, 2}, n_threads_opts = 2;
    const char *type_list = "q4_0,q8_0,q4_k,q6_k,f16";
    int n_shapes = 4, reps = 5, raw = 0;
    const char *model = NULL;
    int64_t n_prefill = 512;
    int float_mode = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-t") && i + 1 < argc) n_threads_opts = parse_list_int(argv[++i], threads, 4);
        else if (!strcmp(argv[i], "-T") && i + 1 < argc) type_list = argv[++i];
        else if (!strcmp(argv[i], "-s") && i + 1 < argc) n_shapes = !strcmp(argv[++i], "small") ? 1 : 4;
        else if (!strcmp(argv[i], "-p") && i + 1 < argc) n_prefill = atoll(argv[++i]);
        else if (!strcmp(argv[i], "-r") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--raw")) raw = 1;
        else if (!strcmp(argv[i], "--fast")) prep_flags |= VLM_WEIGHT_PREPARE_FAST_ORDER;
        else if (!strcmp(argv[i], "--sgemm")) prep_flags |= VLM_WEIGHT_PREPARE_SGEMM;
        else if (!strcmp(argv[i], "-f")) float_mode = 1;
        else if (!strcmp(argv[i], "-m") && i + 1 < argc) model = argv[++i];
        else {
            fprintf(stderr, "usage: %s [-t 1,2] [-T q4_0,q8_0,q4_k,q6_k,f16] [-s all|small] [-p 512] [-r reps] [--raw] [--fast] [--sgemm] [-f] [-m q4_0|q8_0|q4_k_m]\n",
                    argv[0]);
            return 2;
        }
    }
    printf("# bench_matmul: ISA %s, decode n_tok=1, prefill n_tok=%lld, best of %d, %s summation order\n",
           vlm_isa_name(vlm_isa_best()), (long long)n_prefill, reps,
           prep_flags & VLM_WEIGHT_PREPARE_FAST_ORDER ? "fast" : "ggml's");
    vlm_limits_t lim;
    vlm_limits_describe_cpu(&lim);
    printf("# cpu: %s (%s), openblas core %s\n", lim.cpu_model, lim.uarch, lim.blas_core);

    if (model) return tl_bench(model, threads, n_threads_opts, n_prefill, reps);
    if (float_mode) return float_bench(strcmp(type_list, "q4_0,q8_0,q4_k,q6_k,f16") ? type_list : "f32,f16,bf16",
                                       threads, n_threads_opts, n_prefill, reps);

    float *x = malloc((size_t)n_prefill * 5632 * sizeof *x);
    float *y = malloc((size_t)n_prefill * 32000 * sizeof *y);
    if (!x || !y) return 1;
    for (int64_t i = 0; i < n_prefill * 5632; i++) x[i] = frand();

    for (int ti = 0; ti < n_threads_opts; ti++) {
        const int nt = threads[ti];
        vlm_pool_t *pool = vlm_pool_new(nt);
        if (!pool) return 1;
        vlm_error_t err;
        if (vlm_limits_measure_bandwidth(&lim, nt, 256, 5, &err) != VLM_OK) {
            fprintf(stderr, "bench_matmul: %s\n", err.msg);
            return 1;
        }
        const double rd = read_bandwidth(pool, 5);
        printf("\n## %d thread%s: triad %.1f GiB/s (median %.1f), read-only stream %.1f GiB/s\n", nt,
               nt > 1 ? "s" : "", lim.triad_gibs, lim.triad_median_gibs, rd);
        printf("%-20s %-5s %-8s | %9s %6s %6s | %9s\n", "shape", "type", "layout", "tg GiB/s", "%triad", "%read",
               "pp GOP/s");
        for (int si = 0; si < n_shapes; si++) {
            for (size_t k = 0; k < sizeof types / sizeof types[0]; k++) {
                if (!strstr(type_list, types[k].name)) continue;
                const shape_t *s = &shapes[si];
                /* Enough copies of the weight that cycling through them for
                 * decode reads from memory, not from the 32 MiB L3. */
                const size_t one = vlm_dtype_row_size(types[k].type, s->n_in) * (size_t)s->n_out;
                int n_copies = (int)((COPIES_BYTES + one - 1) / one);
                if (n_copies > MAX_COPIES) n_copies = MAX_COPIES;
                vlm_weight_t w[MAX_COPIES];
                vlm_gguf_tensor_t t[MAX_COPIES];
                uint8_t *data[MAX_COPIES];
                for (int c = 0; c < n_copies; c++) {
                    data[c] = make_weight(&w[c], &t[c], types[k].type, s->n_out, s->n_in);
                    if (!data[c]) return 1;
                }
                for (int prepared = raw ? 0 : 1; prepared <= 1; prepared++) {
                    size_t extra = 0;
                    for (int c = 0; prepared && c < n_copies; c++) {
                        if (vlm_weight_prepare(&w[c], prep_flags, &extra, &err) != VLM_OK) {
                            fprintf(stderr, "bench_matmul: %s\n", err.msg);
                            return 1;
                        }
                    }
                    /* bytes a decode call streams: the prepared panels of quantized weights
                     * (extra), the original rows otherwise (an F16 decode reads f16 rows) */
                    const double bytes = prepared && types[k].type != VLM_DTYPE_F16 ? (double)extra
                                                                                    : (double)t[0].nbytes;
                    const double t1 = time_decode(pool, w, n_copies, x, y, reps);
                    const double gibs = bytes / t1 / (1 << 30);
                    const double tp = time_matmul(pool, &w[0], x, n_prefill, y, reps);
                    if (t1 < 0 || tp < 0) return 1;
                    const double gops = 2.0 * (double)s->n_out * (double)s->n_in * (double)n_prefill / tp * 1e-9;
                    printf("%-20s %-5s %-8s | %9.1f %5.0f%% %5.0f%% | %9.1f\n", s->name, types[k].name,
                           prepared ? "prepared" : "ggml", gibs, 100 * gibs / lim.triad_gibs, 100 * gibs / rd, gops);
                    fflush(stdout);
                    for (int c = 0; c < n_copies; c++) vlm_weight_release(&w[c]);
                }
                for (int c = 0; c < n_copies; c++) free(data[c]);
            }
        }
        vlm_pool_destroy(&pool);
    }
    free(x);
    free(y);
    return 0;
}
