/* core/gguf.h - a memory-mapped, bounds-checked reader for GGUF v2 and v3.
 *
 * GGUF is llama.cpp's model format: a header, metadata key/value pairs (every
 * scalar type, strings and arrays, arrays of strings included), tensor infos
 * (name, dims, ggml type, offset) and an aligned data section. The reader maps
 * the file read-only and validates every length and offset against the end of
 * the mapping before it is used, so a truncated or corrupt file gives an error
 * naming the offending key or tensor and never reads out of bounds.
 *
 * Dimension order follows ggml: ne[0] is the length of a row (the contiguous
 * dimension), ne[1] the number of rows, and so on. A 2-D weight of a layer
 * computing y = W x with x of width n_in and y of width n_out has
 * ne = {n_in, n_out}: n_out rows of n_in elements each.
 */
#ifndef VLM_CORE_GGUF_H
#define VLM_CORE_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"

/* Metadata value types, numbered as in the GGUF specification. */
typedef enum vlm_gguf_type {
    VLM_GGUF_TYPE_UINT8 = 0,
    VLM_GGUF_TYPE_INT8 = 1,
    VLM_GGUF_TYPE_UINT16 = 2,
    VLM_GGUF_TYPE_INT16 = 3,
    VLM_GGUF_TYPE_UINT32 = 4,
    VLM_GGUF_TYPE_INT32 = 5,
    VLM_GGUF_TYPE_FLOAT32 = 6,
    VLM_GGUF_TYPE_BOOL = 7,
    VLM_GGUF_TYPE_STRING = 8,
    VLM_GGUF_TYPE_ARRAY = 9,
    VLM_GGUF_TYPE_UINT64 = 10,
    VLM_GGUF_TYPE_INT64 = 11,
    VLM_GGUF_TYPE_FLOAT64 = 12,
    VLM_GGUF_TYPE_COUNT
} vlm_gguf_type_t;

#define VLM_GGUF_MAX_DIMS 4

/* One metadata pair. Strings point into the mapping and are NOT
 * NUL-terminated: use the lengths. The key is a NUL-terminated copy. */
typedef struct vlm_gguf_kv {
    const char *key;           /* NUL-terminated, owned by the reader */
    uint32_t type;             /* vlm_gguf_type_t */
    union {
        uint64_t u64;          /* UINT8/16/32/64 and BOOL (0/1) */
        int64_t i64;           /* INT8/16/32/64 */
        double f64;            /* FLOAT32/64 */
    } v;
    const char *str;           /* STRING: bytes in the mapping */
    uint64_t str_len;          /* STRING: length in bytes */
    uint32_t arr_type;         /* ARRAY: element type (never ARRAY: nested arrays are rejected) */
    uint64_t arr_n;            /* ARRAY: number of elements */
    const uint8_t *arr_data;   /* ARRAY of scalars: packed little-endian elements */
    const uint64_t *arr_str_off; /* ARRAY of STRING: offset of element i's length prefix, from arr_data */
} vlm_gguf_kv_t;

/* One tensor info, validated: type known, dims > 0, byte size computed
 * without overflow, data inside the file. */
typedef struct vlm_gguf_tensor {
    const char *name;          /* NUL-terminated copy */
    uint32_t type;             /* vlm_dtype_t (ggml type number) */
    uint32_t n_dims;           /* 1..4 */
    int64_t ne[VLM_GGUF_MAX_DIMS]; /* ne[0] = row length; unused dims are 1 */
    uint64_t offset;           /* offset from the start of the data section */
    uint64_t nbytes;           /* size of the data */
    const void *data;          /* pointer into the mapping */
} vlm_gguf_tensor_t;

typedef struct vlm_gguf vlm_gguf_t;

/* Maps and parses the file at path. On success *out owns the mapping; destroy
 * it with vlm_gguf_destroy(). On failure returns a VLM_ERR_* code and fills
 * err with a sentence naming the file and the key or tensor at fault. */
int vlm_gguf_open(const char *path, vlm_gguf_t **out, vlm_error_t *err);

/* Parses a GGUF image already in memory. The buffer is borrowed, not copied:
 * it must outlive the reader. Used by tests that corrupt files in memory. */
int vlm_gguf_open_buffer(const void *data, size_t size, vlm_gguf_t **out,
                         vlm_error_t *err);

/* Unmaps and frees; NULL-safe, and sets *self_p to NULL. */
void vlm_gguf_destroy(vlm_gguf_t **self_p);

