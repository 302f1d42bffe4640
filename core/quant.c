/* core/quant.c - dequantizers, reference quantizers, ggml-exact activation
 * quantization, scalar dot kernels and run-time kernel dispatch.
 *
 * Everything here is portable C compiled without -march and with
 * -ffp-contract=off, like ggml's ggml-base (ggml-quants.c), so the float
 * arithmetic of the dequantizers and of the reference quantizers gives the
 * same bits as llama.cpp (c392e50): a model quantized here is byte-identical
 * to one made by llama-quantize without an importance matrix. The order of
 * every float operation below follows ggml's on purpose; do not "simplify"
 * expressions such as (d * sc) * q.
 *
 * Activation quantization follows what ggml's CPU backend runs on an x86
 * AVX2/AVX-512 build (ggml-cpu-quants.c): for Q8_0/Q8_1 that is the AVX2
 * quantizer (id = 127/amax, round half to even, int32 -> int8 saturation),
 * which differs from quantize_row_q8_0_ref in rounding and in the
 * reciprocal; for Q8_K it is quantize_row_q8_K_ref.
 *
 * The scalar dot kernels are the reference for the SIMD ones: within a block
 * they sum integers exactly, then scale in float like ggml's scalar code.
 */
#include "quant.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"
#include "kernels.h"

/* ==== Small helpers ====================================================== */

static inline float h2f(uint16_t h) { return vlm_fp16_to_fp32(h); }
static inline uint16_t f2h(float f) { return vlm_fp32_to_fp16(f); }

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

/* ggml's nearest_int: round to nearest (ties to even) with the 1.5 * 2^23
 * trick, valid for |fval| <= 4194303. Kept bit-for-bit, including what it
 * gives for inf/NaN (used by Q8_K on degenerate input). */
static inline int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int32_t i;
    memcpy(&i, &val, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

int vlm__block_size(uint32_t type) {
    switch (type) {
    case VLM_DTYPE_F32: case VLM_DTYPE_F16: case VLM_DTYPE_BF16: return 1;
    case VLM_DTYPE_Q4_0: case VLM_DTYPE_Q4_1: case VLM_DTYPE_Q5_0: case VLM_DTYPE_Q5_1:
    case VLM_DTYPE_Q8_0: case VLM_DTYPE_Q8_1: return 32;
    case VLM_DTYPE_Q4_K: case VLM_DTYPE_Q5_K: case VLM_DTYPE_Q6_K: case VLM_DTYPE_Q8_K: return VLM_QK_K;
    default: return 0;
    }
}

size_t vlm__block_bytes(uint32_t type) {
    switch (type) {
    case VLM_DTYPE_F32: return 4;
    case VLM_DTYPE_F16: case VLM_DTYPE_BF16: return 2;
    case VLM_DTYPE_Q4_0: return sizeof(vlm_block_q4_0);
    case VLM_DTYPE_Q4_1: return sizeof(vlm_block_q4_1);
    case VLM_DTYPE_Q5_0: return sizeof(vlm_block_q5_0);
    case VLM_DTYPE_Q5_1: return sizeof(vlm_block_q5_1);
    case VLM_DTYPE_Q8_0: return sizeof(vlm_block_q8_0);
    case VLM_DTYPE_Q8_1: return sizeof(vlm_block_q8_1);
    case VLM_DTYPE_Q4_K: return sizeof(vlm_block_q4_K);
    case VLM_DTYPE_Q5_K: return sizeof(vlm_block_q5_K);
    case VLM_DTYPE_Q6_K: return sizeof(vlm_block_q6_K);
    case VLM_DTYPE_Q8_K: return sizeof(vlm_block_q8_K);
    default: return 0;
    }
}

/* Unpacks the 6-bit scale j and min j of a Q4_K/Q5_K block (ggml's
 * get_scale_min_k4): bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins
 * 0-3, bytes 8-11 the low nibbles of scales/mins 4-7, whose top 2 bits sit in
 * the top bits of bytes 0-7. */
static inline void k4_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
    }
}

/* ==== Dequantization ===================================================== */

static void dequant_q4_0(const vlm_block_q4_0 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = h2f(x[i].d);
        for (int j = 0; j < 16; j++) {
            const int x0 = (x[i].qs[j] & 0x0F) - 8;
            const int x1 = (x[i].qs[j] >> 4) - 8;
            y[i * 32 + j] = x0 * d;
            y[i * 32 + j + 16] = x1 * d;
        }
    }
}

static void dequant_q4_1(const vlm_block_q4_1 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = h2f(x[i].d);
        const float m = h2f(x[i].m);
        for (int j = 0; j < 16; j++) {
            const int x0 = x[i].qs[j] & 0x0F;
            const int x1 = x[i].qs[j] >> 4;
            y[i * 32 + j] = x0 * d + m;
            y[i * 32 + j + 16] = x1 * d + m;
        }
    }
}

