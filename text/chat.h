/* text/chat.h - chat templates: from a user prompt (and images) to the text
 * and image segments the decoder is fed, plus the stop strings of each.
 *
 * A formatted prompt is a list of segments: text, image k, text... Each text
 * segment is tokenized on its own (parse_special on), the first one with BOS
 * when the model adds one; each image segment becomes the image's embedding
 * rows. Positions simply continue from one segment to the next.
 *
 * Layouts (images go at the start of the user turn):
 * - vicuna (LLaVA-1.5), exactly as llava-cli builds it:
 *     [BOS] "<system>\nUSER:" | images | "<prompt>\nASSISTANT:"
 *   The default system text is LLaVA's (VLM_CHAT_LLAVA_SYSTEM). The two text
 *   parts are tokenized separately even without images, so the token layout
 *   of a text-only and an image prompt is the same.
 * - llama2:  [BOS] "[INST] " ["<<SYS>>\n<system>\n<</SYS>>\n\n"] | images | "<prompt> [/INST]"
 * - llama3:  [BOS] ["<|start_header_id|>system<|end_header_id|>\n\n<system><|eot_id|>"]
 *            "<|start_header_id|>user<|end_header_id|>\n\n" | images |
 *            "<prompt><|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
 *            (system and prompt trimmed of surrounding whitespace)
 * - mistral-v1: [BOS] " [INST] " ["<system>\n\n"] | images | "<prompt> [/INST]"
 * - chatml:  [BOS] ["<|im_start|>system\n<system><|im_end|>\n"] "<|im_start|>user\n" |
 *            images | "<prompt><|im_end|>\n<|im_start|>assistant\n"
 * - raw:     [BOS] ["<system>"] | images | "<prompt>": nothing is added.
 * These follow llama.cpp's llm_chat_apply_template (src/llama-chat.cpp,
 * c392e50) for one system and one user message with add_ass, except vicuna,
 * which follows llava-cli. Without images, the parts around "| images |" form
 * one text segment, except for vicuna (see above) and raw with a system text,
 * which keep two. An empty text part after the images is left out.
 *
 * Placeholder mode: when the prompt contains "<image>" markers, no template
 * is applied and the system text is not used. Marker k takes image k; the
 * text before the first marker is tokenized with BOS, every later text
 * without (llava-cli's "<image>" mode). The number of markers must equal the
 * number of images.
 */
#ifndef VLM_TEXT_CHAT_H
#define VLM_TEXT_CHAT_H

#include <stdbool.h>
#include <stddef.h>

#include "core/error.h"
#include "core/gguf.h"

/* LLaVA-1.5's system text, the vicuna template's default. */
#define VLM_CHAT_LLAVA_SYSTEM                                                    \
    "A chat between a curious human and an artificial intelligence assistant. " \
    "The assistant gives helpful, detailed, and polite answers to the human's questions."

/* The marker that places an image in placeholder mode. */
#define VLM_CHAT_IMAGE_MARKER "<image>"

typedef enum vlm_chat_template {
    VLM_CHAT_TEMPLATE_UNKNOWN = -1,
    VLM_CHAT_TEMPLATE_RAW = 0,
    VLM_CHAT_TEMPLATE_VICUNA,     /* LLaVA-1.5 / llava-cli */
    VLM_CHAT_TEMPLATE_LLAMA2,
    VLM_CHAT_TEMPLATE_LLAMA3,
    VLM_CHAT_TEMPLATE_MISTRAL_V1,
    VLM_CHAT_TEMPLATE_CHATML,
    VLM_CHAT_TEMPLATE_COUNT
} vlm_chat_template_t;

typedef enum vlm_chat_segment_kind {
    VLM_CHAT_SEGMENT_TEXT = 0,
    VLM_CHAT_SEGMENT_IMAGE = 1,
} vlm_chat_segment_kind_t;

typedef struct vlm_chat_segment {
    vlm_chat_segment_kind_t kind;
    char *text;        /* TEXT: NUL-terminated, owned by the prompt; IMAGE: NULL */
    size_t text_len;   /* TEXT: strlen(text) */
    int image_index;   /* IMAGE: 0-based index into the caller's images; TEXT: -1 */
    bool add_bos;      /* TEXT: tokenize with BOS (if the model adds one) */
} vlm_chat_segment_t;

