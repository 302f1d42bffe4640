/* text/llama_impl.h - the LLaMA model struct, shared by model.c (which loads
 * it) and decoder.c (which runs it). Not part of the public API.
 */
#ifndef VLM_TEXT_LLAMA_IMPL_H
#define VLM_TEXT_LLAMA_IMPL_H

#include "core/matmul.h"
#include "text/llama.h"

typedef struct vlm__llama_layer {
    const float *attn_norm;   /* [n_embd] (owned copy in vlm_llama.norms) */
    vlm_weight_t wq;          /* [n_head * head_dim][n_embd] */
    vlm_weight_t wk;          /* [n_head_kv * head_dim][n_embd] */
    vlm_weight_t wv;          /* [n_head_kv * head_dim][n_embd] */
    vlm_weight_t wo;          /* [n_embd][n_head * head_dim] */
    const float *ffn_norm;    /* [n_embd] */
    vlm_weight_t ffn_gate;    /* [n_ff][n_embd] */
    vlm_weight_t ffn_up;      /* [n_ff][n_embd] */
    vlm_weight_t ffn_down;    /* [n_embd][n_ff] */
} vlm__llama_layer_t;

struct vlm_llama {
    vlm_llama_hparams_t hp;
    const vlm_gguf_tensor_t *tok_embd; /* [n_vocab][n_embd] in its file type */
    size_t tok_embd_row_bytes;
    vlm_weight_t output;               /* [n_vocab][n_embd]: output.weight or token_embd */
    const float *output_norm;          /* [n_embd] */
    const float *rope_freqs;           /* [n_rot / 2] frequency divisors, or NULL */
    vlm__llama_layer_t *layers;        /* [n_layer] */
    float *norms;                      /* owned f32 copies of the 1-D tensors */
    size_t weight_bytes;
};

/* Test hook: run the decoder's attention, softmax and SiLU with the scalar
 * reference kernels (on) or the best ones for this CPU (off). */
void vlm__decoder_use_reference_kernels(vlm_decoder_t *d, bool on);

/* "avx512" or "scalar": the kernels the decoder uses now. */
const char *vlm__decoder_kernels_name(const vlm_decoder_t *d);

#endif