static void dequant_q5_0(const vlm_block_q5_0 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = h2f(x[i].d);
        uint32_t qh;
        memcpy(&qh, x[i].qh, sizeof qh);
        for (int j = 0; j < 16; j++) {
            const uint8_t h0 = (uint8_t)(((qh >> j) << 4) & 0x10);
            const uint8_t h1 = (uint8_t)((qh >> (j + 12)) & 0x10);
            const int32_t x0 = ((x[i].qs[j] & 0x0F) | h0) - 16;
            const int32_t x1 = ((x[i].qs[j] >> 4) | h1) - 16;
            y[i * 32 + j] = x0 * d;
            y[i * 32 + j + 16] = x1 * d;
        }
    }
}

static void dequant_q5_1(const vlm_block_q5_1 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = h2f(x[i].d);
        const float m = h2f(x[i].m);
        uint32_t qh;
        memcpy(&qh, x[i].qh, sizeof qh);
        for (int j = 0; j < 16; j++) {
            const uint8_t h0 = (uint8_t)(((qh >> j) << 4) & 0x10);
            const uint8_t h1 = (uint8_t)((qh >> (j + 12)) & 0x10);
            const int x0 = (x[i].qs[j] & 0x0F) | h0;
            const int x1 = (x[i].qs[j] >> 4) | h1;
            y[i * 32 + j] = x0 * d + m;
            y[i * 32 + j + 16] = x1 * d + m;
        }
    }
}

static void dequant_q8_0(const vlm_block_q8_0 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = h2f(x[i].d);
        for (int j = 0; j < 32; j++) y[i * 32 + j] = x[i].qs[j] * d;
    }
}

static void dequant_q8_1(const vlm_block_q8_1 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = h2f(x[i].d);
        for (int j = 0; j < 32; j++) y[i * 32 + j] = x[i].qs[j] * d;
    }
}

