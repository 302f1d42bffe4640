#!/usr/bin/python3
"""tools/train/refcheck.py - the reference check: the PyTorch model's logits
against the C engine's, for scene images and prompts.

    /usr/bin/python3 tools/train/refcheck.py --model DIR/text.gguf --mmproj DIR/mmproj.gguf \\
        [--vlm-run build/clients/vlm-run] [--seed 2000000] [--count 4] [--prompt TEXT]
        [--image FILE] [--checkpoint CKPT] [--limit 1e-3]

The PyTorch model is built from the GGUF files themselves (so it has the
shipped f16 weights) and computes in float32 with the engine's `hf`
preprocessing (expand2square, Pillow bicubic when the size differs, CLIP
mean/std). The engine is `vlm-run --temp 0 -n 1 --dump-logits` on the same
PNG and prompt (llava-cli's layout), once with its default F16 KV cache and
once with --kv-type f32. Each of --count test scenes gives two cases: the
caption prompt and one question (or --prompt for all; --image for one file).
The engine's prompt token ids must equal the Python tokenizer's.

Figures, each max|a - b| / max|b| over the vocabulary at the last prompt
position, worst over the cases:
  torch f32 vs engine (KV f16)    the check: must be <= --limit
  torch f32 vs engine (KV f32)    what is left without the f16 KV cache
  torch ggml-emulating vs engine  activations rounded to f16 before every
                                  F16 matmul, f16 K/V/Q/softmax, f16 GELU
                                  tables (model.py, emulate=True)
  torch KV-emulating vs engine    only the KV/Q/softmax/GELU roundings
  engine KV f16 vs engine KV f32
  --checkpoint: torch f32 with the unrounded training weights vs the file's
                (what storing the weights at f16 costs)
Emulation cannot reach the ~1e-6 it reaches on F32 weights: the f32 sums
of the two implementations differ in their last bits, which now and then
moves a value across an f16 rounding boundary; each such flip is an error
of one f16 ulp that the following layers carry on.
Exit status 0 when the check passes. The last line is one JSON object.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import scenes  # noqa: E402
import vocab as vocab_mod  # noqa: E402
from data import preprocess_hf  # noqa: E402
from export import from_gguf  # noqa: E402


@torch.no_grad()
def torch_logits(model, vocab, pixels, prompt, emulate=False):
    """Logits [n_vocab] at the last prompt position, and the prompt's text
    token ids (system part with BOS, then the user part)."""
    c = model.c
    sys_ids = vocab.encode(vocab_mod.SYSTEM_PART, add_bos=True)
    user_ids = vocab.encode(prompt + vocab_mod.USER_SUFFIX)
    img = model.vision(pixels[None], emulate)[0]                 # [n][d]
    x = torch.cat([model.tok_embd(torch.tensor(sys_ids)), img,
                   model.tok_embd(torch.tensor(user_ids))])[None]
    # llava-cli feeds three batches (system, image, user); each attends to
    # the cached K/V of the earlier ones, which is what one causal pass over
    # all rows computes (with K/V rounded to f16 when emulating the cache).
    pos = torch.arange(x.shape[1])[None]
    h, _ = model.decode(x, pos, emulate=emulate)
    assert x.shape[1] == len(sys_ids) + c.n_patches + len(user_ids)
    return model.logits(h[0, -1], emulate).double().numpy(), sys_ids + user_ids


def engine_logits(vlm_run, text, mmproj, image, prompt, kv_type, threads):
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, "logits.f32")
        cmd = [vlm_run, "-m", text, "--mmproj", mmproj, "--image", image, "-p", prompt,
               "--temp", "0", "-n", "1", "--json", "--dump-logits", out, "--kv-type", kv_type,
               "-t", str(threads)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit("refcheck: %s failed: %s" % (" ".join(cmd), r.stderr.strip()))
        return np.fromfile(out, dtype="<f4").astype(np.float64), json.loads(r.stdout)


def rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main(argv=None):
    ap = argparse.ArgumentParser(description="PyTorch vs C engine logits on one scene.")
    ap.add_argument("--model", required=True, help="text GGUF")
    ap.add_argument("--mmproj", required=True, help="mmproj GGUF")
    ap.add_argument("--vlm-run", default=os.path.join(HERE, "..", "..", "build", "clients", "vlm-run"))
    ap.add_argument("--seed", type=int, default=scenes.TEST_BEGIN, help="first scene seed")
    ap.add_argument("--count", type=int, default=4,
                    help="scenes; each gives a caption prompt and one question (default 4)")
    ap.add_argument("--image", help="use this image file instead of a generated scene")
    ap.add_argument("--prompt", help="one prompt for every scene (default: caption + a question)")
    ap.add_argument("--checkpoint", help="also compare with the unrounded training weights")
    ap.add_argument("--limit", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    model, vocab = from_gguf(a.model, a.mmproj)
    m32 = None
    if a.checkpoint:
        from evaluate import load_checkpoint
        m32, _, _ = load_checkpoint(a.checkpoint)

    # The cases: (image file or None, seed, prompt).
    cases = []
    if a.image:
        cases.append((a.image, None, a.prompt or scenes.CAPTION_PROMPT))
    else:
        for k in range(a.count):
            seed = a.seed + k
            if a.prompt:
                cases.append((None, seed, a.prompt))
            else:
                cases.append((None, seed, scenes.CAPTION_PROMPT))
                qt, q, _ = scenes.questions(scenes.make_scene(seed))[k % len(scenes.QA_TYPES)]
                cases.append((None, seed, q))
    keys = ["rel_f32_vs_engine_kvf16", "rel_f32_vs_engine_kvf32", "rel_emulated_vs_engine_kvf16",
            "rel_emulated_kv_only_vs_engine_kvf16", "rel_engine_kvf16_vs_kvf32"]
    if m32 is not None:
        keys.append("rel_f32_unrounded_weights_vs_file")
    worst = {k: 0.0 for k in keys}
    all_tokens_equal, all_top1, min_max_logit = True, True, float("inf")
    print("%-34s %-28s %9s %9s %9s %9s %9s %s" % (
        "case", "prompt", "f32/kv16", "f32/kv32", "emul/16", "emulkv/16", "kv16/kv32", "top-1"))
    with tempfile.TemporaryDirectory() as td:
        for image, seed, prompt in cases:
            if image is None:
                image = os.path.join(td, "scene-%d.png" % seed)
                if not os.path.exists(image):
                    scenes.render(scenes.make_scene(seed), model.c.image_size).save(image)
            pixels = torch.from_numpy(preprocess_hf(Image.open(image), model.c.image_size))
            ref16, info = engine_logits(a.vlm_run, a.model, a.mmproj, image, prompt, "f16", a.threads)
            ref32, _ = engine_logits(a.vlm_run, a.model, a.mmproj, image, prompt, "f32", a.threads)
            plain, ids = torch_logits(model, vocab, pixels, prompt, emulate=False)
            emul, _ = torch_logits(model, vocab, pixels, prompt, emulate=True)
            emul_kv, _ = torch_logits(model, vocab, pixels, prompt, emulate="kv")
            r = dict(rel_f32_vs_engine_kvf16=rel(plain, ref16), rel_f32_vs_engine_kvf32=rel(plain, ref32),
                     rel_emulated_vs_engine_kvf16=rel(emul, ref16),
                     rel_emulated_kv_only_vs_engine_kvf16=rel(emul_kv, ref16),
                     rel_engine_kvf16_vs_kvf32=rel(ref16, ref32))
            if m32 is not None:
                full, _ = torch_logits(m32, vocab, pixels, prompt)
                r["rel_f32_unrounded_weights_vs_file"] = rel(full, plain)
            for k in keys:
                worst[k] = max(worst[k], r[k])
            tok_eq = ids == info["prompt_tokens"]
            top1 = int(np.argmax(plain)) == int(np.argmax(ref16))
            all_tokens_equal &= tok_eq
            all_top1 &= top1
            min_max_logit = min(min_max_logit, float(np.max(np.abs(ref16))))
            print("%-34s %-28s %9.2e %9.2e %9.2e %9.2e %9.2e %s%s" % (
                os.path.basename(image) if a.image else "scene %d" % seed, prompt[:28],
                r[keys[0]], r[keys[1]], r[keys[2]], r[keys[3]], r[keys[4]],
                vocab.tokens[int(np.argmax(ref16))] if top1 else "DIFFERENT",
                "" if tok_eq else "  PROMPT TOKENS DIFFER"))

    res = dict(n_cases=len(cases), tokens_equal=all_tokens_equal, top1_equal=all_top1,
               min_max_abs_logit=min_max_logit, limit=a.limit, **{"worst_" + k: v for k, v in worst.items()})
    res["pass"] = bool(all_tokens_equal and worst["rel_f32_vs_engine_kvf16"] <= a.limit)
    print("worst over %d cases (max|torch - engine| / max|engine| over the vocabulary):" % len(cases))
    print("  torch f32             vs engine (KV f16): %.3e   <- the check, limit %.0e" % (
        worst["rel_f32_vs_engine_kvf16"], a.limit))
    print("  torch f32             vs engine (KV f32): %.3e" % worst["rel_f32_vs_engine_kvf32"])
    print("  torch ggml-emulating  vs engine (KV f16): %.3e" % worst["rel_emulated_vs_engine_kvf16"])
    print("  torch KV-emulating    vs engine (KV f16): %.3e" % worst["rel_emulated_kv_only_vs_engine_kvf16"])
    print("  engine KV f16         vs engine KV f32:   %.3e" % worst["rel_engine_kvf16_vs_kvf32"])
    if m32 is not None:
        print("  unrounded weights     vs the f16 file:    %.3e" % worst["rel_f32_unrounded_weights_vs_file"])
    print("prompt tokens equal: %s; top-1 equal everywhere: %s; %s" % (
        all_tokens_equal, all_top1, "PASS" if res["pass"] else "FAIL"))
    print(json.dumps(res))
    return 0 if res["pass"] else 1

if __name__ == "__main__":
    sys.exit(main())
