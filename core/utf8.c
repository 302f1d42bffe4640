/* core/utf8.c - UTF-8 sanitizing with the Unicode Standard's "U+FFFD
 * substitution of maximal subparts", the rule Python's "replace" error
 * handler follows. One unit scanner serves both the whole-text copy and the
 * streaming cut, so the two can never disagree on where a unit ends.
 */
#include "core/utf8.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* One unit of s[i..n): a valid character or a maximal ill-formed
 * subsequence (the rules of Unicode's "U+FFFD substitution of maximal
 * subparts"). *len gets its length; the result is true for a character,
 * false for an ill-formed unit. *incomplete is set when the unit is a valid
 * prefix cut off by the end of the data. */
static bool utf8_unit(const unsigned char *u, size_t n, size_t i, size_t *len, bool *incomplete) {
    unsigned c = u[i];
    size_t need;
    unsigned lo = 0x80, hi = 0xBF; /* valid range of the second byte */
    *incomplete = false;
    if (c < 0x80) {
        *len = 1;
        return true;
    } else if (c >= 0xC2 && c <= 0xDF) {
        need = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        *len = 1; /* never a valid lead byte */
        return false;
    }
    size_t k = 0; /* continuation bytes that fit */
    while (k < need && i + 1 + k < n) {
        unsigned b = u[i + 1 + k];
        if (k == 0 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) break;
        k++;
    }
    *len = 1 + k;
    if (k == need) return true;
    *incomplete = i + 1 + k == n;
    return false;
}

char *vlm_utf8_sanitize(const char *s, size_t n, size_t *out_len) {
    char *out = malloc(3 * n + 1);
    if (!out) return NULL;
    const unsigned char *u = (const unsigned char *)s;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t len;
        bool incomplete;
        if (utf8_unit(u, n, i, &len, &incomplete)) {
            memcpy(out + o, s + i, len);
            o += len;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
        }
        i += len;
    }
    out[o] = '\0';
    if (out_len) *out_len = o;
    return out;
}

size_t vlm_utf8_stream_cut(const char *s, size_t n, size_t from, size_t limit) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = from;
    while (i < limit) {
        size_t len;
        bool incomplete;
        utf8_unit(u, n, i, &len, &incomplete);
        /* An ill-formed unit that touches the end of the data might still
         * grow (or become a character) with the next piece. */
        if (incomplete || i + len > limit) break;
        i += len;
    }
    return i;
}