static void dequant_q4_K(const vlm_block_q4_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *q = x[i].qs;
        const float d = h2f(x[i].d);
        const float min = h2f(x[i].dmin);
        int is = 0;
        for (int j = 0; j < VLM_QK_K; j += 64) {
            uint8_t sc, m;
            k4_scale_min(is + 0, x[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = min * m;
            k4_scale_min(is + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = min * m;
            for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
            q += 32;
            is += 2;
        }
    }
}

static void dequant_q5_K(const vlm_block_q5_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *ql = x[i].qs;
        const uint8_t *qh = x[i].qh;
        const float d = h2f(x[i].d);
        const float min = h2f(x[i].dmin);
        int is = 0;
        uint8_t u1 = 1, u2 = 2;
        for (int j = 0; j < VLM_QK_K; j += 64) {
            uint8_t sc, m;
            k4_scale_min(is + 0, x[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = min * m;
            k4_scale_min(is + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = min * m;
            for (int l = 0; l < 32; l++) *y++ = d1 * ((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * ((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
            ql += 32;
            is += 2;
            u1 = (uint8_t)(u1 << 2);
            u2 = (uint8_t)(u2 << 2);
        }
    }
}

static void dequant_q6_K(const vlm_block_q6_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = h2f(x[i].d);
        const uint8_t *ql = x[i].ql;
        const uint8_t *qh = x[i].qh;
        const int8_t *sc = x[i].scales;
        for (int n = 0; n < VLM_QK_K; n += 128) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int8_t q1 = (int8_t)((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int8_t q2 = (int8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int8_t q3 = (int8_t)((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int8_t q4 = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l + 0] = d * sc[is + 0] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
            y += 128;
            ql += 64;
            qh += 32;
            sc += 8;
        }
    }
}

static void dequant_q8_K(const vlm_block_q8_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++)
        for (int j = 0; j < VLM_QK_K; j++) *y++ = x[i].d * x[i].qs[j];
}

int vlm_dtype_dequantize_row(uint32_t type, const void *src, float *dst, int64_t n) {
    const int bs = vlm__block_size(type);
    if (bs == 0) return VLM_ERR_UNSUPPORTED;
    if (n < 0 || n % bs != 0) return VLM_ERR_INVALID_ARG;
    const int64_t nb = n / bs;
    switch (type) {
    case VLM_DTYPE_F32: memcpy(dst, src, (size_t)n * sizeof(float)); break;
    case VLM_DTYPE_F16: {
        const uint16_t *h = src;
        for (int64_t i = 0; i < n; i++) dst[i] = h2f(h[i]);
        break;
    }
    case VLM_DTYPE_BF16: {
        const uint16_t *h = src;
        for (int64_t i = 0; i < n; i++) dst[i] = vlm_bf16_to_fp32(h[i]);
        break;
    }
    case VLM_DTYPE_Q4_0: dequant_q4_0(src, dst, nb); break;
    case VLM_DTYPE_Q4_1: dequant_q4_1(src, dst, nb); break;
    case VLM_DTYPE_Q5_0: dequant_q5_0(src, dst, nb); break;
    case VLM_DTYPE_Q5_1: dequant_q5_1(src, dst, nb); break;
    case VLM_DTYPE_Q8_0: dequant_q8_0(src, dst, nb); break;
    case VLM_DTYPE_Q8_1: dequant_q8_1(src, dst, nb); break;
    case VLM_DTYPE_Q4_K: dequant_q4_K(src, dst, nb); break;
    case VLM_DTYPE_Q5_K: dequant_q5_K(src, dst, nb); break;
    case VLM_DTYPE_Q6_K: dequant_q6_K(src, dst, nb); break;
    case VLM_DTYPE_Q8_K: dequant_q8_K(src, dst, nb); break;
    default: return VLM_ERR_UNSUPPORTED;
    }
    return VLM_OK;
}

/* ==== Reference quantizers (ggml quantize_row_*_ref) ===================== */

static void quant_ref_q4_0(const float *x, vlm_block_q4_0 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < 32; j++) {
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        }
        const float d = max / -8;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = f2h(d);
        for (int j = 0; j < 16; j++) {
            const float x0 = x[j] * id;
            const float x1 = x[16 + j] * id;
            const uint8_t q0 = (uint8_t)imin(15, (int8_t)(x0 + 8.5f));
            const uint8_t q1 = (uint8_t)imin(15, (int8_t)(x1 + 8.5f));
            y[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void quant_ref_q4_1(const float *x, vlm_block_q4_1 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32) {
        float min = FLT_MAX, max = -FLT_MAX;
        for (int j = 0; j < 32; j++) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
        const float d = (max - min) / ((1 << 4) - 1);
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = f2h(d);
        y[i].m = f2h(min);
        for (int j = 0; j < 16; j++) {
            const float x0 = (x[j] - min) * id;
            const float x1 = (x[16 + j] - min) * id;
            const uint8_t q0 = (uint8_t)imin(15, (int8_t)(x0 + 0.5f));
            const uint8_t q1 = (uint8_t)imin(15, (int8_t)(x1 + 0.5f));
            y[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void quant_ref_q5_0(const float *x, vlm_block_q5_0 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < 32; j++) {
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        }
        const float d = max / -16;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = f2h(d);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            const float x0 = x[j] * id;
            const float x1 = x[16 + j] * id;
            const uint8_t q0 = (uint8_t)imin(31, (int8_t)(x0 + 16.5f));
            const uint8_t q1 = (uint8_t)imin(31, (int8_t)(x1 + 16.5f));
            y[i].qs[j] = (uint8_t)((q0 & 0x0F) | ((q1 & 0x0F) << 4));
            qh |= ((q0 & 0x10u) >> 4) << (j + 0);
            qh |= ((q1 & 0x10u) >> 4) << (j + 16);
        }
        memcpy(y[i].qh, &qh, sizeof qh);
    }
}

static void quant_ref_q5_1(const float *x, vlm_block_q5_1 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32) {
        float min = FLT_MAX, max = -FLT_MAX;
        for (int j = 0; j < 32; j++) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
        const float d = (max - min) / ((1 << 5) - 1);
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = f2h(d);
        y[i].m = f2h(min);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            const float x0 = (x[j] - min) * id;
            const float x1 = (x[16 + j] - min) * id;
            const uint8_t q0 = (uint8_t)(x0 + 0.5f);
            const uint8_t q1 = (uint8_t)(x1 + 0.5f);
            y[i].qs[j] = (uint8_t)((q0 & 0x0F) | ((q1 & 0x0F) << 4));
            qh |= ((q0 & 0x10u) >> 4) << (j + 0);
            qh |= ((q1 & 0x10u) >> 4) << (j + 16);
        }
        memcpy(y[i].qh, &qh, sizeof qh);
    }
}

static void quant_ref_q8_0(const float *x, vlm_block_q8_0 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / ((1 << 7) - 1);
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = f2h(d);
        for (int j = 0; j < 32; j++) y[i].qs[j] = (int8_t)roundf(x[j] * id);
    }
}

static void quant_ref_q8_1(const float *x, vlm_block_q8_1 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / ((1 << 7) - 1);
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = f2h(d);
        int sum = 0;
        for (int j = 0; j < 16; j++) {
            y[i].qs[j] = (int8_t)roundf(x[j] * id);
            y[i].qs[16 + j] = (int8_t)roundf(x[16 + j] * id);
            sum += y[i].qs[j];
            sum += y[i].qs[16 + j];
        }
        y[i].s = f2h(sum * d);
    }
}

/* ggml's make_qx_quants: a symmetric scale for n values quantized to
 * [-nmax, nmax-1] (stored +nmax in L), refined by a small search on the
 * weighted least-squares error. Only rmse_type 1 without importance weights
 * is used (Q6_K). */
static float make_qx_quants(int n, int nmax, const float *x, int8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        const float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < 1e-15f) {
        for (int i = 0; i < n; i++) L[i] = 0;
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * x[i]);
        l = imax(-nmax, imin(nmax - 1, l));
        L[i] = (int8_t)(l + nmax);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale * x[i]);
            l = imax(-nmax, imin(nmax - 1, l));
            const float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) {
                const int l = nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + imax(-nmax, imin(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* ggml's make_qkx2_quants: scale and min for n values quantized to
 * [0, nmax], searched over nstep+1 candidate scales by the weighted squared
 * error (use_mad is always false in the callers we mirror). Returns the
 * scale; *the_min receives -min (>= 0). */
static float make_qkx2_quants(int n, int nmax, const float *x, const float *weights, uint8_t *L,
                              float *the_min, uint8_t *Laux, float rmin, float rdelta, int nstep) {
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        const float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; i++) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_mad = 0;
    for (int i = 0; i < n; i++) {
        const int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)imax(0, imin(nmax, l));
        float diff = scale * L[i] + min - x[i];
        diff = diff * diff;
        best_mad += weights[i] * diff;
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale * (x[i] - min));
            l = imax(0, imin(nmax, l));
            Laux[i] = (uint8_t)l;
            const float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float mad = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = diff * diff;
                mad += weights[i] * diff;
            }
            if (mad < best_mad) {
                for (int i = 0; i < n; i++) L[i] = Laux[i];
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* Shared by Q4_K and Q5_K: finds the 8 sub-block scales/mins of one
 * super-block, packs them as 6-bit values into scales[12], sets d/dmin, and
 * requantizes every value into L[256] with the stored (rounded) scales. */
static void quant_ref_k_scales(const float *x, int nmax, float rmin, int nstep, uint8_t *scales_out,
                               uint16_t *d_out, uint16_t *dmin_out, uint8_t *L) {
    uint8_t Laux[32];
    float weights[32];
    float mins[VLM_QK_K / 32];
    float scales[VLM_QK_K / 32];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < VLM_QK_K / 32; j++) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; l++) sum_x2 += x[32 * j + l] * x[32 * j + l];
        const float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; l++) weights[l] = av_x + fabsf(x[32 * j + l]);
        scales[j] = make_qkx2_quants(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, rmin,
                                     0.1f, nstep);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    memset(scales_out, 0, VLM_K_SCALE_SIZE);
    for (int j = 0; j < VLM_QK_K / 32; j++) {
        uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
        ls = (uint8_t)imin(63, ls);
        lm = (uint8_t)imin(63, lm);
        if (j < 4) {
            scales_out[j] = ls;
            scales_out[j + 4] = lm;
        } else {
            scales_out[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
            scales_out[j - 4] |= (uint8_t)((ls >> 4) << 6);
            scales_out[j - 0] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    *d_out = f2h(max_scale / 63.f);
    *dmin_out = f2h(max_min / 63.f);
    for (int j = 0; j < VLM_QK_K / 32; j++) {
        uint8_t sc, m;
        k4_scale_min(j, scales_out, &sc, &m);
        const float d = h2f(*d_out) * sc;
        if (!d) continue;
        const float dm = h2f(*dmin_out) * m;
        for (int ii = 0; ii < 32; ii++) {
            const int l = nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = (uint8_t)imax(0, imin(nmax, l));
        }
    }
}

static void quant_ref_q4_K(const float *x, vlm_block_q4_K *y, int64_t nb) {
    uint8_t L[VLM_QK_K];
    for (int64_t i = 0; i < nb; i++, x += VLM_QK_K) {
        quant_ref_k_scales(x, 15, -1.f, 20, y[i].scales, &y[i].d, &y[i].dmin, L);
        uint8_t *q = y[i].qs;
        for (int j = 0; j < VLM_QK_K; j += 64) {
            for (int l = 0; l < 32; l++) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
            q += 32;
        }
    }
}

static void quant_ref_q5_K(const float *x, vlm_block_q5_K *y, int64_t nb) {
    uint8_t L[VLM_QK_K];
    for (int64_t i = 0; i < nb; i++, x += VLM_QK_K) {
        quant_ref_k_scales(x, 31, -0.5f, 15, y[i].scales, &y[i].d, &y[i].dmin, L);
        uint8_t *qh = y[i].qh;
        uint8_t *ql = y[i].qs;
        memset(qh, 0, VLM_QK_K / 8);
        uint8_t m1 = 1, m2 = 2;
        for (int n = 0; n < VLM_QK_K; n += 64) {
            for (int j = 0; j < 32; j++) {
                int l1 = L[n + j];
                if (l1 > 15) {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                int l2 = L[n + j + 32];
                if (l2 > 15) {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[j] = (uint8_t)(l1 | (l2 << 4));
            }
            m1 = (uint8_t)(m1 << 2);
            m2 = (uint8_t)(m2 << 2);
            ql += 32;
        }
    }
}

static void quant_ref_q6_K(const float *x, vlm_block_q6_K *y, int64_t nb) {
    int8_t L[VLM_QK_K];
    float scales[VLM_QK_K / 16];
    for (int64_t i = 0; i < nb; i++, x += VLM_QK_K) {
        float max_scale = 0, max_abs_scale = 0;
        for (int ib = 0; ib < VLM_QK_K / 16; ib++) {
            const float scale = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
            scales[ib] = scale;
            const float abs_scale = fabsf(scale);
            if (abs_scale > max_abs_scale) {
                max_abs_scale = abs_scale;
                max_scale = scale;
            }
        }
        if (max_abs_scale < 1e-15f) {
            memset(&y[i], 0, sizeof y[i]);
            y[i].d = f2h(0.f);
            continue;
        }
        const float iscale = -128.f / max_scale;
        y[i].d = f2h(1 / iscale);
        for (int ib = 0; ib < VLM_QK_K / 16; ib++)
            y[i].scales[ib] = (int8_t)imin(127, nearest_int(iscale * scales[ib]));
        for (int j = 0; j < VLM_QK_K / 16; j++) {
            const float d = h2f(y[i].d) * y[i].scales[j];
            if (!d) continue;
            for (int ii = 0; ii < 16; ii++) {
                const int l = nearest_int(x[16 * j + ii] / d);
                L[16 * j + ii] = (int8_t)(imax(-32, imin(31, l)) + 32);
            }
        }
        uint8_t *ql = y[i].ql;
        uint8_t *qh = y[i].qh;
        for (int j = 0; j < VLM_QK_K; j += 128) {
            for (int l = 0; l < 32; l++) {
                const uint8_t q1 = L[j + l + 0] & 0xF;
                const uint8_t q2 = L[j + l + 32] & 0xF;
                const uint8_t q3 = L[j + l + 64] & 0xF;
                const uint8_t q4 = L[j + l + 96] & 0xF;
                ql[l + 0] = (uint8_t)(q1 | (q3 << 4));
                ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
                qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) |
                                  ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6));
            }
            ql += 64;
            qh += 32;
        }
    }
}

/* quantize_row_q8_K_ref; it is also what ggml's x86 CPU backend runs for
 * activations. Degenerate blocks: all-zero gives d = 0 and zero quants (we
 * also zero bsums, which ggml leaves unset); an amax so small that -127/max
 * overflows gives what nearest_int gives for inf/NaN (all quants 0). */
static void quant_q8_K(const float *x, vlm_block_q8_K *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += VLM_QK_K) {
        float max = 0, amax = 0;
        for (int j = 0; j < VLM_QK_K; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        if (!amax) {
            y[i].d = 0;
            memset(y[i].qs, 0, sizeof y[i].qs);
            memset(y[i].bsums, 0, sizeof y[i].bsums);
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < VLM_QK_K; j++) {
            const int v = nearest_int(iscale * x[j]);
            y[i].qs[j] = (int8_t)imin(127, v);
        }
        for (int j = 0; j < VLM_QK_K / 16; j++) {
            int sum = 0;
            for (int ii = 0; ii < 16; ii++) sum += y[i].qs[j * 16 + ii];
            y[i].bsums[j] = (int16_t)sum;
        }
        y[i].d = 1 / iscale;
    }
}

int vlm_quantize_row(uint32_t type, const float *x, void *y, int64_t n) {
    const int bs = vlm__block_size(type);
    if (bs == 0) return VLM_ERR_UNSUPPORTED;
    if (n < 0 || n % bs != 0) return VLM_ERR_INVALID_ARG;
    const int64_t nb = n / bs;
    switch (type) {
    case VLM_DTYPE_F32: memcpy(y, x, (size_t)n * sizeof(float)); break;
    case VLM_DTYPE_F16: {
        uint16_t *h = y;
        for (int64_t i = 0; i < n; i++) h[i] = f2h(x[i]);
        break;
    }
    case VLM_DTYPE_BF16: {
        uint16_t *h = y;
        for (int64_t i = 0; i < n; i++) h[i] = vlm_fp32_to_bf16(x[i]);
        break;
    }
    case VLM_DTYPE_Q4_0: quant_ref_q4_0(x, y, nb); break;
    case VLM_DTYPE_Q4_1: quant_ref_q4_1(x, y, nb); break;
    case VLM_DTYPE_Q5_0: quant_ref_q5_0(x, y, nb); break;
    case VLM_DTYPE_Q5_1: quant_ref_q5_1(x, y, nb); break;
    case VLM_DTYPE_Q8_0: quant_ref_q8_0(x, y, nb); break;
    case VLM_DTYPE_Q8_1: quant_ref_q8_1(x, y, nb); break;
    case VLM_DTYPE_Q4_K: quant_ref_q4_K(x, y, nb); break;
    case VLM_DTYPE_Q5_K: quant_ref_q5_K(x, y, nb); break;
    case VLM_DTYPE_Q6_K: quant_ref_q6_K(x, y, nb); break;
    case VLM_DTYPE_Q8_K: quant_q8_K(x, y, nb); break;
    default: return VLM_ERR_UNSUPPORTED;
    }
    return VLM_OK;
}

/* ==== Activation quantization (what ggml's x86 CPU backend runs) ========= */

uint32_t vlm_dtype_vec_dot_type(uint32_t wtype) {
    switch (wtype) {
    case VLM_DTYPE_F32: return VLM_DTYPE_F32;
    case VLM_DTYPE_F16: return VLM_DTYPE_F16;
    case VLM_DTYPE_BF16: return VLM_DTYPE_BF16;
    case VLM_DTYPE_Q4_0: case VLM_DTYPE_Q5_0: case VLM_DTYPE_Q8_0: return VLM_DTYPE_Q8_0;
    case VLM_DTYPE_Q4_1: case VLM_DTYPE_Q5_1: return VLM_DTYPE_Q8_1;
    case VLM_DTYPE_Q4_K: case VLM_DTYPE_Q5_K: case VLM_DTYPE_Q6_K: return VLM_DTYPE_Q8_K;
    default: return wtype;
    }
}

/* One value of ggml's AVX2 Q8_0/Q8_1 quantizer before saturation:
 * _mm256_round_ps(v, nearest) then _mm256_cvtps_epi32, which gives INT_MIN
 * ("integer indefinite") for NaN and out-of-range values. */
static inline int32_t x86_round_to_i32(float v) {
    const float r = rintf(v);
    if (!(r >= -2147483648.0f && r < 2147483648.0f)) return INT32_MIN;
    return (int32_t)r;
}

static inline int8_t sat_i8(int32_t v) { return (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v); }

/* The AVX2 Q8_0 block quantizer: d = amax/127 (stored f16),
 * id = 127/amax (or 0), q = sat_i8(round_half_even(x * id)). Returns the
 * wrapped int32 sum of the unsaturated values (for Q8_1's s). */
static inline uint32_t x86_quant_block_q8(const float *x, uint16_t *dh, int8_t *qs, float *d_out) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) {
        const float a = fabsf(x[j]);
        if (a > amax) amax = a;
    }
    const float d = amax / 127.f;
    *dh = f2h(d);
    *d_out = d;
    const float id = amax != 0.0f ? 127.f / amax : 0.0f;
    uint32_t sum = 0;
    for (int j = 0; j < 32; j++) {
        const int32_t v = x86_round_to_i32(x[j] * id);
        sum += (uint32_t)v;
        qs[j] = sat_i8(v);
    }
    return sum;
}

static void act_q8_0_scalar(const float *x, void *vy, int64_t n) {
    vlm_block_q8_0 *y = vy;
    for (int64_t i = 0; i < n / 32; i++) {
        float d;
        x86_quant_block_q8(x + 32 * i, &y[i].d, y[i].qs, &d);
    }
}

static void act_q8_1_scalar(const float *x, void *vy, int64_t n) {
    vlm_block_q8_1 *y = vy;
    for (int64_t i = 0; i < n / 32; i++) {
        float d;
        const uint32_t sum = x86_quant_block_q8(x + 32 * i, &y[i].d, y[i].qs, &d);
        y[i].s = f2h(d * (float)(int32_t)sum);
    }
}

static void act_q8_K_scalar(const float *x, void *y, int64_t n) { quant_q8_K(x, y, n / VLM_QK_K); }

static void act_f16_scalar(const float *x, void *vy, int64_t n) {
    uint16_t *y = vy;
    for (int64_t i = 0; i < n; i++) y[i] = f2h(x[i]);
}

static void act_bf16_scalar(const float *x, void *vy, int64_t n) {
    uint16_t *y = vy;
    for (int64_t i = 0; i < n; i++) y[i] = vlm_fp32_to_bf16(x[i]);
}

static void act_f32(const float *x, void *y, int64_t n) { memcpy(y, x, (size_t)n * sizeof(float)); }

void vlm_quantize_activation_row(uint32_t vtype, const float *x, void *y, int64_t n) {
    const int bs = vlm__block_size(vtype);
    VLM_ASSERT(bs > 0 && n % bs == 0);
    const vlm__kernel_table_t *k = vlm__kernels_get(vlm_isa_best());
    vlm__row_fn fn = k->quantize_act[vtype];
    if (!fn) fn = vlm__kernels_scalar.quantize_act[vtype];
    if (fn) fn(x, y, n);
    else vlm_quantize_row(vtype, x, y, n); /* not a vec_dot type: the reference quantizer */
}

/* ==== Scalar dot kernels (the reference) ================================= */

static void dot_f32(int64_t n, float *s, const void *vw, const void *va) {
    const float *w = vw, *a = va;
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += (double)(w[i] * a[i]);
    *s = (float)sum;
}

static void dot_f16(int64_t n, float *s, const void *vw, const void *va) {
    const uint16_t *w = vw, *a = va;
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += (double)(h2f(w[i]) * h2f(a[i]));
    *s = (float)sum;
}

static void dot_bf16(int64_t n, float *s, const void *vw, const void *va) {
    const uint16_t *w = vw, *a = va;
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += (double)(vlm_bf16_to_fp32(w[i]) * vlm_bf16_to_fp32(a[i]));
    *s = (float)sum;
}

static void dot_q4_0(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q4_0 *x = vw;
    const vlm_block_q8_0 *y = va;
    float sumf = 0;
    for (int64_t i = 0; i < n / 32; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            sumi += ((x[i].qs[j] & 0x0F) - 8) * y[i].qs[j];
            sumi += ((x[i].qs[j] >> 4) - 8) * y[i].qs[j + 16];
        }
        sumf += sumi * h2f(x[i].d) * h2f(y[i].d);
    }
    *s = sumf;
}

static void dot_q4_1(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q4_1 *x = vw;
    const vlm_block_q8_1 *y = va;
    float sumf = 0;
    for (int64_t i = 0; i < n / 32; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            sumi += (x[i].qs[j] & 0x0F) * y[i].qs[j];
            sumi += (x[i].qs[j] >> 4) * y[i].qs[j + 16];
        }
        sumf += (h2f(x[i].d) * h2f(y[i].d)) * sumi + h2f(x[i].m) * h2f(y[i].s);
    }
    *s = sumf;
}

static void dot_q5_0(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q5_0 *x = vw;
    const vlm_block_q8_0 *y = va;
    float sumf = 0;
    for (int64_t i = 0; i < n / 32; i++) {
        uint32_t qh;
        memcpy(&qh, x[i].qh, sizeof qh);
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            const int h0 = ((qh >> j) << 4) & 0x10;
            const int h1 = (qh >> (j + 12)) & 0x10;
            sumi += (((x[i].qs[j] & 0x0F) | h0) - 16) * y[i].qs[j];
            sumi += (((x[i].qs[j] >> 4) | h1) - 16) * y[i].qs[j + 16];
        }
        sumf += (h2f(x[i].d) * h2f(y[i].d)) * sumi;
    }
    *s = sumf;
}

static void dot_q5_1(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q5_1 *x = vw;
    const vlm_block_q8_1 *y = va;
    float sumf = 0;
    for (int64_t i = 0; i < n / 32; i++) {
        uint32_t qh;
        memcpy(&qh, x[i].qh, sizeof qh);
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            const int h0 = ((qh >> j) << 4) & 0x10;
            const int h1 = (qh >> (j + 12)) & 0x10;
            sumi += ((x[i].qs[j] & 0x0F) | h0) * y[i].qs[j];
            sumi += ((x[i].qs[j] >> 4) | h1) * y[i].qs[j + 16];
        }
        sumf += (h2f(x[i].d) * h2f(y[i].d)) * sumi + h2f(x[i].m) * h2f(y[i].s);
    }
    *s = sumf;
}

