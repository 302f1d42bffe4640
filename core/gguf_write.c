/* core/gguf_write.c - the GGUF v3 writer.
 *
 * Each metadata pair is serialized (type tag and value, little-endian) as
 * soon as it is set, so writing is a straight copy; tensors are kept as
 * (name, type, shape, borrowed data). The output goes through a small sink
 * that either appends to a FILE or to a growing memory buffer, so the file
 * and in-memory writers share one code path. The layout is the one
 * llama.cpp's gguf_write_to_buf() produces.
 */
#include "gguf_write.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dtype.h"
#include "gguf.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "core/gguf_write.c writes host-order integers and needs a little-endian host"
#endif

#define GGUF_MAGIC 0x46554747u
#define GGUF_VERSION 3
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGML_MAX_NAME 64

/* ==== Byte buffer ==== */

typedef struct bbuf {
    uint8_t *p;    /* [len] */
    size_t len, cap;
    bool oom;      /* an append failed; the contents are incomplete */
} bbuf_t;

static void bb_put(bbuf_t *b, const void *data, size_t n) {
    if (b->oom || n == 0) return;
    if (n > SIZE_MAX - b->len) {
        b->oom = true;
        return;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n) cap = cap > SIZE_MAX / 2 ? b->len + n : cap * 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void bb_u32(bbuf_t *b, uint32_t v) { bb_put(b, &v, 4); }
static void bb_u64(bbuf_t *b, uint64_t v) { bb_put(b, &v, 8); }
static void bb_str(bbuf_t *b, const char *s, size_t n) {
    bb_u64(b, n);
    bb_put(b, s, n);
}

/* ==== Writer ==== */

typedef struct wkv {
    char *key;
    bbuf_t val;    /* type tag + value, as written after the key */
} wkv_t;

typedef struct wtensor {
    char *name;
    uint32_t type;
    uint32_t n_dims;
    int64_t ne[VLM_GGUF_MAX_DIMS];
    const void *data; /* [nbytes], borrowed */
    uint64_t nbytes;
} wtensor_t;

struct vlm_gguf_writer {
    wkv_t *kvs;          /* [n_kv] in insertion order */
    size_t n_kv, cap_kv;
    wtensor_t *tensors;  /* [n_tensors] in insertion order */
    size_t n_tensors, cap_tensors;
};

vlm_gguf_writer_t *vlm_gguf_writer_new(void) {
    return calloc(1, sizeof(vlm_gguf_writer_t));
}

void vlm_gguf_writer_destroy(vlm_gguf_writer_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_gguf_writer_t *w = *self_p;
    for (size_t i = 0; i < w->n_kv; i++) {
        free(w->kvs[i].key);
        free(w->kvs[i].val.p);
    }
    for (size_t i = 0; i < w->n_tensors; i++) free(w->tensors[i].name);
    free(w->kvs);
    free(w->tensors);
    free(w);
    *self_p = NULL;
}

/* Stores a serialized value under key, replacing an existing one; takes
 * ownership of val's buffer in every case. */
static int set_serialized(vlm_gguf_writer_t *w, const char *key, bbuf_t *val) {
    if (val->oom) {
        free(val->p);
        return VLM_ERR_NOMEM;
    }
    for (size_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kvs[i].key, key) == 0) {
            free(w->kvs[i].val.p);
            w->kvs[i].val = *val;
            return VLM_OK;
        }
    }
    if (w->n_kv == w->cap_kv) {
        size_t cap = w->cap_kv ? w->cap_kv * 2 : 16;
        wkv_t *kvs = realloc(w->kvs, cap * sizeof *kvs);
        if (!kvs) {
            free(val->p);
            return VLM_ERR_NOMEM;
        }
        w->kvs = kvs;
        w->cap_kv = cap;
    }
    char *copy = strdup(key);
    if (!copy) {
        free(val->p);
        return VLM_ERR_NOMEM;
    }
    w->kvs[w->n_kv].key = copy;
    w->kvs[w->n_kv].val = *val;
    w->n_kv++;
    return VLM_OK;
}

