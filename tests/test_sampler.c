/* tests/test_sampler.c - the sampler against golden logits and known math.
 *
 * Greedy is checked on llama.cpp's own logits (every golden case: the
 * first generated token of each generation check and of the text-only
 * check). The filters are checked by what they must keep (top-k = 1, a tiny
 * top-p and min-p = 1 all reduce to greedy), the draws by a chi-square test
 * against the softmax they must follow, and the penalties by hand-computed
 * values.
 */
#include <jansson.h>
#include <math.h>
#include <stdint.h>

#include "harness.h"
#include "text/sampler.h"

static const char *const k_cases[] = {"micro-f32", "small-q8_0", "small-q4_0", "small-q4_k_m"};

/* Reads n_vocab floats from tests/data/golden/<case>/<file>; NULL if absent. */
static float *read_logits(const char *case_name, const char *file, size_t n_vocab) {
    char path[1024];
    snprintf(path, sizeof path, "%s/golden/%s/%s", VLM_TEST_DATA, case_name, file);
    size_t size = 0;
    float *v = harness_read_file(path, &size);
    if (v && size != n_vocab * sizeof(float)) {
        free(v);
        return NULL;
    }
    return v;
}

static vlm_sampler_params_t greedy_params(void) {
    vlm_sampler_params_t p;
    vlm_sampler_params_default(&p);
    p.temperature = 0.0f;
    return p;
}

/* Temperature 1 with every filter off: a plain softmax draw. */
static vlm_sampler_params_t plain_params(uint64_t seed) {
    vlm_sampler_params_t p;
    vlm_sampler_params_default(&p);
    p.temperature = 1.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.seed = seed;
    return p;
}

/* ==== Greedy ============================================================ */

static void test_greedy_golden(void) {
    int n_checked = 0;
    for (size_t ci = 0; ci < sizeof k_cases / sizeof k_cases[0]; ci++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/golden/%s/case.json", VLM_TEST_DATA, k_cases[ci]);
        json_error_t jerr;
        json_t *root = json_load_file(path, 0, &jerr);
        REQUIRE(root != NULL, "%s: %s", path, jerr.text);
        const size_t n_vocab = (size_t)json_integer_value(json_object_get(
            json_object_get(json_object_get(root, "hparams"), "text_gguf_metadata"),
            "llama.vocab_size"));
        CHECK(n_vocab > 0);
        vlm_sampler_params_t p = greedy_params();
        vlm_sampler_t *s = vlm_sampler_new(&p, (int32_t)n_vocab);
        CHECK(s != NULL);

        json_t *gens = json_object_get(root, "generation_checks");
        for (size_t i = 0; s && i < json_array_size(gens); i++) {
            json_t *g = json_array_get(gens, i);
            char file[64];
            snprintf(file, sizeof file, "%s.logits0.f32", json_string_value(json_object_get(g, "id")));
            float *logits = read_logits(k_cases[ci], file, n_vocab);
            CHECK(logits != NULL, "%s/%s", k_cases[ci], file);
            if (!logits) continue;
            const int32_t want = (int32_t)json_integer_value(
                json_array_get(json_object_get(g, "expected_ids"), 0));
            const int32_t got = vlm_sampler_sample(s, logits);
            CHECK(got == want, "%s/%s: got %d, want %d", k_cases[ci], file, got, want);
            n_checked++;
            free(logits);
        }
        float *logits = read_logits(k_cases[ci], "textonly.logits_last.f32", n_vocab);
        CHECK(logits != NULL);
        if (logits && s) {
            const int32_t want = (int32_t)json_integer_value(json_array_get(
                json_object_get(json_object_get(root, "text_only_check"), "expected_ids"), 0));
            CHECK(vlm_sampler_sample(s, logits) == want, "%s text-only", k_cases[ci]);
            n_checked++;
        }
        free(logits);
        vlm_sampler_destroy(&s);
        CHECK(s == NULL);
        json_decref(root);
    }
    CHECK(n_checked == 64, "checked %d rows", n_checked);
}

