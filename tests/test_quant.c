/* tests/test_quant.c - dequantizers, quantizers, activation quantization,
 * dot kernels and matmul.
 *
 * What is checked, and against what:
 *  - dequantizers: hand-built blocks of every type whose values follow from
 *    the documented block layouts (ggml-common.h), exact outputs;
 *  - reference quantizers: quantize -> dequantize error bounds, hand-checked
 *    blocks, and idempotence on the llama-quantize output in the golden
 *    files (re-quantizing a dequantized Q8_0/Q4_0 tensor must give the same
 *    bytes);
 *  - activation quantization: crafted inputs with known ggml results (round
 *    half to even, id = 127/amax, all-zero and subnormal blocks, Q8_K's sign
 *    choice), and every SIMD version bit-identical to the scalar one;
 *  - dot kernels: every ISA against the scalar reference, and bit for bit
 *    against a scalar emulation of llama.cpp's float summation order;
 *  - vlm_matmul: every type, batch sizes 1..64, odd row counts, 1 and 2
 *    threads, with and without prepared panels, against scalar dots, against
 *    vlm_matmul_ref, and bit for bit against ggml's order; vlm_matmul_multi
 *    against separate calls;
 *  - F32 / F16 / BF16 weights: every ISA bit for bit against a scalar
 *    emulation of llamafile tinyBLAS's order (batch sizes 1..200, rows that
 *    are and are not multiples of the chunk, 1 and 2 threads), and, where the
 *    CPU has AVX-512 (and AVX512_BF16), against tinyBLAS's inner loop written
 *    with the same intrinsics it uses;
 *  - batch invariance, every type: row t of a 40-row call equals the same
 *    row computed alone, bit for bit;
 *  - the golden Q4_K_M / Q4_0 / Q8_0 models, quantized from the same f32
 *    weights, dequantize to values that agree within each type's error.
 */
#include <immintrin.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "core/error.h"
#include "core/gguf.h"
#include "core/kernels.h"
#include "core/matmul.h"
#include "core/pool.h"
#include "core/quant.h"
#include "tests/harness.h"

/* ==== Helpers ============================================================ */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static void rng_seed(uint64_t s) { rng_state = s * 0x9E3779B97F4A7C15ull + 1; }

static double rng_uniform(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) * (1.0 / 9007199254740992.0);
}

static float rng_gauss(void) {
    const double u = rng_uniform() + 1e-12, v = rng_uniform();
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

static void fill_gauss(float *x, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) x[i] = rng_gauss() * scale;
}

static uint16_t h(float f) { return vlm_fp32_to_fp16(f); }

/* A matmul call that must succeed (it fails only when out of memory). */
#define MM_OK(call) CHECK((call) == VLM_OK, "matmul failed")

static const uint32_t weight_types[] = {
    VLM_DTYPE_F32,  VLM_DTYPE_F16,  VLM_DTYPE_BF16, VLM_DTYPE_Q4_0, VLM_DTYPE_Q4_1, VLM_DTYPE_Q5_0,
    VLM_DTYPE_Q5_1, VLM_DTYPE_Q8_0, VLM_DTYPE_Q4_K, VLM_DTYPE_Q5_K, VLM_DTYPE_Q6_K,
};
#define N_WEIGHT_TYPES (sizeof weight_types / sizeof weight_types[0])

static int block_of(uint32_t t) { return vlm_dtype_info(t)->block_size; }

/* Dequantizes a row of a vec_dot type (Q8_0/Q8_1/Q8_K/F16/BF16/F32). */
static void dequant(uint32_t t, const void *src, float *dst, int64_t n) {
    int rc = vlm_dtype_dequantize_row(t, src, dst, n);
    VLM_ASSERT(rc == VLM_OK);
}

/* ==== Dequantization: known values ======================================= */

static void test_dequant_float_types(void) {
    const uint16_t f16[] = {0x3C00, 0xC000, 0x3800, 0x7BFF, 0x0001, 0x8000};
    const float f16_want[] = {1.0f, -2.0f, 0.5f, 65504.0f, 0x1p-24f, -0.0f};
    const uint16_t bf16[] = {0x3F80, 0xC040, 0x4049, 0x0000};
    const float bf16_want[] = {1.0f, -3.0f, 3.140625f, 0.0f};
    const float f32[] = {1.5f, -7.25f, 1e-30f};
    float out[8];
    REQUIRE(vlm_dtype_dequantize_row(VLM_DTYPE_F16, f16, out, 6) == VLM_OK);
    for (int i = 0; i < 6; i++) CHECK(memcmp(&out[i], &f16_want[i], 4) == 0, "f16 %d: %g", i, out[i]);
    REQUIRE(vlm_dtype_dequantize_row(VLM_DTYPE_BF16, bf16, out, 4) == VLM_OK);
    for (int i = 0; i < 4; i++) CHECK(out[i] == bf16_want[i], "bf16 %d: %g", i, out[i]);
    REQUIRE(vlm_dtype_dequantize_row(VLM_DTYPE_F32, f32, out, 3) == VLM_OK);
    CHECK(memcmp(out, f32, sizeof f32) == 0);
}

static void test_dequant_q4_0_q4_1(void) {
    vlm_block_q4_0 b0 = {.d = h(0.5f)};
    vlm_block_q4_1 b1 = {.d = h(0.25f), .m = h(-1.5f)};
    for (int j = 0; j < 16; j++) {
        b0.qs[j] = (uint8_t)(j | ((15 - j) << 4));
        b1.qs[j] = (uint8_t)(((7 * j) % 16) | (j << 4));
    }
    float y[32];
    REQUIRE(vlm_dtype_dequantize_row(VLM_DTYPE_Q4_0, &b0, y, 32) == VLM_OK);
    for (int j = 0; j < 16; j++) {
        CHECK(y[j] == (j - 8) * 0.5f, "q4_0 [%d] = %g", j, y[j]);
        CHECK(y[16 + j] == (7 - j) * 0.5f, "q4_0 [%d] = %g", 16 + j, y[16 + j]);
    }
    REQUIRE(vlm_dtype_dequantize_row(VLM_DTYPE_Q4_1, &b1, y, 32) == VLM_OK);
    for (int j = 0; j < 16; j++) {
        CHECK(y[j] == ((7 * j) % 16) * 0.25f - 1.5f, "q4_1 [%d] = %g", j, y[j]);
        CHECK(y[16 + j] == j * 0.25f - 1.5f, "q4_1 [%d] = %g", 16 + j, y[16 + j]);
    }
}

static void test_dequant_q5_0_q5_1(void) {
    const uint32_t qh = 0xF00FA5C3u; /* bit i: 5th bit of element i */
    vlm_block_q5_0 b0 = {.d = h(0.125f)};
    vlm_block_q5_1 b1 = {.d = h(0.5f), .m = h(2.0f)};
    memcpy(b0.qh, &qh, 4);
    memcpy(b1.qh, &qh, 4);
    int q[32];
    for (int j = 0; j < 16; j++) {
        const int lo = j, hi = (3 * j) % 16;
        b0.qs[j] = b1.qs[j] = (uint8_t)(lo | (hi << 4));
        q[j] = lo | (int)((qh >> j) & 1) << 4;
        q[16 + j] = hi | (int)((qh >> (16 + j)) & 1) << 4;
    }
    float y[32];
    REQUIRE(vlm_dtype_dequantize_row(VLM_DTYPE_Q5_0, &b0, y, 32) == VLM_OK);
    for (int i = 0; i < 32; i++) CHECK(y[i] == (q[i] - 16) * 0.125f, "q5_0 [%d] = %g", i, y[i]);
    REQUIRE(vlm_dtype_dequantize_row(VLM_DTYPE_Q5_1, &b1, y, 32) == VLM_OK);
    for (int i = 0; i < 32; i++) CHECK(y[i] == q[i] * 0.5f + 2.0f, "q5_1 [%d] = %g", i, y[i]);
}

static void test_dequant_q8_0_q8_K(void) {
    vlm_block_q8_0 b = {.d = h(2.0f)};
    for (int j = 0; j < 32; j++) b.qs[j] = (int8_t)(j * 8 - 128);
    float y[256];
    REQUIRE(vlm_dtype_dequantize_row(VLM_DTYPE_Q8_0, &b, y, 32) == VLM_OK);
    for (int j = 0; j < 32; j++) CHECK(y[j] == (j * 8 - 128) * 2.0f, "q8_0 [%d] = %g", j, y[j]);
    vlm_block_q8_K k = {.d = 0.75f};
    for (int j = 0; j < 256; j++) k.qs[j] = (int8_t)((j * 13) % 255 - 127);
    REQUIRE(vlm_dtype_dequantize_row(VLM_DTYPE_Q8_K, &k, y, 256) == VLM_OK);
    for (int j = 0; j < 256; j++) CHECK(y[j] == ((j * 13) % 255 - 127) * 0.75f, "q8_K [%d] = %g", j, y[j]);
}

/* The 12 scale bytes of Q4_K/Q5_K, packed from 6-bit scales and mins as
 * ggml-common.h describes: bytes 0-3 scales 0-3, bytes 4-7 mins 0-3 (6 bits
 * each), bytes 8-11 the low nibbles of scale/min 4-7, whose top 2 bits go to
 * the top of bytes 0-3 (scales) and 4-7 (mins). */
