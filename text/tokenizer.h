/* text/tokenizer.h - SentencePiece and byte-level BPE tokenizers from a GGUF vocab.
 *
 * The tokenizer is built from the tokenizer.ggml.* metadata of a GGUF file and
 * reproduces llama.cpp (commit c392e50, src/llama-vocab.cpp and unicode.cpp)
 * token for token:
 *   - "llama" (SentencePiece style): bigram merges by score, <0xNN> byte
 *     fallback, spaces escaped to U+2581, a space prefix on every raw-text
 *     fragment that begins the input or follows a special token.
 *   - "gpt2" (byte-level BPE): a pre-tokenizer chosen by tokenizer.ggml.pre
 *     splits the text into words, whose bytes are mapped to printable code
 *     points and merged by rank (tokenizer.ggml.merges).
 * Control and user-defined tokens written in the text (<s>, <|eot_id|>, ...)
 * are split out first, as llama.cpp's tokenizer_st_partition does; control
 * tokens only when the caller asks (parse_special).
 *
 * A loaded tokenizer is immutable, so one may be shared by several threads.
 */
#ifndef VLM_TEXT_TOKENIZER_H
#define VLM_TEXT_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "core/gguf.h"

typedef struct vlm_tokenizer vlm_tokenizer_t;

typedef enum {
    VLM_TOKENIZER_SPM = 1, /* tokenizer.ggml.model = "llama" */
    VLM_TOKENIZER_BPE = 2  /* tokenizer.ggml.model = "gpt2" */
} vlm_tokenizer_kind_t;

/* Builds a tokenizer from the tokenizer.ggml.* keys; copies what it needs, so
 * g may be closed after. On success *out is owned by the caller (free it with
 * vlm_tokenizer_destroy); on failure returns a VLM_ERR_* code and err names
 * the offending key. */
int vlm_tokenizer_load(const vlm_gguf_t *g, vlm_tokenizer_t **out, vlm_error_t *err);

/* Frees the tokenizer; NULL-safe, and sets *self_p to NULL. */
void vlm_tokenizer_destroy(vlm_tokenizer_t **self_p);

vlm_tokenizer_kind_t vlm_tokenizer_kind(const vlm_tokenizer_t *t);
int32_t vlm_tokenizer_n_vocab(const vlm_tokenizer_t *t);
int32_t vlm_tokenizer_bos(const vlm_tokenizer_t *t); /* -1 if none */
int32_t vlm_tokenizer_eos(const vlm_tokenizer_t *t); /* -1 if none */
int32_t vlm_tokenizer_eot(const vlm_tokenizer_t *t); /* -1 if none */
int32_t vlm_tokenizer_unk(const vlm_tokenizer_t *t); /* -1 if none */
bool vlm_tokenizer_add_bos(const vlm_tokenizer_t *t);
bool vlm_tokenizer_add_eos(const vlm_tokenizer_t *t);

/* True for the tokens that end generation: EOS, EOT, EOM and the tokens
 * llama.cpp puts in special_eog_ids by their text (<|eot_id|>, <|im_end|>,
 * <|end|>, <end_of_turn>, <|endoftext|>, <|eom_id|>, <EOT>, FIM pad/repo/sep). */
bool vlm_tokenizer_is_eog(const vlm_tokenizer_t *t, int32_t id);
/* True for control tokens (token_type 3, or promoted like llama.cpp does). */
bool vlm_tokenizer_is_control(const vlm_tokenizer_t *t, int32_t id);

/* Finds a token by its exact text; -1 if absent. */
int32_t vlm_tokenizer_find(const vlm_tokenizer_t *t, const char *text, size_t len);

/* The raw vocabulary text of a token (not NUL-terminated, owned by t), or
 * NULL for an id outside the vocabulary. */
const char *vlm_tokenizer_text(const vlm_tokenizer_t *t, int32_t id, size_t *len);

/* Tokenizes len bytes of text (any bytes; invalid UTF-8 is handled as
 * llama.cpp does). add_special adds BOS (if add_bos) and EOS (if add_eos) as
 * llama_tokenize does; parse_special recognises control-token text. *ids is
 * malloc'd (the caller frees it, also when *n_ids is 0), *n_ids its count. */
int vlm_tokenizer_encode(const vlm_tokenizer_t *t, const char *text, size_t len, bool add_special,
                         bool parse_special, int32_t **ids, size_t *n_ids, vlm_error_t *err);

/* Writes the bytes of one token into buf (not NUL-terminated) as
 * llama_token_to_piece(lstrip = 0) does; returns the length, or -(needed
 * length) if cap is too small. Control and unknown tokens give their text only
 * when special is true; byte tokens give their raw byte. An id outside the
 * vocabulary gives 0. */
int vlm_tokenizer_piece(const vlm_tokenizer_t *t, int32_t id, bool special, char *buf, size_t cap);

/* Like llama_detokenize(remove_special, unparse_special). *out is malloc'd and
 * NUL-terminated (the caller frees it); *len is its length without the NUL
 * (len may be NULL). An id outside the vocabulary is an error. */
int vlm_tokenizer_decode(const vlm_tokenizer_t *t, const int32_t *ids, size_t n, bool remove_special,
                         bool unparse_special, char **out, size_t *len, vlm_error_t *err);

#endif
