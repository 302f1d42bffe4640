/* text/tokenizer.c - SentencePiece and byte-level BPE tokenizers (see tokenizer.h).
 *
 * This file reproduces the behaviour of llama.cpp c392e50 (llama-vocab.cpp,
 * unicode.cpp) in C, including its quirks, because the token ids must be
 * exactly the ones llama.cpp feeds its model. Encoding goes:
 *   1. special-token partition: the text is cut into raw-text fragments and
 *      special tokens (user-defined always, control/unknown with
 *      parse_special), longest token text first;
 *   2. per raw fragment, SPM: an optional space prefix, ' ' -> U+2581, then
 *      bigram merges by score and byte fallback;
 *      BPE: the pre-tokenizer regexes (written out by hand below) split the
 *      code points into words, each word's bytes are mapped to printable code
 *      points and merged by rank;
 *   3. BOS/EOS around the whole.
 * Decoding maps every token to its piece (cached at load) and applies
 * llama_detokenize's leading-space and clean-up rules.
 *
 * Sections: tables and small helpers, UTF-8 and Unicode categories, hash
 * maps, loading, special-token partition, SPM, BPE pre-tokenizers, BPE,
 * public API.
 */
#include "tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unicode_tables.h"

/* ==== Token attributes (llama_token_attr bits) ==== */

enum {
    ATTR_UNDEFINED = 0,
    ATTR_UNKNOWN = 1 << 0,
    ATTR_UNUSED = 1 << 1,
    ATTR_NORMAL = 1 << 2,
    ATTR_CONTROL = 1 << 3,
    ATTR_USER_DEFINED = 1 << 4,
    ATTR_BYTE = 1 << 5,
    ATTR_LSTRIP = 1 << 7,
    ATTR_RSTRIP = 1 << 8,
    ATTR_EOG = 1 << 16, /* ours: the token is in llama.cpp's special_eog_ids */
};

/* tokenizer.ggml.token_type values (llama_token_type). */
enum {
    TOKTYPE_UNDEFINED = 0,
    TOKTYPE_NORMAL = 1,
    TOKTYPE_UNKNOWN = 2,
    TOKTYPE_CONTROL = 3,
    TOKTYPE_USER_DEFINED = 4,
    TOKTYPE_UNUSED = 5,
    TOKTYPE_BYTE = 6,
};

/* The pre-tokenizer splitting programs (llama_vocab_pre_type families whose
 * regexes are implemented here). */
typedef enum pre {
    PRE_DEFAULT,
    PRE_GPT2,
    PRE_LLAMA3,
    PRE_QWEN2,
    PRE_DEEPSEEK_LLM,
    PRE_DEEPSEEK_CODER,
    PRE_FALCON,
    PRE_STARCODER,
} pre_t;

/* An open-addressing hash table of int32 values; the keys live elsewhere. */
typedef struct hmap {
    uint32_t *hash; /* [cap] hash of the key in each slot */
    int32_t *val;   /* [cap] value, -1 = empty */
    size_t mask;    /* cap - 1, cap a power of two */
} hmap_t;

struct vlm_tokenizer {
    vlm_tokenizer_kind_t kind;
    pre_t pre;
    int32_t n_vocab;

    char *text;              /* all token texts, back to back */
    uint32_t *text_off;      /* [n_vocab + 1] token i is text[text_off[i] .. text_off[i + 1]) */
    float *score;            /* [n_vocab] */
    uint32_t *attr;          /* [n_vocab] ATTR_* bits */
    hmap_t by_text;          /* token text -> id */

    char *piece;             /* token_to_piece(special = true) of every token, back to back */
    uint32_t *piece_off;     /* [n_vocab + 1] */

    int32_t *special;        /* [n_special] control/user-defined/unknown ids, longest text first */
    int32_t n_special;

    char *merges;            /* BPE: every merge string "left right", back to back */
    uint32_t *merge_off;     /* [n_merges] start of merge i in merges */
    uint32_t *merge_llen;    /* [n_merges] length of the left part */
    uint32_t *merge_rlen;    /* [n_merges] length of the right part (after the space) */
    int32_t n_merges;
    hmap_t by_pair;          /* (left, right) -> rank = merge index (first one wins) */

    int32_t byte_tok[256];   /* SPM byte fallback: <0xNN> or the 1-byte token, -1 if none */
    char bpe_enc[256][2];    /* BPE: UTF-8 of the printable code point standing for each byte */
    uint8_t bpe_enc_len[256];
    int16_t bpe_dec[324];    /* BPE: code point -> byte, -1 if the code point stands for none */

    int32_t bos, eos, eot, eom, unk;
    int32_t fim_pre, fim_suf, fim_mid, fim_pad, fim_rep, fim_sep;
    bool add_bos, add_eos, add_space_prefix, ignore_merges, clean_spaces;
};

/* ==== Small helpers ==== */

/* Returns p reallocated to hold at least need elements of size elem (with
 * *cap updated), p itself when it is already big enough, or NULL when out of
 * memory (p is then unchanged and still the caller's). */
static void *grow_array(void *p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return p;
    size_t c = *cap ? *cap : 16;
    while (c < need) {
        if (c > SIZE_MAX / 2 / elem) return NULL;
        c *= 2;
    }
    void *q = realloc(p, c * elem);
    if (q) *cap = c;
    return q;
}

/* Grows the array arr of capacity cap to hold need elements; false when out
 * of memory. */
#define GROW(arr, cap, need)                                                    \
    ({                                                                          \
        void *grow_p_ = grow_array((arr), &(cap), (need), sizeof(*(arr)));      \
        if (grow_p_) (arr) = grow_p_;                                           \
        grow_p_ != NULL;                                                        \
    })

/* A growable int32 vector with a sticky out-of-memory flag. */
typedef struct ivec {
    int32_t *v; /* [n] */
    size_t n, cap;
    bool oom;
} ivec_t;

static void ivec_push(ivec_t *a, int32_t x) {
    if (a->oom) return;
    if (!GROW(a->v, a->cap, a->n + 1)) {
        a->oom = true;
        return;
    }
    a->v[a->n++] = x;
}

/* A growable byte buffer with a sticky out-of-memory flag. */
typedef struct cbuf {
    char *p; /* [n] */
    size_t n, cap;
    bool oom;
} cbuf_t;

static void cbuf_put(cbuf_t *b, const void *s, size_t n) {
    if (b->oom || n == 0) return;
    if (!GROW(b->p, b->cap, b->n + n)) {
        b->oom = true;
        return;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

static bool ascii_isspace(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

static const char *tok_text(const vlm_tokenizer_t *t, int32_t id, size_t *len) {
    *len = t->text_off[id + 1] - t->text_off[id];
    return t->text + t->text_off[id];
}

/* ==== UTF-8 (unicode.cpp semantics) ==== */

#define CPT_INVALID 0xFFFFFFFFu
#define CPT_REPLACEMENT 0xFFFDu

/* Length of a UTF-8 sequence from its first byte, as unicode_len_utf8: the
 * high nibble decides, continuation bytes count as 1. */
static size_t utf8_len(unsigned char c) {
    static const uint8_t lookup[16] = { 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4 };
    return lookup[c >> 4];
}

/* Decodes one code point at s[*off] (unicode_cpt_from_utf8): returns
 * CPT_INVALID for a bad sequence without moving *off. Overlong forms and
 * values up to 0x1FFFFF are accepted, as there. */
static uint32_t utf8_decode(const unsigned char *s, size_t len, size_t *off) {
    size_t o = *off;
    unsigned char c = s[o];
    if (!(c & 0x80)) {
        *off = o + 1;
        return c;
    }
    if (!(c & 0x40)) return CPT_INVALID;
    if (!(c & 0x20)) {
        if (o + 1 >= len || (s[o + 1] & 0xC0) != 0x80) return CPT_INVALID;
        *off = o + 2;
        return ((uint32_t)(c & 0x1F) << 6) | (s[o + 1] & 0x3F);
    }
    if (!(c & 0x10)) {
        if (o + 2 >= len || (s[o + 1] & 0xC0) != 0x80 || (s[o + 2] & 0xC0) != 0x80) return CPT_INVALID;
        *off = o + 3;
        return ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[o + 1] & 0x3F) << 6) | (s[o + 2] & 0x3F);
    }
    if (!(c & 0x08)) {
        if (o + 3 >= len || (s[o + 1] & 0xC0) != 0x80 || (s[o + 2] & 0xC0) != 0x80 ||
            (s[o + 3] & 0xC0) != 0x80)
            return CPT_INVALID;
        *off = o + 4;
        return ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[o + 1] & 0x3F) << 12) |
               ((uint32_t)(s[o + 2] & 0x3F) << 6) | (s[o + 3] & 0x3F);
    }
    return CPT_INVALID;
}

/* Decodes the next code point; a bad byte becomes U+FFFD and is skipped
 * (unicode_cpts_from_utf8). */
static uint32_t utf8_next(const unsigned char *s, size_t len, size_t *off) {
    uint32_t c = utf8_decode(s, len, off);
    if (c == CPT_INVALID) {
        *off += 1;
        return CPT_REPLACEMENT;
    }
    return c;
}

/* Encodes a code point into out[4]; returns the length. Values above
 * U+10FFFF (where llama.cpp throws) are written as U+FFFD. */
