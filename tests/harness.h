/* tests/harness.h - a minimal test harness shared by the test executables.
 *
 * A test file defines static void test_x(void) functions and lists them in
 * main() with RUN(test_x). CHECK() records a failure with file and line and
 * goes on; REQUIRE() also returns from the test. main() ends with
 * return harness_report(), which prints "N passed, N failed" (counting
 * tests, not checks) and returns non-zero on any failure. SKIP() marks the
 * current test skipped (e.g. when ../shared is absent).
 *
 * Paths: VLM_TEST_DATA is tests/data in the source tree; VLM_SHARED_DIR is
 * ../shared next to it (may not exist); VLM_BUILD_DIR is the build root.
 */
#ifndef VLM_TESTS_HARNESS_H
#define VLM_TESTS_HARNESS_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int harness_checks_failed_in_test;
static int harness_skipped_in_test;
static int harness_passed, harness_failed, harness_skipped;

/* Prints an optional detail message (no format attribute on purpose, so an
 * empty detail is allowed). */
static inline void harness_note(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            harness_checks_failed_in_test++;                                   \
            fprintf(stderr, "  FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);  \
            harness_note("" __VA_ARGS__);                                      \
        }                                                                      \
    } while (0)

#define REQUIRE(cond, ...)                                                     \
    do {                                                                       \
        if (!(cond)) {                                                         \
            CHECK(cond, __VA_ARGS__);                                          \
            return;                                                            \
        }                                                                      \
    } while (0)

#define SKIP(...)                                                              \
    do {                                                                       \
        harness_skipped_in_test = 1;                                           \
        fprintf(stderr, "  SKIP: ");                                           \
        harness_note("" __VA_ARGS__);                                          \
        return;                                                                \
    } while (0)

#define RUN(fn)                                                                \
    do {                                                                       \
        harness_checks_failed_in_test = 0;                                     \
        harness_skipped_in_test = 0;                                           \
        fprintf(stderr, "[ RUN  ] %s\n", #fn);                                 \
        fn();                                                                  \
        if (harness_checks_failed_in_test) {                                   \
            harness_failed++;                                                  \
            fprintf(stderr, "[ FAIL ] %s\n", #fn);                             \
        } else if (harness_skipped_in_test) {                                  \
            harness_skipped++;                                                 \
            fprintf(stderr, "[ SKIP ] %s\n", #fn);                             \
        } else {                                                               \
            harness_passed++;                                                  \
            fprintf(stderr, "[  OK  ] %s\n", #fn);                             \
        }                                                                      \
    } while (0)

static inline int harness_report(void) {
    printf("%d passed, %d failed, %d skipped\n", harness_passed, harness_failed, harness_skipped);
    return harness_failed ? 1 : 0;
}

/* Reads a whole file; returns malloc'd bytes (caller frees) or NULL. */
static inline void *harness_read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf && n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf && size) *size = (size_t)n;
    return buf;
}

/* max |a - b| over n floats. */
static inline double harness_max_abs_diff(const float *a, const float *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > m || d != d) m = d != d ? INFINITY : d;
    }
    return m;
}

#endif
