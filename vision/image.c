/* vision/image.c - placeholder; being written. */
