/* bench/bench_clip.c - CLIP encoder + LLaVA projector speed at ViT-L/14-336.
 *
 * Writes (once) a random-weight mmproj with LLaVA-1.5-7B's vision shapes:
 * image 336, patch 14, width 1024, 24 stored layers (23 run, the llama.cpp
 * quirk), 16 heads, FFN 4096, 576 patches, F16 weights, projector
 * 1024 -> 4096 -> 4096. Random values suffice for timing; to keep the
 * writer's memory small every tensor of a kind points at the same random
 * buffer. Then it encodes one image several times and reports ms/image,
 * GFLOP/s (2 FLOPs per multiply-add of every GEMM) and the fraction of the
 * OpenBLAS sgemm peak (2048^3, same thread count), plus a batch of images,
 * the load time, the f32 copies' size and the peak RSS. The host's speed
 * drifts by tens of percent within seconds (shared cores, clocks), so a
 * 2048^3 sgemm is timed right before every timed encode and the fraction
 * compares best with best and median with median of these paired runs.
 *
 *   bench_clip [-t THREADS] [--reps N] [--batch N] [--mmproj FILE] [--out FILE] [--no-pool] [--keep-f16]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cblas.h>

#include "bench/limits.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/gguf.h"
#include "core/gguf_write.h"
#include "core/pool.h"
#include "projector/projector.h"
#include "vision/clip.h"

enum { IMG = 336, PATCH = 14, E = 1024, F = 4096, LAYERS = 24, HEADS = 16, TEXT = 4096 };

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static float frand(void) { /* uniform in [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) * (1.0 / (1ull << 23))) - 1.0f;
}

static void fill_f16(uint16_t *dst, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) dst[i] = vlm_fp32_to_fp16(frand() * scale);
}

static void fill_f32(float *dst, size_t n, float scale, float offset) {
    for (size_t i = 0; i < n; i++) dst[i] = offset + frand() * scale;
}

/* Writes the random ViT-L/14-336 mmproj to path. */
static int write_mmproj(const char *path, vlm_error_t *err) {
    const int n_pos = (IMG / PATCH) * (IMG / PATCH) + 1;
    int rc = VLM_ERR_NOMEM;
    vlm_gguf_writer_t *w = vlm_gguf_writer_new();
    uint16_t *big = malloc((size_t)F * F * 2);          /* shared by every 2-D weight */
    uint16_t *patch = malloc((size_t)E * 3 * PATCH * PATCH * 2);
    uint16_t *pos = malloc((size_t)E * n_pos * 2);
    float *ones = malloc((size_t)F * 4), *bias = malloc((size_t)F * 4), *cls = malloc((size_t)E * 4);
    if (!w || !big || !patch || !pos || !ones || !bias || !cls) goto done;
    fill_f16(big, (size_t)F * F, 0.03f);
    fill_f16(patch, (size_t)E * 3 * PATCH * PATCH, 0.05f);
    fill_f16(pos, (size_t)E * n_pos, 0.1f);
    fill_f32(ones, F, 0.1f, 1.0f);
    fill_f32(bias, F, 0.02f, 0.0f);
    fill_f32(cls, E, 0.1f, 0.0f);

    const float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
    const float stdv[3] = {0.26862954f, 0.26130258f, 0.27577711f};
    if ((rc = vlm_gguf_writer_set_str(w, "general.architecture", "clip")) ||
        (rc = vlm_gguf_writer_set_str(w, "general.name", "bench-vit-l-14-336")) ||
        (rc = vlm_gguf_writer_set_bool(w, "clip.has_text_encoder", false)) ||
        (rc = vlm_gguf_writer_set_bool(w, "clip.has_vision_encoder", true)) ||
        (rc = vlm_gguf_writer_set_bool(w, "clip.has_llava_projector", true)) ||
        (rc = vlm_gguf_writer_set_u32(w, "general.file_type", 1)) ||
        (rc = vlm_gguf_writer_set_str(w, "clip.projector_type", "mlp")) ||
        (rc = vlm_gguf_writer_set_u32(w, "clip.vision.image_size", IMG)) ||
        (rc = vlm_gguf_writer_set_u32(w, "clip.vision.patch_size", PATCH)) ||
        (rc = vlm_gguf_writer_set_u32(w, "clip.vision.embedding_length", E)) ||
        (rc = vlm_gguf_writer_set_u32(w, "clip.vision.feed_forward_length", F)) ||
        (rc = vlm_gguf_writer_set_u32(w, "clip.vision.projection_dim", 768)) ||
        (rc = vlm_gguf_writer_set_u32(w, "clip.vision.attention.head_count", HEADS)) ||
        (rc = vlm_gguf_writer_set_f32(w, "clip.vision.attention.layer_norm_epsilon", 1e-5f)) ||
        (rc = vlm_gguf_writer_set_u32(w, "clip.vision.block_count", LAYERS)) ||
        (rc = vlm_gguf_writer_set_arr(w, "clip.vision.image_mean", VLM_GGUF_TYPE_FLOAT32, mean, 3)) ||
        (rc = vlm_gguf_writer_set_arr(w, "clip.vision.image_std", VLM_GGUF_TYPE_FLOAT32, stdv, 3)) ||
        (rc = vlm_gguf_writer_set_bool(w, "clip.use_gelu", false))) {
        vlm_error_set(err, rc, "bench_clip: cannot set metadata");
        goto done;
    }

#define ADD(name, type, nd, data, ...)                                                       \
    do {                                                                                  \
        int64_t ne_[] = {__VA_ARGS__};                                                    \
        if ((rc = vlm_gguf_writer_add_tensor(w, name, type, nd, ne_, data, err))) goto done; \
    } while (0)
    ADD("v.patch_embd.weight", VLM_DTYPE_F16, 4, patch, PATCH, PATCH, 3, E);
    ADD("v.class_embd", VLM_DTYPE_F32, 1, cls, E);
    ADD("v.position_embd.weight", VLM_DTYPE_F16, 2, pos, E, n_pos);
    ADD("v.pre_ln.weight", VLM_DTYPE_F32, 1, ones, E);
    ADD("v.pre_ln.bias", VLM_DTYPE_F32, 1, bias, E);
    for (int il = 0; il < LAYERS; il++) {
        char n[64];
#define LNAME(s) (snprintf(n, sizeof n, "v.blk.%d.%s", il, s), n)
        ADD(LNAME("attn_q.weight"), VLM_DTYPE_F16, 2, big, E, E);
        ADD(LNAME("attn_q.bias"), VLM_DTYPE_F32, 1, bias, E);
        ADD(LNAME("attn_k.weight"), VLM_DTYPE_F16, 2, big + E * E, E, E);
        ADD(LNAME("attn_k.bias"), VLM_DTYPE_F32, 1, bias, E);
        ADD(LNAME("attn_v.weight"), VLM_DTYPE_F16, 2, big + 2 * E * E, E, E);
        ADD(LNAME("attn_v.bias"), VLM_DTYPE_F32, 1, bias, E);
        ADD(LNAME("attn_out.weight"), VLM_DTYPE_F16, 2, big + 3 * E * E, E, E);
        ADD(LNAME("attn_out.bias"), VLM_DTYPE_F32, 1, bias, E);
        ADD(LNAME("ln1.weight"), VLM_DTYPE_F32, 1, ones, E);
        ADD(LNAME("ln1.bias"), VLM_DTYPE_F32, 1, bias, E);
        ADD(LNAME("ffn_down.weight"), VLM_DTYPE_F16, 2, big, E, F);
        ADD(LNAME("ffn_down.bias"), VLM_DTYPE_F32, 1, bias, F);
        ADD(LNAME("ffn_up.weight"), VLM_DTYPE_F16, 2, big + (size_t)E * F, F, E);
        ADD(LNAME("ffn_up.bias"), VLM_DTYPE_F32, 1, bias, E);
        ADD(LNAME("ln2.weight"), VLM_DTYPE_F32, 1, ones, E);
        ADD(LNAME("ln2.bias"), VLM_DTYPE_F32, 1, bias, E);
#undef LNAME
    }
    ADD("mm.0.weight", VLM_DTYPE_F16, 2, big, E, TEXT);
    ADD("mm.0.bias", VLM_DTYPE_F32, 1, bias, TEXT);
    ADD("mm.2.weight", VLM_DTYPE_F16, 2, big, TEXT, TEXT);
    ADD("mm.2.bias", VLM_DTYPE_F32, 1, bias, TEXT);
#undef ADD
    rc = vlm_gguf_writer_write(w, path, err);
done:
    if (rc == VLM_ERR_NOMEM) vlm_error_set(err, rc, "bench_clip: out of memory writing the model");
    vlm_gguf_writer_destroy(&w);
    free(big);
    free(patch);
    free(pos);
    free(ones);
    free(bias);
    free(cls);
    return rc;
}

