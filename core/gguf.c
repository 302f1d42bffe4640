/* core/gguf.c - the GGUF reader: maps a file read-only and validates it.
 *
 * The parser walks the header, the metadata pairs and the tensor infos with
 * a cursor that checks every read against the end of the buffer before it
 * happens, using overflow-safe arithmetic (a length is compared with the
 * bytes left, never added to the offset first). Counts read from the file
 * (pairs, tensors, array elements) are checked against the bytes that are
 * left before anything is allocated from them, so a corrupt count gives an
 * error, not a huge malloc. Tensor data ranges are checked against the file
 * size once the start of the data section is known.
 *
 * What is copied: keys and tensor names (NUL-terminated, owned here) and, for
 * string arrays, the offset of every element, so element i is found in O(1).
 * What points into the mapping: string values, scalar array data and tensor
 * data. Lookups by key or tensor name go through open-addressing hash tables.
 *
 * Every error names the file and the key or tensor at fault.
 */
#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <float.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dtype.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "core/gguf.c reads little-endian GGUF files in place and needs a little-endian host"
#endif

#define GGUF_MAGIC 0x46554747u /* "GGUF" read as a little-endian u32 */
#define GGUF_DEFAULT_ALIGNMENT 32

struct vlm_gguf {
    char *path;                  /* NUL-terminated copy, "<memory>" for buffers */
    const uint8_t *base;         /* [size] the file image */
    size_t size;
    void *map;                   /* mmap'd region, NULL for borrowed buffers */
    size_t map_len;

    uint32_t version;
    size_t alignment;
    size_t data_offset;          /* start of the data section in the file */

    vlm_gguf_kv_t *kvs;          /* [n_kv] in file order */
    size_t n_kv;
    vlm_gguf_tensor_t *tensors;  /* [n_tensors] in file order */
    size_t n_tensors;

    uint32_t *kv_index;          /* [kv_cap] open addressing: kv index + 1, 0 = empty */
    size_t kv_cap;               /* power of two */
    uint32_t *tensor_index;      /* [tensor_cap] likewise for tensors */
    size_t tensor_cap;
};

/* ==== Small helpers ==== */

/* Byte size of a scalar metadata value, 0 for STRING/ARRAY/unknown. */
static size_t scalar_size(uint32_t type) {
    switch (type) {
    case VLM_GGUF_TYPE_UINT8: case VLM_GGUF_TYPE_INT8: case VLM_GGUF_TYPE_BOOL: return 1;
    case VLM_GGUF_TYPE_UINT16: case VLM_GGUF_TYPE_INT16: return 2;
    case VLM_GGUF_TYPE_UINT32: case VLM_GGUF_TYPE_INT32: case VLM_GGUF_TYPE_FLOAT32: return 4;
    case VLM_GGUF_TYPE_UINT64: case VLM_GGUF_TYPE_INT64: case VLM_GGUF_TYPE_FLOAT64: return 8;
    default: return 0;
    }
}

static const char *type_name(uint32_t type) {
    static const char *const names[VLM_GGUF_TYPE_COUNT] = {
        "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32",
        "BOOL", "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64",
    };
    return type < VLM_GGUF_TYPE_COUNT ? names[type] : "unknown";
}

static bool is_integer_type(uint32_t t) {
    return t == VLM_GGUF_TYPE_UINT8 || t == VLM_GGUF_TYPE_INT8 || t == VLM_GGUF_TYPE_UINT16 ||
           t == VLM_GGUF_TYPE_INT16 || t == VLM_GGUF_TYPE_UINT32 || t == VLM_GGUF_TYPE_INT32 ||
           t == VLM_GGUF_TYPE_UINT64 || t == VLM_GGUF_TYPE_INT64;
}

static bool is_signed_type(uint32_t t) {
    return t == VLM_GGUF_TYPE_INT8 || t == VLM_GGUF_TYPE_INT16 || t == VLM_GGUF_TYPE_INT32 ||
           t == VLM_GGUF_TYPE_INT64;
}

/* Decodes one packed little-endian scalar of `type` at p into kv->v. */
static void decode_scalar(uint32_t type, const uint8_t *p, vlm_gguf_kv_t *kv) {
    switch (type) {
    case VLM_GGUF_TYPE_UINT8: kv->v.u64 = p[0]; break;
    case VLM_GGUF_TYPE_INT8: kv->v.i64 = (int8_t)p[0]; break;
    case VLM_GGUF_TYPE_BOOL: kv->v.u64 = p[0] != 0; break;
    case VLM_GGUF_TYPE_UINT16: { uint16_t x; memcpy(&x, p, 2); kv->v.u64 = x; break; }
    case VLM_GGUF_TYPE_INT16: { int16_t x; memcpy(&x, p, 2); kv->v.i64 = x; break; }
    case VLM_GGUF_TYPE_UINT32: { uint32_t x; memcpy(&x, p, 4); kv->v.u64 = x; break; }
    case VLM_GGUF_TYPE_INT32: { int32_t x; memcpy(&x, p, 4); kv->v.i64 = x; break; }
    case VLM_GGUF_TYPE_FLOAT32: { float x; memcpy(&x, p, 4); kv->v.f64 = x; break; }
    case VLM_GGUF_TYPE_UINT64: { uint64_t x; memcpy(&x, p, 8); kv->v.u64 = x; break; }
    case VLM_GGUF_TYPE_INT64: { int64_t x; memcpy(&x, p, 8); kv->v.i64 = x; break; }
    case VLM_GGUF_TYPE_FLOAT64: { double x; memcpy(&x, p, 8); kv->v.f64 = x; break; }
    default: break;
    }
}

