/* tests/test_gguf.c - the GGUF reader and writer, the dtype table, and the
 * f16/bf16 conversions.
 *
 * What is checked, and against what:
 *  - every golden GGUF (tests/data/golden/<case>/{text,mmproj}.gguf) opens,
 *    and its metadata and every tensor's type and shape equal case.json;
 *  - llama.cpp's vocab-only GGUFs (../shared/peer, skipped when absent) give
 *    the published vocabulary sizes;
 *  - truncated, bit-flipped and overwritten files (in exact-size heap copies,
 *    so AddressSanitizer sees any overread) fail cleanly or stay in bounds;
 *  - hand-built files trigger each error with the right code and a message
 *    that names the key or tensor;
 *  - the writer reproduces the golden files byte for byte and round-trips
 *    every value type;
 *  - fp16 conversions equal the F16C instructions bit for bit, bf16 equals
 *    an independent nearest-even rounding;
 *  - vlm_gguf_release_range drops exactly the whole pages inside a range
 *    from the process's resident set (the mapping's Rss in
 *    /proc/self/smaps), the data reads back from the file unchanged, and
 *    ranges outside the mapping are rejected.
 */
#include <dirent.h>
#include <immintrin.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/dtype.h"
#include "core/error.h"
#include "core/gguf.h"
#include "core/gguf_write.h"
#include "tests/harness.h"

#define GOLDEN_DIR VLM_TEST_DATA "/golden"
#define VOCAB_DIR VLM_SHARED_DIR "/peer/llama.cpp-vocab"

/* ==== Helpers ==== */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng_next(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static bool contains(const char *haystack, const char *needle) {
    return strstr(haystack, needle) != NULL;
}

/* Lists the golden case folders (those with a case.json); returns the count. */
static int list_cases(char names[][64], int max) {
    DIR *d = opendir(GOLDEN_DIR);
    if (!d) return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && n < max) {
        if (e->d_name[0] == '.' || strlen(e->d_name) >= 64) continue;
        char path[512];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s/case.json", GOLDEN_DIR, e->d_name);
        if (stat(path, &st) == 0) snprintf(names[n++], 64, "%.63s", e->d_name);
    }
    closedir(d);
    return n;
}

/* A growable byte buffer for building GGUF images by hand. */
typedef struct {
    uint8_t *p;
    size_t len, cap;
} buf_t;

