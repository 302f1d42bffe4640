/* core/pool.h - a small fork-join thread pool.
 *
 * vlm_pool_run() runs one function on all n threads of the pool (the caller
 * is thread 0) and returns when every thread has finished. Workers spin
 * briefly, then sleep on a condition variable, so back-to-back parallel
 * sections in a forward pass cost microseconds.
 *
 * Oversubscription policy: OpenBLAS gets the same thread count as the pool
 * (vlm_pool_new sets it) and is only ever called from outside a pool
 * section, by the caller's thread, so our threads and OpenBLAS's threads
 * never run at the same time.
 */
#ifndef VLM_CORE_POOL_H
#define VLM_CORE_POOL_H

typedef struct vlm_pool vlm_pool_t;

/* ith in [0, nth). */
typedef void (*vlm_pool_fn)(void *arg, int ith, int nth);

/* Creates a pool of n_threads (>= 1; the caller counts as one). Returns NULL
 * on allocation or thread-creation failure. Also sets OpenBLAS's thread
 * count to n_threads. */
vlm_pool_t *vlm_pool_new(int n_threads);

/* Joins the workers and frees; NULL-safe, sets *self_p to NULL. */
void vlm_pool_destroy(vlm_pool_t **self_p);

/* Number of threads, caller included; 1 for a NULL pool. */
int vlm_pool_size(const vlm_pool_t *pool);

/* Runs fn(arg, ith, nth) on every thread and waits. With a NULL pool it
 * runs fn(arg, 0, 1) inline. Not reentrant: do not call from inside fn. */
void vlm_pool_run(vlm_pool_t *pool, vlm_pool_fn fn, void *arg);

/* Splits [0, n) into nth nearly equal ranges; thread ith gets [*lo, *hi). */
static inline void vlm_pool_range(long n, int ith, int nth, long *lo, long *hi) {
    long q = n / nth, r = n % nth;
    *lo = ith * q + (ith < r ? ith : r);
    *hi = *lo + q + (ith < r ? 1 : 0);
}

#endif
