/* tests/test_tokenizer.c - the tokenizers against llama.cpp's own outputs.
 *
 * - Golden cases (tests/data/golden/<case>/case.json): every tokenizer check
 *   (the four llama_tokenize variants, the pieces and llama_detokenize), the
 *   system/user prompt ids of every generation check and the text-only
 *   prompt ids.
 * - llama.cpp's vocab test vectors in ../shared/peer/llama.cpp-vocab
 *   (SentencePiece llama-spm and phi-3, BPE gpt-2 and deepseek-llm); skipped
 *   when that folder is absent.
 * - Round trips, special-token parsing, invalid UTF-8, synthetic vocabs
 *   (LSTRIP/RSTRIP, user-defined tokens, clean-up spaces) and the errors for
 *   broken vocab metadata, built in memory with core/gguf_write.h.
 * - The time to tokenize a 4 KB prompt with the largest vocab at hand.
 */
#include <jansson.h>
#include <stdint.h>
#include <time.h>

#include "core/gguf.h"
#include "core/gguf_write.h"
#include "harness.h"
#include "text/tokenizer.h"

static const char *const CASES[] = { "micro-f32", "small-q8_0", "small-q4_0", "small-q4_k_m" };
#define N_CASES (sizeof(CASES) / sizeof(CASES[0]))

static const char *const PEER_VOCABS[] = { "llama-spm", "phi-3", "gpt-2", "deepseek-llm" };
#define N_PEER (sizeof(PEER_VOCABS) / sizeof(PEER_VOCABS[0]))

#define PEER_DIR VLM_SHARED_DIR "/peer/llama.cpp-vocab"

/* ==== Helpers ==== */

/* Opens a GGUF file, builds its tokenizer and closes the file again (the
 * tokenizer must not keep pointers into it). */
static vlm_tokenizer_t *load_path(const char *path) {
    vlm_error_t err;
    vlm_gguf_t *g = NULL;
    if (vlm_gguf_open(path, &g, &err)) {
        fprintf(stderr, "  %s: %s\n", path, err.msg);
        return NULL;
    }
    vlm_tokenizer_t *t = NULL;
    if (vlm_tokenizer_load(g, &t, &err)) fprintf(stderr, "  %s: %s\n", path, err.msg);
    vlm_gguf_destroy(&g);
    return t;
}

/* Builds a tokenizer from a GGUF image in memory; returns the error code and
 * leaves the message in err. */
static int load_mem(vlm_gguf_writer_t *w, vlm_tokenizer_t **t, vlm_error_t *err) {
    void *data = NULL;
    size_t size = 0;
    int rc = vlm_gguf_writer_write_mem(w, &data, &size, err);
    if (rc) return rc;
    vlm_gguf_t *g = NULL;
    rc = vlm_gguf_open_buffer(data, size, &g, err);
    if (!rc) rc = vlm_tokenizer_load(g, t, err);
    vlm_gguf_destroy(&g);
    free(data);
    return rc;
}

/* Decodes a hex string; returns malloc'd bytes (NUL-terminated) and *n. */
static char *unhex(const char *h, size_t *n) {
    size_t len = strlen(h) / 2;
    char *out = malloc(len + 1);
    for (size_t i = 0; i < len; i++) {
        unsigned v;
        sscanf(h + 2 * i, "%2x", &v);
        out[i] = (char)v;
    }
    out[len] = 0;
    *n = len;
    return out;
}

static void print_ids(const char *label, const int32_t *ids, size_t n) {
    fprintf(stderr, "    %s (%zu):", label, n);
    for (size_t i = 0; i < n && i < 64; i++) fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, n > 64 ? " ...\n" : "\n");
}

/* True when ids equal the JSON array of integers want; prints both if not. */
static bool ids_equal_json(const int32_t *ids, size_t n, const json_t *want, const char *what) {
    bool ok = json_is_array(want) && json_array_size(want) == n;
    for (size_t i = 0; ok && i < n; i++) ok = json_integer_value(json_array_get(want, i)) == ids[i];
    if (!ok) {
        fprintf(stderr, "  mismatch: %s\n", what);
        print_ids("got ", ids, n);
        size_t m = json_array_size(want);
        int32_t *w = malloc((m ? m : 1) * sizeof(int32_t));
        for (size_t i = 0; i < m; i++) w[i] = (int32_t)json_integer_value(json_array_get(want, i));
        print_ids("want", w, m);
        free(w);
    }
    return ok;
}

/* Encodes and compares with a JSON id array. */
static bool check_encode(const vlm_tokenizer_t *t, const char *text, size_t len, bool add_special,
                         bool parse_special, const json_t *want, const char *what) {
    int32_t *ids = NULL;
    size_t n = 0;
    vlm_error_t err;
    int rc = vlm_tokenizer_encode(t, text, len, add_special, parse_special, &ids, &n, &err);
    bool ok = rc == 0 && ids_equal_json(ids, n, want, what);
    if (rc) fprintf(stderr, "  %s: %s\n", what, err.msg);
    free(ids);
    return ok;
}

