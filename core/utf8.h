/* core/utf8.h - making arbitrary bytes valid UTF-8, whole or streamed.
 *
 * Generated text is a byte string: a token may end in the middle of a
 * character, and a model can produce ill-formed sequences. vlm-run prints
 * it in --json and vlmd sends it in events; both must give the same valid
 * UTF-8, the way Python's decode("utf-8", "replace") does (the golden
 * expected_text was made that way), and vlmd's streamed pieces must join to
 * its final text.
 */
#ifndef VLM_CORE_UTF8_H
#define VLM_CORE_UTF8_H

#include <stddef.h>

/* A copy of s[0..n) as valid UTF-8: each maximal ill-formed subsequence
 * becomes U+FFFD, as Python's decode("utf-8", "replace") does. Caller
 * frees; NULL when out of memory. *out_len (may be NULL) gets the length. */
char *vlm_utf8_sanitize(const char *s, size_t n, size_t *out_len);

/* The largest cut c in [from, limit] (limit <= n) such that s[from..c)
 * consists of whole units: complete characters, or ill-formed
 * subsequences already ended by a byte that cannot continue them. from
 * must itself be such a cut. Sanitizing the text piece by piece at these
 * cuts gives the same bytes as sanitizing it whole, so streamed pieces join
 * to the final text. */
size_t vlm_utf8_stream_cut(const char *s, size_t n, size_t from, size_t limit);

#endif
