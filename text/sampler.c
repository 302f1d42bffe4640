/* text/sampler.c - llama.cpp's default sampler chain with a private PRNG.
 *
 * One call to vlm_sampler_sample() runs, in order:
 *   1. penalties   - repeat/frequency/presence over the last penalty_last_n
 *                    accepted tokens (each distinct token penalised once);
 *   2. greedy      - when temperature <= 0, the argmax of step 1 (first index
 *                    wins ties) is the answer and the chain stops;
 *   3. top-k       - the k highest logits, sorted (logit desc, id asc);
 *   4. top-p       - softmax, keep the shortest prefix whose mass >= top_p;
 *   5. min-p       - keep logits >= max_logit + log(min_p);
 *   6. temperature - divide the survivors by it;
 *   7. dist        - softmax and one draw from the PRNG.
 * Steps 3-5 mirror llama_sampler_top_k/top_p/min_p (src/llama-sampling.cpp),
 * including their float arithmetic, so their cut-offs agree with llama.cpp.
 */
#include "sampler.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* One candidate token of the working set. */
typedef struct cand {
    int32_t id;
    float logit;
    float p;
} cand_t;

struct vlm_sampler {
    vlm_sampler_params_t params;
    int32_t n_vocab;
    uint64_t rng[4];        /* xoshiro256** state */
    cand_t *cand;           /* [n_vocab] working set */
    float *work;            /* [n_vocab] penalised logits */
    int32_t *count;         /* [n_vocab] occurrences in the history window */
    int32_t *hist;          /* [penalty_last_n] ring buffer of accepted ids */
    int32_t hist_len;       /* valid entries in hist */
    int32_t hist_head;      /* index of the oldest entry */
};

/* ==== PRNG: splitmix64 seeding, xoshiro256** output ==================== */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t rng_next(uint64_t s[4]) {
    const uint64_t result = rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

static void rng_seed(uint64_t s[4], uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) s[i] = splitmix64(&x);
}

/* Uniform double in [0, 1) with 53 random bits. */
static double rng_uniform(uint64_t s[4]) {
    return (double)(rng_next(s) >> 11) * 0x1.0p-53;
}

/* ==== Parameters ======================================================== */

void vlm_sampler_params_default(vlm_sampler_params_t *p) {
    VLM_ASSERT(p != NULL);
    memset(p, 0, sizeof *p);
    p->temperature = 0.8f;
    p->top_k = 40;
    p->top_p = 0.95f;
    p->min_p = 0.05f;
    p->repeat_penalty = 1.0f;
    p->frequency_penalty = 0.0f;
    p->presence_penalty = 0.0f;
    p->penalty_last_n = 64;
    p->seed = 0;
}

int vlm_sampler_params_validate(const vlm_sampler_params_t *p, vlm_error_t *err) {
    if (!p) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "sampler parameters are missing");
    if (!isfinite(p->temperature) || p->temperature < 0.0f)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG,
                             "temperature must be a finite number >= 0 (0 = greedy), got %g",
                             (double)p->temperature);
    if (p->top_k < 0)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "top_k must be >= 0 (0 = off), got %d",
                             (int)p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "top_p must be in (0, 1], got %g",
                             (double)p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "min_p must be in [0, 1], got %g",
                             (double)p->min_p);
    if (!isfinite(p->repeat_penalty) || p->repeat_penalty <= 0.0f)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG,
                             "repeat_penalty must be a finite number > 0 (1 = off), got %g",
                             (double)p->repeat_penalty);
    if (!isfinite(p->frequency_penalty))
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "frequency_penalty must be finite, got %g",
                             (double)p->frequency_penalty);
    if (!isfinite(p->presence_penalty))
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "presence_penalty must be finite, got %g",
                             (double)p->presence_penalty);
    if (p->penalty_last_n < 0)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG,
                             "penalty_last_n must be >= 0 (0 = off), got %d",
                             (int)p->penalty_last_n);
    vlm_error_clear(err);
    return VLM_OK;
}

/* ==== Lifetime ========================================================== */

