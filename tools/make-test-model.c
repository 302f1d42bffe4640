/* tools/make-test-model.c - writes GGUF models with seeded random weights.
 *
 * No weights can be downloaded where vlmd is built and tested, yet tests and
 * benchmarks need models of real shapes and real quantization mixes. This
 * tool writes them: a LLaMA text model (arch `llama`, a synthetic
 * SentencePiece vocabulary, tensors in llama.cpp's names and dimension
 * order), a CLIP "mmproj" (arch `clip`, LLaVA-1.5 layout, exactly the keys
 * and tensors of the golden mmproj files), or a vocabulary-only file.
 *
 *   make-test-model text   -o FILE [--preset micro|small|tinyllama|llava7b] [shape options]
 *                          [--type f32|f16|bf16|q4_0|q4_1|q5_0|q5_1|q8_0|q4_k_s|q4_k_m|
 *                                  q5_k_s|q5_k_m|q6_k] [--seed S] [--tied] [--rope-freqs] ...
 *   make-test-model mmproj -o FILE [--preset micro|clip-l-336] [shape options] [--type f16|f32]
 *   make-test-model vocab  -o FILE [--n-vocab N]
 *   (run with --help for every option)
 *
 * Values are deterministic by seed and do not depend on the output type or
 * the thread count: each row of each tensor has its own random stream,
 * derived from the seed, the tensor name and the row index, so a Q4_K_M
 * and an F32 file made with the same seed hold the same underlying weights
 * (as llama-quantize would make them from one F32 source). The values are
 * approximately N(0, std) (a sum of four uniforms), norm weights are near 1.
 *
 * The quantization mix follows llama-quantize (llama.cpp c392e50,
 * src/llama-quant.cpp, llama_tensor_get_type) for the file types offered
 * here: output.weight (or token_embd.weight of a tied model) becomes Q6_K
 * unless the file type is Q8_0 (Q8_0 if its rows do not split into blocks);
 * for Q4_K_M / Q5_K_M, attn_v and ffn_down of the layers that use_more_bits()
 * picks become Q6_K; for Q4_K_S, the first four attn_v and the first eighth
 * of ffn_down become Q5_K; a K-quant whose row length is not a multiple of
 * 256 falls back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16).
 * 1-D tensors and norms stay F32.
 *
 * Generation and quantization run on all cores, row chunks handed out from
 * one queue. Tensor data lives in one arena: anonymous memory when it fits
 * in --max-mem-mb (default 8192), otherwise a mapped scratch file next to
 * the output that the kernel can write back, so an F16 7B model does not
 * need 14 GB of RAM.
 */
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/args.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/gguf.h"
#include "core/gguf_write.h"
#include "core/pool.h"
#include "core/quant.h"

/* ==== small helpers ===================================================== */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t fnv1a64(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
    return h;
}

/* ==== ggml types and llama.cpp file types =============================== */

typedef struct type_name {
    const char *name;
    uint32_t type;
} type_name_t;

static const type_name_t k_types[] = {
    {"f32", VLM_DTYPE_F32},   {"f16", VLM_DTYPE_F16},   {"bf16", VLM_DTYPE_BF16},
    {"q4_0", VLM_DTYPE_Q4_0}, {"q4_1", VLM_DTYPE_Q4_1}, {"q5_0", VLM_DTYPE_Q5_0},
    {"q5_1", VLM_DTYPE_Q5_1}, {"q8_0", VLM_DTYPE_Q8_0}, {"q4_k", VLM_DTYPE_Q4_K},
    {"q5_k", VLM_DTYPE_Q5_K}, {"q6_k", VLM_DTYPE_Q6_K},
};

static int parse_type(const char *s, uint32_t *out) {
    for (size_t i = 0; i < sizeof k_types / sizeof k_types[0]; i++)
        if (!strcasecmp(s, k_types[i].name)) { *out = k_types[i].type; return 0; }
    return -1;
}

/* A llama.cpp file type (llama_ftype): its number, name and default type. */
typedef struct ftype {
    const char *name;
    uint32_t ftype;            /* general.file_type */
    uint32_t default_type;     /* ggml type of most 2-D weights */
} ftype_t;

enum {
    FT_F32 = 0, FT_F16 = 1, FT_Q4_0 = 2, FT_Q4_1 = 3, FT_Q8_0 = 7, FT_Q5_0 = 8, FT_Q5_1 = 9,
    FT_Q4_K_S = 14, FT_Q4_K_M = 15, FT_Q5_K_S = 16, FT_Q5_K_M = 17, FT_Q6_K = 18, FT_BF16 = 32,
};

static const ftype_t k_ftypes[] = {
    {"f32", FT_F32, VLM_DTYPE_F32},       {"f16", FT_F16, VLM_DTYPE_F16},
    {"bf16", FT_BF16, VLM_DTYPE_BF16},    {"q4_0", FT_Q4_0, VLM_DTYPE_Q4_0},
    {"q4_1", FT_Q4_1, VLM_DTYPE_Q4_1},    {"q5_0", FT_Q5_0, VLM_DTYPE_Q5_0},
    {"q5_1", FT_Q5_1, VLM_DTYPE_Q5_1},    {"q8_0", FT_Q8_0, VLM_DTYPE_Q8_0},
    {"q4_k_s", FT_Q4_K_S, VLM_DTYPE_Q4_K}, {"q4_k_m", FT_Q4_K_M, VLM_DTYPE_Q4_K},
    {"q4_k", FT_Q4_K_M, VLM_DTYPE_Q4_K},  /* llama-quantize's alias */
    {"q5_k_s", FT_Q5_K_S, VLM_DTYPE_Q5_K}, {"q5_k_m", FT_Q5_K_M, VLM_DTYPE_Q5_K},
    {"q5_k", FT_Q5_K_M, VLM_DTYPE_Q5_K},  /* llama-quantize's alias */
    {"q6_k", FT_Q6_K, VLM_DTYPE_Q6_K},
};

static const ftype_t *parse_ftype(const char *s) {
    for (size_t i = 0; i < sizeof k_ftypes / sizeof k_ftypes[0]; i++)
        if (!strcasecmp(s, k_ftypes[i].name)) return &k_ftypes[i];
    return NULL;
}

static bool type_is_quantized(uint32_t t) {
    return t != VLM_DTYPE_F32 && t != VLM_DTYPE_F16 && t != VLM_DTYPE_BF16;
}

static int64_t block_size(uint32_t t) {
    const vlm_dtype_info_t *info = vlm_dtype_info(t);
    return info ? info->block_size : 1;
}

/* ==== the tensor plan =================================================== */

typedef enum init_kind {
    INIT_WEIGHT,   /* N(0, std) */
    INIT_NORM,     /* 1 + N(0, std): RMSNorm/LayerNorm weights, rope factors */
    INIT_BIAS,     /* N(0, std) */
} init_kind_t;

typedef struct tplan {
    char name[64];
    uint32_t type;             /* ggml type written */
    int n_dims;
    int64_t ne[4];             /* ne[0] = row length */
    init_kind_t init;
    uint64_t stream;           /* hash of the name: the tensor's random stream */
    size_t offset;             /* in the arena */
    size_t nbytes;
} tplan_t;

typedef struct plan {
    tplan_t *t;
    size_t n, cap;
    uint64_t seed;
    float std;                 /* standard deviation of weights */
} plan_t;

static int plan_add(plan_t *p, const char *name, int n_dims, const int64_t *ne, init_kind_t init,
                    vlm_error_t *err) {
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 64;
        tplan_t *t = realloc(p->t, cap * sizeof *t);
        if (!t) return vlm_error_set(err, VLM_ERR_NOMEM, "out of memory planning tensors");
        p->t = t;
        p->cap = cap;
    }
    tplan_t *t = &p->t[p->n++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->n_dims = n_dims;
    for (int i = 0; i < 4; i++) t->ne[i] = i < n_dims ? ne[i] : 1;
    t->init = init;
    t->type = VLM_DTYPE_F32;
    t->stream = fnv1a64(name);
    return VLM_OK;
}

