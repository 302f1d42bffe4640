#!/usr/bin/python3
"""tools/train/reference_answers.py - the PyTorch answers that the test suite
holds vlmd to, for the bundled model.

    /usr/bin/python3 tools/train/reference_answers.py [--model models/default] [--count 100]
        [--margin 0.05] [--out tests/data/default-model/reference.jsonl]

Runs `tools/eval --torch-gguf MODEL` (the PyTorch model with the files' own
f16 weights) on COUNT held-out scenes from the start of the test split and
writes OUT: a first line with the files' sha256, the scenes, the PyTorch
accuracy and the suite's thresholds (accuracy minus --margin, floored to a
whole point), then one line per prompt (seed, type, prompt, expected answer,
PyTorch's answer). tests/test_default_model.py asks vlmd the same prompts
and checks the accuracy against the thresholds and the answers against
PyTorch's. Run it again whenever models/default changes: the test fails
with a message naming this script when the sha256 do not match.
"""
import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "default"))
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--first-seed", type=int, default=2000000)
    ap.add_argument("--margin", type=float, default=0.05, help="threshold = accuracy - margin")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "default-model", "reference.jsonl"))
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rows_path = os.path.join(tmp, "answers.jsonl")
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval"), "--torch-gguf", a.model,
                            "--first-seed", str(a.first_seed), "--count", str(a.count), "--out", rows_path],
                           stdout=subprocess.PIPE, text=True, check=True)
        result = json.loads(r.stdout.strip().splitlines()[-1])
        with open(rows_path) as f:
            rows = [json.loads(line) for line in f]

    def floor_pct(x):
        return max(0.0, math.floor(100 * (x - a.margin)) / 100)

    header = {
        "what": "PyTorch answers of models/default on held-out scenes (tools/train/reference_answers.py)",
        "text_sha256": sha256(os.path.join(a.model, "text.gguf")),
        "mmproj_sha256": sha256(os.path.join(a.model, "mmproj.gguf")),
        "first_seed": a.first_seed,
        "count": a.count,
        "torch_caption_accuracy": result["caption_accuracy"],
        "torch_qa_accuracy": result["qa_accuracy"],
        "torch_qa_by_type": result["qa_by_type"],
        "min_caption_accuracy": floor_pct(result["caption_accuracy"]),
        "min_qa_accuracy": floor_pct(result["qa_accuracy"]),
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(json.dumps(header) + "\n")
        for row in rows:
            f.write(json.dumps({k: row[k] for k in ("seed", "type", "prompt", "answer", "torch")}) + "\n")
    print("wrote %s: %d prompts, PyTorch caption %.1f%%, QA %.1f%%; thresholds %.0f%% / %.0f%%" % (
        a.out, len(rows), 100 * header["torch_caption_accuracy"], 100 * header["torch_qa_accuracy"],
        100 * header["min_caption_accuracy"], 100 * header["min_qa_accuracy"]))


if __name__ == "__main__":
    main()