/* JSON int array -> malloc'd int32 array. */
static int32_t *json_ids(const json_t *a, size_t *n) {
    *n = json_array_size(a);
    int32_t *ids = malloc((*n ? *n : 1) * sizeof(int32_t));
    for (size_t i = 0; i < *n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(a, i));
    return ids;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* ==== Golden cases ==== */

static void test_golden_cases(void) {
    int n_checks = 0;
    for (size_t c = 0; c < N_CASES; c++) {
        char path[512];
        snprintf(path, sizeof(path), "%s/golden/%s/case.json", VLM_TEST_DATA, CASES[c]);
        json_error_t jerr;
        json_t *root = json_load_file(path, 0, &jerr);
        REQUIRE(root, "%s: %s", path, jerr.text);
        snprintf(path, sizeof(path), "%s/golden/%s/text.gguf", VLM_TEST_DATA, CASES[c]);
        vlm_tokenizer_t *t = load_path(path);
        if (!t) {
            json_decref(root);
            REQUIRE(false, "%s: no tokenizer", path);
        }
        CHECK(vlm_tokenizer_kind(t) == VLM_TOKENIZER_SPM);
        CHECK(vlm_tokenizer_bos(t) == 1 && vlm_tokenizer_eos(t) == 2 && vlm_tokenizer_add_bos(t));
        CHECK(vlm_tokenizer_is_eog(t, 2) && !vlm_tokenizer_is_eog(t, 1));
        CHECK(vlm_tokenizer_is_control(t, 1) && vlm_tokenizer_is_control(t, 2));

        /* tokenizer_checks[] */
        json_t *checks = json_object_get(root, "tokenizer_checks");
        CHECK(json_array_size(checks) > 0);
        for (size_t i = 0; i < json_array_size(checks); i++) {
            json_t *ck = json_array_get(checks, i);
            size_t len;
            char *text = unhex(json_string_value(json_object_get(ck, "text_utf8_hex")), &len);
            char what[256];
            snprintf(what, sizeof(what), "%s check %zu %s", CASES[c], i, json_string_value(json_object_get(ck, "text")));
            CHECK(check_encode(t, text, len, true, false, json_object_get(ck, "ids_with_bos"), what), "ids_with_bos");
            CHECK(check_encode(t, text, len, false, false, json_object_get(ck, "ids_without_bos"), what),
                  "ids_without_bos");
            CHECK(check_encode(t, text, len, true, true, json_object_get(ck, "ids_with_bos_parse_special"), what),
                  "ids_with_bos_parse_special");
            CHECK(check_encode(t, text, len, false, true, json_object_get(ck, "ids_without_bos_parse_special"), what),
                  "ids_without_bos_parse_special");

            /* pieces_hex: token_to_piece(special = true) of the reference ids. */
            size_t n;
            int32_t *ids = json_ids(json_object_get(ck, "ids_with_bos_parse_special"), &n);
            json_t *pieces = json_object_get(ck, "pieces_hex");
            CHECK(json_array_size(pieces) == n, "%s: %zu pieces", what, json_array_size(pieces));
            for (size_t k = 0; k < n && k < json_array_size(pieces); k++) {
                size_t plen;
                char *want = unhex(json_string_value(json_array_get(pieces, k)), &plen);
                char buf[64];
                int got = vlm_tokenizer_piece(t, ids[k], true, buf, sizeof(buf));
                CHECK(got >= 0 && (size_t)got == plen && memcmp(buf, want, plen) == 0, "%s: piece %zu of id %d",
                      what, k, ids[k]);
                /* Too small a buffer gives -(needed length). */
                if (plen > 0) CHECK(vlm_tokenizer_piece(t, ids[k], true, buf, plen - 1) == -(int)plen);
                free(want);
            }
            free(ids);

            /* detokenized_utf8_hex: llama_detokenize of ids_without_bos_parse_special. */
            ids = json_ids(json_object_get(ck, "ids_without_bos_parse_special"), &n);
            size_t dlen;
            char *want = unhex(json_string_value(json_object_get(ck, "detokenized_utf8_hex")), &dlen);
            char *got = NULL;
            size_t glen = 0;
            vlm_error_t err;
            CHECK(vlm_tokenizer_decode(t, ids, n, false, false, &got, &glen, &err) == 0, "%s", err.msg);
            CHECK(got && glen == dlen && memcmp(got, want, dlen) == 0 && got[glen] == 0, "%s: detokenized '%s'",
                  what, got ? got : "(null)");
            free(got);
            free(want);
            free(ids);
            free(text);
            n_checks++;
        }

        /* generation_checks[]: system part with BOS, user part without;
         * both parse special tokens. */
        json_t *gens = json_object_get(root, "generation_checks");
        CHECK(json_array_size(gens) == 15);
        for (size_t i = 0; i < json_array_size(gens); i++) {
            json_t *gc = json_array_get(gens, i);
            const char *sys = json_string_value(json_object_get(gc, "system_text"));
            const char *usr = json_string_value(json_object_get(gc, "user_text"));
            char what[128];
            snprintf(what, sizeof(what), "%s gen %zu system", CASES[c], i);
            CHECK(check_encode(t, sys, strlen(sys), true, true, json_object_get(gc, "system_ids"), what), "%s", what);
            snprintf(what, sizeof(what), "%s gen %zu user", CASES[c], i);
            CHECK(check_encode(t, usr, strlen(usr), false, true, json_object_get(gc, "user_ids"), what), "%s", what);
            n_checks += 2;
        }

        /* text_only_check: BOS + prompt, parse_special. */
        json_t *to = json_object_get(root, "text_only_check");
        const char *prompt = json_string_value(json_object_get(to, "prompt"));
        REQUIRE(prompt);
        CHECK(check_encode(t, prompt, strlen(prompt), true, true, json_object_get(to, "prompt_ids"), "text-only"));
        n_checks++;

        vlm_tokenizer_destroy(&t);
        CHECK(t == NULL);
        json_decref(root);
    }
    fprintf(stderr, "  %d golden checks\n", n_checks);
}

/* ==== llama.cpp vocab test vectors ==== */

/* Runs every line of NAME.gguf.inp/.out (add_special = false,
 * parse_special = false); returns the number of mismatches. */
static int run_peer_vocab(const char *name, int *n_lines) {
    char path[512];
    snprintf(path, sizeof(path), "%s/ggml-vocab-%s.gguf", PEER_DIR, name);
    vlm_tokenizer_t *t = load_path(path);
    if (!t) return 1000;
    size_t inp_len, out_len;
    snprintf(path, sizeof(path), "%s/ggml-vocab-%s.gguf.inp", PEER_DIR, name);
    char *inp = harness_read_file(path, &inp_len);
    snprintf(path, sizeof(path), "%s/ggml-vocab-%s.gguf.out", PEER_DIR, name);
    char *out = harness_read_file(path, &out_len);
    int bad = 0;
    if (!inp || !out) {
        bad = 1000;
        goto done;
    }
    static const char sep[] = "\n__ggml_vocab_test__\n";
    size_t pos = 0, opos = 0;
    int line = 0;
    while (pos < inp_len) {
        const char *next = memmem(inp + pos, inp_len - pos, sep, sizeof(sep) - 1);
        size_t tlen = next ? (size_t)(next - (inp + pos)) : inp_len - pos;
        /* Expected ids: one line of " id id ...". */
        const char *eol = memchr(out + opos, '\n', out_len - opos);
        size_t olen = eol ? (size_t)(eol - (out + opos)) : out_len - opos;
        int32_t want[1024];
        size_t n_want = 0;
        for (size_t k = opos; k < opos + olen;) {
            while (k < opos + olen && out[k] == ' ') k++;
            if (k >= opos + olen) break;
            want[n_want++] = (int32_t)strtol(out + k, NULL, 10);
            while (k < opos + olen && out[k] != ' ') k++;
        }
        opos += olen + 1;

        int32_t *ids = NULL;
        size_t n = 0;
        vlm_error_t err;
        int rc = vlm_tokenizer_encode(t, inp + pos, tlen, false, false, &ids, &n, &err);
        bool ok = rc == 0 && n == n_want && memcmp(ids, want, n * sizeof(int32_t)) == 0;
        if (!ok) {
            bad++;
            fprintf(stderr, "  %s line %d mismatch: '%.*s'\n", name, line, (int)(tlen > 80 ? 80 : tlen), inp + pos);
            print_ids("got ", ids, n);
            print_ids("want", want, n_want);
        }
        free(ids);
        line++;
        if (!next) break;
        pos = (size_t)(next - inp) + sizeof(sep) - 1;
    }
    *n_lines = line;
done:
    free(inp);
    free(out);
    vlm_tokenizer_destroy(&t);
    return bad;
}

static bool peer_present(void) {
    char path[512];
    snprintf(path, sizeof(path), "%s/ggml-vocab-llama-spm.gguf", PEER_DIR);
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

static void test_peer_vectors(void) {
    if (!peer_present()) SKIP("%s is absent", PEER_DIR);
    for (size_t v = 0; v < N_PEER; v++) {
        int lines = 0;
        int bad = run_peer_vocab(PEER_VOCABS[v], &lines);
        fprintf(stderr, "  %s: %d lines, %d mismatches\n", PEER_VOCABS[v], lines, bad);
        CHECK(bad == 0 && lines == 46, "%s", PEER_VOCABS[v]);
    }
}

/* ==== Round trips and special tokens on the peer vocabs ==== */

static const char *const ROUND_TRIP[] = {
    "Hello world",
    "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "нещо на Български and Führer's Cửa Việt",
    "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅",
    "3.14159 33333333 ------======= '''' ```` \"\"\"\" ......!!!!!!??????",
    "x",
};

/* decode(encode(s)) == s where llama.cpp guarantees it: SentencePiece without
 * BOS (the space prefix is removed again; with BOS, llama_detokenize's
 * remove_special drops the BOS but then keeps the prefix space); byte-level
 * BPE whenever no clean-up rule applies (gpt-2 cleans " ." etc.;
 * deepseek-llm does not clean). */
static void test_round_trip(void) {
    if (!peer_present()) SKIP("%s is absent", PEER_DIR);
    for (size_t v = 0; v < N_PEER; v++) {
        char path[512];
        snprintf(path, sizeof(path), "%s/ggml-vocab-%s.gguf", PEER_DIR, PEER_VOCABS[v]);
        vlm_tokenizer_t *t = load_path(path);
        REQUIRE(t, "%s", path);
        bool cleans = strcmp(PEER_VOCABS[v], "gpt-2") == 0;
        for (size_t i = 0; i < sizeof(ROUND_TRIP) / sizeof(ROUND_TRIP[0]); i++) {
            const char *s = ROUND_TRIP[i];
            if (cleans && (strstr(s, " ?") || strstr(s, " '") || strstr(s, " .") || strstr(s, " !"))) continue;
            for (int add = 0; add < 2; add++) {
                int32_t *ids = NULL;
                size_t n = 0;
                char *back = NULL;
                size_t blen = 0;
                vlm_error_t err;
                CHECK(vlm_tokenizer_encode(t, s, strlen(s), add, false, &ids, &n, &err) == 0, "%s", err.msg);
                CHECK(vlm_tokenizer_decode(t, ids, n, true, false, &back, &blen, &err) == 0, "%s", err.msg);
                bool spm_bos = add && vlm_tokenizer_kind(t) == VLM_TOKENIZER_SPM;
                CHECK(back && blen == strlen(s) + spm_bos && strcmp(back + spm_bos, s) == 0 &&
                          (!spm_bos || back[0] == ' '),
                      "%s: '%s' -> '%s'", PEER_VOCABS[v], s, back ? back : "(null)");
                free(ids);
                free(back);
            }
        }
        vlm_tokenizer_destroy(&t);
    }
}

/* Control tokens are text unless parse_special; user-defined tokens are
 * always split out; Phi-3's special tokens eat the spaces after them. */
static void test_special_tokens(void) {
    if (!peer_present()) SKIP("%s is absent", PEER_DIR);
    char path[512];
    vlm_error_t err;
    int32_t *ids = NULL;
    size_t n = 0;

    /* LLaMA SentencePiece: <s> and </s> are control tokens. */
    snprintf(path, sizeof(path), "%s/ggml-vocab-llama-spm.gguf", PEER_DIR);
    vlm_tokenizer_t *t = load_path(path);
    REQUIRE(t);
    CHECK(vlm_tokenizer_n_vocab(t) == 32000 && vlm_tokenizer_unk(t) == 0);
    CHECK(vlm_tokenizer_find(t, "<s>", 3) == 1 && vlm_tokenizer_find(t, "</s>", 4) == 2);
    CHECK(vlm_tokenizer_find(t, "no such token", 13) == -1);
    const char *s = "<s>[INST] hi </s>";
    CHECK(vlm_tokenizer_encode(t, s, strlen(s), false, true, &ids, &n, &err) == 0);
    CHECK(n >= 3 && ids[0] == 1 && ids[n - 1] == 2, "parse_special splits <s> and </s>");
    /* After <s> the raw text "[INST] hi " gets its own space prefix. */
    int32_t *ids2 = NULL;
    size_t n2 = 0;
    CHECK(vlm_tokenizer_encode(t, "[INST] hi ", 10, false, false, &ids2, &n2, &err) == 0);
    CHECK(n == n2 + 2 && memcmp(ids + 1, ids2, n2 * sizeof(int32_t)) == 0);
    free(ids2);
    free(ids);
    CHECK(vlm_tokenizer_encode(t, s, strlen(s), false, false, &ids, &n, &err) == 0);
    for (size_t i = 0; i < n; i++) CHECK(ids[i] != 1 && ids[i] != 2, "no control tokens without parse_special");
    free(ids);
    /* Detokenize with and without unparsing control tokens. */
    int32_t seq[] = { 1, 15043, 2 }; /* <s> ▁Hello </s> */
    char *out = NULL;
    CHECK(vlm_tokenizer_decode(t, seq, 3, false, true, &out, NULL, &err) == 0);
    CHECK(out && strcmp(out, "<s> Hello</s>") == 0, "'%s'", out);
    free(out);
    CHECK(vlm_tokenizer_decode(t, seq, 3, false, false, &out, NULL, &err) == 0);
    CHECK(out && strcmp(out, " Hello") == 0, "'%s'", out); /* remove_space was spent on <s> */
    free(out);
    CHECK(vlm_tokenizer_decode(t, seq, 3, true, false, &out, NULL, &err) == 0);
    CHECK(out && strcmp(out, " Hello") == 0, "'%s'", out); /* BOS removed: no space stripping */
    free(out);
    CHECK(vlm_tokenizer_decode(t, seq + 1, 1, true, false, &out, NULL, &err) == 0);
    CHECK(out && strcmp(out, "Hello") == 0, "'%s'", out);
    free(out);
    int32_t bad_id = 32000;
    CHECK(vlm_tokenizer_decode(t, &bad_id, 1, false, false, &out, NULL, &err) == VLM_ERR_INVALID_ARG && !out);
    CHECK(vlm_tokenizer_piece(t, -1, true, NULL, 0) == 0 && vlm_tokenizer_text(t, 32000, NULL) == NULL);
    char b[8];
    CHECK(vlm_tokenizer_piece(t, 1, false, b, sizeof(b)) == 0); /* control, special = false */
    CHECK(vlm_tokenizer_piece(t, 13, true, b, sizeof(b)) == 1 && b[0] == '\n'); /* <0x0A> */
    vlm_tokenizer_destroy(&t);

    /* Phi-3: </s> is user-defined, so it is split out even without
     * parse_special, and (general.name "Phi3") strips spaces on its right. */
    snprintf(path, sizeof(path), "%s/ggml-vocab-phi-3.gguf", PEER_DIR);
    t = load_path(path);
    REQUIRE(t);
    CHECK(vlm_tokenizer_eos(t) == 32000 && vlm_tokenizer_is_eog(t, 32000));
    CHECK(vlm_tokenizer_is_eog(t, 32007) && vlm_tokenizer_is_control(t, 32007)); /* <|end|> */
    s = "a</s>   b";
    CHECK(vlm_tokenizer_encode(t, s, strlen(s), false, false, &ids, &n, &err) == 0);
    CHECK(vlm_tokenizer_encode(t, "a", 1, false, false, &ids2, &n2, &err) == 0);
    /* "a" + </s> + "▁b": the spaces are gone, and the text after a special
     * token gets the space prefix. */
    CHECK(n == n2 + 2 && ids[n2] == 2 && memcmp(ids, ids2, n2 * sizeof(int32_t)) == 0);
    if (n == n2 + 2) {
        size_t tl;
        const char *tx = vlm_tokenizer_text(t, ids[n - 1], &tl);
        CHECK(tl == 4 && memcmp(tx, "\xe2\x96\x81" "b", 4) == 0, "'%.*s'", (int)tl, tx);
    }
    free(ids);
    free(ids2);
    s = "<|user|>\nhi<|end|>\n<|assistant|>";
    CHECK(vlm_tokenizer_encode(t, s, strlen(s), true, true, &ids, &n, &err) == 0);
    CHECK(n >= 5 && ids[0] == 1 && ids[1] == 32010 && ids[n - 1] == 32001, "chat markup");
    free(ids);
    vlm_tokenizer_destroy(&t);

    /* GPT-2: <|endoftext|> is control (and EOG); no BOS is added. */
    snprintf(path, sizeof(path), "%s/ggml-vocab-gpt-2.gguf", PEER_DIR);
    t = load_path(path);
    REQUIRE(t);
    CHECK(vlm_tokenizer_kind(t) == VLM_TOKENIZER_BPE && !vlm_tokenizer_add_bos(t));
    CHECK(vlm_tokenizer_is_eog(t, 50256) && vlm_tokenizer_is_control(t, 50256));
    s = "Hi<|endoftext|>there";
    CHECK(vlm_tokenizer_encode(t, s, strlen(s), true, true, &ids, &n, &err) == 0);
    CHECK(n == 3 && ids[1] == 50256, "n=%zu", n);
    free(ids);
    CHECK(vlm_tokenizer_encode(t, s, strlen(s), true, false, &ids, &n, &err) == 0);
    CHECK(n > 3);
    for (size_t i = 0; i < n; i++) CHECK(ids[i] != 50256);
    out = NULL;
    CHECK(vlm_tokenizer_decode(t, ids, n, false, false, &out, NULL, &err) == 0);
    CHECK(out && strcmp(out, s) == 0, "'%s'", out);
    free(out);
    free(ids);
    /* clean_up_tokenization_spaces on gpt-2 */
    s = "Hello , world ! It 's me . Don 't";
    CHECK(vlm_tokenizer_encode(t, s, strlen(s), false, false, &ids, &n, &err) == 0);
    CHECK(vlm_tokenizer_decode(t, ids, n, false, false, &out, NULL, &err) == 0);
    CHECK(out && strcmp(out, "Hello, world! It's me. Don 't") == 0, "'%s'", out);
    free(out);
    free(ids);
    vlm_tokenizer_destroy(&t);

    /* deepseek-llm: BOS added, user-defined single characters split out. */
    snprintf(path, sizeof(path), "%s/ggml-vocab-deepseek-llm.gguf", PEER_DIR);
    t = load_path(path);
    REQUIRE(t);
    CHECK(vlm_tokenizer_add_bos(t) && vlm_tokenizer_bos(t) == 100000 && vlm_tokenizer_eos(t) == 100001);
    CHECK(vlm_tokenizer_eot(t) == 100001 && vlm_tokenizer_is_eog(t, 100001));
    s = "ø";
    CHECK(vlm_tokenizer_encode(t, s, strlen(s), true, false, &ids, &n, &err) == 0);
    CHECK(n == 2 && ids[0] == 100000 && ids[1] == 100002, "n=%zu", n);
    free(ids);
    vlm_tokenizer_destroy(&t);
}

/* Invalid UTF-8 must tokenize without crashing, as llama.cpp does: SPM falls
 * back to byte tokens (so the bytes come back), BPE sees U+FFFD. SPM cuts
 * symbols by the lead byte's length after escaping spaces, so a truncated
 * sequence right before a space swallows part of the U+2581 and the bytes
 * come back as "\xc3\xe2\x96\x81", not "\xc3 " (as in llama.cpp). */
static void test_invalid_utf8(void) {
    if (!peer_present()) SKIP("%s is absent", PEER_DIR);
    static const char bad[] = "a\xff\xfe-b\xc3x\xe2\x82y\xf0\x9f\x98z \x80\x80 c\xc0\xaf \xed\xa0\x80 \xf7\xbf\xbf\xbf z\xe2";
    for (size_t v = 0; v < N_PEER; v++) {
        char path[512];
        snprintf(path, sizeof(path), "%s/ggml-vocab-%s.gguf", PEER_DIR, PEER_VOCABS[v]);
        vlm_tokenizer_t *t = load_path(path);
        REQUIRE(t);
        int32_t *ids = NULL;
        size_t n = 0;
        vlm_error_t err;
        CHECK(vlm_tokenizer_encode(t, bad, sizeof(bad) - 1, false, true, &ids, &n, &err) == 0, "%s", err.msg);
        CHECK(n > 5);
        char *out = NULL;
        size_t len = 0;
        CHECK(vlm_tokenizer_decode(t, ids, n, false, true, &out, &len, &err) == 0);
        if (vlm_tokenizer_kind(t) == VLM_TOKENIZER_SPM)
            CHECK(len == sizeof(bad) - 1 && memcmp(out, bad, len) == 0, "%s: bytes survive", PEER_VOCABS[v]);
        else
            CHECK(strstr(out, "\xef\xbf\xbd") != NULL, "%s: U+FFFD", PEER_VOCABS[v]);
        free(out);
        free(ids);
        if (vlm_tokenizer_kind(t) == VLM_TOKENIZER_SPM) {
            CHECK(vlm_tokenizer_encode(t, "b\xc3 c", 4, false, false, &ids, &n, &err) == 0);
            CHECK(vlm_tokenizer_decode(t, ids, n, false, false, &out, &len, &err) == 0);
            CHECK(len == 6 && memcmp(out, "b\xc3\xe2\x96\x81" "c", 6) == 0, "'%s'", out);
            free(out);
            free(ids);
        }
        vlm_tokenizer_destroy(&t);
    }
}

/* ==== Synthetic vocabs ==== */

/* A tiny SentencePiece vocab: byte tokens, a few merges by score, a control
 * token and a user-defined token. */
static vlm_gguf_writer_t *tiny_spm(void) {
    static const char *const toks[] = { "<unk>", "<s>", "</s>", "<0x41>", "<0x20>", "\xe2\x96\x81", "a", "b",
                                        "ab", "\xe2\x96\x81" "ab", "<|u|>", "\xe2\x96\x81" "a", "<0xC3>", "<0xA9>" };
    static const int32_t types[] = { 2, 3, 3, 6, 6, 1, 1, 1, 1, 1, 4, 1, 6, 6 };
    static const float scores[] = { 0, 0, 0, 0, 0, -1, -2, -2, -1, -0.5f, 0, -3, 0, 0 };
    vlm_gguf_writer_t *w = vlm_gguf_writer_new();
    vlm_gguf_writer_set_str(w, "general.architecture", "llama");
    vlm_gguf_writer_set_str(w, "tokenizer.ggml.model", "llama");
    vlm_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, 14);
    vlm_gguf_writer_set_arr(w, "tokenizer.ggml.token_type", VLM_GGUF_TYPE_INT32, types, 14);
    vlm_gguf_writer_set_arr(w, "tokenizer.ggml.scores", VLM_GGUF_TYPE_FLOAT32, scores, 14);
    return w;
}

static bool encode_is(const vlm_tokenizer_t *t, const char *s, bool add, bool parse, const int32_t *want, size_t nw) {
    int32_t *ids = NULL;
    size_t n = 0;
    vlm_error_t err;
    bool ok = vlm_tokenizer_encode(t, s, strlen(s), add, parse, &ids, &n, &err) == 0 && n == nw &&
              memcmp(ids, want, n * sizeof(int32_t)) == 0;
    if (!ok) {
        fprintf(stderr, "  '%s':\n", s);
        print_ids("got ", ids, n);
        print_ids("want", want, nw);
    }
    free(ids);
    return ok;
}

static void test_synthetic_spm(void) {
    vlm_gguf_writer_t *w = tiny_spm();
    vlm_tokenizer_t *t = NULL;
    vlm_error_t err;
    REQUIRE(load_mem(w, &t, &err) == 0, "%s", err.msg);
    /* "ab" -> "▁ab" (score -0.5 beats "ab" -1 built first): one token. */
    CHECK(encode_is(t, "ab", false, false, (int32_t[]){ 9 }, 1));
    CHECK(encode_is(t, "ab", true, false, (int32_t[]){ 1, 9 }, 2));
    /* "é" has no token: byte fallback to <0xC3> <0xA9>; "A" to <0x41>. */
    CHECK(encode_is(t, "\xc3\xa9" "A", false, false, (int32_t[]){ 5, 12, 13, 3 }, 4));
    /* The user-defined token is split out without parse_special; the text
     * after it gets a space prefix again. */
    CHECK(encode_is(t, "a<|u|>b", false, false, (int32_t[]){ 11, 10, 5, 7 }, 4));
    /* <s> is only special with parse_special. */
    CHECK(encode_is(t, "<s>a", false, true, (int32_t[]){ 1, 11 }, 2));
    /* No space prefix when the key says so. */
    vlm_tokenizer_destroy(&t);
    vlm_gguf_writer_set_bool(w, "tokenizer.ggml.add_space_prefix", false);
    vlm_gguf_writer_set_bool(w, "tokenizer.ggml.add_eos_token", true);
    REQUIRE(load_mem(w, &t, &err) == 0, "%s", err.msg);
    CHECK(encode_is(t, "ab", true, false, (int32_t[]){ 1, 8, 2 }, 3));
    char *out = NULL;
    CHECK(vlm_tokenizer_decode(t, (int32_t[]){ 1, 9, 2 }, 3, true, false, &out, NULL, &err) == 0);
    CHECK(out && strcmp(out, " ab") == 0, "'%s'", out);
    free(out);
    vlm_tokenizer_destroy(&t);
    vlm_gguf_writer_destroy(&w);
}

/* A tiny byte-level BPE vocab with an LSTRIP token via jina-v2-de. */
static void test_synthetic_bpe(void) {
    /* Byte-encoded: 'Ġ' (U+0120) stands for ' '. */
    static const char *const toks[] = { "h", "i", "Ġ", "hi", "Ġhi", "<mask>", "!", "<|endoftext|>" };
    static const char *const merges[] = { "h i", "Ġ hi" };
    vlm_gguf_writer_t *w = vlm_gguf_writer_new();
    vlm_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2");
    vlm_gguf_writer_set_str(w, "tokenizer.ggml.pre", "jina-v2-de");
    vlm_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, 8);
    vlm_gguf_writer_set_arr(w, "tokenizer.ggml.token_type", VLM_GGUF_TYPE_INT32,
                            (int32_t[]){ 1, 1, 1, 1, 1, 4, 1, 1 }, 8);
    vlm_gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", merges, NULL, 2);
    vlm_tokenizer_t *t = NULL;
    vlm_error_t err;
    REQUIRE(load_mem(w, &t, &err) == 0, "%s", err.msg);
    /* No bos/eos keys: the BPE default id 11 is outside this vocab. */
    CHECK(vlm_tokenizer_bos(t) == -1 && vlm_tokenizer_eos(t) == -1);
    CHECK(encode_is(t, "hi hi!", true, false, (int32_t[]){ 3, 4, 6 }, 3));
    /* <mask> eats the spaces on its left. */
    CHECK(encode_is(t, "hi   <mask>hi", false, false, (int32_t[]){ 3, 5, 3 }, 3));
    /* <|endoftext|> was a normal token: llama.cpp makes it control + EOG. */
    CHECK(vlm_tokenizer_is_control(t, 7) && vlm_tokenizer_is_eog(t, 7));
    CHECK(encode_is(t, "hi<|endoftext|>", false, true, (int32_t[]){ 3, 7 }, 2));
    char buf[16];
    CHECK(vlm_tokenizer_piece(t, 4, false, buf, sizeof(buf)) == 3 && memcmp(buf, " hi", 3) == 0);
    vlm_tokenizer_destroy(&t);
    vlm_gguf_writer_destroy(&w);
}