static size_t scalar_size(uint32_t type) {
    switch (type) {
    case VLM_GGUF_TYPE_UINT8: case VLM_GGUF_TYPE_INT8: case VLM_GGUF_TYPE_BOOL: return 1;
    case VLM_GGUF_TYPE_UINT16: case VLM_GGUF_TYPE_INT16: return 2;
    case VLM_GGUF_TYPE_UINT32: case VLM_GGUF_TYPE_INT32: case VLM_GGUF_TYPE_FLOAT32: return 4;
    case VLM_GGUF_TYPE_UINT64: case VLM_GGUF_TYPE_INT64: case VLM_GGUF_TYPE_FLOAT64: return 8;
    default: return 0;
    }
}

int vlm_gguf_writer_set_val(vlm_gguf_writer_t *w, const char *key, uint32_t type, const void *v) {
    size_t n = scalar_size(type);
    if (!w || !key || !v || n == 0) return VLM_ERR_INVALID_ARG;
    bbuf_t b = { 0 };
    bb_u32(&b, type);
    if (type == VLM_GGUF_TYPE_BOOL) {
        uint8_t byte = *(const bool *)v ? 1 : 0;
        bb_put(&b, &byte, 1);
    } else {
        bb_put(&b, v, n);
    }
    return set_serialized(w, key, &b);
}

int vlm_gguf_writer_set_u32(vlm_gguf_writer_t *w, const char *key, uint32_t v) {
    return vlm_gguf_writer_set_val(w, key, VLM_GGUF_TYPE_UINT32, &v);
}

int vlm_gguf_writer_set_i32(vlm_gguf_writer_t *w, const char *key, int32_t v) {
    return vlm_gguf_writer_set_val(w, key, VLM_GGUF_TYPE_INT32, &v);
}

int vlm_gguf_writer_set_u64(vlm_gguf_writer_t *w, const char *key, uint64_t v) {
    return vlm_gguf_writer_set_val(w, key, VLM_GGUF_TYPE_UINT64, &v);
}

int vlm_gguf_writer_set_f32(vlm_gguf_writer_t *w, const char *key, float v) {
    return vlm_gguf_writer_set_val(w, key, VLM_GGUF_TYPE_FLOAT32, &v);
}

int vlm_gguf_writer_set_bool(vlm_gguf_writer_t *w, const char *key, bool v) {
    return vlm_gguf_writer_set_val(w, key, VLM_GGUF_TYPE_BOOL, &v);
}

int vlm_gguf_writer_set_str(vlm_gguf_writer_t *w, const char *key, const char *s) {
    if (!w || !key || !s) return VLM_ERR_INVALID_ARG;
    bbuf_t b = { 0 };
    bb_u32(&b, VLM_GGUF_TYPE_STRING);
    bb_str(&b, s, strlen(s));
    return set_serialized(w, key, &b);
}

int vlm_gguf_writer_set_arr(vlm_gguf_writer_t *w, const char *key, uint32_t elem_type,
                            const void *data, uint64_t n) {
    size_t es = scalar_size(elem_type);
    if (!w || !key || es == 0 || (n && !data) || n > SIZE_MAX / es) return VLM_ERR_INVALID_ARG;
    bbuf_t b = { 0 };
    bb_u32(&b, VLM_GGUF_TYPE_ARRAY);
    bb_u32(&b, elem_type);
    bb_u64(&b, n);
    if (elem_type == VLM_GGUF_TYPE_BOOL) {
        const uint8_t *src = data;
        for (uint64_t i = 0; i < n; i++) {
            uint8_t byte = src[i] ? 1 : 0;
            bb_put(&b, &byte, 1);
        }
    } else {
        bb_put(&b, data, (size_t)n * es);
    }
    return set_serialized(w, key, &b);
}

int vlm_gguf_writer_set_arr_str(vlm_gguf_writer_t *w, const char *key, const char *const *strs,
                                const size_t *lens, uint64_t n) {
    if (!w || !key || (n && !strs)) return VLM_ERR_INVALID_ARG;
    for (uint64_t i = 0; i < n; i++)
        if (!strs[i]) return VLM_ERR_INVALID_ARG;
    bbuf_t b = { 0 };
    bb_u32(&b, VLM_GGUF_TYPE_ARRAY);
    bb_u32(&b, VLM_GGUF_TYPE_STRING);
    bb_u64(&b, n);
    for (uint64_t i = 0; i < n; i++) bb_str(&b, strs[i], lens ? lens[i] : strlen(strs[i]));
    return set_serialized(w, key, &b);
}

