/* core/dtype.h - ggml tensor types: block layouts, sizes, f16/bf16, and
 * dequantization to f32.
 *
 * Type numbers are ggml's (they are what GGUF files store). Quantized types
 * pack `block_size` consecutive elements of a row into a block of
 * `type_size` bytes; a row of n elements (n a multiple of block_size) takes
 * n / block_size * type_size bytes. Layouts follow ggml-common.h.
 */
#ifndef VLM_CORE_DTYPE_H
#define VLM_CORE_DTYPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum vlm_dtype {
    VLM_DTYPE_F32 = 0,
    VLM_DTYPE_F16 = 1,
    VLM_DTYPE_Q4_0 = 2,
    VLM_DTYPE_Q4_1 = 3,
    VLM_DTYPE_Q5_0 = 6,
    VLM_DTYPE_Q5_1 = 7,
    VLM_DTYPE_Q8_0 = 8,
    VLM_DTYPE_Q8_1 = 9,
    VLM_DTYPE_Q2_K = 10,
    VLM_DTYPE_Q3_K = 11,
    VLM_DTYPE_Q4_K = 12,
    VLM_DTYPE_Q5_K = 13,
    VLM_DTYPE_Q6_K = 14,
    VLM_DTYPE_Q8_K = 15,
    VLM_DTYPE_BF16 = 30,
    VLM_DTYPE_COUNT = 40
} vlm_dtype_t;

#define VLM_QK4_0 32
#define VLM_QK4_1 32
#define VLM_QK5_0 32
#define VLM_QK5_1 32
#define VLM_QK8_0 32
#define VLM_QK8_1 32
#define VLM_QK_K 256
#define VLM_K_SCALE_SIZE 12

/* Block layouts, exactly as ggml stores them. d/m are IEEE half floats. */
typedef struct { uint16_t d; uint8_t qs[VLM_QK4_0 / 2]; } vlm_block_q4_0;                  /* 18 B */
typedef struct { uint16_t d, m; uint8_t qs[VLM_QK4_1 / 2]; } vlm_block_q4_1;               /* 20 B */
typedef struct { uint16_t d; uint8_t qh[4]; uint8_t qs[VLM_QK5_0 / 2]; } vlm_block_q5_0;   /* 22 B */
typedef struct { uint16_t d, m; uint8_t qh[4]; uint8_t qs[VLM_QK5_1 / 2]; } vlm_block_q5_1;/* 24 B */
typedef struct { uint16_t d; int8_t qs[VLM_QK8_0]; } vlm_block_q8_0;                       /* 34 B */
typedef struct { uint16_t d, s; int8_t qs[VLM_QK8_1]; } vlm_block_q8_1;                    /* 36 B: s = d * sum(qs) */
typedef struct { uint16_t d, dmin; uint8_t scales[VLM_K_SCALE_SIZE]; uint8_t qs[VLM_QK_K / 2]; } vlm_block_q4_K;   /* 144 B */
typedef struct { uint16_t d, dmin; uint8_t scales[VLM_K_SCALE_SIZE]; uint8_t qh[VLM_QK_K / 8]; uint8_t qs[VLM_QK_K / 2]; } vlm_block_q5_K; /* 176 B */
typedef struct { uint8_t ql[VLM_QK_K / 2]; uint8_t qh[VLM_QK_K / 4]; int8_t scales[VLM_QK_K / 16]; uint16_t d; } vlm_block_q6_K; /* 210 B */
typedef struct { float d; int8_t qs[VLM_QK_K]; int16_t bsums[VLM_QK_K / 16]; } vlm_block_q8_K; /* 292 B */

typedef struct vlm_dtype_info {
    const char *name;      /* "Q4_K" */
    int block_size;        /* elements per block (1 for F32/F16/BF16) */
    size_t type_size;      /* bytes per block */
    bool supported;        /* this build can dequantize and multiply it */
} vlm_dtype_info_t;

/* Returns the info for a ggml type number, or NULL when the number is not a
 * ggml type at all. Known but unsupported types (Q2_K, IQ*, ...) return an
 * entry with supported == false, so errors can still name them. */
const vlm_dtype_info_t *vlm_dtype_info(uint32_t type);

/* "Q4_K", or "type 99" for unknown numbers (static storage, thread-unsafe for
 * unknown numbers only). */
const char *vlm_dtype_name(uint32_t type);

/* Bytes taken by a row of n elements; 0 when n is not a multiple of the
 * block size or the type is unknown. */
size_t vlm_dtype_row_size(uint32_t type, int64_t n);

/* Dequantizes n elements (a multiple of the block size) from src to f32.
 * Returns VLM_OK or VLM_ERR_UNSUPPORTED / VLM_ERR_INVALID_ARG. */
int vlm_dtype_dequantize_row(uint32_t type, const void *src, float *dst, int64_t n);

/* IEEE half and bfloat16 conversions. fp32->fp16 rounds to nearest even,
 * like F16C's _cvtss_sh(x, 0) that ggml uses. fp32->bf16 rounds to nearest
 * even (NaN stays NaN), like ggml_compute_fp32_to_bf16. */
float vlm_fp16_to_fp32(uint16_t h);
uint16_t vlm_fp32_to_fp16(float f);
float vlm_bf16_to_fp32(uint16_t h);
uint16_t vlm_fp32_to_bf16(float f);
/* Rounds through f16 and back: f16(x) as an f32. */
static inline float vlm_round_fp16(float x) { return vlm_fp16_to_fp32(vlm_fp32_to_fp16(x)); }

#endif
