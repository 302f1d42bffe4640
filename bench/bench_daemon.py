#!/usr/bin/python3
"""bench/bench_daemon.py - figures for vlmd (issue 4), not a pass/fail test.

Runs real vlmd processes on loopback and prints:
  1. round trip of a `health` op (median and p99 over many requests), on the
     smallest model (golden micro-f32);
  2. round trip of a `generate` with a ~100 KB JPEG and max_tokens 1 on the
     same model: a new image each time (decode + preprocess + encode) and the
     same image again (image-cache hit);
  3. aggregate decode tokens/s with 1, 4 and 8 concurrent streams on
     TinyLlama-1.1B-shaped Q4_0 weights (--parallel 8), and the speed-up over
     one stream (the target is >= 4x at 8 streams);
  4. images per second for caption-style jobs (one image, a short answer)
     on TinyLlama Q4_0 + a CLIP ViT-L/14-336 mmproj (LLaVA-sized encoder,
     smaller decoder), with and without --batch-images;
  5. images per second for `vlm caption` (the real CLI) on a folder of 200
     JPEG scenes with the bundled model (models/default), for a few
     --parallel / --inflight settings.
Models come from $VLM_MODELS_DIR (default /work/models; bench/README.md says
how to make them); parts whose files are missing are skipped.

usage: bench/bench_daemon.py [--build DIR] [--threads N] [--quick]
"""
import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(HERE)
GOLDEN = os.path.join(SOURCE, "tests", "data", "golden", "micro-f32")
MODELS = os.environ.get("VLM_MODELS_DIR", "/work/models")
CTX = zmq.Context.instance()


class Daemon:
    def __init__(self, vlmd, args):
        self.lines = []
        self.ready = threading.Event()
        self.p = subprocess.Popen([vlmd, "--endpoint", "tcp://127.0.0.1:*"] + args, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(600):
            self.p.kill()
            raise RuntimeError("vlmd did not start: " + " | ".join(self.lines))

    def _read(self):
        for line in self.p.stderr:
            self.lines.append(line.rstrip())
            if "ready on " in line:
                self.endpoint = line.split("ready on ", 1)[1].split(" ", 1)[0]
                self.ready.set()

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()


def dealer(endpoint):
    s = CTX.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def recv(s, timeout_s=600):
    if s.poll(int(timeout_s * 1000)) == 0:
        raise TimeoutError("no answer from vlmd")
    return json.loads(s.recv())


def final(s, job_id, timeout_s=600):
    while True:
        ev = recv(s, timeout_s)
        if ev["id"] == job_id and ev["event"] in ("done", "error"):
            return ev


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def jpeg_100k(seed, size=300):
    """A noisy JPEG of about 100 KB (different bytes for every seed)."""
    from PIL import Image
    import random
    rnd = random.Random(seed)
    img = Image.new("RGB", (size, size))
    img.putdata([(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)) for _ in range(size * size)])
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def part_round_trips(vlmd, threads, quick):
    print("== 1-2. round trips on the smallest model (golden micro-f32)")
    d = Daemon(vlmd, ["-m", os.path.join(GOLDEN, "text.gguf"), "--mmproj", os.path.join(GOLDEN, "mmproj.gguf"),
                      "-t", str(threads)])
    s = dealer(d.endpoint)
    n = 500 if quick else 3000
    for i in range(50):
        s.send(json.dumps({"v": 1, "id": f"w{i}", "op": "health"}).encode())
        recv(s)
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        s.send(json.dumps({"v": 1, "id": f"h{i}", "op": "health"}).encode())
        recv(s)
        lat.append((time.perf_counter() - t0) * 1e6)
    print(f"health round trip: median {statistics.median(lat):.0f} us, p99 {pct(lat, 99):.0f} us ({n} requests)")

    k = 10 if quick else 40
    images = [jpeg_100k(i) for i in range(k)]
    print(f"JPEG size: {statistics.mean(len(b) for b in images) / 1024:.0f} KiB average, 300x300")
    for label, pick in (("new image each time", lambda i: images[i]), ("same image (cache hit)", lambda i: images[0])):
        lat, enc = [], []
        for i in range(k):
            t0 = time.perf_counter()
            hdr = {"v": 1, "id": f"g{label[0]}{i}", "op": "generate", "prompt": "what is this?", "max_tokens": 1}
            s.send_multipart([json.dumps(hdr).encode(), pick(i)])
            ev = final(s, hdr["id"])
            lat.append((time.perf_counter() - t0) * 1e3)
            t = ev["timings"]
            enc.append(t["image_decode_ms"] + t["encode_ms"])
        print(f"generate, 100 KB JPEG, max_tokens 1, {label}: median {statistics.median(lat):.2f} ms "
              f"(of which image decode + encode {statistics.median(enc):.2f} ms), p90 {pct(lat, 90):.2f} ms")
    s.close()
    d.stop()


