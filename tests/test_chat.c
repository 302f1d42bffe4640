/* tests/test_chat.c - chat templates against llava-cli's golden prompt
 * layout and llama.cpp's template strings.
 *
 * The vicuna layout and placeholder mode are compared with the system/user
 * texts that llava-cli evaluated for every golden generation check. The other
 * templates are compared with the strings llama.cpp's
 * llm_chat_apply_template() builds for one system and one user message.
 * Detection is checked on template texts with each family's markers, on the
 * phi-3 peer vocabulary's real template, and on GGUF files with and without
 * tokenizer.chat_template.
 */
#include <jansson.h>

#include "core/gguf.h"
#include "core/gguf_write.h"
#include "harness.h"
#include "text/chat.h"

static const char *const k_cases[] = {"micro-f32", "small-q8_0"};

/* Checks that segment i is TEXT with exactly `text` and this BOS flag. */
static int text_is(const vlm_chat_prompt_t *p, int i, const char *text, bool bos) {
    if (i >= p->n_segments) return 0;
    const vlm_chat_segment_t *s = &p->segments[i];
    return s->kind == VLM_CHAT_SEGMENT_TEXT && s->text && strcmp(s->text, text) == 0 &&
           s->text_len == strlen(text) && s->add_bos == bos && s->image_index == -1;
}

static int image_is(const vlm_chat_prompt_t *p, int i, int index) {
    return i < p->n_segments && p->segments[i].kind == VLM_CHAT_SEGMENT_IMAGE &&
           p->segments[i].image_index == index && p->segments[i].text == NULL;
}

/* ==== llava-cli layout (golden) ========================================= */

static void test_golden_layout(void) {
    int n_checked = 0;
    for (size_t ci = 0; ci < sizeof k_cases / sizeof k_cases[0]; ci++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/golden/%s/case.json", VLM_TEST_DATA, k_cases[ci]);
        json_error_t jerr;
        json_t *root = json_load_file(path, 0, &jerr);
        REQUIRE(root != NULL, "%s: %s", path, jerr.text);
        json_t *gens = json_object_get(root, "generation_checks");
        for (size_t i = 0; i < json_array_size(gens); i++) {
            json_t *g = json_array_get(gens, i);
            const char *prompt = json_string_value(json_object_get(g, "prompt"));
            const char *mode = json_string_value(json_object_get(g, "mode"));
            const char *sys = json_string_value(json_object_get(g, "system_text"));
            const char *user = json_string_value(json_object_get(g, "user_text"));
            REQUIRE(prompt && mode && sys && user);
            vlm_chat_prompt_t p;
            vlm_error_t err;
            int rc = vlm_chat_build(VLM_CHAT_TEMPLATE_VICUNA, NULL, prompt, 1, &p, &err);
            CHECK(rc == VLM_OK, "%s", err.msg);
            CHECK(p.n_segments == 3, "%d segments", p.n_segments);
            CHECK(text_is(&p, 0, sys, true), "%s: system part", json_string_value(json_object_get(g, "id")));
            CHECK(image_is(&p, 1, 0));
            CHECK(text_is(&p, 2, user, false), "%s: user part", json_string_value(json_object_get(g, "id")));
            CHECK(p.placeholder == (strcmp(mode, "placeholder") == 0));
            CHECK(p.tmpl == (p.placeholder ? VLM_CHAT_TEMPLATE_RAW : VLM_CHAT_TEMPLATE_VICUNA));
            vlm_chat_prompt_deinit(&p);
            CHECK(p.n_segments == 0 && p.segments == NULL);
            n_checked++;
        }
        json_decref(root);
    }
    CHECK(n_checked == 30, "%d checks", n_checked);
}

