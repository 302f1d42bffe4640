/* core/dtype.c - the ggml type table, row sizes, and f16/bf16 conversions.
 *
 * The table lists every type number that a GGUF file written by llama.cpp can
 * hold (ggml.h, enum ggml_type), with ggml's block size and bytes per block,
 * so that a tensor of a type we cannot compute with can still be sized,
 * skipped, and named in an error. Numbers that ggml retired (4, 5, 31-33,
 * 36-38) have no entry.
 *
 * The half-float conversions are written in integer arithmetic so they give
 * the same bits as the F16C instructions ggml uses on x86 (round to nearest
 * even, subnormals kept, NaN quieted both ways), on any CPU. Dequantization
 * (vlm_dtype_dequantize_row) lives in core/quant.c next to the kernels.
 */
#include "dtype.h"

#include <assert.h>
#include <stdio.h>
#include <string.h>

/* The block layouts of dtype.h must match ggml-common.h byte for byte. */
static_assert(sizeof(vlm_block_q4_0) == 18, "block_q4_0 must be 18 bytes");
static_assert(sizeof(vlm_block_q4_1) == 20, "block_q4_1 must be 20 bytes");
static_assert(sizeof(vlm_block_q5_0) == 22, "block_q5_0 must be 22 bytes");
static_assert(sizeof(vlm_block_q5_1) == 24, "block_q5_1 must be 24 bytes");
static_assert(sizeof(vlm_block_q8_0) == 34, "block_q8_0 must be 34 bytes");
static_assert(sizeof(vlm_block_q8_1) == 36, "block_q8_1 must be 36 bytes");
static_assert(sizeof(vlm_block_q4_K) == 144, "block_q4_K must be 144 bytes");
static_assert(sizeof(vlm_block_q5_K) == 176, "block_q5_K must be 176 bytes");
static_assert(sizeof(vlm_block_q6_K) == 210, "block_q6_K must be 210 bytes");
static_assert(sizeof(vlm_block_q8_K) == 292, "block_q8_K must be 292 bytes");

/* ==== Type table ==== */

/* Indexed by ggml type number; a NULL name marks a number with no type. */
static const vlm_dtype_info_t dtype_table[VLM_DTYPE_COUNT] = {
    [0] = { "F32", 1, 4, true },
    [1] = { "F16", 1, 2, true },
    [2] = { "Q4_0", 32, 18, true },
    [3] = { "Q4_1", 32, 20, true },
    [6] = { "Q5_0", 32, 22, true },
    [7] = { "Q5_1", 32, 24, true },
    [8] = { "Q8_0", 32, 34, true },
    [9] = { "Q8_1", 32, 36, true },
    [10] = { "Q2_K", 256, 84, false },
    [11] = { "Q3_K", 256, 110, false },
    [12] = { "Q4_K", 256, 144, true },
    [13] = { "Q5_K", 256, 176, true },
    [14] = { "Q6_K", 256, 210, true },
    [15] = { "Q8_K", 256, 292, true },
    [16] = { "IQ2_XXS", 256, 66, false },
    [17] = { "IQ2_XS", 256, 74, false },
    [18] = { "IQ3_XXS", 256, 98, false },
    [19] = { "IQ1_S", 256, 50, false },
    [20] = { "IQ4_NL", 32, 18, false },
    [21] = { "IQ3_S", 256, 110, false },
    [22] = { "IQ2_S", 256, 82, false },
    [23] = { "IQ4_XS", 256, 136, false },
    [24] = { "I8", 1, 1, false },
    [25] = { "I16", 1, 2, false },
    [26] = { "I32", 1, 4, false },
    [27] = { "I64", 1, 8, false },
    [28] = { "F64", 1, 8, false },
    [29] = { "IQ1_M", 256, 56, false },
    [30] = { "BF16", 1, 2, true },
    [34] = { "TQ1_0", 256, 54, false },
    [35] = { "TQ2_0", 256, 66, false },
};

const vlm_dtype_info_t *vlm_dtype_info(uint32_t type) {
    if (type >= VLM_DTYPE_COUNT || dtype_table[type].name == NULL) return NULL;
    return &dtype_table[type];
}

const char *vlm_dtype_name(uint32_t type) {
    static _Thread_local char unknown[24];
    const vlm_dtype_info_t *info = vlm_dtype_info(type);
    if (info) return info->name;
    snprintf(unknown, sizeof unknown, "type %u", (unsigned)type);
    return unknown;
}

size_t vlm_dtype_row_size(uint32_t type, int64_t n) {
    const vlm_dtype_info_t *info = vlm_dtype_info(type);
    if (!info || n < 0 || n % info->block_size != 0) return 0;
    uint64_t blocks = (uint64_t)n / (uint64_t)info->block_size;
    if (blocks > SIZE_MAX / info->type_size) return 0;
    return (size_t)blocks * info->type_size;
}

/* ==== Half and bfloat16 conversions ==== */

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float vlm_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    if (exp == 0) {
        /* Zero or subnormal: mant * 2^-24, exact in f32. */
        float v = (float)mant * 0x1p-24f;
        return f32_from_bits(f32_bits(v) | sign);
    }
    if (exp == 31) /* inf, or NaN made quiet as F16C does */
        return f32_from_bits(sign | 0x7f800000u | (mant ? 0x400000u : 0) | (mant << 13));
    return f32_from_bits(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t vlm_fp32_to_fp16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;

    if (ax > 0x7f800000u) /* NaN: quieted, top mantissa bits kept (as F16C does) */
        return (uint16_t)(sign | 0x7e00 | ((ax >> 13) & 0x3ff));
    if (ax >= 0x477ff000u) /* >= 65520 rounds to infinity (inf itself included) */
        return (uint16_t)(sign | 0x7c00);
    if (ax >= 0x38800000u) {
        /* Normal half: rebias the exponent (127 -> 15) and round the 13
         * dropped mantissa bits to nearest even; a carry moves into the
         * exponent, which is the correct result. */
        uint32_t r = ax - 0x38000000u + 0x0fffu + ((ax >> 13) & 1u);
        return (uint16_t)(sign | (r >> 13));
    }
    /* Subnormal half (or zero): value = m * 2^(e - 150) with the implicit bit
     * in m; in units of 2^-24 that is m >> (126 - e), rounded to nearest even. */
    uint32_t e = ax >> 23;
    if (e < 102) return sign; /* below 2^-25: rounds to zero (f32 subnormals too) */
    uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e; /* 14..24 */
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
}

float vlm_bf16_to_fp32(uint16_t h) {
    return f32_from_bits((uint32_t)h << 16);
}

uint16_t vlm_fp32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64); /* NaN, quieted */
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}
