/* core/error.c - vlm_strerror() and friends, generated from VLM_ERROR_LIST. */
#include "error.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *vlm_strerror(int code) {
    switch (code) {
#define VLM__ERR_MSG(name, value, msg) case value: return msg;
        VLM_ERROR_LIST(VLM__ERR_MSG)
#undef VLM__ERR_MSG
    }
    return "unknown error";
}

const char *vlm_error_name(int code) {
    switch (code) {
#define VLM__ERR_NAME(name, value, msg) case value: return #name;
        VLM_ERROR_LIST(VLM__ERR_NAME)
#undef VLM__ERR_NAME
    }
    return "VLM_ERR_UNKNOWN";
}

int vlm_error_set(vlm_error_t *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        err->code = code;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

void vlm_error_clear(vlm_error_t *err) {
    if (err) {
        err->code = VLM_OK;
        err->msg[0] = '\0';
    }
}

void vlm__assert_fail(const char *expr, const char *file, int line) {
    fprintf(stderr, "vlmd: assertion failed: %s (%s:%d)\n", expr, file, line);
    abort();
}
