/* text/model.c - loading a LLaMA-family text model from GGUF.
 *
 * Reads the llama.* hyper-parameters with llama.cpp's defaults, then finds
 * and checks every tensor the decoder uses (shape and type, with errors
 * naming the tensor), so that a bad file fails here and never in the
 * forward pass. Quantized matmul weights are repacked into interleaved
 * panels in anonymous memory (vlm_weight_prepare) and their file pages are
 * dropped from RSS, so the process holds about one copy of the file; float
 * weights and token_embd (looked up by rows) stay in the GGUF mapping. The
 * small 1-D tensors (norm weights, rope_freqs) are copied to f32.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "text/llama_impl.h"

/* ==== Hyper-parameters ================================================= */

/* Reads an optional unsigned key into *out (left unchanged when absent). */
static int get_u32_opt(const vlm_gguf_t *g, const char *key, uint32_t *out, vlm_error_t *err) {
    if (!vlm_gguf_find_kv(g, key)) return VLM_OK;
    return vlm_gguf_get_u32(g, key, out, err);
}

static int get_f32_opt(const vlm_gguf_t *g, const char *key, float *out, vlm_error_t *err) {
    if (!vlm_gguf_find_kv(g, key)) return VLM_OK;
    return vlm_gguf_get_f32(g, key, out, err);
}

/* Sizes beyond this are certainly not a real model and could overflow. */
#define LLAMA_DIM_MAX (1 << 20)