static size_t utf8_encode(uint32_t c, char *out) {
    if (c > 0x10FFFF) c = CPT_REPLACEMENT;
    if (c <= 0x7F) {
        out[0] = (char)c;
        return 1;
    }
    if (c <= 0x7FF) {
        out[0] = (char)(0xC0 | (c >> 6));
        out[1] = (char)(0x80 | (c & 0x3F));
        return 2;
    }
    if (c <= 0xFFFF) {
        out[0] = (char)(0xE0 | (c >> 12));
        out[1] = (char)(0x80 | ((c >> 6) & 0x3F));
        out[2] = (char)(0x80 | (c & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (c >> 18));
    out[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((c >> 6) & 0x3F));
    out[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

/* ==== Unicode categories ==== */

#define FL_WHITESPACE 0x100 /* regex \s (White_Space), on top of the VLM__UCAT_* bits */

static bool cpt_is_whitespace(uint32_t c) {
    if (c < 0x80) return c == ' ' || (c >= 0x09 && c <= 0x0D);
    size_t lo = 0, hi = VLM__UCAT_N_WHITESPACE;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (vlm__ucat_whitespace[mid] < c) lo = mid + 1;
        else hi = mid;
    }
    return lo < VLM__UCAT_N_WHITESPACE && vlm__ucat_whitespace[lo] == c;
}

/* The flags of a code point, as unicode_cpt_flags_from_cpt: one category bit
 * plus FL_WHITESPACE; UNDEFINED beyond U+10FFFF. Never 0. */
static uint32_t cpt_flags(uint32_t c) {
    if (c >= 0x110000) return VLM__UCAT_UNDEFINED;
    size_t lo = 0, hi = VLM__UCAT_N_RANGES - 1; /* find the last start <= c */
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if (vlm__ucat_start[mid] <= c) lo = mid;
        else hi = mid;
    }
    uint32_t f = vlm__ucat_flags[lo];
    if (cpt_is_whitespace(c)) f |= FL_WHITESPACE;
    return f;
}

/* ==== Hash maps ==== */

static uint32_t hash_bytes(uint64_t h, const void *p, size_t n) {
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001B3ull;
    }
    return (uint32_t)(h ^ (h >> 32));
}

#define HASH_SEED 0xCBF29CE484222325ull

static bool hmap_init(hmap_t *m, size_t n) {
    size_t cap = 16;
    while (cap < 2 * n + 1) cap *= 2;
    m->hash = malloc(cap * sizeof(uint32_t));
    m->val = malloc(cap * sizeof(int32_t));
    if (!m->hash || !m->val) return false;
    memset(m->val, 0xFF, cap * sizeof(int32_t));
    m->mask = cap - 1;
    return true;
}

static void hmap_deinit(hmap_t *m) {
    free(m->hash);
    free(m->val);
    m->hash = NULL;
    m->val = NULL;
}

static int32_t find_token(const vlm_tokenizer_t *t, const char *s, size_t n) {
    uint32_t h = hash_bytes(HASH_SEED, s, n);
    for (size_t i = h & t->by_text.mask;; i = (i + 1) & t->by_text.mask) {
        int32_t v = t->by_text.val[i];
        if (v < 0) return -1;
        if (t->by_text.hash[i] == h) {
            size_t len;
            const char *k = tok_text(t, v, &len);
            if (len == n && memcmp(k, s, n) == 0) return v;
        }
    }
}

static uint32_t hash_pair(const char *l, size_t ln, const char *r, size_t rn) {
    uint32_t h = hash_bytes(HASH_SEED, l, ln);
    return hash_bytes(h ^ 0x9E3779B97F4A7C15ull ^ ln, r, rn);
}

/* The rank of the merge (l, r), or -1 (find_bpe_rank). */
static int32_t find_merge(const vlm_tokenizer_t *t, const char *l, size_t ln, const char *r, size_t rn) {
    uint32_t h = hash_pair(l, ln, r, rn);
    for (size_t i = h & t->by_pair.mask;; i = (i + 1) & t->by_pair.mask) {
        int32_t v = t->by_pair.val[i];
        if (v < 0) return -1;
        if (t->by_pair.hash[i] == h && t->merge_llen[v] == ln && t->merge_rlen[v] == rn) {
            const char *m = t->merges + t->merge_off[v];
            if (memcmp(m, l, ln) == 0 && memcmp(m + ln + 1, r, rn) == 0) return v;
        }
    }
}

/* ==== Loading ==== */

/* One tokenizer.ggml.pre name and what llama.cpp's load() sets for it. */
typedef struct pre_name {
    const char *name;
    pre_t pre;
    bool clean_spaces;
    bool ignore_merges;
    bool add_bos;
    bool no_bos;
} pre_name_t;

static const pre_name_t PRE_NAMES[] = {
    { "default", PRE_DEFAULT, true, false, false, false },
    { "llama3", PRE_LLAMA3, true, true, true, false },
    { "llama-v3", PRE_LLAMA3, true, true, true, false },
    { "llama-bpe", PRE_LLAMA3, true, true, true, false },
    { "falcon3", PRE_LLAMA3, true, true, true, false },
    { "dbrx", PRE_LLAMA3, true, false, false, false },
    { "smaug-bpe", PRE_LLAMA3, true, false, false, false },
    { "chatglm-bpe", PRE_LLAMA3, true, false, false, true },
    { "deepseek-llm", PRE_DEEPSEEK_LLM, false, false, false, false },
    { "deepseek-coder", PRE_DEEPSEEK_CODER, false, false, false, false },
    { "falcon", PRE_FALCON, true, false, false, false },
    { "mpt", PRE_GPT2, true, false, false, false },
    { "olmo", PRE_GPT2, true, false, false, false },
    { "jais", PRE_GPT2, true, false, false, false },
    { "gpt-2", PRE_GPT2, true, false, false, false },
    { "phi-2", PRE_GPT2, true, false, false, false },
    { "jina-es", PRE_GPT2, true, false, false, false },
    { "jina-de", PRE_GPT2, true, false, false, false },
    { "gigachat", PRE_GPT2, true, false, false, false },
    { "jina-v1-en", PRE_GPT2, true, false, false, false },
    { "jina-v2-es", PRE_GPT2, true, false, false, false },
    { "jina-v2-de", PRE_GPT2, true, false, false, false },
    { "jina-v2-code", PRE_GPT2, true, false, false, false },
    { "roberta-bpe", PRE_GPT2, true, false, false, false },
    { "starcoder", PRE_STARCODER, true, false, false, false },
    { "refact", PRE_STARCODER, true, false, false, false },
    { "command-r", PRE_STARCODER, false, false, false, false },
    { "smollm", PRE_STARCODER, false, false, false, false },
    { "codeshell", PRE_STARCODER, true, false, false, false },
    { "exaone", PRE_STARCODER, true, false, false, false },
    { "minerva-7b", PRE_STARCODER, true, false, false, false },
    { "qwen2", PRE_QWEN2, false, false, false, false },
    { "deepseek-r1-qwen", PRE_QWEN2, false, false, false, false },
    { "stablelm2", PRE_QWEN2, true, false, false, false },
    { "megrez", PRE_QWEN2, true, false, false, false },
};

static bool str_eq(const char *s, size_t n, const char *lit) {
    return strlen(lit) == n && memcmp(s, lit, n) == 0;
}

static bool str_contains(const char *s, size_t n, const char *lit) {
    size_t m = strlen(lit);
    if (m > n) return false;
    return m == 0 || (s != NULL && memmem(s, n, lit, m) != NULL);
}

/* Reads an optional BOOL key into *v; a missing key leaves *v. */
static int opt_bool(const vlm_gguf_t *g, const char *key, bool *v, vlm_error_t *err) {
    int rc = vlm_gguf_get_bool(g, key, v, err);
    if (rc == VLM_ERR_MISSING_KEY) return VLM_OK;
    return rc;
}

/* Reads an optional token-id key; an id outside the vocabulary keeps the
 * default, as llama.cpp does (with a warning there). */
static int opt_id(const vlm_gguf_t *g, const char *key, int32_t n_vocab, int32_t *id, vlm_error_t *err) {
    uint32_t v;
    int rc = vlm_gguf_get_u32(g, key, &v, err);
    if (rc == VLM_ERR_MISSING_KEY) return VLM_OK;
    if (rc) return rc;
    if (v < (uint32_t)n_vocab) *id = (int32_t)v;
    return VLM_OK;
}

/* Sets a token's type to control, as llama.cpp does for control-looking
 * tokens (the attribute is replaced, not or-ed). */
static void make_control(vlm_tokenizer_t *t, int32_t id) { t->attr[id] = ATTR_CONTROL; }

/* Looks up the token whose text is one of names. llama.cpp takes the first
 * match in its unordered_map's iteration order, which tends to visit later
 * insertions (higher ids) first; the highest id is taken here (Phi-3:
 * <|end|> 32007 rather than <|endoftext|> 32000, as llama.cpp). */
static int32_t find_any(const vlm_tokenizer_t *t, const char *const *names) {
    int32_t best = -1;
    for (; *names; names++) {
        int32_t id = find_token(t, *names, strlen(*names));
        if (id > best) best = id;
    }
    return best;
}

/* Auto-detects EOT/EOM/FIM tokens by text when no key named them, as the
 * "auto-detect special tokens by text" block of llama.cpp's load(); then
 * builds the end-of-generation set. */
static void detect_special(vlm_tokenizer_t *t) {
    static const char *const eot_names[] = { "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                                             "<|endoftext|>", "<EOT>",
                                             "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>",
                                             NULL };
    static const char *const eom_names[] = { "<|eom_id|>", NULL };
    static const char *const pre_names[] = { "<|fim_prefix|>", "<fim-prefix>",
                                             "<\xef\xbd\x9c" "fim\xe2\x96\x81" "begin\xef\xbd\x9c>", "<PRE>",
                                             NULL };
    static const char *const suf_names[] = { "<|fim_suffix|>", "<fim-suffix>",
                                             "<\xef\xbd\x9c" "fim\xe2\x96\x81hole\xef\xbd\x9c>", "<SUF>", NULL };
    static const char *const mid_names[] = { "<|fim_middle|>", "<fim-middle>",
                                             "<\xef\xbd\x9c" "fim\xe2\x96\x81" "end\xef\xbd\x9c>", "<MID>", NULL };
    static const char *const pad_names[] = { "<|fim_pad|>", "<fim-pad>", "<PAD>", NULL };
    static const char *const rep_names[] = { "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", NULL };
    static const char *const sep_names[] = { "<|file_sep|>", NULL };
    static const char *const eog_names[] = { "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                                             "<|endoftext|>", "<|eom_id|>", "<EOT>", NULL };
    struct {
        int32_t *id;
        const char *const *names;
    } auto_ids[] = {
        { &t->eot, eot_names },     { &t->eom, eom_names },     { &t->fim_pre, pre_names },
        { &t->fim_suf, suf_names }, { &t->fim_mid, mid_names }, { &t->fim_pad, pad_names },
        { &t->fim_rep, rep_names }, { &t->fim_sep, sep_names },
    };
    for (size_t k = 0; k < sizeof(auto_ids) / sizeof(auto_ids[0]); k++) {
        if (*auto_ids[k].id >= 0) continue;
        int32_t id = find_any(t, auto_ids[k].names);
        if (id < 0) continue;
        *auto_ids[k].id = id;
        if (!(t->attr[id] & ATTR_CONTROL)) make_control(t, id);
    }

    /* End of generation: FIM pad/repo/sep, every token with an EOG text
     * (promoted to control), then EOS/EOT/EOM. */
    for (const char *const *n = eog_names; *n; n++) {
        int32_t id = find_token(t, *n, strlen(*n));
        if (id < 0) continue;
        if (!(t->attr[id] & ATTR_CONTROL)) make_control(t, id);
    }
    int32_t eog_ids[] = { t->fim_pad, t->fim_rep, t->fim_sep, t->eos, t->eot, t->eom };
    for (size_t k = 0; k < sizeof(eog_ids) / sizeof(eog_ids[0]); k++)
        if (eog_ids[k] >= 0) t->attr[eog_ids[k]] |= ATTR_EOG;
    for (const char *const *n = eog_names; *n; n++) {
        int32_t id = find_token(t, *n, strlen(*n));
        if (id >= 0) t->attr[id] |= ATTR_EOG;
    }
}

static int cmp_special(const void *a, const void *b, void *arg) {
    const vlm_tokenizer_t *t = arg;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    uint32_t lx = t->text_off[x + 1] - t->text_off[x], ly = t->text_off[y + 1] - t->text_off[y];
    if (lx != ly) return lx > ly ? -1 : 1;
    return x < y ? -1 : x > y;
}

/* The special-token cache: control, user-defined and unknown tokens, longest
 * text first (llama.cpp's std::sort by length; ties here by id). */
static bool build_special(vlm_tokenizer_t *t) {
    int32_t n = 0;
    for (int32_t id = 0; id < t->n_vocab; id++)
        if (t->attr[id] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)) n++;
    t->special = malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    if (!t->special) return false;
    n = 0;
    for (int32_t id = 0; id < t->n_vocab; id++)
        if (t->attr[id] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)) t->special[n++] = id;
    t->n_special = n;
    qsort_r(t->special, (size_t)n, sizeof(int32_t), cmp_special, t);
    return true;
}