static void put(buf_t *b, const void *data, size_t n) {
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        if (!b->p) abort();
    }
    if (n) memcpy(b->p + b->len, data, n);
    b->len += n;
}
static void put_u8(buf_t *b, uint8_t v) { put(b, &v, 1); }
static void put_u32(buf_t *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(buf_t *b, uint64_t v) { put(b, &v, 8); }
static void put_str(buf_t *b, const char *s) {
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}
static void put_header(buf_t *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    put(b, "GGUF", 4);
    put_u32(b, version);
    put_u64(b, n_tensors);
    put_u64(b, n_kv);
}
static void put_kv_u32(buf_t *b, const char *key, uint32_t v) {
    put_str(b, key);
    put_u32(b, VLM_GGUF_TYPE_UINT32);
    put_u32(b, v);
}
static void put_kv_str(buf_t *b, const char *key, const char *s) {
    put_str(b, key);
    put_u32(b, VLM_GGUF_TYPE_STRING);
    put_str(b, s);
}
static void put_tinfo(buf_t *b, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type,
                      uint64_t offset) {
    put_str(b, name);
    put_u32(b, n_dims);
    for (uint32_t d = 0; d < n_dims; d++) put_u64(b, ne[d]);
    put_u32(b, type);
    put_u64(b, offset);
}
/* Pads with zeros to the alignment, then appends n_data zero bytes. */
static void put_data(buf_t *b, size_t align, size_t n_data) {
    while (b->len % align) put_u8(b, 0);
    for (size_t i = 0; i < n_data; i++) put_u8(b, 0);
}

/* Opens b in an exact-size heap copy; returns the code and fills err. */
static int open_copy(const buf_t *b, vlm_error_t *err, vlm_gguf_t **out_g, uint8_t **out_copy) {
    uint8_t *copy = malloc(b->len ? b->len : 1);
    if (b->len) memcpy(copy, b->p, b->len);
    vlm_gguf_t *g = NULL;
    int rc = vlm_gguf_open_buffer(copy, b->len, &g, err);
    if (out_g) {
        *out_g = g;
        *out_copy = copy;
    } else {
        vlm_gguf_destroy(&g);
        free(copy);
    }
    return rc;
}

/* Expects b to fail with code and a message holding every needle (NULL-ended). */
#define EXPECT_FAIL(b, code, ...) expect_fail(__LINE__, (b), (code), (const char *[]){ __VA_ARGS__, NULL })
static void expect_fail(int line, const buf_t *b, int code, const char **needles) {
    vlm_error_t err;
    vlm_error_clear(&err);
    int rc = open_copy(b, &err, NULL, NULL);
    CHECK(rc == code, "line %d: got %s (%s), want %s", line, vlm_error_name(rc), err.msg, vlm_error_name(code));
    CHECK(err.code == code, "line %d", line);
    CHECK(contains(err.msg, "<memory>"), "line %d: %s", line, err.msg);
    for (const char **n = needles; *n; n++)
        CHECK(contains(err.msg, *n), "line %d: '%s' not in: %s", line, *n, err.msg);
}

/* ==== (a) golden files against case.json ==== */

static bool is_tokenizer_array(const char *key) {
    return strcmp(key, "tokenizer.ggml.tokens") == 0 || strcmp(key, "tokenizer.ggml.scores") == 0 ||
           strcmp(key, "tokenizer.ggml.token_type") == 0 || strcmp(key, "tokenizer.ggml.merges") == 0;
}

static void check_json_value(const vlm_gguf_t *g, const char *key, json_t *jv, const char *file) {
    vlm_error_t err;
    const vlm_gguf_kv_t *kv = vlm_gguf_find_kv(g, key);
    REQUIRE(kv != NULL, "%s: key %s missing", file, key);
    if (json_is_string(jv)) {
        const char *s;
        size_t len;
        REQUIRE(vlm_gguf_get_str(g, key, &s, &len, &err) == VLM_OK, "%s", err.msg);
        CHECK(len == json_string_length(jv) && memcmp(s, json_string_value(jv), len) == 0, "%s: %s", file, key);
    } else if (json_is_boolean(jv)) {
        bool v;
        REQUIRE(vlm_gguf_get_bool(g, key, &v, &err) == VLM_OK, "%s", err.msg);
        CHECK(v == json_is_true(jv), "%s: %s", file, key);
    } else if (json_is_integer(jv)) {
        int64_t v;
        REQUIRE(vlm_gguf_get_i64(g, key, &v, &err) == VLM_OK, "%s", err.msg);
        CHECK(v == json_integer_value(jv), "%s: %s = %lld, want %lld", file, key, (long long)v,
              (long long)json_integer_value(jv));
        if (v >= 0 && v <= (int64_t)UINT32_MAX) {
            uint32_t u;
            CHECK(vlm_gguf_get_u32(g, key, &u, &err) == VLM_OK && u == (uint32_t)v, "%s: %s", file, key);
        }
    } else if (json_is_real(jv)) {
        float v;
        CHECK(kv->type == VLM_GGUF_TYPE_FLOAT32, "%s: %s", file, key);
        REQUIRE(vlm_gguf_get_f32(g, key, &v, &err) == VLM_OK, "%s", err.msg);
        CHECK(v == (float)json_real_value(jv), "%s: %s = %.9g, want %.9g", file, key, v, json_real_value(jv));
    } else if (json_is_array(jv)) {
        const vlm_gguf_kv_t *arr;
        REQUIRE(vlm_gguf_get_arr(g, key, VLM_GGUF_TYPE_COUNT, &arr, &err) == VLM_OK, "%s", err.msg);
        REQUIRE(arr->arr_n == json_array_size(jv), "%s: %s", file, key);
        for (size_t i = 0; i < json_array_size(jv); i++) {
            json_t *e = json_array_get(jv, i);
            if (json_is_real(e))
                CHECK((float)vlm_gguf_arr_f64(arr, i) == (float)json_real_value(e), "%s: %s[%zu]", file, key, i);
            else if (json_is_integer(e))
                CHECK(vlm_gguf_arr_i64(arr, i) == json_integer_value(e), "%s: %s[%zu]", file, key, i);
            else
                CHECK(0, "%s: %s: unexpected JSON element", file, key);
        }
    } else {
        CHECK(0, "%s: %s: unexpected JSON value", file, key);
    }
}

static void check_golden_model(const char *case_name, const char *which, json_t *root) {
    char path[512], meta_name[64];
    json_t *model = json_object_get(json_object_get(root, "models"), which);
    REQUIRE(model != NULL, "%s: models.%s missing", case_name, which);
    snprintf(path, sizeof path, "%s/%s/%s", GOLDEN_DIR, case_name, json_string_value(json_object_get(model, "file")));
    snprintf(meta_name, sizeof meta_name, "%s_gguf_metadata", which);
    json_t *meta = json_object_get(json_object_get(root, "hparams"), meta_name);
    json_t *tensors = json_object_get(model, "tensors");
    REQUIRE(meta && tensors, "%s", path);

    vlm_gguf_t *g = NULL;
    vlm_error_t err;
    int rc = vlm_gguf_open(path, &g, &err);
    REQUIRE(rc == VLM_OK, "%s: %s", path, err.msg);
    CHECK(strcmp(vlm_gguf_path(g), path) == 0);
    CHECK(vlm_gguf_version(g) == 3);
    CHECK(vlm_gguf_alignment(g) == 32);
    struct stat st;
    CHECK(stat(path, &st) == 0 && vlm_gguf_file_size(g) == (size_t)st.st_size);

    /* Metadata: every key of case.json, with its value; "X (count)" is the
     * length of array X. Every key of the file is in case.json, or is one of
     * the tokenizer arrays that case.json leaves out. */
    const char *key;
    json_t *jv;
    size_t n_json_keys = 0, n_count_keys = 0;
    json_object_foreach(meta, key, jv) {
        n_json_keys++;
        const char *count = strstr(key, " (count)");
        if (count) {
            n_count_keys++;
            char base[256];
            snprintf(base, sizeof base, "%.*s", (int)(count - key), key);
            const vlm_gguf_kv_t *arr;
            CHECK(vlm_gguf_get_arr(g, base, VLM_GGUF_TYPE_STRING, &arr, &err) == VLM_OK &&
                      (json_int_t)arr->arr_n == json_integer_value(jv),
                  "%s: %s", path, key);
        } else {
            check_json_value(g, key, jv, path);
        }
    }
    size_t n_tok_arrays = 0;
    for (size_t i = 0; i < vlm_gguf_n_kv(g); i++) {
        const vlm_gguf_kv_t *kv = vlm_gguf_kv_at(g, i);
        CHECK(vlm_gguf_find_kv(g, kv->key) == kv);
        if (json_object_get(meta, kv->key)) continue;
        CHECK(is_tokenizer_array(kv->key), "%s: key %s not in case.json", path, kv->key);
        n_tok_arrays++;
    }
    CHECK(vlm_gguf_n_kv(g) == n_json_keys - n_count_keys + n_tok_arrays, "%s: %zu keys", path, vlm_gguf_n_kv(g));
    if (strcmp(which, "text") == 0) {
        /* The tokenizer arrays have one entry per token. */
        const vlm_gguf_kv_t *tokens, *scores, *types;
        uint32_t n_vocab;
        REQUIRE(vlm_gguf_get_u32(g, "llama.vocab_size", &n_vocab, &err) == VLM_OK, "%s", err.msg);
        REQUIRE(vlm_gguf_get_arr(g, "tokenizer.ggml.tokens", VLM_GGUF_TYPE_STRING, &tokens, &err) == VLM_OK);
        REQUIRE(vlm_gguf_get_arr(g, "tokenizer.ggml.scores", VLM_GGUF_TYPE_FLOAT32, &scores, &err) == VLM_OK);
        REQUIRE(vlm_gguf_get_arr(g, "tokenizer.ggml.token_type", VLM_GGUF_TYPE_INT32, &types, &err) == VLM_OK);
        CHECK(tokens->arr_n == n_vocab && scores->arr_n == n_vocab && types->arr_n == n_vocab);
        uint64_t len;
        const char *s = vlm_gguf_arr_str(tokens, 1, &len);
        CHECK(len == 3 && memcmp(s, "<s>", 3) == 0);
        s = vlm_gguf_arr_str(tokens, 2, &len);
        CHECK(len == 4 && memcmp(s, "</s>", 4) == 0);
        CHECK(vlm_gguf_arr_i64(types, 0) == 2 && vlm_gguf_arr_i64(types, 1) == 3); /* UNKNOWN, CONTROL */
    }

    /* Tensors: same set, type and shape as case.json; data aligned and inside. */
    CHECK(vlm_gguf_n_tensors(g) == json_object_size(tensors), "%s: %zu tensors, want %zu", path,
          vlm_gguf_n_tensors(g), json_object_size(tensors));
    json_object_foreach(tensors, key, jv) {
        const vlm_gguf_tensor_t *t = vlm_gguf_find_tensor(g, key);
        if (!t) {
            CHECK(0, "%s: tensor %s missing", path, key);
            continue;
        }
        const char *type = json_string_value(json_object_get(jv, "type"));
        json_t *ne = json_object_get(jv, "ne");
        CHECK(strcmp(vlm_dtype_name(t->type), type) == 0, "%s: %s is %s, want %s", path, key,
              vlm_dtype_name(t->type), type);
        CHECK(t->n_dims == json_array_size(ne), "%s: %s", path, key);
        int64_t want[VLM_GGUF_MAX_DIMS] = { 1, 1, 1, 1 };
        for (size_t d = 0; d < json_array_size(ne) && d < VLM_GGUF_MAX_DIMS; d++)
            want[d] = json_integer_value(json_array_get(ne, d));
        for (int d = 0; d < VLM_GGUF_MAX_DIMS; d++) CHECK(t->ne[d] == want[d], "%s: %s ne[%d]", path, key, d);
        uint64_t nbytes = vlm_dtype_row_size(t->type, t->ne[0]) * (uint64_t)(t->ne[1] * t->ne[2] * t->ne[3]);
        CHECK(t->nbytes == nbytes, "%s: %s", path, key);
        CHECK(t->offset % 32 == 0);
        CHECK((const uint8_t *)t->data == (const uint8_t *)vlm_gguf_tensor_at(g, 0)->data - vlm_gguf_tensor_at(g, 0)->offset + t->offset);
        CHECK(vlm_gguf_data_offset(g) + t->offset + t->nbytes <= vlm_gguf_file_size(g));
        const vlm_gguf_tensor_t *e = NULL;
        CHECK(vlm_gguf_expect_tensor(g, key, (int)t->n_dims, want, 1ull << t->type, &e, &err) == VLM_OK &&
                  e == t, "%s", err.msg);
    }
    vlm_gguf_destroy(&g);
    CHECK(g == NULL);
}

static void test_golden_files(void) {
    char cases[16][64];
    int n = list_cases(cases, 16);
    REQUIRE(n >= 4, "expected the 4 golden cases under %s", GOLDEN_DIR);
    for (int c = 0; c < n; c++) {
        char path[512];
        json_error_t jerr;
        snprintf(path, sizeof path, "%s/%.63s/case.json", GOLDEN_DIR, cases[c]);
        json_t *root = json_load_file(path, 0, &jerr);
        if (!root) {
            CHECK(0, "%s: %s", path, jerr.text);
            continue;
        }
        check_golden_model(cases[c], "text", root);
        check_golden_model(cases[c], "mmproj", root);
        json_decref(root);
    }
}

/* ==== (b) llama.cpp's vocab-only files ==== */

static void test_peer_vocab_files(void) {
    static const struct {
        const char *file;
        uint64_t n_tokens, n_merges;
        const char *first_token;
    } vocabs[] = {
        { "ggml-vocab-llama-spm.gguf", 32000, 0, "<unk>" },
        { "ggml-vocab-phi-3.gguf", 32064, 0, "<unk>" },
        { "ggml-vocab-gpt-2.gguf", 50257, 50000, "!" },
        { "ggml-vocab-deepseek-llm.gguf", 102400, 99757, "!" },
    };
    if (access(VOCAB_DIR, R_OK) != 0) SKIP("%s absent", VOCAB_DIR);
    for (size_t i = 0; i < sizeof vocabs / sizeof vocabs[0]; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/%s", VOCAB_DIR, vocabs[i].file);
        vlm_gguf_t *g = NULL;
        vlm_error_t err;
        int rc = vlm_gguf_open(path, &g, &err);
        CHECK(rc == VLM_OK, "%s", err.msg);
        if (rc) continue;
        CHECK(vlm_gguf_n_tensors(g) == 0);
        const vlm_gguf_kv_t *tokens, *merges;
        REQUIRE(vlm_gguf_get_arr(g, "tokenizer.ggml.tokens", VLM_GGUF_TYPE_STRING, &tokens, &err) == VLM_OK,
                "%s", err.msg);
        CHECK(tokens->arr_n == vocabs[i].n_tokens, "%s: %llu tokens", path, (unsigned long long)tokens->arr_n);
        uint64_t len;
        const char *s = vlm_gguf_arr_str(tokens, 0, &len);
        CHECK(len == strlen(vocabs[i].first_token) && memcmp(s, vocabs[i].first_token, len) == 0, "%s", path);
        /* Touch every token so ASan would see an out-of-bounds element. */
        uint64_t total = 0;
        for (uint64_t t = 0; t < tokens->arr_n; t++) {
            s = vlm_gguf_arr_str(tokens, t, &len);
            if (len) total += (uint8_t)s[0] + (uint8_t)s[len - 1];
        }
        CHECK(total > 0);
        if (vocabs[i].n_merges) {
            CHECK(vlm_gguf_get_arr(g, "tokenizer.ggml.merges", VLM_GGUF_TYPE_STRING, &merges, &err) == VLM_OK &&
                      merges->arr_n == vocabs[i].n_merges, "%s", path);
        }
        uint32_t vocab_size;
        char key[128];
        const char *arch;
        size_t arch_len;
        REQUIRE(vlm_gguf_get_str(g, "general.architecture", &arch, &arch_len, &err) == VLM_OK);
        snprintf(key, sizeof key, "%.*s.vocab_size", (int)arch_len, arch);
        if (vlm_gguf_get_u32(g, key, &vocab_size, &err) == VLM_OK) CHECK(vocab_size == tokens->arr_n, "%s", path);
        if (strcmp(vocabs[i].file, "ggml-vocab-gpt-2.gguf") == 0) {
            s = vlm_gguf_arr_str(tokens, 50256, &len);
            CHECK(len == 13 && memcmp(s, "<|endoftext|>", 13) == 0);
        }
        vlm_gguf_destroy(&g);
    }
}

/* ==== (c) truncation, (d) corruption ==== */

/* After a successful open of buf[0..size), checks every pointer the reader
 * hands out lies inside the buffer, touching the bytes so ASan sees them. */
static void check_in_bounds(const vlm_gguf_t *g, const uint8_t *buf, size_t size, const char *what) {
    const uint8_t *end = buf + size;
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < vlm_gguf_n_tensors(g); i++) {
        const vlm_gguf_tensor_t *t = vlm_gguf_tensor_at(g, i);
        const uint8_t *d = t->data;
        CHECK(d >= buf && t->nbytes > 0 && t->nbytes <= (uint64_t)(end - d), "%s: tensor %zu", what, i);
        if (d >= buf && t->nbytes <= (uint64_t)(end - d)) sink ^= d[0] ^ d[t->nbytes - 1];
        CHECK(vlm_gguf_find_tensor(g, t->name) == t, "%s", what);
    }
    for (size_t i = 0; i < vlm_gguf_n_kv(g); i++) {
        const vlm_gguf_kv_t *kv = vlm_gguf_kv_at(g, i);
        CHECK(vlm_gguf_find_kv(g, kv->key) == kv, "%s", what);
        if (kv->type == VLM_GGUF_TYPE_STRING) {
            const uint8_t *s = (const uint8_t *)kv->str;
            CHECK(s >= buf && kv->str_len <= (uint64_t)(end - s), "%s: key %s", what, kv->key);
            if (kv->str_len) sink ^= s[kv->str_len - 1];
        } else if (kv->type == VLM_GGUF_TYPE_ARRAY && kv->arr_type == VLM_GGUF_TYPE_STRING) {
            for (uint64_t e = 0; e < kv->arr_n; e++) {
                uint64_t len;
                const uint8_t *s = (const uint8_t *)vlm_gguf_arr_str(kv, e, &len);
                CHECK(s >= buf && len <= (uint64_t)(end - s), "%s: key %s[%llu]", what, kv->key,
                      (unsigned long long)e);
                if (len) sink ^= s[len - 1];
            }
        } else if (kv->type == VLM_GGUF_TYPE_ARRAY) {
            for (uint64_t e = 0; e < kv->arr_n; e++) sink ^= (uint8_t)vlm_gguf_arr_f64(kv, e);
            CHECK(kv->arr_data >= buf && kv->arr_data <= end, "%s: key %s", what, kv->key);
        }
    }
    (void)sink;
}

static void truncate_file(const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/micro-f32/%s", GOLDEN_DIR, name);
    size_t size;
    uint8_t *full = harness_read_file(path, &size);
    REQUIRE(full != NULL, "%s", path);
    vlm_gguf_t *g = NULL;
    vlm_error_t err;
    REQUIRE(vlm_gguf_open_buffer(full, size, &g, &err) == VLM_OK, "%s", err.msg);
    size_t data_off = vlm_gguf_data_offset(g);
    vlm_gguf_destroy(&g);
    REQUIRE(data_off > 1000 && data_off < size);

    /* Every length through the header, metadata and infos, then a few
     * hundred inside the data: each must fail with a message, not crash. */
    int n_fail = 0, n_tried = 0;
    for (size_t pass = 0; pass < 2; pass++) {
        size_t n = pass == 0 ? data_off + 1 : 300;
        for (size_t k = 0; k < n; k++) {
            size_t len = pass == 0 ? k : data_off + 1 + (size_t)(rng_next() % (size - data_off - 1));
            uint8_t *copy = len ? malloc(len) : NULL;
            if (len) memcpy(copy, full, len);
            vlm_error_clear(&err);
            int rc = vlm_gguf_open_buffer(copy, len, &g, &err);
            n_tried++;
            if (rc == VLM_OK) {
                CHECK(0, "%s truncated to %zu bytes opened", name, len);
                vlm_gguf_destroy(&g);
            } else {
                n_fail++;
                CHECK(g == NULL && err.code == rc && contains(err.msg, "<memory>: "), "%s", err.msg);
                CHECK(rc == VLM_ERR_TRUNCATED, "%s at %zu: %s", name, len, err.msg);
            }
            free(copy);
        }
    }
    CHECK(n_fail == n_tried);
    free(full);
}

static void test_truncated_files(void) {
    truncate_file("text.gguf");
    truncate_file("mmproj.gguf");
}

