/* text/llama.h - the LLaMA-family decoder: weights, KV cache, batched forward.
 *
 * Three objects, split so that a daemon can run continuous batching:
 *   vlm_llama_t    the weights (read-only after load, shared by every thread);
 *   vlm_kv_cache_t a caller-owned KV cache of n_seq slots, one per active
 *                  sequence, each holding n_ctx positions;
 *   vlm_decoder_t  scratch buffers for one engine thread, bound to one cache.
 * A forward batch mixes rows of several sequences (a prefill chunk of one job
 * next to single decode rows of others); each row attends only to its own
 * sequence.
 *
 * Numerics follow llama.cpp c392e50 on the CPU backend (see
 * shared/golden/README.md): activations rounded to each weight's vec_dot type
 * inside vlm_matmul, RMSNorm summed in double, RoPE in "normal" mode with a
 * per-position cos/sin table built the way ggml builds it, K, V, Q and the
 * softmax probabilities rounded to f16 (F16 cache), ggml's AVX-512 expf in
 * softmax and SiLU, and the summation order of ggml's f16 dot products: the
 * llamafile tinyBLAS order when the sequence has two or more rows in the
 * forward call, ggml_vec_dot_f16's order when it has one (a decode step).
 * So a sequence gives the same logits whether it runs alone or batched.
 *
 * Model coverage: GGUF architecture "llama" (LLaMA 1/2/3/3.1, TinyLlama,
 * Vicuna, Mistral 7B): GQA, SwiGLU, tied output embeddings, Llama 3.1
 * rope_freqs, linear RoPE scaling, Mistral's sliding window when declared.
 */
#ifndef VLM_TEXT_LLAMA_H
#define VLM_TEXT_LLAMA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "core/gguf.h"
#include "core/pool.h"

/* ==== Model ============================================================ */

typedef struct vlm_llama_hparams {
    int32_t n_vocab;          /* rows of token_embd */
    int32_t n_ctx_train;      /* llama.context_length */
    int32_t n_embd;           /* llama.embedding_length */
    int32_t n_layer;          /* llama.block_count */
    int32_t n_head;           /* llama.attention.head_count */
    int32_t n_head_kv;        /* llama.attention.head_count_kv (default n_head) */
    int32_t n_ff;             /* llama.feed_forward_length */
    int32_t n_rot;            /* llama.rope.dimension_count (default head_dim) */
    int32_t head_dim;         /* llama.attention.key_length (default n_embd / n_head) */
    float rms_eps;            /* llama.attention.layer_norm_rms_epsilon */
    float rope_freq_base;     /* llama.rope.freq_base (default 10000) */
    float rope_freq_scale;    /* 1 / llama.rope.scaling.factor (default 1) */
    int32_t sliding_window;   /* llama.attention.sliding_window, 0 = none */
    bool tied_output;         /* no output.weight: logits use token_embd */
    bool has_rope_freqs;      /* rope_freqs.weight present (Llama 3.1) */
    uint32_t ftype_hint;      /* general.file_type if present, else UINT32_MAX */
} vlm_llama_hparams_t;

typedef struct vlm_llama vlm_llama_t;

typedef struct vlm_llama_opts {
    int prepare_flags;        /* passed to vlm_weight_prepare() for every matmul weight; with 0 (the
                               * default) quantized weights are repacked into panels and their file
                               * pages released (token_embd, read by rows, stays mapped) */
    bool no_sliding_window;   /* ignore llama.attention.sliding_window, as llama.cpp c392e50 does */
} vlm_llama_opts_t;

/* Reads the hyper-parameters and checks every tensor's shape and type, with
 * errors naming the key or tensor at fault. opts may be NULL (all zero). On
 * success *out owns the model; the weights point into g's mapping, so g must
 * outlive the model. Architectures other than "llama" give
 * VLM_ERR_UNSUPPORTED. */