static int64_t tplan_rows(const tplan_t *t) { return t->ne[1] * t->ne[2] * t->ne[3]; }

/* Fills x[0..n) with row `row` of tensor t: deterministic in (seed, name, row). */
static void gen_row(const plan_t *p, const tplan_t *t, int64_t row, float *x) {
    uint64_t s = p->seed * 0xD1B54A32D192ED03ull ^ t->stream ^ ((uint64_t)row + 1) * 0x9E3779B97F4A7C15ull;
    splitmix64(&s);
    /* Sum of four 16-bit uniforms: mean 2, variance 1/3 (in units of 65536). */
    const float scale = p->std * 1.7320508f / 65536.0f;
    const float base = t->init == INIT_NORM ? 1.0f : 0.0f;
    for (int64_t i = 0; i < t->ne[0]; i++) {
        uint64_t r = splitmix64(&s);
        float u = (float)(uint32_t)((r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48));
        x[i] = base + (u - 131070.0f) * scale;
    }
}

/* ==== llama-quantize's type choice ====================================== */

typedef struct text_opts {
    int64_t n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab, n_ctx;
    float rope_theta, eps;
    int64_t sliding_window;    /* 0 = no key */
    bool tied, rope_freqs, pure;
    const ftype_t *ftype;
    uint32_t output_type, token_embd_type; /* VLM_DTYPE_COUNT = not forced */
    const char *name;
} text_opts_t;

static bool use_more_bits(int64_t i_layer, int64_t n_layers) {
    return i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2;
}

/* The type llama-quantize gives a 2-D weight tensor (llama_tensor_get_type
 * at c392e50, for the file types above, no imatrix, one expert). layer is the
 * tensor's block index (-1 outside the blocks). */
static uint32_t llama_quant_type(const text_opts_t *o, const tplan_t *t, int64_t layer) {
    const uint32_t ft = o->ftype->ftype;
    uint32_t nt = o->ftype->default_type;
    const char *name = t->name;
    bool is_output = !strcmp(name, "output.weight") || (o->tied && !strcmp(name, "token_embd.weight"));
    if (is_output) {
        if (t->ne[0] % block_size(nt) != 0) nt = VLM_DTYPE_Q8_0;
        else if (nt != VLM_DTYPE_Q8_0) nt = VLM_DTYPE_Q6_K;
    } else if (!strcmp(name, "token_embd.weight")) {
        /* unchanged for these file types */
    } else if (strstr(name, "attn_v.weight")) {
        if ((ft == FT_Q4_K_M || ft == FT_Q5_K_M) && use_more_bits(layer, o->n_layer)) nt = VLM_DTYPE_Q6_K;
        else if (ft == FT_Q4_K_S && layer < 4) nt = VLM_DTYPE_Q5_K;
        /* llama.cpp types an 80-layer GQA llama as 70B and gives its attn_v more bits */
        if (o->n_layer == 80 && o->n_head != o->n_head_kv && nt == VLM_DTYPE_Q4_K) nt = VLM_DTYPE_Q5_K;
    } else if (strstr(name, "ffn_down")) {
        if (ft == FT_Q4_K_M && use_more_bits(layer, o->n_layer)) nt = VLM_DTYPE_Q6_K;
        else if (ft == FT_Q5_K_M && use_more_bits(layer, o->n_layer)) nt = VLM_DTYPE_Q6_K;
        else if (ft == FT_Q4_K_S && layer < o->n_layer / 8) nt = VLM_DTYPE_Q5_K;
    }
    /* Rows that do not split into the type's blocks fall back. */
    if (t->ne[0] % block_size(nt) != 0) {
        switch (nt) {
        case VLM_DTYPE_Q4_K: nt = VLM_DTYPE_Q5_0; break;
        case VLM_DTYPE_Q5_K: nt = VLM_DTYPE_Q5_1; break;
        case VLM_DTYPE_Q6_K: nt = VLM_DTYPE_Q8_0; break;
        default: break;
        }
        if (t->ne[0] % block_size(nt) != 0) nt = VLM_DTYPE_F16;
    }
    return nt;
}

/* Picks every tensor's type as llama-quantize (or the converter, for F32,
 * F16 and BF16 files) would. */
static int assign_text_types(plan_t *p, const text_opts_t *o, vlm_error_t *err) {
    for (size_t i = 0; i < p->n; i++) {
        tplan_t *t = &p->t[i];
        size_t len = strlen(t->name);
        bool quantize = t->n_dims >= 2 && len >= 6 && !strcmp(t->name + len - 6, "weight") &&
                        !strstr(t->name, "_norm.weight");
        if (!quantize) { t->type = VLM_DTYPE_F32; continue; }
        int64_t layer = -1;
        if (!strncmp(t->name, "blk.", 4)) layer = strtoll(t->name + 4, NULL, 10);
        uint32_t nt = o->ftype->default_type;
        if (type_is_quantized(nt) && !o->pure) nt = llama_quant_type(o, t, layer);
        if (o->token_embd_type != VLM_DTYPE_COUNT && !strcmp(t->name, "token_embd.weight"))
            nt = o->token_embd_type;
        if (o->output_type != VLM_DTYPE_COUNT && !strcmp(t->name, "output.weight"))
            nt = o->output_type;
        if (t->ne[0] % block_size(nt) != 0)
            return vlm_error_set(err, VLM_ERR_SHAPE,
                                 "%s: rows of %lld elements do not split into %s blocks of %lld",
                                 t->name, (long long)t->ne[0], vlm_dtype_name(nt),
                                 (long long)block_size(nt));
        t->type = nt;
    }
    return VLM_OK;
}

/* ==== the synthetic SentencePiece vocabulary ============================ */

/* Token strings, scores and types (llama_token_type numbering). */
typedef struct vocab {
    char **tokens;             /* [n] NUL-terminated, each its own allocation */
    float *scores;             /* [n] */
    int32_t *types;            /* [n] 1 normal, 2 unknown, 3 control, 6 byte */
    int64_t n;
} vocab_t;

static void vocab_deinit(vocab_t *v) {
    if (v->tokens)
        for (int64_t i = 0; i < v->n; i++) free(v->tokens[i]);
    free(v->tokens);
    free(v->scores);
    free(v->types);
    memset(v, 0, sizeof *v);
}

#define SPM_SPACE "\xE2\x96\x81" /* U+2581, SentencePiece's space */

/* Builds n tokens: <unk>, <s>, </s>, the 256 byte tokens <0xNN>, then word
 * pieces in decreasing score (letters in English frequency order: "▁x", "xy",
 * "▁xy", "xyz", "▁xyz", ...), then the single characters with the lowest
 * scores, like a trained SentencePiece model with byte fallback. */
