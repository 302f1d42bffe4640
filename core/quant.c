/* core/quant.c - placeholder; being written. */