/* Per-model attributes by name, as the end of llama.cpp's load(): jina-v2
 * <mask> strips spaces on its left; Phi-3's special tokens strip spaces on
 * their right, except <unk>, <s> and <|endoftext|>. */
static void model_attrs(vlm_tokenizer_t *t, const vlm_gguf_t *g) {
    const char *pre = "", *name = "";
    size_t pre_len = 0, name_len = 0;
    if (vlm_gguf_get_str(g, "tokenizer.ggml.pre", &pre, &pre_len, NULL)) pre_len = 0;
    if (vlm_gguf_get_str(g, "general.name", &name, &name_len, NULL)) name_len = 0;
    if (str_contains(pre, pre_len, "jina-v2-de") || str_contains(pre, pre_len, "jina-v2-es") ||
        str_contains(pre, pre_len, "jina-v2-code")) {
        int32_t id = find_token(t, "<mask>", 6);
        if (id >= 0) t->attr[id] |= ATTR_LSTRIP;
        return;
    }
    char lower[256];
    size_t n = name_len < sizeof(lower) ? name_len : sizeof(lower);
    for (size_t i = 0; i < n; i++) lower[i] = (char)((name[i] >= 'A' && name[i] <= 'Z') ? name[i] + 32 : name[i]);
    if (!str_contains(lower, n, "phi-3") && !str_contains(lower, n, "phi3")) return;
    for (int32_t i = 0; i < t->n_special; i++) t->attr[t->special[i]] |= ATTR_RSTRIP;
    int32_t id = find_token(t, "</s>", 4);
    if (id >= 0) t->attr[id] |= ATTR_RSTRIP;
    static const char *const keep[] = { "<unk>", "<s>", "<|endoftext|>" };
    for (size_t k = 0; k < 3; k++) {
        id = find_token(t, keep[k], strlen(keep[k]));
        if (id >= 0) t->attr[id] &= ~(uint32_t)ATTR_RSTRIP;
    }
}

/* Appends the BPE decoding of a normal token's text (llama_decode_text):
 * every code point maps back to its byte; one that stands for no byte gives
 * "[UNK_BYTE_0x<its utf-8 in hex><the whole token text>]". */
static void bpe_decode_text(const vlm_tokenizer_t *t, const char *s, size_t n, cbuf_t *out) {
    size_t off = 0;
    while (off < n) {
        uint32_t c = utf8_next((const unsigned char *)s, n, &off);
        if (c < 324 && t->bpe_dec[c] >= 0) {
            char b = (char)t->bpe_dec[c];
            cbuf_put(out, &b, 1);
            continue;
        }
        char u[4], hex[16];
        size_t ul = utf8_encode(c, u);
        cbuf_put(out, "[UNK_BYTE_0x", 12);
        for (size_t i = 0; i < ul; i++) {
            snprintf(hex, sizeof(hex), "%02x", (unsigned char)u[i]);
            cbuf_put(out, hex, 2);
        }
        cbuf_put(out, s, n);
        cbuf_put(out, "]", 1);
    }
}

/* Appends the piece of one token with special = true (token_to_piece). */
static void make_piece(const vlm_tokenizer_t *t, int32_t id, cbuf_t *out) {
    size_t n;
    const char *s = tok_text(t, id, &n);
    uint32_t a = t->attr[id];
    if (a & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED)) {
        cbuf_put(out, s, n);
        return;
    }
    if (t->kind == VLM_TOKENIZER_BPE) {
        if (a & ATTR_NORMAL) bpe_decode_text(t, s, n, out);
        return;
    }
    if (a & ATTR_NORMAL) {
        for (size_t i = 0; i < n;) {
            if (i + 3 <= n && memcmp(s + i, "\xe2\x96\x81", 3) == 0) {
                cbuf_put(out, " ", 1);
                i += 3;
            } else {
                cbuf_put(out, s + i, 1);
                i++;
            }
        }
        return;
    }
    if (a & ATTR_BYTE) {
        /* "<0xNN>": strtol of the two characters after "<0x". */
        char hex[3] = { 0, 0, 0 };
        for (size_t i = 3; i < 5 && i < n; i++) hex[i - 3] = s[i];
        char b = (char)strtol(hex, NULL, 16);
        cbuf_put(out, &b, 1);
    }
}

/* The BPE byte <-> printable code point mapping (GPT-2's bytes_to_unicode). */
static void init_bpe_bytes(vlm_tokenizer_t *t) {
    for (int i = 0; i < 324; i++) t->bpe_dec[i] = -1;
    int extra = 0;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        uint32_t c = printable ? (uint32_t)b : (uint32_t)(256 + extra++);
        t->bpe_enc_len[b] = (uint8_t)utf8_encode(c, t->bpe_enc[b]);
        t->bpe_dec[c] = (int16_t)b;
    }
}

/* Reads tokens, scores and token types; checks array types and lengths. */
static int load_tokens(vlm_tokenizer_t *t, const vlm_gguf_t *g, vlm_error_t *err) {
    const vlm_gguf_kv_t *toks, *scores = NULL, *types = NULL;
    int rc = vlm_gguf_get_arr(g, "tokenizer.ggml.tokens", VLM_GGUF_TYPE_STRING, &toks, err);
    if (rc) return rc;
    if (toks->arr_n == 0 || toks->arr_n > (uint64_t)INT32_MAX - 1)
        return vlm_error_set(err, VLM_ERR_FORMAT, "tokenizer.ggml.tokens: %llu tokens (need 1 .. 2^31-2)",
                             (unsigned long long)toks->arr_n);
    int32_t n = (int32_t)toks->arr_n;
    t->n_vocab = n;

    rc = vlm_gguf_get_arr(g, "tokenizer.ggml.scores", VLM_GGUF_TYPE_COUNT, &scores, err);
    if (rc == VLM_ERR_MISSING_KEY) scores = NULL;
    else if (rc) return rc;
    if (scores && (scores->arr_type == VLM_GGUF_TYPE_STRING || scores->arr_type == VLM_GGUF_TYPE_BOOL))
        return vlm_error_set(err, VLM_ERR_TYPE, "tokenizer.ggml.scores: expected an array of numbers");
    if (scores && scores->arr_n != toks->arr_n)
        return vlm_error_set(err, VLM_ERR_SHAPE, "tokenizer.ggml.scores: %llu entries for %d tokens",
                             (unsigned long long)scores->arr_n, n);
    rc = vlm_gguf_get_arr(g, "tokenizer.ggml.token_type", VLM_GGUF_TYPE_COUNT, &types, err);
    if (rc == VLM_ERR_MISSING_KEY) types = NULL;
    else if (rc) return rc;
    if (types && (types->arr_type == VLM_GGUF_TYPE_STRING || types->arr_type == VLM_GGUF_TYPE_FLOAT32 ||
                  types->arr_type == VLM_GGUF_TYPE_FLOAT64 || types->arr_type == VLM_GGUF_TYPE_BOOL))
        return vlm_error_set(err, VLM_ERR_TYPE, "tokenizer.ggml.token_type: expected an array of integers");
    if (types && types->arr_n != toks->arr_n)
        return vlm_error_set(err, VLM_ERR_SHAPE, "tokenizer.ggml.token_type: %llu entries for %d tokens",
                             (unsigned long long)types->arr_n, n);

    /* Token texts, with llama.cpp's "[EMPTY_i]" for empty ones. */
    size_t total = 0;
    for (int32_t i = 0; i < n; i++) {
        uint64_t len;
        vlm_gguf_arr_str(toks, (uint64_t)i, &len);
        total += len ? len : 20;
        if (total > UINT32_MAX - 1)
            return vlm_error_set(err, VLM_ERR_TOO_LARGE, "tokenizer.ggml.tokens: token texts exceed 4 GiB");
    }
    t->text = malloc(total + 1);
    t->text_off = malloc(((size_t)n + 1) * sizeof(uint32_t));
    t->score = malloc((size_t)n * sizeof(float));
    t->attr = malloc((size_t)n * sizeof(uint32_t));
    if (!t->text || !t->text_off || !t->score || !t->attr || !hmap_init(&t->by_text, (size_t)n))
        return vlm_error_set(err, VLM_ERR_NOMEM, "tokenizer: out of memory for %d tokens", n);
    uint32_t pos = 0;
    for (int32_t i = 0; i < n; i++) {
        uint64_t len;
        const char *s = vlm_gguf_arr_str(toks, (uint64_t)i, &len);
        t->text_off[i] = pos;
        if (len == 0) pos += (uint32_t)snprintf(t->text + pos, 21, "[EMPTY_%d]", i);
        else {
            memcpy(t->text + pos, s, len);
            pos += (uint32_t)len;
        }
        t->score[i] = scores ? (float)vlm_gguf_arr_f64(scores, (uint64_t)i) : 0.0f;
        uint32_t a = ATTR_NORMAL;
        if (types) {
            switch (vlm_gguf_arr_i64(types, (uint64_t)i)) {
            case TOKTYPE_NORMAL: a = ATTR_NORMAL; break;
            case TOKTYPE_UNKNOWN: a = ATTR_UNKNOWN; break;
            case TOKTYPE_CONTROL: a = ATTR_CONTROL; break;
            case TOKTYPE_USER_DEFINED: a = ATTR_USER_DEFINED; break;
            case TOKTYPE_UNUSED: a = ATTR_UNUSED; break;
            case TOKTYPE_BYTE: a = ATTR_BYTE; break;
            default: a = ATTR_UNDEFINED; break;
            }
        }
        t->attr[i] = a;
    }
    t->text_off[n] = pos;

    /* Index by text; llama.cpp asserts that texts are unique. */
    for (int32_t i = 0; i < n; i++) {
        size_t len;
        const char *s = tok_text(t, i, &len);
        uint32_t h = hash_bytes(HASH_SEED, s, len);
        size_t k = h & t->by_text.mask;
        for (; t->by_text.val[k] >= 0; k = (k + 1) & t->by_text.mask) {
            size_t ol;
            const char *o = tok_text(t, t->by_text.val[k], &ol);
            if (t->by_text.hash[k] == h && ol == len && memcmp(o, s, len) == 0)
                return vlm_error_set(err, VLM_ERR_FORMAT,
                                     "tokenizer.ggml.tokens: tokens %d and %d have the same text",
                                     t->by_text.val[k], i);
        }
        t->by_text.hash[k] = h;
        t->by_text.val[k] = i;
    }
    return VLM_OK;
}