static int vocab_build(vocab_t *v, int64_t n, vlm_error_t *err) {
    static const char letters[] = "etaoinshrdlcumwfgypbvkjxqz";
    static const char singles[] =
        "etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLCUMWFGYPBVKJXQZ0123456789.,!?;:'\"-()[]/&%#*+=<>@_$";
    const int64_t n_fixed = 3 + 256;
    if (n < n_fixed)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "--n-vocab %lld: needs at least %lld tokens "
                             "(<unk>, <s>, </s> and 256 byte tokens)", (long long)n, (long long)n_fixed);
    memset(v, 0, sizeof *v);
    v->tokens = calloc((size_t)n, sizeof *v->tokens);
    v->scores = calloc((size_t)n, sizeof *v->scores);
    v->types = calloc((size_t)n, sizeof *v->types);
    v->n = n;
    if (!v->tokens || !v->scores || !v->types) goto fail_nomem;

    int64_t n_single = (int64_t)strlen(singles) + 1; /* + "▁" */
    if (n_single > n - n_fixed) n_single = n - n_fixed;
    int64_t n_piece = n - n_fixed - n_single;
    char buf[32];
    int64_t k = 0;
    v->tokens[k] = strdup("<unk>"); v->types[k++] = 2;
    v->tokens[k] = strdup("<s>"); v->types[k++] = 3;
    v->tokens[k] = strdup("</s>"); v->types[k++] = 3;
    for (int b = 0; b < 256; b++) {
        snprintf(buf, sizeof buf, "<0x%02X>", b);
        v->tokens[k] = strdup(buf);
        v->types[k++] = 6;
    }
    /* Word pieces: group L (L = 1, 2, ...) holds "▁"+s for |s| = L, then s
     * for |s| = L + 1, so every piece can be built from two shorter ones. */
    int64_t made = 0;
    for (int len = 1; made < n_piece && len <= 6; len++) {
        for (int variant = 0; variant < 2 && made < n_piece; variant++) {
            int slen = variant == 0 ? len : len + 1;
            int64_t count = 1;
            for (int j = 0; j < slen; j++) count *= 26;
            for (int64_t c = 0; c < count && made < n_piece; c++) {
                char *o = buf;
                if (variant == 0) { memcpy(o, SPM_SPACE, 3); o += 3; }
                int64_t rem = c;
                char tmp[8];
                for (int j = slen - 1; j >= 0; j--) { tmp[j] = letters[rem % 26]; rem /= 26; }
                memcpy(o, tmp, (size_t)slen);
                o[slen] = '\0';
                v->tokens[k] = strdup(buf);
                v->types[k] = 1;
                v->scores[k] = -(float)(made + 1);
                k++;
                made++;
            }
        }
    }
    if (made < n_piece)
        return vocab_deinit(v), vlm_error_set(err, VLM_ERR_INVALID_ARG, "--n-vocab %lld is too large", (long long)n);
    for (int64_t j = 0; j < n_single; j++) {
        if (j == 0) snprintf(buf, sizeof buf, SPM_SPACE);
        else snprintf(buf, sizeof buf, "%c", singles[j - 1]);
        v->tokens[k] = strdup(buf);
        v->types[k] = 1;
        v->scores[k] = -(float)(n_piece + j + 1);
        k++;
    }
    for (int64_t i = 0; i < n; i++)
        if (!v->tokens[i]) goto fail_nomem;
    return VLM_OK;

fail_nomem:
    vocab_deinit(v);
    return vlm_error_set(err, VLM_ERR_NOMEM, "out of memory building a %lld-token vocabulary", (long long)n);
}

/* ==== metadata ========================================================== */

/* Collects the first failure of a run of writer calls. */
typedef struct kv_sink {
    vlm_gguf_writer_t *w;
    int rc;
    const char *bad_key;
} kv_sink_t;

static void kv_check(kv_sink_t *s, int rc, const char *key) {
    if (s->rc == VLM_OK && rc != VLM_OK) { s->rc = rc; s->bad_key = key; }
}
#define KV(s, fn, key, ...) kv_check((s), vlm_gguf_writer_##fn((s)->w, (key), __VA_ARGS__), (key))

static void put_text_hparams(kv_sink_t *s, const text_opts_t *o) {
    KV(s, set_str, "general.architecture", "llama");
    KV(s, set_str, "general.name", o->name);
    KV(s, set_u32, "general.file_type", o->ftype->ftype);
    KV(s, set_u32, "llama.vocab_size", (uint32_t)o->n_vocab);
    KV(s, set_u32, "llama.context_length", (uint32_t)o->n_ctx);
    KV(s, set_u32, "llama.embedding_length", (uint32_t)o->n_embd);
    KV(s, set_u32, "llama.block_count", (uint32_t)o->n_layer);
    KV(s, set_u32, "llama.feed_forward_length", (uint32_t)o->n_ff);
    KV(s, set_u32, "llama.rope.dimension_count", (uint32_t)(o->n_embd / o->n_head));
    KV(s, set_u32, "llama.attention.head_count", (uint32_t)o->n_head);
    KV(s, set_u32, "llama.attention.head_count_kv", (uint32_t)o->n_head_kv);
    KV(s, set_f32, "llama.attention.layer_norm_rms_epsilon", o->eps);
    KV(s, set_f32, "llama.rope.freq_base", o->rope_theta);
    if (o->sliding_window > 0)
        KV(s, set_u32, "llama.attention.sliding_window", (uint32_t)o->sliding_window);
}

static void put_vocab(kv_sink_t *s, const vocab_t *v) {
    KV(s, set_str, "tokenizer.ggml.model", "llama");
    KV(s, set_str, "tokenizer.ggml.pre", "default");
    KV(s, set_arr_str, "tokenizer.ggml.tokens", (const char *const *)v->tokens, NULL, (uint64_t)v->n);
    KV(s, set_arr, "tokenizer.ggml.scores", VLM_GGUF_TYPE_FLOAT32, v->scores, (uint64_t)v->n);
    KV(s, set_arr, "tokenizer.ggml.token_type", VLM_GGUF_TYPE_INT32, v->types, (uint64_t)v->n);
    KV(s, set_u32, "tokenizer.ggml.bos_token_id", 1);
    KV(s, set_u32, "tokenizer.ggml.eos_token_id", 2);
    KV(s, set_u32, "tokenizer.ggml.unknown_token_id", 0);
    KV(s, set_bool, "tokenizer.ggml.add_bos_token", true);
    KV(s, set_bool, "tokenizer.ggml.add_eos_token", false);
}

/* ==== the arena and the parallel fill =================================== */

/* Tensor data for the whole file, in anonymous memory or, when larger than
 * the memory budget, in a mapped scratch file that is unlinked at once. */
typedef struct arena {
    uint8_t *base;
    size_t size;
    bool file_backed;
} arena_t;