static void pack_k_scales(const uint8_t sc[8], const uint8_t m[8], uint8_t out[12]) {
    for (int j = 0; j < 4; j++) {
        out[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        out[j + 4] = (uint8_t)((m[j] & 63) | ((m[j + 4] >> 4) << 6));
        out[j + 8] = (uint8_t)((sc[j + 4] & 15) | ((m[j + 4] & 15) << 4));
    }
}

static const uint8_t k_sc[8] = {1, 17, 33, 63, 2, 40, 59, 31};
static const uint8_t k_m[8] = {0, 5, 63, 12, 48, 7, 30, 61};

static void test_dequant_q4_K(void) {
    vlm_block_q4_K b = {.d = h(1.0f), .dmin = h(0.5f)};
    pack_k_scales(k_sc, k_m, b.scales);
    /* value of element l of 32-element sub-block s */
#define V4(s, l) (((s) * 5 + (l) * 3) % 16)
    for (int g = 0; g < 4; g++)
        for (int l = 0; l < 32; l++) b.qs[32 * g + l] = (uint8_t)(V4(2 * g, l) | (V4(2 * g + 1, l) << 4));
    float y[256];
    REQUIRE(vlm_dtype_dequantize_row(VLM_DTYPE_Q4_K, &b, y, 256) == VLM_OK);
    for (int s = 0; s < 8; s++)
        for (int l = 0; l < 32; l++) {
            const float want = (float)k_sc[s] * V4(s, l) - 0.5f * k_m[s];
            CHECK(y[32 * s + l] == want, "q4_K [%d][%d] = %g, want %g", s, l, y[32 * s + l], want);
        }
#undef V4
}

static void test_dequant_q5_K(void) {
    vlm_block_q5_K b = {.d = h(0.5f), .dmin = h(0.25f)};
    pack_k_scales(k_sc, k_m, b.scales);
#define V5(s, l) (((s) * 7 + (l) * 5) % 32)
    for (int g = 0; g < 4; g++)
        for (int l = 0; l < 32; l++)
            b.qs[32 * g + l] = (uint8_t)((V5(2 * g, l) & 15) | ((V5(2 * g + 1, l) & 15) << 4));
    for (int l = 0; l < 32; l++) {
        uint8_t bits = 0;
        for (int s = 0; s < 8; s++) bits |= (uint8_t)((V5(s, l) >> 4) << s); /* bit s: sub-block s */
        b.qh[l] = bits;
    }
    float y[256];
    REQUIRE(vlm_dtype_dequantize_row(VLM_DTYPE_Q5_K, &b, y, 256) == VLM_OK);
    for (int s = 0; s < 8; s++)
        for (int l = 0; l < 32; l++) {
            const float want = 0.5f * k_sc[s] * V5(s, l) - 0.25f * k_m[s];
            CHECK(y[32 * s + l] == want, "q5_K [%d][%d] = %g, want %g", s, l, y[32 * s + l], want);
        }
#undef V5
}

static void test_dequant_q6_K(void) {
    static const int8_t sc[16] = {1, -1, 2, -3, 5, -8, 13, -21, 34, -55, 89, -128, 127, 7, 0, -2};
    vlm_block_q6_K b = {.d = h(0.25f)};
    memcpy(b.scales, sc, 16);
#define V6(i) (((i) * 37 + 11) % 64)
    /* Each half of 128: ql[l] = elements l (low) and l+64 (high nibble),
     * ql[32+l] = l+32 and l+96; qh[l] holds the top 2 bits of l, l+32,
     * l+64, l+96 in bits 0-1, 2-3, 4-5, 6-7. */
    for (int hf = 0; hf < 2; hf++) {
        const int e = 128 * hf;
        for (int l = 0; l < 32; l++) {
            b.ql[64 * hf + l] = (uint8_t)((V6(e + l) & 15) | ((V6(e + 64 + l) & 15) << 4));
            b.ql[64 * hf + 32 + l] = (uint8_t)((V6(e + 32 + l) & 15) | ((V6(e + 96 + l) & 15) << 4));
            b.qh[32 * hf + l] = (uint8_t)((V6(e + l) >> 4) | ((V6(e + 32 + l) >> 4) << 2) |
                                          ((V6(e + 64 + l) >> 4) << 4) | ((V6(e + 96 + l) >> 4) << 6));
        }
    }
    float y[256];
    REQUIRE(vlm_dtype_dequantize_row(VLM_DTYPE_Q6_K, &b, y, 256) == VLM_OK);
    for (int i = 0; i < 256; i++) {
        const float want = 0.25f * sc[i / 16] * (V6(i) - 32);
        CHECK(y[i] == want, "q6_K [%d] = %g, want %g", i, y[i], want);
    }
#undef V6
}

static void test_dequant_bad_args(void) {
    float y[64];
    uint8_t blk[64] = {0};
    CHECK(vlm_dtype_dequantize_row(VLM_DTYPE_Q4_0, blk, y, 33) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_dtype_dequantize_row(VLM_DTYPE_Q4_K, blk, y, 32) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_dtype_dequantize_row(VLM_DTYPE_Q2_K, blk, y, 256) == VLM_ERR_UNSUPPORTED);
    CHECK(vlm_dtype_dequantize_row(99, blk, y, 32) == VLM_ERR_UNSUPPORTED);
    CHECK(vlm_quantize_row(VLM_DTYPE_Q3_K, y, blk, 256) == VLM_ERR_UNSUPPORTED);
    CHECK(vlm_quantize_row(VLM_DTYPE_Q8_0, y, blk, 40) == VLM_ERR_INVALID_ARG);
}

/* ==== Reference quantizers ================================================ */

static void test_quantize_known_blocks(void) {
    /* Q4_0: the largest |x| is -8, so d = max/-8 = 1 and q = x + 8. */
    float x[32];
    for (int j = 0; j < 32; j++) x[j] = (float)(j % 16 - 8);
    vlm_block_q4_0 b4;
    REQUIRE(vlm_quantize_row(VLM_DTYPE_Q4_0, x, &b4, 32) == VLM_OK);
    CHECK(b4.d == h(1.0f));
    for (int j = 0; j < 16; j++) CHECK(b4.qs[j] == (uint8_t)(j | (j << 4)), "q4_0 qs[%d] = %#x", j, b4.qs[j]);

    /* Q8_0 reference: d = amax/127, q = roundf(x/d): halves round away from
     * zero (unlike the activation quantizer, see below). */
    memset(x, 0, sizeof x);
    x[0] = 127.0f;
    x[1] = 2.5f;
    x[2] = -2.5f;
    x[3] = 0.5f;
    vlm_block_q8_0 b8;
    REQUIRE(vlm_quantize_row(VLM_DTYPE_Q8_0, x, &b8, 32) == VLM_OK);
    CHECK(b8.d == h(1.0f));
    CHECK(b8.qs[0] == 127 && b8.qs[1] == 3 && b8.qs[2] == -3 && b8.qs[3] == 1,
          "q8_0 ref: %d %d %d %d", b8.qs[0], b8.qs[1], b8.qs[2], b8.qs[3]);

    /* Q8_1 reference: s = d * sum(q). */
    vlm_block_q8_1 b81;
    REQUIRE(vlm_quantize_row(VLM_DTYPE_Q8_1, x, &b81, 32) == VLM_OK);
    CHECK(b81.s == h(128.0f), "q8_1 s = %g", vlm_fp16_to_fp32(b81.s));

    /* Q6_K of an all-zero block is all zero bytes. */
    float z[256] = {0};
    vlm_block_q6_K b6;
    memset(&b6, 0xAB, sizeof b6);
    REQUIRE(vlm_quantize_row(VLM_DTYPE_Q6_K, z, &b6, 256) == VLM_OK);
    const vlm_block_q6_K zero6 = {0};
    CHECK(memcmp(&b6, &zero6, sizeof b6) == 0);
}

/* Relative RMS error of quantize -> dequantize on gaussian data, per type.
 * The bounds are a little above what ggml's quantizers reach on N(0,1). */
static void test_quantize_roundtrip_error(void) {
    static const struct { uint32_t type; double max_rel_rmse; } cases[] = {
        {VLM_DTYPE_F16, 2.5e-4}, {VLM_DTYPE_BF16, 2e-3},  {VLM_DTYPE_Q4_0, 0.095}, {VLM_DTYPE_Q4_1, 0.088},
        {VLM_DTYPE_Q5_0, 0.048}, {VLM_DTYPE_Q5_1, 0.043}, {VLM_DTYPE_Q8_0, 0.006},  {VLM_DTYPE_Q8_1, 0.006},
        {VLM_DTYPE_Q4_K, 0.08},  {VLM_DTYPE_Q5_K, 0.04},  {VLM_DTYPE_Q6_K, 0.02},   {VLM_DTYPE_Q8_K, 0.008},
    };
    const int64_t n = 8192;
    float *x = malloc(n * sizeof *x), *y = malloc(n * sizeof *y);
    uint8_t *q = malloc(n * 4);
    REQUIRE(x && y && q);
    rng_seed(11);
    fill_gauss(x, n, 1.0f);
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const uint32_t t = cases[c].type;
        CHECK(vlm_quantize_row(t, x, q, n) == VLM_OK);
        dequant(t, q, y, n);
        double se = 0, sx = 0;
        for (int64_t i = 0; i < n; i++) {
            se += (double)(y[i] - x[i]) * (y[i] - x[i]);
            sx += (double)x[i] * x[i];
        }
        const double rel = sqrt(se / sx);
        CHECK(rel <= cases[c].max_rel_rmse && rel > 0, "%s: relative RMSE %.5f > %.5f", vlm_dtype_name(t), rel,
              cases[c].max_rel_rmse);
    }
    free(x);
    free(y);
    free(q);
}

/* ==== Activation quantization ============================================= */

/* Runs the activation quantizer of every ISA this CPU has and checks they
 * produce identical bytes; returns the scalar result in out. */
static int act_all_isas(uint32_t vtype, const float *x, void *out, int64_t n) {
    const size_t rb = vlm_dtype_row_size(vtype, n);
    uint8_t *tmp = malloc(rb);
    VLM_ASSERT(tmp != NULL);
    vlm__kernels_scalar.quantize_act[vtype](x, out, n);
    int mismatches = 0;
    for (int isa = 1; isa <= (int)vlm_isa_best(); isa++) {
        const vlm__kernel_table_t *k = vlm__kernels_get((vlm_isa_t)isa);
        if (!k->quantize_act[vtype]) continue;
        memset(tmp, 0x5A, rb);
        k->quantize_act[vtype](x, tmp, n);
        if (memcmp(tmp, out, rb) != 0) mismatches++;
    }
    memset(tmp, 0x5A, rb);
    vlm_quantize_activation_row(vtype, x, tmp, n);
    if (memcmp(tmp, out, rb) != 0) mismatches++;
    free(tmp);
    return mismatches;
}

static void test_act_q8_0_ggml_rounding(void) {
    float x[64] = {0};
    /* block 0: amax 127 -> d = 1, id = 1: halves go to even */
    x[0] = 127.0f;
    x[1] = 2.5f;
    x[2] = 3.5f;
    x[3] = -2.5f;
    x[4] = -3.5f;
    x[5] = 0.5f;
    x[6] = 1.5f;
    x[7] = -0.5f;
    x[8] = -127.0f;
    /* block 1 stays all zero */
    vlm_block_q8_0 y[2];
    CHECK(act_all_isas(VLM_DTYPE_Q8_0, x, y, 64) == 0, "SIMD and scalar Q8_0 differ");
    CHECK(y[0].d == h(1.0f));
    const int8_t want[9] = {127, 2, 4, -2, -4, 0, 2, 0, -127};
    for (int j = 0; j < 9; j++) CHECK(y[0].qs[j] == want[j], "q[%d] = %d, want %d", j, y[0].qs[j], want[j]);
    CHECK(y[1].d == 0);
    for (int j = 0; j < 32; j++) CHECK(y[1].qs[j] == 0);

    /* Q8_1 of the same: s = f16(d * sum(q)) */
    vlm_block_q8_1 y1[2];
    CHECK(act_all_isas(VLM_DTYPE_Q8_1, x, y1, 64) == 0, "SIMD and scalar Q8_1 differ");
    CHECK(memcmp(y1[0].qs, y[0].qs, 32) == 0);
    CHECK(y1[0].s == h(2.0f), "s = %g", vlm_fp16_to_fp32(y1[0].s)); /* 127+2+4-2-4+0+2+0-127 */
    CHECK(y1[1].d == 0 && y1[1].s == 0);
}

/* ggml's x86 quantizer multiplies by id = 127/amax, not by 1/d with
 * d = amax/127 as the reference quantizer does; the two products round
 * differently for some inputs. Finds such an input and checks we follow
 * 127/amax. */