static void corrupt_file(const char *name, int n_flips, int n_bytes, int n_words) {
    char path[512];
    snprintf(path, sizeof path, "%s/micro-f32/%s", GOLDEN_DIR, name);
    size_t size;
    uint8_t *buf = harness_read_file(path, &size); /* exactly size bytes */
    REQUIRE(buf != NULL, "%s", path);
    vlm_gguf_t *g = NULL;
    vlm_error_t err;
    REQUIRE(vlm_gguf_open_buffer(buf, size, &g, &err) == VLM_OK, "%s", err.msg);
    size_t meta_end = vlm_gguf_data_offset(g);
    vlm_gguf_destroy(&g);

    int n_ok = 0, n_err = 0;
    int total = n_flips + n_bytes + n_words;
    for (int k = 0; k < total; k++) {
        size_t at = (size_t)(rng_next() % meta_end);
        uint8_t saved[8];
        size_t n_saved = k < n_flips + n_bytes ? 1 : (meta_end - at < 8 ? meta_end - at : 8);
        memcpy(saved, buf + at, n_saved);
        if (k < n_flips) {
            buf[at] ^= (uint8_t)(1u << (rng_next() % 8));
        } else if (k < n_flips + n_bytes) {
            buf[at] = (uint8_t)rng_next();
        } else {
            /* A random little-endian word: small, large or huge lengths. */
            uint64_t v = rng_next() >> (rng_next() % 64);
            memcpy(buf + at, &v, n_saved);
        }
        vlm_error_clear(&err);
        int rc = vlm_gguf_open_buffer(buf, size, &g, &err);
        if (rc == VLM_OK) {
            n_ok++;
            check_in_bounds(g, buf, size, name);
            vlm_gguf_destroy(&g);
        } else {
            n_err++;
            CHECK(g == NULL && err.code == rc && rc < 0 && contains(err.msg, "<memory>: ") && strlen(err.msg) > 20,
                  "%s", err.msg);
        }
        memcpy(buf + at, saved, n_saved);
    }
    fprintf(stderr, "  %s: %d corruptions, %d opened (in bounds), %d rejected\n", name, total, n_ok, n_err);
    CHECK(n_err > total / 10 && n_ok > 0);
    free(buf);
}

static void test_corrupted_files(void) {
    rng_state = 12345;
    corrupt_file("text.gguf", 2500, 1500, 1000);
    corrupt_file("mmproj.gguf", 2500, 1500, 1000);
}

/* ==== (e) hand-built files, one per error ==== */

/* A valid file: two pairs, one F32 tensor [8, 2] and one Q8_0 [32]. */
static void build_valid(buf_t *b, uint32_t version) {
    put_header(b, version, 2, 2);
    put_kv_str(b, "general.architecture", "llama");
    put_kv_u32(b, "llama.block_count", 1);
    put_tinfo(b, "a.weight", 2, (uint64_t[]){ 8, 2 }, VLM_DTYPE_F32, 0);
    put_tinfo(b, "b.weight", 1, (uint64_t[]){ 32 }, VLM_DTYPE_Q8_0, 64);
    put_data(b, 32, 64 + 34);
}

static void test_crafted_errors(void) {
    buf_t b = { 0 };
    vlm_gguf_t *g;
    uint8_t *copy;
    vlm_error_t err;

    /* The baseline opens, in v2 and v3. */
    for (uint32_t v = 2; v <= 3; v++) {
        b.len = 0;
        build_valid(&b, v);
        REQUIRE(open_copy(&b, &err, &g, &copy) == VLM_OK, "%s", err.msg);
        CHECK(vlm_gguf_version(g) == v && vlm_gguf_n_tensors(g) == 2 && vlm_gguf_n_kv(g) == 2);
        const vlm_gguf_tensor_t *t = vlm_gguf_find_tensor(g, "b.weight");
        CHECK(t && t->nbytes == 34 && t->offset == 64 && t->ne[0] == 32 && t->ne[1] == 1);
        CHECK(vlm_gguf_find_tensor(g, "c.weight") == NULL && vlm_gguf_find_kv(g, "nope") == NULL);
        vlm_gguf_destroy(&g);
        free(copy);
    }

    /* A vocab-only file that ends right after its pairs is valid. */
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_kv_str(&b, "general.name", "x");
    REQUIRE(open_copy(&b, &err, &g, &copy) == VLM_OK, "%s", err.msg);
    CHECK(vlm_gguf_n_tensors(g) == 0 && vlm_gguf_n_kv(g) == 1);
    vlm_gguf_destroy(&g);
    free(copy);

    /* Bad magic. */
    b.len = 0;
    build_valid(&b, 3);
    memcpy(b.p, "GGML", 4);
    EXPECT_FAIL(&b, VLM_ERR_FORMAT, "not a GGUF file");

    /* Versions 1 and 4 (and 0). */
    for (uint32_t v = 0; v <= 4; v += 1) {
        if (v == 2 || v == 3) continue;
        b.len = 0;
        build_valid(&b, 3);
        memcpy(b.p + 4, &v, 4);
        EXPECT_FAIL(&b, VLM_ERR_VERSION, "version");
    }
    b.len = 0;
    build_valid(&b, 3);
    memcpy(b.p + 4, "\0\0\0\3", 4);
    EXPECT_FAIL(&b, VLM_ERR_VERSION, "big-endian");

    /* Huge pair and tensor counts are caught before allocating. */
    b.len = 0;
    put_header(&b, 3, 0, 1ull << 60);
    put_kv_str(&b, "general.name", "x");
    EXPECT_FAIL(&b, VLM_ERR_TRUNCATED, "metadata pairs cannot fit");
    b.len = 0;
    put_header(&b, 3, UINT64_MAX, 1);
    put_kv_str(&b, "general.name", "x");
    EXPECT_FAIL(&b, VLM_ERR_TRUNCATED, "tensor infos cannot fit");

    /* A huge string length, in a value and in a key. */
    b.len = 0;
    put_header(&b, 3, 0, 2);
    put_kv_u32(&b, "a.b", 1);
    put_str(&b, "general.name");
    put_u32(&b, VLM_GGUF_TYPE_STRING);
    put_u64(&b, UINT64_MAX - 3);
    put(&b, "abcdefgh", 8);
    EXPECT_FAIL(&b, VLM_ERR_TRUNCATED, "key 'general.name'", "string value");
    b.len = 0;
    put_header(&b, 3, 0, 2);
    put_kv_u32(&b, "a.b", 1);
    put_u64(&b, 1ull << 40);
    put(&b, "abcdefghabcdefghabcdefgh", 24);
    EXPECT_FAIL(&b, VLM_ERR_TRUNCATED, "metadata pair 1", "key");

    /* A nested array. */
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "x.nested");
    put_u32(&b, VLM_GGUF_TYPE_ARRAY);
    put_u32(&b, VLM_GGUF_TYPE_ARRAY);
    put_u64(&b, 1);
    put_u32(&b, VLM_GGUF_TYPE_UINT8);
    put_u64(&b, 1);
    put_u8(&b, 7);
    EXPECT_FAIL(&b, VLM_ERR_UNSUPPORTED, "key 'x.nested'", "nested");

    /* Huge array counts (strings and scalars). */
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "tokenizer.ggml.tokens");
    put_u32(&b, VLM_GGUF_TYPE_ARRAY);
    put_u32(&b, VLM_GGUF_TYPE_STRING);
    put_u64(&b, 1ull << 61);
    put_str(&b, "a");
    EXPECT_FAIL(&b, VLM_ERR_TRUNCATED, "key 'tokenizer.ggml.tokens'", "strings cannot fit");
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "tokenizer.ggml.scores");
    put_u32(&b, VLM_GGUF_TYPE_ARRAY);
    put_u32(&b, VLM_GGUF_TYPE_FLOAT32);
    put_u64(&b, UINT64_MAX / 2);
    put_u32(&b, 0);
    EXPECT_FAIL(&b, VLM_ERR_TRUNCATED, "key 'tokenizer.ggml.scores'");

    /* Unknown value types, scalar and array element. */
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "x.weird");
    put_u32(&b, 13);
    put_u64(&b, 0);
    EXPECT_FAIL(&b, VLM_ERR_FORMAT, "key 'x.weird'", "unknown value type 13");
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "x.weird_arr");
    put_u32(&b, VLM_GGUF_TYPE_ARRAY);
    put_u32(&b, 99);
    put_u64(&b, 1);
    put_u64(&b, 0);
    EXPECT_FAIL(&b, VLM_ERR_FORMAT, "key 'x.weird_arr'", "element type 99");

    /* A key with a NUL byte inside. */
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_u64(&b, 3);
    put(&b, "a\0b", 3);
    put_u32(&b, VLM_GGUF_TYPE_UINT8);
    put_u8(&b, 1);
    EXPECT_FAIL(&b, VLM_ERR_FORMAT, "NUL");

    /* Unknown tensor types: retired (4, 31), past the end (39, 99). */
    static const uint32_t bad_types[] = { 4, 5, 31, 36, 39, 99, 0xffffffffu };
    for (size_t i = 0; i < sizeof bad_types / sizeof bad_types[0]; i++) {
        b.len = 0;
        put_header(&b, 3, 1, 0);
        put_tinfo(&b, "blk.0.attn_q.weight", 1, (uint64_t[]){ 32 }, bad_types[i], 0);
        put_data(&b, 32, 256);
        EXPECT_FAIL(&b, VLM_ERR_TYPE, "tensor 'blk.0.attn_q.weight'", "unknown ggml type");
    }

    /* n_dims 0 and 5. */
    b.len = 0;
    put_header(&b, 3, 1, 0);
    put_tinfo(&b, "t.zero_dims", 0, NULL, VLM_DTYPE_F32, 0);
    put_data(&b, 32, 64);
    EXPECT_FAIL(&b, VLM_ERR_FORMAT, "tensor 't.zero_dims'", "0 dimensions");
    b.len = 0;
    put_header(&b, 3, 1, 0);
    put_tinfo(&b, "t.five_dims", 5, (uint64_t[]){ 1, 1, 1, 1, 1 }, VLM_DTYPE_F32, 0);
    put_data(&b, 32, 64);
    EXPECT_FAIL(&b, VLM_ERR_FORMAT, "tensor 't.five_dims'", "5 dimensions");

    /* Dimensions that are zero or too large, and products that overflow. */
    static const uint64_t bad_shapes[][4] = {
        { 0, 1, 1, 1 },
        { 32, 0, 1, 1 },
        { 1ull << 63, 1, 1, 1 },
        { 1ull << 32, 1ull << 32, 1, 1 },        /* 2^64 elements */
        { 1ull << 31, 1ull << 31, 1ull << 2, 1 }, /* 2^64 elements */
        { 1ull << 20, 1ull << 20, 1ull << 20, 1ull << 20 },
        { 1ull << 61, 1, 1, 1 },                 /* 2^61 elements of 4 bytes: 2^63 bytes */
    };
    for (size_t i = 0; i < sizeof bad_shapes / sizeof bad_shapes[0]; i++) {
        b.len = 0;
        put_header(&b, 3, 1, 0);
        put_tinfo(&b, "t.huge", 4, bad_shapes[i], VLM_DTYPE_F32, 0);
        put_data(&b, 32, 64);
        EXPECT_FAIL(&b, VLM_ERR_OVERFLOW, "tensor 't.huge'");
    }

    /* Row length not a multiple of the block size. */
    b.len = 0;
    put_header(&b, 3, 1, 0);
    put_tinfo(&b, "blk.1.ffn_down.weight", 2, (uint64_t[]){ 48, 2 }, VLM_DTYPE_Q4_0, 0);
    put_data(&b, 32, 256);
    EXPECT_FAIL(&b, VLM_ERR_SHAPE, "tensor 'blk.1.ffn_down.weight'", "not a multiple of the Q4_0 block size 32");
    b.len = 0;
    put_header(&b, 3, 1, 0);
    put_tinfo(&b, "blk.1.ffn_down.weight", 2, (uint64_t[]){ 704, 2 }, VLM_DTYPE_Q4_K, 0);
    put_data(&b, 32, 2048);
    EXPECT_FAIL(&b, VLM_ERR_SHAPE, "tensor 'blk.1.ffn_down.weight'", "704", "Q4_K");

    /* A misaligned offset. */
    b.len = 0;
    put_header(&b, 3, 2, 0);
    put_tinfo(&b, "a", 1, (uint64_t[]){ 4 }, VLM_DTYPE_F32, 0);
    put_tinfo(&b, "b.misaligned", 1, (uint64_t[]){ 4 }, VLM_DTYPE_F32, 16);
    put_data(&b, 32, 64);
    EXPECT_FAIL(&b, VLM_ERR_FORMAT, "tensor 'b.misaligned'", "offset 16", "alignment 32");

    /* Data past the end of the file; an offset so large the sum overflows. */
    b.len = 0;
    put_header(&b, 3, 1, 0);
    put_tinfo(&b, "blk.3.attn_q.weight", 2, (uint64_t[]){ 64, 4 }, VLM_DTYPE_F32, 0);
    put_data(&b, 32, 1000);
    EXPECT_FAIL(&b, VLM_ERR_TRUNCATED, "tensor 'blk.3.attn_q.weight'", "[offset 0, 1024 bytes]",
                "past the end of the file");
    b.len = 0;
    put_header(&b, 3, 1, 0);
    put_tinfo(&b, "t.far", 1, (uint64_t[]){ 8 }, VLM_DTYPE_F32, UINT64_MAX - 31);
    put_data(&b, 32, 64);
    EXPECT_FAIL(&b, VLM_ERR_TRUNCATED, "tensor 't.far'");

    /* Duplicate keys and tensor names. */
    b.len = 0;
    put_header(&b, 3, 0, 3);
    put_kv_u32(&b, "llama.block_count", 1);
    put_kv_str(&b, "general.name", "x");
    put_kv_u32(&b, "llama.block_count", 2);
    EXPECT_FAIL(&b, VLM_ERR_FORMAT, "key 'llama.block_count'", "duplicate key");
    b.len = 0;
    put_header(&b, 3, 2, 0);
    put_tinfo(&b, "output.weight", 1, (uint64_t[]){ 8 }, VLM_DTYPE_F32, 0);
    put_tinfo(&b, "output.weight", 1, (uint64_t[]){ 8 }, VLM_DTYPE_F32, 32);
    put_data(&b, 32, 64);
    EXPECT_FAIL(&b, VLM_ERR_FORMAT, "tensor 'output.weight'", "duplicate tensor");

    /* Alignment: 0, not a power of two, wrong type; 64 is honoured. */
    static const uint32_t bad_align[] = { 0, 3, 48, 0x80000001u };
    for (size_t i = 0; i < sizeof bad_align / sizeof bad_align[0]; i++) {
        b.len = 0;
        put_header(&b, 3, 0, 1);
        put_kv_u32(&b, "general.alignment", bad_align[i]);
        EXPECT_FAIL(&b, VLM_ERR_FORMAT, "general.alignment", "power of two");
    }
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "general.alignment");
    put_u32(&b, VLM_GGUF_TYPE_UINT64);
    put_u64(&b, 32);
    EXPECT_FAIL(&b, VLM_ERR_FORMAT, "general.alignment", "UINT32");
    b.len = 0;
    put_header(&b, 3, 1, 1);
    put_kv_u32(&b, "general.alignment", 64);
    put_tinfo(&b, "t", 1, (uint64_t[]){ 8 }, VLM_DTYPE_F32, 0);
    size_t infos_end = b.len;
    put_data(&b, 64, 32);
    REQUIRE(open_copy(&b, &err, &g, &copy) == VLM_OK, "%s", err.msg);
    CHECK(vlm_gguf_alignment(g) == 64 && vlm_gguf_data_offset(g) == (infos_end + 63) / 64 * 64);
    vlm_gguf_destroy(&g);
    free(copy);
    b.len = 0;
    put_header(&b, 3, 1, 1);
    put_kv_u32(&b, "general.alignment", 64);
    put_tinfo(&b, "t.off32", 1, (uint64_t[]){ 8 }, VLM_DTYPE_F32, 32);
    put_data(&b, 64, 128);
    EXPECT_FAIL(&b, VLM_ERR_FORMAT, "tensor 't.off32'", "alignment 64");

    /* Files on disk: absent, too short. */
    CHECK(vlm_gguf_open("/nonexistent/dir/model.gguf", &g, &err) == VLM_ERR_NOT_FOUND && g == NULL &&
          contains(err.msg, "/nonexistent/dir/model.gguf"), "%s", err.msg);
    char tmp[] = "/tmp/test_gguf_XXXXXX";
    int fd = mkstemp(tmp);
    REQUIRE(fd >= 0);
    CHECK(write(fd, "GGUF\3\0\0\0", 8) == 8);
    close(fd);
    CHECK(vlm_gguf_open(tmp, &g, &err) == VLM_ERR_TRUNCATED && contains(err.msg, tmp), "%s", err.msg);
    unlink(tmp);
    vlm_gguf_destroy(NULL);
    free(b.p);
}