static int arena_init(arena_t *a, size_t size, size_t max_mem, const char *out_path, vlm_error_t *err) {
    memset(a, 0, sizeof *a);
    a->size = size ? size : 1;
    if (a->size <= max_mem) {
        void *m = mmap(NULL, a->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED)
            return vlm_error_set(err, VLM_ERR_NOMEM, "cannot map %zu MiB of memory", a->size >> 20);
        a->base = m;
        return VLM_OK;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s.scratch", out_path);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return vlm_error_set(err, VLM_ERR_IO, "%s: cannot create scratch file: %s", path, strerror(errno));
    unlink(path); /* the space lives until the mapping goes */
    if (ftruncate(fd, (off_t)a->size) != 0) {
        int e = errno;
        close(fd);
        return vlm_error_set(err, VLM_ERR_IO, "%s: cannot size scratch file to %zu MiB: %s", path,
                             a->size >> 20, strerror(e));
    }
    void *m = mmap(NULL, a->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED)
        return vlm_error_set(err, VLM_ERR_NOMEM, "%s: cannot map scratch file", path);
    a->base = m;
    a->file_backed = true;
    return VLM_OK;
}

static void arena_deinit(arena_t *a) {
    if (a->base) munmap(a->base, a->size);
    memset(a, 0, sizeof *a);
}

typedef struct chunk {
    uint32_t tensor;
    int64_t row0, row1;
} chunk_t;

typedef struct fill_ctx {
    const plan_t *plan;
    arena_t *arena;
    chunk_t *chunks;           /* [n_chunks] */
    size_t n_chunks;
    atomic_size_t next;
    atomic_size_t done_bytes;
    size_t total_bytes;
    float *rowbuf;             /* [n_threads][max_row] */
    int64_t max_row;
    atomic_int rc;
    char bad_tensor[64];
    bool progress;
    double t0, last_print;
} fill_ctx_t;

static void fill_worker(void *arg, int ith, int nth) {
    (void)nth;
    fill_ctx_t *c = arg;
    float *x = c->rowbuf + (size_t)ith * (size_t)c->max_row; /* [max_row] */
    for (;;) {
        size_t k = atomic_fetch_add(&c->next, 1);
        if (k >= c->n_chunks || atomic_load(&c->rc) != VLM_OK) break;
        const chunk_t *ch = &c->chunks[k];
        const tplan_t *t = &c->plan->t[ch->tensor];
        size_t row_bytes = vlm_dtype_row_size(t->type, t->ne[0]);
        for (int64_t r = ch->row0; r < ch->row1; r++) {
            gen_row(c->plan, t, r, x);
            uint8_t *dst = c->arena->base + t->offset + (size_t)r * row_bytes;
            int rc = vlm_quantize_row(t->type, x, dst, t->ne[0]);
            if (rc != VLM_OK) {
                int expected = VLM_OK;
                if (atomic_compare_exchange_strong(&c->rc, &expected, rc))
                    snprintf(c->bad_tensor, sizeof c->bad_tensor, "%s", t->name);
                return;
            }
        }
        size_t done = atomic_fetch_add(&c->done_bytes, row_bytes * (size_t)(ch->row1 - ch->row0));
        if (ith == 0 && c->progress) {
            double t1 = now_s();
            if (t1 - c->last_print > 1.0) {
                c->last_print = t1;
                fprintf(stderr, "\r  %5.1f%% of %.0f MiB, %.0f s", 100.0 * (double)done / (double)c->total_bytes,
                        (double)c->total_bytes / 1048576.0, t1 - c->t0);
            }
        }
    }
}

/* Lays the tensors out in a fresh arena and fills them on n_threads threads. */
static int plan_fill(plan_t *p, arena_t *arena, int n_threads, size_t max_mem, const char *out_path,
                     vlm_error_t *err) {
    size_t total = 0, n_chunks = 0;
    int64_t max_row = 1;
    for (size_t i = 0; i < p->n; i++) {
        tplan_t *t = &p->t[i];
        size_t row_bytes = vlm_dtype_row_size(t->type, t->ne[0]);
        if (row_bytes == 0)
            return vlm_error_set(err, VLM_ERR_SHAPE, "%s: %s rows of %lld elements", t->name,
                                 vlm_dtype_name(t->type), (long long)t->ne[0]);
        t->nbytes = row_bytes * (size_t)tplan_rows(t);
        t->offset = total;
        total += (t->nbytes + 63) & ~(size_t)63;
        int64_t rows_per_chunk = 262144 / t->ne[0] > 0 ? 262144 / t->ne[0] : 1;
        n_chunks += (size_t)((tplan_rows(t) + rows_per_chunk - 1) / rows_per_chunk);
        if (t->ne[0] > max_row) max_row = t->ne[0];
    }
    int rc = arena_init(arena, total, max_mem, out_path, err);
    if (rc != VLM_OK) return rc;

    fill_ctx_t c = {0};
    c.plan = p;
    c.arena = arena;
    c.total_bytes = total ? total : 1;
    c.max_row = max_row;
    c.chunks = malloc((n_chunks ? n_chunks : 1) * sizeof *c.chunks);
    c.rowbuf = malloc((size_t)n_threads * (size_t)max_row * sizeof(float));
    vlm_pool_t *pool = vlm_pool_new(n_threads);
    if (!c.chunks || !c.rowbuf || !pool) {
        rc = vlm_error_set(err, VLM_ERR_NOMEM, "out of memory starting %d threads", n_threads);
        goto done;
    }
    size_t k = 0;
    for (size_t i = 0; i < p->n; i++) {
        const tplan_t *t = &p->t[i];
        int64_t rows = tplan_rows(t);
        int64_t rows_per_chunk = 262144 / t->ne[0] > 0 ? 262144 / t->ne[0] : 1;
        for (int64_t r = 0; r < rows; r += rows_per_chunk)
            c.chunks[k++] = (chunk_t){(uint32_t)i, r, r + rows_per_chunk < rows ? r + rows_per_chunk : rows};
    }
    c.n_chunks = k;
    atomic_init(&c.next, 0);
    atomic_init(&c.done_bytes, 0);
    atomic_init(&c.rc, VLM_OK);
    c.progress = isatty(2) && total > (64u << 20);
    c.t0 = c.last_print = now_s();
    vlm_pool_run(pool, fill_worker, &c);
    if (c.progress) fprintf(stderr, "\r%60s\r", "");
    rc = atomic_load(&c.rc);
    if (rc != VLM_OK)
        vlm_error_set(err, rc, "%s: cannot quantize to this type (vlm_quantize_row: %s)", c.bad_tensor,
                      vlm_strerror(rc));
done:
    vlm_pool_destroy(&pool);
    free(c.rowbuf);
    free(c.chunks);
    if (rc != VLM_OK) arena_deinit(arena);
    return rc;
}

static int plan_add_to_writer(const plan_t *p, const arena_t *a, vlm_gguf_writer_t *w, vlm_error_t *err) {
    for (size_t i = 0; i < p->n; i++) {
        const tplan_t *t = &p->t[i];
        int rc = vlm_gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne, a->base + t->offset, err);
        if (rc != VLM_OK) return rc;
    }
    return VLM_OK;
}

/* ==== verification ====================================================== */

/* Largest relative RMS error expected from each type on these values. */
static double type_error_bound(uint32_t t) {
    switch (t) {
    case VLM_DTYPE_F32: return 0.0;
    case VLM_DTYPE_F16: return 1e-3;
    case VLM_DTYPE_BF16: return 8e-3;
    case VLM_DTYPE_Q8_0: return 0.01;
    case VLM_DTYPE_Q6_K: return 0.04;
    case VLM_DTYPE_Q5_0: case VLM_DTYPE_Q5_1: case VLM_DTYPE_Q5_K: return 0.08;
    default: return 0.16;
    }
}

/* Re-opens the written file with the GGUF reader, checks that every tensor
 * is there with the planned type, shape and size, and that its first and
 * last rows dequantize to the generated values within the type's error. */
