/* text/decoder.c - placeholder; being written. */