static void test_act_q8_0_reciprocal(void) {
    int found = 0;
    for (int a = 1; a < 4000 && !found; a++) {
        const float amax = 0.37f + (float)a * 0.0137f;
        const float d = amax / 127.f;
        const float id_x86 = 127.f / amax, id_ref = 1.0f / d;
        if (id_x86 == id_ref) continue;
        for (int k = 1; k < 126 && !found; k++) {
            /* candidates just around (k + 0.5) * d, where the products straddle .5 */
            float cand = (k + 0.5f) * d;
            for (int i = 0; i < 4; i++) cand = nextafterf(cand, 0.0f);
            for (int step = 0; step < 9 && !found; step++, cand = nextafterf(cand, 1e9f)) {
                if (rintf(cand * id_x86) == rintf(cand * id_ref)) continue;
                float x[32] = {0};
                x[0] = amax;
                x[1] = cand;
                vlm_block_q8_0 y;
                CHECK(act_all_isas(VLM_DTYPE_Q8_0, x, &y, 32) == 0);
                CHECK(y.qs[1] == (int8_t)rintf(cand * id_x86), "x=%.9g amax=%.9g: q=%d, want %d (not %d)", cand, amax,
                      y.qs[1], (int)rintf(cand * id_x86), (int)rintf(cand * id_ref));
                found = 1;
            }
        }
    }
    CHECK(found, "no input found where 127/amax and 1/d round differently");
}

/* An amax so small that 127/amax overflows to infinity: ggml's AVX2 code
 * turns the inf/NaN products into INT_MIN, packed to -128, with d = 0. */
static void test_act_q8_0_subnormal_amax(void) {
    float x[32];
    for (int j = 0; j < 32; j++) x[j] = (float)(j - 16) * 1e-40f;
    vlm_block_q8_0 y;
    CHECK(act_all_isas(VLM_DTYPE_Q8_0, x, &y, 32) == 0);
    CHECK(y.d == 0, "d = %#x", y.d);
    for (int j = 0; j < 32; j++) CHECK(y.qs[j] == -128, "q[%d] = %d", j, y.qs[j]);
    vlm_block_q8_1 y1;
    CHECK(act_all_isas(VLM_DTYPE_Q8_1, x, &y1, 32) == 0);
    CHECK(y1.d == 0 && y1.s == 0);
}

static void test_act_q8_K_ggml(void) {
    float x[512] = {0};
    /* block 0: max |x| = 127 first reached by +127 -> iscale = -1, d = -1 */
    x[0] = 2.5f;
    x[1] = 3.5f;
    x[2] = -0.5f;
    x[3] = 127.0f;
    x[4] = -127.0f; /* same |x| later: the first one sets the sign */
    x[20] = 10.0f;
    /* block 1: all zero */
    vlm_block_q8_K y[2];
    CHECK(act_all_isas(VLM_DTYPE_Q8_K, x, y, 512) == 0, "SIMD and scalar Q8_K differ");
    CHECK(y[0].d == -1.0f, "d = %g", y[0].d);
    CHECK(y[0].qs[0] == -2 && y[0].qs[1] == -4 && y[0].qs[2] == 0 && y[0].qs[3] == -127 && y[0].qs[4] == 127,
          "%d %d %d %d %d", y[0].qs[0], y[0].qs[1], y[0].qs[2], y[0].qs[3], y[0].qs[4]);
    CHECK(y[0].bsums[0] == -2 - 4 - 127 + 127, "bsums[0] = %d", y[0].bsums[0]);
    CHECK(y[0].bsums[1] == -10, "bsums[1] = %d", y[0].bsums[1]);
    CHECK(y[1].d == 0);
    for (int j = 0; j < 16; j++) CHECK(y[1].bsums[j] == 0);
    /* subnormal amax: -127/max is infinite, every quant becomes 0 */
    for (int j = 0; j < 256; j++) x[j] = (float)(j % 7 - 3) * 1e-39f;
    CHECK(act_all_isas(VLM_DTYPE_Q8_K, x, y, 256) == 0);
    CHECK(y[0].d == 0);
    for (int j = 0; j < 256; j++) CHECK(y[0].qs[j] == 0);
}

static void test_act_f16_bf16_rounding(void) {
    /* halfway cases round to even */
    float x[8] = {1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, -(1.0f + 0x1p-11f), 65520.0f, 1e-8f, 0.1f, -0.0f, 3.0f};
    const uint16_t want16[8] = {0x3C00, 0x3C02, 0xBC00, 0x7C00, 0x0000, 0x2E66, 0x8000, 0x4200};
    uint16_t y[8];
    CHECK(act_all_isas(VLM_DTYPE_F16, x, y, 8) == 0);
    for (int i = 0; i < 8; i++) CHECK(y[i] == want16[i], "f16 %d: %#x, want %#x", i, y[i], want16[i]);
    float b[4] = {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 3.140625f, -2.0f};
    const uint16_t wantb[4] = {0x3F80, 0x3F82, 0x4049, 0xC000};
    CHECK(act_all_isas(VLM_DTYPE_BF16, b, y, 4) == 0);
    for (int i = 0; i < 4; i++) CHECK(y[i] == wantb[i], "bf16 %d: %#x, want %#x", i, y[i], wantb[i]);
}

/* Random rows, including blocks of exact ties and zeros: every ISA's
 * activation quantizer is bit-identical to the scalar one. */
static void test_act_simd_matches_scalar(void) {
    const uint32_t vtypes[] = {VLM_DTYPE_Q8_0, VLM_DTYPE_Q8_1, VLM_DTYPE_Q8_K, VLM_DTYPE_F16, VLM_DTYPE_BF16};
    const int64_t n = 2048;
    float *x = malloc(n * sizeof *x);
    uint8_t *y = malloc(n * 4);
    REQUIRE(x && y);
    rng_seed(5);
    for (int rep = 0; rep < 40; rep++) {
        fill_gauss(x, n, rep % 3 == 0 ? 1e-3f : 3.0f);
        if (rep % 4 == 1)
            for (int64_t i = 0; i < n; i++) x[i] = (float)((int)(x[i] * 4)) * 0.5f; /* many ties */
        if (rep % 5 == 2) memset(x + 256, 0, 256 * sizeof *x);
        for (size_t v = 0; v < sizeof vtypes / sizeof vtypes[0]; v++)
            CHECK(act_all_isas(vtypes[v], x, y, n) == 0, "rep %d: %s differs between ISAs", rep,
                  vlm_dtype_name(vtypes[v]));
    }
    free(x);
    free(y);
}

/* ==== ggml's summation order, emulated in scalar code ===================== */

/* llama.cpp's x86 CPU backend (c392e50) adds the float terms of a quantized
 * dot product in a fixed order, which vlmd's SIMD kernels reproduce so that
 * logits come out bit-identical. These plain scalar versions of those
 * orders (written from the block layouts, with fmaf where ggml's code or
 * build fuses a multiply-add) are the references the kernels must match
 * exactly. Lane k of a 32-value group holds its values 4k..4k+3. */

/* ggml's hsum_float_8 */
static float hsum8(const float x[8]) { return ((x[0] + x[4]) + (x[2] + x[6])) + ((x[1] + x[5]) + (x[3] + x[7])); }

/* The 32 integer values of block b of a 32-block weight row (Q4_0: q - 8,
 * Q5_0: q - 16, Q8_0: q, Q4_1/Q5_1: q), and its d and m. */
static void block32_values(uint32_t t, const uint8_t *row, int64_t b, int v[32], float *d, float *m) {
    *m = 0;
    uint32_t qh = 0;
    const uint8_t *qs = NULL;
    switch (t) {
    case VLM_DTYPE_Q4_0: {
        const vlm_block_q4_0 *x = (const vlm_block_q4_0 *)row + b;
        *d = vlm_fp16_to_fp32(x->d);
        qs = x->qs;
        break;
    }
    case VLM_DTYPE_Q4_1: {
        const vlm_block_q4_1 *x = (const vlm_block_q4_1 *)row + b;
        *d = vlm_fp16_to_fp32(x->d);
        *m = vlm_fp16_to_fp32(x->m);
        qs = x->qs;
        break;
    }
    case VLM_DTYPE_Q5_0: {
        const vlm_block_q5_0 *x = (const vlm_block_q5_0 *)row + b;
        *d = vlm_fp16_to_fp32(x->d);
        memcpy(&qh, x->qh, 4);
        qs = x->qs;
        break;
    }
    case VLM_DTYPE_Q5_1: {
        const vlm_block_q5_1 *x = (const vlm_block_q5_1 *)row + b;
        *d = vlm_fp16_to_fp32(x->d);
        *m = vlm_fp16_to_fp32(x->m);
        memcpy(&qh, x->qh, 4);
        qs = x->qs;
        break;
    }
    default: {
        const vlm_block_q8_0 *x = (const vlm_block_q8_0 *)row + b;
        *d = vlm_fp16_to_fp32(x->d);
        for (int e = 0; e < 32; e++) v[e] = x->qs[e];
        return;
    }
    }
    for (int e = 0; e < 32; e++) {
        int q = e < 16 ? (qs[e] & 15) : (qs[e - 16] >> 4);
        q |= (int)((qh >> e) & 1) << 4;
        v[e] = q - (t == VLM_DTYPE_Q4_0 ? 8 : t == VLM_DTYPE_Q5_0 ? 16 : 0);
    }
}

/* vec_dot / tinyBLAS order of the 32-block types: 8 float lanes, one fma
 * per block (d_w * d_a times the lane's integer sum); Q4_1/Q5_1 add m * s
 * into one float with an fma. */
static float ggml_dot_lanes32(uint32_t t, const uint8_t *row, const void *act, int64_t n) {
    float acc[8] = {0}, summs = 0;
    for (int64_t b = 0; b < n / 32; b++) {
        int v[32];
        float dw, mw;
        block32_values(t, row, b, v, &dw, &mw);
        const int8_t *a;
        float da, sa = 0;
        if (t == VLM_DTYPE_Q4_1 || t == VLM_DTYPE_Q5_1) {
            const vlm_block_q8_1 *y = (const vlm_block_q8_1 *)act + b;
            a = y->qs;
            da = vlm_fp16_to_fp32(y->d);
            sa = vlm_fp16_to_fp32(y->s);
        } else {
            const vlm_block_q8_0 *y = (const vlm_block_q8_0 *)act + b;
            a = y->qs;
            da = vlm_fp16_to_fp32(y->d);
        }
        const float d = dw * da;
        for (int k = 0; k < 8; k++) {
            int lane = 0;
            for (int e = 4 * k; e < 4 * k + 4; e++) lane += v[e] * a[e];
            acc[k] = fmaf(d, (float)lane, acc[k]);
        }
        if (t == VLM_DTYPE_Q4_1 || t == VLM_DTYPE_Q5_1) summs = fmaf(mw, sa, summs);
    }
    return hsum8(acc) + summs;
}

/* ggml's repacked Q4_0 (8x8 gemv/gemm) order: one fma per block of the
 * block's whole integer sum. */
static float ggml_dot_q4_0_repacked(const uint8_t *row, const void *act, int64_t n) {
    float acc = 0;
    for (int64_t b = 0; b < n / 32; b++) {
        int v[32];
        float dw, mw;
        block32_values(VLM_DTYPE_Q4_0, row, b, v, &dw, &mw);
        const vlm_block_q8_0 *y = (const vlm_block_q8_0 *)act + b;
        int sum = 0;
        for (int e = 0; e < 32; e++) sum += v[e] * y->qs[e];
        acc = fmaf((float)sum, dw * vlm_fp16_to_fp32(y->d), acc);
    }
    return acc;
}

/* AVX2 vec_dot order of the K-quants: per 256-block, lane k sums scale *
 * (values 4k..4k+3 of every group of 32) in integers, then one fma per
 * block into 8 float lanes; Q4_K's mins go into 4 float lanes, Q5_K's into
 * one float. */