int vlm_gguf_writer_add_tensor(vlm_gguf_writer_t *w, const char *name, uint32_t type, int n_dims,
                               const int64_t *ne, const void *data, vlm_error_t *err) {
    if (!w || !name || !ne || !data)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "gguf writer: add_tensor: NULL argument");
    size_t name_len = strlen(name);
    if (name_len == 0 || name_len >= GGML_MAX_NAME)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "%s: tensor name must be 1 to %d bytes long",
                             name, GGML_MAX_NAME - 1);
    for (size_t i = 0; i < w->n_tensors; i++)
        if (strcmp(w->tensors[i].name, name) == 0)
            return vlm_error_set(err, VLM_ERR_INVALID_ARG, "%s: duplicate tensor name", name);
    const vlm_dtype_info_t *info = vlm_dtype_info(type);
    if (!info) return vlm_error_set(err, VLM_ERR_TYPE, "%s: unknown ggml type %" PRIu32, name, type);
    if (n_dims < 1 || n_dims > VLM_GGUF_MAX_DIMS)
        return vlm_error_set(err, VLM_ERR_SHAPE, "%s: %d dimensions (must be 1 to %d)", name, n_dims,
                             VLM_GGUF_MAX_DIMS);
    wtensor_t t = { .type = type, .n_dims = (uint32_t)n_dims, .data = data };
    for (int d = 0; d < VLM_GGUF_MAX_DIMS; d++) {
        t.ne[d] = d < n_dims ? ne[d] : 1;
        if (t.ne[d] <= 0)
            return vlm_error_set(err, VLM_ERR_SHAPE, "%s: dimension %d has size %" PRId64, name, d, t.ne[d]);
    }
    if (t.ne[0] % info->block_size != 0)
        return vlm_error_set(err, VLM_ERR_SHAPE, "%s: row length %" PRId64 " is not a multiple of the %s "
                             "block size %d", name, t.ne[0], info->name, info->block_size);
    uint64_t nbytes = vlm_dtype_row_size(type, t.ne[0]);
    for (int d = 1; d < VLM_GGUF_MAX_DIMS; d++) {
        if (nbytes == 0 || (uint64_t)t.ne[d] > (uint64_t)INT64_MAX / nbytes)
            return vlm_error_set(err, VLM_ERR_OVERFLOW, "%s: byte size overflows", name);
        nbytes *= (uint64_t)t.ne[d];
    }
    t.nbytes = nbytes;

    if (w->n_tensors == w->cap_tensors) {
        size_t cap = w->cap_tensors ? w->cap_tensors * 2 : 64;
        wtensor_t *ts = realloc(w->tensors, cap * sizeof *ts);
        if (!ts) return vlm_error_set(err, VLM_ERR_NOMEM, "%s: out of memory", name);
        w->tensors = ts;
        w->cap_tensors = cap;
    }
    t.name = strdup(name);
    if (!t.name) return vlm_error_set(err, VLM_ERR_NOMEM, "%s: out of memory", name);
    w->tensors[w->n_tensors++] = t;
    return VLM_OK;
}

/* ==== Output ==== */

typedef struct sink {
    FILE *f;         /* either a file ... */
    bbuf_t mem;      /* ... or memory */
    uint64_t pos;    /* bytes written so far */
    bool failed;
} sink_t;

static void sink_put(sink_t *s, const void *data, size_t n) {
    if (s->failed || n == 0) return;
    if (s->f) {
        if (fwrite(data, 1, n, s->f) != n) s->failed = true;
    } else {
        bb_put(&s->mem, data, n);
        if (s->mem.oom) s->failed = true;
    }
    s->pos += n;
}

static void sink_pad(sink_t *s, size_t alignment) {
    static const uint8_t zeros[256];
    while (!s->failed && s->pos % alignment != 0) {
        size_t n = alignment - (size_t)(s->pos % alignment);
        sink_put(s, zeros, n < sizeof zeros ? n : sizeof zeros);
    }
}

