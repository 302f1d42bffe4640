/* core/args.c - the command-line cursor of core/args.h.
 *
 * The cursor only walks argv and checks values; what an option means stays
 * with each program. Error messages name the option as the user spelled it
 * ("-n" or "--max-tokens"), the accepted range as compactly as it can be
 * said (">= 1" rather than "1..2147483647" when the upper end is the type's
 * limit) and the text that was given.
 */
#include "core/args.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ==== Cursor ============================================================ */

void vlm_args_init(vlm_args_t *a, int argc, char **argv) {
    memset(a, 0, sizeof *a);
    a->argc = argc;
    a->argv = argv;
}

bool vlm_args_next(vlm_args_t *a) {
    a->arg = a->opt = a->val = NULL;
    if (a->i < a->argc) a->i++;
    if (!a->after_dashes && a->i < a->argc && strcmp(a->argv[a->i], "--") == 0) {
        a->after_dashes = true;
        a->i++;
    }
    if (a->i >= a->argc) {
        a->i = a->argc;
        return false;
    }
    const char *s = a->argv[a->i];
    a->arg = s;
    if (a->after_dashes || s[0] != '-' || s[1] == '\0') return true; /* positional */
    a->opt = s;
    const char *eq = s[1] == '-' ? strchr(s, '=') : NULL;
    if (eq && (size_t)(eq - s) < sizeof a->name) {
        memcpy(a->name, s, (size_t)(eq - s));
        a->name[eq - s] = '\0';
        a->opt = a->name;
        a->val = eq + 1;
    }
    return true;
}

bool vlm_args_is_option(const vlm_args_t *a) { return a->opt != NULL; }

bool vlm_args_is(const vlm_args_t *a, const char *short_name, const char *long_name) {
    if (!a->opt) return false;
    return (short_name && strcmp(a->opt, short_name) == 0) || (long_name && strcmp(a->opt, long_name) == 0);
}

bool vlm_args_error(vlm_args_t *a, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(a->err, sizeof a->err, fmt, ap);
    va_end(ap);
    return false;
}

const char *vlm_args_value(vlm_args_t *a) {
    if (!a->opt) {
        vlm_args_error(a, "'%s' is not an option", a->arg ? a->arg : "");
        return NULL;
    }
    if (a->val) return a->val;
    if (a->i + 1 >= a->argc) {
        vlm_args_error(a, "option '%s' needs a value", a->opt);
        return NULL;
    }
    a->val = a->argv[++a->i];
    return a->val;
}

bool vlm_args_flag(vlm_args_t *a, bool *out) {
    if (a->val) return vlm_args_error(a, "option '%s' takes no value", a->opt);
    if (out) *out = true;
    return true;
}

bool vlm_args_bad_value(vlm_args_t *a, const char *expected) {
    return vlm_args_error(a, "%s: expected %s, got '%s'", a->opt ? a->opt : "", expected,
                          a->val ? a->val : "");
}

int vlm_args_walk(vlm_args_t *a, int argc, char **argv, vlm_args_option_fn option, void *ctx) {
    vlm_args_init(a, argc, argv);
    while (vlm_args_next(a)) {
        if (!vlm_args_is_option(a)) return vlm_args_error(a, "unexpected argument '%s' (see --help)", a->arg), -1;
        if (vlm_args_is(a, "-h", "--help")) return 1;
        if (!option(a, ctx)) return -1;
    }
    return 0;
}

/* ==== Numbers at the cursor ============================================= */

/* Fails for an integer outside [lo, hi] of a type whose limits are min and
 * max: "an integer", "an integer >= lo", "an integer <= hi" or "an integer
 * in lo..hi". */
static bool bad_int(vlm_args_t *a, long long lo, long long hi, long long min, long long max) {
    char range[96];
    if (lo <= min && hi >= max) snprintf(range, sizeof range, "an integer");
    else if (hi >= max) snprintf(range, sizeof range, "an integer >= %lld", lo);
    else if (lo <= min) snprintf(range, sizeof range, "an integer <= %lld", hi);
    else snprintf(range, sizeof range, "an integer in %lld..%lld", lo, hi);
    return vlm_args_bad_value(a, range);
}

/* v with the fewest significant digits that read back as the same value
 * (as a float when f32), so 0.05f prints "0.05", not "0.0500000007"; a
 * whole number without an exponent ("31536000", not "3.1536e+07"). */
