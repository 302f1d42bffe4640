/* daemon/image_cache.c - the embedding LRU: an array of entries stamped
 * with a use counter. Capacities are small (tens of entries of megabytes
 * each), so a linear scan costs nothing next to what an entry saves. */
#include "daemon/image_cache.h"

#include <stdlib.h>
#include <string.h>

#include "core/error.h"

/* ==== Embeddings ======================================================== */

vlm_embd_t *vlm_embd_new(int32_t n_rows, int32_t n_embd) {
    VLM_ASSERT(n_rows > 0 && n_embd > 0);
    vlm_embd_t *e = calloc(1, sizeof *e);
    if (!e) return NULL;
    e->data = malloc((size_t)n_rows * (size_t)n_embd * sizeof *e->data);
    if (!e->data) {
        free(e);
        return NULL;
    }
    e->refs = 1;
    e->n_rows = n_rows;
    e->n_embd = n_embd;
    return e;
}

vlm_embd_t *vlm_embd_ref(vlm_embd_t *e) {
    e->refs++;
    return e;
}

void vlm_embd_destroy(vlm_embd_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_embd_t *e = *self_p;
    *self_p = NULL;
    if (--e->refs > 0) return;
    free(e->data);
    free(e);
}

void vlm_image_key_make(vlm_image_key_t *key, const void *data, size_t size, int mode) {
    memset(key, 0, sizeof *key);
    vlm_sha256(data, size, key->digest);
    key->mode = mode;
}

bool vlm_image_key_equal(const vlm_image_key_t *a, const vlm_image_key_t *b) {
    return a->mode == b->mode && memcmp(a->digest, b->digest, VLM_SHA256_SIZE) == 0;
}

/* ==== Cache ============================================================= */

typedef struct entry {
    vlm_image_key_t key;
    vlm_embd_t *embd;     /* NULL: the slot is empty */
    uint64_t last_used;
} entry_t;

struct vlm_image_cache {
    entry_t *entries;     /* [capacity] */
    int32_t capacity;
    int32_t n;
    uint64_t clock;
    int64_t hits, misses;
};

vlm_image_cache_t *vlm_image_cache_new(int capacity) {
    VLM_ASSERT(capacity >= 0);
    vlm_image_cache_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    if (capacity > 0) {
        c->entries = calloc((size_t)capacity, sizeof *c->entries);
        if (!c->entries) {
            free(c);
            return NULL;
        }
    }
    c->capacity = capacity;
    return c;
}

void vlm_image_cache_destroy(vlm_image_cache_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_image_cache_t *c = *self_p;
    *self_p = NULL;
    for (int32_t i = 0; i < c->capacity; i++) vlm_embd_destroy(&c->entries[i].embd);
    free(c->entries);
    free(c);
}

static entry_t *find(vlm_image_cache_t *c, const vlm_image_key_t *key) {
    for (int32_t i = 0; i < c->capacity; i++)
        if (c->entries[i].embd && vlm_image_key_equal(&c->entries[i].key, key)) return &c->entries[i];
    return NULL;
}

vlm_embd_t *vlm_image_cache_get(vlm_image_cache_t *c, const vlm_image_key_t *key) {
    entry_t *e = find(c, key);
    if (!e) {
        c->misses++;
        return NULL;
    }
    c->hits++;
    e->last_used = ++c->clock;
    return vlm_embd_ref(e->embd);
}

void vlm_image_cache_put(vlm_image_cache_t *c, const vlm_image_key_t *key, vlm_embd_t *embd) {
    if (c->capacity == 0) return;
    entry_t *e = find(c, key);
    if (!e) {
        /* An empty slot, else the least recently used one. */
        e = &c->entries[0];
        for (int32_t i = 0; i < c->capacity; i++) {
            entry_t *x = &c->entries[i];
            if (!x->embd) {
                e = x;
                break;
            }
            if (x->last_used < e->last_used) e = x;
        }
        if (e->embd) vlm_embd_destroy(&e->embd);
        else c->n++;
        e->key = *key;
    } else {
        vlm_embd_destroy(&e->embd);
    }
    e->embd = vlm_embd_ref(embd);
    e->last_used = ++c->clock;
}

void vlm_image_cache_counts(const vlm_image_cache_t *c, vlm_image_cache_counts_t *out) {
    out->hits = c->hits;
    out->misses = c->misses;
    out->entries = c->n;
    out->capacity = c->capacity;
}