static int verify_file(const char *path, const plan_t *p, vlm_error_t *err) {
    vlm_gguf_t *g = NULL;
    int rc = vlm_gguf_open(path, &g, err);
    if (rc != VLM_OK) return rc;
    float *x = NULL, *y = NULL;
    int64_t max_row = 1;
    for (size_t i = 0; i < p->n; i++)
        if (p->t[i].ne[0] > max_row) max_row = p->t[i].ne[0];
    x = malloc((size_t)max_row * sizeof *x);
    y = malloc((size_t)max_row * sizeof *y);
    if (!x || !y) { rc = vlm_error_set(err, VLM_ERR_NOMEM, "verify: out of memory"); goto done; }
    if (vlm_gguf_n_tensors(g) != p->n) {
        rc = vlm_error_set(err, VLM_ERR_FORMAT, "verify: %s has %zu tensors, planned %zu", path,
                           vlm_gguf_n_tensors(g), p->n);
        goto done;
    }
    double worst = 0.0;
    const char *worst_name = "";
    for (size_t i = 0; i < p->n; i++) {
        const tplan_t *t = &p->t[i];
        const vlm_gguf_tensor_t *gt = vlm_gguf_find_tensor(g, t->name);
        if (!gt) { rc = vlm_error_set(err, VLM_ERR_NOT_FOUND, "verify: %s missing", t->name); goto done; }
        if (gt->type != t->type || (int)gt->n_dims != t->n_dims || gt->nbytes != t->nbytes) {
            rc = vlm_error_set(err, VLM_ERR_FORMAT, "verify: %s is %s/%u dims/%llu bytes, planned %s/%d/%zu",
                               t->name, vlm_dtype_name(gt->type), gt->n_dims, (unsigned long long)gt->nbytes,
                               vlm_dtype_name(t->type), t->n_dims, t->nbytes);
            goto done;
        }
        for (int d = 0; d < 4; d++)
            if (gt->ne[d] != t->ne[d]) {
                rc = vlm_error_set(err, VLM_ERR_SHAPE, "verify: %s ne[%d] = %lld, planned %lld", t->name, d,
                                   (long long)gt->ne[d], (long long)t->ne[d]);
                goto done;
            }
        size_t row_bytes = vlm_dtype_row_size(t->type, t->ne[0]);
        int64_t rows[2] = {0, tplan_rows(t) - 1};
        for (int j = 0; j < 2; j++) {
            gen_row(p, t, rows[j], x);
            rc = vlm_dtype_dequantize_row(t->type, (const uint8_t *)gt->data + (size_t)rows[j] * row_bytes, y, t->ne[0]);
            if (rc != VLM_OK) {
                vlm_error_set(err, rc, "verify: %s: cannot dequantize %s", t->name, vlm_dtype_name(t->type));
                goto done;
            }
            double se = 0.0, sx = 0.0;
            for (int64_t e = 0; e < t->ne[0]; e++) {
                double base = t->init == INIT_NORM ? 1.0 : 0.0; /* error relative to the spread */
                se += ((double)y[e] - x[e]) * ((double)y[e] - x[e]);
                sx += ((double)x[e] - base) * ((double)x[e] - base);
            }
            double rel = sx > 0 ? sqrt(se / sx) : sqrt(se);
            if (rel > worst) { worst = rel; worst_name = t->name; }
            if (rel > type_error_bound(t->type)) {
                rc = vlm_error_set(err, VLM_ERR_FORMAT, "verify: %s row %lld: relative RMS error %.4g "
                                   "exceeds %.3g for %s", t->name, (long long)rows[j], rel,
                                   type_error_bound(t->type), vlm_dtype_name(t->type));
                goto done;
            }
        }
    }
    fprintf(stderr, "verify: %zu tensors match the plan; worst relative RMS error %.4f (%s)\n", p->n,
            worst, worst_name);
done:
    free(y);
    free(x);
    vlm_gguf_destroy(&g);
    return rc;
}

/* ==== writing =========================================================== */

typedef struct common_opts {
    const char *out;
    uint64_t seed;
    float std;
    int n_threads;
    size_t max_mem;
    bool verify;
    bool quiet;
} common_opts_t;

static void print_summary(const char *path, const plan_t *p, double secs) {
    size_t count[VLM_DTYPE_COUNT] = {0}, bytes = 0;
    for (size_t i = 0; i < p->n; i++) {
        if (p->t[i].type < VLM_DTYPE_COUNT) count[p->t[i].type]++;
        bytes += p->t[i].nbytes;
    }
    struct stat st;
    long long fsize = stat(path, &st) == 0 ? (long long)st.st_size : -1;
    fprintf(stderr, "wrote %s: %zu tensors (", path, p->n);
    bool first = true;
    for (uint32_t t = 0; t < VLM_DTYPE_COUNT; t++)
        if (count[t]) { fprintf(stderr, "%s%s x %zu", first ? "" : ", ", vlm_dtype_name(t), count[t]); first = false; }
    fprintf(stderr, "), %.1f MiB of tensor data, file %.1f MiB, %.1f s\n", (double)bytes / 1048576.0,
            (double)fsize / 1048576.0, secs);
}

/* Fills the plan's tensors, adds them to w (which holds the metadata) and
 * writes the file. */
static int write_model(vlm_gguf_writer_t *w, plan_t *p, const common_opts_t *co, vlm_error_t *err) {
    double t0 = now_s();
    arena_t arena;
    int rc = plan_fill(p, &arena, co->n_threads, co->max_mem, co->out, err);
    if (rc != VLM_OK) return rc;
    rc = plan_add_to_writer(p, &arena, w, err);
    if (rc == VLM_OK) rc = vlm_gguf_writer_write(w, co->out, err);
    arena_deinit(&arena);
    if (rc != VLM_OK) return rc;
    if (!co->quiet) print_summary(co->out, p, now_s() - t0);
    if (co->verify) rc = verify_file(co->out, p, err);
    return rc;
}

/* ==== text models ======================================================= */

static int build_text_plan(plan_t *p, const text_opts_t *o, vlm_error_t *err) {
    const int64_t head_dim = o->n_embd / o->n_head;
    const int64_t n_embd_kv = head_dim * o->n_head_kv;
    int rc = VLM_OK;
    char name[64];
#define ADD(nm, nd, init, ...)                                                      \
    do {                                                                            \
        const int64_t ne_[] = {__VA_ARGS__};                                        \
        rc = plan_add(p, (nm), (nd), ne_, (init), err);                             \
        if (rc != VLM_OK) return rc;                                                \
    } while (0)
    if (o->rope_freqs) ADD("rope_freqs.weight", 1, INIT_NORM, head_dim / 2);
    ADD("token_embd.weight", 2, INIT_WEIGHT, o->n_embd, o->n_vocab);
    for (int64_t l = 0; l < o->n_layer; l++) {
#define LNAME(suffix) (snprintf(name, sizeof name, "blk.%lld." suffix, (long long)l), name)
        ADD(LNAME("attn_norm.weight"), 1, INIT_NORM, o->n_embd);
        ADD(LNAME("attn_q.weight"), 2, INIT_WEIGHT, o->n_embd, o->n_embd);
        ADD(LNAME("attn_k.weight"), 2, INIT_WEIGHT, o->n_embd, n_embd_kv);
        ADD(LNAME("attn_v.weight"), 2, INIT_WEIGHT, o->n_embd, n_embd_kv);
        ADD(LNAME("attn_output.weight"), 2, INIT_WEIGHT, o->n_embd, o->n_embd);
        ADD(LNAME("ffn_norm.weight"), 1, INIT_NORM, o->n_embd);
        ADD(LNAME("ffn_gate.weight"), 2, INIT_WEIGHT, o->n_embd, o->n_ff);
        ADD(LNAME("ffn_up.weight"), 2, INIT_WEIGHT, o->n_embd, o->n_ff);
        ADD(LNAME("ffn_down.weight"), 2, INIT_WEIGHT, o->n_ff, o->n_embd);
#undef LNAME
    }
    ADD("output_norm.weight", 1, INIT_NORM, o->n_embd);
    if (!o->tied) ADD("output.weight", 2, INIT_WEIGHT, o->n_embd, o->n_vocab);
#undef ADD
    return assign_text_types(p, o, err);
}

static int check_text_opts(const text_opts_t *o, vlm_error_t *err) {
    if (o->n_embd <= 0 || o->n_layer <= 0 || o->n_head <= 0 || o->n_head_kv <= 0 || o->n_ff <= 0 ||
        o->n_vocab <= 0 || o->n_ctx <= 0)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "every size must be positive");
    if (o->n_embd % o->n_head != 0 || (o->n_embd / o->n_head) % 2 != 0)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "--n-embd %lld must be --n-head %lld times an even head size",
                             (long long)o->n_embd, (long long)o->n_head);
    if (o->n_head % o->n_head_kv != 0)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "--n-head %lld must be a multiple of --n-head-kv %lld",
                             (long long)o->n_head, (long long)o->n_head_kv);
    if (o->n_embd > UINT32_MAX || o->n_ff > UINT32_MAX || o->n_vocab > UINT32_MAX || o->n_ctx > UINT32_MAX)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "sizes must fit in 32 bits");
    return VLM_OK;
}

