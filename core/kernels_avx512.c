/* core/kernels_avx512.c - the x86 kernels built for AVX-512 (F/BW/VL/DQ)
 * with VNNI.
 *
 * The code lives in kernels_x86.h, shared with the AVX2 build; here the
 * panel kernels use 16-row zmm panels and vpdpbusd. meson compiles this file
 * with the AVX-512 flags; nothing here runs unless quant.c's dispatch has
 * checked the CPU supports it.
 */
#define VLM_K_AVX512 1
#define VLM_K_TABLE vlm__kernels_avx512
#define VLM_K_FGEMM vlm__fgemm_avx512
#include "kernels_x86.h"