/* FNV-1a, 64-bit. */
static uint64_t hash_str(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) {
        h ^= (uint8_t)*s;
        h *= 0x100000001b3ull;
    }
    return h;
}

static size_t index_capacity(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    return cap;
}

/* Looks name up in an index whose slots hold (item number + 1); name_of
 * gives an item's name. Returns the slot holding it, or the empty slot where
 * it would go. */
typedef const char *(*name_of_fn)(const vlm_gguf_t *g, uint32_t item);

static const char *kv_name(const vlm_gguf_t *g, uint32_t i) { return g->kvs[i].key; }
static const char *tensor_name(const vlm_gguf_t *g, uint32_t i) { return g->tensors[i].name; }

static size_t index_probe(const vlm_gguf_t *g, const uint32_t *slots, size_t cap,
                          name_of_fn name_of, const char *name) {
    size_t mask = cap - 1;
    size_t pos = (size_t)hash_str(name) & mask;
    while (slots[pos] != 0 && strcmp(name_of(g, slots[pos] - 1), name) != 0)
        pos = (pos + 1) & mask;
    return pos;
}

/* ==== Parser ==== */

typedef struct parser {
    vlm_gguf_t *g;
    const uint8_t *b;      /* [size] */
    size_t size;
    size_t off;            /* cursor */
    vlm_error_t *err;
    char where[320];       /* "key 'general.name'", "tensor 'blk.0.attn_q.weight'", ... */
} parser_t;

/* Fails with VLM_ERR_TRUNCATED unless n bytes are left at the cursor. */
static int need(parser_t *p, uint64_t n, const char *what) {
    if (n <= p->size - p->off) return VLM_OK;
    return vlm_error_set(p->err, VLM_ERR_TRUNCATED,
                         "%s: %s: %s (%" PRIu64 " bytes at offset %zu) runs past the end of "
                         "the file (%zu bytes)",
                         p->g->path, p->where, what, n, p->off, p->size);
}

static int read_u32(parser_t *p, uint32_t *v, const char *what) {
    int rc = need(p, 4, what);
    if (rc) return rc;
    memcpy(v, p->b + p->off, 4);
    p->off += 4;
    return VLM_OK;
}

static int read_u64(parser_t *p, uint64_t *v, const char *what) {
    int rc = need(p, 8, what);
    if (rc) return rc;
    memcpy(v, p->b + p->off, 8);
    p->off += 8;
    return VLM_OK;
}

/* Reads a length-prefixed string; *s points into the buffer. */
static int read_str(parser_t *p, const char **s, uint64_t *len, const char *what) {
    char lenwhat[96];
    snprintf(lenwhat, sizeof lenwhat, "length of %s", what);
    int rc = read_u64(p, len, lenwhat);
    if (rc) return rc;
    rc = need(p, *len, what);
    if (rc) return rc;
    *s = (const char *)p->b + p->off;
    p->off += (size_t)*len;
    return VLM_OK;
}

/* Copies a name that must hold no NUL byte into a fresh NUL-terminated string. */
static int copy_name(parser_t *p, const char *s, uint64_t len, char **out, const char *what) {
    if (memchr(s, '\0', (size_t)len) != NULL)
        return vlm_error_set(p->err, VLM_ERR_FORMAT, "%s: %s: %s contains a NUL byte (offset %zu)",
                             p->g->path, p->where, what, p->off - (size_t)len);
    char *c = malloc((size_t)len + 1);
    if (!c) return vlm_error_set(p->err, VLM_ERR_NOMEM, "%s: %s: out of memory", p->g->path, p->where);
    memcpy(c, s, (size_t)len);
    c[len] = '\0';
    *out = c;
    return VLM_OK;
}

/* Sets p->where to "<kind> <i> '<name>'" with the name shortened if huge. */
static void set_where(parser_t *p, const char *kind, size_t i, const char *name, size_t len) {
    if (name == NULL) {
        snprintf(p->where, sizeof p->where, "%s %zu", kind, i);
    } else {
        int show = len > 200 ? 200 : (int)len;
        snprintf(p->where, sizeof p->where, "%s '%.*s%s'", kind, show, name, len > 200 ? "..." : "");
    }
}

