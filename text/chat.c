/* text/chat.c - chat template detection, formatting into segments, and stop
 * strings. See chat.h for the layouts and where each one comes from.
 */
#include "chat.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ==== Names ============================================================= */

static const char *const k_names[VLM_CHAT_TEMPLATE_COUNT] = {
    [VLM_CHAT_TEMPLATE_RAW] = "raw",
    [VLM_CHAT_TEMPLATE_VICUNA] = "vicuna",
    [VLM_CHAT_TEMPLATE_LLAMA2] = "llama2",
    [VLM_CHAT_TEMPLATE_LLAMA3] = "llama3",
    [VLM_CHAT_TEMPLATE_MISTRAL_V1] = "mistral-v1",
    [VLM_CHAT_TEMPLATE_CHATML] = "chatml",
};

/* Other accepted spellings, llama.cpp's variant names among them. */
static const struct {
    const char *name;
    vlm_chat_template_t tmpl;
} k_aliases[] = {
    {"none", VLM_CHAT_TEMPLATE_RAW},
    {"llava", VLM_CHAT_TEMPLATE_VICUNA},
    {"llava-1.5", VLM_CHAT_TEMPLATE_VICUNA},
    {"llava1.5", VLM_CHAT_TEMPLATE_VICUNA},
    {"vicuna-1.1", VLM_CHAT_TEMPLATE_VICUNA},
    {"llama-2", VLM_CHAT_TEMPLATE_LLAMA2},
    {"llama2-sys", VLM_CHAT_TEMPLATE_LLAMA2},
    {"llama2-sys-bos", VLM_CHAT_TEMPLATE_LLAMA2},
    {"llama2-sys-strip", VLM_CHAT_TEMPLATE_LLAMA2},
    {"llama-3", VLM_CHAT_TEMPLATE_LLAMA3},
    {"mistral", VLM_CHAT_TEMPLATE_MISTRAL_V1},
};

vlm_chat_template_t vlm_chat_template_from_name(const char *name) {
    if (!name) return VLM_CHAT_TEMPLATE_UNKNOWN;
    for (int i = 0; i < VLM_CHAT_TEMPLATE_COUNT; i++)
        if (strcmp(name, k_names[i]) == 0) return (vlm_chat_template_t)i;
    for (size_t i = 0; i < sizeof k_aliases / sizeof k_aliases[0]; i++)
        if (strcmp(name, k_aliases[i].name) == 0) return k_aliases[i].tmpl;
    return VLM_CHAT_TEMPLATE_UNKNOWN;
}

const char *vlm_chat_template_name(vlm_chat_template_t tmpl) {
    if (tmpl < 0 || tmpl >= VLM_CHAT_TEMPLATE_COUNT) return "unknown";
    return k_names[tmpl];
}

/* ==== Detection ========================================================= */

/* A bounded view of the template text. */
typedef struct view {
    const char *s;
    size_t n;
} view_t;

static bool has(view_t v, const char *needle) {
    return memmem(v.s, v.n, needle, strlen(needle)) != NULL;
}

static bool starts_with(view_t v, const char *prefix) {
    const size_t n = strlen(prefix);
    return v.n >= n && memcmp(v.s, prefix, n) == 0;
}

