/* text/model.c - placeholder; being written. */