/* Parses the value of pair kv (its type already read into kv->type). */
static int parse_value(parser_t *p, vlm_gguf_kv_t *kv) {
    int rc;
    if (kv->type == VLM_GGUF_TYPE_STRING)
        return read_str(p, &kv->str, &kv->str_len, "string value");

    if (kv->type != VLM_GGUF_TYPE_ARRAY) {
        size_t n = scalar_size(kv->type);
        if (n == 0)
            return vlm_error_set(p->err, VLM_ERR_FORMAT, "%s: %s: unknown value type %" PRIu32
                                 " (at offset %zu)", p->g->path, p->where, kv->type, p->off - 4);
        if ((rc = need(p, n, "value"))) return rc;
        decode_scalar(kv->type, p->b + p->off, kv);
        p->off += n;
        return VLM_OK;
    }

    if ((rc = read_u32(p, &kv->arr_type, "array element type"))) return rc;
    if ((rc = read_u64(p, &kv->arr_n, "array length"))) return rc;
    if (kv->arr_type == VLM_GGUF_TYPE_ARRAY)
        return vlm_error_set(p->err, VLM_ERR_UNSUPPORTED, "%s: %s: nested arrays are not supported",
                             p->g->path, p->where);
    kv->arr_data = p->b + p->off;
    size_t left = p->size - p->off;

    if (kv->arr_type == VLM_GGUF_TYPE_STRING) {
        /* Every element takes at least its 8-byte length prefix. */
        if (kv->arr_n > left / 8)
            return vlm_error_set(p->err, VLM_ERR_TRUNCATED,
                                 "%s: %s: array of %" PRIu64 " strings cannot fit in the %zu bytes "
                                 "left in the file after offset %zu",
                                 p->g->path, p->where, kv->arr_n, left, p->off);
        uint64_t *offs = malloc((size_t)(kv->arr_n ? kv->arr_n : 1) * sizeof *offs);
        if (!offs) return vlm_error_set(p->err, VLM_ERR_NOMEM, "%s: %s: out of memory", p->g->path, p->where);
        kv->arr_str_off = offs;
        size_t start = p->off;
        for (uint64_t i = 0; i < kv->arr_n; i++) {
            offs[i] = p->off - start;
            const char *s;
            uint64_t len;
            char what[64];
            snprintf(what, sizeof what, "string element %" PRIu64, i);
            if ((rc = read_str(p, &s, &len, what))) return rc;
        }
        return VLM_OK;
    }

    size_t es = scalar_size(kv->arr_type);
    if (es == 0)
        return vlm_error_set(p->err, VLM_ERR_FORMAT, "%s: %s: unknown array element type %" PRIu32,
                             p->g->path, p->where, kv->arr_type);
    if (kv->arr_n > left / es)
        return vlm_error_set(p->err, VLM_ERR_TRUNCATED,
                             "%s: %s: array of %" PRIu64 " %s elements runs past the end of the "
                             "file (%zu bytes left after offset %zu)",
                             p->g->path, p->where, kv->arr_n, type_name(kv->arr_type), left, p->off);
    p->off += (size_t)kv->arr_n * es;
    return VLM_OK;
}

static int parse_kvs(parser_t *p) {
    vlm_gguf_t *g = p->g;
    int rc;
    g->kv_cap = index_capacity(g->n_kv);
    g->kv_index = calloc(g->kv_cap, sizeof *g->kv_index);
    if (!g->kv_index) return vlm_error_set(p->err, VLM_ERR_NOMEM, "%s: out of memory", g->path);

    for (size_t i = 0; i < g->n_kv; i++) {
        vlm_gguf_kv_t *kv = &g->kvs[i];
        const char *key;
        uint64_t key_len;
        set_where(p, "metadata pair", i, NULL, 0);
        if ((rc = read_str(p, &key, &key_len, "key"))) return rc;
        set_where(p, "key", i, key, (size_t)key_len);
        char *copy = NULL;
        if ((rc = copy_name(p, key, key_len, &copy, "key"))) return rc;
        kv->key = copy;

        size_t slot = index_probe(g, g->kv_index, g->kv_cap, kv_name, kv->key);
        if (g->kv_index[slot] != 0)
            return vlm_error_set(p->err, VLM_ERR_FORMAT, "%s: %s: duplicate key (pairs %u and %zu)",
                                 g->path, p->where, g->kv_index[slot] - 1, i);
        g->kv_index[slot] = (uint32_t)i + 1;

        if ((rc = read_u32(p, &kv->type, "value type"))) return rc;
        if ((rc = parse_value(p, kv))) return rc;
    }
    return VLM_OK;
}

/* Reads general.alignment if present: a UINT32 power of two. */
static int parse_alignment(parser_t *p) {
    vlm_gguf_t *g = p->g;
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    const vlm_gguf_kv_t *kv = vlm_gguf_find_kv(g, "general.alignment");
    if (!kv) return VLM_OK;
    if (kv->type != VLM_GGUF_TYPE_UINT32)
        return vlm_error_set(p->err, VLM_ERR_FORMAT, "%s: key 'general.alignment': must be UINT32, got %s",
                             g->path, type_name(kv->type));
    uint64_t a = kv->v.u64;
    if (a == 0 || (a & (a - 1)) != 0)
        return vlm_error_set(p->err, VLM_ERR_FORMAT,
                             "%s: key 'general.alignment': %" PRIu64 " is not a power of two",
                             g->path, a);
    g->alignment = (size_t)a;
    return VLM_OK;
}

