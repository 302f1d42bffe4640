/* core/quant.h - quantizers and the dot-product kernels for decoding.
 *
 * Weights stay in their file type. For a matrix-vector product the f32
 * activation row is first converted to the weight type's "vec_dot type",
 * exactly as ggml's CPU backend does (this matters for reproducing
 * llama.cpp's logits):
 *   F32 -> F32, F16 -> F16, BF16 -> BF16,
 *   Q4_0, Q5_0, Q8_0 -> Q8_0 (blocks of 32, d = amax/127, q rounded half-even),
 *   Q4_1, Q5_1 -> Q8_1,
 *   Q4_K, Q5_K, Q6_K -> Q8_K (blocks of 256).
 * then one kernel computes the dot product of a weight row with it. Kernels
 * exist in a portable scalar version and in SIMD versions selected at run
 * time from the CPU's features (the scalar one stays as the reference). The
 * SIMD kernels of quantized types add their float terms in the same order
 * as ggml's AVX2 vec_dot, so their results are bit-identical to llama.cpp's
 * (c392e50) on x86; the scalar ones differ from them by float rounding.
 */
#ifndef VLM_CORE_QUANT_H
#define VLM_CORE_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "dtype.h"

/* Quantizes n f32 values (a multiple of the block size) into y, which must
 * hold vlm_dtype_row_size(type, n) bytes, with ggml's reference quantizers
 * (quantize_row_*_ref). Supports F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
 * Q8_0, Q8_1, Q4_K, Q5_K, Q6_K, Q8_K. Used by tools/make-test-model, tests,
 * and activation quantization. Returns VLM_OK or VLM_ERR_UNSUPPORTED. */
int vlm_quantize_row(uint32_t type, const float *x, void *y, int64_t n);

/* The activation type that a weight type's dot product consumes. */
uint32_t vlm_dtype_vec_dot_type(uint32_t wtype);

/* Converts an f32 activation row to vec_dot type vtype, bit-exactly as ggml's
 * CPU backend does (which for Q8_0/Q8_1/Q8_K is its SIMD quantizer, not the
 * _ref one where they differ). y holds vlm_dtype_row_size(vtype, n) bytes. */
void vlm_quantize_activation_row(uint32_t vtype, const float *x, void *y, int64_t n);

/* s = dot(w, a) over n elements, where w is a row of the weight type and a a
 * row of its vec_dot type. */
typedef void (*vlm_vec_dot_fn)(int64_t n, float *s, const void *w, const void *a);

/* Instruction sets a kernel can target. */
typedef enum vlm_isa {
    VLM_ISA_SCALAR = 0,
    VLM_ISA_AVX2 = 1,     /* AVX2 + FMA + F16C */
    VLM_ISA_AVX512 = 2,   /* AVX-512 F/BW/VL/VNNI */
    VLM_ISA_COUNT
} vlm_isa_t;

/* The best ISA this CPU supports (honours VLM_ISA=scalar|avx2|avx512 in the
 * environment to force a lower one). */
vlm_isa_t vlm_isa_best(void);
const char *vlm_isa_name(vlm_isa_t isa);

/* The dot kernel for a weight type on the best ISA, or on a given ISA (for
 * tests that compare SIMD against scalar). NULL if unsupported. */
vlm_vec_dot_fn vlm_vec_dot_get(uint32_t wtype);
vlm_vec_dot_fn vlm_vec_dot_get_isa(uint32_t wtype, vlm_isa_t isa);

#endif