/* ==== (f) the writer ==== */

/* Re-writes a golden file through the writer; the bytes must be identical. */
static void rewrite_golden(const char *path) {
    vlm_gguf_t *g = NULL;
    vlm_error_t err;
    REQUIRE(vlm_gguf_open(path, &g, &err) == VLM_OK, "%s", err.msg);
    vlm_gguf_writer_t *w = vlm_gguf_writer_new();
    REQUIRE(w != NULL);
    for (size_t i = 0; i < vlm_gguf_n_kv(g); i++) {
        const vlm_gguf_kv_t *kv = vlm_gguf_kv_at(g, i);
        int rc = VLM_OK;
        if (kv->type == VLM_GGUF_TYPE_STRING) {
            char *s = strndup(kv->str, kv->str_len);
            rc = vlm_gguf_writer_set_str(w, kv->key, s);
            free(s);
        } else if (kv->type == VLM_GGUF_TYPE_ARRAY && kv->arr_type == VLM_GGUF_TYPE_STRING) {
            const char **strs = malloc(kv->arr_n * sizeof *strs);
            size_t *lens = malloc(kv->arr_n * sizeof *lens);
            for (uint64_t e = 0; e < kv->arr_n; e++) {
                uint64_t len;
                strs[e] = vlm_gguf_arr_str(kv, e, &len);
                lens[e] = len;
            }
            rc = vlm_gguf_writer_set_arr_str(w, kv->key, strs, lens, kv->arr_n);
            free(strs);
            free(lens);
        } else if (kv->type == VLM_GGUF_TYPE_ARRAY) {
            rc = vlm_gguf_writer_set_arr(w, kv->key, kv->arr_type, kv->arr_data, kv->arr_n);
        } else {
            /* Re-encode the decoded scalar. */
            uint8_t raw[8];
            switch (kv->type) {
            case VLM_GGUF_TYPE_UINT8: raw[0] = (uint8_t)kv->v.u64; break;
            case VLM_GGUF_TYPE_INT8: raw[0] = (uint8_t)(int8_t)kv->v.i64; break;
            case VLM_GGUF_TYPE_UINT16: { uint16_t x = (uint16_t)kv->v.u64; memcpy(raw, &x, 2); break; }
            case VLM_GGUF_TYPE_INT16: { int16_t x = (int16_t)kv->v.i64; memcpy(raw, &x, 2); break; }
            case VLM_GGUF_TYPE_UINT32: { uint32_t x = (uint32_t)kv->v.u64; memcpy(raw, &x, 4); break; }
            case VLM_GGUF_TYPE_INT32: { int32_t x = (int32_t)kv->v.i64; memcpy(raw, &x, 4); break; }
            case VLM_GGUF_TYPE_FLOAT32: { float x = (float)kv->v.f64; memcpy(raw, &x, 4); break; }
            case VLM_GGUF_TYPE_BOOL: { bool x = kv->v.u64 != 0; memcpy(raw, &x, 1); break; }
            case VLM_GGUF_TYPE_UINT64: memcpy(raw, &kv->v.u64, 8); break;
            case VLM_GGUF_TYPE_INT64: memcpy(raw, &kv->v.i64, 8); break;
            case VLM_GGUF_TYPE_FLOAT64: memcpy(raw, &kv->v.f64, 8); break;
            }
            rc = vlm_gguf_writer_set_val(w, kv->key, kv->type, raw);
        }
        CHECK(rc == VLM_OK, "%s: %s", path, kv->key);
    }
    for (size_t i = 0; i < vlm_gguf_n_tensors(g); i++) {
        const vlm_gguf_tensor_t *t = vlm_gguf_tensor_at(g, i);
        CHECK(vlm_gguf_writer_add_tensor(w, t->name, t->type, (int)t->n_dims, t->ne, t->data, &err) == VLM_OK,
              "%s", err.msg);
    }
    void *out;
    size_t out_size;
    REQUIRE(vlm_gguf_writer_write_mem(w, &out, &out_size, &err) == VLM_OK, "%s", err.msg);
    size_t size;
    uint8_t *orig = harness_read_file(path, &size);
    CHECK(orig && out_size == size && memcmp(out, orig, size) == 0, "%s: rewritten file differs (%zu vs %zu bytes)",
          path, out_size, size);
    free(orig);
    free(out);
    vlm_gguf_writer_destroy(&w);
    CHECK(w == NULL);
    vlm_gguf_destroy(&g);
}

static void test_writer_reproduces_golden(void) {
    /* micro-f32 was written by gguf-py, small-q4_k_m/text.gguf by llama-quantize. */
    rewrite_golden(GOLDEN_DIR "/micro-f32/text.gguf");
    rewrite_golden(GOLDEN_DIR "/micro-f32/mmproj.gguf");
    rewrite_golden(GOLDEN_DIR "/small-q4_k_m/text.gguf");
    rewrite_golden(GOLDEN_DIR "/small-q4_0/mmproj.gguf");
}

static void test_writer_exact_bytes(void) {
    /* One u32 pair and one F32 [3] tensor, laid out by hand. */
    buf_t want = { 0 };
    put_header(&want, 3, 1, 1);
    put_kv_u32(&want, "n", 7);
    put_tinfo(&want, "t", 1, (uint64_t[]){ 3 }, VLM_DTYPE_F32, 0);
    while (want.len % 32) put_u8(&want, 0);
    float data[3] = { 1.5f, -2.0f, 3.25f };
    put(&want, data, sizeof data);
    while (want.len % 32) put_u8(&want, 0);

    vlm_gguf_writer_t *w = vlm_gguf_writer_new();
    vlm_error_t err;
    REQUIRE(w != NULL);
    CHECK(vlm_gguf_writer_set_u32(w, "n", 7) == VLM_OK);
    CHECK(vlm_gguf_writer_add_tensor(w, "t", VLM_DTYPE_F32, 1, (int64_t[]){ 3 }, data, &err) == VLM_OK);
    void *out;
    size_t size;
    REQUIRE(vlm_gguf_writer_write_mem(w, &out, &size, &err) == VLM_OK, "%s", err.msg);
    CHECK(size == want.len && memcmp(out, want.p, size) == 0);
    free(out);
    vlm_gguf_writer_destroy(&w);
    vlm_gguf_writer_destroy(&w); /* NULL-safe */
    free(want.p);
}

