/* text/chat.c - placeholder; being written. */
