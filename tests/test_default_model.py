#!/usr/bin/python3
"""tests/test_default_model.py - the bundled model sees, through the real daemon.

Starts vlmd with no model flags (it serves models/default) on a free
loopback port, runs `tools/eval --endpoint EP` on the held-out scenes that
tests/data/default-model/reference.jsonl was made from (100 scenes from seed
2000000: a caption and one question of each of the six types per scene, all
greedy, through the Python client), and checks:
  - the reference was made from these very model files (sha256);
  - caption and QA accuracy reach the reference's thresholds (a few points
    below what was measured when the model was shipped);
  - the fidelity check: vlmd's accuracy equals the PyTorch model's on the
    same prompts within one percentage point, and its answers are the same
    text as PyTorch's for nearly every prompt (they differ only where f16
    roundings flip a near-tie).
Regenerate the reference with tools/train/reference_answers.py when the model
changes. Prints "N passed, N failed"; exits 1 on a failure, 77 (skip) when
vlmd is not built or there is no bundled model.
"""
import json
import os
import subprocess
import sys
import tempfile
import threading

from checks import check, summary

BUILD = os.environ.get("VLM_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "build"))
SOURCE = os.environ.get("VLM_SOURCE_DIR", os.path.join(os.path.dirname(__file__), ".."))
VLMD = os.path.join(BUILD, "daemon", "vlmd")
MODEL = os.path.join(SOURCE, "models", "default")
REFERENCE = os.path.join(SOURCE, "tests", "data", "default-model", "reference.jsonl")
EVAL = os.path.join(SOURCE, "tools", "eval")
sys.path.insert(0, os.path.join(SOURCE, "tools", "train"))
from reference_answers import sha256  # noqa: E402  (the same digest the reference was made with)



def start_vlmd():
    """vlmd without -m/--mmproj: the bundled model. Returns (process, endpoint)."""
    p = subprocess.Popen([VLMD, "--endpoint", "tcp://127.0.0.1:*", "--parallel", "8", "-t", "2"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, errors="replace", cwd=SOURCE)
    lines, ready, box = [], threading.Event(), {}

    def read():
        for line in p.stderr:
            lines.append(line.rstrip())
            if "ready on " in line and not ready.is_set():
                box["endpoint"] = line.split("ready on ", 1)[1].split(" ", 1)[0]
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(120):
        p.kill()
        raise RuntimeError("vlmd did not get ready: " + " | ".join(lines))
    return p, box["endpoint"], lines


def main():
    if not os.access(VLMD, os.X_OK):
        print(f"SKIP: {VLMD} is not built")
        return 77
    if not os.path.exists(os.path.join(MODEL, "text.gguf")):
        print("SKIP: no bundled model in models/default")
        return 77
    try:
        import PIL  # noqa: F401  (tools/scenes renders with it; scripts/install-deps.sh installs it)
    except ImportError:
        print("SKIP: python3-pil is not installed")
        return 77

    with open(REFERENCE) as f:
        header = json.loads(f.readline())
        ref = [json.loads(line) for line in f]
    same_files = (sha256(os.path.join(MODEL, "text.gguf")) == header["text_sha256"]
                  and sha256(os.path.join(MODEL, "mmproj.gguf")) == header["mmproj_sha256"])
    if not check("the reference answers were made from models/default", same_files,
                 "" if same_files else "regenerate: /usr/bin/python3 tools/train/reference_answers.py"):
        return 1

    p, endpoint, lines = start_vlmd()
    try:
        check("vlmd without model flags serves the bundled model",
              any("models/default" in line for line in lines), lines[0] if lines else "no log")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "answers.jsonl")
            r = subprocess.run([sys.executable, EVAL, "--endpoint", endpoint, "--first-seed",
                                str(header["first_seed"]), "--count", str(header["count"]), "--out", out],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)
            print(r.stdout, end="")
            if not check("tools/eval through vlmd completes every request", r.returncode == 0,
                         r.stderr.strip()[-500:]):
                return 1
            res = json.loads(r.stdout.strip().splitlines()[-1])
            with open(out) as f:
                rows = [json.loads(line) for line in f]
    finally:
        p.terminate()
        rc = p.wait(60)
    check("vlmd exits 0 on SIGTERM", rc == 0, f"exit {rc}")

    check("the same prompts as the reference",
          [(r["seed"], r["type"], r["prompt"]) for r in rows] == [(r["seed"], r["type"], r["prompt"]) for r in ref],
          f"{len(rows)} vs {len(ref)} prompts")
    cap, qa = res["caption_accuracy"], res["qa_accuracy"]
    check("caption accuracy through vlmd", cap >= header["min_caption_accuracy"],
          f"{100 * cap:.1f}% (threshold {100 * header['min_caption_accuracy']:.0f}%)")
    check("QA accuracy through vlmd", qa >= header["min_qa_accuracy"],
          f"{100 * qa:.1f}% (threshold {100 * header['min_qa_accuracy']:.0f}%)")
    for k in sorted(res["qa_by_type"]):
        print(f"         {k:9s} vlmd {100 * res['qa_by_type'][k]:5.1f}%  "
              f"PyTorch {100 * header['torch_qa_by_type'][k]:5.1f}%")
    dc, dq = cap - header["torch_caption_accuracy"], qa - header["torch_qa_accuracy"]
    check("caption accuracy equals PyTorch's within 1 point", abs(dc) <= 0.01 + 1e-9, f"{100 * dc:+.1f} points")
    check("QA accuracy equals PyTorch's within 1 point", abs(dq) <= 0.01 + 1e-9, f"{100 * dq:+.1f} points")
    differ = [(a, b) for a, b in zip(rows, ref) if a["daemon"] != b["torch"]]
    check("vlmd gives PyTorch's answer text for at least 97% of prompts", len(differ) <= 0.03 * len(ref),
          f"{len(ref) - len(differ)}/{len(ref)} the same")
    for a, b in differ[:5]:
        print(f"         seed {a['seed']} {a['type']}: vlmd {a['daemon']!r} PyTorch {b['torch']!r}")

    return summary()


if __name__ == "__main__":
    sys.exit(main())
