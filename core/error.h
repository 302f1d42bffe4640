/* core/error.h - the one error enum of vlmd, and a detail buffer.
 *
 * Every fallible function returns an int: 0 (VLM_OK) on success or one of the
 * negative VLM_ERR_* codes below. The codes come from one X-macro list, which
 * also generates vlm_strerror() and vlm_error_name(). A human-readable detail
 * ("blk.3.attn_q.weight: expected F16, got Q2_K") goes into a vlm_error_t that
 * the caller owns, or into the error buffer of the handle that failed.
 */
#ifndef VLM_CORE_ERROR_H
#define VLM_CORE_ERROR_H

#include <stddef.h>

/* X(name, value, message) */
#define VLM_ERROR_LIST(X)                                                    \
    X(VLM_OK, 0, "success")                                                  \
    X(VLM_ERR_NOMEM, -1, "out of memory")                                    \
    X(VLM_ERR_IO, -2, "input/output error")                                  \
    X(VLM_ERR_FORMAT, -3, "malformed data")                                  \
    X(VLM_ERR_VERSION, -4, "unsupported format version")                     \
    X(VLM_ERR_TRUNCATED, -5, "truncated data")                               \
    X(VLM_ERR_OVERFLOW, -6, "size overflow")                                 \
    X(VLM_ERR_MISSING_KEY, -7, "missing required key")                       \
    X(VLM_ERR_TYPE, -8, "unexpected type")                                   \
    X(VLM_ERR_SHAPE, -9, "unexpected shape")                                 \
    X(VLM_ERR_UNSUPPORTED, -10, "unsupported feature")                       \
    X(VLM_ERR_INVALID_ARG, -11, "invalid argument")                          \
    X(VLM_ERR_NOT_FOUND, -12, "not found")                                   \
    X(VLM_ERR_IMAGE, -13, "bad image")                                       \
    X(VLM_ERR_TOO_LARGE, -14, "input too large")                             \
    X(VLM_ERR_CONTEXT_OVERFLOW, -15, "context overflow")                     \
    X(VLM_ERR_BUSY, -16, "busy")                                             \
    X(VLM_ERR_CANCELLED, -17, "cancelled")                                   \
    X(VLM_ERR_TIMEOUT, -18, "timed out")                                     \
    X(VLM_ERR_PROTOCOL, -19, "protocol error")                               \
    X(VLM_ERR_SHUTTING_DOWN, -20, "shutting down")                           \
    X(VLM_ERR_INTERNAL, -21, "internal error")

typedef enum vlm_status {
#define VLM__ERR_ENUM(name, value, msg) name = value,
    VLM_ERROR_LIST(VLM__ERR_ENUM)
#undef VLM__ERR_ENUM
} vlm_status_t;

/* A caller-owned error detail. code is the last code set; msg is a
 * NUL-terminated sentence naming what was wrong. */
typedef struct vlm_error {
    int code;
    char msg[512];
} vlm_error_t;

/* Returns the static message for a code ("truncated data"); never NULL. */
const char *vlm_strerror(int code);

/* Returns the enum name for a code ("VLM_ERR_TRUNCATED"); never NULL. */
const char *vlm_error_name(int code);

/* Formats a detail into err (which may be NULL) and returns code, so that a
 * failure path can read: return vlm_error_set(err, VLM_ERR_SHAPE, "...", ...); */
int vlm_error_set(vlm_error_t *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Clears err (which may be NULL) to VLM_OK with an empty message. */
void vlm_error_clear(vlm_error_t *err);

/* Aborts with file and line: only for broken invariants (programmer error),
 * never for bad input. */
#define VLM_ASSERT(cond)                                                     \
    do {                                                                     \
        if (!(cond)) vlm__assert_fail(#cond, __FILE__, __LINE__);            \
    } while (0)
void vlm__assert_fail(const char *expr, const char *file, int line)
    __attribute__((noreturn));

#endif
