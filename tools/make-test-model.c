/* tools/make-test-model.c - placeholder; being written. */
int main(void) { return 1; }