vlm_chat_template_t vlm_chat_template_detect_text(const char *tmpl, size_t len) {
    if (!tmpl) return VLM_CHAT_TEMPLATE_UNKNOWN;
    const view_t t = {tmpl, len};

    /* A bare name ("chatml") first, as llm_chat_template_from_str. Only
     * llama.cpp's names count here, not our aliases such as "raw". */
    static const struct {
        const char *name;
        vlm_chat_template_t tmpl;
    } bare[] = {
        {"chatml", VLM_CHAT_TEMPLATE_CHATML},         {"llama2", VLM_CHAT_TEMPLATE_LLAMA2},
        {"llama2-sys", VLM_CHAT_TEMPLATE_LLAMA2},     {"llama2-sys-bos", VLM_CHAT_TEMPLATE_LLAMA2},
        {"llama2-sys-strip", VLM_CHAT_TEMPLATE_LLAMA2}, {"mistral-v1", VLM_CHAT_TEMPLATE_MISTRAL_V1},
        {"vicuna", VLM_CHAT_TEMPLATE_VICUNA},         {"llama3", VLM_CHAT_TEMPLATE_LLAMA3},
    };
    for (size_t i = 0; i < sizeof bare / sizeof bare[0]; i++)
        if (strlen(bare[i].name) == len && memcmp(bare[i].name, tmpl, len) == 0) return bare[i].tmpl;

    /* The heuristics, in llm_chat_detect_template's order. Families that are
     * not supported here still have to be recognised, so that a later rule
     * does not claim them: they give UNKNOWN. */
    if (has(t, "<|im_start|>"))
        return has(t, "<|im_sep|>") ? VLM_CHAT_TEMPLATE_UNKNOWN /* phi4 */ : VLM_CHAT_TEMPLATE_CHATML;
    if (starts_with(t, "mistral") || has(t, "[INST]")) {
        if (has(t, "[SYSTEM_PROMPT]")) return VLM_CHAT_TEMPLATE_UNKNOWN; /* mistral-v7 */
        if (has(t, "' [INST] ' + system_message") || has(t, "[AVAILABLE_TOOLS]"))
            return has(t, " [INST]") ? VLM_CHAT_TEMPLATE_MISTRAL_V1
                                     : VLM_CHAT_TEMPLATE_UNKNOWN; /* mistral-v3 (tekken) */
        return VLM_CHAT_TEMPLATE_LLAMA2; /* llama2 and its sys/bos/strip variants */
    }
    if (has(t, "<|assistant|>") && has(t, "<|end|>")) return VLM_CHAT_TEMPLATE_UNKNOWN; /* phi3 */
    if (has(t, "<|assistant|>") && has(t, "<|user|>")) return VLM_CHAT_TEMPLATE_UNKNOWN; /* falcon3, glmedge */
    if (has(t, "<|user|>") && has(t, "<|endoftext|>")) return VLM_CHAT_TEMPLATE_UNKNOWN; /* zephyr */
    if (has(t, "bos_token + message['role']")) return VLM_CHAT_TEMPLATE_UNKNOWN;        /* monarch */
    if (has(t, "<start_of_turn>")) return VLM_CHAT_TEMPLATE_UNKNOWN;                    /* gemma */
    if (has(t, "'\\n\\nAssistant: ' + eos_token")) return VLM_CHAT_TEMPLATE_UNKNOWN;   /* orion */
    if (has(t, "GPT4 Correct ")) return VLM_CHAT_TEMPLATE_UNKNOWN;                      /* openchat */
    if (has(t, "USER: ") && has(t, "ASSISTANT: "))
        return VLM_CHAT_TEMPLATE_VICUNA; /* vicuna (the Orca variant is served the same way) */
    if (has(t, "### Instruction:") && has(t, "<|EOT|>")) return VLM_CHAT_TEMPLATE_UNKNOWN; /* deepseek */
    if (has(t, "<|START_OF_TURN_TOKEN|>") && has(t, "<|USER_TOKEN|>"))
        return VLM_CHAT_TEMPLATE_UNKNOWN; /* command-r */
    if (has(t, "<|start_header_id|>") && has(t, "<|end_header_id|>")) return VLM_CHAT_TEMPLATE_LLAMA3;
    return VLM_CHAT_TEMPLATE_UNKNOWN;
}

vlm_chat_template_t vlm_chat_template_detect(const vlm_gguf_t *g) {
    if (!g) return VLM_CHAT_TEMPLATE_VICUNA;
    const char *s = NULL;
    size_t n = 0;
    if (vlm_gguf_get_str(g, "tokenizer.chat_template", &s, &n, NULL) != VLM_OK)
        return VLM_CHAT_TEMPLATE_VICUNA;
    const vlm_chat_template_t t = vlm_chat_template_detect_text(s, n);
    return t == VLM_CHAT_TEMPLATE_UNKNOWN ? VLM_CHAT_TEMPLATE_VICUNA : t;
}