PROMPTS = ["Once upon a time", "The capital of France is", "In a distant galaxy", "My favourite recipe is",
           "The history of the bicycle", "Dear diary, today", "How to grow tomatoes:", "The ocean at night"]


def run_streams(endpoint, k, n_tokens):
    """k concurrent streaming jobs; returns (tokens, seconds from the first
    token to the last done, per-job tokens)."""
    socks = [dealer(endpoint) for _ in range(k)]
    for i, s in enumerate(socks):
        hdr = {"v": 1, "id": f"s{i}", "op": "generate", "prompt": PROMPTS[i % len(PROMPTS)],
               "max_tokens": n_tokens, "stream": True, "template": "raw"}
        s.send(json.dumps(hdr).encode())
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    first, last, done = None, None, {}
    while len(done) < k:
        ready = poller.poll(600000)
        if not ready:
            raise TimeoutError("streams stalled")
        for s, _ in ready:
            ev = json.loads(s.recv())
            now = time.perf_counter()
            if ev["event"] == "token" and first is None:
                first = now
            if ev["event"] in ("done", "error"):
                done[ev["id"]] = ev
                last = now
    for s in socks:
        s.close()
    errors = [e for e in done.values() if e["event"] == "error"]
    if errors:
        raise RuntimeError(f"job failed: {errors[0]}")
    toks = [e["usage"]["completion_tokens"] for e in done.values()]
    # Tokens after each job's first one: those came from decode steps.
    return sum(toks) - k, last - first, toks


def part_streams(vlmd, threads, quick):
    model = os.path.join(MODELS, "tinyllama-q4_0.gguf")
    print("== 3. aggregate decode tokens/s, TinyLlama-1.1B-shaped Q4_0, --parallel 8")
    if not os.path.exists(model):
        print(f"skipped: {model} not found (see bench/README.md)")
        return
    d = Daemon(vlmd, ["-m", model, "--parallel", "8", "-t", str(threads), "--ctx", "512"])
    n_tokens = 32 if quick else 64
    run_streams(d.endpoint, 1, 4)  # warm-up
    base = None
    for k in (1, 4, 8):
        toks, secs, per = run_streams(d.endpoint, k, n_tokens)
        rate = toks / secs
        base = base or rate
        print(f"{k} stream{'s' if k > 1 else ' '}: {rate:6.2f} tokens/s aggregate ({rate / base:.2f}x one stream; "
              f"{toks} decode tokens in {secs:.1f} s; tokens per job {min(per)}-{max(per)})")
    d.stop()


