/* clients/run/vlm-run.c - placeholder; being written. */
int main(void) { return 1; }
