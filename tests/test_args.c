/* tests/test_args.c - the command-line cursor (core/args.h).
 *
 * Walks hand-written argv arrays the way vlm-run, vlmd and the vlm CLI do
 * and checks what the cursor hands out: "--x=v" and "-x v" values, a
 * missing value, a flag given a value, "--" and "-", range and syntax
 * errors (their messages must name the option, the range and the text),
 * integer overflow and non-finite numbers, the options-only walk and the
 * plain validators.
 */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>

#include "core/args.h"
#include "tests/harness.h"

#define ARGV(...) ((char *[]){"prog", __VA_ARGS__, NULL})
#define ARGC(...) ((int)(sizeof((char *[]){"prog", __VA_ARGS__}) / sizeof(char *)))
#define START(a, ...) vlm_args_init(&(a), ARGC(__VA_ARGS__), ARGV(__VA_ARGS__))

/* "--name=value", "--name value", "-x value" and a flag, in one walk. */
static void test_values(void) {
    vlm_args_t a;
    START(a, "--model=m.gguf", "-p", "hello", "--temp", "0.5", "--json", "--ctx=", "-n", "-1");
    REQUIRE(vlm_args_next(&a));
    CHECK(vlm_args_is_option(&a));
    CHECK(vlm_args_is(&a, "-m", "--model"));
    CHECK(!vlm_args_is(&a, "-m", NULL));
    CHECK(strcmp(a.opt, "--model") == 0 && strcmp(a.arg, "--model=m.gguf") == 0);
    const char *v = vlm_args_value(&a);
    CHECK(v && strcmp(v, "m.gguf") == 0);

    REQUIRE(vlm_args_next(&a));
    CHECK(vlm_args_is(&a, "-p", "--prompt"));
    CHECK(a.val == NULL);
    v = vlm_args_value(&a);
    CHECK(v && strcmp(v, "hello") == 0);
    CHECK(a.i == 3, "the cursor stands on the value it took: %d", a.i);

    REQUIRE(vlm_args_next(&a));
    float t = 0;
    CHECK(vlm_args_is(&a, NULL, "--temp") && vlm_args_value_f32(&a, 0, INFINITY, &t) && t == 0.5f);

    REQUIRE(vlm_args_next(&a));
    bool json = false;
    CHECK(vlm_args_is(&a, NULL, "--json") && vlm_args_flag(&a, &json) && json);

    REQUIRE(vlm_args_next(&a));
    v = vlm_args_value(&a);
    CHECK(v && *v == '\0', "'--ctx=' gives an empty value");
    int32_t n = 7;
    CHECK(!vlm_args_value_i32(&a, 1, INT32_MAX, &n) && n == 7);
    CHECK(strcmp(a.err, "--ctx: expected an integer >= 1, got ''") == 0, "%s", a.err);

    REQUIRE(vlm_args_next(&a));
    CHECK(vlm_args_is(&a, "-n", "--max-tokens") && vlm_args_value_i32(&a, -1, INT32_MAX, &n) && n == -1,
          "a value that looks like an option is still the value");
    CHECK(!vlm_args_next(&a));
    CHECK(a.i == a.argc && a.arg == NULL && a.opt == NULL);
    CHECK(!vlm_args_next(&a), "stays at the end");
}

static void test_missing_value(void) {
    vlm_args_t a;
    START(a, "--threads");
    REQUIRE(vlm_args_next(&a));
    CHECK(vlm_args_value(&a) == NULL);
    CHECK(strcmp(a.err, "option '--threads' needs a value") == 0, "%s", a.err);
    int32_t n = 3;
    START(a, "-t");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_i32(&a, 1, 1024, &n) && n == 3);
    CHECK(strcmp(a.err, "option '-t' needs a value") == 0, "%s", a.err);
}

static void test_flag_with_value(void) {
    vlm_args_t a;
    START(a, "--json=yes", "--json");
    REQUIRE(vlm_args_next(&a));
    bool json = false;
    CHECK(!vlm_args_flag(&a, &json) && !json);
    CHECK(strcmp(a.err, "option '--json' takes no value") == 0, "%s", a.err);
    REQUIRE(vlm_args_next(&a));
    CHECK(vlm_args_flag(&a, NULL), "a flag with no value, no destination");
}

/* "--" ends the options; "-" is positional; a long "--name=value" whose
 * name does not fit is not split. */
