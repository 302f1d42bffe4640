/* text/tokenizer.c - placeholder; being written. */