/* A formatted prompt; caller-owned, released with vlm_chat_prompt_deinit(). */
typedef struct vlm_chat_prompt {
    vlm_chat_segment_t *segments; /* [n_segments] */
    int n_segments;
    vlm_chat_template_t tmpl;     /* the template applied (RAW in placeholder mode) */
    bool placeholder;             /* true when "<image>" markers placed the images */
} vlm_chat_prompt_t;

/* Sets p to an empty prompt. */
void vlm_chat_prompt_init(vlm_chat_prompt_t *p);

/* Frees the segments and their text and leaves p empty; NULL-safe. */
void vlm_chat_prompt_deinit(vlm_chat_prompt_t *p);

/* Formats prompt with n_images images under tmpl into *out (initialised here:
 * its previous content is not freed). system NULL means the template's
 * default (LLaVA's text for vicuna, none for the others); "" means none.
 * Returns 0, or VLM_ERR_INVALID_ARG (tmpl unknown, prompt NULL, n_images < 0,
 * "<image>" markers present but not one per image) or VLM_ERR_NOMEM, with
 * err set; on failure *out is left empty. */
int vlm_chat_build(vlm_chat_template_t tmpl, const char *system, const char *prompt,
                   int n_images, vlm_chat_prompt_t *out, vlm_error_t *err);

/* Counts the "<image>" markers in s. */
int vlm_chat_count_markers(const char *s);

/* Classifies a Jinja chat template text (len bytes, not NUL-terminated) the
 * way llama.cpp's llm_chat_detect_template does: a bare template name first,
 * then its substring heuristics in its order. Returns UNKNOWN for templates
 * that llama.cpp would give another family than the ones supported here. */
vlm_chat_template_t vlm_chat_template_detect_text(const char *tmpl, size_t len);

/* The template to use for a model file: tokenizer.chat_template classified
 * by vlm_chat_template_detect_text(); VICUNA (LLaVA-1.5) when the key is
 * absent or not recognised, since llava-cli applies that layout to every
 * model. */
vlm_chat_template_t vlm_chat_template_detect(const vlm_gguf_t *g);

/* Maps a name ("raw", "vicuna", "llava", "llama2", "llama3", "mistral",
 * "mistral-v1", "chatml", ...) to a template; UNKNOWN if none matches. */
vlm_chat_template_t vlm_chat_template_from_name(const char *name);

/* The canonical name of a template ("vicuna"); "unknown" for others. Static. */
const char *vlm_chat_template_name(vlm_chat_template_t tmpl);

/* ==== Stop strings ====================================================== */

/* What a stop string asks for. llava-cli drops a piece containing "###"
 * before printing it, but prints the piece that completes "USER:" in the
 * answer and stops after it. */
typedef enum vlm_chat_stop {
    VLM_CHAT_STOP_NONE = 0,
    VLM_CHAT_STOP_DROP_PIECE = 1, /* stop; the piece is not part of the answer */
    VLM_CHAT_STOP_KEEP_PIECE = 2, /* stop after the piece, which is kept */
} vlm_chat_stop_t;

/* Returns the stop strings of tmpl: *n gets their count, and the strings
 * are static. Every template has llava-cli's four ("###" in the piece;
 * "<|im_end|>", "<|im_start|>", "USER:" in the answer) and llama3, llama2
 * and mistral add their turn markers. */
const char *const *vlm_chat_template_stops(vlm_chat_template_t tmpl, int *n);

/* Checks a newly generated piece (piece_len bytes) against tmpl's stop
 * strings. answer holds the whole answer so far, piece included
 * (answer_len bytes). *matched (if non-NULL) gets the stop string that
 * matched, or NULL. Pieces may hold any bytes (NUL included). */
vlm_chat_stop_t vlm_chat_stop_check(vlm_chat_template_t tmpl, const char *piece, size_t piece_len,
                                    const char *answer, size_t answer_len,
                                    const char **matched);

#endif