static void test_positionals(void) {
    vlm_args_t a;
    START(a, "-", "img.jpg", "--", "-m", "--", "--x=1");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_is_option(&a) && strcmp(a.arg, "-") == 0 && a.opt == NULL);
    CHECK(vlm_args_value(&a) == NULL, "a positional has no value");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_is_option(&a) && strcmp(a.arg, "img.jpg") == 0);
    REQUIRE(vlm_args_next(&a));
    CHECK(a.after_dashes && a.i == 4, "'--' is consumed, not visited");
    CHECK(!vlm_args_is_option(&a) && !vlm_args_is(&a, "-m", NULL) && strcmp(a.arg, "-m") == 0);
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_is_option(&a) && strcmp(a.arg, "--") == 0, "a second '--' is positional");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_is_option(&a) && strcmp(a.arg, "--x=1") == 0 && a.val == NULL);
    CHECK(!vlm_args_next(&a));

    START(a, "-n=3");
    REQUIRE(vlm_args_next(&a));
    CHECK(vlm_args_is_option(&a) && strcmp(a.opt, "-n=3") == 0 && !a.val, "only --name=value splits");

    char long_opt[200];
    memset(long_opt, 'x', sizeof long_opt);
    memcpy(long_opt, "--", 2);
    strcpy(long_opt + 100, "=1");
    START(a, long_opt);
    REQUIRE(vlm_args_next(&a));
    CHECK(vlm_args_is_option(&a) && a.opt == a.arg && !a.val, "a 98-character name is not split");

    START(a, "--=v");
    REQUIRE(vlm_args_next(&a));
    CHECK(vlm_args_is_option(&a) && strcmp(a.opt, "--") == 0 && strcmp(a.val, "v") == 0);
}

/* Starting after a command word: argv + 1 plays the program's name. */
static void test_offset_start(void) {
    char *argv[] = {"make-test-model", "text", "-o", "x.gguf", NULL};
    vlm_args_t a;
    vlm_args_init(&a, 3, argv + 1);
    REQUIRE(vlm_args_next(&a));
    CHECK(vlm_args_is(&a, "-o", "--output"));
    const char *v = vlm_args_value(&a);
    CHECK(v && strcmp(v, "x.gguf") == 0);
    CHECK(!vlm_args_next(&a));
}

/* vlm_args_walk(): a small options-only program. */
typedef struct walk_opts {
    int32_t threads;
    bool json;
    int calls;
} walk_opts_t;

static bool walk_option(vlm_args_t *a, void *ctx) {
    walk_opts_t *o = ctx;
    o->calls++;
    if (vlm_args_is(a, "-t", "--threads")) return vlm_args_value_i32(a, 1, 64, &o->threads);
    if (vlm_args_is(a, NULL, "--json")) return vlm_args_flag(a, &o->json);
    return vlm_args_error(a, "unknown option '%s'", a->arg);
}

static void test_walk(void) {
    vlm_args_t a;
    walk_opts_t o = {0};
    CHECK(vlm_args_walk(&a, ARGC("-t", "4", "--json"), ARGV("-t", "4", "--json"), walk_option, &o) == 0);
    CHECK(o.threads == 4 && o.json && o.calls == 2);

    o = (walk_opts_t){0};
    CHECK(vlm_args_walk(&a, ARGC("--threads=2", "--help", "--bogus"), ARGV("--threads=2", "--help", "--bogus"),
                        walk_option, &o) == 1, "help stops the walk");
    CHECK(o.threads == 2 && o.calls == 1);

    o = (walk_opts_t){0};
    CHECK(vlm_args_walk(&a, ARGC("--json", "file", "-t", "3"), ARGV("--json", "file", "-t", "3"), walk_option, &o) == -1);
    CHECK(strcmp(a.err, "unexpected argument 'file' (see --help)") == 0, "%s", a.err);
    CHECK(o.calls == 1 && o.threads == 0);

    o = (walk_opts_t){0};
    CHECK(vlm_args_walk(&a, ARGC("-t", "99"), ARGV("-t", "99"), walk_option, &o) == -1);
    CHECK(strcmp(a.err, "-t: expected an integer in 1..64, got '99'") == 0, "%s", a.err);
    CHECK(vlm_args_walk(&a, ARGC("--bogus=1"), ARGV("--bogus=1"), walk_option, &o) == -1);
    CHECK(strcmp(a.err, "unknown option '--bogus=1'") == 0, "%s", a.err);
    CHECK(vlm_args_walk(&a, ARGC("--", "-t"), ARGV("--", "-t"), walk_option, &o) == -1);
    CHECK(strcmp(a.err, "unexpected argument '-t' (see --help)") == 0, "%s", a.err);

    char *none[] = {"prog", NULL};
    o = (walk_opts_t){0};
    CHECK(vlm_args_walk(&a, 1, none, walk_option, &o) == 0 && o.calls == 0);
}