def part_captions(vlmd, threads, quick):
    text = os.path.join(MODELS, "tinyllama-q4_0.gguf")
    mmproj = os.path.join(MODELS, "clip-l-336-tinyllama-f16.gguf")
    print("== 4. caption jobs/s: TinyLlama Q4_0 + CLIP ViT-L/14-336 F16")
    if not (os.path.exists(text) and os.path.exists(mmproj)):
        print("skipped: models not found (see bench/README.md)")
        return
    n = 4 if quick else 8
    for flags in ([], ["--batch-images"]):
        d = Daemon(vlmd, ["-m", text, "--mmproj", mmproj, "--parallel", "4", "-t", str(threads), "--ctx", "1024"]
                   + flags)
        s = dealer(d.endpoint)
        images = [jpeg_100k(100 + i, 336) for i in range(n)]
        t0 = time.perf_counter()
        for i, img in enumerate(images):
            hdr = {"v": 1, "id": f"c{i}", "op": "generate", "prompt": "Describe the image briefly.",
                   "max_tokens": 16}
            s.send_multipart([json.dumps(hdr).encode(), img])
        evs = [final(s, f"c{i}") for i in range(n)]
        secs = time.perf_counter() - t0
        bad = [e for e in evs if e["event"] != "done"]
        enc = statistics.median(e["timings"]["encode_ms"] for e in evs if e["event"] == "done")
        print(f"{' '.join(flags) or 'default (one image per encoder call)'}: {n / secs:.3f} images/s "
              f"({n} images, {secs:.1f} s; encode {enc:.0f} ms median per job{'; ERRORS' if bad else ''})")
        s.close()
        d.stop()


def part_vlm_caption(vlmd, threads, quick):
    import shutil
    import tempfile
    model = os.path.join(SOURCE, "models", "default")
    vlm = os.path.join(os.path.dirname(os.path.dirname(vlmd)), "clients", "vlm")
    n = 50 if quick else 200
    print(f"== 5. vlm caption on {n} JPEG scenes, bundled model ({model})")
    if not os.path.exists(os.path.join(model, "text.gguf")):
        print("skipped: models/default/text.gguf not found")
        return
    tmp = tempfile.mkdtemp(prefix="vlm-bench-")
    try:
        folder = os.path.join(tmp, "scenes")
        env = dict(os.environ, PYTHONPATH=os.path.join(SOURCE, "tools"))
        subprocess.run([sys.executable, "-m", "scenes", "--first-seed", "3000000", "--count", str(n),
                        "--out", folder, "--format", "jpeg"], check=True, env=env, stdout=subprocess.DEVNULL)
        for parallel, inflight in ((1, 1), (4, 8), (8, 16)):
            d = Daemon(vlmd, ["--parallel", str(parallel), "-t", str(threads)])
            out = os.path.join(tmp, f"captions-{parallel}.jsonl")
            t0 = time.perf_counter()
            r = subprocess.run([vlm, "caption", folder, "--inflight", str(inflight), "--out", out,
                                "--max-tokens", "48"], env=dict(os.environ, VLM_ENDPOINT=d.endpoint),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            secs = time.perf_counter() - t0
            d.stop()
            with open(out) as f:
                rows = [json.loads(line) for line in f]
            ok = [x for x in rows if "caption" in x]
            toks = sum(x["tokens"] for x in ok)
            print(f"--parallel {parallel} --inflight {inflight:2d}: {len(ok) / secs:7.1f} images/s "
                  f"({len(ok)}/{n} captioned in {secs:.2f} s, {toks / max(len(ok), 1):.1f} tokens per caption, "
                  f"{toks / secs:.0f} tokens/s, exit {r.returncode})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(SOURCE, "build"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--parts", default="12345", help="which parts to run (default 12345)")
    a = ap.parse_args()
    vlmd = os.path.join(a.build, "daemon", "vlmd")
    if not os.access(vlmd, os.X_OK):
        sys.exit(f"{vlmd} is not built")
    print(f"vlmd: {vlmd}, {a.threads} threads, {os.cpu_count()} CPUs")
    if "1" in a.parts or "2" in a.parts:
        part_round_trips(vlmd, a.threads, a.quick)
    if "3" in a.parts:
        part_streams(vlmd, a.threads, a.quick)
    if "4" in a.parts:
        part_captions(vlmd, a.threads, a.quick)
    if "5" in a.parts:
        part_vlm_caption(vlmd, a.threads, a.quick)


if __name__ == "__main__":
    main()