static float ggml_dot_k(uint32_t t, const uint8_t *row, const void *act, int64_t n) {
    float acc[8] = {0}, accm[4] = {0}, summs = 0;
    float *deq = malloc(VLM_QK_K * sizeof *deq);
    VLM_ASSERT(deq != NULL);
    for (int64_t i = 0; i < n / VLM_QK_K; i++) {
        const vlm_block_q8_K *y = (const vlm_block_q8_K *)act + i;
        int q[VLM_QK_K], sc[16], mins[8] = {0};
        float dw, dminw = 0;
        /* recover the integer quants from the layouts described in dtype.h */
        if (t == VLM_DTYPE_Q6_K) {
            const vlm_block_q6_K *x = (const vlm_block_q6_K *)row + i;
            dw = vlm_fp16_to_fp32(x->d);
            for (int j = 0; j < 16; j++) sc[j] = x->scales[j];
            for (int h = 0; h < 2; h++)
                for (int l = 0; l < 32; l++) {
                    const uint8_t A = x->ql[64 * h + l], B = x->ql[64 * h + 32 + l], H = x->qh[32 * h + l];
                    q[128 * h + l] = ((A & 15) | ((H & 3) << 4)) - 32;
                    q[128 * h + 32 + l] = ((B & 15) | (((H >> 2) & 3) << 4)) - 32;
                    q[128 * h + 64 + l] = ((A >> 4) | (((H >> 4) & 3) << 4)) - 32;
                    q[128 * h + 96 + l] = ((B >> 4) | (((H >> 6) & 3) << 4)) - 32;
                }
        } else {
            const vlm_block_q4_K *x4 = (const vlm_block_q4_K *)row + i;
            const vlm_block_q5_K *x5 = (const vlm_block_q5_K *)row + i;
            const uint8_t *scales = t == VLM_DTYPE_Q4_K ? x4->scales : x5->scales;
            const uint8_t *qs = t == VLM_DTYPE_Q4_K ? x4->qs : x5->qs;
            dw = vlm_fp16_to_fp32(t == VLM_DTYPE_Q4_K ? x4->d : x5->d);
            dminw = vlm_fp16_to_fp32(t == VLM_DTYPE_Q4_K ? x4->dmin : x5->dmin);
            for (int j = 0; j < 8; j++) {
                sc[j] = j < 4 ? scales[j] & 63 : (scales[j + 4] & 15) | ((scales[j - 4] >> 6) << 4);
                mins[j] = j < 4 ? scales[j + 4] & 63 : (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
                for (int l = 0; l < 32; l++) {
                    int v = (j & 1) ? qs[32 * (j / 2) + l] >> 4 : qs[32 * (j / 2) + l] & 15;
                    if (t == VLM_DTYPE_Q5_K) v |= ((x5->qh[l] >> j) & 1) << 4;
                    q[32 * j + l] = v;
                }
            }
        }
        int lane[8] = {0};
        for (int g = 0; g < 8; g++)
            for (int k = 0; k < 8; k++) {
                int s4 = 0;
                for (int e = 4 * k; e < 4 * k + 4; e++) s4 += q[32 * g + e] * y->qs[32 * g + e];
                const int scale = t == VLM_DTYPE_Q6_K ? sc[2 * g + (k >= 4)] : sc[g];
                lane[k] += scale * s4;
            }
        const float d = y->d * dw;
        for (int k = 0; k < 8; k++) acc[k] = fmaf(d, (float)lane[k], acc[k]);
        if (t != VLM_DTYPE_Q6_K) {
            const float dmin = -y->d * dminw;
            int S[8];
            for (int j = 0; j < 8; j++) S[j] = y->bsums[2 * j] + y->bsums[2 * j + 1];
            if (t == VLM_DTYPE_Q4_K) {
                for (int l = 0; l < 4; l++)
                    accm[l] = fmaf(dmin, (float)(mins[2 * l] * S[2 * l] + mins[2 * l + 1] * S[2 * l + 1]), accm[l]);
            } else {
                int ms = 0;
                for (int j = 0; j < 8; j++) ms += mins[j] * S[j];
                summs = fmaf(dmin, (float)ms, summs);
            }
        }
    }
    free(deq);
    return hsum8(acc) + (t == VLM_DTYPE_Q4_K ? (accm[0] + accm[2]) + (accm[1] + accm[3]) : summs);
}

/* What llama.cpp computes for one output of a quantized weight with n_out
 * rows (ggml repacks Q4_0 only when n_out is a multiple of 8). */
static float ggml_dot(uint32_t t, const uint8_t *row, const void *act, int64_t n, int64_t n_out) {
    if (t == VLM_DTYPE_Q4_0 && n_out % 8 == 0) return ggml_dot_q4_0_repacked(row, act, n);
    if (t == VLM_DTYPE_Q4_K || t == VLM_DTYPE_Q5_K || t == VLM_DTYPE_Q6_K) return ggml_dot_k(t, row, act, n);
    return ggml_dot_lanes32(t, row, act, n);
}

static bool is_quant(uint32_t t) { return t != VLM_DTYPE_F32 && t != VLM_DTYPE_F16 && t != VLM_DTYPE_BF16; }

/* ==== Dot kernels ========================================================== */

/* Sum of |w_i a_i| over dequantized values: the scale of rounding errors. */
static double abs_dot(uint32_t wt, const void *w, const void *a, int64_t n) {
    float *fw = malloc(n * sizeof *fw), *fa = malloc(n * sizeof *fa);
    VLM_ASSERT(fw && fa);
    dequant(wt, w, fw, n);
    dequant(vlm_dtype_vec_dot_type(wt), a, fa, n);
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += fabs((double)fw[i] * fa[i]);
    free(fw);
    free(fa);
    return s;
}

static void test_vec_dot_simd_vs_scalar(void) {
    const int64_t ns[] = {1, 7, 32, 96, 256, 768, 1000, 4096};
    float *x = malloc(4096 * sizeof *x), *a = malloc(4096 * sizeof *a);
    uint8_t *qw = malloc(4096 * 4), *qa = malloc(4096 * 4);
    REQUIRE(x && a && qw && qa);
    rng_seed(7);
    for (size_t ti = 0; ti < N_WEIGHT_TYPES; ti++) {
        const uint32_t wt = weight_types[ti], vt = vlm_dtype_vec_dot_type(wt);
        const vlm_vec_dot_fn ref = vlm_vec_dot_get_isa(wt, VLM_ISA_SCALAR);
        REQUIRE(ref != NULL);
        for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++) {
            const int64_t n = ns[k];
            if (n % block_of(wt) != 0) continue;
            for (int rep = 0; rep < 3; rep++) {
                fill_gauss(x, n, 0.5f);
                fill_gauss(a, n, 2.0f);
                vlm_quantize_row(wt, x, qw, n);
                vlm__kernels_scalar.quantize_act[vt](a, qa, n);
                float s_ref;
                ref(n, &s_ref, qw, qa);
                const double tol = 2e-6 * abs_dot(wt, qw, qa, n) + 1e-6;
                for (int isa = 1; isa <= (int)vlm_isa_best(); isa++) {
                    const vlm_vec_dot_fn f = vlm_vec_dot_get_isa(wt, (vlm_isa_t)isa);
                    REQUIRE(f != NULL);
                    float s;
                    f(n, &s, qw, qa);
                    CHECK(fabs((double)s - s_ref) <= tol, "%s n=%lld %s: %.9g vs scalar %.9g (tol %.3g)",
                          vlm_dtype_name(wt), (long long)n, vlm_isa_name((vlm_isa_t)isa), s, s_ref, tol);
                    if (is_quant(wt)) {
                        /* ggml's vec_dot order (for Q4_0 the unrepacked one: n_out 1) */
                        const float g = ggml_dot(wt, qw, qa, n, 1);
                        CHECK(memcmp(&s, &g, sizeof s) == 0, "%s n=%lld %s: %.9g, ggml order gives %.9g",
                              vlm_dtype_name(wt), (long long)n, vlm_isa_name((vlm_isa_t)isa), s, g);
                    }
                }
            }
        }
    }
    CHECK(vlm_vec_dot_get(VLM_DTYPE_Q2_K) == NULL);
    CHECK(vlm_vec_dot_get(VLM_DTYPE_Q4_0) != NULL);
    free(x);
    free(a);
    free(qw);
    free(qa);
}

/* ==== Matmul =============================================================== */

typedef struct test_weight {
    vlm_weight_t w;
    vlm_gguf_tensor_t t;
    uint8_t *data;
} test_weight_t;

static void make_weight(test_weight_t *tw, uint32_t type, int64_t n_in, int64_t n_out) {
    memset(tw, 0, sizeof *tw);
    const size_t rb = vlm_dtype_row_size(type, n_in);
    tw->data = malloc(rb * n_out);
    float *row = malloc(n_in * sizeof *row);
    VLM_ASSERT(tw->data && row);
    for (int64_t o = 0; o < n_out; o++) {
        fill_gauss(row, n_in, 0.05f);
        vlm_quantize_row(type, row, tw->data + o * rb, n_in);
    }
    free(row);
    tw->t = (vlm_gguf_tensor_t){.name = "test.weight", .type = type, .n_dims = 2, .ne = {n_in, n_out, 1, 1},
                                .nbytes = rb * n_out, .data = tw->data};
    vlm_error_t err;
    int rc = vlm_weight_from_tensor(&tw->w, &tw->t, &err);
    VLM_ASSERT(rc == VLM_OK);
}

static void free_weight(test_weight_t *tw) {
    vlm_weight_release(&tw->w);
    free(tw->data);
}

/* Reference by the scalar dot kernel on scalar-quantized activations (what
 * ggml computes, up to float summation order), plus the tolerance scale. */
static void matmul_dot_ref(const vlm_weight_t *w, const float *x, int64_t n_tok, float *y, double *scale) {
    const uint32_t vt = vlm_dtype_vec_dot_type(w->type);
    const size_t arow = vlm_dtype_row_size(vt, w->n_in);
    uint8_t *qa = malloc(arow);
    VLM_ASSERT(qa != NULL);
    const vlm_vec_dot_fn dot = vlm_vec_dot_get_isa(w->type, VLM_ISA_SCALAR);
    for (int64_t t = 0; t < n_tok; t++) {
        vlm__kernels_scalar.quantize_act[vt](x + t * w->n_in, qa, w->n_in);
        for (int64_t o = 0; o < w->n_out; o++) {
            const uint8_t *row = (const uint8_t *)w->data + o * w->row_bytes;
            dot(w->n_in, &y[t * w->n_out + o], row, qa);
            scale[t * w->n_out + o] = abs_dot(w->type, row, qa, w->n_in);
        }
    }
    free(qa);
}

/* Bound on |sum w (x - xq)|: each activation moves by at most half a step
 * of its block (d/2, d = amax/127) plus the f16 rounding of d. */
