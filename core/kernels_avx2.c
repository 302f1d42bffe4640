/* core/kernels_avx2.c - placeholder; being written. */