static int cmd_text(const text_opts_t *o, const common_opts_t *co, bool vocab_only, vlm_error_t *err) {
    int rc = check_text_opts(o, err);
    if (rc != VLM_OK) return rc;
    plan_t p = {.seed = co->seed, .std = co->std};
    vocab_t v = {0};
    vlm_gguf_writer_t *w = vlm_gguf_writer_new();
    if (!w) { rc = vlm_error_set(err, VLM_ERR_NOMEM, "out of memory"); goto done; }
    rc = vocab_build(&v, o->n_vocab, err);
    if (rc != VLM_OK) goto done;
    kv_sink_t s = {w, VLM_OK, NULL};
    put_text_hparams(&s, o);
    put_vocab(&s, &v);
    if (type_is_quantized(o->ftype->default_type) && !vocab_only)
        KV(&s, set_u32, "general.quantization_version", 2);
    if (s.rc != VLM_OK) { rc = vlm_error_set(err, s.rc, "cannot set metadata key %s", s.bad_key); goto done; }
    if (!vocab_only) {
        rc = build_text_plan(&p, o, err);
        if (rc != VLM_OK) goto done;
    }
    rc = write_model(w, &p, co, err);
done:
    vlm_gguf_writer_destroy(&w);
    vocab_deinit(&v);
    free(p.t);
    return rc;
}

/* ==== mmproj (CLIP + LLaVA projector) ==================================== */

typedef struct vision_opts {
    int64_t image_size, patch, n_embd, n_layer, n_head, n_ff, n_embd_text;
    int64_t projection_dim;    /* clip.vision.projection_dim; 0 = n_embd_text (as the golden files) */
    float eps;
    uint32_t type;             /* F16 or F32 for the 2-D+ weights */
    const char *name;
} vision_opts_t;

static int cmd_mmproj(const vision_opts_t *o, const common_opts_t *co, vlm_error_t *err) {
    if (o->image_size <= 0 || o->patch <= 0 || o->n_embd <= 0 || o->n_layer <= 0 || o->n_head <= 0 ||
        o->n_ff <= 0 || o->n_embd_text <= 0)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "every size must be positive");
    if (o->image_size % o->patch != 0)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "--image-size %lld is not a multiple of --patch %lld",
                             (long long)o->image_size, (long long)o->patch);
    if (o->n_embd % o->n_head != 0)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "--n-embd %lld is not a multiple of --n-head %lld",
                             (long long)o->n_embd, (long long)o->n_head);
    if (o->type != VLM_DTYPE_F16 && o->type != VLM_DTYPE_F32)
        return vlm_error_set(err, VLM_ERR_UNSUPPORTED, "mmproj --type must be f16 or f32");
    const int64_t n_patches = (o->image_size / o->patch) * (o->image_size / o->patch);
    plan_t p = {.seed = co->seed, .std = co->std};
    int rc = VLM_OK;
    vlm_gguf_writer_t *w = vlm_gguf_writer_new();
    if (!w) return vlm_error_set(err, VLM_ERR_NOMEM, "out of memory");

    static const float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
    static const float stdv[3] = {0.26862954f, 0.26130258f, 0.27577711f};
    kv_sink_t s = {w, VLM_OK, NULL};
    KV(&s, set_str, "general.architecture", "clip");
    KV(&s, set_bool, "clip.has_text_encoder", false);
    KV(&s, set_bool, "clip.has_vision_encoder", true);
    KV(&s, set_bool, "clip.has_llava_projector", true);
    KV(&s, set_u32, "general.file_type", o->type == VLM_DTYPE_F16 ? 1u : 0u);
    KV(&s, set_str, "general.name", o->name);
    KV(&s, set_str, "general.description", "image encoder for LLaVA");
    KV(&s, set_str, "clip.projector_type", "mlp");
    KV(&s, set_u32, "clip.vision.image_size", (uint32_t)o->image_size);
    KV(&s, set_u32, "clip.vision.patch_size", (uint32_t)o->patch);
    KV(&s, set_u32, "clip.vision.embedding_length", (uint32_t)o->n_embd);
    KV(&s, set_u32, "clip.vision.feed_forward_length", (uint32_t)o->n_ff);
    /* clip.cpp does not use projection_dim for the MLP projector: real LLaVA-1.5
     * files store CLIP's own 768 there, the golden files n_embd_text. */
    KV(&s, set_u32, "clip.vision.projection_dim", (uint32_t)(o->projection_dim ? o->projection_dim : o->n_embd_text));
    KV(&s, set_u32, "clip.vision.attention.head_count", (uint32_t)o->n_head);
    KV(&s, set_f32, "clip.vision.attention.layer_norm_epsilon", o->eps);
    KV(&s, set_u32, "clip.vision.block_count", (uint32_t)o->n_layer);
    KV(&s, set_arr, "clip.vision.image_mean", VLM_GGUF_TYPE_FLOAT32, mean, 3);
    KV(&s, set_arr, "clip.vision.image_std", VLM_GGUF_TYPE_FLOAT32, stdv, 3);
    KV(&s, set_bool, "clip.use_gelu", false);
    if (s.rc != VLM_OK) { rc = vlm_error_set(err, s.rc, "cannot set metadata key %s", s.bad_key); goto done; }

    char name[64];
#define ADD(nm, init, ...)                                                              \
    do {                                                                                \
        const int64_t ne_[] = {__VA_ARGS__};                                            \
        int nd_ = (int)(sizeof ne_ / sizeof ne_[0]);                                    \
        rc = plan_add(&p, (nm), nd_, ne_, (init), err);                                 \
        if (rc != VLM_OK) goto done;                                                    \
        p.t[p.n - 1].type = nd_ >= 2 ? o->type : VLM_DTYPE_F32;                         \
    } while (0)
    /* Order and shapes as llama.cpp's LLaVA converter writes them (and as
     * the golden mmproj files hold them). */
    ADD("mm.0.weight", INIT_WEIGHT, o->n_embd, o->n_embd_text);
    ADD("mm.0.bias", INIT_BIAS, o->n_embd_text);
    ADD("mm.2.weight", INIT_WEIGHT, o->n_embd_text, o->n_embd_text);
    ADD("mm.2.bias", INIT_BIAS, o->n_embd_text);
    ADD("v.class_embd", INIT_WEIGHT, o->n_embd);
    ADD("v.patch_embd.weight", INIT_WEIGHT, o->patch, o->patch, 3, o->n_embd);
    ADD("v.position_embd.weight", INIT_WEIGHT, o->n_embd, n_patches + 1);
    ADD("v.pre_ln.weight", INIT_NORM, o->n_embd);
    ADD("v.pre_ln.bias", INIT_BIAS, o->n_embd);
    for (int64_t l = 0; l < o->n_layer; l++) {
#define VNAME(suffix) (snprintf(name, sizeof name, "v.blk.%lld." suffix, (long long)l), name)
        ADD(VNAME("attn_k.weight"), INIT_WEIGHT, o->n_embd, o->n_embd);
        ADD(VNAME("attn_k.bias"), INIT_BIAS, o->n_embd);
        ADD(VNAME("attn_q.weight"), INIT_WEIGHT, o->n_embd, o->n_embd);
        ADD(VNAME("attn_q.bias"), INIT_BIAS, o->n_embd);
        ADD(VNAME("attn_v.weight"), INIT_WEIGHT, o->n_embd, o->n_embd);
        ADD(VNAME("attn_v.bias"), INIT_BIAS, o->n_embd);
        ADD(VNAME("attn_out.weight"), INIT_WEIGHT, o->n_embd, o->n_embd);
        ADD(VNAME("attn_out.bias"), INIT_BIAS, o->n_embd);
        ADD(VNAME("ln1.weight"), INIT_NORM, o->n_embd);
        ADD(VNAME("ln1.bias"), INIT_BIAS, o->n_embd);
        /* ffn_down is fc1 (n_embd -> n_ff) and ffn_up is fc2, as llama.cpp names them */
        ADD(VNAME("ffn_down.weight"), INIT_WEIGHT, o->n_embd, o->n_ff);
        ADD(VNAME("ffn_down.bias"), INIT_BIAS, o->n_ff);
        ADD(VNAME("ffn_up.weight"), INIT_WEIGHT, o->n_ff, o->n_embd);
        ADD(VNAME("ffn_up.bias"), INIT_BIAS, o->n_embd);
        ADD(VNAME("ln2.weight"), INIT_NORM, o->n_embd);
        ADD(VNAME("ln2.bias"), INIT_BIAS, o->n_embd);
#undef VNAME
    }