static double act_error_bound(const vlm_weight_t *w, const float *x, int64_t o) {
    const uint32_t vt = vlm_dtype_vec_dot_type(w->type);
    float *row = malloc(w->n_in * sizeof *row);
    VLM_ASSERT(row != NULL);
    dequant(w->type, (const uint8_t *)w->data + o * w->row_bytes, row, w->n_in);
    const int bs = vt == VLM_DTYPE_Q8_K ? 256 : 32;
    double bound = 0;
    for (int64_t i0 = 0; i0 < w->n_in; i0 += bs) {
        float amax = 0;
        for (int i = 0; i < bs; i++) amax = fmaxf(amax, fabsf(x[i0 + i]));
        for (int i = 0; i < bs; i++) {
            double e;
            if (vt == VLM_DTYPE_F32) e = 0;
            else if (vt == VLM_DTYPE_F16) e = fabsf(x[i0 + i]) * 0x1p-11;
            else if (vt == VLM_DTYPE_BF16) e = fabsf(x[i0 + i]) * 0x1p-8;
            else e = 0.5 * amax / 127.0 * 1.001 + fabsf(x[i0 + i]) * 1e-3;
            bound += fabs((double)row[i0 + i]) * e;
        }
    }
    free(row);
    return bound;
}

static void check_matmul(const char *what, const vlm_weight_t *w, const float *x, int64_t n_tok, const float *y,
                         const float *yref, const double *scale) {
    int bad = 0;
    for (int64_t t = 0; t < n_tok && bad < 3; t++)
        for (int64_t o = 0; o < w->n_out && bad < 3; o++) {
            const int64_t i = t * w->n_out + o;
            const double tol = 3e-6 * scale[i] + 1e-6;
            if (!(fabs((double)y[i] - yref[i]) <= tol)) {
                CHECK(0, "%s %s n_tok=%lld [%lld][%lld]: %.9g vs %.9g (tol %.3g)", what, vlm_dtype_name(w->type),
                      (long long)n_tok, (long long)t, (long long)o, y[i], yref[i], tol);
                bad++;
            }
        }
    (void)x;
}

/* What llama.cpp computes, bit for bit, for every output (see ggml_dot). */
static void matmul_ggml_ref(const vlm_weight_t *w, const float *x, int64_t n_tok, float *y) {
    const uint32_t vt = vlm_dtype_vec_dot_type(w->type);
    uint8_t *qa = malloc(vlm_dtype_row_size(vt, w->n_in));
    VLM_ASSERT(qa != NULL);
    for (int64_t t = 0; t < n_tok; t++) {
        vlm__kernels_scalar.quantize_act[vt](x + t * w->n_in, qa, w->n_in);
        for (int64_t o = 0; o < w->n_out; o++)
            y[t * w->n_out + o] =
                ggml_dot(w->type, (const uint8_t *)w->data + o * w->row_bytes, qa, w->n_in, w->n_out);
    }
    free(qa);
}

static int count_bit_diffs(const float *a, const float *b, int64_t n) {
    int d = 0;
    for (int64_t i = 0; i < n; i++) d += memcmp(&a[i], &b[i], sizeof *a) != 0;
    return d;
}

/* Every type, batch sizes 1..64, row counts 53 (not a multiple of 8: ggml
 * keeps Q4_0 unrepacked) and 40 (a partial last panel), every ISA, 1 and 2
 * threads, unprepared / prepared / prepared for the fast order. Quantized
 * results on SIMD ISAs must equal ggml's order bit for bit; everything is
 * checked against the scalar dots within float rounding, and the scalar
 * dots against vlm_matmul_ref within the activation rounding. */
static void test_matmul_all_types(void) {
    const int64_t toks[] = {1, 3, 8, 17, 64};
    const int64_t n_outs[] = {53, 40};
    vlm_pool_t *pool2 = vlm_pool_new(2);
    REQUIRE(pool2 != NULL);
    rng_seed(3);
    for (size_t ti = 0; ti < N_WEIGHT_TYPES; ti++)
        for (size_t oi = 0; oi < 2; oi++) {
        const uint32_t wt = weight_types[ti];
        const int64_t n_in = block_of(wt) == 256 ? 512 : 96, n_out = n_outs[oi];
        test_weight_t tw;
        make_weight(&tw, wt, n_in, n_out);
        float *x = malloc(64 * n_in * sizeof *x);
        float *y = malloc(64 * n_out * sizeof *y), *yref = malloc(64 * n_out * sizeof *yref);
        float *yplain = malloc(64 * n_out * sizeof *yplain), *yg = malloc(64 * n_out * sizeof *yg);
        double *scale = malloc(64 * n_out * sizeof *scale);
        REQUIRE(x && y && yref && yplain && yg && scale);
        fill_gauss(x, 64 * n_in, 1.0f);
        for (size_t k = 0; k < sizeof toks / sizeof toks[0]; k++) {
            const int64_t nt = toks[k];
            matmul_dot_ref(&tw.w, x, nt, yref, scale);
            if (is_quant(wt)) matmul_ggml_ref(&tw.w, x, nt, yg);
            /* vlm_matmul_ref uses unquantized activations: within the
             * activation rounding bound of the exact product */
            vlm_matmul_ref(&tw.w, x, nt, yplain);
            for (int64_t t = 0; t < nt; t++)
                for (int64_t o = 0; o < n_out; o++) {
                    const double b = act_error_bound(&tw.w, x + t * n_in, o) + 1e-5 * scale[t * n_out + o] + 1e-6;
                    const double d = fabs((double)yplain[t * n_out + o] - yref[t * n_out + o]);
                    if (!(d <= b)) {
                        CHECK(0, "%s ref vs quantized-activation ref [%lld][%lld]: %g > %g", vlm_dtype_name(wt),
                              (long long)t, (long long)o, d, b);
                        t = nt;
                        break;
                    }
                }
            for (int isa = 0; isa <= (int)vlm_isa_best(); isa++) {
                for (int threads = 1; threads <= 2; threads++) {
                    vlm_pool_t *pool = threads == 2 ? pool2 : NULL;
                    for (int variant = 0; variant < 3; variant++) {
                        static const char *const names[] = {"plain", "prepared", "prepared-fast"};
                        const int flags = variant == 2 ? VLM_WEIGHT_PREPARE_FAST_ORDER : VLM_WEIGHT_PREPARE_SGEMM_F32;
                        char what[96];
                        snprintf(what, sizeof what, "%s/%dt/%s/n_out=%lld", vlm_isa_name((vlm_isa_t)isa), threads,
                                 names[variant], (long long)n_out);
                        if (variant > 0) {
                            size_t extra = 0;
                            vlm_error_t err;
                            REQUIRE(vlm__weight_prepare_isa(&tw.w, flags, (vlm_isa_t)isa, &extra, &err) == VLM_OK);
                        }
                        memset(y, 0xFF, nt * n_out * sizeof *y);
                        MM_OK(vlm__matmul_isa(pool, &tw.w, x, nt, y, (vlm_isa_t)isa));
                        check_matmul(what, &tw.w, x, nt, y, yref, scale);
                        if (is_quant(wt) && isa != VLM_ISA_SCALAR && variant != 2) {
                            const int nd = count_bit_diffs(y, yg, nt * n_out);
                            CHECK(nd == 0, "%s %s n_tok=%lld: %d of %lld outputs differ from ggml's order",
                                  what, vlm_dtype_name(wt), (long long)nt, nd, (long long)(nt * n_out));
                        }
                        vlm_weight_release(&tw.w);
                        CHECK(tw.w.priv == NULL);
                    }
                }
            }
            /* the public entry point */
            MM_OK(vlm_matmul(pool2, &tw.w, x, nt, y));
            check_matmul("vlm_matmul", &tw.w, x, nt, y, yref, scale);
            if (is_quant(wt) && vlm_isa_best() != VLM_ISA_SCALAR)
                CHECK(count_bit_diffs(y, yg, nt * n_out) == 0, "vlm_matmul %s: not ggml's order", vlm_dtype_name(wt));
        }
        free(x);
        free(y);
        free(yref);
        free(yplain);
        free(yg);
        free(scale);
        free_weight(&tw);
    }
    vlm_pool_destroy(&pool2);
}

/* Larger shapes through the paths the small test above does not reach:
 * float rows long enough for the kernels to split them into k blocks (and,
 * prepared with VLM_WEIGHT_PREPARE_SGEMM, sgemm on the widened copy), and
 * quantized batches spanning several token blocks. */
static void test_matmul_large(void) {
    static const struct { uint32_t type; int64_t n_in, n_out, n_tok; } cases[] = {
        {VLM_DTYPE_F16, 2048, 600, 24},
        {VLM_DTYPE_BF16, 256, 70, 16},
        {VLM_DTYPE_F32, 320, 33, 40},
        {VLM_DTYPE_Q4_0, 4096, 40, 150},
        {VLM_DTYPE_Q6_K, 4096, 24, 70},
    };
    vlm_pool_t *pool = vlm_pool_new(2);
    REQUIRE(pool != NULL);
    rng_seed(9);
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        test_weight_t tw;
        make_weight(&tw, cases[c].type, cases[c].n_in, cases[c].n_out);
        const int64_t nt = cases[c].n_tok, n_in = cases[c].n_in, n_out = cases[c].n_out;
        float *x = malloc(nt * n_in * sizeof *x), *y = malloc(nt * n_out * sizeof *y);
        float *yref = malloc(nt * n_out * sizeof *yref);
        double *scale = malloc(nt * n_out * sizeof *scale);
        REQUIRE(x && y && yref && scale);
        fill_gauss(x, nt * n_in, 1.0f);
        matmul_dot_ref(&tw.w, x, nt, yref, scale);
        MM_OK(vlm_matmul(pool, &tw.w, x, nt, y));
        check_matmul("large/plain", &tw.w, x, nt, y, yref, scale);
        size_t extra = 0;
        vlm_error_t err;
        REQUIRE(vlm_weight_prepare(&tw.w, VLM_WEIGHT_PREPARE_SGEMM_F32, &extra, &err) == VLM_OK);
        if (cases[c].type == VLM_DTYPE_F16 || cases[c].type == VLM_DTYPE_BF16 ||
            (cases[c].type != VLM_DTYPE_F32 && vlm_isa_best() != VLM_ISA_SCALAR))
            CHECK(extra > 0);
        MM_OK(vlm_matmul(pool, &tw.w, x, nt, y));
        check_matmul("large/prepared", &tw.w, x, nt, y, yref, scale);
        free(x);
        free(y);
        free(yref);
        free(scale);
        free_weight(&tw);
    }
    vlm_pool_destroy(&pool);
}

/* vlm_matmul_multi gives exactly what separate vlm_matmul calls give, for a
 * mix of types and of prepared / unprepared weights sharing one X. */
static void test_matmul_multi(void) {
    static const uint32_t types[] = {VLM_DTYPE_Q4_K, VLM_DTYPE_Q6_K, VLM_DTYPE_Q4_0, VLM_DTYPE_Q8_0,
                                     VLM_DTYPE_F16,  VLM_DTYPE_Q4_1, VLM_DTYPE_Q5_K, VLM_DTYPE_F32};
    enum { NW = sizeof types / sizeof types[0] };
    const int64_t n_in = 512, toks[] = {1, 5, 8, 40};
    vlm_pool_t *pool = vlm_pool_new(2);
    REQUIRE(pool != NULL);
    rng_seed(17);
    test_weight_t tw[NW];
    const vlm_weight_t *ws[NW];
    float *ys[NW], *y1 = malloc(40 * 400 * sizeof *y1), *x = malloc(40 * n_in * sizeof *x);
    REQUIRE(y1 && x);
    for (int i = 0; i < NW; i++) {
        make_weight(&tw[i], types[i], n_in, 37 + 40 * i);
        ws[i] = &tw[i].w;
        ys[i] = malloc(40 * tw[i].w.n_out * sizeof(float));
        REQUIRE(ys[i] != NULL);
        if (i % 2) {
            size_t extra;
            vlm_error_t err;
            REQUIRE(vlm_weight_prepare(&tw[i].w, 0, &extra, &err) == VLM_OK);
        }
    }
    fill_gauss(x, 40 * n_in, 1.0f);
    for (size_t k = 0; k < sizeof toks / sizeof toks[0]; k++) {
        const int64_t nt = toks[k];
        MM_OK(vlm_matmul_multi(pool, ws, NW, x, nt, ys));
        for (int i = 0; i < NW; i++) {
            MM_OK(vlm_matmul(pool, ws[i], x, nt, y1));
            CHECK(memcmp(y1, ys[i], nt * ws[i]->n_out * sizeof(float)) == 0, "%s n_tok=%lld: multi differs",
                  vlm_dtype_name(types[i]), (long long)nt);
        }
    }
    for (int i = 0; i < NW; i++) {
        free(ys[i]);
        free_weight(&tw[i]);
    }
    free(y1);
    free(x);
    vlm_pool_destroy(&pool);
}