static void test_vicuna_variants(void) {
    vlm_chat_prompt_t p;
    /* Text only: the same two parts, no image between. */
    REQUIRE(vlm_chat_build(VLM_CHAT_TEMPLATE_VICUNA, NULL, "hi", 0, &p, NULL) == VLM_OK);
    CHECK(p.n_segments == 2);
    CHECK(text_is(&p, 0, VLM_CHAT_LLAVA_SYSTEM "\nUSER:", true));
    CHECK(text_is(&p, 1, "hi\nASSISTANT:", false));
    vlm_chat_prompt_deinit(&p);
    /* Own system text, two images. */
    REQUIRE(vlm_chat_build(VLM_CHAT_TEMPLATE_VICUNA, "Be brief.", "compare", 2, &p, NULL) == VLM_OK);
    CHECK(p.n_segments == 4);
    CHECK(text_is(&p, 0, "Be brief.\nUSER:", true));
    CHECK(image_is(&p, 1, 0) && image_is(&p, 2, 1));
    CHECK(text_is(&p, 3, "compare\nASSISTANT:", false));
    vlm_chat_prompt_deinit(&p);
    /* No system at all. */
    REQUIRE(vlm_chat_build(VLM_CHAT_TEMPLATE_VICUNA, "", "x", 1, &p, NULL) == VLM_OK);
    CHECK(text_is(&p, 0, "USER:", true) && image_is(&p, 1, 0) && text_is(&p, 2, "x\nASSISTANT:", false));
    vlm_chat_prompt_deinit(&p);
}

/* ==== Placeholder mode ================================================== */

static void test_placeholder(void) {
    vlm_chat_prompt_t p;
    vlm_error_t err;
    REQUIRE(vlm_chat_build(VLM_CHAT_TEMPLATE_CHATML, "ignored", "a<image>b<image><image>c", 3, &p,
                           &err) == VLM_OK);
    CHECK(p.placeholder && p.n_segments == 6, "%d", p.n_segments);
    CHECK(text_is(&p, 0, "a", true));
    CHECK(image_is(&p, 1, 0));
    CHECK(text_is(&p, 2, "b", false));
    CHECK(image_is(&p, 3, 1) && image_is(&p, 4, 2));
    CHECK(text_is(&p, 5, "c", false));
    vlm_chat_prompt_deinit(&p);

    /* A leading marker still gives a BOS-only first part; a trailing one
     * adds no empty text. */
    REQUIRE(vlm_chat_build(VLM_CHAT_TEMPLATE_VICUNA, NULL, "<image>", 1, &p, &err) == VLM_OK);
    CHECK(p.n_segments == 2 && text_is(&p, 0, "", true) && image_is(&p, 1, 0));
    vlm_chat_prompt_deinit(&p);

    CHECK(vlm_chat_count_markers("<image><image>x<image") == 2);
    CHECK(vlm_chat_count_markers("") == 0);

    /* Marker count must equal the image count. */
    p.n_segments = 99; /* must be reset on failure */
    CHECK(vlm_chat_build(VLM_CHAT_TEMPLATE_VICUNA, NULL, "<image> and <image>", 1, &p, &err) ==
          VLM_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "2 \"<image>\" markers but 1 image") != NULL, "%s", err.msg);
    CHECK(p.n_segments == 0 && p.segments == NULL);
    CHECK(vlm_chat_build(VLM_CHAT_TEMPLATE_RAW, NULL, "look: <image>", 0, &p, &err) ==
          VLM_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "1 \"<image>\" marker but 0 images") != NULL, "%s", err.msg);
    CHECK(vlm_chat_build(VLM_CHAT_TEMPLATE_RAW, NULL, "<image>", 2, &p, &err) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_chat_build(VLM_CHAT_TEMPLATE_RAW, NULL, NULL, 0, &p, &err) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_chat_build(VLM_CHAT_TEMPLATE_RAW, NULL, "x", -1, &p, &err) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_chat_build(VLM_CHAT_TEMPLATE_COUNT, NULL, "x", 0, &p, &err) == VLM_ERR_INVALID_ARG);
    CHECK(vlm_chat_build(VLM_CHAT_TEMPLATE_UNKNOWN, NULL, "x", 0, &p, &err) == VLM_ERR_INVALID_ARG);
    vlm_chat_prompt_deinit(&p);
}

/* ==== llama.cpp's templates ============================================= */

/* One text-only build of tmpl must give exactly `want` as a single BOS
 * segment. */
