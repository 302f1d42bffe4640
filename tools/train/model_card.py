#!/usr/bin/python3
"""tools/train/model_card.py - writes MODEL_CARD.md for an exported model from
its training checkpoint and the tools/eval results.

    /usr/bin/python3 tools/train/model_card.py CKPT MODEL_DIR \\
        --daemon-eval daemon.json [--torch-eval torch.json] [--refcheck refcheck.json] [--note TEXT]

The eval/refcheck files hold the last line (the JSON object) of tools/eval
and tools/train/refcheck.py. The card gives the architecture and sizes, the
training command and data, the measured accuracy and the file sizes.
"""
import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import scenes  # noqa: E402


def pct(x):
    return "%.1f%%" % (100 * x)


def acc_table(title, r):
    rows = ["| %s | caption | QA | %s |" % (title, " | ".join(r["qa_by_type"])),
            "|---|---|---|%s" % ("---|" * len(r["qa_by_type"])),
            "| accuracy | %s | %s | %s |" % (pct(r["caption_accuracy"]), pct(r["qa_accuracy"]),
                                             " | ".join(pct(v) for v in r["qa_by_type"].values()))]
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write MODEL_CARD.md for an exported model.")
    ap.add_argument("checkpoint")
    ap.add_argument("model_dir")
    ap.add_argument("--daemon-eval", required=True)
    ap.add_argument("--torch-eval")
    ap.add_argument("--refcheck")
    ap.add_argument("--note", default="")
    ap.add_argument("--title", default="vlmd's bundled default model")
    a = ap.parse_args(argv)
    ck = torch.load(a.checkpoint, map_location="cpu")
    c, args = ck["config"], ck["args"]
    n_params = sum(v.numel() for k, v in ck["model"].items() if not k.startswith("aux."))
    n_vision = sum(v.numel() for k, v in ck["model"].items() if k.startswith("vision."))
    de = json.load(open(a.daemon_eval))
    te = json.load(open(a.torch_eval)) if a.torch_eval else None
    rc = json.load(open(a.refcheck)) if a.refcheck else None
    sizes = {f: os.path.getsize(os.path.join(a.model_dir, f)) for f in ("text.gguf", "mmproj.gguf")}
    cmd = "/usr/bin/python3 tools/train/train.py --out RUN " + " ".join(
        "--%s %s" % (k.replace("_", "-"), v) for k, v in sorted(args.items())
        if k not in ("out", "resume", "log_every", "val_every", "val_scenes", "save_minutes", "device")
        and v not in (None, False, 0, ""))
    lines = [
        "# " + a.title,
        "",
        "A small LLaVA-1.5-style vision-language model trained from scratch on the synthetic scenes of "
        "`tools/scenes/` (shapes, colours, sizes and positions on a 3x3 grid). It sees only that world: "
        "it captions such scenes and answers questions about them, and knows nothing else.",
        "",
        a.note,
        "",
        "## Files",
        "",
        "| file | what | size |",
        "|---|---|---|",
        "| `text.gguf` | LLaMA decoder (arch `llama`), SentencePiece vocabulary of %d tokens, F16 | %.2f MB |" % (
            c["n_vocab"], sizes["text.gguf"] / 1e6),
        "| `mmproj.gguf` | CLIP ViT + MLP projector (arch `clip`, projector `mlp`), F16 | %.2f MB |" % (
            sizes["mmproj.gguf"] / 1e6),
        "",
        "Both load in llama.cpp's `llava-cli`, `vlm-run` and `vlmd`; prompts use LLaVA-1.5's template.",
        "",
        "## Architecture (%.2fM parameters, vision + projector %.2fM)" % (n_params / 1e6, n_vision / 1e6),
        "",
        "- Vision: %dx%d images, patch %d (%d image tokens), ViT width %d, %d heads, MLP %d, %d blocks run "
        "(the file stores %d: llama.cpp runs block_count - 1), quick-GELU, pre-LN, no post-LN." % (
            c["image_size"], c["image_size"], c["patch"], (c["image_size"] // c["patch"]) ** 2, c["v_width"],
            c["v_heads"], c["v_ff"], c["v_layers"], c["v_layers"] + 1),
        "- Projector: two-layer MLP with GELU, %d -> %d -> %d." % (c["v_width"], c["d_model"], c["d_model"]),
        "- Decoder: LLaMA, width %d, %d layers, %d heads, %d KV heads, SwiGLU %d, RoPE theta %g." % (
            c["d_model"], c["n_layers"], c["n_heads"], c["n_kv_heads"], c["d_ff"], c["rope_theta"]),
        "",
        "## Training",
        "",
        "- Data: scenes with seeds below %d only (validation %d-%d, test from %d never seen); "
        "each image with its caption and questions of the six types." % (
            scenes.TRAIN_END, scenes.VAL_BEGIN, scenes.VAL_END - 1, scenes.TEST_BEGIN),
        "- %d steps, %d samples (turns), %.1f minutes." % (ck["step"], ck["samples_seen"], ck["elapsed_s"] / 60),
        "- Command:", "", "```sh", cmd, "/usr/bin/python3 tools/train/export.py RUN/ckpt.pt models/default", "```",
        "",
        "## Measured accuracy (%d held-out test scenes from seed %d)" % (de["n_captions"], scenes.TEST_BEGIN),
        "",
        "Through `vlmd` (`tools/eval --endpoint EP`):",
        "",
        acc_table("vlmd", de),
        "",
    ]
    if te:
        lines += ["PyTorch on the same scenes (`tools/eval --torch-gguf models/default`):", "",
                  acc_table("PyTorch", te), ""]
    if rc:
        lines += ["Reference check (`tools/train/refcheck.py`): worst max|torch - engine| / max|engine| over "
                  "%d prompts = %.2e (f16 KV cache; %.2e with an f32 KV cache)." % (
                      rc["n_cases"], rc["worst_rel_f32_vs_engine_kvf16"], rc["worst_rel_f32_vs_engine_kvf32"]), ""]
    out = os.path.join(a.model_dir, "MODEL_CARD.md")
    with open(out, "w") as f:
        f.write("\n".join(lines).replace("\n\n\n", "\n\n"))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