static void shortest(char *buf, size_t size, double v, bool f32) {
    if (v == floor(v) && fabs(v) < 1e15) {
        snprintf(buf, size, "%.0f", v);
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, size, "%.*g", prec, v);
        if (f32 ? strtof(buf, NULL) == (float)v : strtod(buf, NULL) == v) return;
    }
}

/* Fails for a number outside [lo, hi]: "a number", "a number >= lo", "a
 * number <= hi" or "a number in [lo, hi]"; an infinite end is no limit, and
 * the smallest positive value of the type as lo means "> 0" ("a number in
 * (0, 1]"). */
static bool bad_num(vlm_args_t *a, double lo, double hi, bool f32) {
    const bool open0 = lo == (f32 ? (double)FLT_TRUE_MIN : DBL_TRUE_MIN);
    char l[32], h[32], range[96];
    shortest(l, sizeof l, open0 ? 0.0 : lo, f32);
    shortest(h, sizeof h, hi, f32);
    if (isinf(lo) && isinf(hi)) snprintf(range, sizeof range, "a number");
    else if (isinf(hi)) snprintf(range, sizeof range, "a number %s %s", open0 ? ">" : ">=", l);
    else if (isinf(lo)) snprintf(range, sizeof range, "a number <= %s", h);
    else snprintf(range, sizeof range, "a number in %s%s, %s]", open0 ? "(" : "[", l, h);
    return vlm_args_bad_value(a, range);
}

bool vlm_args_value_i64(vlm_args_t *a, int64_t lo, int64_t hi, int64_t *out) {
    const char *v = vlm_args_value(a);
    return v && (vlm_args_parse_i64(v, lo, hi, out) || bad_int(a, lo, hi, INT64_MIN, INT64_MAX));
}

bool vlm_args_value_i32(vlm_args_t *a, int32_t lo, int32_t hi, int32_t *out) {
    const char *v = vlm_args_value(a);
    int64_t n;
    if (!v) return false;
    if (!vlm_args_parse_i64(v, lo, hi, &n)) return bad_int(a, lo, hi, INT32_MIN, INT32_MAX);
    *out = (int32_t)n;
    return true;
}

bool vlm_args_value_u64(vlm_args_t *a, uint64_t lo, uint64_t hi, uint64_t *out) {
    const char *v = vlm_args_value(a);
    if (!v) return false;
    if (vlm_args_parse_u64(v, lo, hi, out)) return true;
    char range[96];
    if (hi == UINT64_MAX) snprintf(range, sizeof range, "an integer >= %llu", (unsigned long long)lo);
    else snprintf(range, sizeof range, "an integer in %llu..%llu", (unsigned long long)lo, (unsigned long long)hi);
    return vlm_args_bad_value(a, range);
}

bool vlm_args_value_double(vlm_args_t *a, double lo, double hi, double *out) {
    const char *v = vlm_args_value(a);
    return v && (vlm_args_parse_double(v, lo, hi, out) || bad_num(a, lo, hi, false));
}

bool vlm_args_value_f32(vlm_args_t *a, float lo, float hi, float *out) {
    const char *v = vlm_args_value(a);
    return v && (vlm_args_parse_f32(v, lo, hi, out) || bad_num(a, lo, hi, true));
}

/* ==== Validators ======================================================== */

/* True when strto*() read all of s (end is where it stopped) without a
 * range error, and the value v is finite and in [lo, hi]. */
static bool read_whole(const char *s, const char *end, double v, double lo, double hi) {
    return errno == 0 && end != s && *end == '\0' && isfinite(v) && v >= lo && v <= hi;
}

bool vlm_args_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out) {
    char *end;
    errno = 0;
    const long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return false;
    *out = (int64_t)v;
    return true;
}

bool vlm_args_parse_u64(const char *s, uint64_t lo, uint64_t hi, uint64_t *out) {
    const char *p = s;
    while (*p == ' ' || (*p >= '\t' && *p <= '\r')) p++;
    if (*p == '-') return false; /* strtoull would wrap "-1" to 2^64-1 */
    char *end;
    errno = 0;
    const unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return false;
    *out = (uint64_t)v;
    return true;
}

bool vlm_args_parse_double(const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    const double v = strtod(s, &end);
    if (!read_whole(s, end, v, lo, hi)) return false;
    *out = v;
    return true;
}

bool vlm_args_parse_f32(const char *s, float lo, float hi, float *out) {
    char *end;
    errno = 0;
    const float v = strtof(s, &end);
    if (!read_whole(s, end, v, lo, hi)) return false;
    *out = v;
    return true;
}