/* Each message names the option, the range and the bad text. */
static void test_range_errors(void) {
    vlm_args_t a;
    int32_t n = 5;
    START(a, "--threads=0");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_i32(&a, 1, 1024, &n) && n == 5);
    CHECK(strcmp(a.err, "--threads: expected an integer in 1..1024, got '0'") == 0, "%s", a.err);

    START(a, "--top-k", "4.5");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_i32(&a, INT32_MIN, INT32_MAX, &n));
    CHECK(strcmp(a.err, "--top-k: expected an integer, got '4.5'") == 0, "%s", a.err);

    START(a, "--offset", "9");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_i32(&a, INT32_MIN, 8, &n));
    CHECK(strcmp(a.err, "--offset: expected an integer <= 8, got '9'") == 0, "%s", a.err);

    START(a, "--grace", "-1");
    double d = 3;
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_double(&a, 0, 86400.0 * 365, &d) && d == 3);
    CHECK(strcmp(a.err, "--grace: expected a number in [0, 31536000], got '-1'") == 0, "%s", a.err);

    START(a, "--temp", "warm");
    float f = 1;
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_f32(&a, -INFINITY, INFINITY, &f) && f == 1);
    CHECK(strcmp(a.err, "--temp: expected a number, got 'warm'") == 0, "%s", a.err);

    START(a, "--std", "0.01");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_f32(&a, 0.05f, INFINITY, &f));
    CHECK(strcmp(a.err, "--std: expected a number >= 0.05, got '0.01'") == 0, "%s", a.err);

    START(a, "--top-p", "0");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_double(&a, DBL_TRUE_MIN, 1, &d));
    CHECK(strcmp(a.err, "--top-p: expected a number in (0, 1], got '0'") == 0, "%s", a.err);
    START(a, "--std=-0");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_f32(&a, FLT_TRUE_MIN, INFINITY, &f));
    CHECK(strcmp(a.err, "--std: expected a number > 0, got '-0'") == 0, "%s", a.err);
    START(a, "--std=1e-9");
    REQUIRE(vlm_args_next(&a));
    CHECK(vlm_args_value_f32(&a, FLT_TRUE_MIN, INFINITY, &f) && f == 1e-9f);

    START(a, "--max", "2");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_double(&a, -INFINITY, 1.5, &d));
    CHECK(strcmp(a.err, "--max: expected a number <= 1.5, got '2'") == 0, "%s", a.err);

    START(a, "--seed", "-3");
    uint64_t u = 9;
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_u64(&a, 0, UINT64_MAX, &u) && u == 9, "no wrap-around of a minus sign");
    CHECK(strcmp(a.err, "--seed: expected an integer >= 0, got '-3'") == 0, "%s", a.err);

    START(a, "--seed", "10");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_u64(&a, 0, 9, &u));
    CHECK(strcmp(a.err, "--seed: expected an integer in 0..9, got '10'") == 0, "%s", a.err);

    START(a, "--kv-type", "q8");
    REQUIRE(vlm_args_next(&a));
    REQUIRE(vlm_args_value(&a));
    CHECK(!vlm_args_bad_value(&a, "f16 or f32"));
    CHECK(strcmp(a.err, "--kv-type: expected f16 or f32, got 'q8'") == 0, "%s", a.err);
    CHECK(!vlm_args_error(&a, "at most %d images", 64) && strcmp(a.err, "at most 64 images") == 0);
}

/* Numbers beyond the type are out of range, never wrapped or clamped, and
 * the message quotes the text as given. */
static void test_overflow(void) {
    vlm_args_t a;
    int32_t n = 1;
    START(a, "--ctx", "4294967297");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_i32(&a, 1, INT32_MAX, &n) && n == 1, "2^32+1 does not wrap to 1");
    CHECK(strcmp(a.err, "--ctx: expected an integer >= 1, got '4294967297'") == 0, "%s", a.err);

    int64_t m = 1;
    START(a, "--max-pixels", "99999999999999999999");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_i64(&a, 1, INT64_MAX, &m) && m == 1);
    CHECK(strcmp(a.err, "--max-pixels: expected an integer >= 1, got '99999999999999999999'") == 0, "%s",
          a.err);

    START(a, "--max-pixels", "9223372036854775807");
    REQUIRE(vlm_args_next(&a));
    CHECK(vlm_args_value_i64(&a, 1, INT64_MAX, &m) && m == INT64_MAX);

    uint64_t u = 0;
    CHECK(vlm_args_parse_u64("18446744073709551615", 0, UINT64_MAX, &u) && u == UINT64_MAX);
    CHECK(!vlm_args_parse_u64("18446744073709551616", 0, UINT64_MAX, &u) && u == UINT64_MAX);
    CHECK(!vlm_args_parse_i64("-9223372036854775809", INT64_MIN, INT64_MAX, &m));
    CHECK(vlm_args_parse_i64("-9223372036854775808", INT64_MIN, INT64_MAX, &m) && m == INT64_MIN);
}

