#!/usr/bin/python3
"""tools/train/refcheck.py - the reference check: the PyTorch model's logits
against the C engine's, for one scene image and one prompt.

    /usr/bin/python3 tools/train/refcheck.py --model DIR/text.gguf --mmproj DIR/mmproj.gguf \\
        [--vlm-run build/clients/vlm-run] [--seed 2000000] [--prompt "Describe the image."]
        [--checkpoint CKPT] [--limit 1e-3]

The PyTorch model is built from the GGUF files themselves (so it has the
shipped f16 weights) and computes in float32 with the engine's `hf`
preprocessing (expand2square, Pillow bicubic when the size differs, CLIP
mean/std). The engine is `vlm-run --temp 0 -n 1 --dump-logits` on the same
PNG and prompt (llava-cli's layout). It also checks that the engine's prompt
token ids equal the Python tokenizer's.

Reported, each as max|a - b| / max|b| over the vocabulary at the last prompt
position:
  torch f32  vs engine (KV f16)    the check: must be <= --limit
  torch f32  vs engine (KV f32)    what the f16 KV cache costs
  torch ggml-emulating vs engine   (activations rounded to f16 before every
                                    F16 matmul, f16 K/V/Q/softmax, f16 GELU
                                    tables): what is left once ggml's
                                    roundings are copied
  --checkpoint: torch f32 with the unrounded training weights vs the file's
                (what storing the weights at f16 costs)
Exit status 0 when the first figure is within --limit, 1 otherwise. The
last line is one JSON object with the figures.
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
    ap.add_argument("--seed", type=int, default=scenes.TEST_BEGIN, help="scene seed")
    ap.add_argument("--image", help="use this image file instead of a generated scene")
    ap.add_argument("--prompt", default=scenes.CAPTION_PROMPT)
    ap.add_argument("--checkpoint", help="also compare with the unrounded training weights")
    ap.add_argument("--limit", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    model, vocab = from_gguf(a.model, a.mmproj)
    with tempfile.TemporaryDirectory() as td:
        image = a.image
        if not image:
            image = os.path.join(td, "scene-%d.png" % a.seed)
            scenes.render(scenes.make_scene(a.seed), model.c.image_size).save(image)
        pixels = torch.from_numpy(preprocess_hf(Image.open(image), model.c.image_size))
        ref16, info = engine_logits(a.vlm_run, a.model, a.mmproj, image, a.prompt, "f16", a.threads)
        ref32, _ = engine_logits(a.vlm_run, a.model, a.mmproj, image, a.prompt, "f32", a.threads)
    plain, ids = torch_logits(model, vocab, pixels, a.prompt, emulate=False)
    emul, _ = torch_logits(model, vocab, pixels, a.prompt, emulate=True)

    res = dict(prompt=a.prompt, image=a.image or "scene %d" % a.seed,
               tokens_equal=ids == info["prompt_tokens"],
               n_prompt_positions=info["n_prompt_positions"],
               max_abs_logit=float(np.max(np.abs(ref16))),
               rel_f32_vs_engine_kvf16=rel(plain, ref16),
               rel_f32_vs_engine_kvf32=rel(plain, ref32),
               rel_emulated_vs_engine_kvf16=rel(emul, ref16),
               rel_engine_kvf16_vs_kvf32=rel(ref16, ref32),
               top1_equal=int(np.argmax(plain)) == int(np.argmax(ref16)),
               engine_top1=vocab.tokens[int(np.argmax(ref16))])
    if a.checkpoint:
        from evaluate import load_checkpoint
        m32, _, _ = load_checkpoint(a.checkpoint)
        full, _ = torch_logits(m32, vocab, pixels, a.prompt)
        res["rel_f32_unrounded_weights_vs_file"] = rel(full, plain)
    res["limit"] = a.limit
    res["pass"] = bool(res["tokens_equal"] and res["rel_f32_vs_engine_kvf16"] <= a.limit)
    print("prompt tokens equal (Python vs engine): %s" % res["tokens_equal"])
    print("max |logit| (engine): %.3f" % res["max_abs_logit"])
    print("torch f32        vs engine KV f16: %.3e  (limit %.0e)" % (res["rel_f32_vs_engine_kvf16"], a.limit))
    print("torch f32        vs engine KV f32: %.3e" % res["rel_f32_vs_engine_kvf32"])
    print("torch emulating  vs engine KV f16: %.3e" % res["rel_emulated_vs_engine_kvf16"])
    print("engine KV f16    vs engine KV f32: %.3e" % res["rel_engine_kvf16_vs_kvf32"])
    if a.checkpoint:
        print("unrounded weights vs f16 file:     %.3e" % res["rel_f32_unrounded_weights_vs_file"])
    print("top-1 equal: %s (%r)" % (res["top1_equal"], res["engine_top1"]))
    print(json.dumps(res))
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
