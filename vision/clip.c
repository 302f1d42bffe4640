/* vision/clip.c - placeholder; being written. */
