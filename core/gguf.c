/* core/gguf.c - placeholder; being written. */
