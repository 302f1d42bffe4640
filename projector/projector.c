/* projector/projector.c - placeholder; being written. */