static int parse_tensor_infos(parser_t *p) {
    vlm_gguf_t *g = p->g;
    int rc;
    g->tensor_cap = index_capacity(g->n_tensors);
    g->tensor_index = calloc(g->tensor_cap, sizeof *g->tensor_index);
    if (!g->tensor_index) return vlm_error_set(p->err, VLM_ERR_NOMEM, "%s: out of memory", g->path);

    for (size_t i = 0; i < g->n_tensors; i++) {
        vlm_gguf_tensor_t *t = &g->tensors[i];
        const char *name;
        uint64_t name_len;
        set_where(p, "tensor info", i, NULL, 0);
        if ((rc = read_str(p, &name, &name_len, "tensor name"))) return rc;
        set_where(p, "tensor", i, name, (size_t)name_len);
        char *copy = NULL;
        if ((rc = copy_name(p, name, name_len, &copy, "name"))) return rc;
        t->name = copy;

        size_t slot = index_probe(g, g->tensor_index, g->tensor_cap, tensor_name, t->name);
        if (g->tensor_index[slot] != 0)
            return vlm_error_set(p->err, VLM_ERR_FORMAT, "%s: %s: duplicate tensor name (tensors %u and %zu)",
                                 g->path, p->where, g->tensor_index[slot] - 1, i);
        g->tensor_index[slot] = (uint32_t)i + 1;

        if ((rc = read_u32(p, &t->n_dims, "number of dimensions"))) return rc;
        if (t->n_dims < 1 || t->n_dims > VLM_GGUF_MAX_DIMS)
            return vlm_error_set(p->err, VLM_ERR_FORMAT, "%s: %s: has %" PRIu32 " dimensions (must be 1 to %d)",
                                 g->path, p->where, t->n_dims, VLM_GGUF_MAX_DIMS);
        for (int d = 0; d < VLM_GGUF_MAX_DIMS; d++) t->ne[d] = 1;
        for (uint32_t d = 0; d < t->n_dims; d++) {
            uint64_t ne;
            if ((rc = read_u64(p, &ne, "dimension"))) return rc;
            if (ne == 0 || ne > (uint64_t)INT64_MAX)
                return vlm_error_set(p->err, VLM_ERR_OVERFLOW, "%s: %s: dimension %" PRIu32 " has invalid size %" PRIu64,
                                     g->path, p->where, d, ne);
            t->ne[d] = (int64_t)ne;
        }

        if ((rc = read_u32(p, &t->type, "type"))) return rc;
        const vlm_dtype_info_t *info = vlm_dtype_info(t->type);
        if (!info)
            return vlm_error_set(p->err, VLM_ERR_TYPE, "%s: %s: unknown ggml type %" PRIu32,
                                 g->path, p->where, t->type);
        if (t->ne[0] % info->block_size != 0)
            return vlm_error_set(p->err, VLM_ERR_SHAPE,
                                 "%s: %s: row length %" PRId64 " is not a multiple of the %s block size %d",
                                 g->path, p->where, t->ne[0], info->name, info->block_size);

        /* Element count and byte size, overflow-checked. */
        uint64_t rows = 1;
        bool overflow = false;
        for (int d = 1; d < VLM_GGUF_MAX_DIMS; d++) {
            if ((uint64_t)t->ne[d] > (uint64_t)INT64_MAX / rows) overflow = true;
            else rows *= (uint64_t)t->ne[d];
        }
        if (!overflow && (uint64_t)t->ne[0] > (uint64_t)INT64_MAX / rows) overflow = true;
        uint64_t row_bytes = (uint64_t)t->ne[0] / (uint64_t)info->block_size;
        if (!overflow && row_bytes > UINT64_MAX / info->type_size) overflow = true;
        row_bytes *= info->type_size;
        if (!overflow && (row_bytes > SIZE_MAX / rows || row_bytes * rows > (uint64_t)INT64_MAX)) overflow = true;
        if (overflow)
            return vlm_error_set(p->err, VLM_ERR_OVERFLOW,
                                 "%s: %s: shape [%" PRId64 ", %" PRId64 ", %" PRId64 ", %" PRId64 "] of %s "
                                 "is too large (element count or byte size overflows)",
                                 g->path, p->where, t->ne[0], t->ne[1], t->ne[2], t->ne[3], info->name);
        t->nbytes = row_bytes * rows;

        if ((rc = read_u64(p, &t->offset, "data offset"))) return rc;
    }
    return VLM_OK;
}