static void test_greedy_ties_and_nan(void) {
    vlm_sampler_params_t p = greedy_params();
    vlm_sampler_t *s = vlm_sampler_new(&p, 8);
    REQUIRE(s != NULL);
    const float tie[8] = {0, 1, 2, 5, 1, 5, 5, -3};
    CHECK(vlm_sampler_sample(s, tie) == 3, "ties go to the lowest id");
    const float nan_first[8] = {NAN, 1, 2, 0, 1, 0, 0, -3};
    CHECK(vlm_sampler_sample(s, nan_first) == 2, "NaN counts as -inf");
    const float all_inf[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY,
                              -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    CHECK(vlm_sampler_sample(s, all_inf) == 0);
    vlm_sampler_destroy(&s);

    /* The same with the random chain: a lone -inf row still gives a valid id. */
    p = plain_params(1);
    s = vlm_sampler_new(&p, 8);
    REQUIRE(s != NULL);
    int32_t id = vlm_sampler_sample(s, all_inf);
    CHECK(id >= 0 && id < 8);
    vlm_sampler_destroy(&s);
}

/* ==== Filters that must reduce to greedy ================================ */

/* Deterministic pseudo-random logits in [-8, 8) for filter tests. */
static void fill_logits(float *v, int n, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 12345u;
    for (int i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        v[i] = (float)((x >> 8) & 0xffff) / 4096.0f - 8.0f;
    }
}

static int32_t argmax(const float *v, int n) {
    int32_t b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b]) b = i;
    return b;
}

static void test_filters_equal_greedy(void) {
    enum { N = 1000, ROWS = 200 };
    float *v = malloc(N * sizeof *v);
    REQUIRE(v != NULL);
    vlm_sampler_params_t pk = plain_params(7), pp = plain_params(8), pm = plain_params(9);
    pk.top_k = 1;
    pp.top_p = 1e-6f;
    pm.min_p = 1.0f;
    pk.temperature = pp.temperature = pm.temperature = 1.5f;
    vlm_sampler_t *sk = vlm_sampler_new(&pk, N), *sp = vlm_sampler_new(&pp, N),
                  *sm = vlm_sampler_new(&pm, N);
    CHECK(sk && sp && sm);
    int bad_k = 0, bad_p = 0, bad_m = 0;
    for (int r = 0; sk && sp && sm && r < ROWS; r++) {
        fill_logits(v, N, (uint32_t)r + 1);
        const int32_t want = argmax(v, N);
        bad_k += vlm_sampler_sample(sk, v) != want;
        bad_p += vlm_sampler_sample(sp, v) != want;
        bad_m += vlm_sampler_sample(sm, v) != want;
    }
    CHECK(bad_k == 0, "top-k=1: %d rows differ from greedy", bad_k);
    CHECK(bad_p == 0, "top-p=1e-6: %d rows differ from greedy", bad_p);
    CHECK(bad_m == 0, "min-p=1: %d rows differ from greedy", bad_m);
    vlm_sampler_destroy(&sk);
    vlm_sampler_destroy(&sp);
    vlm_sampler_destroy(&sm);
    free(v);
}

/* ==== Determinism ======================================================= */

static void test_seed_determinism(void) {
    enum { N = 300, DRAWS = 500 };
    float v[N];
    fill_logits(v, N, 99);
    for (int i = 0; i < N; i++) v[i] *= 0.25f; /* flat enough that draws vary */
    vlm_sampler_params_t p = plain_params(1234);
    p.top_k = 50;
    p.top_p = 0.9f;
    vlm_sampler_t *a = vlm_sampler_new(&p, N), *b = vlm_sampler_new(&p, N);
    p.seed = 1235;
    vlm_sampler_t *c = vlm_sampler_new(&p, N);
    REQUIRE(a && b && c);
    int32_t seq[DRAWS];
    int same_ab = 1, same_ac = 1, distinct = 0;
    for (int i = 0; i < DRAWS; i++) {
        seq[i] = vlm_sampler_sample(a, v);
        same_ab &= seq[i] == vlm_sampler_sample(b, v);
        same_ac &= seq[i] == vlm_sampler_sample(c, v);
        distinct += i > 0 && seq[i] != seq[i - 1];
    }
    CHECK(same_ab, "the same seed must give the same draws");
    CHECK(!same_ac, "another seed should give other draws");
    CHECK(distinct > DRAWS / 4, "draws should vary (%d changes)", distinct);
    vlm_sampler_reset(a);
    int same_again = 1;
    for (int i = 0; i < DRAWS; i++) same_again &= seq[i] == vlm_sampler_sample(a, v);
    CHECK(same_again, "reset must restart the sequence");
    vlm_sampler_destroy(&a);
    vlm_sampler_destroy(&b);
    vlm_sampler_destroy(&c);
}

/* ==== Distributions ===================================================== */