/* Reads tokenizer.ggml.merges ("left right" strings, rank = index). */
static int load_merges(vlm_tokenizer_t *t, const vlm_gguf_t *g, vlm_error_t *err) {
    const vlm_gguf_kv_t *kv;
    int rc = vlm_gguf_get_arr(g, "tokenizer.ggml.merges", VLM_GGUF_TYPE_STRING, &kv, err);
    if (rc == VLM_ERR_MISSING_KEY)
        return vlm_error_set(err, VLM_ERR_MISSING_KEY,
                             "tokenizer.ggml.merges: missing; a \"gpt2\" (BPE) vocab needs its merges");
    if (rc) return rc;
    if (kv->arr_n > (uint64_t)INT32_MAX - 1)
        return vlm_error_set(err, VLM_ERR_TOO_LARGE, "tokenizer.ggml.merges: too many merges");
    int32_t n = (int32_t)kv->arr_n;
    size_t total = 0;
    for (int32_t i = 0; i < n; i++) {
        uint64_t len;
        vlm_gguf_arr_str(kv, (uint64_t)i, &len);
        total += len;
        if (total > UINT32_MAX - 1)
            return vlm_error_set(err, VLM_ERR_TOO_LARGE, "tokenizer.ggml.merges: merges exceed 4 GiB");
    }
    t->merges = malloc(total + 1);
    t->merge_off = malloc(((size_t)n + 1) * sizeof(uint32_t));
    t->merge_llen = malloc(((size_t)n + 1) * sizeof(uint32_t));
    t->merge_rlen = malloc(((size_t)n + 1) * sizeof(uint32_t));
    if (!t->merges || !t->merge_off || !t->merge_llen || !t->merge_rlen || !hmap_init(&t->by_pair, (size_t)n))
        return vlm_error_set(err, VLM_ERR_NOMEM, "tokenizer: out of memory for %d merges", n);
    t->n_merges = n;
    uint32_t pos = 0;
    for (int32_t i = 0; i < n; i++) {
        uint64_t len;
        const char *s = vlm_gguf_arr_str(kv, (uint64_t)i, &len);
        memcpy(t->merges + pos, s, len);
        t->merge_off[i] = pos;
        /* The first space at index >= 1 splits; without one both parts are
         * empty (and never match a symbol). */
        const char *sp = len > 1 ? memchr(s + 1, ' ', len - 1) : NULL;
        if (sp) {
            t->merge_llen[i] = (uint32_t)(sp - s);
            t->merge_rlen[i] = (uint32_t)(len - (size_t)(sp - s) - 1);
        } else {
            t->merge_llen[i] = t->merge_rlen[i] = 0;
        }
        pos += (uint32_t)len;
        /* Insert unless the pair is already there (emplace: first wins). */
        const char *l = t->merges + t->merge_off[i];
        if (!sp) continue;
        if (find_merge(t, l, t->merge_llen[i], l + t->merge_llen[i] + 1, t->merge_rlen[i]) >= 0) continue;
        uint32_t h = hash_pair(l, t->merge_llen[i], l + t->merge_llen[i] + 1, t->merge_rlen[i]);
        size_t k = h & t->by_pair.mask;
        while (t->by_pair.val[k] >= 0) k = (k + 1) & t->by_pair.mask;
        t->by_pair.hash[k] = h;
        t->by_pair.val[k] = i;
    }
    return VLM_OK;
}

int vlm_tokenizer_load(const vlm_gguf_t *g, vlm_tokenizer_t **out, vlm_error_t *err) {
    *out = NULL;
    vlm_tokenizer_t *t = calloc(1, sizeof(*t));
    if (!t) return vlm_error_set(err, VLM_ERR_NOMEM, "tokenizer: out of memory");
    int rc;

    /* 1. Model type and its defaults. */
    const char *model, *pre = "";
    size_t model_len, pre_len = 0;
    rc = vlm_gguf_get_str(g, "tokenizer.ggml.model", &model, &model_len, err);
    if (rc) goto fail;
    rc = vlm_gguf_get_str(g, "tokenizer.ggml.pre", &pre, &pre_len, err);
    if (rc == VLM_ERR_MISSING_KEY) pre_len = 0;
    else if (rc) goto fail;
    t->eot = t->eom = -1;
    t->fim_pre = t->fim_suf = t->fim_mid = t->fim_pad = t->fim_rep = t->fim_sep = -1;
    if (str_eq(model, model_len, "llama")) {
        t->kind = VLM_TOKENIZER_SPM;
        t->pre = PRE_DEFAULT;
        t->bos = 1;
        t->eos = 2;
        t->unk = 0;
        t->add_space_prefix = true;
        t->add_bos = true;
    } else if (str_eq(model, model_len, "gpt2")) {
        t->kind = VLM_TOKENIZER_BPE;
        t->bos = t->eos = 11;
        t->unk = -1;
        t->pre = PRE_DEFAULT;
        t->clean_spaces = true;
        if (pre_len > 0) {
            const pre_name_t *p = NULL;
            for (size_t i = 0; i < sizeof(PRE_NAMES) / sizeof(PRE_NAMES[0]); i++)
                if (str_eq(pre, pre_len, PRE_NAMES[i].name)) p = &PRE_NAMES[i];
            if (!p) {
                rc = vlm_error_set(err, VLM_ERR_UNSUPPORTED,
                                   "tokenizer.ggml.pre: unsupported pre-tokenizer '%.*s'",
                                   (int)(pre_len > 64 ? 64 : pre_len), pre);
                goto fail;
            }
            t->pre = p->pre;
            t->clean_spaces = p->clean_spaces;
            t->ignore_merges = p->ignore_merges;
            t->add_bos = p->add_bos;
            if (p->no_bos) t->bos = -1;
        }
        init_bpe_bytes(t);
    } else {
        rc = vlm_error_set(err, VLM_ERR_UNSUPPORTED,
                           "tokenizer.ggml.model: unsupported tokenizer model '%.*s' (need \"llama\" or \"gpt2\")",
                           (int)(model_len > 64 ? 64 : model_len), model);
        goto fail;
    }
    if ((rc = opt_bool(g, "tokenizer.ggml.add_space_prefix", &t->add_space_prefix, err))) goto fail;

    /* 2. Vocabulary and merges. */
    if ((rc = load_tokens(t, g, err))) goto fail;
    if (t->kind == VLM_TOKENIZER_BPE && (rc = load_merges(t, g, err))) goto fail;

    /* 3. Special ids from the keys (defaults outside the vocabulary mean none). */
    if (t->bos >= t->n_vocab) t->bos = -1;
    if (t->eos >= t->n_vocab) t->eos = -1;
    if (t->unk >= t->n_vocab) t->unk = -1;
    struct {
        const char *key;
        int32_t *id;
    } ids[] = {
        { "tokenizer.ggml.bos_token_id", &t->bos },         { "tokenizer.ggml.eos_token_id", &t->eos },
        { "tokenizer.ggml.eot_token_id", &t->eot },         { "tokenizer.ggml.eom_token_id", &t->eom },
        { "tokenizer.ggml.unknown_token_id", &t->unk },     { "tokenizer.ggml.fim_pre_token_id", &t->fim_pre },
        { "tokenizer.ggml.fim_suf_token_id", &t->fim_suf }, { "tokenizer.ggml.fim_mid_token_id", &t->fim_mid },
        { "tokenizer.ggml.fim_pad_token_id", &t->fim_pad }, { "tokenizer.ggml.fim_rep_token_id", &t->fim_rep },
        { "tokenizer.ggml.fim_sep_token_id", &t->fim_sep }, { "tokenizer.ggml.prefix_token_id", &t->fim_pre },
        { "tokenizer.ggml.suffix_token_id", &t->fim_suf },  { "tokenizer.ggml.middle_token_id", &t->fim_mid },
    };
    for (size_t k = 0; k < sizeof(ids) / sizeof(ids[0]); k++)
        if ((rc = opt_id(g, ids[k].key, t->n_vocab, ids[k].id, err))) goto fail;
    if ((rc = opt_bool(g, "tokenizer.ggml.add_bos_token", &t->add_bos, err))) goto fail;
    if ((rc = opt_bool(g, "tokenizer.ggml.add_eos_token", &t->add_eos, err))) goto fail;
    detect_special(t);

    /* 4. Special-token cache, byte fallback, piece cache, per-model attributes. */
    if (!build_special(t)) goto nomem;
    for (int b = 0; b < 256; b++) {
        char name[7];
        snprintf(name, sizeof(name), "<0x%02X>", b);
        char one = (char)b;
        int32_t id = find_token(t, name, 6);
        t->byte_tok[b] = id >= 0 ? id : find_token(t, &one, 1);
    }
    cbuf_t pieces = { 0 };
    t->piece_off = malloc(((size_t)t->n_vocab + 1) * sizeof(uint32_t));
    if (!t->piece_off) goto nomem;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        t->piece_off[id] = (uint32_t)pieces.n;
        make_piece(t, id, &pieces);
        if (pieces.n > UINT32_MAX - 1) pieces.oom = true;
        if (pieces.oom) break;
    }
    t->piece_off[t->n_vocab] = (uint32_t)pieces.n;
    t->piece = pieces.p;
    if (pieces.oom) goto nomem;
    model_attrs(t, g);

    vlm_error_clear(err);
    *out = t;
    return VLM_OK;

nomem:
    rc = vlm_error_set(err, VLM_ERR_NOMEM, "tokenizer: out of memory");
fail:
    vlm_tokenizer_destroy(&t);
    return rc;
}

void vlm_tokenizer_destroy(vlm_tokenizer_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_tokenizer_t *t = *self_p;
    free(t->text);
    free(t->text_off);
    free(t->score);
    free(t->attr);
    hmap_deinit(&t->by_text);
    free(t->piece);
    free(t->piece_off);
    free(t->special);
    free(t->merges);
    free(t->merge_off);
    free(t->merge_llen);
    free(t->merge_rlen);
    hmap_deinit(&t->by_pair);
    free(t);
    *self_p = NULL;
}