vlm_sampler_t *vlm_sampler_new(const vlm_sampler_params_t *p, int32_t n_vocab) {
    if (vlm_sampler_params_validate(p, NULL) != VLM_OK || n_vocab <= 0) return NULL;
    vlm_sampler_t *s = calloc(1, sizeof *s);
    if (!s) goto fail_self;
    s->params = *p;
    s->n_vocab = n_vocab;
    s->cand = malloc((size_t)n_vocab * sizeof *s->cand);
    if (!s->cand) goto fail_cand;
    s->work = malloc((size_t)n_vocab * sizeof *s->work);
    if (!s->work) goto fail_work;
    s->count = calloc((size_t)n_vocab, sizeof *s->count);
    if (!s->count) goto fail_count;
    s->hist = malloc((size_t)(p->penalty_last_n > 0 ? p->penalty_last_n : 1) * sizeof *s->hist);
    if (!s->hist) goto fail_hist;
    vlm_sampler_reset(s);
    return s;

fail_hist:
    free(s->count);
fail_count:
    free(s->work);
fail_work:
    free(s->cand);
fail_cand:
    free(s);
fail_self:
    return NULL;
}

void vlm_sampler_destroy(vlm_sampler_t **self_p) {
    if (!self_p || !*self_p) return;
    vlm_sampler_t *s = *self_p;
    free(s->hist);
    free(s->count);
    free(s->work);
    free(s->cand);
    free(s);
    *self_p = NULL;
}

void vlm_sampler_reset(vlm_sampler_t *s) {
    VLM_ASSERT(s != NULL);
    memset(s->count, 0, (size_t)s->n_vocab * sizeof *s->count);
    s->hist_len = 0;
    s->hist_head = 0;
    rng_seed(s->rng, s->params.seed);
}

const vlm_sampler_params_t *vlm_sampler_params(const vlm_sampler_t *s) {
    VLM_ASSERT(s != NULL);
    return &s->params;
}

void vlm_sampler_accept(vlm_sampler_t *s, int32_t id) {
    VLM_ASSERT(s != NULL);
    const int32_t last_n = s->params.penalty_last_n;
    if (last_n == 0 || id < 0 || id >= s->n_vocab) return;
    if (s->hist_len == last_n) {
        /* Full: the oldest entry leaves the window. */
        s->count[s->hist[s->hist_head]]--;
        s->hist[s->hist_head] = id;
        s->hist_head = (s->hist_head + 1) % last_n;
    } else {
        s->hist[(s->hist_head + s->hist_len) % last_n] = id;
        s->hist_len++;
    }
    s->count[id]++;
}

/* ==== The chain ========================================================= */

/* Sort order of the working set: logit descending, then id ascending, so
 * that every sort is a total order and the result is reproducible. */
static int cand_cmp(const void *a, const void *b) {
    const cand_t *x = a, *y = b;
    if (x->logit > y->logit) return -1;
    if (x->logit < y->logit) return 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* True when x ranks strictly below y in cand_cmp order. */
static int cand_below(const cand_t *x, const cand_t *y) { return cand_cmp(x, y) > 0; }

/* Moves the k best candidates of c[0..n) to c[0..k), sorted. Uses a binary
 * min-heap of size k (the worst kept candidate at the root): O(n log k). */
static void select_top_k(cand_t *c, int32_t n, int32_t k) {
    /* Heapify c[0..k) as a min-heap by rank. */
    for (int32_t start = k / 2 - 1; start >= 0; start--) {
        int32_t i = start;
        for (;;) {
            int32_t l = 2 * i + 1, r = l + 1, m = i;
            if (l < k && cand_below(&c[l], &c[m])) m = l;
            if (r < k && cand_below(&c[r], &c[m])) m = r;
            if (m == i) break;
            cand_t t = c[i]; c[i] = c[m]; c[m] = t;
            i = m;
        }
    }
    for (int32_t j = k; j < n; j++) {
        if (!cand_below(&c[0], &c[j])) continue; /* not better than the worst kept */
        cand_t t = c[0]; c[0] = c[j]; c[j] = t;
        int32_t i = 0;
        for (;;) {
            int32_t l = 2 * i + 1, r = l + 1, m = i;
            if (l < k && cand_below(&c[l], &c[m])) m = l;
            if (r < k && cand_below(&c[r], &c[m])) m = r;
            if (m == i) break;
            cand_t u = c[i]; c[i] = c[m]; c[m] = u;
            i = m;
        }
    }
    qsort(c, (size_t)k, sizeof *c, cand_cmp);
}

/* Softmax of c[0..n) into c[i].p, as llama_sampler_softmax_impl computes it
 * (float, max subtracted, expf). c must be sorted (c[0] holds the max). */
static void softmax_sorted(cand_t *c, int32_t n) {
    const float max_l = c[0].logit;
    float sum = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        c[i].p = expf(c[i].logit - max_l);
        sum += c[i].p;
    }
    for (int32_t i = 0; i < n; i++) c[i].p /= sum;
}

