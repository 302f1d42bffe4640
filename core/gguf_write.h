/* core/gguf_write.h - a GGUF v3 writer (for tools/make-test-model and tests).
 *
 * A writer collects metadata pairs and tensors in memory, then writes a file
 * laid out exactly as llama.cpp's gguf_write_to_file() lays it out: header,
 * pairs in insertion order, tensor infos in insertion order with offsets
 * rounded up to the alignment, zero padding up to the data section, then
 * each tensor's data followed by zero padding to the alignment. The
 * alignment is 32, or the value of a UINT32 "general.alignment" pair.
 *
 * Metadata values are copied when set; tensor data is borrowed until
 * vlm_gguf_writer_write() (or _write_mem()) returns.
 */
#ifndef VLM_CORE_GGUF_WRITE_H
#define VLM_CORE_GGUF_WRITE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"

typedef struct vlm_gguf_writer vlm_gguf_writer_t;

/* Returns an empty writer, or NULL when out of memory. */
vlm_gguf_writer_t *vlm_gguf_writer_new(void);

/* Frees the writer and its copies; NULL-safe, and sets *self_p to NULL. */
void vlm_gguf_writer_destroy(vlm_gguf_writer_t **self_p);

/* Metadata setters. The key and value are copied. Setting a key that is
 * already present replaces its value and keeps its position. Each returns
 * VLM_OK, VLM_ERR_INVALID_ARG (NULL key, bad type) or VLM_ERR_NOMEM. */
int vlm_gguf_writer_set_u32(vlm_gguf_writer_t *w, const char *key, uint32_t v);
int vlm_gguf_writer_set_i32(vlm_gguf_writer_t *w, const char *key, int32_t v);
int vlm_gguf_writer_set_u64(vlm_gguf_writer_t *w, const char *key, uint64_t v);
int vlm_gguf_writer_set_f32(vlm_gguf_writer_t *w, const char *key, float v);
int vlm_gguf_writer_set_bool(vlm_gguf_writer_t *w, const char *key, bool v);
/* s is NUL-terminated. */
int vlm_gguf_writer_set_str(vlm_gguf_writer_t *w, const char *key, const char *s);
/* Any scalar type (vlm_gguf_type_t other than STRING and ARRAY): v points to
 * a value of the matching C type (uint8_t ... double; bool for BOOL). */
int vlm_gguf_writer_set_val(vlm_gguf_writer_t *w, const char *key, uint32_t type, const void *v);
/* An array of n scalar elements of elem_type, packed little-endian in data
 * (BOOL elements are one byte each, 0 or 1). */
int vlm_gguf_writer_set_arr(vlm_gguf_writer_t *w, const char *key, uint32_t elem_type,
                            const void *data, uint64_t n);
/* An array of n strings; lens[i] is the byte length of strs[i], or lens is
 * NULL and every string is NUL-terminated. */
int vlm_gguf_writer_set_arr_str(vlm_gguf_writer_t *w, const char *key, const char *const *strs,
                                const size_t *lens, uint64_t n);

/* Adds a tensor of ggml type `type` with n_dims (1..4) dims ne (ne[0] = row
 * length, a multiple of the type's block size). data must hold
 * vlm_dtype_row_size(type, ne[0]) * ne[1] * ... bytes and is borrowed until
 * vlm_gguf_writer_write() returns. The name is copied; it must be unique and
 * shorter than 64 bytes (llama.cpp's limit). Returns VLM_OK,
 * VLM_ERR_INVALID_ARG, VLM_ERR_TYPE, VLM_ERR_SHAPE, VLM_ERR_OVERFLOW or
 * VLM_ERR_NOMEM, with err naming the tensor. */
int vlm_gguf_writer_add_tensor(vlm_gguf_writer_t *w, const char *name, uint32_t type, int n_dims,
                               const int64_t *ne, const void *data, vlm_error_t *err);

/* Writes the GGUF file to path (created or truncated; removed again on
 * failure). Returns VLM_OK, VLM_ERR_IO, VLM_ERR_INVALID_ARG (bad
 * general.alignment) or VLM_ERR_NOMEM. */
int vlm_gguf_writer_write(vlm_gguf_writer_t *w, const char *path, vlm_error_t *err);

/* Like vlm_gguf_writer_write() but into memory: on success *data is a
 * malloc'd buffer of *size bytes that the caller frees with free(). */
int vlm_gguf_writer_write_mem(vlm_gguf_writer_t *w, void **data, size_t *size, vlm_error_t *err);

#endif