/* ==== Work space of one encode call ==== */

/* A symbol of a merge session: bytes [off, off + n) of the session text,
 * linked to its neighbours (-1 at the ends); n = 0 once merged away. */
typedef struct sym {
    int32_t prev, next;
    uint32_t off, n;
} sym_t;

/* A candidate merge of symbols left and right (adjacent when pushed). */
typedef struct bigram {
    int32_t left, right;
    float score;   /* SPM: score of the merged token (highest first) */
    int32_t rank;  /* BPE: merge rank (lowest first) */
    uint32_t size; /* bytes of the merged text */
} bigram_t;

/* A raw-text fragment (token < 0) or a special token of the partition. */
typedef struct frag {
    int32_t token;
    size_t off, len;
} frag_t;

typedef struct work {
    frag_t *frag, *frag2; /* [n_frag] partition, and its next version */
    size_t n_frag, cap_frag, cap_frag2;
    sym_t *sym;           /* [n_sym] symbols of the current session */
    size_t cap_sym;
    bigram_t *heap;       /* [n_heap] binary max-heap of candidate merges */
    size_t n_heap, cap_heap;
    bool heap_bpe;        /* BPE ordering (rank) instead of SPM (score) */
    cbuf_t text;          /* SPM: escaped fragment; BPE: the current word */
    uint32_t *cpt;        /* [n_cpt] BPE: code points of the fragment */
    size_t n_cpt, cap_cpt;
    size_t *chunk, *chunk2; /* [n_chunk] BPE: pre-tokenizer chunk lengths in code points */
    size_t n_chunk, cap_chunk, cap_chunk2;
    bool oom;
} work_t;

static void work_deinit(work_t *w) {
    free(w->frag);
    free(w->frag2);
    free(w->sym);
    free(w->heap);
    free(w->text.p);
    free(w->cpt);
    free(w->chunk);
    free(w->chunk2);
}

/* True when a has lower priority than b. SPM: higher score first; BPE: lower
 * rank first; both break ties by the leftmost symbol (llama.cpp's
 * comparators). */
static bool bigram_lower(const work_t *w, const bigram_t *a, const bigram_t *b) {
    if (w->heap_bpe) return a->rank > b->rank || (a->rank == b->rank && a->left > b->left);
    return a->score < b->score || (a->score == b->score && a->left > b->left);
}

static void heap_push(work_t *w, bigram_t b) {
    if (!GROW(w->heap, w->cap_heap, w->n_heap + 1)) {
        w->oom = true;
        return;
    }
    size_t i = w->n_heap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!bigram_lower(w, &w->heap[p], &b)) break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = b;
}

static bigram_t heap_pop(work_t *w) {
    bigram_t top = w->heap[0];
    bigram_t last = w->heap[--w->n_heap];
    size_t n = w->n_heap, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && bigram_lower(w, &w->heap[c], &w->heap[c + 1])) c++;
        if (!bigram_lower(w, &last, &w->heap[c])) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n > 0) w->heap[i] = last;
    return top;
}

/* Splits text[0..len) into one symbol per UTF-8 character (by the lead
 * byte's length, cut at the end); returns the count. */
static size_t split_symbols(work_t *w, const char *text, size_t len) {
    size_t n = 0;
    for (size_t off = 0; off < len; n++) {
        if (!GROW(w->sym, w->cap_sym, n + 1)) {
            w->oom = true;
            return 0;
        }
        size_t l = utf8_len((unsigned char)text[off]);
        if (l > len - off) l = len - off;
        w->sym[n] = (sym_t){ (int32_t)n - 1, off + l == len ? -1 : (int32_t)n + 1, (uint32_t)off, (uint32_t)l };
        off += l;
    }
    return n;
}

/* Merges the bigram just popped: the right symbol joins the left one. */
static void merge_symbols(work_t *w, const bigram_t *b) {
    sym_t *l = &w->sym[b->left], *r = &w->sym[b->right];
    l->n += r->n;
    r->n = 0;
    l->next = r->next;
    if (r->next >= 0) w->sym[r->next].prev = b->left;
}

/* ==== Special-token partition (tokenizer_st_partition) ==== */

static bool frag_push(work_t *w, frag_t **a, size_t *n, size_t *cap, frag_t f) {
    if (!GROW(*a, *cap, *n + 1)) {
        w->oom = true;
        return false;
    }
    (*a)[(*n)++] = f;
    return true;
}

/* Cuts w->frag (initially the whole text) at every occurrence of each special
 * token, longest first; control and unknown tokens only with parse_special.
 * LSTRIP/RSTRIP tokens eat the ASCII spaces on that side. */
static void partition(const vlm_tokenizer_t *t, work_t *w, const char *text, size_t len, bool parse_special) {
    bool first_byte[256] = { false };
    for (size_t i = 0; i < len; i++) first_byte[(unsigned char)text[i]] = true;

    for (int32_t k = 0; k < t->n_special && !w->oom; k++) {
        int32_t id = t->special[k];
        uint32_t a = t->attr[id];
        if (!parse_special && (a & (ATTR_CONTROL | ATTR_UNKNOWN))) continue;
        size_t tl;
        const char *tt = tok_text(t, id, &tl);
        if (tl > len || !first_byte[(unsigned char)tt[0]]) continue;

        size_t n2 = 0;
        for (size_t f = 0; f < w->n_frag; f++) {
            frag_t fr = w->frag[f];
            if (fr.token >= 0) {
                frag_push(w, &w->frag2, &n2, &w->cap_frag2, fr);
                continue;
            }
            size_t off = fr.off, flen = fr.len;
            while (flen > 0) {
                const char *m = memmem(text + off, flen, tt, tl);
                if (!m) break;
                size_t mpos = (size_t)(m - text);
                size_t left = mpos - off;
                if (a & ATTR_LSTRIP)
                    while (left > 0 && ascii_isspace((unsigned char)text[off + left - 1])) left--;
                if (left > 0) frag_push(w, &w->frag2, &n2, &w->cap_frag2, (frag_t){ -1, off, left });
                frag_push(w, &w->frag2, &n2, &w->cap_frag2, (frag_t){ id, 0, 0 });
                size_t roff = mpos + tl, rlen = off + flen - roff;
                if (a & ATTR_RSTRIP)
                    while (rlen > 0 && ascii_isspace((unsigned char)text[roff])) {
                        roff++;
                        rlen--;
                    }
                off = roff;
                flen = rlen;
            }
            if (flen > 0) frag_push(w, &w->frag2, &n2, &w->cap_frag2, (frag_t){ -1, off, flen });
        }
        frag_t *tmp = w->frag;
        w->frag = w->frag2;
        w->frag2 = tmp;
        size_t c = w->cap_frag;
        w->cap_frag = w->cap_frag2;
        w->cap_frag2 = c;
        w->n_frag = n2;
    }
}

/* ==== SentencePiece (llm_tokenizer_spm_session) ==== */

static void spm_try_bigram(const vlm_tokenizer_t *t, work_t *w, int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    uint32_t size = w->sym[left].n + w->sym[right].n;
    int32_t id = find_token(t, w->text.p + w->sym[left].off, size);
    if (id < 0) return;
    heap_push(w, (bigram_t){ left, right, t->score[id], 0, size });
}

/* Emits a final symbol: its token, or else one byte token per byte. (The
 * rev_merge recursion of llama.cpp's resegment() can never fire: it is only
 * consulted for texts that are not tokens, and only token texts enter it.)
 * A byte without a byte token gives the unknown token (llama.cpp throws). */
static void spm_emit(const vlm_tokenizer_t *t, const char *s, size_t n, ivec_t *out) {
    int32_t id = find_token(t, s, n);
    if (id >= 0) {
        ivec_push(out, id);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        int32_t b = t->byte_tok[(unsigned char)s[i]];
        if (b < 0) b = t->unk;
        if (b >= 0) ivec_push(out, b);
    }
}

/* Tokenizes w->text (already prefixed and escaped) and appends to out. */
static void spm_tokenize(const vlm_tokenizer_t *t, work_t *w, ivec_t *out) {
    size_t n = split_symbols(w, w->text.p, w->text.n);
    if (w->oom || n == 0) return;
    w->n_heap = 0;
    w->heap_bpe = false;
    for (size_t i = 1; i < n; i++) spm_try_bigram(t, w, (int32_t)i - 1, (int32_t)i);
    while (w->n_heap > 0 && !w->oom) {
        bigram_t b = heap_pop(w);
        sym_t *l = &w->sym[b.left], *r = &w->sym[b.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) continue;
        merge_symbols(w, &b);
        spm_try_bigram(t, w, w->sym[b.left].prev, b.left);
        spm_try_bigram(t, w, b.left, w->sym[b.left].next);
    }
    for (int32_t i = 0; i != -1; i = w->sym[i].next) spm_emit(t, w->text.p + w->sym[i].off, w->sym[i].n, out);
}

/* ==== BPE pre-tokenizers (unicode_regex_split) ====
 *
 * The text is decoded to code points (bad bytes -> U+FFFD) and cut into
 * chunks (lengths in code points). Each pre-tokenizer regex refines every
 * chunk on its own: either one of llama.cpp's hand-written splitters (GPT-2,
 * LLaMA 3), or a leftmost-match scan that keeps the matches and the text
 * between them as chunks, as std::regex_iterator does there. The scans
 * implement llama.cpp's regexes as it runs them: categories \p{..} on its
 * "collapsed" text (ASCII as is, other code points by category) and \s
 * matching ASCII whitespace plus every other White_Space code point.
 */

/* Character classes of the scanned regexes. */
typedef enum pred {
    PRED_NONE,
    PRED_CR_LF,      /* [\r\n] */
    PRED_SPACE,      /* \s */
    PRED_LETTER,     /* \p{L} */
    PRED_NUMBER,     /* \p{N} */
    PRED_PUNCT,      /* \p{P} */
    PRED_PUNCT_DEF,  /* [\p{P}\$\+<=>\^~\|] */
    PRED_PUNCT_FAL,  /* [\p{P}\$\+<=>\^~\|`] */
    PRED_DIGIT,      /* [0-9] */
    PRED_DS_LETTER,  /* deepseek-llm's letter class */
    PRED_DS_PUNCT,   /* [!-/:-~！-／：-～‘-‟　-。] */
    PRED_CJK,        /* [一-龥ࠀ-一가-퟿] */
} pred_t;

typedef struct urange {
    uint32_t lo, hi;
} urange_t;