/* Step 1: the penalised logits, written into s->work [n_vocab]. */
static void apply_penalties(vlm_sampler_t *s, const float *logits) {
    const vlm_sampler_params_t *p = &s->params;
    for (int32_t i = 0; i < s->n_vocab; i++) s->work[i] = isnan(logits[i]) ? -INFINITY : logits[i];
    if (p->penalty_last_n == 0 ||
        (p->repeat_penalty == 1.0f && p->frequency_penalty == 0.0f && p->presence_penalty == 0.0f))
        return;
    for (int32_t j = 0; j < s->hist_len; j++) {
        const int32_t id = s->hist[(s->hist_head + j) % p->penalty_last_n];
        const int32_t cnt = s->count[id];
        if (cnt <= 0) continue; /* already penalised (marked below) */
        float l = s->work[id];
        if (l <= 0.0f) l *= p->repeat_penalty;
        else l /= p->repeat_penalty;
        l -= (float)cnt * p->frequency_penalty + p->presence_penalty;
        s->work[id] = l;
        s->count[id] = -cnt; /* mark as done; restored below */
    }
    for (int32_t j = 0; j < s->hist_len; j++) {
        const int32_t id = s->hist[(s->hist_head + j) % p->penalty_last_n];
        if (s->count[id] < 0) s->count[id] = -s->count[id];
    }
}

int32_t vlm_sampler_sample(vlm_sampler_t *s, const float *logits) {
    VLM_ASSERT(s != NULL && logits != NULL);
    const vlm_sampler_params_t *p = &s->params;
    const int32_t n_vocab = s->n_vocab;

    /* 1. penalties */
    apply_penalties(s, logits);

    /* 2. greedy: the first maximum wins, i.e. ties go to the lowest id. */
    if (p->temperature <= 0.0f) {
        int32_t best = 0;
        for (int32_t i = 1; i < n_vocab; i++)
            if (s->work[i] > s->work[best]) best = i;
        return best;
    }

    cand_t *c = s->cand;
    int32_t n = n_vocab;
    int sorted = 0;
    for (int32_t i = 0; i < n; i++) {
        c[i].id = i;
        c[i].logit = s->work[i];
        c[i].p = 0.0f;
    }

    /* 3. top-k */
    if (p->top_k > 0 && p->top_k < n) {
        select_top_k(c, n, p->top_k);
        n = p->top_k;
        sorted = 1;
    }

    /* 4. top-p: keep the shortest sorted prefix whose mass reaches top_p. */
    if (p->top_p < 1.0f) {
        if (!sorted) {
            qsort(c, (size_t)n, sizeof *c, cand_cmp);
            sorted = 1;
        }
        if (c[0].logit == -INFINITY) return c[0].id; /* every logit is -inf */
        softmax_sorted(c, n);
        float cum = 0.0f;
        for (int32_t i = 0; i < n; i++) {
            cum += c[i].p;
            if (cum >= p->top_p) {
                n = i + 1;
                break;
            }
        }
    }

    /* 5. min-p: keep logits >= max + log(min_p); the maximum always stays. */
    if (p->min_p > 0.0f) {
        float max_l = -INFINITY;
        for (int32_t i = 0; i < n; i++) max_l = fmaxf(max_l, c[i].logit);
        const float min_l = max_l + logf(p->min_p);
        int32_t m = 0;
        for (int32_t i = 0; i < n; i++)
            if (c[i].logit >= min_l) c[m++] = c[i];
        if (m > 0) n = m;
    }

    /* 6. temperature */
    for (int32_t i = 0; i < n; i++) c[i].logit /= p->temperature;

    /* 7. dist: softmax over the survivors and one uniform draw. */
    float max_l = -INFINITY;
    int32_t arg = 0;
    for (int32_t i = 0; i < n; i++)
        if (c[i].logit > max_l) {
            max_l = c[i].logit;
            arg = i;
        }
    if (max_l == -INFINITY) return c[0].id;
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        c[i].p = expf(c[i].logit - max_l);
        sum += c[i].p;
    }
    const double r = rng_uniform(s->rng) * sum;
    double acc = 0.0;
    for (int32_t i = 0; i < n; i++) {
        acc += c[i].p;
        if (r < acc) return c[i].id;
    }
    return c[arg].id; /* rounding left r at the very top: take the best */
}