/* One 2048^3 sgemm (a, b, c: [n][n]); returns GFLOP/s. */
static double time_sgemm(const float *a, const float *b, float *c, int n) {
    double t0 = vlm_limits_now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
    double dt = vlm_limits_now() - t0;
    return 2.0 * n * (double)n * n / dt * 1e-9;
}

static double best_of(const double *v, int n, bool want_max) {
    double b = v[0];
    for (int i = 1; i < n; i++) b = want_max ? (v[i] > b ? v[i] : b) : (v[i] < b ? v[i] : b);
    return b;
}

static void usage(FILE *f) {
    fprintf(f, "usage: bench_clip [-t THREADS] [--reps N] [--batch N] [--mmproj FILE] [--out FILE] [--no-pool] [--keep-f16]\n"
               "  -t THREADS    pool and OpenBLAS threads (default 2)\n"
               "  --reps N      timed single-image encodes (default 5, after one warm-up)\n"
               "  --batch N     also time one batch of N images (default 4; 0 = skip)\n"
               "  --mmproj FILE use this mmproj instead of the random ViT-L/14-336 one\n"
               "  --no-pool     run the element-wise work on the calling thread only\n"
               "  --keep-f16    keep F16 matrices and widen them per GEMM (vlm_clip_opts_t.keep_f16)\n"
               "  --out FILE    where the random model is written (default /tmp/vlm_bench_clip_vitl14_336_f16.gguf;\n"
               "                reused when it exists)\n");
}