#undef ADD
    rc = write_model(w, &p, co, err);
done:
    vlm_gguf_writer_destroy(&w);
    free(p.t);
    return rc;
}

/* ==== command line ====================================================== */

static void usage(FILE *f) {
    fprintf(f,
        "usage:\n"
        "  make-test-model text   -o FILE [--preset micro|small|tinyllama|llava7b]\n"
        "                         [--n-embd N] [--n-layer N] [--n-head N] [--n-head-kv N] [--n-ff N]\n"
        "                         [--n-vocab N] [--n-ctx N] [--rope-theta F] [--eps F]\n"
        "                         [--type f32|f16|bf16|q4_0|q4_1|q5_0|q5_1|q8_0|q4_k_s|q4_k_m|q5_k_s|q5_k_m|q6_k]\n"
        "                         [--pure] [--output-type T] [--token-embd-type T]\n"
        "                         [--tied] [--rope-freqs] [--sliding-window N] [--name S]\n"
        "  make-test-model mmproj -o FILE [--preset micro|small|clip-l-336]\n"
        "                         [--image-size S] [--patch P] [--n-embd N] [--n-layer N] [--n-head N]\n"
        "                         [--n-ff N] [--n-embd-text N] [--projection-dim N] [--eps F] [--type f16|f32]\n"
        "                         [--name S]\n"
        "                         (default type: f32 for micro, f16 otherwise, 1-D tensors always f32)\n"
        "  make-test-model vocab  -o FILE [--preset ...] [--n-vocab N]   (tokenizer only, no tensors)\n"
        "common options:\n"
        "  --seed S          random seed (default 1); the same seed gives the same values at any --type\n"
        "  --std F           standard deviation of the weights (default 0.02)\n"
        "  -t, --threads N   threads (default: all online CPUs)\n"
        "  --max-mem-mb N    above this much tensor data, use a scratch file (default 8192)\n"
        "  --verify          re-open the file, check every tensor and its values\n"
        "  -q, --quiet       no summary line\n"
        "presets (text):  micro 64/2 layers/4 heads/2 kv/ff 192/vocab 600 (the golden micro-f32 shape);\n"
        "                 small 256/4/8/4/704/1000; tinyllama 2048/22/32/4/5632/32000;\n"
        "                 llava7b 4096/32/32/32/11008/32000 (Vicuna-7B, LLaVA-1.5's decoder)\n"
        "presets (mmproj): micro image 56, patch 14, 48 wide, 3 blocks, 4 heads, ff 96, to 64;\n"
        "                 small 112/14/128/4/4/512 to 256; clip-l-336 336/14/1024/23 blocks/16/4096 to 4096\n"
        "                 (block_count 23 and projection_dim 768, as real LLaVA-1.5 mmproj files store\n"
        "                 ViT-L/14-336; the other presets store n_embd_text as projection_dim, as the golden files)\n");
}

static int set_text_preset(text_opts_t *o, const char *name) {
    if (!strcmp(name, "micro")) {
        *o = (text_opts_t){.n_embd = 64, .n_layer = 2, .n_head = 4, .n_head_kv = 2, .n_ff = 192, .n_vocab = 600, .n_ctx = 2048};
    } else if (!strcmp(name, "small")) {
        *o = (text_opts_t){.n_embd = 256, .n_layer = 4, .n_head = 8, .n_head_kv = 4, .n_ff = 704, .n_vocab = 1000, .n_ctx = 2048};
    } else if (!strcmp(name, "tinyllama")) {
        *o = (text_opts_t){.n_embd = 2048, .n_layer = 22, .n_head = 32, .n_head_kv = 4, .n_ff = 5632, .n_vocab = 32000, .n_ctx = 2048};
    } else if (!strcmp(name, "llava7b")) {
        *o = (text_opts_t){.n_embd = 4096, .n_layer = 32, .n_head = 32, .n_head_kv = 32, .n_ff = 11008, .n_vocab = 32000, .n_ctx = 4096};
    } else {
        return -1;
    }
    o->rope_theta = 10000.0f;
    o->eps = 1e-5f;
    return 0;
}

static int set_vision_preset(vision_opts_t *o, const char *name) {
    if (!strcmp(name, "micro"))
        *o = (vision_opts_t){.image_size = 56, .patch = 14, .n_embd = 48, .n_layer = 3, .n_head = 4, .n_ff = 96, .n_embd_text = 64,
                             .type = VLM_DTYPE_F32}; /* all F32, like golden micro-f32 */
    else if (!strcmp(name, "small"))
        *o = (vision_opts_t){.image_size = 112, .patch = 14, .n_embd = 128, .n_layer = 4, .n_head = 4, .n_ff = 512, .n_embd_text = 256,
                             .type = VLM_DTYPE_F16};
    else if (!strcmp(name, "clip-l-336"))
        *o = (vision_opts_t){.image_size = 336, .patch = 14, .n_embd = 1024, .n_layer = 23, .n_head = 16, .n_ff = 4096, .n_embd_text = 4096,
                             .projection_dim = 768, .type = VLM_DTYPE_F16};
    else
        return -1;
    o->eps = 1e-5f;
    return 0;
}

/* --type, --output-type, --token-embd-type: the value at the cursor as a
 * tensor type. */
static bool value_type(vlm_args_t *a, uint32_t *out) {
    const char *v = vlm_args_value(a);
    if (!v) return false;
    if (parse_type(v, out) != 0) return vlm_args_bad_value(a, "a tensor type (f32, f16, q8_0, q4_k, ...)");
    return true;
}

/* The text command's --type: the value at the cursor as a file type. */
static bool value_ftype(vlm_args_t *a, const ftype_t **out) {
    const char *v = vlm_args_value(a);
    if (!v) return false;
    const ftype_t *ft = parse_ftype(v);
    if (!ft) return vlm_args_bad_value(a, "a file type (f32, f16, bf16, q4_0, ..., q6_k)");
    *out = ft;
    return true;
}

/* Applies a common option (any command) at the cursor. Returns 1 when
 * consumed, 0 when not one of them, -1 on a bad value (message in a->err). */
static int common_option(vlm_args_t *a, common_opts_t *co, text_opts_t *to, vision_opts_t *vo) {
    int64_t mb;
    bool ok;
    if (vlm_args_is(a, "-o", "--output")) {
        ok = (co->out = vlm_args_value(a)) != NULL;
    } else if (vlm_args_is(a, NULL, "--preset")) {
        ok = vlm_args_value(a) != NULL; /* applied before the other options */
    } else if (vlm_args_is(a, NULL, "--seed")) {
        ok = vlm_args_value_u64(a, 0, INT64_MAX, &co->seed);
    } else if (vlm_args_is(a, NULL, "--std")) {
        ok = vlm_args_value_f32(a, FLT_TRUE_MIN, INFINITY, &co->std);
    } else if (vlm_args_is(a, "-t", "--threads")) {
        ok = vlm_args_value_i32(a, 1, 256, &co->n_threads);
    } else if (vlm_args_is(a, NULL, "--max-mem-mb")) {
        ok = vlm_args_value_i64(a, 1, INT64_MAX, &mb);
        if (ok) co->max_mem = (uint64_t)mb > SIZE_MAX >> 20 ? SIZE_MAX : (size_t)mb << 20;
    } else if (vlm_args_is(a, NULL, "--name")) {
        ok = (to->name = vo->name = vlm_args_value(a)) != NULL;
    } else if (vlm_args_is(a, NULL, "--verify")) {
        ok = vlm_args_flag(a, &co->verify);
    } else if (vlm_args_is(a, "-q", "--quiet")) {
        ok = vlm_args_flag(a, &co->quiet);
    } else {
        return 0;
    }
    return ok ? 1 : -1;
}

