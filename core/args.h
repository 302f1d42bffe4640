/* core/args.h - a command-line cursor shared by vlm-run, vlmd, the vlm CLI
 * and make-test-model.
 *
 * Each of those programs walks its argv the same way: "-x VALUE",
 * "--name VALUE" and "--name=VALUE" all give an option a value, "--" ends
 * the options, "-" is a positional argument (stdin), and a number is checked
 * for its syntax and range with a message that names the option, the
 * accepted range and the text given. The cursor does that walk; each program
 * keeps only its own table of options:
 *
 *     vlm_args_t a;
 *     vlm_args_init(&a, argc, argv);
 *     while (vlm_args_next(&a)) {
 *         if (!vlm_args_is_option(&a)) ... a.arg is a positional argument
 *         else if (vlm_args_is(&a, "-t", "--threads")) ok = vlm_args_value_i32(&a, 1, 1024, &n);
 *         else if (vlm_args_is(&a, NULL, "--json")) ok = vlm_args_flag(&a, &json);
 *         ...
 *         if (!ok) print a.err and stop
 *     }
 *
 * A program that takes options only (vlm-run, vlmd, make-test-model) hands
 * its per-option function to vlm_args_walk(), which also does -h/--help.
 *
 * Functions that can fail return false and leave a one-line message, without
 * the program's name, in a->err. Nothing here prints or exits. The
 * vlm_args_parse_* validators are the plain string checks under the cursor,
 * for callers that read numbers from elsewhere (environment, files).
 */
#ifndef VLM_CORE_ARGS_H
#define VLM_CORE_ARGS_H

#include <stdbool.h>
#include <stdint.h>

/* The cursor. Caller-owned; it points into argv, which must outlive it. */
typedef struct vlm_args {
    int argc;
    char **argv;           /* [argc]; argv[0] (the program) is never visited */
    int i;                 /* index of the current element; argc after the end */
    const char *arg;       /* argv[i] as given; NULL before the first and after the last */
    const char *opt;       /* the option's name: "-x", "--name" (also of "--name=value");
                              NULL when the current element is a positional argument */
    const char *val;       /* the option's value: the text after '=', or the element
                              vlm_args_value() took; NULL when none */
    bool after_dashes;     /* "--" was passed: every later element is positional */
    char name[64];         /* storage for opt when "--name=value" is split */
    char err[256];         /* the last failure's message; "" when none */
} vlm_args_t;

/* Points a at argv[0..argc), before argv[1]. To start later, pass
 * argc - k and argv + k: argv[k] then plays the program's name. */
void vlm_args_init(vlm_args_t *a, int argc, char **argv);

/* Moves to the next element and splits "--name=value" (a name of 64
 * characters or more is not split, and so matches no option). A "--" is
 * consumed, not visited: it sets after_dashes. Returns false at the end. */
bool vlm_args_next(vlm_args_t *a);

/* True when the current element is an option: it starts with '-', is not
 * "-" itself, and no "--" came before it. */
bool vlm_args_is_option(const vlm_args_t *a);

/* True when the current option is spelled short_name or long_name (either
 * may be NULL). Always false for a positional argument. */
bool vlm_args_is(const vlm_args_t *a, const char *short_name, const char *long_name);

/* The current option's value: the text after '=', else the next element,
 * whatever it looks like (so "-n -1" works), which the cursor then steps
 * over. NULL, with "option 'X' needs a value" in a->err, when there is none.
 * The string belongs to argv. */
const char *vlm_args_value(vlm_args_t *a);

/* For an option that takes no value: false, with "option 'X' takes no
 * value" in a->err, when "--name=value" gave one; else true, and sets *out
 * (when not NULL) to true. */
bool vlm_args_flag(vlm_args_t *a, bool *out);

/* The current option's value as a decimal integer in [lo, hi], or a finite
 * number in [lo, hi], stored in *out. For numbers lo and hi may be infinite
 * (no limit), and lo = FLT_TRUE_MIN / DBL_TRUE_MIN asks for a number > 0. On
 * a missing or bad value returns false with a message naming the option,
 * the accepted range and the text given ("--ctx: expected an integer >= 1,
 * got 'x'", "--top-p: expected a number in (0, 1], got '0'"); *out is then
 * unchanged. */
bool vlm_args_value_i32(vlm_args_t *a, int32_t lo, int32_t hi, int32_t *out);
bool vlm_args_value_i64(vlm_args_t *a, int64_t lo, int64_t hi, int64_t *out);
bool vlm_args_value_u64(vlm_args_t *a, uint64_t lo, uint64_t hi, uint64_t *out);
bool vlm_args_value_f32(vlm_args_t *a, float lo, float hi, float *out);
bool vlm_args_value_double(vlm_args_t *a, double lo, double hi, double *out);

/* Sets a->err to "OPT: expected EXPECTED, got 'VALUE'" for the current
 * option and value, and returns false: for values only the caller can
 * judge ("--kv-type: expected f16 or f32, got 'q8'"). */
bool vlm_args_bad_value(vlm_args_t *a, const char *expected);

/* Sets a->err from a printf format and returns false. */
bool vlm_args_error(vlm_args_t *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Called by vlm_args_walk() for each option: applies it to ctx, or returns
 * false with the message in a->err (vlm_args_error() for an unknown one). */
typedef bool (*vlm_args_option_fn)(vlm_args_t *a, void *ctx);

/* The whole walk for a program that takes options only: initializes a on
 * argv[0..argc) and hands each option to option(). Returns 0 when all of
 * argv was read; 1 when -h or --help came (the rest is not read); -1, with
 * the message in a->err, on a positional argument ("unexpected argument
 * 'x' (see --help)") or when option() failed. */
int vlm_args_walk(vlm_args_t *a, int argc, char **argv, vlm_args_option_fn option, void *ctx);

/* ==== Validators ======================================================== */

/* True, with the value in *out, when all of s is a decimal integer in
 * [lo, hi] (leading white space and a sign allowed, as strtoll; an
 * overflowing number is out of range); else false and *out unchanged. The
 * u64 form refuses a minus sign rather than wrapping it around. */
bool vlm_args_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out);
bool vlm_args_parse_u64(const char *s, uint64_t lo, uint64_t hi, uint64_t *out);

/* True, with the value in *out, when all of s is a finite number in
 * [lo, hi] (strtod/strtof syntax; "inf", "nan" and numbers that overflow
 * or underflow the type are refused); else false and *out unchanged. */
bool vlm_args_parse_double(const char *s, double lo, double hi, double *out);
bool vlm_args_parse_f32(const char *s, float lo, float hi, float *out);

#endif