static void dot_q8_0(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q8_0 *x = vw;
    const vlm_block_q8_0 *y = va;
    float sumf = 0;
    for (int64_t i = 0; i < n / 32; i++) {
        int sumi = 0;
        for (int j = 0; j < 32; j++) sumi += x[i].qs[j] * y[i].qs[j];
        sumf += sumi * (h2f(x[i].d) * h2f(y[i].d));
    }
    *s = sumf;
}

static void dot_q4_K(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q4_K *x = vw;
    const vlm_block_q8_K *y = va;
    float sumf = 0;
    for (int64_t i = 0; i < n / VLM_QK_K; i++) {
        int32_t sumi = 0, summ = 0;
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            k4_scale_min(j, x[i].scales, &sc, &m);
            const uint8_t *q = x[i].qs + 32 * (j / 2);
            const int8_t *a = y[i].qs + 32 * j;
            int32_t sub = 0;
            for (int l = 0; l < 32; l++) sub += ((j & 1) ? (q[l] >> 4) : (q[l] & 0xF)) * a[l];
            sumi += sc * sub;
            summ += m * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        }
        const float d = h2f(x[i].d) * y[i].d;
        const float dmin = h2f(x[i].dmin) * y[i].d;
        sumf += d * sumi - dmin * summ;
    }
    *s = sumf;
}

