/* core/dtype.c - placeholder; being written. */