static int read_hparams(const vlm_gguf_t *g, const vlm_llama_opts_t *opts, vlm_llama_hparams_t *hp,
                        vlm_error_t *err) {
    const char *arch;
    size_t arch_len;
    int rc = vlm_gguf_get_str(g, "general.architecture", &arch, &arch_len, err);
    if (rc) return rc;
    if (arch_len != 5 || memcmp(arch, "llama", 5) != 0)
        return vlm_error_set(err, VLM_ERR_UNSUPPORTED,
                             "%s: unsupported architecture '%.*s' (the text decoder runs 'llama' only)",
                             vlm_gguf_path(g), (int)(arch_len > 64 ? 64 : arch_len), arch);

    uint32_t n_embd, n_layer, n_ff, n_head, n_ctx;
    if ((rc = vlm_gguf_get_u32(g, "llama.embedding_length", &n_embd, err))) return rc;
    if ((rc = vlm_gguf_get_u32(g, "llama.block_count", &n_layer, err))) return rc;
    if ((rc = vlm_gguf_get_u32(g, "llama.feed_forward_length", &n_ff, err))) return rc;
    if ((rc = vlm_gguf_get_u32(g, "llama.attention.head_count", &n_head, err))) return rc;
    if ((rc = vlm_gguf_get_u32(g, "llama.context_length", &n_ctx, err))) return rc;
    if (n_embd == 0 || n_embd > LLAMA_DIM_MAX || n_layer == 0 || n_layer > 4096 || n_ff == 0 ||
        n_ff > LLAMA_DIM_MAX || n_head == 0 || n_head > n_embd || n_ctx > (1u << 30))
        return vlm_error_set(err, VLM_ERR_FORMAT,
                             "%s: implausible hyper-parameters: embedding_length %u, block_count %u, "
                             "feed_forward_length %u, head_count %u, context_length %u",
                             vlm_gguf_path(g), n_embd, n_layer, n_ff, n_head, n_ctx);

    uint32_t n_head_kv = n_head;
    if ((rc = get_u32_opt(g, "llama.attention.head_count_kv", &n_head_kv, err))) return rc;
    if (n_head_kv == 0 || n_head % n_head_kv != 0)
        return vlm_error_set(err, VLM_ERR_FORMAT,
                             "%s: llama.attention.head_count_kv %u does not divide head_count %u",
                             vlm_gguf_path(g), n_head_kv, n_head);

    uint32_t head_dim = n_embd / n_head, head_dim_v;
    if (n_embd % n_head != 0 && !vlm_gguf_find_kv(g, "llama.attention.key_length"))
        return vlm_error_set(err, VLM_ERR_FORMAT, "%s: embedding_length %u is not a multiple of head_count %u",
                             vlm_gguf_path(g), n_embd, n_head);
    if ((rc = get_u32_opt(g, "llama.attention.key_length", &head_dim, err))) return rc;
    head_dim_v = head_dim;
    if ((rc = get_u32_opt(g, "llama.attention.value_length", &head_dim_v, err))) return rc;
    if (head_dim == 0 || head_dim > 4096 || head_dim_v != head_dim)
        return vlm_error_set(err, VLM_ERR_UNSUPPORTED,
                             "%s: attention key_length %u / value_length %u not supported (must be equal, 1..4096)",
                             vlm_gguf_path(g), head_dim, head_dim_v);

    uint32_t n_rot = head_dim;
    if ((rc = get_u32_opt(g, "llama.rope.dimension_count", &n_rot, err))) return rc;
    if (n_rot == 0 || n_rot > head_dim || n_rot % 2 != 0)
        return vlm_error_set(err, VLM_ERR_FORMAT,
                             "%s: llama.rope.dimension_count %u must be even and at most the head size %u",
                             vlm_gguf_path(g), n_rot, head_dim);

    float eps;
    if ((rc = vlm_gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &eps, err))) return rc;
    if (!(eps >= 0.0f) || !isfinite(eps))
        return vlm_error_set(err, VLM_ERR_FORMAT, "%s: llama.attention.layer_norm_rms_epsilon %g is invalid",
                             vlm_gguf_path(g), (double)eps);

    float freq_base = 10000.0f;
    if ((rc = get_f32_opt(g, "llama.rope.freq_base", &freq_base, err))) return rc;
    if (!(freq_base > 0.0f) || !isfinite(freq_base))
        return vlm_error_set(err, VLM_ERR_FORMAT, "%s: llama.rope.freq_base %g is invalid",
                             vlm_gguf_path(g), (double)freq_base);

    /* RoPE scaling: like llama.cpp, the factor (or the older scale_linear key)
     * becomes freq_scale = 1/factor; YaRN is not implemented. */
    const char *stype = NULL;
    size_t stype_len = 0;
    if (vlm_gguf_find_kv(g, "llama.rope.scaling.type") &&
        (rc = vlm_gguf_get_str(g, "llama.rope.scaling.type", &stype, &stype_len, err)))
        return rc;
    if (stype && !(stype_len == 4 && memcmp(stype, "none", 4) == 0) &&
        !(stype_len == 6 && memcmp(stype, "linear", 6) == 0))
        return vlm_error_set(err, VLM_ERR_UNSUPPORTED, "%s: llama.rope.scaling.type '%.*s' is not supported",
                             vlm_gguf_path(g), (int)(stype_len > 64 ? 64 : stype_len), stype);
    float factor = 0.0f;
    if (vlm_gguf_find_kv(g, "llama.rope.scaling.factor")) {
        if ((rc = vlm_gguf_get_f32(g, "llama.rope.scaling.factor", &factor, err))) return rc;
    } else if ((rc = get_f32_opt(g, "llama.rope.scale_linear", &factor, err))) {
        return rc;
    }
    if (!(factor >= 0.0f) || !isfinite(factor))
        return vlm_error_set(err, VLM_ERR_FORMAT, "%s: RoPE scaling factor %g is invalid", vlm_gguf_path(g),
                             (double)factor);

    uint32_t swa = 0;
    if ((rc = get_u32_opt(g, "llama.attention.sliding_window", &swa, err))) return rc;
    if (opts && opts->no_sliding_window) swa = 0;

    uint32_t ftype = UINT32_MAX;
    if ((rc = get_u32_opt(g, "general.file_type", &ftype, err))) return rc;

    /* The vocabulary size: llama.vocab_size, else the token list's length;
     * token_embd's shape is checked against it later. */
    uint32_t n_vocab = 0;
    if ((rc = get_u32_opt(g, "llama.vocab_size", &n_vocab, err))) return rc;
    if (n_vocab == 0) {
        const vlm_gguf_kv_t *toks = vlm_gguf_find_kv(g, "tokenizer.ggml.tokens");
        if (toks && toks->type == VLM_GGUF_TYPE_ARRAY && toks->arr_n <= INT32_MAX) n_vocab = (uint32_t)toks->arr_n;
    }
    if (n_vocab == 0) {
        const vlm_gguf_tensor_t *te = vlm_gguf_find_tensor(g, "token_embd.weight");
        if (te && te->ne[1] > 0 && te->ne[1] <= INT32_MAX) n_vocab = (uint32_t)te->ne[1];
    }
    if (n_vocab == 0 || n_vocab > INT32_MAX)
        return vlm_error_set(err, VLM_ERR_MISSING_KEY,
                             "%s: the vocabulary size is unknown (no llama.vocab_size, tokenizer.ggml.tokens "
                             "or token_embd.weight)", vlm_gguf_path(g));

    memset(hp, 0, sizeof *hp);
    hp->n_vocab = (int32_t)n_vocab;
    hp->n_ctx_train = (int32_t)n_ctx;
    hp->n_embd = (int32_t)n_embd;
    hp->n_layer = (int32_t)n_layer;
    hp->n_head = (int32_t)n_head;
    hp->n_head_kv = (int32_t)n_head_kv;
    hp->n_ff = (int32_t)n_ff;
    hp->n_rot = (int32_t)n_rot;
    hp->head_dim = (int32_t)head_dim;
    hp->rms_eps = eps;
    hp->rope_freq_base = freq_base;
    hp->rope_freq_scale = factor == 0.0f ? 1.0f : 1.0f / factor;
    hp->sliding_window = (int32_t)(swa > INT32_MAX ? INT32_MAX : swa);
    hp->ftype_hint = ftype;
    return VLM_OK;
}