/* Places the data section and checks every tensor's range inside the file. */
static int place_tensor_data(parser_t *p) {
    vlm_gguf_t *g = p->g;
    size_t a = g->alignment;
    size_t end_infos = p->off;
    /* Round up; end_infos <= size and a is a power of two. */
    if (end_infos > SIZE_MAX - (a - 1)) {
        if (g->n_tensors == 0) {
            g->data_offset = g->size;
            return VLM_OK;
        }
        return vlm_error_set(p->err, VLM_ERR_OVERFLOW, "%s: data section offset overflows", g->path);
    }
    g->data_offset = (end_infos + a - 1) & ~(a - 1);

    for (size_t i = 0; i < g->n_tensors; i++) {
        vlm_gguf_tensor_t *t = &g->tensors[i];
        if (t->offset % a != 0)
            return vlm_error_set(p->err, VLM_ERR_FORMAT,
                                 "%s: tensor '%s': data offset %" PRIu64 " is not a multiple of the "
                                 "alignment %zu", g->path, t->name, t->offset, a);
        uint64_t room = g->data_offset <= g->size ? (uint64_t)(g->size - g->data_offset) : 0;
        if (g->data_offset > g->size || t->offset > room || t->nbytes > room - t->offset)
            return vlm_error_set(p->err, VLM_ERR_TRUNCATED,
                                 "%s: tensor '%s': data [offset %" PRIu64 ", %" PRIu64 " bytes] ends past "
                                 "the end of the file (%zu bytes; the data section starts at %zu)",
                                 g->path, t->name, t->offset, t->nbytes, g->size, g->data_offset);
        t->data = g->base + g->data_offset + (size_t)t->offset;
    }
    return VLM_OK;
}

static int parse(vlm_gguf_t *g, vlm_error_t *err) {
    parser_t p = { .g = g, .b = g->base, .size = g->size, .off = 0, .err = err };
    int rc;
    uint32_t magic;
    uint64_t n_tensors, n_kv;

    snprintf(p.where, sizeof p.where, "header");
    if ((rc = read_u32(&p, &magic, "magic"))) return rc;
    if (magic != GGUF_MAGIC)
        return vlm_error_set(err, VLM_ERR_FORMAT, "%s: not a GGUF file (magic %02x %02x %02x %02x, "
                             "expected \"GGUF\")", g->path, g->base[0], g->base[1], g->base[2], g->base[3]);
    if ((rc = read_u32(&p, &g->version, "version"))) return rc;
    if (g->version < 2 || g->version > 3) {
        uint32_t swapped = __builtin_bswap32(g->version);
        return vlm_error_set(err, VLM_ERR_VERSION, "%s: GGUF version %" PRIu32 " is not supported "
                             "(only 2 and 3)%s", g->path, g->version,
                             swapped == 2 || swapped == 3 ? "; this looks like a big-endian file" : "");
    }
    if ((rc = read_u64(&p, &n_tensors, "tensor count"))) return rc;
    if ((rc = read_u64(&p, &n_kv, "metadata pair count"))) return rc;

    /* A pair takes at least 13 bytes (key length, type, 1-byte value) and a
     * tensor info at least 32 (name length, n_dims, one dim, type, offset):
     * reject counts that cannot fit before allocating for them. */
    size_t left = p.size - p.off;
    if (n_kv > left / 13)
        return vlm_error_set(err, VLM_ERR_TRUNCATED, "%s: header: %" PRIu64 " metadata pairs cannot fit in "
                             "the %zu bytes left in the file", g->path, n_kv, left);
    left -= (size_t)n_kv * 13;
    if (n_tensors > left / 32)
        return vlm_error_set(err, VLM_ERR_TRUNCATED, "%s: header: %" PRIu64 " tensor infos cannot fit in "
                             "the %zu bytes left in the file", g->path, n_tensors, left);
    if (n_kv >= UINT32_MAX || n_tensors >= UINT32_MAX)
        return vlm_error_set(err, VLM_ERR_OVERFLOW, "%s: header: too many pairs or tensors", g->path);

    g->n_kv = (size_t)n_kv;
    g->n_tensors = (size_t)n_tensors;
    g->kvs = calloc(g->n_kv ? g->n_kv : 1, sizeof *g->kvs);
    g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof *g->tensors);
    if (!g->kvs || !g->tensors) return vlm_error_set(err, VLM_ERR_NOMEM, "%s: out of memory", g->path);

    if ((rc = parse_kvs(&p))) return rc;
    if ((rc = parse_alignment(&p))) return rc;
    if ((rc = parse_tensor_infos(&p))) return rc;
    return place_tensor_data(&p);
}

/* ==== Open / destroy ==== */

static vlm_gguf_t *gguf_alloc(const char *path) {
    vlm_gguf_t *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->path = strdup(path);
    if (!g->path) {
        free(g);
        return NULL;
    }
    return g;
}

int vlm_gguf_open_buffer(const void *data, size_t size, vlm_gguf_t **out, vlm_error_t *err) {
    VLM_ASSERT(out != NULL);
    *out = NULL;
    if (!data && size) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "<memory>: NULL buffer");
    vlm_gguf_t *g = gguf_alloc("<memory>");
    if (!g) return vlm_error_set(err, VLM_ERR_NOMEM, "<memory>: out of memory");
    g->base = data ? data : (const uint8_t *)"";
    g->size = size;
    int rc = parse(g, err);
    if (rc) {
        vlm_gguf_destroy(&g);
        return rc;
    }
    *out = g;
    vlm_error_clear(err);
    return VLM_OK;
}