int vlm_llama_load(const vlm_gguf_t *g, const vlm_llama_opts_t *opts, vlm_llama_t **out,
                   vlm_error_t *err);

/* Frees the model (not the GGUF reader); NULL-safe, sets *self_p to NULL. */
void vlm_llama_destroy(vlm_llama_t **self_p);

/* The model's hyper-parameters (owned by the model). */
const vlm_llama_hparams_t *vlm_llama_hparams(const vlm_llama_t *m);

/* Bytes of weight data the model holds: the file tensors it reads in place
 * plus the repacked copies vlm_weight_prepare made (whose file pages were
 * dropped). */
size_t vlm_llama_weight_bytes(const vlm_llama_t *m);

/* Writes token's input embedding (token_embd row, dequantized) to out
 * [n_embd]. Returns VLM_OK or VLM_ERR_INVALID_ARG for an id out of range. */
int vlm_llama_embed_token(const vlm_llama_t *m, int32_t token, float *out, vlm_error_t *err);

/* ==== KV cache ========================================================= */

/* n_seq slots of n_ctx positions; slot s, position p is cell p of slot s.
 * K and V are both stored transposed, one row per channel, contiguous over
 * positions (kv_dim = n_head_kv * head_dim, elements of `type`, rows ld >=
 * n_ctx elements apart):
 *   position p of channel c of layer l, slot s: k (or v)[((l * n_seq + s) * kv_dim + c) * ld + p]
 *   [n_layer][n_seq][kv_dim][ld]
 * so K.q is computed for 16 positions per vector and P.V is a dot product
 * over positions (llama.cpp's own V layout without flash attention).
 * seq_len[s]: positions 0..seq_len[s]-1 of slot s are valid. */
typedef struct vlm_kv_cache {
    int32_t n_layer, n_seq, n_ctx, kv_dim;
    size_t ld;                /* row stride in elements: n_ctx padded so rows do not alias in cache */
    uint32_t type;            /* VLM_DTYPE_F16 (default of llama.cpp) or VLM_DTYPE_F32 */
    size_t elt_size;          /* 2 or 4 */
    void *k;                  /* [n_layer][n_seq][kv_dim][ld] */
    void *v;                  /* [n_layer][n_seq][kv_dim][ld] */
    int32_t *seq_len;         /* [n_seq] valid positions per slot */
    size_t bytes;             /* bytes of k plus v */
} vlm_kv_cache_t;

/* Allocates a zeroed cache for model m: n_seq >= 1 slots of 1 <= n_ctx <=
 * n_ctx_train positions, type F16 or F32. Returns VLM_OK,
 * VLM_ERR_INVALID_ARG, VLM_ERR_TOO_LARGE or VLM_ERR_NOMEM. The caller owns
 * the struct; free the buffers with vlm_kv_cache_deinit(). */
int vlm_kv_cache_init(vlm_kv_cache_t *kv, const vlm_llama_t *m, int n_seq, int n_ctx,
                      uint32_t type, vlm_error_t *err);

/* Frees the buffers and zeroes the struct; safe on a zeroed struct. */
void vlm_kv_cache_deinit(vlm_kv_cache_t *kv);

/* Forgets sequence seq (its slot is free for a new sequence at position 0). */
void vlm_kv_cache_seq_clear(vlm_kv_cache_t *kv, int seq);

/* Keeps the first n_keep positions of seq and forgets the rest (n_keep is
 * clamped to [0, seq_len]). A later batch continues at position n_keep. */
void vlm_kv_cache_seq_keep(vlm_kv_cache_t *kv, int seq, int32_t n_keep);

/* Copies the first n positions of sequence src into sequence dst, which then
 * holds exactly those n positions (n is clamped to [0, seq_len(src)]): a
 * prompt prefix shared by several jobs is computed once. */
void vlm_kv_cache_seq_copy(vlm_kv_cache_t *kv, int src, int dst, int32_t n);