/* The alignment: 32, or a UINT32 power of two set as general.alignment. */
static int writer_alignment(const vlm_gguf_writer_t *w, size_t *alignment, vlm_error_t *err) {
    *alignment = GGUF_DEFAULT_ALIGNMENT;
    for (size_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kvs[i].key, "general.alignment") != 0) continue;
        uint32_t type, v;
        memcpy(&type, w->kvs[i].val.p, 4);
        if (type != VLM_GGUF_TYPE_UINT32)
            return vlm_error_set(err, VLM_ERR_INVALID_ARG, "gguf writer: general.alignment must be UINT32");
        memcpy(&v, w->kvs[i].val.p + 4, 4);
        if (v == 0 || (v & (v - 1)) != 0)
            return vlm_error_set(err, VLM_ERR_INVALID_ARG,
                                 "gguf writer: general.alignment %" PRIu32 " is not a power of two", v);
        *alignment = v;
    }
    return VLM_OK;
}

static int write_all(const vlm_gguf_writer_t *w, sink_t *s, vlm_error_t *err) {
    size_t align;
    int rc = writer_alignment(w, &align, err);
    if (rc) return rc;

    /* Header. */
    uint32_t u32 = GGUF_MAGIC;
    sink_put(s, &u32, 4);
    u32 = GGUF_VERSION;
    sink_put(s, &u32, 4);
    uint64_t u64 = w->n_tensors;
    sink_put(s, &u64, 8);
    u64 = w->n_kv;
    sink_put(s, &u64, 8);

    /* Metadata pairs, in insertion order. */
    for (size_t i = 0; i < w->n_kv; i++) {
        u64 = strlen(w->kvs[i].key);
        sink_put(s, &u64, 8);
        sink_put(s, w->kvs[i].key, (size_t)u64);
        sink_put(s, w->kvs[i].val.p, w->kvs[i].val.len);
    }

    /* Tensor infos; each tensor's data starts at an aligned offset. */
    uint64_t offset = 0;
    for (size_t i = 0; i < w->n_tensors; i++) {
        const wtensor_t *t = &w->tensors[i];
        u64 = strlen(t->name);
        sink_put(s, &u64, 8);
        sink_put(s, t->name, (size_t)u64);
        sink_put(s, &t->n_dims, 4);
        for (uint32_t d = 0; d < t->n_dims; d++) sink_put(s, &t->ne[d], 8);
        sink_put(s, &t->type, 4);
        sink_put(s, &offset, 8);
        offset += (t->nbytes + align - 1) / align * align;
    }
    sink_pad(s, align);

    /* Data, each tensor padded with zeros to the alignment. */
    for (size_t i = 0; i < w->n_tensors; i++) {
        const wtensor_t *t = &w->tensors[i];
        sink_put(s, t->data, (size_t)t->nbytes);
        sink_pad(s, align);
    }
    return VLM_OK;
}

int vlm_gguf_writer_write(vlm_gguf_writer_t *w, const char *path, vlm_error_t *err) {
    VLM_ASSERT(w != NULL && path != NULL);
    sink_t s = { 0 };
    s.f = fopen(path, "wb");
    if (!s.f) return vlm_error_set(err, VLM_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
    int rc = write_all(w, &s, err);
    if (fclose(s.f) != 0) s.failed = true;
    if (rc == VLM_OK && s.failed) rc = vlm_error_set(err, VLM_ERR_IO, "%s: write failed: %s", path, strerror(errno));
    if (rc) {
        unlink(path);
        return rc;
    }
    vlm_error_clear(err);
    return VLM_OK;
}

int vlm_gguf_writer_write_mem(vlm_gguf_writer_t *w, void **data, size_t *size, vlm_error_t *err) {
    VLM_ASSERT(w != NULL && data != NULL && size != NULL);
    *data = NULL;
    *size = 0;
    sink_t s = { 0 };
    int rc = write_all(w, &s, err);
    if (rc == VLM_OK && s.failed) rc = vlm_error_set(err, VLM_ERR_NOMEM, "gguf writer: out of memory");
    if (rc) {
        free(s.mem.p);
        return rc;
    }
    *data = s.mem.p;
    *size = s.mem.len;
    vlm_error_clear(err);
    return VLM_OK;
}