/* Draws n times from s on v[k] and returns the chi-square statistic of the
 * counts against probs[k] (bins with prob 0 must stay empty: *stray counts
 * draws that landed there). */
static double chi_square(vlm_sampler_t *s, const float *v, const double *probs, int k, int n,
                         int *stray) {
    int count[16] = {0};
    *stray = 0;
    for (int i = 0; i < n; i++) {
        int32_t id = vlm_sampler_sample(s, v);
        if (id < 0 || id >= k) {
            (*stray)++;
            continue;
        }
        count[id]++;
    }
    double chi = 0;
    for (int j = 0; j < k; j++) {
        if (probs[j] == 0) {
            *stray += count[j];
            continue;
        }
        const double e = probs[j] * n;
        chi += (count[j] - e) * (count[j] - e) / e;
    }
    return chi;
}

static void test_temperature_distribution(void) {
    /* logits ln1, ln2, ln4: softmax 1/7, 2/7, 4/7 at T = 1; at T = 2 the
     * weights become 1, sqrt 2, 2. Chi-square with 2 degrees of freedom:
     * 13.8 is the 0.1% point. */
    const float v[3] = {0.0f, logf(2.0f), logf(4.0f)};
    const int n = 70000;
    int stray = 0;
    vlm_sampler_params_t p = plain_params(42);
    vlm_sampler_t *s = vlm_sampler_new(&p, 3);
    REQUIRE(s != NULL);
    const double p1[3] = {1.0 / 7, 2.0 / 7, 4.0 / 7};
    double chi = chi_square(s, v, p1, 3, n, &stray);
    CHECK(chi < 13.8 && stray == 0, "T=1: chi2 %.2f, stray %d", chi, stray);
    vlm_sampler_destroy(&s);

    p.temperature = 2.0f;
    s = vlm_sampler_new(&p, 3);
    REQUIRE(s != NULL);
    const double z = 1 + sqrt(2.0) + 2;
    const double p2[3] = {1 / z, sqrt(2.0) / z, 2 / z};
    chi = chi_square(s, v, p2, 3, n, &stray);
    CHECK(chi < 13.8 && stray == 0, "T=2: chi2 %.2f, stray %d", chi, stray);
    /* And the T=1 probabilities must be rejected (the test has power). */
    vlm_sampler_reset(s);
    chi = chi_square(s, v, p1, 3, n, &stray);
    CHECK(chi > 100, "T=2 draws should not fit T=1 (chi2 %.2f)", chi);
    vlm_sampler_destroy(&s);
}

static void test_top_k_top_p_min_p_distribution(void) {
    /* probs 0.5, 0.3, 0.2 (plus a -inf token that must never appear). */
    const float v[4] = {logf(0.5f), logf(0.3f), logf(0.2f), -INFINITY};
    const int n = 40000;
    int stray = 0;
    const double two[4] = {0.625, 0.375, 0, 0};

    vlm_sampler_params_t p = plain_params(5);
    p.top_k = 2; /* keeps 0.5, 0.3 -> 5/8, 3/8 */
    vlm_sampler_t *s = vlm_sampler_new(&p, 4);
    REQUIRE(s != NULL);
    double chi = chi_square(s, v, two, 4, n, &stray);
    CHECK(chi < 10.8 && stray == 0, "top-k 2: chi2 %.2f, stray %d", chi, stray);
    vlm_sampler_destroy(&s);

    p = plain_params(6);
    p.top_p = 0.75f; /* 0.5 < 0.75 <= 0.8: keeps two */
    s = vlm_sampler_new(&p, 4);
    REQUIRE(s != NULL);
    chi = chi_square(s, v, two, 4, n, &stray);
    CHECK(chi < 10.8 && stray == 0, "top-p 0.75: chi2 %.2f, stray %d", chi, stray);
    vlm_sampler_destroy(&s);

    p = plain_params(7);
    p.min_p = 0.5f; /* keeps p >= 0.25 */
    s = vlm_sampler_new(&p, 4);
    REQUIRE(s != NULL);
    chi = chi_square(s, v, two, 4, n, &stray);
    CHECK(chi < 10.8 && stray == 0, "min-p 0.5: chi2 %.2f, stray %d", chi, stray);
    vlm_sampler_destroy(&s);

    /* top-p is applied before temperature (llama.cpp's order): at T = 10 the
     * survivors are still two, now nearly uniform: weights 0.5^0.1, 0.3^0.1. */
    p = plain_params(8);
    p.top_p = 0.75f;
    p.temperature = 10.0f;
    s = vlm_sampler_new(&p, 4);
    REQUIRE(s != NULL);
    const double a = pow(0.5, 0.1), b = pow(0.3, 0.1);
    const double hot[4] = {a / (a + b), b / (a + b), 0, 0};
    chi = chi_square(s, v, hot, 4, n, &stray);
    CHECK(chi < 10.8 && stray == 0, "top-p then T=10: chi2 %.2f, stray %d", chi, stray);
    vlm_sampler_destroy(&s);
}

