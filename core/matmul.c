/* core/matmul.c - placeholder; being written. */