/* A failed scratch allocation (injected with vlm__matmul_fail_next_alloc)
 * makes vlm_matmul / vlm_matmul_multi return VLM_ERR_NOMEM instead of
 * aborting, on every path that allocates: panels packed on the fly,
 * prepared panels, dot rows, float weights, sgemm-prepared F16 (whose only
 * allocation is the rounded copy of X), and a call of more than 8 weights
 * (its item array). The hook counts allocations (n = 2: the second one
 * fails), calls of 0 rows allocate nothing, and the call after a failure
 * gives the same bits as before it. */
static void test_matmul_alloc_failure(void) {
    enum { NW = 9 };
    static const struct {
        uint32_t type;
        int prep;  /* -1: unprepared, else vlm_weight_prepare flags */
        int64_t n_tok;
        const char *what;
    } cases[] = {
        {VLM_DTYPE_Q4_K, -1, 8, "Q4_K packed on the fly"},
        {VLM_DTYPE_Q8_0, 0, 5, "Q8_0 prepared panels"},
        {VLM_DTYPE_Q6_K, -1, 2, "Q6_K dot rows"},
        {VLM_DTYPE_F16, -1, 17, "F16 fgemm"},
        {VLM_DTYPE_BF16, VLM_WEIGHT_PREPARE_SGEMM, 20, "BF16 sgemm"},
    };
    const int64_t n_in = 256, n_out = 40, max_tok = 20;
    vlm_pool_t *pool = vlm_pool_new(2);
    REQUIRE(pool != NULL);
    rng_seed(23);
    float *x = malloc(max_tok * n_in * sizeof *x), *y = malloc(max_tok * n_out * sizeof *y);
    float *yref = malloc(max_tok * n_out * sizeof *yref);
    REQUIRE(x && y && yref);
    fill_gauss(x, max_tok * n_in, 1.0f);
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        test_weight_t tw;
        make_weight(&tw, cases[c].type, n_in, n_out);
        vlm_error_t err;
        size_t extra;
        if (cases[c].prep >= 0) CHECK(vlm_weight_prepare(&tw.w, cases[c].prep, &extra, &err) == VLM_OK, "%s", err.msg);
        const int64_t nt = cases[c].n_tok;
        for (vlm_pool_t *p = NULL;; p = pool) {
            MM_OK(vlm_matmul(p, &tw.w, x, nt, yref));
            vlm__matmul_fail_next_alloc(1);
            CHECK(vlm_matmul(p, &tw.w, x, nt, y) == VLM_ERR_NOMEM, "%s: no error", cases[c].what);
            MM_OK(vlm_matmul(p, &tw.w, x, nt, y));
            CHECK(memcmp(y, yref, nt * n_out * sizeof *y) == 0, "%s: wrong result after a failure", cases[c].what);
            /* second allocation from now: the first call succeeds, the second fails */
            vlm__matmul_fail_next_alloc(2);
            MM_OK(vlm_matmul(p, &tw.w, x, 0, y)); /* allocates nothing */
            MM_OK(vlm_matmul(p, &tw.w, x, nt, y));
            CHECK(memcmp(y, yref, nt * n_out * sizeof *y) == 0, "%s", cases[c].what);
            CHECK(vlm_matmul(p, &tw.w, x, nt, y) == VLM_ERR_NOMEM, "%s: second call did not fail", cases[c].what);
            const vlm_weight_t *one = &tw.w;
            vlm__matmul_fail_next_alloc(1);
            CHECK(vlm_matmul_multi(p, &one, 1, x, nt, &y) == VLM_ERR_NOMEM, "%s: multi did not fail", cases[c].what);
            vlm__matmul_fail_next_alloc(1);
            CHECK(vlm__matmul_isa(p, &tw.w, x, nt, y, VLM_ISA_SCALAR) == VLM_ERR_NOMEM, "%s: scalar did not fail",
                  cases[c].what);
            MM_OK(vlm__matmul_isa(p, &tw.w, x, nt, y, VLM_ISA_SCALAR));
            if (p) break;
        }
        free_weight(&tw);
    }
    /* More than 8 weights: allocation 1 is the item array, 2 the scratch. */
    test_weight_t tw[NW];
    const vlm_weight_t *ws[NW];
    float *ys[NW], *yrefs[NW];
    for (int i = 0; i < NW; i++) {
        make_weight(&tw[i], i % 2 ? VLM_DTYPE_Q8_0 : VLM_DTYPE_Q4_0, n_in, n_out);
        ws[i] = &tw[i].w;
        ys[i] = malloc(max_tok * n_out * sizeof(float));
        yrefs[i] = malloc(max_tok * n_out * sizeof(float));
        REQUIRE(ys[i] && yrefs[i]);
    }
    MM_OK(vlm_matmul_multi(pool, ws, NW, x, 3, yrefs));
    for (int k = 1; k <= 3; k++) {
        vlm__matmul_fail_next_alloc(k);
        const int rc = vlm_matmul_multi(pool, ws, NW, x, 3, ys);
        CHECK(rc == (k <= 2 ? VLM_ERR_NOMEM : VLM_OK), "9 weights, allocation %d: %s", k, vlm_error_name(rc));
    }
    vlm__matmul_fail_next_alloc(0); /* disarm the unused countdown of k = 3 */
    MM_OK(vlm_matmul_multi(pool, ws, NW, x, 3, ys));
    for (int i = 0; i < NW; i++) {
        CHECK(memcmp(ys[i], yrefs[i], 3 * n_out * sizeof(float)) == 0, "weight %d after failures", i);
        free(ys[i]);
        free(yrefs[i]);
        free_weight(&tw[i]);
    }
    free(x);
    free(y);
    free(yref);
    vlm_pool_destroy(&pool);
}

/* ==== Float weights: tinyBLAS's order ==================================== */

static const uint32_t float_types[] = {VLM_DTYPE_F32, VLM_DTYPE_F16, VLM_DTYPE_BF16};

/* What ggml's from_float makes of an activation, as f32: f16 or bf16
 * rounding to nearest even. For BF16, a subnormal result then reads as
 * zero, as vdpbf16ps reads its inputs. */
static float tb_act(uint32_t t, float x) {
    if (t == VLM_DTYPE_F16) return vlm_fp16_to_fp32(vlm_fp32_to_fp16(x));
    if (t == VLM_DTYPE_BF16) {
        uint16_t b = vlm_fp32_to_bf16(x);
        if ((b & 0x7F80) == 0) b &= 0x8000;
        return vlm_bf16_to_fp32(b);
    }
    return x;
}

/* Weight element i of a row, exactly widened (BF16 subnormals read as 0). */
static float tb_weight(uint32_t t, const uint8_t *row, int64_t i) {
    if (t == VLM_DTYPE_F32) {
        float v;
        memcpy(&v, row + 4 * i, 4);
        return v;
    }
    uint16_t b;
    memcpy(&b, row + 2 * i, 2);
    if (t == VLM_DTYPE_F16) return vlm_fp16_to_fp32(b);
    if ((b & 0x7F80) == 0) b &= 0x8000;
    return vlm_bf16_to_fp32(b);
}

/* One output as llama.cpp's tinyBLAS computes it on the reference machine
 * (AVX-512 with AVX512_BF16): F32 and F16 as tinyBLAS<16, __m512>, i.e.
 * lane j (of 16) accumulates w[i] x[i] for i = j mod 16 with one fused
 * multiply-add each; BF16 as tinyBLAS<32, __m512bh>, i.e. _mm512_dpbf16_ps
 * on 32-element chunks, where lane j adds w[2j+1] x[2j+1] and then
 * w[2j] x[2j]; then _mm512_reduce_add_ps (GCC's: the 8 high lanes onto the
 * 8 low ones, the 4 high onto the 4 low, then (0 + 2) + (1 + 3)). Elements
 * past n count as zeros (tinyBLAS itself requires whole chunks). */
static float tinyblas_dot(uint32_t t, const uint8_t *row, const float *x, int64_t n) {
    const int64_t chunk = t == VLM_DTYPE_BF16 ? 32 : 16;
    float lane[16] = {0};
    for (int64_t c = 0; c < n; c += chunk) {
        for (int j = 0; j < 16; j++) {
            if (t == VLM_DTYPE_BF16) {
                const int64_t i1 = c + 2 * j + 1, i0 = c + 2 * j;
                lane[j] = fmaf(i1 < n ? tb_weight(t, row, i1) : 0.0f, i1 < n ? tb_act(t, x[i1]) : 0.0f, lane[j]);
                lane[j] = fmaf(i0 < n ? tb_weight(t, row, i0) : 0.0f, i0 < n ? tb_act(t, x[i0]) : 0.0f, lane[j]);
            } else {
                const int64_t i = c + j;
                lane[j] = fmaf(i < n ? tb_weight(t, row, i) : 0.0f, i < n ? tb_act(t, x[i]) : 0.0f, lane[j]);
            }
        }
    }
    float h8[8], h4[4];
    for (int j = 0; j < 8; j++) h8[j] = lane[8 + j] + lane[j];
    for (int j = 0; j < 4; j++) h4[j] = h8[4 + j] + h8[j];
    const float a = h4[0] + h4[2], b = h4[1] + h4[3];
    return a + b;
}

/* Puts BF16 subnormals (which dpbf16 reads as zero) and signed zeros into
 * every third row of a BF16 weight, and tiny values (bf16 subnormals after
 * rounding) and -0 into the activations; other types are left alone. So
 * that reading a subnormal as zero shows in the results, row 1 is all
 * subnormals and meets activations of 1e12 every 5 elements, and row 4 is
 * 1e30 exactly where the activations are tiny and zero elsewhere. */
static void sprinkle_bf16_specials(test_weight_t *tw, float *x, int64_t n_x) {
    if (tw->w.type != VLM_DTYPE_BF16) return;
    const int64_t n_in = tw->w.n_in;
    for (int64_t o = 0; o < tw->w.n_out; o++) {
        uint16_t *row = (uint16_t *)(tw->data + o * tw->w.row_bytes);
        for (int64_t i = 0; i < n_in; i++) {
            const uint16_t sub = (uint16_t)((1 + (i * 13) % 0x7F) | (i % 2 ? 0x8000 : 0));
            if (o == 1) row[i] = sub;
            else if (o == 4) row[i] = i % 13 == 4 ? vlm_fp32_to_bf16(1e30f) : 0;
            else if (o % 3 == 0 && i % 7 == 3) row[i] = sub;
            else if (o % 3 == 0 && i % 11 == 5) row[i] = i % 2 ? 0x8000 : 0;
        }
    }
    for (int64_t i = 0; i < n_x; i++) {
        if (i % n_in % 13 == 4) x[i] = i % 2 ? -1e-39f : 3e-39f;
        else if (i % n_in % 17 == 8) x[i] = -0.0f;
        else if (i % n_in % 5 == 0) x[i] = 1e12f;
    }
}