/* ==== Building segments ================================================= */

void vlm_chat_prompt_init(vlm_chat_prompt_t *p) {
    VLM_ASSERT(p != NULL);
    memset(p, 0, sizeof *p);
    p->tmpl = VLM_CHAT_TEMPLATE_RAW;
}

void vlm_chat_prompt_deinit(vlm_chat_prompt_t *p) {
    if (!p) return;
    for (int i = 0; i < p->n_segments; i++) free(p->segments[i].text);
    free(p->segments);
    vlm_chat_prompt_init(p);
}

/* Appends a text segment made of n parts (NUL-terminated strings) joined.
 * Returns 0 or VLM_ERR_NOMEM. The caller sized p->segments. */
static int push_text(vlm_chat_prompt_t *p, bool add_bos, int n, ...) {
    va_list ap;
    size_t len = 0;
    va_start(ap, n);
    for (int i = 0; i < n; i++) len += strlen(va_arg(ap, const char *));
    va_end(ap);
    char *text = malloc(len + 1);
    if (!text) return VLM_ERR_NOMEM;
    size_t at = 0;
    va_start(ap, n);
    for (int i = 0; i < n; i++) {
        const char *part = va_arg(ap, const char *);
        const size_t k = strlen(part);
        memcpy(text + at, part, k);
        at += k;
    }
    va_end(ap);
    text[at] = '\0';
    vlm_chat_segment_t *seg = &p->segments[p->n_segments++];
    seg->kind = VLM_CHAT_SEGMENT_TEXT;
    seg->text = text;
    seg->text_len = at;
    seg->image_index = -1;
    seg->add_bos = add_bos;
    return VLM_OK;
}

/* Appends a text segment of s[0..n) (not NUL-terminated). */
static int push_span(vlm_chat_prompt_t *p, bool add_bos, const char *s, size_t n) {
    char *text = malloc(n + 1);
    if (!text) return VLM_ERR_NOMEM;
    memcpy(text, s, n);
    text[n] = '\0';
    vlm_chat_segment_t *seg = &p->segments[p->n_segments++];
    seg->kind = VLM_CHAT_SEGMENT_TEXT;
    seg->text = text;
    seg->text_len = n;
    seg->image_index = -1;
    seg->add_bos = add_bos;
    return VLM_OK;
}

static void push_image(vlm_chat_prompt_t *p, int index) {
    vlm_chat_segment_t *seg = &p->segments[p->n_segments++];
    memset(seg, 0, sizeof *seg);
    seg->kind = VLM_CHAT_SEGMENT_IMAGE;
    seg->image_index = index;
}

int vlm_chat_count_markers(const char *s) {
    int n = 0;
    if (!s) return 0;
    const size_t k = strlen(VLM_CHAT_IMAGE_MARKER);
    for (const char *at = strstr(s, VLM_CHAT_IMAGE_MARKER); at; at = strstr(at + k, VLM_CHAT_IMAGE_MARKER))
        n++;
    return n;
}

/* A copy of s without leading and trailing whitespace (llama.cpp's trim());
 * NULL when out of memory. */
static char *trim_dup(const char *s) {
    size_t b = 0, e = strlen(s);
    while (b < e && isspace((unsigned char)s[b])) b++;
    while (e > b && isspace((unsigned char)s[e - 1])) e--;
    char *r = malloc(e - b + 1);
    if (!r) return NULL;
    memcpy(r, s + b, e - b);
    r[e - b] = '\0';
    return r;
}

/* Placeholder mode: text before the first marker with BOS, then image k and
 * the text that follows marker k (empty texts after images are dropped). */
