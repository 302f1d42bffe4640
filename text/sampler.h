/* text/sampler.h - picks the next token from a row of logits.
 *
 * The chain and its semantics follow llama.cpp's default sampler chain
 * (common/sampling.cpp at c392e50): repetition penalties -> top-k -> top-p ->
 * min-p -> temperature -> a draw from the softmax. A temperature <= 0 means
 * greedy: the highest (penalised) logit wins, ties going to the lowest id,
 * which is what llama.cpp's greedy sampler does on an unsorted row. No filter
 * can remove the highest logit, so the greedy shortcut skips them.
 *
 * Randomness comes from a PRNG owned by the sampler (xoshiro256** seeded
 * through splitmix64), never from global state: the same seed, the same
 * accepted history and the same logits give the same token. The draw does not
 * reproduce llama.cpp's std::mt19937 sequence; only greedy output is meant to
 * match llama.cpp token for token.
 *
 * The penalty history is what the caller passes to vlm_sampler_accept():
 * llava-cli accepts only generated tokens, llama-cli also the prompt.
 */
#ifndef VLM_TEXT_SAMPLER_H
#define VLM_TEXT_SAMPLER_H

#include <stdint.h>

#include "core/error.h"

/* Sampling settings. vlm_sampler_params_default() gives llama.cpp's
 * defaults; the "off" value of each filter is noted. */
typedef struct vlm_sampler_params {
    float temperature;        /* <= 0: greedy (argmax); default 0.8 */
    int32_t top_k;            /* keep the k highest logits; 0: off; default 40 */
    float top_p;              /* nucleus mass in (0, 1]; 1: off; default 0.95 */
    float min_p;              /* keep p >= min_p * p_max, in [0, 1]; 0: off; default 0.05 */
    float repeat_penalty;     /* > 0; 1: off. logit > 0: logit / r, else logit * r */
    float frequency_penalty;  /* subtracts count * f; 0: off */
    float presence_penalty;   /* subtracts f once a token occurred; 0: off */
    int32_t penalty_last_n;   /* how many accepted tokens the penalties look at; 0: off; default 64 */
    uint64_t seed;            /* PRNG seed; any value is valid */
} vlm_sampler_params_t;

typedef struct vlm_sampler vlm_sampler_t;

/* Fills p with llama.cpp's defaults (temperature 0.8, top-k 40, top-p 0.95,
 * min-p 0.05, penalties off with a window of 64, seed 0). */
void vlm_sampler_params_default(vlm_sampler_params_t *p);

/* Returns 0 when p is usable, else VLM_ERR_INVALID_ARG with err naming the
 * first bad field: temperature NaN/inf or < 0 is rejected (0 means greedy),
 * top_k < 0, top_p outside (0, 1], min_p outside [0, 1], repeat_penalty <= 0
 * or not finite, non-finite frequency/presence penalties, penalty_last_n < 0. */
int vlm_sampler_params_validate(const vlm_sampler_params_t *p, vlm_error_t *err);

/* Creates a sampler for a vocabulary of n_vocab tokens. p is copied. Returns
 * NULL when p does not validate, n_vocab <= 0, or memory runs out (validate
 * first to get a message). Free with vlm_sampler_destroy(). */
vlm_sampler_t *vlm_sampler_new(const vlm_sampler_params_t *p, int32_t n_vocab);

/* Returns the chosen token id in [0, n_vocab) for logits [n_vocab] (not
 * modified; NaN entries count as -inf). Advances the PRNG when the draw is
 * random. Does not record the token: call vlm_sampler_accept() for that. */
int32_t vlm_sampler_sample(vlm_sampler_t *s, const float *logits);

/* Records id in the penalty history (ids outside the vocabulary are
 * ignored). */
void vlm_sampler_accept(vlm_sampler_t *s, int32_t id);

/* Clears the penalty history and re-seeds the PRNG from the params' seed, so
 * the sampler behaves as if new. */
void vlm_sampler_reset(vlm_sampler_t *s);

/* Returns the parameters the sampler was built with (borrowed). */
const vlm_sampler_params_t *vlm_sampler_params(const vlm_sampler_t *s);

/* Frees the sampler; NULL-safe, and sets *self_p to NULL. */
void vlm_sampler_destroy(vlm_sampler_t **self_p);

#endif
