/* core/kernels_avx512.c - placeholder; being written. */