int vlm_gguf_open(const char *path, vlm_gguf_t **out, vlm_error_t *err) {
    VLM_ASSERT(path != NULL && out != NULL);
    *out = NULL;
    int rc;
    vlm_gguf_t *g = gguf_alloc(path);
    if (!g) return vlm_error_set(err, VLM_ERR_NOMEM, "%s: out of memory", path);

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rc = vlm_error_set(err, errno == ENOENT ? VLM_ERR_NOT_FOUND : VLM_ERR_IO, "%s: cannot open: %s",
                           path, strerror(errno));
        goto fail_alloc;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = vlm_error_set(err, VLM_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        goto fail_fd;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = vlm_error_set(err, VLM_ERR_IO, "%s: not a regular file", path);
        goto fail_fd;
    }
    if (st.st_size < 24) {
        rc = vlm_error_set(err, VLM_ERR_TRUNCATED, "%s: header: file is %jd bytes, shorter than a GGUF "
                           "header (24 bytes)", path, (intmax_t)st.st_size);
        goto fail_fd;
    }
    if ((uintmax_t)st.st_size > SIZE_MAX) {
        rc = vlm_error_set(err, VLM_ERR_TOO_LARGE, "%s: file too large to map", path);
        goto fail_fd;
    }
    g->map_len = (size_t)st.st_size;
    g->map = mmap(NULL, g->map_len, PROT_READ, MAP_PRIVATE, fd, 0);
    if (g->map == MAP_FAILED) {
        g->map = NULL;
        rc = vlm_error_set(err, VLM_ERR_IO, "%s: cannot map: %s", path, strerror(errno));
        goto fail_fd;
    }
    close(fd);
    g->base = g->map;
    g->size = g->map_len;

    rc = parse(g, err);
    if (rc) goto fail_alloc;
    *out = g;
    vlm_error_clear(err);
    return VLM_OK;

fail_fd:
    close(fd);
fail_alloc:
    vlm_gguf_destroy(&g);
    return rc;
}

void vlm_gguf_destroy(vlm_gguf_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_gguf_t *g = *self_p;
    if (g->kvs) {
        for (size_t i = 0; i < g->n_kv; i++) {
            free((char *)g->kvs[i].key);
            free((uint64_t *)g->kvs[i].arr_str_off);
        }
    }
    if (g->tensors) {
        for (size_t i = 0; i < g->n_tensors; i++) free((char *)g->tensors[i].name);
    }
    free(g->kvs);
    free(g->tensors);
    free(g->kv_index);
    free(g->tensor_index);
    if (g->map) munmap(g->map, g->map_len);
    free(g->path);
    free(g);
    *self_p = NULL;
}

/* ==== Accessors ==== */

uint32_t vlm_gguf_version(const vlm_gguf_t *g) { return g->version; }
size_t vlm_gguf_alignment(const vlm_gguf_t *g) { return g->alignment; }
const char *vlm_gguf_path(const vlm_gguf_t *g) { return g->path; }
size_t vlm_gguf_file_size(const vlm_gguf_t *g) { return g->size; }

size_t vlm_gguf_data_offset(const vlm_gguf_t *g) { return g->data_offset; }

int vlm_gguf_release_range(const vlm_gguf_t *g, const void *ptr, size_t n) {
    if (!g->map || n == 0) return VLM_OK; /* a borrowed buffer is not ours to drop */
    const uintptr_t base = (uintptr_t)g->map, p = (uintptr_t)ptr;
    if (p < base || p - base > g->map_len || n > g->map_len - (p - base)) return VLM_ERR_INVALID_ARG;
    const long ps = sysconf(_SC_PAGESIZE);
    const uintptr_t page = ps > 0 ? (uintptr_t)ps : 4096u;
    const uintptr_t lo = (p + page - 1) & ~(page - 1), hi = (p + n) & ~(page - 1);
    if (hi <= lo) return VLM_OK;
    /* Private, read-only, never written: the pages are dropped, and a later
     * read faults them in from the file again. */
    return madvise((void *)lo, hi - lo, MADV_DONTNEED) == 0 ? VLM_OK : VLM_ERR_IO;
}

size_t vlm_gguf_n_kv(const vlm_gguf_t *g) { return g->n_kv; }

const vlm_gguf_kv_t *vlm_gguf_kv_at(const vlm_gguf_t *g, size_t i) {
    return i < g->n_kv ? &g->kvs[i] : NULL;
}

const vlm_gguf_kv_t *vlm_gguf_find_kv(const vlm_gguf_t *g, const char *key) {
    if (!g->kv_index || !key) return NULL;
    size_t slot = index_probe(g, g->kv_index, g->kv_cap, kv_name, key);
    return g->kv_index[slot] ? &g->kvs[g->kv_index[slot] - 1] : NULL;
}

size_t vlm_gguf_n_tensors(const vlm_gguf_t *g) { return g->n_tensors; }

const vlm_gguf_tensor_t *vlm_gguf_tensor_at(const vlm_gguf_t *g, size_t i) {
    return i < g->n_tensors ? &g->tensors[i] : NULL;
}

const vlm_gguf_tensor_t *vlm_gguf_find_tensor(const vlm_gguf_t *g, const char *name) {
    if (!g->tensor_index || !name) return NULL;
    size_t slot = index_probe(g, g->tensor_index, g->tensor_cap, tensor_name, name);
    return g->tensor_index[slot] ? &g->tensors[g->tensor_index[slot] - 1] : NULL;
}

