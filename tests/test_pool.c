/* tests/test_pool.c - the fork-join pool runs every slice exactly once. */
#include <stdatomic.h>

#include "core/error.h"
#include "core/pool.h"
#include "tests/harness.h"

typedef struct {
    long n;
    atomic_long sum;
    atomic_int calls;
} sum_job_t;

static void sum_slice(void *arg, int ith, int nth) {
    sum_job_t *job = arg;
    long lo, hi, s = 0;
    vlm_pool_range(job->n, ith, nth, &lo, &hi);
    for (long i = lo; i < hi; i++) s += i;
    atomic_fetch_add(&job->sum, s);
    atomic_fetch_add(&job->calls, 1);
}

static void test_pool_runs_all_slices(void) {
    for (int nt = 1; nt <= 4; nt++) {
        vlm_pool_t *pool = vlm_pool_new(nt);
        REQUIRE(pool != NULL);
        CHECK(vlm_pool_size(pool) == nt);
        for (int rep = 0; rep < 2000; rep++) {
            sum_job_t job = {.n = 1000 + rep};
            atomic_init(&job.sum, 0);
            atomic_init(&job.calls, 0);
            vlm_pool_run(pool, sum_slice, &job);
            long n = job.n;
            CHECK(atomic_load(&job.sum) == n * (n - 1) / 2, "nt=%d rep=%d", nt, rep);
            CHECK(atomic_load(&job.calls) == nt);
        }
        vlm_pool_destroy(&pool);
        CHECK(pool == NULL);
    }
    vlm_pool_destroy(NULL);
}

static void test_pool_null_runs_inline(void) {
    sum_job_t job = {.n = 10};
    atomic_init(&job.sum, 0);
    atomic_init(&job.calls, 0);
    vlm_pool_run(NULL, sum_slice, &job);
    CHECK(atomic_load(&job.sum) == 45);
    CHECK(vlm_pool_size(NULL) == 1);
}

static void test_error_strings(void) {
    CHECK(strcmp(vlm_strerror(VLM_ERR_TRUNCATED), "truncated data") == 0);
    CHECK(strcmp(vlm_error_name(VLM_ERR_SHAPE), "VLM_ERR_SHAPE") == 0);
    CHECK(strcmp(vlm_strerror(12345), "unknown error") == 0);
    vlm_error_t e;
    CHECK(vlm_error_set(&e, VLM_ERR_TYPE, "blk.%d.attn_q: expected %s", 3, "F16") == VLM_ERR_TYPE);
    CHECK(strcmp(e.msg, "blk.3.attn_q: expected F16") == 0);
    CHECK(vlm_error_set(NULL, VLM_ERR_IO, "x") == VLM_ERR_IO);
}

int main(void) {
    RUN(test_pool_runs_all_slices);
    RUN(test_pool_null_runs_inline);
    RUN(test_error_strings);
    return harness_report();
}