static void tinyblas_ref(const vlm_weight_t *w, const float *x, int64_t n_tok, float *y) {
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t o = 0; o < w->n_out; o++)
            y[t * w->n_out + o] =
                tinyblas_dot(w->type, (const uint8_t *)w->data + o * w->row_bytes, x + t * w->n_in, w->n_in);
}

/* Every ISA, 1 and 2 threads, bit for bit against tinyblas_dot: rows of
 * whole chunks and with a partial last one, short rows and rows long enough
 * for the kernels to split them into blocks (1600 > 1.5 x 512), batches
 * that leave partial tiles, and 200 tokens (more than one token block).
 * n_out = 37: partial row tiles and a partial unit of work. */
static void test_fgemm_tinyblas_order(void) {
    static const int64_t n_ins[] = {40, 96, 1600, 1608};
    static const int64_t toks[] = {1, 2, 3, 15, 16, 17, 64, 200};
    const int64_t n_out = 37, max_tok = 200;
    vlm_pool_t *pool2 = vlm_pool_new(2);
    REQUIRE(pool2 != NULL);
    rng_seed(23);
    for (size_t ti = 0; ti < 3; ti++)
        for (size_t ki = 0; ki < sizeof n_ins / sizeof n_ins[0]; ki++) {
            const uint32_t wt = float_types[ti];
            const int64_t n_in = n_ins[ki];
            test_weight_t tw;
            make_weight(&tw, wt, n_in, n_out);
            float *x = malloc(max_tok * n_in * sizeof *x);
            float *y = malloc(max_tok * n_out * sizeof *y), *yref = malloc(max_tok * n_out * sizeof *yref);
            REQUIRE(x && y && yref);
            fill_gauss(x, max_tok * n_in, 1.0f);
            sprinkle_bf16_specials(&tw, x, max_tok * n_in);
            tinyblas_ref(&tw.w, x, max_tok, yref);
            for (size_t k = 0; k < sizeof toks / sizeof toks[0]; k++) {
                const int64_t nt = toks[k];
                if (nt == 200 && n_in < 1600) continue;
                for (int isa = 0; isa <= (int)vlm_isa_best(); isa++) {
                    if (isa == VLM_ISA_SCALAR && nt > 17) continue; /* slow, and nothing tiles there */
                    for (int threads = 1; threads <= 2; threads++) {
                        memset(y, 0xFF, nt * n_out * sizeof *y);
                        MM_OK(vlm__matmul_isa(threads == 2 ? pool2 : NULL, &tw.w, x, nt, y, (vlm_isa_t)isa));
                        const int nd = count_bit_diffs(y, yref, nt * n_out);
                        CHECK(nd == 0, "%s n_in=%lld n_tok=%lld %s %dt: %d of %lld outputs differ from tinyBLAS's order",
                              vlm_dtype_name(wt), (long long)n_in, (long long)nt, vlm_isa_name((vlm_isa_t)isa), threads,
                              nd, (long long)(nt * n_out));
                    }
                }
            }
            free(x);
            free(y);
            free(yref);
            free_weight(&tw);
        }
    vlm_pool_destroy(&pool2);
}

/* tinyBLAS's inner loop written with its own intrinsics, for one output:
 * the strongest check that tinyblas_dot above is what the reference
 * machine's llama.cpp build computes. Needs AVX-512 (and AVX512_BF16 for
 * BF16) at run time; n must be a multiple of the chunk. */
__attribute__((target("avx512f"))) static float tinyblas_avx512(uint32_t t, const uint8_t *row, const void *act,
                                                                int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __m512 a, b;
        if (t == VLM_DTYPE_F32) {
            a = _mm512_loadu_ps((const float *)row + i);
            b = _mm512_loadu_ps((const float *)act + i);
        } else {
            a = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i)));
            b = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)act + i)));
        }
        acc = _mm512_fmadd_ps(a, b, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

__attribute__((target("avx512f,avx512bf16"))) static float tinyblas_avx512bf16(const uint8_t *row, const void *act,
                                                                             int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)((const uint16_t *)row + i)),
                               (__m512bh)_mm512_loadu_si512((const void *)((const uint16_t *)act + i)));
    return _mm512_reduce_add_ps(acc);
}

static void test_fgemm_vs_hardware(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f")) SKIP("no AVX-512 on this CPU");
    const bool have_bf16 = __builtin_cpu_supports("avx512bf16");
    const int64_t n_in = 1600, n_out = 24, nt = 20;
    rng_seed(29);
    int checked = 0;
    for (size_t ti = 0; ti < 3; ti++) {
        const uint32_t wt = float_types[ti];
        if (wt == VLM_DTYPE_BF16 && !have_bf16) continue;
        test_weight_t tw;
        make_weight(&tw, wt, n_in, n_out);
        float *x = malloc(nt * n_in * sizeof *x), *y = malloc(nt * n_out * sizeof *y);
        uint8_t *act = malloc(n_in * 4);
        REQUIRE(x && y && act);
        fill_gauss(x, nt * n_in, 1.0f);
        sprinkle_bf16_specials(&tw, x, nt * n_in);
        MM_OK(vlm_matmul(NULL, &tw.w, x, nt, y));
        int nd = 0;
        for (int64_t t = 0; t < nt; t++) {
            /* the activation row as ggml's from_float writes it */
            vlm_quantize_row(wt, x + t * n_in, act, n_in);
            for (int64_t o = 0; o < n_out; o++) {
                const uint8_t *row = tw.data + o * tw.w.row_bytes;
                const float h = wt == VLM_DTYPE_BF16 ? tinyblas_avx512bf16(row, act, n_in)
                                                      : tinyblas_avx512(wt, row, act, n_in);
                nd += memcmp(&h, &y[t * n_out + o], sizeof h) != 0;
            }
        }
        CHECK(nd == 0, "%s: %d of %lld outputs differ from tinyBLAS's loop run on this CPU", vlm_dtype_name(wt), nd,
              (long long)(nt * n_out));
        checked++;
        free(x);
        free(y);
        free(act);
        free_weight(&tw);
    }
    harness_note("checked %d float types against the hardware loop%s", checked,
                 have_bf16 ? "" : " (no AVX512_BF16: BF16 not checked)");
}

/* The daemon's promise: a row's result does not depend on the other rows
 * of the call. Every type, prepared or not, every ISA, 2 threads: row t of
 * a 40-row call equals the same row computed alone, and rows 13..15
 * computed as a batch of 3. */
static void test_matmul_batch_invariance(void) {
    const int64_t nt = 40, n_out = 45;
    vlm_pool_t *pool = vlm_pool_new(2);
    REQUIRE(pool != NULL);
    rng_seed(31);
    for (size_t ti = 0; ti < N_WEIGHT_TYPES; ti++) {
        const uint32_t wt = weight_types[ti];
        const int64_t n_in = block_of(wt) == 256 ? 1024 : 1600;
        test_weight_t tw;
        make_weight(&tw, wt, n_in, n_out);
        float *x = malloc(nt * n_in * sizeof *x);
        float *yb = malloc(nt * n_out * sizeof *yb), *y1 = malloc(3 * n_out * sizeof *y1);
        REQUIRE(x && yb && y1);
        fill_gauss(x, nt * n_in, 1.0f);
        for (int isa = 0; isa <= (int)vlm_isa_best(); isa++)
            for (int prepared = 0; prepared <= 1; prepared++) {
                if (isa == VLM_ISA_SCALAR && !is_quant(wt) && prepared) continue; /* same path as unprepared */
                if (prepared) {
                    size_t extra;
                    vlm_error_t err;
                    REQUIRE(vlm__weight_prepare_isa(&tw.w, 0, (vlm_isa_t)isa, &extra, &err) == VLM_OK);
                }
                MM_OK(vlm__matmul_isa(pool, &tw.w, x, nt, yb, (vlm_isa_t)isa));
                int nd = 0;
                for (int64_t t = 0; t < nt; t++) {
                    MM_OK(vlm__matmul_isa(pool, &tw.w, x + t * n_in, 1, y1, (vlm_isa_t)isa));
                    nd += count_bit_diffs(y1, yb + t * n_out, n_out);
                }
                MM_OK(vlm__matmul_isa(pool, &tw.w, x + 13 * n_in, 3, y1, (vlm_isa_t)isa));
                nd += count_bit_diffs(y1, yb + 13 * n_out, 3 * n_out);
                CHECK(nd == 0, "%s %s %s: %d outputs depend on the batch", vlm_dtype_name(wt),
                      vlm_isa_name((vlm_isa_t)isa), prepared ? "prepared" : "unprepared", nd);
                vlm_weight_release(&tw.w);
            }
        free(x);
        free(yb);
        free(y1);
        free_weight(&tw);
    }
    vlm_pool_destroy(&pool);
}

/* VLM_WEIGHT_PREPARE_SGEMM: float weights take OpenBLAS from 16 rows (close
 * to, but not, tinyBLAS's order) and the kernels below that. */
static void test_matmul_sgemm_opt_in(void) {
    const int64_t n_in = 512, n_out = 33, nt = 20;
    rng_seed(37);
    for (size_t ti = 0; ti < 3; ti++) {
        const uint32_t wt = float_types[ti];
        test_weight_t tw;
        make_weight(&tw, wt, n_in, n_out);
        float *x = malloc(nt * n_in * sizeof *x), *y = malloc(nt * n_out * sizeof *y);
        float *yref = malloc(nt * n_out * sizeof *yref);
        double *scale = malloc(nt * n_out * sizeof *scale);
        REQUIRE(x && y && yref && scale);
        fill_gauss(x, nt * n_in, 1.0f);
        size_t extra = 0;
        vlm_error_t err;
        REQUIRE(vlm_weight_prepare(&tw.w, VLM_WEIGHT_PREPARE_SGEMM, &extra, &err) == VLM_OK);
        CHECK(extra == (wt == VLM_DTYPE_F32 ? 0 : (size_t)(n_in * n_out * 4)), "%s: %zu extra bytes",
              vlm_dtype_name(wt), extra);
        matmul_dot_ref(&tw.w, x, nt, yref, scale);
        MM_OK(vlm_matmul(NULL, &tw.w, x, nt, y));
        check_matmul("sgemm", &tw.w, x, nt, y, yref, scale);
        tinyblas_ref(&tw.w, x, 8, yref);
        MM_OK(vlm_matmul(NULL, &tw.w, x, 8, y));
        CHECK(count_bit_diffs(y, yref, 8 * n_out) == 0, "%s: 8 rows should still use tinyBLAS's order",
              vlm_dtype_name(wt));
        free(x);
        free(y);
        free(yref);
        free(scale);
        free_weight(&tw);
    }
}