/* ==== Typed getters ==== */

static int find_or_fail(const vlm_gguf_t *g, const char *key, const vlm_gguf_kv_t **kv, vlm_error_t *err) {
    *kv = vlm_gguf_find_kv(g, key);
    if (!*kv) return vlm_error_set(err, VLM_ERR_MISSING_KEY, "%s: missing key '%s'", g->path, key);
    return VLM_OK;
}

static int wrong_type(const vlm_gguf_t *g, const vlm_gguf_kv_t *kv, const char *wanted, vlm_error_t *err) {
    return vlm_error_set(err, VLM_ERR_TYPE, "%s: key '%s': expected %s, got %s", g->path, kv->key,
                         wanted, type_name(kv->type));
}

/* Reads an integer pair as a signed 128-bit-free pair (neg, magnitude). */
static void int_value(const vlm_gguf_kv_t *kv, bool *neg, uint64_t *mag) {
    if (is_signed_type(kv->type) && kv->v.i64 < 0) {
        *neg = true;
        *mag = (uint64_t)0 - (uint64_t)kv->v.i64;
    } else {
        *neg = false;
        *mag = is_signed_type(kv->type) ? (uint64_t)kv->v.i64 : kv->v.u64;
    }
}

int vlm_gguf_get_u32(const vlm_gguf_t *g, const char *key, uint32_t *out, vlm_error_t *err) {
    const vlm_gguf_kv_t *kv;
    int rc = find_or_fail(g, key, &kv, err);
    if (rc) return rc;
    if (!is_integer_type(kv->type)) return wrong_type(g, kv, "an integer", err);
    bool neg;
    uint64_t mag;
    int_value(kv, &neg, &mag);
    if (neg || mag > UINT32_MAX)
        return vlm_error_set(err, VLM_ERR_TYPE, "%s: key '%s': value %s%" PRIu64 " does not fit in UINT32",
                             g->path, key, neg ? "-" : "", mag);
    *out = (uint32_t)mag;
    return VLM_OK;
}

int vlm_gguf_get_i64(const vlm_gguf_t *g, const char *key, int64_t *out, vlm_error_t *err) {
    const vlm_gguf_kv_t *kv;
    int rc = find_or_fail(g, key, &kv, err);
    if (rc) return rc;
    if (!is_integer_type(kv->type)) return wrong_type(g, kv, "an integer", err);
    if (kv->type == VLM_GGUF_TYPE_UINT64 && kv->v.u64 > (uint64_t)INT64_MAX)
        return vlm_error_set(err, VLM_ERR_TYPE, "%s: key '%s': value %" PRIu64 " does not fit in INT64",
                             g->path, key, kv->v.u64);
    *out = is_signed_type(kv->type) ? kv->v.i64 : (int64_t)kv->v.u64;
    return VLM_OK;
}

int vlm_gguf_get_f32(const vlm_gguf_t *g, const char *key, float *out, vlm_error_t *err) {
    const vlm_gguf_kv_t *kv;
    int rc = find_or_fail(g, key, &kv, err);
    if (rc) return rc;
    double v;
    if (kv->type == VLM_GGUF_TYPE_FLOAT32 || kv->type == VLM_GGUF_TYPE_FLOAT64) v = kv->v.f64;
    else if (is_signed_type(kv->type)) v = (double)kv->v.i64;
    else if (is_integer_type(kv->type)) v = (double)kv->v.u64;
    else return wrong_type(g, kv, "a number", err);
    if (isfinite(v) && fabs(v) > FLT_MAX)
        return vlm_error_set(err, VLM_ERR_TYPE, "%s: key '%s': value %g does not fit in FLOAT32",
                             g->path, key, v);
    *out = (float)v;
    return VLM_OK;
}

int vlm_gguf_get_bool(const vlm_gguf_t *g, const char *key, bool *out, vlm_error_t *err) {
    const vlm_gguf_kv_t *kv;
    int rc = find_or_fail(g, key, &kv, err);
    if (rc) return rc;
    if (kv->type != VLM_GGUF_TYPE_BOOL) return wrong_type(g, kv, "BOOL", err);
    *out = kv->v.u64 != 0;
    return VLM_OK;
}

int vlm_gguf_get_str(const vlm_gguf_t *g, const char *key, const char **s, size_t *len, vlm_error_t *err) {
    const vlm_gguf_kv_t *kv;
    int rc = find_or_fail(g, key, &kv, err);
    if (rc) return rc;
    if (kv->type != VLM_GGUF_TYPE_STRING) return wrong_type(g, kv, "STRING", err);
    *s = kv->str;
    *len = (size_t)kv->str_len;
    return VLM_OK;
}

int vlm_gguf_get_arr(const vlm_gguf_t *g, const char *key, uint32_t elem_type,
                     const vlm_gguf_kv_t **out, vlm_error_t *err) {
    const vlm_gguf_kv_t *kv;
    int rc = find_or_fail(g, key, &kv, err);
    if (rc) return rc;
    if (kv->type != VLM_GGUF_TYPE_ARRAY) return wrong_type(g, kv, "ARRAY", err);
    if (elem_type != VLM_GGUF_TYPE_COUNT && kv->arr_type != elem_type)
        return vlm_error_set(err, VLM_ERR_TYPE, "%s: key '%s': expected an array of %s, got an array of %s",
                             g->path, key, type_name(elem_type), type_name(kv->arr_type));
    *out = kv;
    return VLM_OK;
}