/* The explicit ranges of deepseek-llm's regexes, in the order written there. */
static const urange_t DS_LETTER[] = {
    { 0x0041, 0x005A }, { 0x0061, 0x007A }, { 0x00B5, 0x00B5 }, { 0x00C0, 0x00D6 }, { 0x00D8, 0x00F6 },
    { 0x00F8, 0x01BA }, { 0x01BC, 0x01BF }, { 0x01C4, 0x0293 }, { 0x0295, 0x02AF }, { 0x0370, 0x0373 },
    { 0x0376, 0x0377 }, { 0x037B, 0x037D }, { 0x037F, 0x037F }, { 0x0386, 0x0386 }, { 0x0388, 0x038A },
    { 0x038C, 0x038C }, { 0x038E, 0x03A1 }, { 0x03A3, 0x03F5 }, { 0x03F7, 0x0481 }, { 0x048A, 0x052F },
    { 0x0531, 0x0556 }, { 0x10A0, 0x10C5 }, { 0x13A0, 0x13F5 }, { 0x13F8, 0x13FD }, { 0x1C90, 0x1CBA },
    { 0x1CBD, 0x1CBF }, { 0x1D00, 0x1D2B }, { 0x1D6B, 0x1D77 }, { 0x1D79, 0x1D9A }, { 0x1E00, 0x1F15 },
    { 0x1F18, 0x1F1D }, { 0x1F20, 0x1F45 }, { 0x1F48, 0x1F4D }, { 0x1F50, 0x1F57 }, { 0x1F59, 0x1F59 },
    { 0x1F5B, 0x1F5B }, { 0x1F5D, 0x1F5D }, { 0x1F5F, 0x1F7D }, { 0x1F80, 0x1FB4 }, { 0x1FB6, 0x1FBC },
    { 0x1FBE, 0x1FBE }, { 0x1FC2, 0x1FC4 }, { 0x1FC6, 0x1FCC }, { 0x1FD0, 0x1FD3 }, { 0x1FD6, 0x1FDB },
    { 0x1FE0, 0x1FEC }, { 0x1FF2, 0x1FF4 }, { 0x1FF6, 0x1FFC }, { 0x2102, 0x2102 }, { 0x2107, 0x2107 },
    { 0x210A, 0x2113 }, { 0x2115, 0x2115 }, { 0x2119, 0x211D }, { 0x2124, 0x2124 }, { 0x2126, 0x2126 },
    { 0x2128, 0x2128 }, { 0x212A, 0x212D }, { 0x212F, 0x2134 }, { 0x2139, 0x2139 }, { 0x213C, 0x213F },
    { 0x2145, 0x2149 }, { 0x214E, 0x214E }, { 0x2183, 0x2184 }, { 0x2C00, 0x2C7B }, { 0x2C7E, 0x2CE4 },
    { 0x2CEB, 0x2CEE }, { 0x2CF2, 0x2CF3 }, { 0xA640, 0xA66D }, { 0xA680, 0xA69B }, { 0xA722, 0xA76F },
    { 0xA771, 0xA787 }, { 0xA78B, 0xA78E }, { 0xAB70, 0xABBF }, { 0xFB00, 0xFB06 }, { 0xFB13, 0xFB17 },
    { 0xFF21, 0xFF3A }, { 0xFF41, 0xFF5A }, { 0x10400, 0x1044F }, { 0x104B0, 0x104D3 }, { 0x104D8, 0x104FB },
    { 0x10C80, 0x10CB2 }, { 0x10CC0, 0x10CF2 }, { 0x118A0, 0x118DF }, { 0x1E900, 0x1E943 },
};
static const urange_t DS_PUNCT[] = {
    { 0x0021, 0x002F }, { 0x003A, 0x007E }, { 0xFF01, 0xFF0F }, { 0xFF1A, 0xFF5E }, { 0x2018, 0x201F }, { 0x3000, 0x3002 },
};
static const urange_t CJK[] = { { 0x4E00, 0x9FA5 }, { 0x0800, 0x4E00 }, { 0xAC00, 0xD7FF } };

static bool in_ranges(uint32_t c, const urange_t *r, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (c >= r[i].lo && c <= r[i].hi) return true;
    return false;
}

/* ASCII members of \p{P} in llama.cpp's collapsed regexes. */
static bool ascii_punct(uint32_t c) {
    return (c >= 0x21 && c <= 0x23) || (c >= 0x25 && c <= 0x2A) || (c >= 0x2C && c <= 0x2F) || c == 0x3A ||
           c == 0x3B || c == 0x3F || c == 0x40 || (c >= 0x5B && c <= 0x5D) || c == 0x5F || c == 0x7B || c == 0x7D;
}

/* The category of a non-ASCII code point in the collapsed text: its one
 * category bit, or 0 for whitespace (collapsed to \v). */
static uint32_t collapsed_cat(uint32_t c) {
    uint32_t f = cpt_flags(c);
    return (f & FL_WHITESPACE) ? 0 : (f & 0xFF);
}

static bool pred_test(pred_t p, uint32_t c) {
    switch (p) {
    case PRED_NONE: return false;
    case PRED_CR_LF: return c == '\r' || c == '\n';
    case PRED_SPACE: return cpt_is_whitespace(c);
    case PRED_LETTER:
        if (c < 0x80) return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
        return collapsed_cat(c) == VLM__UCAT_LETTER;
    case PRED_NUMBER:
        if (c < 0x80) return c >= '0' && c <= '9';
        return collapsed_cat(c) == VLM__UCAT_NUMBER;
    case PRED_PUNCT:
        if (c < 0x80) return ascii_punct(c);
        return collapsed_cat(c) == VLM__UCAT_PUNCTUATION;
    case PRED_PUNCT_DEF:
    case PRED_PUNCT_FAL:
        if (c < 0x80)
            return ascii_punct(c) || c == '$' || c == '+' || c == '<' || c == '=' || c == '>' || c == '^' ||
                   c == '~' || c == '|' || (p == PRED_PUNCT_FAL && c == '`');
        return collapsed_cat(c) == VLM__UCAT_PUNCTUATION;
    case PRED_DIGIT: return c >= '0' && c <= '9';
    /* The explicit ranges see the text with non-ASCII whitespace as \v. */
    case PRED_DS_LETTER:
        return in_ranges(c, DS_LETTER, sizeof(DS_LETTER) / sizeof(DS_LETTER[0])) &&
               !(c > 0x7F && cpt_is_whitespace(c));
    case PRED_DS_PUNCT:
        return in_ranges(c, DS_PUNCT, sizeof(DS_PUNCT) / sizeof(DS_PUNCT[0])) && !(c > 0x7F && cpt_is_whitespace(c));
    case PRED_CJK: return in_ranges(c, CJK, sizeof(CJK) / sizeof(CJK[0])) && !(c > 0x7F && cpt_is_whitespace(c));
    }
    return false;
}

/* One pre-tokenizer step. */
typedef enum step_kind {
    STEP_END,
    STEP_GPT2,      /* llama.cpp's custom GPT-2 splitter */
    STEP_LLAMA3,    /* llama.cpp's custom LLaMA 3 splitter, numbers in groups of up to `arg` */
    STEP_ONE,       /* cls: one code point */
    STEP_PLUS,      /* prefix? cls+ */
    STEP_THREE,     /* cls cls cls */
    STEP_TRAIL_WS,  /* \s+$ */
} step_kind_t;

typedef struct step {
    step_kind_t kind;
    pred_t prefix, cls;
    int arg;
} step_t;

static const step_t STEPS_DEFAULT[] = {
    { STEP_PLUS, PRED_NONE, PRED_PUNCT_DEF, 0 }, /* [\p{P}\$\+<=>\^~\|]+ */
    { STEP_GPT2, PRED_NONE, PRED_NONE, 0 },
    { STEP_PLUS, PRED_NONE, PRED_NUMBER, 0 },    /* \p{N}+ */
    { STEP_THREE, PRED_NONE, PRED_DIGIT, 0 },    /* [0-9][0-9][0-9] */
    { STEP_END, PRED_NONE, PRED_NONE, 0 },
};
static const step_t STEPS_GPT2[] = { { STEP_GPT2, PRED_NONE, PRED_NONE, 0 }, { STEP_END, PRED_NONE, PRED_NONE, 0 } };
static const step_t STEPS_LLAMA3[] = { { STEP_LLAMA3, PRED_NONE, PRED_NONE, 3 }, { STEP_END, PRED_NONE, PRED_NONE, 0 } };
/* Qwen2's regex differs from LLaMA 3's only in \p{N} instead of \p{N}{1,3}. */
static const step_t STEPS_QWEN2[] = { { STEP_LLAMA3, PRED_NONE, PRED_NONE, 1 }, { STEP_END, PRED_NONE, PRED_NONE, 0 } };
static const step_t STEPS_DEEPSEEK_LLM[] = {
    { STEP_ONE, PRED_NONE, PRED_CR_LF, 0 },        /* [\r\n] */
    { STEP_PLUS, PRED_SPACE, PRED_DS_LETTER, 0 },  /* \s?[A-Za-zµÀ-Ö...]+ */
    { STEP_PLUS, PRED_SPACE, PRED_DS_PUNCT, 0 },   /* \s?[!-/:-~！-／：-～‘-‟　-。]+ */
    { STEP_TRAIL_WS, PRED_NONE, PRED_NONE, 0 },    /* \s+$ */
    { STEP_PLUS, PRED_NONE, PRED_CJK, 0 },         /* [一-龥ࠀ-一가-퟿]+ */
    { STEP_PLUS, PRED_NONE, PRED_NUMBER, 0 },      /* \p{N}+ */
    { STEP_END, PRED_NONE, PRED_NONE, 0 },
};
static const step_t STEPS_DEEPSEEK_CODER[] = {
    { STEP_ONE, PRED_NONE, PRED_CR_LF, 0 },     /* [\r\n] */
    { STEP_PLUS, PRED_SPACE, PRED_LETTER, 0 },  /* \s?\p{L}+ */
    { STEP_PLUS, PRED_SPACE, PRED_PUNCT, 0 },   /* \s?\p{P}+ */
    { STEP_PLUS, PRED_NONE, PRED_CJK, 0 },      /* [一-龥ࠀ-一가-퟿]+ */
    { STEP_ONE, PRED_NONE, PRED_NUMBER, 0 },    /* \p{N} */
    { STEP_END, PRED_NONE, PRED_NONE, 0 },
};
static const step_t STEPS_FALCON[] = {
    { STEP_PLUS, PRED_NONE, PRED_PUNCT_FAL, 0 }, /* [\p{P}\$\+<=>\^~\|`]+ */
    { STEP_GPT2, PRED_NONE, PRED_NONE, 0 },
    { STEP_THREE, PRED_NONE, PRED_DIGIT, 0 },    /* [0-9][0-9][0-9] */
    { STEP_END, PRED_NONE, PRED_NONE, 0 },
};
static const step_t STEPS_STARCODER[] = {
    { STEP_ONE, PRED_NONE, PRED_NUMBER, 0 }, /* \p{N} */
    { STEP_GPT2, PRED_NONE, PRED_NONE, 0 },
    { STEP_END, PRED_NONE, PRED_NONE, 0 },
};