/* inf, nan and numbers that overflow or underflow the type are refused,
 * even with no range limit. */
static void test_non_finite(void) {
    const char *bad[] = {"inf", "-inf", "INF", "infinity", "nan", "NaN", "1e999", "-1e999", "1e-400"};
    for (size_t k = 0; k < sizeof bad / sizeof *bad; k++) {
        double d = 2;
        float f = 2;
        CHECK(!vlm_args_parse_double(bad[k], -INFINITY, INFINITY, &d) && d == 2, "double %s", bad[k]);
        CHECK(!vlm_args_parse_f32(bad[k], -INFINITY, INFINITY, &f) && f == 2, "float %s", bad[k]);
    }
    float f = 2;
    CHECK(!vlm_args_parse_f32("1e39", -INFINITY, INFINITY, &f), "beyond FLT_MAX");
    double d = 0;
    CHECK(vlm_args_parse_double("1e39", -INFINITY, INFINITY, &d) && d == 1e39, "fine as a double");

    vlm_args_t a;
    START(a, "--repeat-penalty=nan");
    REQUIRE(vlm_args_next(&a));
    CHECK(!vlm_args_value_f32(&a, -INFINITY, INFINITY, &f) && f == 2);
    CHECK(strcmp(a.err, "--repeat-penalty: expected a number, got 'nan'") == 0, "%s", a.err);
}

/* The plain validators: the whole text must be the number. */
static void test_validators(void) {
    int64_t m = 0;
    CHECK(vlm_args_parse_i64("42", 0, 100, &m) && m == 42);
    CHECK(vlm_args_parse_i64("+7", 0, 100, &m) && m == 7);
    CHECK(vlm_args_parse_i64(" 8", 0, 100, &m) && m == 8, "leading space, as strtoll");
    CHECK(vlm_args_parse_i64("-1", -1, 100, &m) && m == -1);
    CHECK(!vlm_args_parse_i64("", 0, 100, &m) && m == -1);
    CHECK(!vlm_args_parse_i64("12x", 0, 100, &m));
    CHECK(!vlm_args_parse_i64("8 ", 0, 100, &m), "trailing space");
    CHECK(!vlm_args_parse_i64("0x10", 0, 100, &m), "decimal only");
    CHECK(!vlm_args_parse_i64("101", 0, 100, &m) && !vlm_args_parse_i64("-1", 0, 100, &m));
    CHECK(vlm_args_parse_i64("010", 0, 100, &m) && m == 10, "decimal, not octal");

    uint64_t u = 0;
    CHECK(!vlm_args_parse_u64(" -1", 0, UINT64_MAX, &u) && u == 0);
    CHECK(vlm_args_parse_u64("+5", 0, 10, &u) && u == 5);

    double d = 0;
    CHECK(vlm_args_parse_double("0.25", 0, 1, &d) && d == 0.25);
    CHECK(vlm_args_parse_double("1e-3", 0, 1, &d) && d == 1e-3);
    CHECK(!vlm_args_parse_double("1.5", 0, 1, &d) && d == 1e-3);
    CHECK(!vlm_args_parse_double("0", DBL_TRUE_MIN, 1, &d), "an open lower end via DBL_TRUE_MIN");
    CHECK(!vlm_args_parse_double("", 0, 1, &d) && !vlm_args_parse_double("0.5s", 0, 1, &d));
    float f = 0;
    CHECK(vlm_args_parse_f32("-0.5", -1, 1, &f) && f == -0.5f);
    CHECK(!vlm_args_parse_f32("2", -1, 1, &f) && f == -0.5f);
}

int main(void) {
    RUN(test_values);
    RUN(test_missing_value);
    RUN(test_flag_with_value);
    RUN(test_positionals);
    RUN(test_offset_start);
    RUN(test_walk);
    RUN(test_range_errors);
    RUN(test_overflow);
    RUN(test_non_finite);
    RUN(test_validators);
    return harness_report();
}