static void test_writer_round_trip(void) {
    vlm_gguf_writer_t *w = vlm_gguf_writer_new();
    vlm_error_t err;
    REQUIRE(w != NULL);

    /* Every scalar type, in this order. */
    uint8_t u8 = 200;
    int8_t i8 = -100;
    uint16_t u16 = 60000;
    int16_t i16 = -30000;
    int64_t i64 = INT64_MIN + 5;
    double f64 = -1.0 / 3.0;
    bool tru = true;
    CHECK(vlm_gguf_writer_set_val(w, "s.u8", VLM_GGUF_TYPE_UINT8, &u8) == VLM_OK);
    CHECK(vlm_gguf_writer_set_val(w, "s.i8", VLM_GGUF_TYPE_INT8, &i8) == VLM_OK);
    CHECK(vlm_gguf_writer_set_val(w, "s.u16", VLM_GGUF_TYPE_UINT16, &u16) == VLM_OK);
    CHECK(vlm_gguf_writer_set_val(w, "s.i16", VLM_GGUF_TYPE_INT16, &i16) == VLM_OK);
    CHECK(vlm_gguf_writer_set_u32(w, "s.u32", 4000000000u) == VLM_OK);
    CHECK(vlm_gguf_writer_set_i32(w, "s.i32", -2000000000) == VLM_OK);
    CHECK(vlm_gguf_writer_set_f32(w, "s.f32", 1e-5f) == VLM_OK);
    CHECK(vlm_gguf_writer_set_bool(w, "s.bool", false) == VLM_OK);
    CHECK(vlm_gguf_writer_set_str(w, "s.str", "héllo wörld") == VLM_OK);
    CHECK(vlm_gguf_writer_set_u64(w, "s.u64", UINT64_MAX) == VLM_OK);
    CHECK(vlm_gguf_writer_set_val(w, "s.i64", VLM_GGUF_TYPE_INT64, &i64) == VLM_OK);
    CHECK(vlm_gguf_writer_set_val(w, "s.f64", VLM_GGUF_TYPE_FLOAT64, &f64) == VLM_OK);
    CHECK(vlm_gguf_writer_set_val(w, "s.bool2", VLM_GGUF_TYPE_BOOL, &tru) == VLM_OK);
    /* Replacing keeps the position. */
    CHECK(vlm_gguf_writer_set_bool(w, "s.bool", true) == VLM_OK);
    /* Bad arguments. */
    CHECK(vlm_gguf_writer_set_val(w, "s.bad", VLM_GGUF_TYPE_STRING, &u8) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_gguf_writer_set_val(w, "s.bad", VLM_GGUF_TYPE_ARRAY, &u8) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_gguf_writer_set_arr(w, "s.bad", VLM_GGUF_TYPE_STRING, &u8, 1) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_gguf_writer_set_u32(w, NULL, 1) == VLM_ERR_INVALID_ARG);

    /* Arrays. */
    const int32_t ai32[] = { -1, 0, 7, INT32_MAX };
    const float af32[] = { 0.5f, -0.25f, 1e30f };
    const uint8_t abool[] = { 1, 0, 1 };
    const uint64_t au64[] = { 1, UINT64_MAX };
    const int16_t ai16[] = { -5, 5 };
    const double af64[] = { 1e300, -2.5 };
    CHECK(vlm_gguf_writer_set_arr(w, "a.i32", VLM_GGUF_TYPE_INT32, ai32, 4) == VLM_OK);
    CHECK(vlm_gguf_writer_set_arr(w, "a.f32", VLM_GGUF_TYPE_FLOAT32, af32, 3) == VLM_OK);
    CHECK(vlm_gguf_writer_set_arr(w, "a.bool", VLM_GGUF_TYPE_BOOL, abool, 3) == VLM_OK);
    CHECK(vlm_gguf_writer_set_arr(w, "a.u64", VLM_GGUF_TYPE_UINT64, au64, 2) == VLM_OK);
    CHECK(vlm_gguf_writer_set_arr(w, "a.i16", VLM_GGUF_TYPE_INT16, ai16, 2) == VLM_OK);
    CHECK(vlm_gguf_writer_set_arr(w, "a.f64", VLM_GGUF_TYPE_FLOAT64, af64, 2) == VLM_OK);
    CHECK(vlm_gguf_writer_set_arr(w, "a.empty", VLM_GGUF_TYPE_UINT8, NULL, 0) == VLM_OK);
    const char *strs[] = { "<unk>", "", "a\0b", "▁the" };
    const size_t lens[] = { 5, 0, 3, strlen("▁the") };
    CHECK(vlm_gguf_writer_set_arr_str(w, "a.str", strs, lens, 4) == VLM_OK);
    const char *strs2[] = { "x", "yz" };
    CHECK(vlm_gguf_writer_set_arr_str(w, "a.str2", strs2, NULL, 2) == VLM_OK);

    /* Tensors of several types. */
    float t_f32[5 * 3];
    for (int i = 0; i < 15; i++) t_f32[i] = (float)i * 0.5f - 3.0f;
    uint16_t t_f16[8 * 2 * 2];
    for (int i = 0; i < 32; i++) t_f16[i] = vlm_fp32_to_fp16((float)i / 7.0f);
    uint8_t t_q8[34 * 3], t_q4k[144 * 2], t_q6k[210 * 2], t_bf16[2 * 3];
    for (size_t i = 0; i < sizeof t_q8; i++) t_q8[i] = (uint8_t)(i * 7 + 1);
    for (size_t i = 0; i < sizeof t_q4k; i++) t_q4k[i] = (uint8_t)(i * 13 + 2);
    for (size_t i = 0; i < sizeof t_q6k; i++) t_q6k[i] = (uint8_t)(i * 3 + 5);
    for (size_t i = 0; i < sizeof t_bf16; i++) t_bf16[i] = (uint8_t)(i + 9);
    static const struct {
        const char *name;
        uint32_t type;
        int n_dims;
        int64_t ne[4];
    } ts[] = {
        { "t.f32", VLM_DTYPE_F32, 2, { 5, 3, 1, 1 } },
        { "t.f16", VLM_DTYPE_F16, 3, { 8, 2, 2, 1 } },
        { "t.q8_0", VLM_DTYPE_Q8_0, 2, { 32, 3, 1, 1 } },
        { "t.q4_k", VLM_DTYPE_Q4_K, 2, { 256, 2, 1, 1 } },
        { "t.q6_k", VLM_DTYPE_Q6_K, 4, { 256, 1, 1, 2 } },
        { "t.bf16", VLM_DTYPE_BF16, 1, { 3, 1, 1, 1 } },
    };
    const void *tdata[] = { t_f32, t_f16, t_q8, t_q4k, t_q6k, t_bf16 };
    const size_t tbytes[] = { sizeof t_f32, sizeof t_f16, sizeof t_q8, sizeof t_q4k, sizeof t_q6k, sizeof t_bf16 };
    for (int i = 0; i < 6; i++)
        CHECK(vlm_gguf_writer_add_tensor(w, ts[i].name, ts[i].type, ts[i].n_dims, ts[i].ne, tdata[i], &err) == VLM_OK,
              "%s", err.msg);

    /* Tensor errors. */
    CHECK(vlm_gguf_writer_add_tensor(w, "t.f32", VLM_DTYPE_F32, 1, (int64_t[]){ 1 }, t_f32, &err) ==
              VLM_ERR_INVALID_ARG && contains(err.msg, "t.f32"), "%s", err.msg);
    CHECK(vlm_gguf_writer_add_tensor(w, "t.bad", VLM_DTYPE_Q4_0, 1, (int64_t[]){ 33 }, t_f32, &err) ==
              VLM_ERR_SHAPE && contains(err.msg, "t.bad"), "%s", err.msg);
    CHECK(vlm_gguf_writer_add_tensor(w, "t.bad", 4, 1, (int64_t[]){ 32 }, t_f32, &err) == VLM_ERR_TYPE);
    CHECK(vlm_gguf_writer_add_tensor(w, "t.bad", VLM_DTYPE_F32, 0, (int64_t[]){ 32 }, t_f32, &err) == VLM_ERR_SHAPE);
    CHECK(vlm_gguf_writer_add_tensor(w, "t.bad", VLM_DTYPE_F32, 2, (int64_t[]){ 32, 0 }, t_f32, &err) == VLM_ERR_SHAPE);
    CHECK(vlm_gguf_writer_add_tensor(w, "t.bad", VLM_DTYPE_F32, 2, (int64_t[]){ INT64_MAX, 2 }, t_f32, &err) ==
          VLM_ERR_OVERFLOW);
    CHECK(vlm_gguf_writer_add_tensor(w, "t.a_name_that_is_far_too_long_for_llama_cpp_to_accept_it_really_0123456789", VLM_DTYPE_F32,
                                     1, (int64_t[]){ 1 }, t_f32, &err) == VLM_ERR_INVALID_ARG);

    char tmp[] = "/tmp/test_gguf_XXXXXX";
    int fd = mkstemp(tmp);
    REQUIRE(fd >= 0);
    close(fd);
    REQUIRE(vlm_gguf_writer_write(w, tmp, &err) == VLM_OK, "%s", err.msg);
    void *mem;
    size_t mem_size;
    REQUIRE(vlm_gguf_writer_write_mem(w, &mem, &mem_size, &err) == VLM_OK, "%s", err.msg);
    size_t file_size;
    uint8_t *file = harness_read_file(tmp, &file_size);
    CHECK(file && file_size == mem_size && memcmp(file, mem, mem_size) == 0);
    free(file);
    free(mem);

    vlm_gguf_t *g = NULL;
    REQUIRE(vlm_gguf_open(tmp, &g, &err) == VLM_OK, "%s", err.msg);
    unlink(tmp);
    CHECK(vlm_gguf_version(g) == 3 && vlm_gguf_alignment(g) == 32);

    static const char *const order[] = { "s.u8", "s.i8", "s.u16", "s.i16", "s.u32", "s.i32", "s.f32", "s.bool",
                                         "s.str", "s.u64", "s.i64", "s.f64", "s.bool2", "a.i32", "a.f32",
                                         "a.bool", "a.u64", "a.i16", "a.f64", "a.empty", "a.str", "a.str2" };
    static const uint32_t types[] = { 0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 7, 9, 9, 9, 9, 9, 9, 9, 9, 9 };
    REQUIRE(vlm_gguf_n_kv(g) == sizeof order / sizeof order[0], "%zu pairs", vlm_gguf_n_kv(g));
    for (size_t i = 0; i < vlm_gguf_n_kv(g); i++) {
        const vlm_gguf_kv_t *kv = vlm_gguf_kv_at(g, i);
        CHECK(strcmp(kv->key, order[i]) == 0 && kv->type == types[i], "pair %zu is %s", i, kv->key);
    }
    CHECK(vlm_gguf_kv_at(g, 99) == NULL);
    CHECK(vlm_gguf_find_kv(g, "s.u8")->v.u64 == 200);
    CHECK(vlm_gguf_find_kv(g, "s.i8")->v.i64 == -100);
    CHECK(vlm_gguf_find_kv(g, "s.u16")->v.u64 == 60000);
    CHECK(vlm_gguf_find_kv(g, "s.i16")->v.i64 == -30000);
    CHECK(vlm_gguf_find_kv(g, "s.u32")->v.u64 == 4000000000u);
    CHECK(vlm_gguf_find_kv(g, "s.i32")->v.i64 == -2000000000);
    CHECK(vlm_gguf_find_kv(g, "s.f32")->v.f64 == (double)1e-5f);
    CHECK(vlm_gguf_find_kv(g, "s.bool")->v.u64 == 1);
    CHECK(vlm_gguf_find_kv(g, "s.bool2")->v.u64 == 1);
    CHECK(vlm_gguf_find_kv(g, "s.u64")->v.u64 == UINT64_MAX);
    CHECK(vlm_gguf_find_kv(g, "s.i64")->v.i64 == INT64_MIN + 5);
    CHECK(vlm_gguf_find_kv(g, "s.f64")->v.f64 == -1.0 / 3.0);
    const vlm_gguf_kv_t *kv = vlm_gguf_find_kv(g, "s.str");
    CHECK(kv->str_len == strlen("héllo wörld") && memcmp(kv->str, "héllo wörld", kv->str_len) == 0);

    const vlm_gguf_kv_t *arr;
    REQUIRE(vlm_gguf_get_arr(g, "a.i32", VLM_GGUF_TYPE_INT32, &arr, &err) == VLM_OK);
    CHECK(arr->arr_n == 4);
    for (int i = 0; i < 4; i++) CHECK(vlm_gguf_arr_i64(arr, i) == ai32[i] && vlm_gguf_arr_f64(arr, i) == ai32[i]);
    REQUIRE(vlm_gguf_get_arr(g, "a.f32", VLM_GGUF_TYPE_FLOAT32, &arr, &err) == VLM_OK);
    for (int i = 0; i < 3; i++) CHECK(vlm_gguf_arr_f64(arr, i) == (double)af32[i]);
    REQUIRE(vlm_gguf_get_arr(g, "a.bool", VLM_GGUF_TYPE_BOOL, &arr, &err) == VLM_OK);
    for (int i = 0; i < 3; i++) CHECK(vlm_gguf_arr_i64(arr, i) == abool[i]);
    REQUIRE(vlm_gguf_get_arr(g, "a.u64", VLM_GGUF_TYPE_UINT64, &arr, &err) == VLM_OK);
    CHECK((uint64_t)vlm_gguf_arr_i64(arr, 1) == UINT64_MAX && vlm_gguf_arr_f64(arr, 0) == 1.0);
    REQUIRE(vlm_gguf_get_arr(g, "a.i16", VLM_GGUF_TYPE_INT16, &arr, &err) == VLM_OK);
    CHECK(vlm_gguf_arr_i64(arr, 0) == -5 && vlm_gguf_arr_i64(arr, 1) == 5);
    REQUIRE(vlm_gguf_get_arr(g, "a.f64", VLM_GGUF_TYPE_FLOAT64, &arr, &err) == VLM_OK);
    CHECK(vlm_gguf_arr_f64(arr, 0) == 1e300 && vlm_gguf_arr_f64(arr, 1) == -2.5);
    REQUIRE(vlm_gguf_get_arr(g, "a.empty", VLM_GGUF_TYPE_UINT8, &arr, &err) == VLM_OK);
    CHECK(arr->arr_n == 0);
    REQUIRE(vlm_gguf_get_arr(g, "a.str", VLM_GGUF_TYPE_STRING, &arr, &err) == VLM_OK);
    REQUIRE(arr->arr_n == 4);
    for (int i = 0; i < 4; i++) {
        uint64_t len;
        const char *s = vlm_gguf_arr_str(arr, i, &len);
        CHECK(len == lens[i] && memcmp(s, strs[i], len) == 0, "a.str[%d]", i);
    }
    REQUIRE(vlm_gguf_get_arr(g, "a.str2", VLM_GGUF_TYPE_STRING, &arr, &err) == VLM_OK);
    uint64_t len;
    CHECK(memcmp(vlm_gguf_arr_str(arr, 1, &len), "yz", 2) == 0 && len == 2);

    REQUIRE(vlm_gguf_n_tensors(g) == 6);
    uint64_t expect_offset = 0;
    for (int i = 0; i < 6; i++) {
        const vlm_gguf_tensor_t *t = vlm_gguf_tensor_at(g, i);
        CHECK(strcmp(t->name, ts[i].name) == 0 && t->type == ts[i].type && (int)t->n_dims == ts[i].n_dims,
              "tensor %d", i);
        for (int d = 0; d < 4; d++) CHECK(t->ne[d] == ts[i].ne[d]);
        CHECK(t->offset == expect_offset && t->nbytes == tbytes[i], "%s", t->name);
        CHECK(memcmp(t->data, tdata[i], tbytes[i]) == 0, "%s data", t->name);
        expect_offset += (tbytes[i] + 31) / 32 * 32;
    }
    CHECK(vlm_gguf_file_size(g) == vlm_gguf_data_offset(g) + expect_offset);
    vlm_gguf_destroy(&g);

    /* general.alignment = 64 moves every offset to a multiple of 64; a bad
     * one makes the write fail. */
    CHECK(vlm_gguf_writer_set_u32(w, "general.alignment", 64) == VLM_OK);
    REQUIRE(vlm_gguf_writer_write_mem(w, &mem, &mem_size, &err) == VLM_OK, "%s", err.msg);
    REQUIRE(vlm_gguf_open_buffer(mem, mem_size, &g, &err) == VLM_OK, "%s", err.msg);
    CHECK(vlm_gguf_alignment(g) == 64 && vlm_gguf_data_offset(g) % 64 == 0 && mem_size % 64 == 0);
    for (size_t i = 0; i < vlm_gguf_n_tensors(g); i++) {
        const vlm_gguf_tensor_t *t = vlm_gguf_tensor_at(g, i);
        CHECK(t->offset % 64 == 0 && memcmp(t->data, tdata[i], tbytes[i]) == 0);
    }
    vlm_gguf_destroy(&g);
    free(mem);
    CHECK(vlm_gguf_writer_set_u32(w, "general.alignment", 24) == VLM_OK);
    CHECK(vlm_gguf_writer_write_mem(w, &mem, &mem_size, &err) == VLM_ERR_INVALID_ARG && mem == NULL);
    CHECK(vlm_gguf_writer_set_u64(w, "general.alignment", 32) == VLM_OK);
    CHECK(vlm_gguf_writer_write_mem(w, &mem, &mem_size, &err) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_gguf_writer_write(w, "/nonexistent/dir/x.gguf", &err) == VLM_ERR_IO &&
          contains(err.msg, "/nonexistent/dir/x.gguf"));
    vlm_gguf_writer_destroy(&w);
}