static void test_weight_from_tensor_checks(void) {
    static uint8_t buf[4096];
    vlm_weight_t w;
    vlm_error_t err;
    vlm_gguf_tensor_t t = {.name = "blk.0.x", .type = VLM_DTYPE_Q4_0, .n_dims = 3, .ne = {64, 3, 2, 1},
                           .nbytes = 36 * 6, .data = buf};
    CHECK(vlm_weight_from_tensor(&w, &t, &err) == VLM_OK, "%s", err.msg);
    CHECK(w.n_in == 64 && w.n_out == 6 && w.row_bytes == 36);
    t.type = VLM_DTYPE_Q2_K;
    t.ne[0] = 256;
    t.nbytes = 84 * 6;
    CHECK(vlm_weight_from_tensor(&w, &t, &err) == VLM_ERR_UNSUPPORTED);
    CHECK(strstr(err.msg, "blk.0.x") && strstr(err.msg, "Q2_K"), "%s", err.msg);
    t.type = VLM_DTYPE_Q4_K;
    t.ne[0] = 320;
    t.nbytes = 4096;
    CHECK(vlm_weight_from_tensor(&w, &t, &err) == VLM_ERR_SHAPE, "%s", err.msg);
    t.type = VLM_DTYPE_F16;
    t.ne[0] = 10;
    t.nbytes = 20 * 6 - 2;
    CHECK(vlm_weight_from_tensor(&w, &t, &err) == VLM_ERR_SHAPE, "%s", err.msg);
    t.type = VLM_DTYPE_Q8_K; /* a type that only exists as activations */
    t.ne[0] = 256;
    t.nbytes = 292 * 6;
    CHECK(vlm_weight_from_tensor(&w, &t, &err) == VLM_ERR_UNSUPPORTED);
}

/* ==== Golden models ========================================================= */

static vlm_gguf_t *open_golden(const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/golden/%s/text.gguf", VLM_TEST_DATA, name);
    vlm_gguf_t *g = NULL;
    vlm_error_t err;
    if (vlm_gguf_open(path, &g, &err) != VLM_OK) {
        harness_note("cannot open %s: %s", path, err.msg);
        return NULL;
    }
    return g;
}

static float *dequant_tensor(const vlm_gguf_tensor_t *t, int64_t *n_out) {
    int64_t n = 1;
    for (uint32_t i = 0; i < t->n_dims; i++) n *= t->ne[i];
    float *y = malloc(n * sizeof *y);
    VLM_ASSERT(y != NULL);
    if (vlm_dtype_dequantize_row(t->type, t->data, y, n) != VLM_OK) {
        free(y);
        return NULL;
    }
    *n_out = n;
    return y;
}

/* The same f32 weights quantized three ways: every tensor of the Q4_K_M and
 * Q4_0 models is within its type's error of the Q8_0 model's (itself within
 * about 0.6% of the source), and F32 tensors are identical. */
static void test_golden_models_agree(void) {
    vlm_gguf_t *g8 = open_golden("small-q8_0"), *g4 = open_golden("small-q4_0"), *gk = open_golden("small-q4_k_m");
    if (!g8 || !g4 || !gk) {
        vlm_gguf_destroy(&g8);
        vlm_gguf_destroy(&g4);
        vlm_gguf_destroy(&gk);
        SKIP("golden models missing");
    }
    int checked = 0;
    vlm_gguf_t *others[2] = {g4, gk};
    for (size_t i = 0; i < vlm_gguf_n_tensors(g8); i++) {
        const vlm_gguf_tensor_t *t8 = vlm_gguf_tensor_at(g8, i);
        int64_t n8 = 0;
        float *y8 = dequant_tensor(t8, &n8);
        REQUIRE(y8 != NULL, "%s: cannot dequantize %s", t8->name, vlm_dtype_name(t8->type));
        for (int k = 0; k < 2; k++) {
            const vlm_gguf_tensor_t *t = vlm_gguf_find_tensor(others[k], t8->name);
            REQUIRE(t != NULL, "%s missing", t8->name);
            int64_t n = 0;
            float *y = dequant_tensor(t, &n);
            REQUIRE(y != NULL && n == n8, "%s: %s", t->name, vlm_dtype_name(t->type));
            double se = 0, sx = 0, maxd = 0;
            for (int64_t j = 0; j < n; j++) {
                const double d = (double)y[j] - y8[j];
                se += d * d;
                sx += (double)y8[j] * y8[j];
                if (fabs(d) > maxd) maxd = fabs(d);
            }
            const double rel = sqrt(se / (sx > 0 ? sx : 1));
            double bound;
            switch (t->type) {
            case VLM_DTYPE_F32: bound = 0; break;
            case VLM_DTYPE_Q8_0: bound = 0.0; break; /* Q4_K_M keeps some tensors Q8_0: identical bytes */
            case VLM_DTYPE_Q6_K: bound = 0.022; break;
            case VLM_DTYPE_Q5_0: bound = 0.05; break;
            case VLM_DTYPE_Q4_K: bound = 0.085; break;
            case VLM_DTYPE_Q4_0: bound = 0.10; break;
            default: bound = -1; break;
            }
            CHECK(bound >= 0, "%s: unexpected type %s", t->name, vlm_dtype_name(t->type));
            CHECK(rel <= bound, "%s (%s vs Q8_0): relative RMS difference %.4f > %.4f (max %.3g)", t->name,
                  vlm_dtype_name(t->type), rel, bound, maxd);
            if (bound == 0) CHECK(maxd == 0, "%s differs", t->name);
            checked++;
            free(y);
        }
        free(y8);
    }
    CHECK(checked == 2 * 39, "compared %d tensors", checked);
    vlm_gguf_destroy(&g8);
    vlm_gguf_destroy(&g4);
    vlm_gguf_destroy(&gk);
}

/* llama-quantize's Q8_0 and Q4_0 blocks are fixed points of the reference
 * quantizer: dequantizing and re-quantizing gives back the same bytes. This
 * checks our quantizers agree with llama-quantize on real files. */
static void test_golden_requantize_fixed_point(void) {
    const char *cases[] = {"small-q8_0", "small-q4_0"};
    int checked = 0;
    for (int c = 0; c < 2; c++) {
        vlm_gguf_t *g = open_golden(cases[c]);
        if (!g) SKIP("golden model %s missing", cases[c]);
        for (size_t i = 0; i < vlm_gguf_n_tensors(g); i++) {
            const vlm_gguf_tensor_t *t = vlm_gguf_tensor_at(g, i);
            if (t->type != VLM_DTYPE_Q8_0 && t->type != VLM_DTYPE_Q4_0) continue;
            int64_t n = 0;
            float *y = dequant_tensor(t, &n);
            uint8_t *q = malloc(t->nbytes);
            REQUIRE(y && q);
            CHECK(vlm_quantize_row(t->type, y, q, n) == VLM_OK);
            CHECK(memcmp(q, t->data, t->nbytes) == 0, "%s/%s: re-quantized bytes differ", cases[c], t->name);
            checked++;
            free(y);
            free(q);
        }
        vlm_gguf_destroy(&g);
    }
    CHECK(checked == 30 + 29, "checked %d tensors", checked);
}

/* vlm_matmul on real golden tensors (Q4_K token embeddings used as a
 * 1000 x 256 matrix, the Q6_K output, a Q5_0 ffn_down) against the scalar
 * dots, and bit for bit against ggml's summation order. */
static void test_golden_matmul(void) {
    vlm_gguf_t *g = open_golden("small-q4_k_m");
    if (!g) SKIP("golden model missing");
    const char *names[] = {"token_embd.weight", "output.weight", "blk.0.ffn_down.weight"};
    vlm_pool_t *pool = vlm_pool_new(2);
    REQUIRE(pool != NULL);
    rng_seed(21);
    for (int k = 0; k < 3; k++) {
        const vlm_gguf_tensor_t *t = vlm_gguf_find_tensor(g, names[k]);
        REQUIRE(t != NULL);
        vlm_weight_t w;
        vlm_error_t err;
        REQUIRE(vlm_weight_from_tensor(&w, t, &err) == VLM_OK, "%s", err.msg);
        const int64_t nt = 9;
        float *x = malloc(nt * w.n_in * sizeof *x), *y = malloc(nt * w.n_out * sizeof *y);
        float *yref = malloc(nt * w.n_out * sizeof *yref);
        double *scale = malloc(nt * w.n_out * sizeof *scale);
        REQUIRE(x && y && yref && scale);
        fill_gauss(x, nt * w.n_in, 1.0f);
        matmul_dot_ref(&w, x, nt, yref, scale);
        float *yg = malloc(nt * w.n_out * sizeof *yg);
        REQUIRE(yg != NULL);
        matmul_ggml_ref(&w, x, nt, yg);
        const bool exact = vlm_isa_best() != VLM_ISA_SCALAR;
        MM_OK(vlm_matmul(pool, &w, x, nt, y));
        check_matmul("golden", &w, x, nt, y, yref, scale);
        CHECK(!exact || count_bit_diffs(y, yg, nt * w.n_out) == 0, "%s: not ggml's order", names[k]);
        size_t extra;
        REQUIRE(vlm_weight_prepare(&w, 0, &extra, &err) == VLM_OK);
        MM_OK(vlm_matmul(pool, &w, x, nt, y));
        check_matmul("golden/prepared", &w, x, nt, y, yref, scale);
        CHECK(!exact || count_bit_diffs(y, yg, nt * w.n_out) == 0, "%s prepared: not ggml's order", names[k]);
        MM_OK(vlm_matmul(pool, &w, x, 1, y));
        check_matmul("golden/prepared/1", &w, x, 1, y, yref, scale);
        CHECK(!exact || count_bit_diffs(y, yg, w.n_out) == 0, "%s prepared, 1 token: not ggml's order", names[k]);
        free(yg);
        vlm_weight_release(&w);
        free(x);
        free(y);
        free(yref);
        free(scale);
    }
    vlm_pool_destroy(&pool);
    vlm_gguf_destroy(&g);
}

int main(void) {
    fprintf(stderr, "best ISA: %s\n", vlm_isa_name(vlm_isa_best()));
    RUN(test_dequant_float_types);
    RUN(test_dequant_q4_0_q4_1);
    RUN(test_dequant_q5_0_q5_1);
    RUN(test_dequant_q8_0_q8_K);
    RUN(test_dequant_q4_K);
    RUN(test_dequant_q5_K);
    RUN(test_dequant_q6_K);
    RUN(test_dequant_bad_args);
    RUN(test_quantize_known_blocks);
    RUN(test_quantize_roundtrip_error);
    RUN(test_act_q8_0_ggml_rounding);
    RUN(test_act_q8_0_reciprocal);
    RUN(test_act_q8_0_subnormal_amax);
    RUN(test_act_q8_K_ggml);
    RUN(test_act_f16_bf16_rounding);
    RUN(test_act_simd_matches_scalar);
    RUN(test_vec_dot_simd_vs_scalar);
    RUN(test_weight_from_tensor_checks);
    RUN(test_matmul_all_types);
    RUN(test_matmul_large);
    RUN(test_matmul_multi);
    RUN(test_matmul_alloc_failure);
    RUN(test_fgemm_tinyblas_order);
    RUN(test_fgemm_vs_hardware);
    RUN(test_matmul_batch_invariance);
    RUN(test_matmul_sgemm_opt_in);
    RUN(test_golden_models_agree);
    RUN(test_golden_requantize_fixed_point);
    RUN(test_golden_matmul);
    return harness_report();
}