/* Broken or unsupported vocab metadata gives an error naming the key. */
static void test_broken_vocab(void) {
    struct {
        const char *what;
        int code;
        const char *key;
    } cases[] = {
        { "no model", VLM_ERR_MISSING_KEY, "tokenizer.ggml.model" },
        { "model bert", VLM_ERR_UNSUPPORTED, "tokenizer.ggml.model" },
        { "no tokens", VLM_ERR_MISSING_KEY, "tokenizer.ggml.tokens" },
        { "tokens not strings", VLM_ERR_TYPE, "tokenizer.ggml.tokens" },
        { "short scores", VLM_ERR_SHAPE, "tokenizer.ggml.scores" },
        { "long token_type", VLM_ERR_SHAPE, "tokenizer.ggml.token_type" },
        { "bpe without merges", VLM_ERR_MISSING_KEY, "tokenizer.ggml.merges" },
        { "unknown pre", VLM_ERR_UNSUPPORTED, "tokenizer.ggml.pre" },
        { "duplicate token", VLM_ERR_FORMAT, "tokenizer.ggml.tokens" },
        { "add_bos not bool", VLM_ERR_TYPE, "tokenizer.ggml.add_bos_token" },
        { "empty tokens", VLM_ERR_FORMAT, "tokenizer.ggml.tokens" },
    };
    static const char *const toks[] = { "<unk>", "<s>", "</s>", "a" };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        vlm_gguf_writer_t *w = vlm_gguf_writer_new();
        const char *model = i == 1 ? "bert" : (i == 6 || i == 7) ? "gpt2" : "llama";
        if (i != 0) vlm_gguf_writer_set_str(w, "tokenizer.ggml.model", model);
        if (i == 7) vlm_gguf_writer_set_str(w, "tokenizer.ggml.pre", "no-such-pre");
        if (i == 7) vlm_gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", toks, NULL, 0);
        if (i == 3) vlm_gguf_writer_set_arr(w, "tokenizer.ggml.tokens", VLM_GGUF_TYPE_INT32, (int32_t[]){ 1, 2 }, 2);
        else if (i == 8)
            vlm_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", (const char *const[]){ "a", "b", "a" }, NULL, 3);
        else if (i == 10) vlm_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, 0);
        else if (i != 2) vlm_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, 4);
        if (i == 4) vlm_gguf_writer_set_arr(w, "tokenizer.ggml.scores", VLM_GGUF_TYPE_FLOAT32, (float[]){ 0, 0, 0 }, 3);
        if (i == 5)
            vlm_gguf_writer_set_arr(w, "tokenizer.ggml.token_type", VLM_GGUF_TYPE_INT32, (int32_t[]){ 1, 1, 1, 1, 1 }, 5);
        if (i == 9) vlm_gguf_writer_set_u32(w, "tokenizer.ggml.add_bos_token", 1);
        vlm_tokenizer_t *t = NULL;
        vlm_error_t err;
        int rc = load_mem(w, &t, &err);
        CHECK(rc == cases[i].code && t == NULL, "%s: rc %d (%s)", cases[i].what, rc, err.msg);
        CHECK(strstr(err.msg, cases[i].key) != NULL, "%s: '%s' does not name %s", cases[i].what, err.msg, cases[i].key);
        vlm_tokenizer_destroy(&t);
        vlm_gguf_writer_destroy(&w);
    }
}

