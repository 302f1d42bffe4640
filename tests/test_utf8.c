/* tests/test_utf8.c - UTF-8 sanitizing and stream cuts (core/utf8.h).
 *
 * The expected bytes were produced by Python 3's
 * bytes.decode("utf-8", "replace").encode("utf-8"), the reference vlm-run's
 * --json text and vlmd's events must match (the golden expected_text was
 * made that way). Stream cuts are checked on known positions and by
 * streaming a tricky text at every arrival boundary: the sanitized pieces
 * must join to the sanitized whole.
 */
#include <stdbool.h>
#include <stdlib.h>

#include "core/utf8.h"
#include "tests/harness.h"

typedef struct utf8_case {
    const char *in;
    size_t n_in;
    const char *want;
    size_t n_want;
} utf8_case_t;

/* Python: b.decode("utf-8", "replace").encode("utf-8"). */
static const utf8_case_t k_cases[] = {
    {"", 0, "", 0},
    {"\x61\x62\x63", 3, "\x61\x62\x63", 3},
    {"\xc3\xa9", 2, "\xc3\xa9", 2},
    {"\xe2\x82\xac", 3, "\xe2\x82\xac", 3},
    {"\xf0\x9f\x98\x80", 4, "\xf0\x9f\x98\x80", 4},
    {"\xff", 1, "\xef\xbf\xbd", 3},
    {"\xc3", 1, "\xef\xbf\xbd", 3},
    {"\x61\xe2\x82", 3, "\x61\xef\xbf\xbd", 4},
    {"\xe2\x82\x61", 3, "\xef\xbf\xbd\x61", 4},
    {"\xed\xa0\x80", 3, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 9},
    {"\xe0\x80\xaf", 3, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 9},
    {"\xf4\x90\x80\x80", 4, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 12},
    {"\xf0\x9f\x98", 3, "\xef\xbf\xbd", 3},
    {"\xc0\xaf", 2, "\xef\xbf\xbd\xef\xbf\xbd", 6},
    {"\x80\x80", 2, "\xef\xbf\xbd\xef\xbf\xbd", 6},
    {"\xf0\x9f\x98\x80\xf0", 5, "\xf0\x9f\x98\x80\xef\xbf\xbd", 7},
    {"\x61\x00\x62", 3, "\x61\x00\x62", 3},
};

static void test_sanitize(void) {
    for (size_t k = 0; k < sizeof k_cases / sizeof *k_cases; k++) {
        const utf8_case_t *c = &k_cases[k];
        size_t len = 12345;
        char *out = vlm_utf8_sanitize(c->in, c->n_in, &len);
        REQUIRE(out, "case %zu: out of memory", k);
        CHECK(len == c->n_want && memcmp(out, c->want, len) == 0 && out[len] == '\0',
              "case %zu: %zu bytes, want %zu", k, len, c->n_want);
        free(out);
    }
    char *out = vlm_utf8_sanitize("\xff", 1, NULL);
    CHECK(out && strcmp(out, "\xef\xbf\xbd") == 0, "out_len may be NULL");
    free(out);
}

static void test_stream_cut(void) {
    /* A unit cut off by the end may still grow: the cut stops before it. */
    CHECK(vlm_utf8_stream_cut("\x61\xe2\x82", 3, 0, 3) == 1);
    CHECK(vlm_utf8_stream_cut("\xf0\x9f\x98", 3, 0, 3) == 0);
    /* An ill-formed unit ended by a byte that cannot continue it is whole. */
    CHECK(vlm_utf8_stream_cut("\xe2\x82\x61", 3, 0, 3) == 3);
    CHECK(vlm_utf8_stream_cut("\xff", 1, 0, 1) == 1);
    CHECK(vlm_utf8_stream_cut("\x61\x62\xf0\x9f\x98\x80", 6, 0, 6) == 6);
    /* limit < n: no unit is split at the limit. */
    CHECK(vlm_utf8_stream_cut("\xf0\x9f\x98\x80", 4, 0, 2) == 0);
    CHECK(vlm_utf8_stream_cut("\x61\xc3\xa9\x62", 4, 1, 3) == 3);
    CHECK(vlm_utf8_stream_cut("\x61\xc3\xa9\x62", 4, 1, 2) == 1);
}

/* Streams text as it would arrive (the first m bytes known, m = 1..n),
 * sending the sanitized piece up to each cut, then the rest at the end:
 * the pieces must join to the sanitized whole. */
static void test_stream_joins(void) {
    static const char text[] = "a\xc3\xa9\xe2\x82\xff\xf0\x9f\x98\x80\xed\xa0\x80z\xf0\x9f\x98\xc3";
    const size_t n = sizeof text - 1;
    size_t whole_len;
    char *whole = vlm_utf8_sanitize(text, n, &whole_len);
    REQUIRE(whole);
    char joined[256];
    size_t joined_len = 0, sent = 0;
    for (size_t m = 1; m <= n; m++) {
        const size_t cut = m == n ? n : vlm_utf8_stream_cut(text, m, sent, m);
        CHECK(cut >= sent && cut <= m);
        size_t len;
        char *piece = vlm_utf8_sanitize(text + sent, cut - sent, &len);
        REQUIRE(piece && joined_len + len <= sizeof joined);
        memcpy(joined + joined_len, piece, len);
        joined_len += len;
        free(piece);
        sent = cut;
    }
    CHECK(joined_len == whole_len && memcmp(joined, whole, whole_len) == 0, "%zu vs %zu bytes", joined_len,
          whole_len);
    free(whole);
}

int main(void) {
    RUN(test_sanitize);
    RUN(test_stream_cut);
    RUN(test_stream_joins);
    return harness_report();
}