static int build_placeholder(const char *prompt, int n_images, vlm_chat_prompt_t *out) {
    const size_t k = strlen(VLM_CHAT_IMAGE_MARKER);
    const char *at = strstr(prompt, VLM_CHAT_IMAGE_MARKER);
    int rc = push_span(out, true, prompt, (size_t)(at - prompt));
    for (int i = 0; rc == VLM_OK && i < n_images; i++) {
        push_image(out, i);
        const char *from = at + k;
        at = strstr(from, VLM_CHAT_IMAGE_MARKER);
        const size_t n = at ? (size_t)(at - from) : strlen(from);
        if (n > 0) rc = push_span(out, false, from, n);
    }
    return rc;
}

int vlm_chat_build(vlm_chat_template_t tmpl, const char *system, const char *prompt,
                   int n_images, vlm_chat_prompt_t *out, vlm_error_t *err) {
    VLM_ASSERT(out != NULL);
    vlm_chat_prompt_init(out);
    if (tmpl < 0 || tmpl >= VLM_CHAT_TEMPLATE_COUNT)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "unknown chat template %d", (int)tmpl);
    if (!prompt) return vlm_error_set(err, VLM_ERR_INVALID_ARG, "the prompt is missing");
    if (n_images < 0)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG, "negative image count %d", n_images);
    const int n_markers = vlm_chat_count_markers(prompt);
    if (n_markers > 0 && n_markers != n_images)
        return vlm_error_set(err, VLM_ERR_INVALID_ARG,
                             "the prompt has %d \"" VLM_CHAT_IMAGE_MARKER "\" marker%s but %d image%s "
                             "%s given",
                             n_markers, n_markers == 1 ? "" : "s", n_images,
                             n_images == 1 ? "" : "s", n_images == 1 ? "was" : "were");

    /* At most: text, n_images images, text per image, and one more text. */
    out->segments = calloc((size_t)(2 * n_images + 3), sizeof *out->segments);
    if (!out->segments) return vlm_error_set(err, VLM_ERR_NOMEM, "out of memory formatting the prompt");

    int rc = VLM_OK;
    if (n_markers > 0) {
        out->placeholder = true;
        out->tmpl = VLM_CHAT_TEMPLATE_RAW;
        rc = build_placeholder(prompt, n_images, out);
        goto done;
    }

    out->tmpl = tmpl;
    if (!system) system = tmpl == VLM_CHAT_TEMPLATE_VICUNA ? VLM_CHAT_LLAVA_SYSTEM : "";
    const bool has_sys = system[0] != '\0';
    char *sys_t = NULL, *prompt_t = NULL;

    /* prefix: what comes before the images, in up to 4 parts; suffix:
     * what comes after them, in up to 2 parts. */
    const char *pre[4] = {"", "", "", ""}, *suf[2] = {"", ""};
    switch (tmpl) {
    case VLM_CHAT_TEMPLATE_RAW:
        pre[0] = system;
        suf[0] = prompt;
        break;
    case VLM_CHAT_TEMPLATE_VICUNA:
        pre[0] = system;
        pre[1] = has_sys ? "\nUSER:" : "USER:";
        suf[0] = prompt;
        suf[1] = "\nASSISTANT:";
        break;
    case VLM_CHAT_TEMPLATE_LLAMA2:
        pre[0] = "[INST] ";
        if (has_sys) {
            pre[1] = "<<SYS>>\n";
            pre[2] = system;
            pre[3] = "\n<</SYS>>\n\n";
        }
        suf[0] = prompt;
        suf[1] = " [/INST]";
        break;
    case VLM_CHAT_TEMPLATE_LLAMA3:
        sys_t = trim_dup(system);
        prompt_t = trim_dup(prompt);
        if (!sys_t || !prompt_t) {
            rc = VLM_ERR_NOMEM;
            break;
        }
        if (has_sys) {
            pre[0] = "<|start_header_id|>system<|end_header_id|>\n\n";
            pre[1] = sys_t;
            pre[2] = "<|eot_id|>";
        }
        pre[3] = "<|start_header_id|>user<|end_header_id|>\n\n";
        suf[0] = prompt_t;
        suf[1] = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
        break;
    case VLM_CHAT_TEMPLATE_MISTRAL_V1:
        pre[0] = " [INST] ";
        if (has_sys) {
            pre[1] = system;
            pre[2] = "\n\n";
        }
        suf[0] = prompt;
        suf[1] = " [/INST]";
        break;
    case VLM_CHAT_TEMPLATE_CHATML:
        if (has_sys) {
            pre[0] = "<|im_start|>system\n";
            pre[1] = system;
            pre[2] = "<|im_end|>\n";
        }
        pre[3] = "<|im_start|>user\n";
        suf[0] = prompt;
        suf[1] = "<|im_end|>\n<|im_start|>assistant\n";
        break;
    default:
        VLM_ASSERT(0);
    }

    if (rc == VLM_OK) {
        const bool split = n_images > 0 || tmpl == VLM_CHAT_TEMPLATE_VICUNA ||
                           (tmpl == VLM_CHAT_TEMPLATE_RAW && has_sys);
        if (!split) {
            /* Text only: one segment. */
            rc = push_text(out, true, 6, pre[0], pre[1], pre[2], pre[3], suf[0], suf[1]);
        } else {
            /* prefix (with BOS), the images, suffix (without; dropped when empty). */
            rc = push_text(out, true, 4, pre[0], pre[1], pre[2], pre[3]);
            for (int i = 0; rc == VLM_OK && i < n_images; i++) push_image(out, i);
            if (rc == VLM_OK && (suf[0][0] != '\0' || suf[1][0] != '\0'))
                rc = push_text(out, false, 2, suf[0], suf[1]);
        }
    }
    free(sys_t);
    free(prompt_t);

