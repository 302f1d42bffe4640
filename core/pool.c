/* core/pool.c - fork-join thread pool (see pool.h).
 *
 * Each vlm_pool_run() bumps a generation counter; workers wait for a new
 * generation (spinning a little, then on a condition variable), run their
 * slice, and decrement the pending count; the caller runs slice 0 and waits
 * for pending to reach zero.
 */
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

#include <cblas.h>

struct vlm_pool {
    int n_threads;
    pthread_t *threads;        /* [n_threads - 1] workers */
    pthread_mutex_t mutex;
    pthread_cond_t cond_work;  /* a new generation or stop */
    pthread_cond_t cond_done;  /* pending reached zero */
    atomic_uint generation;
    atomic_int pending;
    atomic_bool stop;
    vlm_pool_fn fn;
    void *arg;
};

typedef struct {
    vlm_pool_t *pool;
    int ith;
} worker_arg_t;

enum { SPIN_ITERS = 20000 };

static void *worker_main(void *p) {
    worker_arg_t *wa = p;
    vlm_pool_t *pool = wa->pool;
    int ith = wa->ith;
    free(wa);
    unsigned seen = 0;
    for (;;) {
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&pool->generation, memory_order_acquire)) == seen &&
               !atomic_load(&pool->stop) && spins < SPIN_ITERS) {
            spins++;
            if ((spins & 63) == 0) sched_yield();
        }
        if (gen == seen && !atomic_load(&pool->stop)) {
            pthread_mutex_lock(&pool->mutex);
            while ((gen = atomic_load(&pool->generation)) == seen && !atomic_load(&pool->stop))
                pthread_cond_wait(&pool->cond_work, &pool->mutex);
            pthread_mutex_unlock(&pool->mutex);
        }
        if (atomic_load(&pool->stop)) break;
        seen = gen;
        pool->fn(pool->arg, ith, pool->n_threads);
        if (atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&pool->mutex);
            pthread_cond_signal(&pool->cond_done);
            pthread_mutex_unlock(&pool->mutex);
        }
    }
    return NULL;
}

vlm_pool_t *vlm_pool_new(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    vlm_pool_t *pool = calloc(1, sizeof *pool);
    if (!pool) return NULL;
    pool->n_threads = n_threads;
    pthread_mutex_init(&pool->mutex, NULL);
    pthread_cond_init(&pool->cond_work, NULL);
    pthread_cond_init(&pool->cond_done, NULL);
    atomic_init(&pool->generation, 0);
    atomic_init(&pool->pending, 0);
    atomic_init(&pool->stop, false);
    if (n_threads > 1) {
        pool->threads = calloc((size_t)n_threads - 1, sizeof *pool->threads);
        if (!pool->threads) goto fail_threads;
        pool->n_threads = 1; /* counts the threads started so far */
        for (int i = 1; i < n_threads; i++) {
            worker_arg_t *wa = malloc(sizeof *wa);
            if (!wa) goto fail_spawn;
            wa->pool = pool;
            wa->ith = i;
            if (pthread_create(&pool->threads[i - 1], NULL, worker_main, wa) != 0) {
                free(wa);
                goto fail_spawn;
            }
            pool->n_threads = i + 1;
        }
    }
    openblas_set_num_threads(n_threads);
    return pool;

fail_spawn:
    vlm_pool_destroy(&pool);
    return NULL;
fail_threads:
    pthread_cond_destroy(&pool->cond_done);
    pthread_cond_destroy(&pool->cond_work);
    pthread_mutex_destroy(&pool->mutex);
    free(pool);
    return NULL;
}

void vlm_pool_destroy(vlm_pool_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_pool_t *pool = *self_p;
    pthread_mutex_lock(&pool->mutex);
    atomic_store(&pool->stop, true);
    pthread_cond_broadcast(&pool->cond_work);
    pthread_mutex_unlock(&pool->mutex);
    for (int i = 1; i < pool->n_threads; i++) pthread_join(pool->threads[i - 1], NULL);
    free(pool->threads);
    pthread_cond_destroy(&pool->cond_done);
    pthread_cond_destroy(&pool->cond_work);
    pthread_mutex_destroy(&pool->mutex);
    free(pool);
    *self_p = NULL;
}

int vlm_pool_size(const vlm_pool_t *pool) { return pool ? pool->n_threads : 1; }

void vlm_pool_run(vlm_pool_t *pool, vlm_pool_fn fn, void *arg) {
    if (!pool || pool->n_threads == 1) {
        fn(arg, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store(&pool->pending, pool->n_threads - 1);
    pthread_mutex_lock(&pool->mutex);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->cond_work);
    pthread_mutex_unlock(&pool->mutex);

    fn(arg, 0, pool->n_threads);

    int spins = 0;
    while (atomic_load_explicit(&pool->pending, memory_order_acquire) > 0 && spins < SPIN_ITERS) {
        spins++;
        if ((spins & 63) == 0) sched_yield();
    }
    if (atomic_load(&pool->pending) > 0) {
        pthread_mutex_lock(&pool->mutex);
        while (atomic_load(&pool->pending) > 0) pthread_cond_wait(&pool->cond_done, &pool->mutex);
        pthread_mutex_unlock(&pool->mutex);
    }
}
