/* text/sampler.c - placeholder; being written. */