/* ==== Tensors ========================================================== */

/* Bit mask of the weight types vlm_matmul multiplies. */
static uint64_t matmul_type_mask(void) {
    uint64_t mask = 0;
    for (uint32_t t = 0; t < 64; t++) {
        const vlm_dtype_info_t *info = vlm_dtype_info(t);
        if (info && info->supported && t != VLM_DTYPE_Q8_1 && t != VLM_DTYPE_Q8_K) mask |= 1ull << t;
    }
    return mask;
}

#define VEC_TYPE_MASK ((1ull << VLM_DTYPE_F32) | (1ull << VLM_DTYPE_F16) | (1ull << VLM_DTYPE_BF16))

/* Checks a 1-D tensor of n elements and converts it to f32 into dst. */
static int load_vec(const vlm_gguf_t *g, const char *name, int64_t n, float *dst, vlm_error_t *err) {
    const vlm_gguf_tensor_t *t;
    int rc = vlm_gguf_expect_tensor(g, name, 1, &n, VEC_TYPE_MASK, &t, err);
    if (rc) return rc;
    return vlm_dtype_dequantize_row(t->type, t->data, dst, n) == VLM_OK
               ? VLM_OK
               : vlm_error_set(err, VLM_ERR_TYPE, "%s: %s: cannot convert to f32", vlm_gguf_path(g), name);
}

/* Checks a 2-D weight {n_in, n_out}, fills w and prepares it. A quantized
 * weight that got repacked panels is never read from the file again, so
 * its file pages are dropped from RSS (unless keep_mapped: token_embd,
 * whose rows are looked up, when the output matrix is tied to it); the
 * prepared copy replaces them in *bytes. */
static int load_weight(const vlm_gguf_t *g, const char *name, int64_t n_in, int64_t n_out, int prepare_flags,
                       bool keep_mapped, vlm_weight_t *w, size_t *bytes, vlm_error_t *err) {
    const vlm_gguf_tensor_t *t;
    int64_t ne[2] = {n_in, n_out};
    int rc = vlm_gguf_expect_tensor(g, name, 2, ne, matmul_type_mask(), &t, err);
    if (rc) return rc;
    if ((rc = vlm_weight_from_tensor(w, t, err))) return rc;
    size_t extra = 0;
    if ((rc = vlm_weight_prepare(w, prepare_flags, &extra, err))) return rc;
    const bool is_float = t->type == VLM_DTYPE_F32 || t->type == VLM_DTYPE_F16 || t->type == VLM_DTYPE_BF16;
    if (extra > 0 && !is_float && !keep_mapped) {
        (void)vlm_gguf_release_range(g, t->data, t->nbytes); /* best effort: only RSS is at stake */
        *bytes += extra;
    } else {
        *bytes += t->nbytes + extra;
    }
    return VLM_OK;
}