/* The positive size options (int64_t fields) of each command: the flag and
 * the field's offset in the command's options struct. */
typedef struct size_opt {
    const char *flag;
    size_t offset;
} size_opt_t;

static const size_opt_t k_vision_sizes[] = {
    {"--image-size", offsetof(vision_opts_t, image_size)}, {"--patch", offsetof(vision_opts_t, patch)},
    {"--n-embd", offsetof(vision_opts_t, n_embd)},         {"--n-layer", offsetof(vision_opts_t, n_layer)},
    {"--n-head", offsetof(vision_opts_t, n_head)},         {"--n-ff", offsetof(vision_opts_t, n_ff)},
    {"--n-embd-text", offsetof(vision_opts_t, n_embd_text)},
    {"--projection-dim", offsetof(vision_opts_t, projection_dim)},
};

static const size_opt_t k_text_sizes[] = {
    {"--n-embd", offsetof(text_opts_t, n_embd)},   {"--n-layer", offsetof(text_opts_t, n_layer)},
    {"--n-head", offsetof(text_opts_t, n_head)},   {"--n-head-kv", offsetof(text_opts_t, n_head_kv)},
    {"--n-ff", offsetof(text_opts_t, n_ff)},       {"--n-vocab", offsetof(text_opts_t, n_vocab)},
    {"--n-ctx", offsetof(text_opts_t, n_ctx)},     {"--sliding-window", offsetof(text_opts_t, sliding_window)},
};

/* A size option from table t[0..n) into the struct at base; as
 * common_option(). */
static int size_option(vlm_args_t *a, const size_opt_t *t, size_t n, void *base) {
    for (size_t i = 0; i < n; i++)
        if (vlm_args_is(a, NULL, t[i].flag))
            return vlm_args_value_i64(a, 1, INT64_MAX, (int64_t *)((char *)base + t[i].offset)) ? 1 : -1;
    return 0;
}

/* Applies an mmproj option at the cursor; as common_option(). */
static int mmproj_option(vlm_args_t *a, vision_opts_t *vo) {
    bool ok;
    if (vlm_args_is(a, NULL, "--eps")) ok = vlm_args_value_f32(a, -INFINITY, INFINITY, &vo->eps);
    else if (vlm_args_is(a, NULL, "--type")) ok = value_type(a, &vo->type);
    else return size_option(a, k_vision_sizes, sizeof k_vision_sizes / sizeof *k_vision_sizes, vo);
    return ok ? 1 : -1;
}

/* Applies a text (or vocab) option at the cursor; as common_option(). */
static int text_option(vlm_args_t *a, text_opts_t *to) {
    bool ok;
    if (vlm_args_is(a, NULL, "--rope-theta")) ok = vlm_args_value_f32(a, FLT_TRUE_MIN, INFINITY, &to->rope_theta);
    else if (vlm_args_is(a, NULL, "--eps")) ok = vlm_args_value_f32(a, FLT_TRUE_MIN, INFINITY, &to->eps);
    else if (vlm_args_is(a, NULL, "--type")) ok = value_ftype(a, &to->ftype);
    else if (vlm_args_is(a, NULL, "--output-type")) ok = value_type(a, &to->output_type);
    else if (vlm_args_is(a, NULL, "--token-embd-type")) ok = value_type(a, &to->token_embd_type);
    else if (vlm_args_is(a, NULL, "--tied")) ok = vlm_args_flag(a, &to->tied);
    else if (vlm_args_is(a, NULL, "--rope-freqs")) ok = vlm_args_flag(a, &to->rope_freqs);
    else if (vlm_args_is(a, NULL, "--pure")) ok = vlm_args_flag(a, &to->pure);
    else return size_option(a, k_text_sizes, sizeof k_text_sizes / sizeof *k_text_sizes, to);
    return ok ? 1 : -1;
}

/* What the options of one command fill in. */
typedef struct option_ctx {
    const char *cmd;           /* "text", "mmproj" or "vocab" */
    bool is_mmproj;
    common_opts_t *co;
    text_opts_t *to;
    vision_opts_t *vo;
} option_ctx_t;

/* vlm_args_walk()'s callback: a common option, else one of the command's. */
static bool apply_option(vlm_args_t *a, void *ctx) {
    option_ctx_t *c = ctx;
    int r = common_option(a, c->co, c->to, c->vo);
    if (r == 0) r = c->is_mmproj ? mmproj_option(a, c->vo) : text_option(a, c->to);
    if (r == 0) return vlm_args_error(a, "unknown %s option '%s'", c->cmd, a->arg);
    return r > 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    bool is_text = !strcmp(cmd, "text"), is_mmproj = !strcmp(cmd, "mmproj"), is_vocab = !strcmp(cmd, "vocab");
    if (!is_text && !is_mmproj && !is_vocab) {
        fprintf(stderr, "make-test-model: unknown command '%s' (text, mmproj or vocab)\n", cmd);
        return 2;
    }
    /* The preset goes first, whatever its position, so that size options override it. */
    const char *preset = is_mmproj ? "micro" : "micro";
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--preset") && i + 1 < argc) preset = argv[i + 1];
        else if (!strncmp(argv[i], "--preset=", 9)) preset = argv[i] + 9;
    }
    text_opts_t to;
    vision_opts_t vo;
    if ((is_mmproj ? set_vision_preset(&vo, preset) : set_text_preset(&to, preset)) != 0) {
        fprintf(stderr, "make-test-model: unknown %s preset '%s'\n", is_mmproj ? "mmproj" : "text", preset);
        return 2;
    }
    to.ftype = parse_ftype("f32");
    to.output_type = to.token_embd_type = VLM_DTYPE_COUNT;
    long nproc = sysconf(_SC_NPROCESSORS_ONLN);
    common_opts_t co = {.seed = 1, .std = 0.02f, .n_threads = nproc > 0 ? (int)nproc : 1,
                        .max_mem = (size_t)8192 << 20};
    char default_name[64];
    snprintf(default_name, sizeof default_name, "vlmd-test-%s-%s", is_mmproj ? "mmproj" : "text", preset);
    to.name = vo.name = default_name;

    /* The options, after the command (argv[1] plays the program's name). */
    vlm_args_t a;
    option_ctx_t ctx = {.cmd = cmd, .is_mmproj = is_mmproj, .co = &co, .to = &to, .vo = &vo};
    const int walked = vlm_args_walk(&a, argc - 1, argv + 1, apply_option, &ctx);
    if (walked > 0) {
        usage(stdout);
        return 0;
    }
    if (walked < 0) {
        fprintf(stderr, "make-test-model: %s\n", a.err);
        return 2;
    }
    if (!co.out) {
        fprintf(stderr, "make-test-model: -o FILE is required\n");
        return 2;
    }

    vlm_error_t err = {0};
    int rc = is_mmproj ? cmd_mmproj(&vo, &co, &err) : cmd_text(&to, &co, is_vocab, &err);
    if (rc != VLM_OK) {
        fprintf(stderr, "make-test-model: %s (%s)\n", err.msg[0] ? err.msg : vlm_strerror(rc), vlm_error_name(rc));
        return 1;
    }
    return 0;
}