int main(int argc, char **argv) {
    int n_threads = 2, reps = 5, batch = 4;
    bool no_pool = false;
    vlm_clip_opts_t copts = vlm_clip_opts_default();
    const char *mmproj = NULL, *out = "/tmp/vlm_bench_clip_vitl14_336_f16.gguf";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const bool has_v = i + 1 < argc;
        if ((!strcmp(a, "-t") || !strcmp(a, "--threads")) && has_v) n_threads = atoi(argv[++i]);
        else if (!strcmp(a, "--reps") && has_v) reps = atoi(argv[++i]);
        else if (!strcmp(a, "--batch") && has_v) batch = atoi(argv[++i]);
        else if (!strcmp(a, "--mmproj") && has_v) mmproj = argv[++i];
        else if (!strcmp(a, "--out") && has_v) out = argv[++i];
        else if (!strcmp(a, "--no-pool")) no_pool = true;
        else if (!strcmp(a, "--keep-f16")) copts.keep_f16 = true;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else { fprintf(stderr, "bench_clip: unknown or incomplete option '%s'\n", a); usage(stderr); return 2; }
    }
    if (n_threads < 1 || reps < 1 || batch < 0) {
        fprintf(stderr, "bench_clip: threads and reps must be positive\n");
        return 2;
    }
    vlm_error_t err = {0};
    if (!mmproj) {
        mmproj = out;
        if (access(out, R_OK) != 0) {
            fprintf(stderr, "writing random ViT-L/14-336 mmproj to %s ...\n", out);
            if (write_mmproj(out, &err)) {
                fprintf(stderr, "bench_clip: %s\n", err.msg);
                return 1;
            }
        }
    }

    /* Limits first, with the same thread count. */
    vlm_limits_t lim = {0};
    vlm_limits_describe_cpu(&lim);
    if (vlm_limits_measure_sgemm(&lim, n_threads, 2048, 5, &err)) {
        fprintf(stderr, "bench_clip: %s\n", err.msg);
        return 1;
    }
    vlm_pool_t *pool_owned = vlm_pool_new(n_threads);
    vlm_pool_t *pool = no_pool ? NULL : pool_owned; /* --no-pool: element-wise work on the caller only */
    if (!pool_owned) {
        fprintf(stderr, "bench_clip: cannot create the pool\n");
        return 1;
    }

    double t0 = vlm_limits_now();
    vlm_gguf_t *g = NULL;
    vlm_clip_t *clip = NULL;
    vlm_projector_t *proj = NULL;
    if (vlm_gguf_open(mmproj, &g, &err) || vlm_clip_load(g, &copts, &clip, &err)) {
        fprintf(stderr, "bench_clip: %s\n", err.msg);
        return 1;
    }
    const vlm_clip_hparams_t *hp = vlm_clip_hparams(clip);
    const vlm_gguf_tensor_t *mm2 = vlm_gguf_find_tensor(g, "mm.2.weight");
    int32_t n_text = mm2 ? (int32_t)mm2->ne[1] : TEXT;
    if (vlm_projector_load(g, hp->n_embd_out, n_text, &proj, &err)) {
        fprintf(stderr, "bench_clip: %s\n", err.msg);
        return 1;
    }
    double t_load = vlm_limits_now() - t0;

    const size_t S = (size_t)hp->image_size, P = (size_t)hp->n_patches;
    const int n_img = batch > 1 ? batch : 1;
    float *images = malloc((size_t)n_img * S * S * 3 * sizeof(float));
    float *feat = malloc((size_t)n_img * P * hp->n_embd_out * sizeof(float));
    float *emb = malloc((size_t)n_img * P * n_text * sizeof(float));
    double *t_enc = calloc((size_t)reps, sizeof(double)), *t_proj = calloc((size_t)reps, sizeof(double));
    double *t_tot = calloc((size_t)reps, sizeof(double)), *peak = calloc((size_t)reps, sizeof(double));
    const int SN = 2048;
    float *sa = malloc((size_t)SN * SN * sizeof(float)), *sb = malloc((size_t)SN * SN * sizeof(float));
    float *sc = malloc((size_t)SN * SN * sizeof(float));
    if (!images || !feat || !emb || !t_enc || !t_proj || !t_tot || !peak || !sa || !sb || !sc) {
        fprintf(stderr, "bench_clip: out of memory\n");
        return 1;
    }
    fill_f32(images, (size_t)n_img * S * S * 3, 2.0f, 0.0f);
    fill_f32(sa, (size_t)SN * SN, 0.5f, 0.0f);
    fill_f32(sb, (size_t)SN * SN, 0.5f, 0.0f);

    /* Warm-up (page faults, OpenBLAS buffers), then the timed runs. */
    if (vlm_clip_encode(clip, pool, images, 1, feat, &err) ||
        vlm_projector_apply(proj, pool, feat, (int32_t)P, emb, &err)) {
        fprintf(stderr, "bench_clip: %s\n", err.msg);
        return 1;
    }
    for (int r = 0; r < reps; r++) {
        peak[r] = time_sgemm(sa, sb, sc, SN);
        double a = vlm_limits_now();
        vlm_clip_encode(clip, pool, images, 1, feat, &err);
        double b = vlm_limits_now();
        vlm_projector_apply(proj, pool, feat, (int32_t)P, emb, &err);
        double c = vlm_limits_now();
        t_enc[r] = b - a;
        t_proj[r] = c - b;
        t_tot[r] = c - a;
    }
    const double fl_enc = vlm_clip_flops_per_image(clip);
    const double fl_proj = vlm_projector_flops_per_row(proj) * (double)P;
    double best_tot = best_of(t_tot, reps, false), best_enc = best_of(t_enc, reps, false);
    double best_proj = best_of(t_proj, reps, false), best_peak = best_of(peak, reps, true);
    double med_peak = vlm_limits_median(peak, reps);
    double med_tot = vlm_limits_median(t_tot, reps), med_enc = vlm_limits_median(t_enc, reps);
    double med_proj = vlm_limits_median(t_proj, reps);

    /* The batch: warm-up, then as many paired runs as single-image ones. */
    double t_batch = 0, *t_b = calloc((size_t)reps, sizeof(double)), *peak_b = calloc((size_t)reps, sizeof(double));
    if (!t_b || !peak_b) return 1;
    if (batch > 1) {
        vlm_clip_encode(clip, pool, images, batch, feat, &err);
        for (int r = 0; r < reps; r++) {
            peak_b[r] = time_sgemm(sa, sb, sc, SN);
            double a = vlm_limits_now();
            vlm_clip_encode(clip, pool, images, batch, feat, &err);
            vlm_projector_apply(proj, pool, feat, (int32_t)(P * (size_t)batch), emb, &err);
            t_b[r] = vlm_limits_now() - a;
        }
        t_batch = best_of(t_b, reps, false);
    }

    const char *env = getenv("OPENBLAS_CORETYPE");
    printf("# bench_clip: CLIP encoder + LLaVA projector, one image at a time\n");
    printf("%-26s %s\n", "model", mmproj);
    printf("%-26s image %d, patch %d, width %d, %d/%d layers run, %d heads, FFN %d, %d patches, %s, projector %d->%d->%d\n",
           "shapes", hp->image_size, hp->patch_size, hp->n_embd, hp->n_layer_run, hp->n_layer, hp->n_head, hp->n_ff,
           hp->n_patches, hp->patch_f16 ? "F16" : "F32", vlm_projector_n_in(proj), n_text, n_text);
    printf("%-26s %s, family %d (%s)%s\n", "cpu", lim.cpu_model, lim.cpu_family, lim.uarch,
           lim.has_avx512f ? ", AVX-512F" : "");
    printf("%-26s %s (OPENBLAS_CORETYPE=%s)\n", "openblas core", lim.blas_core, env ? env : "(unset)");
    printf("%-26s %d\n", "threads", n_threads);
    printf("%-26s %.1f GFLOP/s best, %.1f median (2048^3, 5 runs before the model loads)\n", "sgemm peak",
           lim.sgemm_gflops, lim.sgemm_median_gflops);
    printf("%-26s %.1f GFLOP/s best, %.1f median (2048^3, one before each timed encode)\n", "sgemm peak, paired",
           best_peak, med_peak);
    printf("%-26s %.2f s (f32 copies: clip %.0f MiB, projector %.0f MiB)\n", "load", t_load,
           vlm_clip_extra_bytes(clip) / 1048576.0, vlm_projector_extra_bytes(proj) / 1048576.0);
    printf("%-26s %.1f ms best, %.1f median  (%.1f GFLOP)\n", "encoder", best_enc * 1e3, med_enc * 1e3, fl_enc * 1e-9);
    printf("%-26s %.1f ms best, %.1f median  (%.1f GFLOP)\n", "projector", best_proj * 1e3, med_proj * 1e3, fl_proj * 1e-9);
    printf("%-26s %.1f ms best, %.1f median over %d reps\n", "image (encoder+projector)", best_tot * 1e3,
           med_tot * 1e3, reps);
    printf("%-26s %.1f GFLOP/s best, %.1f median\n", "throughput", (fl_enc + fl_proj) / best_tot * 1e-9,
           (fl_enc + fl_proj) / med_tot * 1e-9);
    printf("%-26s %.0f%% (best/best), %.0f%% (median/median)\n", "fraction of sgemm peak",
           100.0 * (fl_enc + fl_proj) / best_tot * 1e-9 / best_peak,
           100.0 * (fl_enc + fl_proj) / med_tot * 1e-9 / med_peak);
    if (batch > 1)
        printf("%-26s %.1f ms per image best, %.1f median (%d images per call; %.1f GFLOP/s, %.0f%% of the paired peak %.1f)\n",
               "batched", t_batch * 1e3 / batch, vlm_limits_median(t_b, reps) * 1e3 / batch, batch,
               (fl_enc + fl_proj) * batch / t_batch * 1e-9,
               100.0 * (fl_enc + fl_proj) * batch / t_batch * 1e-9 / best_of(peak_b, reps, true),
               best_of(peak_b, reps, true));
    printf("%-26s %.0f MiB\n", "peak RSS", vlm_limits_peak_rss() / 1048576.0);

    free(images);
    free(feat);
    free(emb);
    free(t_enc);
    free(t_proj);
    free(t_tot);
    free(peak);
    free(t_b);
    free(peak_b);
    free(sa);
    free(sb);
    free(sc);
    vlm_projector_destroy(&proj);
    vlm_clip_destroy(&clip);
    vlm_gguf_destroy(&g);
    vlm_pool_destroy(&pool_owned);
    return 0;
}