static void dot_q5_K(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q5_K *x = vw;
    const vlm_block_q8_K *y = va;
    float sumf = 0;
    for (int64_t i = 0; i < n / VLM_QK_K; i++) {
        int32_t sumi = 0, summ = 0;
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            k4_scale_min(j, x[i].scales, &sc, &m);
            const uint8_t *q = x[i].qs + 32 * (j / 2);
            const int8_t *a = y[i].qs + 32 * j;
            int32_t sub = 0;
            for (int l = 0; l < 32; l++) {
                const int lo = (j & 1) ? (q[l] >> 4) : (q[l] & 0xF);
                const int hi = (x[i].qh[l] >> j) & 1;
                sub += (lo | (hi << 4)) * a[l];
            }
            sumi += sc * sub;
            summ += m * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        }
        const float d = h2f(x[i].d) * y[i].d;
        const float dmin = h2f(x[i].dmin) * y[i].d;
        sumf += d * sumi - dmin * summ;
    }
    *s = sumf;
}

static void dot_q6_K(int64_t n, float *s, const void *vw, const void *va) {
    const vlm_block_q6_K *x = vw;
    const vlm_block_q8_K *y = va;
    float sumf = 0;
    for (int64_t i = 0; i < n / VLM_QK_K; i++) {
        int8_t q[VLM_QK_K];
        const uint8_t *ql = x[i].ql;
        const uint8_t *qh = x[i].qh;
        for (int h = 0; h < 2; h++) {
            int8_t *o = q + 128 * h;
            for (int l = 0; l < 32; l++) {
                o[l + 0] = (int8_t)(((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
                o[l + 32] = (int8_t)(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
                o[l + 64] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                o[l + 96] = (int8_t)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
            }
            ql += 64;
            qh += 32;
        }
        int32_t sumi = 0;
        for (int j = 0; j < 16; j++) {
            int32_t sub = 0;
            for (int l = 0; l < 16; l++) sub += q[16 * j + l] * y[i].qs[16 * j + l];
            sumi += x[i].scales[j] * sub;
        }
        sumf += (h2f(x[i].d) * y[i].d) * sumi;
    }
    *s = sumf;
}

static void widen_f16_scalar(const void *x, float *y, int64_t n) {
    const uint16_t *h = x;
    for (int64_t i = 0; i < n; i++) y[i] = h2f(h[i]);
}

static void widen_bf16_scalar(const void *x, float *y, int64_t n) {
    const uint16_t *h = x;
    for (int64_t i = 0; i < n; i++) y[i] = vlm_bf16_to_fp32(h[i]);
}

const vlm__kernel_table_t vlm__kernels_scalar = {
    .isa = VLM_ISA_SCALAR,
    .vec_dot = {
        [VLM_DTYPE_F32] = dot_f32,   [VLM_DTYPE_F16] = dot_f16,   [VLM_DTYPE_BF16] = dot_bf16,
        [VLM_DTYPE_Q4_0] = dot_q4_0, [VLM_DTYPE_Q4_1] = dot_q4_1, [VLM_DTYPE_Q5_0] = dot_q5_0,
        [VLM_DTYPE_Q5_1] = dot_q5_1, [VLM_DTYPE_Q8_0] = dot_q8_0, [VLM_DTYPE_Q4_K] = dot_q4_K,
        [VLM_DTYPE_Q5_K] = dot_q5_K, [VLM_DTYPE_Q6_K] = dot_q6_K,
    },
    .quantize_act = {
        [VLM_DTYPE_F32] = act_f32,          [VLM_DTYPE_F16] = act_f16_scalar,
        [VLM_DTYPE_BF16] = act_bf16_scalar, [VLM_DTYPE_Q8_0] = act_q8_0_scalar,
        [VLM_DTYPE_Q8_1] = act_q8_1_scalar, [VLM_DTYPE_Q8_K] = act_q8_K_scalar,
    },
    .widen = {
        [VLM_DTYPE_F16] = widen_f16_scalar, [VLM_DTYPE_BF16] = widen_bf16_scalar,
    },
    .panel_rows = 0,
};

/* ==== Run-time dispatch ================================================== */

static vlm_isa_t isa_cpu(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return VLM_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return VLM_ISA_AVX2;
    return VLM_ISA_SCALAR;
}

/* The CPU's ISA, computed once (idempotent, so a benign race). */
static vlm_isa_t isa_supported(void) {
    static atomic_int cached = -1;
    int v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (v < 0) {
        v = (int)isa_cpu();
        atomic_store_explicit(&cached, v, memory_order_relaxed);
    }
    return (vlm_isa_t)v;
}

vlm_isa_t vlm_isa_best(void) {
    static atomic_int cached = -1;
    int v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (v < 0) {
        v = (int)isa_supported();
        const char *env = getenv("VLM_ISA");
        if (env) {
            int want = v;
            if (strcmp(env, "scalar") == 0) want = VLM_ISA_SCALAR;
            else if (strcmp(env, "avx2") == 0) want = VLM_ISA_AVX2;
            else if (strcmp(env, "avx512") == 0) want = VLM_ISA_AVX512;
            if (want < v) v = want;
        }
        atomic_store_explicit(&cached, v, memory_order_relaxed);
    }
    return (vlm_isa_t)v;
}

const char *vlm_isa_name(vlm_isa_t isa) {
    switch (isa) {
    case VLM_ISA_SCALAR: return "scalar";
    case VLM_ISA_AVX2: return "avx2";
    case VLM_ISA_AVX512: return "avx512";
    default: return "unknown";
    }
}

const vlm__kernel_table_t *vlm__kernels_get(vlm_isa_t isa) {
    if (isa > isa_supported()) isa = isa_supported();
    switch (isa) {
    case VLM_ISA_AVX512: return &vlm__kernels_avx512;
    case VLM_ISA_AVX2: return &vlm__kernels_avx2;
    default: return &vlm__kernels_scalar;
    }
}

vlm_vec_dot_fn vlm_vec_dot_get(uint32_t wtype) { return vlm_vec_dot_get_isa(wtype, vlm_isa_best()); }

vlm_vec_dot_fn vlm_vec_dot_get_isa(uint32_t wtype, vlm_isa_t isa) {
    if (wtype >= VLM_DTYPE_COUNT || (unsigned)isa >= VLM_ISA_COUNT) return NULL;
    if (isa > isa_supported()) return NULL;
    const vlm__kernel_table_t *k = vlm__kernels_get(isa);
    return k->vec_dot[wtype] ? k->vec_dot[wtype] : vlm__kernels_scalar.vec_dot[wtype];
}