/* ==== (g) getters and expect_tensor ==== */

static void test_getters_and_expect(void) {
    vlm_gguf_writer_t *w = vlm_gguf_writer_new();
    vlm_error_t err;
    REQUIRE(w != NULL);
    uint8_t u8 = 7;
    int16_t neg16 = -3;
    double big = 1e300, third = 1.0 / 3.0;
    CHECK(vlm_gguf_writer_set_val(w, "k.u8", VLM_GGUF_TYPE_UINT8, &u8) == VLM_OK);
    CHECK(vlm_gguf_writer_set_val(w, "k.neg16", VLM_GGUF_TYPE_INT16, &neg16) == VLM_OK);
    CHECK(vlm_gguf_writer_set_i32(w, "k.i32", 123456) == VLM_OK);
    CHECK(vlm_gguf_writer_set_u64(w, "k.u64big", 1ull << 40) == VLM_OK);
    CHECK(vlm_gguf_writer_set_u64(w, "k.u64max", UINT64_MAX) == VLM_OK);
    CHECK(vlm_gguf_writer_set_f32(w, "k.f32", 0.125f) == VLM_OK);
    CHECK(vlm_gguf_writer_set_val(w, "k.f64big", VLM_GGUF_TYPE_FLOAT64, &big) == VLM_OK);
    CHECK(vlm_gguf_writer_set_val(w, "k.f64", VLM_GGUF_TYPE_FLOAT64, &third) == VLM_OK);
    CHECK(vlm_gguf_writer_set_bool(w, "k.bool", true) == VLM_OK);
    CHECK(vlm_gguf_writer_set_str(w, "k.str", "mlp") == VLM_OK);
    CHECK(vlm_gguf_writer_set_arr(w, "k.arr", VLM_GGUF_TYPE_FLOAT32, (float[]){ 1, 2 }, 2) == VLM_OK);
    static uint8_t zeros[64 * 32 * 2]; /* the largest tensor below */
    CHECK(vlm_gguf_writer_add_tensor(w, "blk.3.attn_q.weight", VLM_DTYPE_Q2_K, 2, (int64_t[]){ 256, 4 }, zeros, &err) ==
          VLM_OK, "%s", err.msg);
    CHECK(vlm_gguf_writer_add_tensor(w, "blk.3.attn_k.weight", VLM_DTYPE_F16, 2, (int64_t[]){ 64, 32 }, zeros, &err) ==
          VLM_OK, "%s", err.msg);
    CHECK(vlm_gguf_writer_add_tensor(w, "norm.weight", VLM_DTYPE_F32, 2, (int64_t[]){ 64, 1 }, zeros, &err) == VLM_OK);
    void *mem;
    size_t size;
    REQUIRE(vlm_gguf_writer_write_mem(w, &mem, &size, &err) == VLM_OK, "%s", err.msg);
    vlm_gguf_writer_destroy(&w);
    vlm_gguf_t *g;
    REQUIRE(vlm_gguf_open_buffer(mem, size, &g, &err) == VLM_OK, "%s", err.msg);

    uint32_t u32;
    int64_t i64;
    float f32;
    bool b;
    const char *s;
    size_t len;
    const vlm_gguf_kv_t *arr;
    CHECK(vlm_gguf_get_u32(g, "k.u8", &u32, &err) == VLM_OK && u32 == 7);
    CHECK(vlm_gguf_get_u32(g, "k.i32", &u32, &err) == VLM_OK && u32 == 123456);
    CHECK(vlm_gguf_get_u32(g, "k.neg16", &u32, &err) == VLM_ERR_TYPE && contains(err.msg, "k.neg16"), "%s", err.msg);
    CHECK(vlm_gguf_get_u32(g, "k.u64big", &u32, &err) == VLM_ERR_TYPE && contains(err.msg, "k.u64big"));
    CHECK(vlm_gguf_get_u32(g, "k.f32", &u32, &err) == VLM_ERR_TYPE && contains(err.msg, "FLOAT32"), "%s", err.msg);
    CHECK(vlm_gguf_get_u32(g, "k.bool", &u32, &err) == VLM_ERR_TYPE);
    CHECK(vlm_gguf_get_u32(g, "k.missing", &u32, &err) == VLM_ERR_MISSING_KEY && contains(err.msg, "'k.missing'"));
    CHECK(vlm_gguf_get_i64(g, "k.neg16", &i64, &err) == VLM_OK && i64 == -3);
    CHECK(vlm_gguf_get_i64(g, "k.u64big", &i64, &err) == VLM_OK && i64 == 1ll << 40);
    CHECK(vlm_gguf_get_i64(g, "k.u64max", &i64, &err) == VLM_ERR_TYPE && contains(err.msg, "k.u64max"));
    CHECK(vlm_gguf_get_i64(g, "k.str", &i64, &err) == VLM_ERR_TYPE && contains(err.msg, "STRING"));
    CHECK(vlm_gguf_get_f32(g, "k.f32", &f32, &err) == VLM_OK && f32 == 0.125f);
    CHECK(vlm_gguf_get_f32(g, "k.f64", &f32, &err) == VLM_OK && f32 == (float)(1.0 / 3.0));
    CHECK(vlm_gguf_get_f32(g, "k.i32", &f32, &err) == VLM_OK && f32 == 123456.0f);
    CHECK(vlm_gguf_get_f32(g, "k.neg16", &f32, &err) == VLM_OK && f32 == -3.0f);
    CHECK(vlm_gguf_get_f32(g, "k.f64big", &f32, &err) == VLM_ERR_TYPE && contains(err.msg, "k.f64big"));
    CHECK(vlm_gguf_get_f32(g, "k.bool", &f32, &err) == VLM_ERR_TYPE);
    CHECK(vlm_gguf_get_bool(g, "k.bool", &b, &err) == VLM_OK && b);
    CHECK(vlm_gguf_get_bool(g, "k.u8", &b, &err) == VLM_ERR_TYPE && contains(err.msg, "k.u8"));
    CHECK(vlm_gguf_get_str(g, "k.str", &s, &len, &err) == VLM_OK && len == 3 && memcmp(s, "mlp", 3) == 0);
    CHECK(vlm_gguf_get_str(g, "k.u8", &s, &len, &err) == VLM_ERR_TYPE);
    CHECK(vlm_gguf_get_str(g, "k.none", &s, &len, &err) == VLM_ERR_MISSING_KEY);
    CHECK(vlm_gguf_get_arr(g, "k.arr", VLM_GGUF_TYPE_FLOAT32, &arr, &err) == VLM_OK && arr->arr_n == 2);
    CHECK(vlm_gguf_get_arr(g, "k.arr", VLM_GGUF_TYPE_COUNT, &arr, &err) == VLM_OK);
    CHECK(vlm_gguf_get_arr(g, "k.arr", VLM_GGUF_TYPE_INT32, &arr, &err) == VLM_ERR_TYPE &&
          contains(err.msg, "k.arr") && contains(err.msg, "FLOAT32"), "%s", err.msg);
    CHECK(vlm_gguf_get_arr(g, "k.str", VLM_GGUF_TYPE_COUNT, &arr, &err) == VLM_ERR_TYPE);

    /* expect_tensor. */
    const vlm_gguf_tensor_t *t = (const vlm_gguf_tensor_t *)1;
    const uint64_t f16_f32 = (1ull << VLM_DTYPE_F16) | (1ull << VLM_DTYPE_F32);
    CHECK(vlm_gguf_expect_tensor(g, "blk.3.attn_q.weight", 2, (int64_t[]){ 256, 4 }, f16_f32, &t, &err) ==
          VLM_ERR_TYPE && t == NULL);
    CHECK(contains(err.msg, "blk.3.attn_q.weight: expected F32 or F16, got Q2_K"), "%s", err.msg);
    CHECK(vlm_gguf_expect_tensor(g, "blk.3.attn_q.weight", 2, (int64_t[]){ 256, 4 },
                                 f16_f32 | (1ull << VLM_DTYPE_BF16), &t, &err) == VLM_ERR_TYPE);
    CHECK(contains(err.msg, "expected F32, F16 or BF16, got Q2_K"), "%s", err.msg);
    CHECK(vlm_gguf_expect_tensor(g, "blk.3.attn_k.weight", 2, (int64_t[]){ 64, 64 }, f16_f32, &t, &err) ==
          VLM_ERR_SHAPE);
    CHECK(contains(err.msg, "blk.3.attn_k.weight: expected shape [64, 64], got [64, 32]"), "%s", err.msg);
    CHECK(vlm_gguf_expect_tensor(g, "blk.3.attn_k.weight", 1, (int64_t[]){ 64 }, f16_f32, &t, &err) ==
          VLM_ERR_SHAPE);
    CHECK(contains(err.msg, "expected shape [64], got [64, 32]"), "%s", err.msg);
    CHECK(vlm_gguf_expect_tensor(g, "blk.3.attn_k.weight", 2, (int64_t[]){ -1, 32 }, f16_f32, &t, &err) == VLM_OK &&
          t == vlm_gguf_find_tensor(g, "blk.3.attn_k.weight"));
    CHECK(vlm_gguf_expect_tensor(g, "blk.3.attn_k.weight", 2, (int64_t[]){ 64, -1 }, 1ull << VLM_DTYPE_F16, NULL,
                                 &err) == VLM_OK);
    CHECK(vlm_gguf_expect_tensor(g, "blk.3.attn_k.weight", 3, (int64_t[]){ 64, 32, 2 }, f16_f32, &t, &err) ==
          VLM_ERR_SHAPE && contains(err.msg, "[64, 32, 2]"), "%s", err.msg);
    CHECK(vlm_gguf_expect_tensor(g, "blk.3.attn_k.weight", 3, (int64_t[]){ 64, 32, 1 }, f16_f32, &t, &err) ==
          VLM_OK);
    /* A vector stored as [64, 1] matches an expected [64], as in llama.cpp. */
    CHECK(vlm_gguf_expect_tensor(g, "norm.weight", 1, (int64_t[]){ 64 }, 1ull << VLM_DTYPE_F32, &t, &err) == VLM_OK);
    CHECK(vlm_gguf_expect_tensor(g, "blk.9.missing", 1, (int64_t[]){ 64 }, ~0ull, &t, &err) == VLM_ERR_NOT_FOUND &&
          contains(err.msg, "blk.9.missing"));
    vlm_gguf_destroy(&g);
    free(mem);
}