/* Number of valid positions of seq (the next position to feed). */
int32_t vlm_kv_cache_seq_len(const vlm_kv_cache_t *kv, int seq);

/* Bytes held by the K and V buffers. */
size_t vlm_kv_cache_bytes(const vlm_kv_cache_t *kv);

/* ==== Forward ========================================================== */

/* tokens[i] == VLM_BATCH_EMBD_ROW takes row i from embd instead. */
#define VLM_BATCH_EMBD_ROW (-1)

/* One forward batch: n rows, each a token id or an embedding row,
 * belonging to sequence seq[i] at position pos[i].
 * - tokens != NULL, embd == NULL: every row is a token;
 * - tokens == NULL, embd != NULL: every row is embd[i] ([n][n_embd]);
 * - both: row i is embd[i] when tokens[i] == VLM_BATCH_EMBD_ROW.
 * The rows of one sequence must have consecutive positions, in order; the
 * first one may be at most the sequence's current length (a smaller one
 * rewinds it, forgetting later positions). Rows of different sequences may
 * interleave. Each row attends to positions [0, pos] of its own sequence
 * (or the last sliding_window of them), earlier rows of the same batch
 * included. logits_rows lists the rows whose logits are wanted, in the order
 * they are written to the logits array. */
typedef struct vlm_batch {
    int32_t n;
    const int32_t *tokens;      /* [n] or NULL */
    const float *embd;          /* [n][n_embd] or NULL */
    const int32_t *pos;         /* [n] */
    const int32_t *seq;         /* [n] */
    int32_t n_logits;           /* number of rows with logits */
    const int32_t *logits_rows; /* [n_logits] row indexes */
} vlm_batch_t;

typedef struct vlm_decoder vlm_decoder_t;

/* Creates the scratch buffers of one engine thread for model m and cache kv
 * (both borrowed: they must outlive the decoder). pool may be NULL (one
 * thread). Batches of more than n_batch_max rows are run in chunks of
 * n_batch_max rows. Returns VLM_OK, VLM_ERR_INVALID_ARG or VLM_ERR_NOMEM. */
int vlm_decoder_new(const vlm_llama_t *m, vlm_kv_cache_t *kv, vlm_pool_t *pool,
                    int32_t n_batch_max, vlm_decoder_t **out, vlm_error_t *err);

/* Frees the decoder; NULL-safe, sets *self_p to NULL. */
void vlm_decoder_destroy(vlm_decoder_t **self_p);

/* Runs batch b: stores its K/V in the cache and writes logits
 * [n_logits][n_vocab] (caller-allocated; may be NULL when n_logits is 0).
 * The whole batch is validated before anything is computed: a position >=
 * n_ctx gives VLM_ERR_CONTEXT_OVERFLOW, bad sequence ids, token ids, row
 * indexes or position order VLM_ERR_INVALID_ARG, and the cache is left as
 * it was. A scratch allocation failing during the computation gives
 * VLM_ERR_NOMEM (the message names the layer and matmul); every sequence of
 * the batch is then cut back to its first row's position in the batch
 * (normally its old length), so no half-written cache cells count. */
int vlm_decoder_forward(vlm_decoder_t *d, const vlm_batch_t *b, float *logits, vlm_error_t *err);

/* A hook called during forward with intermediate tensors, named as
 * llama.cpp names them: "inp_embd", "attn_norm-L", "ffn_inp-L", "l_out-L",
 * "result_norm"; data is [n_rows][n_cols] and valid only during the call.
 * From ffn_inp of the last layer on, only the logits rows remain (as in
 * llama.cpp), in logits order. Called once per chunk of n_batch_max rows. */
typedef void (*vlm_decoder_trace_fn)(void *user, const char *name, const float *data,
                                     int32_t n_rows, int32_t n_cols);

/* Sets (or with fn == NULL clears) the trace hook. */
void vlm_decoder_set_trace(vlm_decoder_t *d, vlm_decoder_trace_fn fn, void *user);

#endif