/* Fails when a tensor the decoder would silently ignore is present. */
static int reject_tensor(const vlm_gguf_t *g, const char *name, const char *what, vlm_error_t *err) {
    if (!vlm_gguf_find_tensor(g, name)) return VLM_OK;
    return vlm_error_set(err, VLM_ERR_UNSUPPORTED, "%s: %s: %s are not supported", vlm_gguf_path(g), name, what);
}

static void release_weights(vlm_llama_t *m) {
    vlm_weight_release(&m->output);
    if (!m->layers) return;
    for (int32_t l = 0; l < m->hp.n_layer; l++) {
        vlm__llama_layer_t *L = &m->layers[l];
        vlm_weight_t *ws[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->ffn_gate, &L->ffn_up, &L->ffn_down};
        for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++) vlm_weight_release(ws[i]);
    }
}

int vlm_llama_load(const vlm_gguf_t *g, const vlm_llama_opts_t *opts, vlm_llama_t **out, vlm_error_t *err) {
    VLM_ASSERT(g != NULL && out != NULL);
    *out = NULL;
    vlm_llama_opts_t o = {0};
    if (opts) o = *opts;

    vlm_llama_t *m = calloc(1, sizeof *m);
    if (!m) return vlm_error_set(err, VLM_ERR_NOMEM, "out of memory loading the text model");
    int rc = read_hparams(g, &o, &m->hp, err);
    if (rc) goto fail_model;
    const vlm_llama_hparams_t *hp = &m->hp;
    const int64_t n_embd = hp->n_embd, n_q = (int64_t)hp->n_head * hp->head_dim,
                  n_kv = (int64_t)hp->n_head_kv * hp->head_dim;

    m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers);
    /* norms: output_norm, 2 per layer, rope_freqs. */
    size_t n_norm_floats = (size_t)n_embd * (1 + 2 * (size_t)hp->n_layer) + (size_t)hp->n_rot / 2;
    m->norms = malloc(n_norm_floats * sizeof(float));
    if (!m->layers || !m->norms) {
        rc = vlm_error_set(err, VLM_ERR_NOMEM, "out of memory loading the text model");
        goto fail_layers;
    }
    float *nf = m->norms;

    /* Token embeddings: any type the dtype module can dequantize by rows. */
    int64_t te_ne[2] = {n_embd, hp->n_vocab};
    if ((rc = vlm_gguf_expect_tensor(g, "token_embd.weight", 2, te_ne, matmul_type_mask(), &m->tok_embd, err)))
        goto fail_weights;
    m->tok_embd_row_bytes = vlm_dtype_row_size(m->tok_embd->type, n_embd);
    if (m->tok_embd_row_bytes == 0) {
        rc = vlm_error_set(err, VLM_ERR_SHAPE, "%s: token_embd.weight: row of %lld is not a whole number of %s blocks",
                           vlm_gguf_path(g), (long long)n_embd, vlm_dtype_name(m->tok_embd->type));
        goto fail_weights;
    }
    m->weight_bytes += m->tok_embd->nbytes;

    if ((rc = load_vec(g, "output_norm.weight", n_embd, nf, err))) goto fail_weights;
    m->output_norm = nf;
    nf += n_embd;
    m->weight_bytes += (size_t)n_embd * sizeof(float);

    /* Output projection; without output.weight the embeddings are tied. */
    m->hp.tied_output = vlm_gguf_find_tensor(g, "output.weight") == NULL;
    if ((rc = load_weight(g, m->hp.tied_output ? "token_embd.weight" : "output.weight", n_embd, hp->n_vocab,
                          o.prepare_flags, m->hp.tied_output, &m->output, &m->weight_bytes, err)))
        goto fail_weights;
    if (m->hp.tied_output) m->weight_bytes -= m->tok_embd->nbytes; /* counted once */

    /* Llama 3.1 frequency factors. */
    if (vlm_gguf_find_tensor(g, "rope_freqs.weight")) {
        if ((rc = load_vec(g, "rope_freqs.weight", hp->n_rot / 2, nf, err))) goto fail_weights;
        for (int32_t i = 0; i < hp->n_rot / 2; i++) {
            if (!(nf[i] > 0.0f) || !isfinite(nf[i])) {
                rc = vlm_error_set(err, VLM_ERR_FORMAT, "%s: rope_freqs.weight[%d] = %g is not a positive number",
                                   vlm_gguf_path(g), i, (double)nf[i]);
                goto fail_weights;
            }
        }
        m->rope_freqs = nf;
        m->hp.has_rope_freqs = true;
        nf += hp->n_rot / 2;
        m->weight_bytes += (size_t)(hp->n_rot / 2) * sizeof(float);
    }

    for (int32_t l = 0; l < hp->n_layer; l++) {
        vlm__llama_layer_t *L = &m->layers[l];
        char name[96];
#define LAYER_NAME(suffix) (snprintf(name, sizeof name, "blk.%d." suffix, (int)l), name)
        if ((rc = reject_tensor(g, LAYER_NAME("attn_q.bias"), "attention biases", err))) goto fail_weights;
        if ((rc = reject_tensor(g, LAYER_NAME("ffn_gate_inp.weight"), "mixture-of-experts layers", err)))
            goto fail_weights;
        if ((rc = load_vec(g, LAYER_NAME("attn_norm.weight"), n_embd, nf, err))) goto fail_weights;
        L->attn_norm = nf;
        nf += n_embd;
        if ((rc = load_weight(g, LAYER_NAME("attn_q.weight"), n_embd, n_q, o.prepare_flags, false, &L->wq,
                              &m->weight_bytes, err)) ||
            (rc = load_weight(g, LAYER_NAME("attn_k.weight"), n_embd, n_kv, o.prepare_flags, false, &L->wk,
                              &m->weight_bytes, err)) ||
            (rc = load_weight(g, LAYER_NAME("attn_v.weight"), n_embd, n_kv, o.prepare_flags, false, &L->wv,
                              &m->weight_bytes, err)) ||
            (rc = load_weight(g, LAYER_NAME("attn_output.weight"), n_q, n_embd, o.prepare_flags, false, &L->wo,
                              &m->weight_bytes, err)))
            goto fail_weights;
        if ((rc = load_vec(g, LAYER_NAME("ffn_norm.weight"), n_embd, nf, err))) goto fail_weights;
        L->ffn_norm = nf;
        nf += n_embd;
        if ((rc = load_weight(g, LAYER_NAME("ffn_gate.weight"), n_embd, hp->n_ff, o.prepare_flags, false, &L->ffn_gate,
                              &m->weight_bytes, err)) ||
            (rc = load_weight(g, LAYER_NAME("ffn_up.weight"), n_embd, hp->n_ff, o.prepare_flags, false, &L->ffn_up,
                              &m->weight_bytes, err)) ||
            (rc = load_weight(g, LAYER_NAME("ffn_down.weight"), hp->n_ff, n_embd, o.prepare_flags, false, &L->ffn_down,
                              &m->weight_bytes, err)))
            goto fail_weights;
        m->weight_bytes += 2 * (size_t)n_embd * sizeof(float);
#undef LAYER_NAME
    }
    *out = m;
    return VLM_OK;