/* ==== dtype table ==== */

static void test_dtype_table(void) {
    static const struct {
        uint32_t type;
        const char *name;
        int block;
        size_t size;
        bool supported;
    } want[] = {
        { 0, "F32", 1, 4, true },        { 1, "F16", 1, 2, true },        { 2, "Q4_0", 32, 18, true },
        { 3, "Q4_1", 32, 20, true },     { 6, "Q5_0", 32, 22, true },     { 7, "Q5_1", 32, 24, true },
        { 8, "Q8_0", 32, 34, true },     { 9, "Q8_1", 32, 36, true },     { 10, "Q2_K", 256, 84, false },
        { 11, "Q3_K", 256, 110, false }, { 12, "Q4_K", 256, 144, true },  { 13, "Q5_K", 256, 176, true },
        { 14, "Q6_K", 256, 210, true },  { 15, "Q8_K", 256, 292, true },  { 16, "IQ2_XXS", 256, 66, false },
        { 17, "IQ2_XS", 256, 74, false }, { 18, "IQ3_XXS", 256, 98, false }, { 19, "IQ1_S", 256, 50, false },
        { 20, "IQ4_NL", 32, 18, false }, { 21, "IQ3_S", 256, 110, false }, { 22, "IQ2_S", 256, 82, false },
        { 23, "IQ4_XS", 256, 136, false }, { 24, "I8", 1, 1, false },     { 25, "I16", 1, 2, false },
        { 26, "I32", 1, 4, false },      { 27, "I64", 1, 8, false },      { 28, "F64", 1, 8, false },
        { 29, "IQ1_M", 256, 56, false }, { 30, "BF16", 1, 2, true },      { 34, "TQ1_0", 256, 54, false },
        { 35, "TQ2_0", 256, 66, false },
    };
    size_t n = sizeof want / sizeof want[0];
    for (size_t i = 0; i < n; i++) {
        const vlm_dtype_info_t *info = vlm_dtype_info(want[i].type);
        REQUIRE(info != NULL, "type %u", want[i].type);
        CHECK(strcmp(info->name, want[i].name) == 0 && info->block_size == want[i].block &&
                  info->type_size == want[i].size && info->supported == want[i].supported,
              "type %u (%s)", want[i].type, info->name);
        CHECK(strcmp(vlm_dtype_name(want[i].type), want[i].name) == 0);
        CHECK(vlm_dtype_row_size(want[i].type, want[i].block * 3) == want[i].size * 3);
        if (want[i].block > 1) CHECK(vlm_dtype_row_size(want[i].type, want[i].block + 1) == 0);
    }
    int n_known = 0;
    for (uint32_t t = 0; t < 200; t++) n_known += vlm_dtype_info(t) != NULL;
    CHECK(n_known == (int)n);
    static const uint32_t none[] = { 4, 5, 31, 32, 33, 36, 37, 38, 39, 40, 1000, UINT32_MAX };
    for (size_t i = 0; i < sizeof none / sizeof none[0]; i++) CHECK(vlm_dtype_info(none[i]) == NULL);
    CHECK(strcmp(vlm_dtype_name(99), "type 99") == 0);
    CHECK(vlm_dtype_row_size(VLM_DTYPE_Q4_K, 4096) == 16 * 144);
    CHECK(vlm_dtype_row_size(VLM_DTYPE_F32, -4) == 0 && vlm_dtype_row_size(99, 4) == 0);
    CHECK(vlm_dtype_row_size(VLM_DTYPE_F32, 0) == 0);
}

/* ==== (h) f16 / bf16 conversions ==== */

__attribute__((target("f16c"))) static uint16_t hw_f32_to_f16(float f) { return (uint16_t)_cvtss_sh(f, 0); }
__attribute__((target("f16c"))) static float hw_f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void test_fp16_known_values(void) {
    CHECK(vlm_fp32_to_fp16(1.0f) == 0x3c00 && vlm_fp32_to_fp16(-2.0f) == 0xc000);
    CHECK(vlm_fp32_to_fp16(65504.0f) == 0x7bff && vlm_fp32_to_fp16(65519.99f) == 0x7bff);
    CHECK(vlm_fp32_to_fp16(65520.0f) == 0x7c00 && vlm_fp32_to_fp16(-1e10f) == 0xfc00);
    CHECK(vlm_fp32_to_fp16(0x1p-24f) == 0x0001 && vlm_fp32_to_fp16(0x1p-25f) == 0x0000);
    CHECK(vlm_fp32_to_fp16(0x1.000002p-25f) == 0x0001 && vlm_fp32_to_fp16(0x1.8p-24f) == 0x0002);
    CHECK(vlm_fp32_to_fp16(0x1p-14f) == 0x0400 && vlm_fp32_to_fp16(-0.0f) == 0x8000);
    CHECK(vlm_fp32_to_fp16(1.0f + 0x1p-11f) == 0x3c00); /* tie to even */
    CHECK(vlm_fp32_to_fp16(1.0f + 0x1.8p-10f) == 0x3c02); /* tie to even, upwards */
    CHECK(vlm_fp32_to_fp16(float_of(0x7fc00000)) == 0x7e00);
    CHECK(vlm_fp16_to_fp32(0x3555) == 0x1.554p-2f && vlm_fp16_to_fp32(0x0001) == 0x1p-24f);
    CHECK(vlm_fp16_to_fp32(0x7bff) == 65504.0f && isinf(vlm_fp16_to_fp32(0xfc00)) && vlm_fp16_to_fp32(0xfc00) < 0);
    CHECK(isnan(vlm_fp16_to_fp32(0x7e00)) && bits_of(vlm_fp16_to_fp32(0x8000)) == 0x80000000u);
    CHECK(vlm_round_fp16(0.1f) == 0x1.998p-4f);
}

static void test_fp16_matches_f16c(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("f16c")) SKIP("no F16C on this CPU");

    /* Every half to float. */
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        uint32_t got = bits_of(vlm_fp16_to_fp32((uint16_t)h)), want = bits_of(hw_f16_to_f32((uint16_t)h));
        if (got != want && bad++ < 5) CHECK(0, "f16 %04x -> %08x, F16C %08x", h, got, want);
    }
    CHECK(bad == 0, "%d halves differ", bad);

    /* Float to half around every rounding boundary: each half's value, the
     * midpoints to its neighbours and a few ulps either side. */
    bad = 0;
    long n_checked = 0;
    for (uint32_t h = 0; h < 0x7c00; h++) {
        for (int sign = 0; sign < 2; sign++) {
            float lo = hw_f16_to_f32((uint16_t)h), hi = h < 0x7bff ? hw_f16_to_f32((uint16_t)(h + 1)) : 65536.0f;
            float mid = (lo + hi) * 0.5f; /* exact: halves have 11 significant bits */
            uint32_t centers[2] = { bits_of(lo), bits_of(mid) };
            for (int c = 0; c < 2; c++) {
                for (int d = -3; d <= 3; d++) {
                    uint32_t u = (centers[c] + (uint32_t)d) | (sign ? 0x80000000u : 0);
                    if ((int32_t)(centers[c] + (uint32_t)d) < 0) continue;
                    float f = float_of(u);
                    uint16_t got = vlm_fp32_to_fp16(f), want = hw_f32_to_f16(f);
                    n_checked++;
                    if (got != want && bad++ < 5) CHECK(0, "f32 %08x -> %04x, F16C %04x", u, got, want);
                }
            }
        }
    }
    /* Random floats of every kind (NaN payloads, denormals, huge values),
     * and a sweep of the whole range. */
    for (long i = 0; i < 8000000; i++) {
        uint32_t u = (uint32_t)rng_next();
        float f = float_of(u);
        uint16_t got = vlm_fp32_to_fp16(f), want = hw_f32_to_f16(f);
        n_checked++;
        if (got != want && bad++ < 5) CHECK(0, "f32 %08x -> %04x, F16C %04x", u, got, want);
    }
    for (uint64_t u = 0; u <= 0xffffffffull; u += 131) {
        float f = float_of((uint32_t)u);
        uint16_t got = vlm_fp32_to_fp16(f), want = hw_f32_to_f16(f);
        n_checked++;
        if (got != want && bad++ < 5) CHECK(0, "f32 %08x -> %04x, F16C %04x", (uint32_t)u, got, want);
    }
    CHECK(bad == 0, "%d of %ld floats differ", bad, n_checked);
    fprintf(stderr, "  %ld float->half conversions checked against F16C\n", n_checked);
}