static int single_is(vlm_chat_template_t tmpl, const char *sys, const char *prompt, const char *want) {
    vlm_chat_prompt_t p;
    if (vlm_chat_build(tmpl, sys, prompt, 0, &p, NULL) != VLM_OK) return 0;
    const int ok = p.n_segments == 1 && text_is(&p, 0, want, true);
    if (!ok && p.n_segments > 0) fprintf(stderr, "    got [%s]\n", p.segments[0].text);
    vlm_chat_prompt_deinit(&p);
    return ok;
}

static void test_templates_text_only(void) {
    CHECK(single_is(VLM_CHAT_TEMPLATE_RAW, NULL, "The picture shows", "The picture shows"));
    CHECK(single_is(VLM_CHAT_TEMPLATE_CHATML, "You are X.", "Hi",
                    "<|im_start|>system\nYou are X.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n"));
    CHECK(single_is(VLM_CHAT_TEMPLATE_CHATML, NULL, "Hi",
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"));
    CHECK(single_is(VLM_CHAT_TEMPLATE_LLAMA2, "You are X.", "Hi",
                    "[INST] <<SYS>>\nYou are X.\n<</SYS>>\n\nHi [/INST]"));
    CHECK(single_is(VLM_CHAT_TEMPLATE_LLAMA2, NULL, "Hi", "[INST] Hi [/INST]"));
    CHECK(single_is(VLM_CHAT_TEMPLATE_LLAMA3, " You are X.\n", "\tHi  ",
                    "<|start_header_id|>system<|end_header_id|>\n\nYou are X.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n"));
    CHECK(single_is(VLM_CHAT_TEMPLATE_LLAMA3, "", "Hi",
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n"));
    CHECK(single_is(VLM_CHAT_TEMPLATE_MISTRAL_V1, "You are X.", "Hi",
                    " [INST] You are X.\n\nHi [/INST]"));
    CHECK(single_is(VLM_CHAT_TEMPLATE_MISTRAL_V1, NULL, "Hi", " [INST] Hi [/INST]"));

    /* raw with a system text: system (BOS), then the prompt. */
    vlm_chat_prompt_t p;
    REQUIRE(vlm_chat_build(VLM_CHAT_TEMPLATE_RAW, "S", "P", 0, &p, NULL) == VLM_OK);
    CHECK(p.n_segments == 2 && text_is(&p, 0, "S", true) && text_is(&p, 1, "P", false));
    vlm_chat_prompt_deinit(&p);
}

static void test_templates_with_images(void) {
    vlm_chat_prompt_t p;
    REQUIRE(vlm_chat_build(VLM_CHAT_TEMPLATE_CHATML, NULL, "What is it?", 1, &p, NULL) == VLM_OK);
    CHECK(p.n_segments == 3);
    CHECK(text_is(&p, 0, "<|im_start|>user\n", true));
    CHECK(image_is(&p, 1, 0));
    CHECK(text_is(&p, 2, "What is it?<|im_end|>\n<|im_start|>assistant\n", false));
    vlm_chat_prompt_deinit(&p);

    REQUIRE(vlm_chat_build(VLM_CHAT_TEMPLATE_LLAMA2, "Sys", "Q", 2, &p, NULL) == VLM_OK);
    CHECK(p.n_segments == 4);
    CHECK(text_is(&p, 0, "[INST] <<SYS>>\nSys\n<</SYS>>\n\n", true));
    CHECK(image_is(&p, 1, 0) && image_is(&p, 2, 1));
    CHECK(text_is(&p, 3, "Q [/INST]", false));
    vlm_chat_prompt_deinit(&p);

    REQUIRE(vlm_chat_build(VLM_CHAT_TEMPLATE_LLAMA3, NULL, "Q", 1, &p, NULL) == VLM_OK);
    CHECK(text_is(&p, 0, "<|start_header_id|>user<|end_header_id|>\n\n", true));
    CHECK(text_is(&p, 2, "Q<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", false));
    vlm_chat_prompt_deinit(&p);

    REQUIRE(vlm_chat_build(VLM_CHAT_TEMPLATE_MISTRAL_V1, NULL, "Q", 1, &p, NULL) == VLM_OK);
    CHECK(text_is(&p, 0, " [INST] ", true) && image_is(&p, 1, 0) && text_is(&p, 2, "Q [/INST]", false));
    vlm_chat_prompt_deinit(&p);

    /* raw: a BOS-only part, the images, the prompt; an empty prompt adds nothing. */
    REQUIRE(vlm_chat_build(VLM_CHAT_TEMPLATE_RAW, NULL, "Q", 1, &p, NULL) == VLM_OK);
    CHECK(p.n_segments == 3 && text_is(&p, 0, "", true) && image_is(&p, 1, 0) && text_is(&p, 2, "Q", false));
    vlm_chat_prompt_deinit(&p);
    REQUIRE(vlm_chat_build(VLM_CHAT_TEMPLATE_RAW, NULL, "", 1, &p, NULL) == VLM_OK);
    CHECK(p.n_segments == 2 && text_is(&p, 0, "", true) && image_is(&p, 1, 0));
    vlm_chat_prompt_deinit(&p);
}

/* ==== Names and detection =============================================== */

static void test_names(void) {
    for (int t = 0; t < VLM_CHAT_TEMPLATE_COUNT; t++) {
        const char *name = vlm_chat_template_name((vlm_chat_template_t)t);
        CHECK(vlm_chat_template_from_name(name) == t, "%s", name);
    }
    CHECK(vlm_chat_template_from_name("llava") == VLM_CHAT_TEMPLATE_VICUNA);
    CHECK(vlm_chat_template_from_name("mistral") == VLM_CHAT_TEMPLATE_MISTRAL_V1);
    CHECK(vlm_chat_template_from_name("llama2-sys") == VLM_CHAT_TEMPLATE_LLAMA2);
    CHECK(vlm_chat_template_from_name("gemma") == VLM_CHAT_TEMPLATE_UNKNOWN);
    CHECK(vlm_chat_template_from_name(NULL) == VLM_CHAT_TEMPLATE_UNKNOWN);
    CHECK(strcmp(vlm_chat_template_name(VLM_CHAT_TEMPLATE_UNKNOWN), "unknown") == 0);
    CHECK(strcmp(vlm_chat_template_name(VLM_CHAT_TEMPLATE_RAW), "raw") == 0);
    CHECK(strcmp(vlm_chat_template_name(VLM_CHAT_TEMPLATE_VICUNA), "vicuna") == 0);
}

static vlm_chat_template_t detect(const char *s) { return vlm_chat_template_detect_text(s, strlen(s)); }

static void test_detect_text(void) {
    /* Bare llama.cpp names. */
    CHECK(detect("chatml") == VLM_CHAT_TEMPLATE_CHATML);
    CHECK(detect("llama3") == VLM_CHAT_TEMPLATE_LLAMA3);
    CHECK(detect("mistral-v1") == VLM_CHAT_TEMPLATE_MISTRAL_V1);
    CHECK(detect("raw") == VLM_CHAT_TEMPLATE_UNKNOWN, "not one of llama.cpp's names");
    /* chatml (OpenHermes style), but phi-4's <|im_sep|> is another family. */
    CHECK(detect("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}") == VLM_CHAT_TEMPLATE_CHATML);
    CHECK(detect("{{'<|im_start|>' + message['role'] + '<|im_sep|>'}}") == VLM_CHAT_TEMPLATE_UNKNOWN);
    /* llama2 and Mistral-Instruct v0.2 style ([INST] without the v1 markers). */
    CHECK(detect("{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}") == VLM_CHAT_TEMPLATE_LLAMA2);
    CHECK(detect("{% if system %}<<SYS>>\\n{{ system }}\\n<</SYS>>{% endif %}[INST]") ==
          VLM_CHAT_TEMPLATE_LLAMA2);
    CHECK(detect("mistral-style") == VLM_CHAT_TEMPLATE_LLAMA2, "starts with mistral");
    /* Official mistral v1 (leading space) vs v3 / v7. */
    CHECK(detect("{{ ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}") ==
          VLM_CHAT_TEMPLATE_MISTRAL_V1);
    CHECK(detect("{{ '[AVAILABLE_TOOLS]' }}{{ '[INST]' + message['content'] }}") == VLM_CHAT_TEMPLATE_UNKNOWN);
    CHECK(detect("[SYSTEM_PROMPT]{{ s }}[/SYSTEM_PROMPT][INST]") == VLM_CHAT_TEMPLATE_UNKNOWN);
    /* llama3 */
    CHECK(detect("{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
                 "message['content'] | trim + '<|eot_id|>' }}") == VLM_CHAT_TEMPLATE_LLAMA3);
    /* vicuna (and its Orca variant) */
    CHECK(detect("{{ 'USER: ' + content + '\\n' }}{{ 'ASSISTANT: ' + content + '</s>' }}") ==
          VLM_CHAT_TEMPLATE_VICUNA);
    CHECK(detect("{{ 'SYSTEM: ' + s }}{{ 'USER: ' + u }}{{ 'ASSISTANT: ' + a }}") == VLM_CHAT_TEMPLATE_VICUNA);
    /* Families that are not supported, including ones whose text also has a
     * later family's markers. */
    CHECK(detect("{{ '<start_of_turn>' + role }}") == VLM_CHAT_TEMPLATE_UNKNOWN);
    CHECK(detect("{{'<|user|>' + '\\n' + c + '<|end|>' + '\\n' + '<|assistant|>'}}") ==
          VLM_CHAT_TEMPLATE_UNKNOWN);
    CHECK(detect("GPT4 Correct USER: x ASSISTANT: y") == VLM_CHAT_TEMPLATE_UNKNOWN);
    CHECK(detect("") == VLM_CHAT_TEMPLATE_UNKNOWN);
    CHECK(vlm_chat_template_detect_text(NULL, 0) == VLM_CHAT_TEMPLATE_UNKNOWN);
    /* The length bounds the search. */
    CHECK(vlm_chat_template_detect_text("chatml<|im_start|>", 4) == VLM_CHAT_TEMPLATE_UNKNOWN);
}

/* Builds an in-memory GGUF with an optional chat template and detects. */
static vlm_chat_template_t detect_gguf(const char *tmpl) {
    vlm_gguf_writer_t *w = vlm_gguf_writer_new();
    if (!w) return (vlm_chat_template_t)-99;
    vlm_gguf_writer_set_str(w, "general.architecture", "llama");
    if (tmpl) vlm_gguf_writer_set_str(w, "tokenizer.chat_template", tmpl);
    void *data = NULL;
    size_t size = 0;
    vlm_gguf_t *g = NULL;
    vlm_chat_template_t t = (vlm_chat_template_t)-99;
    if (vlm_gguf_writer_write_mem(w, &data, &size, NULL) == VLM_OK &&
        vlm_gguf_open_buffer(data, size, &g, NULL) == VLM_OK)
        t = vlm_chat_template_detect(g);
    vlm_gguf_destroy(&g);
    free(data);
    vlm_gguf_writer_destroy(&w);
    return t;
}

static void test_detect_gguf(void) {
    CHECK(detect_gguf(NULL) == VLM_CHAT_TEMPLATE_VICUNA, "no template: LLaVA-1.5");
    CHECK(detect_gguf("{{'<|im_start|>'}}") == VLM_CHAT_TEMPLATE_CHATML);
    CHECK(detect_gguf("<start_of_turn>") == VLM_CHAT_TEMPLATE_VICUNA, "unknown: llava-cli's layout");
    CHECK(vlm_chat_template_detect(NULL) == VLM_CHAT_TEMPLATE_VICUNA);

    /* The golden LLaVA text model has no template. */
    char path[1024];
    snprintf(path, sizeof path, "%s/golden/micro-f32/text.gguf", VLM_TEST_DATA);
    vlm_gguf_t *g = NULL;
    vlm_error_t err;
    CHECK(vlm_gguf_open(path, &g, &err) == VLM_OK, "%s", err.msg);
    if (g) CHECK(vlm_chat_template_detect(g) == VLM_CHAT_TEMPLATE_VICUNA);
    vlm_gguf_destroy(&g);

    /* llama.cpp's phi-3 vocabulary carries phi-3's real template: another
     * family, so the fallback applies. */
    snprintf(path, sizeof path, "%s/peer/llama.cpp-vocab/ggml-vocab-phi-3.gguf", VLM_SHARED_DIR);
    FILE *f = fopen(path, "rb");
    if (!f) SKIP("%s absent", path);
    fclose(f);
    REQUIRE(vlm_gguf_open(path, &g, &err) == VLM_OK, "%s", err.msg);
    const char *s = NULL;
    size_t n = 0;
    CHECK(vlm_gguf_get_str(g, "tokenizer.chat_template", &s, &n, NULL) == VLM_OK);
    CHECK(s && vlm_chat_template_detect_text(s, n) == VLM_CHAT_TEMPLATE_UNKNOWN);
    CHECK(vlm_chat_template_detect(g) == VLM_CHAT_TEMPLATE_VICUNA);
    vlm_gguf_destroy(&g);
}

/* ==== Stop strings ====================================================== */

static vlm_chat_stop_t stop(vlm_chat_template_t t, const char *piece, const char *answer,
                            const char **m) {
    return vlm_chat_stop_check(t, piece, strlen(piece), answer, strlen(answer), m);
}

static void test_stops(void) {
    const char *m = "x";
    const vlm_chat_template_t v = VLM_CHAT_TEMPLATE_VICUNA;
    CHECK(stop(v, " hello", "Hi hello", &m) == VLM_CHAT_STOP_NONE && m == NULL);
    CHECK(stop(v, "a###", "xa###", &m) == VLM_CHAT_STOP_DROP_PIECE && strcmp(m, "###") == 0);
    /* "###" spread over two pieces is not a piece match (llava-cli's strstr on the piece). */
    CHECK(stop(v, "#", "ab##" "#", &m) == VLM_CHAT_STOP_NONE);
    CHECK(stop(v, ":", "fine. USER:", &m) == VLM_CHAT_STOP_KEEP_PIECE && strcmp(m, "USER:") == 0);
    CHECK(stop(v, "end|>", "ok<|im_end|>", &m) == VLM_CHAT_STOP_KEEP_PIECE && strcmp(m, "<|im_end|>") == 0);
    CHECK(stop(v, "<|im_start|>", "<|im_start|>", &m) == VLM_CHAT_STOP_KEEP_PIECE);
    CHECK(stop(v, "<|eot_id|>", "<|eot_id|>", &m) == VLM_CHAT_STOP_NONE, "not a vicuna stop");
    CHECK(stop(VLM_CHAT_TEMPLATE_LLAMA3, "<|eot_id|>", "a<|eot_id|>", &m) == VLM_CHAT_STOP_KEEP_PIECE);
    CHECK(stop(VLM_CHAT_TEMPLATE_LLAMA2, "]", "x [INST]", &m) == VLM_CHAT_STOP_KEEP_PIECE);
    CHECK(stop(VLM_CHAT_TEMPLATE_RAW, ":", "USER:", NULL) == VLM_CHAT_STOP_KEEP_PIECE);
    /* Bytes after a NUL still count. */
    const char piece[] = {'\0', '#', '#', '#'};
    CHECK(vlm_chat_stop_check(v, piece, 4, piece, 4, &m) == VLM_CHAT_STOP_DROP_PIECE);
    int n = 0;
    const char *const *list = vlm_chat_template_stops(v, &n);
    CHECK(n == 4 && strcmp(list[0], "###") == 0 && strcmp(list[3], "USER:") == 0);
}

int main(void) {
    RUN(test_golden_layout);
    RUN(test_vicuna_variants);
    RUN(test_placeholder);
    RUN(test_templates_text_only);
    RUN(test_templates_with_images);
    RUN(test_names);
    RUN(test_detect_text);
    RUN(test_detect_gguf);
    RUN(test_stops);
    return harness_report();
}