static const step_t *pre_steps(pre_t p) {
    switch (p) {
    case PRE_DEFAULT: return STEPS_DEFAULT;
    case PRE_GPT2: return STEPS_GPT2;
    case PRE_LLAMA3: return STEPS_LLAMA3;
    case PRE_QWEN2: return STEPS_QWEN2;
    case PRE_DEEPSEEK_LLM: return STEPS_DEEPSEEK_LLM;
    case PRE_DEEPSEEK_CODER: return STEPS_DEEPSEEK_CODER;
    case PRE_FALCON: return STEPS_FALCON;
    case PRE_STARCODER: return STEPS_STARCODER;
    }
    return STEPS_DEFAULT;
}

static void chunk_emit(work_t *w, size_t *n, size_t len) {
    if (len == 0) return;
    if (!GROW(w->chunk2, w->cap_chunk2, *n + 1)) {
        w->oom = true;
        return;
    }
    w->chunk2[(*n)++] = len;
}

/* The code point at p inside [.., end), or CPT_INVALID past it. */
static uint32_t get_cpt(const work_t *w, size_t p, size_t end) { return p < end ? w->cpt[p] : CPT_INVALID; }
static uint32_t get_flags(const work_t *w, size_t p, size_t end) { return p < end ? cpt_flags(w->cpt[p]) : 0; }

#define IS_WS(f) (((f) & FL_WHITESPACE) != 0)
#define IS_LETTER(f) (((f) & VLM__UCAT_LETTER) != 0)
#define IS_NUMBER(f) (((f) & VLM__UCAT_NUMBER) != 0)

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
 * (llama.cpp's unicode_regex_split_custom_gpt2, on chunk [ini, end)). */
static void split_gpt2(work_t *w, size_t ini, size_t end, size_t *n) {
    size_t pos = ini, prev = ini;
#define ADD(e) (chunk_emit(w, n, (e) - prev), prev = (e))
    while (pos < end) {
        uint32_t cpt = w->cpt[pos];
        uint32_t fl = cpt_flags(cpt);
        if (cpt == '\'' && pos + 1 < end) {
            uint32_t nx = w->cpt[pos + 1];
            if (nx == 's' || nx == 't' || nx == 'm' || nx == 'd') {
                pos += 2;
                ADD(pos);
                continue;
            }
            if (pos + 2 < end) {
                uint32_t nn = w->cpt[pos + 2];
                if ((nx == 'r' && nn == 'e') || (nx == 'v' && nn == 'e') || (nx == 'l' && nn == 'l')) {
                    pos += 3;
                    ADD(pos);
                    continue;
                }
            }
        }
        uint32_t f2 = cpt == ' ' ? get_flags(w, pos + 1, end) : fl;
        if (IS_LETTER(f2)) {
            pos += cpt == ' ';
            while (IS_LETTER(f2)) f2 = get_flags(w, ++pos, end);
            ADD(pos);
            continue;
        }
        if (IS_NUMBER(f2)) {
            pos += cpt == ' ';
            while (IS_NUMBER(f2)) f2 = get_flags(w, ++pos, end);
            ADD(pos);
            continue;
        }
        if (!(IS_WS(f2) || IS_LETTER(f2) || IS_NUMBER(f2)) && f2) {
            pos += cpt == ' ';
            while (!(IS_WS(f2) || IS_LETTER(f2) || IS_NUMBER(f2)) && f2) f2 = get_flags(w, ++pos, end);
            ADD(pos);
            continue;
        }
        size_t nws = 0;
        while (IS_WS(get_flags(w, pos + nws, end))) nws++;
        if (nws > 1 && get_cpt(w, pos + nws, end) != CPT_INVALID) {
            pos += nws - 1;
            ADD(pos);
            continue;
        }
        if (nws > 0) {
            pos += nws;
            ADD(pos);
            continue;
        }
        pos++;
        ADD(pos);
    }
#undef ADD
}

static uint32_t ascii_lower(uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

/* LLaMA 3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 * ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ (unicode_regex_split_custom_llama3;
 * max_digits 1 gives Qwen2's \p{N}). Only ASCII letters lower-case to the
 * contraction letters, so an ASCII tolower is unicode_tolower here. */
static void split_llama3(work_t *w, size_t ini, size_t end, size_t *n, size_t max_digits) {
    size_t pos = ini, prev = ini;
#define ADD(e) (chunk_emit(w, n, (e) - prev), prev = (e))
    while (pos < end) {
        uint32_t cpt = w->cpt[pos];
        uint32_t fl = cpt_flags(cpt);
        if (cpt == '\'' && pos + 1 < end) {
            uint32_t nx = ascii_lower(w->cpt[pos + 1]);
            if (nx == 's' || nx == 't' || nx == 'm' || nx == 'd') {
                pos += 2;
                ADD(pos);
                continue;
            }
            if (pos + 2 < end) {
                uint32_t nn = ascii_lower(w->cpt[pos + 2]);
                if ((nx == 'r' && nn == 'e') || (nx == 'v' && nn == 'e') || (nx == 'l' && nn == 'l')) {
                    pos += 3;
                    ADD(pos);
                    continue;
                }
            }
        }
        if (!(cpt == '\r' || cpt == '\n' || IS_NUMBER(fl))) {
            if (IS_LETTER(fl) || IS_LETTER(get_flags(w, pos + 1, end))) {
                pos++;
                while (IS_LETTER(get_flags(w, pos, end))) pos++;
                ADD(pos);
                continue;
            }
        }
        if (IS_NUMBER(fl)) {
            size_t start = pos;
            while (IS_NUMBER(get_flags(w, pos, end))) {
                if (++pos - start >= max_digits) {
                    ADD(pos);
                    start = pos;
                }
            }
            ADD(pos);
            continue;
        }
        uint32_t f2 = cpt == ' ' ? get_flags(w, pos + 1, end) : fl;
        if (!(IS_WS(f2) || IS_LETTER(f2) || IS_NUMBER(f2)) && fl) {
            pos += cpt == ' ';
            while (!(IS_WS(f2) || IS_LETTER(f2) || IS_NUMBER(f2)) && f2) f2 = get_flags(w, ++pos, end);
            uint32_t c2 = get_cpt(w, pos, end);
            while (c2 == '\r' || c2 == '\n') c2 = get_cpt(w, ++pos, end);
            ADD(pos);
            continue;
        }
        size_t nws = 0, last_rn = 0;
        while (IS_WS(get_flags(w, pos + nws, end))) {
            uint32_t c2 = w->cpt[pos + nws];
            if (c2 == '\r' || c2 == '\n') last_rn = pos + nws + 1;
            nws++;
        }
        if (last_rn > 0) {
            pos = last_rn;
            ADD(pos);
            continue;
        }
        if (nws > 1 && get_cpt(w, pos + nws, end) != CPT_INVALID) {
            pos += nws - 1;
            ADD(pos);
            continue;
        }
        if (nws > 0) {
            pos += nws;
            ADD(pos);
            continue;
        }
        pos++;
        ADD(pos);
    }
#undef ADD
}

/* Length of the match of a scanned step starting at p (0: none), with
 * ECMAScript's greedy-then-backtrack handling of the optional prefix. */
static size_t match_at(const work_t *w, const step_t *s, size_t p, size_t end) {
    size_t q;
    switch (s->kind) {
    case STEP_ONE: return pred_test(s->cls, w->cpt[p]) ? 1 : 0;
    case STEP_THREE:
        return p + 2 < end && pred_test(s->cls, w->cpt[p]) && pred_test(s->cls, w->cpt[p + 1]) &&
                       pred_test(s->cls, w->cpt[p + 2])
                   ? 3
                   : 0;
    case STEP_PLUS:
        if (s->prefix != PRED_NONE && p + 1 < end && pred_test(s->prefix, w->cpt[p]) &&
            pred_test(s->cls, w->cpt[p + 1]))
            q = p + 1;
        else if (pred_test(s->cls, w->cpt[p]))
            q = p;
        else
            return 0;
        while (q < end && pred_test(s->cls, w->cpt[q])) q++;
        return q - p;
    default: return 0;
    }
}

/* Runs one step over every chunk (w->chunk -> w->chunk2, then swapped). */
static void run_step(work_t *w, const step_t *s) {
    size_t n = 0, start = 0;
    for (size_t c = 0; c < w->n_chunk && !w->oom; c++) {
        size_t ini = start, end = start + w->chunk[c];
        start = end;
        if (s->kind == STEP_GPT2) {
            split_gpt2(w, ini, end, &n);
        } else if (s->kind == STEP_LLAMA3) {
            split_llama3(w, ini, end, &n, (size_t)s->arg);
        } else if (s->kind == STEP_TRAIL_WS) {
            size_t q = end;
            while (q > ini && cpt_is_whitespace(w->cpt[q - 1])) q--;
            chunk_emit(w, &n, q - ini);
            chunk_emit(w, &n, end - q);
        } else {
            size_t gap = ini;
            for (size_t p = ini; p < end;) {
                size_t m = match_at(w, s, p, end);
                if (m == 0) {
                    p++;
                    continue;
                }
                chunk_emit(w, &n, p - gap);
                chunk_emit(w, &n, m);
                p += m;
                gap = p;
            }
            chunk_emit(w, &n, end - gap);
        }
    }
    size_t *tmp = w->chunk;
    w->chunk = w->chunk2;
    w->chunk2 = tmp;
    size_t cap = w->cap_chunk;
    w->cap_chunk = w->cap_chunk2;
    w->cap_chunk2 = cap;
    w->n_chunk = n;
}

/* ==== Byte-level BPE (llm_tokenizer_bpe_session) ==== */

static void bpe_try_bigram(const vlm_tokenizer_t *t, work_t *w, int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const sym_t *l = &w->sym[left], *r = &w->sym[right];
    int32_t rank = find_merge(t, w->text.p + l->off, l->n, w->text.p + r->off, r->n);
    if (rank < 0) return;
    heap_push(w, (bigram_t){ left, right, 0.0f, rank, l->n + r->n });
}

/* Merges one byte-encoded word (w->text) and appends its tokens. A final
 * symbol that is not a token falls back to single-byte tokens of its bytes,
 * skipping bytes without one (as llama.cpp). */
static void bpe_word(const vlm_tokenizer_t *t, work_t *w, ivec_t *out) {
    const char *word = w->text.p;
    if (t->ignore_merges) {
        int32_t id = find_token(t, word, w->text.n);
        if (id >= 0) {
            ivec_push(out, id);
            return;
        }
    }
    size_t n = split_symbols(w, word, w->text.n);
    if (w->oom || n == 0) return;
    w->n_heap = 0;
    w->heap_bpe = true;
    for (size_t i = 1; i < n; i++) bpe_try_bigram(t, w, (int32_t)i - 1, (int32_t)i);
    while (w->n_heap > 0 && !w->oom) {
        bigram_t b = heap_pop(w);
        const sym_t *l = &w->sym[b.left], *r = &w->sym[b.right];
        /* Stale unless both are still the adjacent pair that was pushed. */
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) continue;
        merge_symbols(w, &b);
        bpe_try_bigram(t, w, w->sym[b.left].prev, b.left);
        bpe_try_bigram(t, w, b.left, w->sym[b.left].next);
    }
    for (size_t i = 0; i < n; i++) {
        const sym_t *s = &w->sym[i];
        if (s->n == 0) continue;
        int32_t id = find_token(t, word + s->off, s->n);
        if (id >= 0) {
            ivec_push(out, id);
            continue;
        }
        for (uint32_t j = 0; j < s->n; j++) {
            int32_t b = find_token(t, word + s->off + j, 1);
            if (b >= 0) ivec_push(out, b);
        }
    }
}

/* Pre-tokenizes one raw fragment and merges every word. */
static void bpe_tokenize(const vlm_tokenizer_t *t, work_t *w, const char *text, size_t len, ivec_t *out) {
    /* Code points, bad bytes as U+FFFD. */
    w->n_cpt = 0;
    if (!GROW(w->cpt, w->cap_cpt, len + 1)) {
        w->oom = true;
        return;
    }
    for (size_t off = 0; off < len;) w->cpt[w->n_cpt++] = utf8_next((const unsigned char *)text, len, &off);

    /* Split into chunks, step by step. */
    if (!GROW(w->chunk, w->cap_chunk, 1)) {
        w->oom = true;
        return;
    }
    w->chunk[0] = w->n_cpt;
    w->n_chunk = 1;
    for (const step_t *s = pre_steps(t->pre); s->kind != STEP_END && !w->oom; s++) run_step(w, s);

    /* Each chunk: code points -> UTF-8 -> one printable code point per byte. */
    size_t start = 0;
    for (size_t c = 0; c < w->n_chunk && !w->oom && !out->oom; c++) {
        w->text.n = 0;
        for (size_t i = start; i < start + w->chunk[c]; i++) {
            char u[4];
            size_t ul = utf8_encode(w->cpt[i], u);
            for (size_t k = 0; k < ul; k++) {
                unsigned char b = (unsigned char)u[k];
                cbuf_put(&w->text, t->bpe_enc[b], t->bpe_enc_len[b]);
            }
        }
        start += w->chunk[c];
        if (w->text.oom) {
            w->oom = true;
            return;
        }
        bpe_word(t, w, out);
    }
}

/* ==== Public API ==== */

vlm_tokenizer_kind_t vlm_tokenizer_kind(const vlm_tokenizer_t *t) { return t->kind; }
int32_t vlm_tokenizer_n_vocab(const vlm_tokenizer_t *t) { return t->n_vocab; }
int32_t vlm_tokenizer_bos(const vlm_tokenizer_t *t) { return t->bos; }
int32_t vlm_tokenizer_eos(const vlm_tokenizer_t *t) { return t->eos; }
int32_t vlm_tokenizer_eot(const vlm_tokenizer_t *t) { return t->eot; }
int32_t vlm_tokenizer_unk(const vlm_tokenizer_t *t) { return t->unk; }
bool vlm_tokenizer_add_bos(const vlm_tokenizer_t *t) { return t->add_bos; }
bool vlm_tokenizer_add_eos(const vlm_tokenizer_t *t) { return t->add_eos; }

bool vlm_tokenizer_is_eog(const vlm_tokenizer_t *t, int32_t id) {
    return id >= 0 && id < t->n_vocab && (t->attr[id] & ATTR_EOG);
}

bool vlm_tokenizer_is_control(const vlm_tokenizer_t *t, int32_t id) {
    return id >= 0 && id < t->n_vocab && (t->attr[id] & ATTR_CONTROL);
}

int32_t vlm_tokenizer_find(const vlm_tokenizer_t *t, const char *text, size_t len) {
    return find_token(t, text, len);
}

const char *vlm_tokenizer_text(const vlm_tokenizer_t *t, int32_t id, size_t *len) {
    if (id < 0 || id >= t->n_vocab) return NULL;
    size_t l;
    const char *s = tok_text(t, id, &l);
    if (len) *len = l;
    return s;
}

int vlm_tokenizer_encode(const vlm_tokenizer_t *t, const char *text, size_t len, bool add_special,
                         bool parse_special, int32_t **ids, size_t *n_ids, vlm_error_t *err) {
    *ids = NULL;
    *n_ids = 0;
    if (add_special && t->add_bos && t->bos < 0)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "tokenizer: add_bos_token is set but there is no BOS token");
    if (add_special && t->add_eos && t->eos < 0)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "tokenizer: add_eos_token is set but there is no EOS token");

    work_t w = { 0 };
    ivec_t out = { 0 };
    if (len > 0) {
        if (!GROW(w.frag, w.cap_frag, 1)) goto nomem;
        w.frag[0] = (frag_t){ -1, 0, len };
        w.n_frag = 1;
        partition(t, &w, text, len, parse_special);
    }
    if (add_special && t->add_bos) ivec_push(&out, t->bos);
    bool prev_special = true; /* SPM: prefix a space to the first fragment */
    for (size_t f = 0; f < w.n_frag && !w.oom && !out.oom; f++) {
        const frag_t *fr = &w.frag[f];
        if (fr->token >= 0) {
            ivec_push(&out, fr->token);
            prev_special = true;
            continue;
        }
        if (t->kind == VLM_TOKENIZER_SPM) {
            /* Space prefix, then every ' ' becomes U+2581. */
            w.text.n = 0;
            if (t->add_space_prefix && prev_special) cbuf_put(&w.text, "\xe2\x96\x81", 3);
            const char *s = text + fr->off;
            for (size_t i = 0; i < fr->len; i++) {
                if (s[i] == ' ') cbuf_put(&w.text, "\xe2\x96\x81", 3);
                else cbuf_put(&w.text, s + i, 1);
            }
            if (w.text.oom) goto nomem;
            spm_tokenize(t, &w, &out);
            prev_special = false;
        } else {
            bpe_tokenize(t, &w, text + fr->off, fr->len, &out);
        }
    }
    if (add_special && t->add_eos) ivec_push(&out, t->eos);
    if (w.oom || out.oom) goto nomem;
    work_deinit(&w);
    if (!out.v) out.v = malloc(sizeof(int32_t));
    if (!out.v) return vlm_error_set(err, VLM_ERR_NOMEM, "tokenizer: out of memory");
    *ids = out.v;
    *n_ids = out.n;
    return VLM_OK;