const char *vlm_gguf_arr_str(const vlm_gguf_kv_t *kv, uint64_t i, uint64_t *len) {
    VLM_ASSERT(kv->type == VLM_GGUF_TYPE_ARRAY && kv->arr_type == VLM_GGUF_TYPE_STRING && i < kv->arr_n);
    const uint8_t *p = kv->arr_data + kv->arr_str_off[i];
    memcpy(len, p, 8);
    return (const char *)p + 8;
}

double vlm_gguf_arr_f64(const vlm_gguf_kv_t *kv, uint64_t i) {
    VLM_ASSERT(kv->type == VLM_GGUF_TYPE_ARRAY && i < kv->arr_n);
    size_t es = scalar_size(kv->arr_type);
    VLM_ASSERT(es != 0);
    vlm_gguf_kv_t e = { 0 };
    decode_scalar(kv->arr_type, kv->arr_data + i * es, &e);
    if (kv->arr_type == VLM_GGUF_TYPE_FLOAT32 || kv->arr_type == VLM_GGUF_TYPE_FLOAT64) return e.v.f64;
    if (is_signed_type(kv->arr_type)) return (double)e.v.i64;
    return (double)e.v.u64;
}

int64_t vlm_gguf_arr_i64(const vlm_gguf_kv_t *kv, uint64_t i) {
    VLM_ASSERT(kv->type == VLM_GGUF_TYPE_ARRAY && i < kv->arr_n);
    VLM_ASSERT(is_integer_type(kv->arr_type) || kv->arr_type == VLM_GGUF_TYPE_BOOL);
    vlm_gguf_kv_t e = { 0 };
    decode_scalar(kv->arr_type, kv->arr_data + i * scalar_size(kv->arr_type), &e);
    return is_signed_type(kv->arr_type) ? e.v.i64 : (int64_t)e.v.u64;
}

/* ==== Tensor checks ==== */

/* Appends "[a, b, *]" for n dims of ne (-1 shown as *) to buf. */
static void format_shape(char *buf, size_t cap, int n, const int64_t *ne) {
    size_t len = 0;
    len += (size_t)snprintf(buf + len, cap - len, "[");
    for (int d = 0; d < n && len < cap; d++) {
        if (ne[d] < 0) len += (size_t)snprintf(buf + len, cap - len, "%s*", d ? ", " : "");
        else len += (size_t)snprintf(buf + len, cap - len, "%s%" PRId64, d ? ", " : "", ne[d]);
    }
    if (len < cap) snprintf(buf + len, cap - len, "]");
}

int vlm_gguf_expect_tensor(const vlm_gguf_t *g, const char *name, int n_dims,
                           const int64_t *ne, uint64_t type_mask,
                           const vlm_gguf_tensor_t **out, vlm_error_t *err) {
    VLM_ASSERT(n_dims >= 1 && n_dims <= VLM_GGUF_MAX_DIMS && ne != NULL);
    const vlm_gguf_tensor_t *t = vlm_gguf_find_tensor(g, name);
    if (out) *out = NULL;
    if (!t) return vlm_error_set(err, VLM_ERR_NOT_FOUND, "%s: %s: tensor not found", g->path, name);

    /* Like llama.cpp, dims past the expected count must be 1, so a vector
     * stored as [n, 1] matches an expected [n]. */
    bool ok = true;
    for (int d = 0; d < VLM_GGUF_MAX_DIMS; d++) {
        int64_t want = d < n_dims ? ne[d] : 1;
        if (want >= 0 && t->ne[d] != want) ok = false;
    }
    if (!ok) {
        char want[128], got[128];
        format_shape(want, sizeof want, n_dims, ne);
        format_shape(got, sizeof got, (int)t->n_dims, t->ne);
        return vlm_error_set(err, VLM_ERR_SHAPE, "%s: %s: expected shape %s, got %s", g->path, name, want, got);
    }

    if (t->type >= 64 || !(type_mask & (1ull << t->type))) {
        char want[256];
        size_t len = 0;
        int n_types = 0, seen = 0;
        for (uint32_t ty = 0; ty < 64; ty++)
            if (type_mask & (1ull << ty)) n_types++;
        want[0] = '\0';
        for (uint32_t ty = 0; ty < 64 && len < sizeof want; ty++) {
            if (!(type_mask & (1ull << ty))) continue;
            const char *sep = seen == 0 ? "" : seen == n_types - 1 ? " or " : ", ";
            len += (size_t)snprintf(want + len, sizeof want - len, "%s%s", sep, vlm_dtype_name(ty));
            seen++;
        }
        return vlm_error_set(err, VLM_ERR_TYPE, "%s: %s: expected %s, got %s", g->path, name,
                             n_types ? want : "no type", vlm_dtype_name(t->type));
    }
    if (out) *out = t;
    return VLM_OK;
}
