/* core/kernels_avx2.c - the x86 kernels built for AVX2 + FMA + F16C.
 *
 * The code lives in kernels_x86.h, shared with the AVX-512 build; this file
 * only picks the instruction set and names the table. meson compiles it
 * with -mavx2 -mfma -mf16c; nothing here runs unless quant.c's dispatch has
 * checked the CPU supports it.
 */
#define VLM_K_AVX512 0
#define VLM_K_TABLE vlm__kernels_avx2
#define VLM_K_FGEMM vlm__fgemm_avx2
#include "kernels_x86.h"
