#!/usr/bin/python3
"""tools/train/check_tokenizer.py - checks that the Python tokenizer used in
training gives exactly the ids of the C engine's SPM tokenizer (which
follows llama.cpp) on the model's vocabulary.

    /usr/bin/python3 tools/train/check_tokenizer.py --model DIR/text.gguf \\
        [--vlm-run build/clients/vlm-run] [--count 3000]

Texts: the prompt parts and answers of `count` training scenes (every
question type and the caption), the system part, and a few hundred
perturbed texts (unknown words, capitals, doubled spaces, tabs, newlines,
non-ASCII, emoji, `</s>` inside the text) that exercise merges and the byte
fallback. Each is tokenized by `vlm-run --tokenize --no-bos --special` and
by vocab.Vocab.encode(parse_special=True); any difference is printed.
Exit status 0 when all agree.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import gguf_io as G  # noqa: E402
import scenes  # noqa: E402
import vocab as vocab_mod  # noqa: E402


def texts_for(count, seed=5):
    rng = np.random.default_rng(seed)
    out = [vocab_mod.SYSTEM_PART, scenes.CAPTION_PROMPT + vocab_mod.USER_SUFFIX]
    n_scenes = max(1, count // 8)
    for s in rng.integers(0, scenes.TRAIN_END, size=n_scenes):
        sc = scenes.make_scene(int(s))
        out.append(scenes.caption(sc))
        for qt in scenes.QA_TYPES:
            q, a = scenes.make_question(sc, qt, rng)
            out.append(q + vocab_mod.USER_SUFFIX)
            out.append(a)
    odd = ["héllo wörld", "  two  spaces", "tab\there", "new\nline\n", "Ünïcödé ✓ 😀 日本語 한국어",
           "</s>after", "before</s>", "a<s>b", "<unk>", "", " ", "UPPER CASE SHAPES", "circles?!",
           "ASSISTANT: USER: ###", "the the the", "sq uare", "squarecircle", "x" * 40, "\u2581lit"]
    words = sorted(scenes.all_texts()) + ["triangles", "human's", "assistant", "chat", "ASSISTANT", "xyz"]
    for _ in range(max(50, count // 10)):
        k = int(rng.integers(1, 8))
        ws = [words[int(i)] for i in rng.integers(0, len(words), size=k)]
        if rng.random() < 0.3:
            ws.insert(int(rng.integers(0, k + 1)), odd[int(rng.integers(0, len(odd)))])
        sep = [" ", "  ", "", "\n", " "][int(rng.integers(0, 5))]
        out.append(sep.join(ws))
    return out + odd


def main(argv=None):
    ap = argparse.ArgumentParser(description="Python vs C tokenizer on the model's vocabulary.")
    ap.add_argument("--model", required=True, help="text GGUF (a vocab is enough)")
    ap.add_argument("--vlm-run", default=os.path.join(HERE, "..", "..", "build", "clients", "vlm-run"))
    ap.add_argument("--count", type=int, default=3000)
    a = ap.parse_args(argv)
    g = G.GGUFFile(a.model)
    v = vocab_mod.Vocab(g.kv["tokenizer.ggml.tokens"], g.kv["tokenizer.ggml.scores"],
                        g.kv["tokenizer.ggml.token_type"])
    texts = texts_for(a.count)
    bad = 0
    for t in texts:
        r = subprocess.run([a.vlm_run, "-m", a.model, "--tokenize", "--no-bos", "--special", "-p", t],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print("vlm-run failed on %r: %s" % (t, r.stderr.strip()))
            bad += 1
            continue
        c_ids = json.loads(r.stdout)
        py_ids = v.encode(t, add_bos=False, parse_special=True)
        if c_ids != py_ids:
            bad += 1
            if bad <= 10:
                print("DIFF %r\n  C:  %s\n  py: %s" % (t, [v.tokens[i] for i in c_ids],
                                                       [v.tokens[i] for i in py_ids]))
    print("%d texts, %d differ" % (len(texts), bad))
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