uint32_t vlm_gguf_version(const vlm_gguf_t *g);
size_t vlm_gguf_alignment(const vlm_gguf_t *g);
const char *vlm_gguf_path(const vlm_gguf_t *g); /* "<memory>" for buffers */
size_t vlm_gguf_file_size(const vlm_gguf_t *g);
/* Offset of the data section from the start of the file (the end of the
 * tensor infos rounded up to the alignment). */
size_t vlm_gguf_data_offset(const vlm_gguf_t *g);

/* Drops the file pages of [ptr, ptr + n), which must lie inside g's
 * mapping, from the process's resident memory (madvise MADV_DONTNEED on the
 * whole pages inside the range; pages shared with neighbouring data stay).
 * For data copied elsewhere at load time, such as repacked weights: a later
 * read still works, it reads the file again. A no-op for readers made by
 * vlm_gguf_open_buffer(). Returns VLM_OK, VLM_ERR_INVALID_ARG for a range
 * outside the mapping, or VLM_ERR_IO if madvise fails. */
int vlm_gguf_release_range(const vlm_gguf_t *g, const void *ptr, size_t n);

/* --- metadata --------------------------------------------------------- */

size_t vlm_gguf_n_kv(const vlm_gguf_t *g);
const vlm_gguf_kv_t *vlm_gguf_kv_at(const vlm_gguf_t *g, size_t i);
/* Returns the pair with this key, or NULL. */
const vlm_gguf_kv_t *vlm_gguf_find_kv(const vlm_gguf_t *g, const char *key);

/* Typed getters. Each returns VLM_OK, VLM_ERR_MISSING_KEY (key absent) or
 * VLM_ERR_TYPE (present with an incompatible type or out of range), and the
 * error names the key. Integer getters accept any integer type whose value
 * fits; the float getter accepts FLOAT32/FLOAT64 and integers. */
int vlm_gguf_get_u32(const vlm_gguf_t *g, const char *key, uint32_t *out, vlm_error_t *err);
int vlm_gguf_get_i64(const vlm_gguf_t *g, const char *key, int64_t *out, vlm_error_t *err);
int vlm_gguf_get_f32(const vlm_gguf_t *g, const char *key, float *out, vlm_error_t *err);
int vlm_gguf_get_bool(const vlm_gguf_t *g, const char *key, bool *out, vlm_error_t *err);
/* *s points into the mapping and is not NUL-terminated. */
int vlm_gguf_get_str(const vlm_gguf_t *g, const char *key, const char **s, size_t *len, vlm_error_t *err);
/* Finds an ARRAY whose elements have type elem_type (or any type when
 * elem_type is VLM_GGUF_TYPE_COUNT). */
int vlm_gguf_get_arr(const vlm_gguf_t *g, const char *key, uint32_t elem_type,
                     const vlm_gguf_kv_t **out, vlm_error_t *err);

/* Element access for arrays found above; i must be < kv->arr_n. */
const char *vlm_gguf_arr_str(const vlm_gguf_kv_t *kv, uint64_t i, uint64_t *len);
double vlm_gguf_arr_f64(const vlm_gguf_kv_t *kv, uint64_t i);   /* any numeric type */
int64_t vlm_gguf_arr_i64(const vlm_gguf_kv_t *kv, uint64_t i);  /* any integer type or bool */

/* --- tensors ---------------------------------------------------------- */

size_t vlm_gguf_n_tensors(const vlm_gguf_t *g);
const vlm_gguf_tensor_t *vlm_gguf_tensor_at(const vlm_gguf_t *g, size_t i);
/* Returns the tensor with this name, or NULL. */
const vlm_gguf_tensor_t *vlm_gguf_find_tensor(const vlm_gguf_t *g, const char *name);

/* Looks up a required tensor and checks it: it must exist
 * (VLM_ERR_NOT_FOUND); its first n_dims dims must equal ne (an entry of -1
 * matches any size) and every later dim must be 1, as llama.cpp checks, so
 * a vector stored as [n, 1] matches [n] (VLM_ERR_SHAPE); and its type's bit,
 * (1ull << type), must be set in type_mask (VLM_ERR_TYPE). The error names the tensor,
 * e.g. "blk.3.attn_q.weight: expected F16, got Q2_K". */
int vlm_gguf_expect_tensor(const vlm_gguf_t *g, const char *name, int n_dims,
                           const int64_t *ne, uint64_t type_mask,
                           const vlm_gguf_tensor_t **out, vlm_error_t *err);

#endif