fail_weights:
    release_weights(m);
fail_layers:
    free(m->norms);
    free(m->layers);
fail_model:
    free(m);
    return rc;
}

void vlm_llama_destroy(vlm_llama_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_llama_t *m = *self_p;
    release_weights(m);
    free(m->norms);
    free(m->layers);
    free(m);
    *self_p = NULL;
}

const vlm_llama_hparams_t *vlm_llama_hparams(const vlm_llama_t *m) { return &m->hp; }

size_t vlm_llama_weight_bytes(const vlm_llama_t *m) { return m->weight_bytes; }

int vlm_llama_embed_token(const vlm_llama_t *m, int32_t token, float *out, vlm_error_t *err) {
    if (token < 0 || token >= m->hp.n_vocab)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "token id %d is outside the vocabulary [0, %d)", (int)token,
                             (int)m->hp.n_vocab);
    const uint8_t *row = (const uint8_t *)m->tok_embd->data + (size_t)token * m->tok_embd_row_bytes;
    int rc = vlm_dtype_dequantize_row(m->tok_embd->type, row, out, m->hp.n_embd);
    if (rc) return vlm_error_set(err, rc, "token_embd.weight: cannot dequantize %s rows",
                                 vlm_dtype_name(m->tok_embd->type));
    return VLM_OK;
}
