/* vision/preprocess.c - placeholder; being written. */