done:
    if (rc != VLM_OK) {
        vlm_chat_prompt_deinit(out);
        return vlm_error_set(err, rc, "out of memory formatting the prompt");
    }
    vlm_error_clear(err);
    return VLM_OK;
}

/* ==== Stop strings ====================================================== */

/* llava-cli's rules (examples/llava/llava-cli.cpp): the first entry is
 * checked in the piece, the rest in the answer. */
static const char *const k_stops_llava[] = {"###", "<|im_end|>", "<|im_start|>", "USER:"};
static const char *const k_stops_llama3[] = {"###", "<|im_end|>", "<|im_start|>", "USER:",
                                             "<|eot_id|>", "<|start_header_id|>"};
static const char *const k_stops_inst[] = {"###", "<|im_end|>", "<|im_start|>", "USER:", "[INST]"};

const char *const *vlm_chat_template_stops(vlm_chat_template_t tmpl, int *n) {
    VLM_ASSERT(n != NULL);
    switch (tmpl) {
    case VLM_CHAT_TEMPLATE_LLAMA3:
        *n = (int)(sizeof k_stops_llama3 / sizeof k_stops_llama3[0]);
        return k_stops_llama3;
    case VLM_CHAT_TEMPLATE_LLAMA2:
    case VLM_CHAT_TEMPLATE_MISTRAL_V1:
        *n = (int)(sizeof k_stops_inst / sizeof k_stops_inst[0]);
        return k_stops_inst;
    default:
        *n = (int)(sizeof k_stops_llava / sizeof k_stops_llava[0]);
        return k_stops_llava;
    }
}

vlm_chat_stop_t vlm_chat_stop_check(vlm_chat_template_t tmpl, const char *piece, size_t piece_len,
                                    const char *answer, size_t answer_len,
                                    const char **matched) {
    int n = 0;
    const char *const *stops = vlm_chat_template_stops(tmpl, &n);
    if (matched) *matched = NULL;
    /* stops[0] ("###") is matched in the piece, before it is printed. */
    if (piece && memmem(piece, piece_len, stops[0], strlen(stops[0]))) {
        if (matched) *matched = stops[0];
        return VLM_CHAT_STOP_DROP_PIECE;
    }
    for (int i = 1; answer && i < n; i++) {
        if (memmem(answer, answer_len, stops[i], strlen(stops[i]))) {
            if (matched) *matched = stops[i];
            return VLM_CHAT_STOP_KEEP_PIECE;
        }
    }
    return VLM_CHAT_STOP_NONE;
}