/* Independent bf16 reference: the nearer of the two bf16 values around x
 * (ties to even mantissa), computed in double; NaN keeps its top bits and
 * becomes quiet. */
static uint16_t ref_bf16(float x) {
    uint32_t u = bits_of(x);
    if (isnan(x)) return (uint16_t)((u >> 16) | 0x40);
    uint32_t sign = u & 0x80000000u, a = u & 0x7fffffffu;
    uint32_t lo = a & 0xffff0000u, hi = lo + 0x10000u;
    double v = fabs((double)x), vlo = (double)float_of(lo);
    double vhi = hi >= 0x7f800000u ? ldexp(1.0, 128) : (double)float_of(hi);
    if (a == 0x7f800000u) return (uint16_t)((sign | a) >> 16);
    uint32_t r;
    if (v - vlo < vhi - v) r = lo;
    else if (v - vlo > vhi - v) r = hi;
    else r = ((lo >> 16) & 1) ? hi : lo;
    return (uint16_t)((sign | r) >> 16);
}

static void test_bf16(void) {
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++)
        if (bits_of(vlm_bf16_to_fp32((uint16_t)h)) != h << 16) bad++;
    CHECK(bad == 0);
    CHECK(vlm_bf16_to_fp32(0x3f80) == 1.0f && vlm_bf16_to_fp32(0xc040) == -3.0f);
    CHECK(vlm_fp32_to_bf16(1.0f) == 0x3f80 && vlm_fp32_to_bf16(float_of(0x3f808000)) == 0x3f80);
    CHECK(vlm_fp32_to_bf16(float_of(0x3f818000)) == 0x3f82 && vlm_fp32_to_bf16(float_of(0x3f808001)) == 0x3f81);
    CHECK(vlm_fp32_to_bf16(float_of(0x7f7fffff)) == 0x7f80 && vlm_fp32_to_bf16(-INFINITY) == 0xff80);
    CHECK(vlm_fp32_to_bf16(float_of(0x7f800001)) == 0x7fc0 && vlm_fp32_to_bf16(float_of(0xffc12345)) == 0xffc1);
    bad = 0;
    long n = 0;
    for (long i = 0; i < 4000000; i++) {
        uint32_t u = (uint32_t)rng_next();
        if (i & 1) u = (u & 0xffff0000u) | ((i & 2) ? 0x8000u : (u & 0x1u) + 0x7fffu); /* near ties */
        uint16_t got = vlm_fp32_to_bf16(float_of(u)), want = ref_bf16(float_of(u));
        n++;
        if (got != want && bad++ < 5) CHECK(0, "f32 %08x -> bf16 %04x, want %04x", u, got, want);
    }
    CHECK(bad == 0, "%d of %ld differ", bad, n);
}

/* ==== Releasing mapped pages ==== */

/* Resident bytes of the mapping that contains addr (its Rss line in
 * /proc/self/smaps), with the mapping's start address in *start; -1 when
 * smaps cannot be read or has no such mapping. Mincore() would not do: it
 * tells whether a page is in the page cache, not whether this process maps
 * it. */
static long long smaps_rss(const void *addr, uintptr_t *start) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return -1;
    char line[1024];
    bool in = false;
    long long rss = -1;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        long long kb;
        char c;
        if (sscanf(line, "%lx-%lx %c", &lo, &hi, &c) == 3) {
            in = (uintptr_t)addr >= lo && (uintptr_t)addr < hi;
            if (in) *start = lo;
        } else if (in && sscanf(line, "Rss: %lld kB", &kb) == 1) {
            rss = kb * 1024;
            break;
        }
    }
    fclose(f);
    return rss;
}

/* Reads one byte of every page of [p, p + n) so that each is mapped. */
static unsigned touch_pages(const uint8_t *p, size_t n, size_t page) {
    unsigned sum = 0;
    for (size_t i = 0; i < n; i += page) sum += ((const volatile uint8_t *)p)[i];
    if (n) sum += ((const volatile uint8_t *)p)[n - 1];
    return sum;
}

/* The largest golden GGUF (so its largest tensor spans many pages); its
 * largest tensor's pages are touched, released, and read back. */
static void test_release_range(void) {
    FILE *probe = fopen("/proc/self/smaps", "r");
    if (!probe) SKIP("/proc/self/smaps is not readable here");
    fclose(probe);
    char names[32][64];
    const int n_cases = list_cases(names, 32);
    char path[512] = "";
    long long best = -1;
    for (int i = 0; i < n_cases; i++)
        for (int k = 0; k < 2; k++) {
            char p[512];
            struct stat st;
            snprintf(p, sizeof p, "%s/%.63s/%s", GOLDEN_DIR, names[i], k ? "mmproj.gguf" : "text.gguf");
            if (stat(p, &st) == 0 && (long long)st.st_size > best) {
                best = (long long)st.st_size;
                snprintf(path, sizeof path, "%s", p);
            }
        }
    REQUIRE(best > 0, "no golden GGUF under %s", GOLDEN_DIR);
    vlm_gguf_t *g = NULL;
    vlm_error_t err;
    REQUIRE(vlm_gguf_open(path, &g, &err) == VLM_OK, "%s", err.msg);
    const vlm_gguf_tensor_t *t = NULL;
    for (size_t i = 0; i < vlm_gguf_n_tensors(g); i++)
        if (!t || vlm_gguf_tensor_at(g, i)->nbytes > t->nbytes) t = vlm_gguf_tensor_at(g, i);
    REQUIRE(t != NULL);
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), n = (size_t)t->nbytes;
    const uint8_t *data = t->data;
    const uint8_t *base = data - vlm_gguf_data_offset(g) - t->offset; /* the mapping: the whole file */
    const size_t map_len = vlm_gguf_file_size(g);
    fprintf(stderr, "  %s: tensor %s, %zu bytes\n", path, t->name, n);
    REQUIRE(n >= 16 * page, "the largest tensor has only %zu bytes", n);
    uint8_t *copy = malloc(n);
    REQUIRE(copy != NULL);
    memcpy(copy, data, n); /* touches every page of the range */

    /* The whole pages inside the range. */
    const uintptr_t lo = ((uintptr_t)data + page - 1) & ~(uintptr_t)(page - 1);
    const uintptr_t hi = ((uintptr_t)data + n) & ~(uintptr_t)(page - 1);
    uintptr_t start = 0;
    touch_pages(data, n, page);
    const long long rss0 = smaps_rss(data, &start);
    if (rss0 < 0) {
        free(copy);
        vlm_gguf_destroy(&g);
        SKIP("no Rss line for the file's mapping in /proc/self/smaps");
    }
    CHECK(start == (uintptr_t)base, "mapping starts at %#lx, expected %p", (unsigned long)start, (const void *)base);

    /* A sub-range that starts 100 bytes into a page and is 3 pages long holds
     * 2 whole pages: exactly those go. */
    const uint8_t *sub = (const uint8_t *)lo + 100;
    CHECK(vlm_gguf_release_range(g, sub, 3 * page) == VLM_OK);
    const long long rss_sub = smaps_rss(data, &start);
    fprintf(stderr, "  Rss %lld -> %lld bytes after releasing 2 whole pages\n", rss0, rss_sub);
    CHECK(rss0 - rss_sub == 2 * (long long)page, "sub-range: Rss dropped by %lld bytes, expected %zu",
          rss0 - rss_sub, 2 * page);
    /* Less than a whole page: nothing to drop. */
    CHECK(vlm_gguf_release_range(g, sub, page - 200) == VLM_OK);
    CHECK(smaps_rss(data, &start) == rss_sub);
    CHECK(memcmp(sub, copy + (sub - data), 3 * page) == 0, "sub-range reads back wrong");

    /* The whole tensor. */
    touch_pages(data, n, page);
    const long long rss1 = smaps_rss(data, &start);
    CHECK(rss1 == rss0, "Rss %lld after touching the range again, %lld before", rss1, rss0);
    CHECK(vlm_gguf_release_range(g, data, n) == VLM_OK);
    const long long rss2 = smaps_rss(data, &start);
    const long long want = (long long)(hi - lo);
    fprintf(stderr, "  Rss %lld -> %lld bytes after releasing %s (%lld bytes of whole pages)\n", rss1, rss2,
            t->name, want);
    CHECK(rss1 - rss2 == want, "Rss dropped by %lld bytes, expected %lld", rss1 - rss2, want);
    /* File-backed: the pages come back from the file with the same bytes. */
    CHECK(memcmp(data, copy, n) == 0, "%s reads back wrong after the release", t->name);
    const long long rss3 = smaps_rss(data, &start);
    CHECK(rss3 == rss1, "Rss %lld after reading the range back, %lld before the release", rss3, rss1);
    /* The metadata around it still reads: find the tensor again by name. */
    CHECK(vlm_gguf_find_tensor(g, t->name) == t);

    /* Ranges outside the mapping. */
    CHECK(vlm_gguf_release_range(g, copy, 2 * page) == VLM_ERR_INVALID_ARG, "a heap pointer");
    CHECK(vlm_gguf_release_range(g, base - 1, 2) == VLM_ERR_INVALID_ARG, "one byte before the mapping");
    CHECK(vlm_gguf_release_range(g, base + map_len, 1) == VLM_ERR_INVALID_ARG, "just past the end");
    CHECK(vlm_gguf_release_range(g, data, map_len) == VLM_ERR_INVALID_ARG, "running past the end");
    CHECK(vlm_gguf_release_range(g, base + map_len - 1, 1) == VLM_OK, "the last byte");
    CHECK(vlm_gguf_release_range(g, data, 0) == VLM_OK, "an empty range");
    CHECK(smaps_rss(data, &start) == rss3, "the calls above dropped pages");

    /* A reader over a caller's buffer: nothing is released, the data stays. */
    uint8_t *img = malloc(map_len);
    REQUIRE(img != NULL);
    memcpy(img, base, map_len);
    vlm_gguf_t *gb = NULL;
    CHECK(vlm_gguf_open_buffer(img, map_len, &gb, &err) == VLM_OK, "%s", err.msg);
    if (gb) {
        const vlm_gguf_tensor_t *tb = vlm_gguf_find_tensor(gb, t->name);
        CHECK(tb && vlm_gguf_release_range(gb, tb->data, tb->nbytes) == VLM_OK);
        CHECK(tb && memcmp(tb->data, copy, n) == 0);
    }
    vlm_gguf_destroy(&gb);
    free(img);
    free(copy);
    vlm_gguf_destroy(&g);
}

int main(void) {
    RUN(test_dtype_table);
    RUN(test_fp16_known_values);
    RUN(test_fp16_matches_f16c);
    RUN(test_bf16);
    RUN(test_golden_files);
    RUN(test_peer_vocab_files);
    RUN(test_crafted_errors);
    RUN(test_truncated_files);
    RUN(test_corrupted_files);
    RUN(test_writer_exact_bytes);
    RUN(test_writer_reproduces_golden);
    RUN(test_writer_round_trip);
    RUN(test_getters_and_expect);
    RUN(test_release_range);
    return harness_report();
}
