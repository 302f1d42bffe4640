/* bench/bench_image.c - time the image path of a job: JPEG bytes -> u8 RGB
 * (vision/image.c) -> normalised S x S floats (vision/preprocess.c), in both
 * preprocessing modes.
 *
 * The test JPEG is made here: synthetic photo-like pixels (smooth gradients
 * plus noise) compressed with TurboJPEG, 4:2:0 at quality 90 (baseline and
 * progressive). Both stages run on one thread, so the machine limit printed
 * next to them is the one-thread triad bandwidth, and each stage's output
 * rate is given as a fraction of it (how far the stage is from being bound
 * by memory).
 *
 *   bench_image [-w WIDTH] [-h HEIGHT] [-s SIZE] [-n REPS]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <turbojpeg.h>

#include "bench/limits.h"
#include "vision/image.h"
#include "vision/preprocess.h"

/* Photo-like test pixels: two smooth gradients and a blob, plus noise. */
static uint8_t *make_pixels(int w, int h) {
    uint8_t *px = malloc((size_t)w * h * 3);
    if (!px) return NULL;
    uint32_t s = 12345;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            s = s * 1664525u + 1013904223u;
            int noise = (int)(s >> 27) - 16;
            int dx = x - w / 3, dy = y - h / 2;
            int blob = (dx * dx + dy * dy) < (h / 4) * (h / 4) ? 60 : 0;
            int v[3] = {x * 255 / w + noise, y * 255 / h + blob + noise / 2, 128 + blob - noise};
            for (int c = 0; c < 3; c++)
                px[3 * ((size_t)y * w + x) + c] = (uint8_t)(v[c] < 0 ? 0 : v[c] > 255 ? 255 : v[c]);
        }
    return px;
}

static void report(const char *what, double *t, int n, double out_bytes, double triad_gibs) {
    double best = t[0];
    for (int i = 1; i < n; i++) best = t[i] < best ? t[i] : best;
    double med = vlm_limits_median(t, n);
    double gibs = out_bytes / med / (1024.0 * 1024.0 * 1024.0);
    printf("%-34s median %8.3f ms   best %8.3f ms   output %.2f GiB/s = %.3f of 1-thread triad\n", what,
           med * 1e3, best * 1e3, gibs, triad_gibs > 0 ? gibs / triad_gibs : 0.0);
}

int main(int argc, char **argv) {
    int W = 1920, H = 1080, S = 336, reps = 30;
    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "-w") && v) W = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-h") && v) H = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-s") && v) S = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-n") && v) reps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_image [-w WIDTH] [-h HEIGHT] [-s SIZE] [-n REPS]\n");
            return 2;
        }
    }
    if (W < 1 || H < 1 || S < 1 || reps < 1) {
        fprintf(stderr, "bench_image: sizes and reps must be positive\n");
        return 2;
    }

    vlm_limits_t lim;
    vlm_error_t err;
    vlm_limits_describe_cpu(&lim);
    if (vlm_limits_measure_bandwidth(&lim, 1, 64, 8, &err) != 0) {
        fprintf(stderr, "bench_image: %s\n", err.msg);
        return 1;
    }
    /* Only the lines that bound this bench (no sgemm here). */
    printf("# cpu: %s (family %d model %d, %s)\n", lim.cpu_model, lim.cpu_family, lim.cpu_model_id, lim.uarch);
    printf("# 1-thread triad bandwidth: %.1f GiB/s best, %.1f GiB/s median\n", lim.triad_gibs,
           lim.triad_median_gibs);

    uint8_t *px = make_pixels(W, H);
    double *t = malloc((size_t)reps * sizeof *t);
    if (!px || !t) {
        fprintf(stderr, "bench_image: out of memory\n");
        return 1;
    }
    const float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
    const float std[3] = {0.26862954f, 0.26130258f, 0.27577711f};

    for (int prog = 0; prog < 2; prog++) {
        tjhandle tj = tjInitCompress();
        unsigned char *jpeg = NULL;
        unsigned long jsize = 0;
        if (!tj || tjCompress2(tj, px, W, 0, H, TJPF_RGB, &jpeg, &jsize, TJSAMP_420, 90,
                               prog ? TJFLAG_PROGRESSIVE : 0) != 0) {
            fprintf(stderr, "bench_image: tjCompress2: %s\n", tj ? tjGetErrorStr2(tj) : "no handle");
            return 1;
        }
        tjDestroy(tj);
        printf("\n%dx%d %s JPEG, 4:2:0 q90, %lu bytes; preprocess to %dx%d; %d reps\n", W, H,
               prog ? "progressive" : "baseline", jsize, S, S, reps);

        vlm_image_u8_t img;
        for (int r = 0; r < reps; r++) {
            double t0 = vlm_limits_now();
            int rc = vlm_image_decode(jpeg, jsize, NULL, &img, &err);
            t[r] = vlm_limits_now() - t0;
            if (rc != 0) {
                fprintf(stderr, "bench_image: decode: %s\n", err.msg);
                return 1;
            }
            if (r + 1 < reps) vlm_image_u8_deinit(&img);
        }
        report("decode (TurboJPEG -> RGB u8)", t, reps, (double)W * H * 3, lim.triad_gibs);

        if (!prog) {
            double total_med[2];
            for (int m = 0; m < 2; m++) {
                vlm_preprocess_params_t p;
                if (vlm_preprocess_params_init(&p, m, S, mean, std, &err) != 0) {
                    fprintf(stderr, "bench_image: %s\n", err.msg);
                    return 1;
                }
                vlm_image_f32_t out;
                for (int r = 0; r < reps; r++) {
                    double t0 = vlm_limits_now();
                    int rc = vlm_preprocess(&p, &img, &out, &err);
                    t[r] = vlm_limits_now() - t0;
                    if (rc != 0) {
                        fprintf(stderr, "bench_image: preprocess: %s\n", err.msg);
                        return 1;
                    }
                    vlm_image_f32_deinit(&out);
                }
                char label[64];
                snprintf(label, sizeof label, "preprocess %s (-> %dx%d f32)", vlm_preprocess_mode_name(m), S, S);
                report(label, t, reps, (double)S * S * 3 * sizeof(float), lim.triad_gibs);
                total_med[m] = vlm_limits_median(t, reps);
            }
            /* decode again for the median total (t was reused) */
            for (int r = 0; r < reps; r++) {
                vlm_image_u8_t tmp;
                double t0 = vlm_limits_now();
                vlm_image_decode(jpeg, jsize, NULL, &tmp, NULL);
                t[r] = vlm_limits_now() - t0;
                vlm_image_u8_deinit(&tmp);
            }
            double dec = vlm_limits_median(t, reps);
            printf("total decode + preprocess (medians): hf %.3f ms, llamacpp %.3f ms\n",
                   (dec + total_med[0]) * 1e3, (dec + total_med[1]) * 1e3);
        }
        vlm_image_u8_deinit(&img);
        tjFree(jpeg);
    }
    free(t);
    free(px);
    return 0;
}
