/* daemon/image_cache.h - projected image embeddings, and an LRU cache of
 * them keyed by the SHA-256 of the image bytes and the preprocessing mode.
 *
 * Encoding an image is the most expensive step of a short job, and clients
 * often ask several questions about the same picture (or caption the same
 * frame twice), so the engine keeps the last N embeddings. The key is the
 * bytes as sent, not the decoded pixels, so a hit skips decoding too.
 *
 * Both types are used by the engine thread alone: no locking. Embeddings are
 * reference counted so that a job keeps its rows even when the cache evicts
 * the entry.
 */
#ifndef VLM_DAEMON_IMAGE_CACHE_H
#define VLM_DAEMON_IMAGE_CACHE_H

#include <stdbool.h>
#include <stdint.h>

#include "daemon/sha256.h"

/* One image's projected embeddings. */
typedef struct vlm_embd {
    int refs;
    int32_t n_rows;   /* n_patches */
    int32_t n_embd;   /* the text model's width */
    float *data;      /* [n_rows][n_embd] */
} vlm_embd_t;

/* Allocates uninitialised rows with one reference; NULL when out of memory. */
vlm_embd_t *vlm_embd_new(int32_t n_rows, int32_t n_embd);
/* Adds a reference and returns e. */
vlm_embd_t *vlm_embd_ref(vlm_embd_t *e);
/* Drops a reference (freeing with the last); NULL-safe, clears *self_p. */
void vlm_embd_destroy(vlm_embd_t **self_p);

typedef struct vlm_image_key {
    uint8_t digest[VLM_SHA256_SIZE];  /* SHA-256 of the encoded image bytes */
    int32_t mode;                     /* vlm_preprocess_mode_t */
} vlm_image_key_t;

/* Fills key from the image bytes and the preprocessing mode. */
void vlm_image_key_make(vlm_image_key_t *key, const void *data, size_t size, int mode);
bool vlm_image_key_equal(const vlm_image_key_t *a, const vlm_image_key_t *b);

typedef struct vlm_image_cache vlm_image_cache_t;

/* A cache of at most capacity entries (0 disables it: every lookup misses,
 * nothing is kept). NULL when out of memory. */
vlm_image_cache_t *vlm_image_cache_new(int capacity);

/* Drops every entry's reference and frees; NULL-safe, clears *self_p. */
void vlm_image_cache_destroy(vlm_image_cache_t **self_p);

/* Returns a new reference to the embeddings stored under key (the caller
 * drops it) and marks the entry most recently used, or NULL on a miss.
 * Counts the hit or miss. */
vlm_embd_t *vlm_image_cache_get(vlm_image_cache_t *c, const vlm_image_key_t *key);

/* Stores e under key (the cache takes its own reference), evicting the least
 * recently used entry when full. A key already present is refreshed. */
void vlm_image_cache_put(vlm_image_cache_t *c, const vlm_image_key_t *key, vlm_embd_t *e);

typedef struct vlm_image_cache_counts {
    int64_t hits, misses;
    int32_t entries, capacity;
} vlm_image_cache_counts_t;

void vlm_image_cache_counts(const vlm_image_cache_t *c, vlm_image_cache_counts_t *out);

#endif