/* ==== Penalties ========================================================= */

static void test_repeat_penalty(void) {
    vlm_sampler_params_t p = greedy_params();
    p.repeat_penalty = 2.0f;
    p.penalty_last_n = 2;
    vlm_sampler_t *s = vlm_sampler_new(&p, 4);
    REQUIRE(s != NULL);

    /* Positive logit: divided. 3.0 / 2 = 1.5 < 2.0. */
    const float pos[4] = {3.0f, 2.0f, -5.0f, -5.0f};
    CHECK(vlm_sampler_sample(s, pos) == 0, "no history yet");
    vlm_sampler_accept(s, 0);
    CHECK(vlm_sampler_sample(s, pos) == 1, "3.0 / 2 < 2.0");
    /* Just above the threshold: 4.1 / 2 = 2.05 > 2.0. */
    const float pos2[4] = {4.1f, 2.0f, -5.0f, -5.0f};
    CHECK(vlm_sampler_sample(s, pos2) == 0, "4.1 / 2 > 2.0");

    /* Negative logit: multiplied. -1.0 * 2 = -2.0 < -1.5. */
    const float neg[4] = {-1.0f, -1.5f, -5.0f, -5.0f};
    CHECK(vlm_sampler_sample(s, neg) == 1, "-1.0 * 2 < -1.5");
    /* Zero counts as non-positive: 0 * 2 = 0 still beats -0.1. */
    const float zero[4] = {0.0f, -0.1f, -5.0f, -5.0f};
    CHECK(vlm_sampler_sample(s, zero) == 0, "0 * 2 = 0");

    /* A token repeated in the window is penalised once, not per occurrence:
     * 8.0 / 2 = 4 > 3 (twice would give 2 < 3). */
    vlm_sampler_accept(s, 0); /* window: 0, 0 */
    const float rep[4] = {8.0f, 3.0f, -5.0f, -5.0f};
    CHECK(vlm_sampler_sample(s, rep) == 0, "penalised once");

    /* The window slides: after two other tokens, 0 is out of it. */
    vlm_sampler_accept(s, 2);
    vlm_sampler_accept(s, 3); /* window: 2, 3 */
    CHECK(vlm_sampler_sample(s, pos) == 0, "0 left the window");
    vlm_sampler_accept(s, 3);
    vlm_sampler_accept(s, 3);
    vlm_sampler_accept(s, 99); /* outside the vocabulary: ignored */
    vlm_sampler_accept(s, -1);
    const float four[4] = {1.0f, 1.0f, 1.0f, 1.9f};
    CHECK(vlm_sampler_sample(s, four) == 0, "1.9 / 2 < 1.0");

    /* Reset clears the history. */
    vlm_sampler_reset(s);
    CHECK(vlm_sampler_sample(s, four) == 3, "history cleared");
    vlm_sampler_destroy(&s);

    /* penalty_last_n = 0 turns penalties off. */
    p.penalty_last_n = 0;
    s = vlm_sampler_new(&p, 4);
    REQUIRE(s != NULL);
    vlm_sampler_accept(s, 0);
    CHECK(vlm_sampler_sample(s, pos) == 0, "penalties off");
    vlm_sampler_destroy(&s);
}