/* ==== Speed ==== */

/* Tokenizes a ~4 KB prompt (parse_special, with BOS) with the largest vocabs
 * at hand: deepseek-llm's 102k BPE vocab and the 32k LLaMA SentencePiece
 * vocab from the peer folder, else the golden SPM vocab. */
static void time_vocab(const char *path) {
    double t0 = now_ms();
    vlm_tokenizer_t *t = load_path(path);
    double t_load = now_ms() - t0;
    REQUIRE(t);
    static const char para[] =
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.\nUSER: Describe the image in detail, "
        "including colours (red, green, blue), numbers like 3.14159 and 1234567, and ünïcödé text: 日本語. ";
    char text[4200];
    size_t len = 0;
    while (len + sizeof(para) - 1 < sizeof(text)) {
        memcpy(text + len, para, sizeof(para) - 1);
        len += sizeof(para) - 1;
    }
    double best = 1e9;
    size_t n = 0;
    for (int rep = 0; rep < 5; rep++) {
        int32_t *ids = NULL;
        vlm_error_t err;
        t0 = now_ms();
        int rc = vlm_tokenizer_encode(t, text, len, true, true, &ids, &n, &err);
        double dt = now_ms() - t0;
        CHECK(rc == 0);
        if (dt < best) best = dt;
        free(ids);
    }
    fprintf(stderr, "  %s: n_vocab %d, load %.1f ms; %zu bytes -> %zu tokens in %.3f ms\n", path,
            vlm_tokenizer_n_vocab(t), t_load, len, n, best);
    CHECK(best < 50.0, "tokenizing 4 KB took %.3f ms", best); /* generous: sanitizer builds are slow */
    vlm_tokenizer_destroy(&t);
}

static void test_speed(void) {
    char path[512];
    if (peer_present()) {
        snprintf(path, sizeof(path), "%s/ggml-vocab-deepseek-llm.gguf", PEER_DIR);
        time_vocab(path);
        snprintf(path, sizeof(path), "%s/ggml-vocab-llama-spm.gguf", PEER_DIR);
        time_vocab(path);
    } else {
        snprintf(path, sizeof(path), "%s/golden/small-q8_0/text.gguf", VLM_TEST_DATA);
        time_vocab(path);
    }
}

int main(void) {
    RUN(test_golden_cases);
    RUN(test_peer_vectors);
    RUN(test_round_trip);
    RUN(test_special_tokens);
    RUN(test_invalid_utf8);
    RUN(test_synthetic_spm);
    RUN(test_synthetic_bpe);
    RUN(test_broken_vocab);
    RUN(test_speed);
    return harness_report();
}