nomem:
    work_deinit(&w);
    free(out.v);
    return vlm_error_set(err, VLM_ERR_NOMEM, "tokenizer: out of memory for %zu bytes of text", len);
}

/* token_to_piece with lstrip: control and unknown tokens are empty unless
 * special; up to lstrip leading spaces are skipped. */
static int piece_lstrip(const vlm_tokenizer_t *t, int32_t id, bool special, int lstrip, char *buf, size_t cap) {
    if (id < 0 || id >= t->n_vocab) return 0;
    if (!special && (t->attr[id] & (ATTR_UNKNOWN | ATTR_CONTROL))) return 0;
    const char *s = t->piece + t->piece_off[id];
    size_t n = t->piece_off[id + 1] - t->piece_off[id];
    for (int i = 0; i < lstrip && n > 0 && *s == ' '; i++) {
        s++;
        n--;
    }
    if (n > (size_t)INT32_MAX) return 0;
    if (cap < n) return -(int)n;
    if (n) memcpy(buf, s, n);
    return (int)n;
}

int vlm_tokenizer_piece(const vlm_tokenizer_t *t, int32_t id, bool special, char *buf, size_t cap) {
    return piece_lstrip(t, id, special, 0, buf, cap);
}

/* llama_detokenize's clean_up_tokenization_spaces passes, in place:
 * " ?", " !", " .", " ," lose the space; " ' " loses both spaces; " 's",
 * " 'm", " 're", " 've" lose the space. Returns the new length. */
static size_t clean_spaces(char *s, size_t total) {
    size_t n1 = total;
    total = total ? 1 : 0;
    for (size_t i = 1; i < n1; i++) {
        char x = s[i];
        if (s[i - 1] == ' ' && (x == '?' || x == '!' || x == '.' || x == ',')) total--;
        s[total++] = x;
    }
    size_t n2 = total;
    total = total ? 1 : 0;
    for (size_t i = 1; i < n2; i++) {
        char x = s[i];
        if (x == '\'' && i + 1 < n2 && s[i - 1] == ' ' && s[i + 1] == ' ') {
            total--;
            s[++i] = '\0';
        }
        s[total++] = x;
    }
    size_t n3 = total;
    total = total ? 1 : 0;
    for (size_t i = 1; i < n3; i++) {
        char x = s[i];
        if (s[i - 1] == ' ' && x == '\'' && i + 1 < n3) {
            char x1 = s[i + 1];
            if (x1 == 's' || x1 == 'm') total--;
            else if (i + 2 < n3 && ((x1 == 'r' && s[i + 2] == 'e') || (x1 == 'v' && s[i + 2] == 'e'))) total--;
        }
        s[total++] = x;
    }
    return total;
}

int vlm_tokenizer_decode(const vlm_tokenizer_t *t, const int32_t *ids, size_t n, bool remove_special,
                         bool unparse_special, char **out, size_t *len, vlm_error_t *err) {
    *out = NULL;
    if (len) *len = 0;
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= t->n_vocab)
            return vlm_error_set(err, VLM_ERR_INVALID_ARG, "tokenizer: token %zu has id %d outside the vocabulary (%d)",
                                 i, ids[i], t->n_vocab);
    bool remove_space = t->add_space_prefix;
    if (remove_special && t->add_bos && n > 0 && ids[0] == t->bos) {
        remove_space = false;
        ids++;
        n--;
    }
    if (remove_special && t->add_eos && n > 0 && ids[n - 1] == t->eos) n--;

    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += t->piece_off[ids[i] + 1] - t->piece_off[ids[i]];
    char *s = malloc(total + 1);
    if (!s) return vlm_error_set(err, VLM_ERR_NOMEM, "tokenizer: out of memory for %zu bytes", total);
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        int k = piece_lstrip(t, ids[i], unparse_special, remove_space ? 1 : 0, s + pos, total - pos);
        remove_space = false;
        if (k > 0) pos += (size_t)k;
    }
    if (t->clean_spaces) pos = clean_spaces(s, pos);
    s[pos] = '\0';
    *out = s;
    if (len) *len = pos;
    return VLM_OK;
}