static void test_frequency_presence_penalty(void) {
    /* llama.cpp: logit -= count * freq + (count > 0) * presence, after the
     * repeat penalty. Token 0 seen 3 times: 5.0 - 3 * 0.5 - 1.0 = 2.5. */
    vlm_sampler_params_t p = greedy_params();
    p.frequency_penalty = 0.5f;
    p.presence_penalty = 1.0f;
    p.penalty_last_n = 64;
    vlm_sampler_t *s = vlm_sampler_new(&p, 3);
    REQUIRE(s != NULL);
    for (int i = 0; i < 3; i++) vlm_sampler_accept(s, 0);
    const float a[3] = {5.0f, 2.49f, 0.0f};
    CHECK(vlm_sampler_sample(s, a) == 0, "2.5 > 2.49");
    const float b[3] = {5.0f, 2.51f, 0.0f};
    CHECK(vlm_sampler_sample(s, b) == 1, "2.5 < 2.51");
    vlm_sampler_destroy(&s);

    /* With a repeat penalty too: (6.0 / 2) - 3 * 0.5 - 1.0 = 0.5. */
    p.repeat_penalty = 2.0f;
    s = vlm_sampler_new(&p, 3);
    REQUIRE(s != NULL);
    for (int i = 0; i < 3; i++) vlm_sampler_accept(s, 0);
    const float c[3] = {6.0f, 0.49f, 0.51f};
    CHECK(vlm_sampler_sample(s, c) == 2, "0.5 < 0.51");
    const float d[3] = {6.0f, 0.49f, 0.0f};
    CHECK(vlm_sampler_sample(s, d) == 0, "0.5 > 0.49");
    vlm_sampler_destroy(&s);
}

/* ==== Validation ======================================================== */

static void test_validate(void) {
    vlm_sampler_params_t p;
    vlm_error_t err;
    vlm_sampler_params_default(&p);
    CHECK(vlm_sampler_params_validate(&p, &err) == VLM_OK, "%s", err.msg);
    CHECK(p.temperature == 0.8f && p.top_k == 40 && p.top_p == 0.95f && p.min_p == 0.05f &&
          p.repeat_penalty == 1.0f && p.penalty_last_n == 64);

    vlm_sampler_params_t q;
#define EXPECT_BAD(field, value, word)                                                   \
    do {                                                                                 \
        q = p;                                                                           \
        q.field = value;                                                                 \
        CHECK(vlm_sampler_params_validate(&q, &err) == VLM_ERR_INVALID_ARG, #field);     \
        CHECK(strstr(err.msg, word) != NULL, "%s", err.msg);                             \
        CHECK(vlm_sampler_new(&q, 10) == NULL, #field);                                  \
    } while (0)
    EXPECT_BAD(temperature, NAN, "temperature");
    EXPECT_BAD(temperature, -0.5f, "temperature");
    EXPECT_BAD(temperature, INFINITY, "temperature");
    EXPECT_BAD(top_k, -1, "top_k");
    EXPECT_BAD(top_p, 0.0f, "top_p");
    EXPECT_BAD(top_p, 1.5f, "top_p");
    EXPECT_BAD(top_p, NAN, "top_p");
    EXPECT_BAD(min_p, -0.1f, "min_p");
    EXPECT_BAD(min_p, 1.01f, "min_p");
    EXPECT_BAD(min_p, NAN, "min_p");
    EXPECT_BAD(repeat_penalty, 0.0f, "repeat_penalty");
    EXPECT_BAD(repeat_penalty, -1.0f, "repeat_penalty");
    EXPECT_BAD(repeat_penalty, NAN, "repeat_penalty");
    EXPECT_BAD(frequency_penalty, NAN, "frequency_penalty");
    EXPECT_BAD(presence_penalty, INFINITY, "presence_penalty");
    EXPECT_BAD(penalty_last_n, -1, "penalty_last_n");
#undef EXPECT_BAD
    CHECK(vlm_sampler_params_validate(NULL, &err) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_sampler_new(&p, 0) == NULL, "empty vocabulary");

    /* Boundary values that are valid. */
    q = p;
    q.temperature = 0.0f;
    q.top_k = 0;
    q.top_p = 1.0f;
    q.min_p = 1.0f;
    CHECK(vlm_sampler_params_validate(&q, &err) == VLM_OK, "%s", err.msg);
    vlm_sampler_t *s = vlm_sampler_new(&q, 10);
    CHECK(s != NULL);
    CHECK(s && vlm_sampler_params(s)->min_p == 1.0f);
    vlm_sampler_destroy(&s);
    vlm_sampler_destroy(&s); /* NULL-safe */
    vlm_sampler_destroy(NULL);
}

int main(void) {
    RUN(test_greedy_golden);
    RUN(test_greedy_ties_and_nan);
    RUN(test_filters_equal_greedy);
    RUN(test_seed_determinism);
    RUN(test_temperature_distribution);
    RUN(test_top_k_top_p_min_p_distribution);
    RUN(test_repeat_penalty);
    RUN(test_frequency_presence_penalty);
    RUN(test_validate);
    return harness_report();
}
