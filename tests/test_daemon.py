#!/usr/bin/python3
"""tests/test_daemon.py - drives real vlmd processes over ZeroMQ.

Every daemon runs on the golden micro-f32 model (tests/data/golden) with
--preprocess llamacpp, on a free loopback port chosen by the kernel
(tcp://127.0.0.1:*; the port is read from the "ready on" line), and is
spoken to with raw pyzmq DEALER sockets, as docs/protocol.md describes.

What it checks:
  - answers: greedy answers of all 15 golden image checks and the text-only
    prompt equal `vlm-run --json` for the same inputs (tokens and text), and
    llava-cli's expected ids/text for the PNG images;
  - streaming: token events come in order (index 0, 1, ...) and join to the
    final text, also with invalid UTF-8 in the answer and with stop strings
    that span tokens (held-back text);
  - stop strings end the text before the match;
  - 16 concurrent clients with mixed images (and two sampled jobs with
    seeds) get their own answers, batched several rows per forward pass, and
    --parallel 8 gives the same tokens as --parallel 1 and as vlm-run; the
    same on the quantized golden cases (Q8_0, Q4_0, Q4_K_M kernels) and in
    the hf preprocessing mode;
  - the image-embedding cache: the same image twice is encoded once;
  - cancel mid-stream and while queued; a client killed mid-stream (and one
    killed while waiting for a non-streamed answer) has its job cancelled
    and the daemon keeps serving; a client that hangs (SIGSTOP) is dropped
    by the ZMTP heartbeats; busy when the slots and queue are full;
  - every bad request gets its error code, and health stays ok afterwards;
  - SIGTERM with jobs in flight: every job ends with exactly one done or
    error event and the daemon exits 0, with and without a grace period;
  - an ipc:// endpoint, and the start-up errors (no default model, bad flag).
Prints "N passed, N failed"; exits 1 on any failure, 77 (skip) when vlmd
is not built. Every wait is bounded, and a watchdog ends the run.
"""
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

from checks import check, note, summary

try:
    import zmq
except ImportError:  # pragma: no cover
    print("SKIP: pyzmq is not installed")
    sys.exit(77)

BUILD = os.environ.get("VLM_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "build"))
SOURCE = os.environ.get("VLM_SOURCE_DIR", os.path.join(os.path.dirname(__file__), ".."))
VLMD = os.path.join(BUILD, "daemon", "vlmd")
VLM_RUN = os.path.join(BUILD, "clients", "vlm-run")
CASE = os.path.join(SOURCE, "tests", "data", "golden", "micro-f32")
TEXT = os.path.join(CASE, "text.gguf")
MMPROJ = os.path.join(CASE, "mmproj.gguf")
THREADS = "2"
WATCHDOG_S = 400          # the whole script; meson's timeout is above it
CTX = zmq.Context.instance()

daemons = []


def read(name):
    with open(os.path.join(CASE, name), "rb") as f:
        return f.read()


# ==== Daemons and clients ==================================================

class Daemon:
    """A vlmd process; stderr is collected by a thread."""

    def __init__(self, *flags, endpoint="tcp://127.0.0.1:*", case=CASE, preprocess="llamacpp", wait=True):
        args = [VLMD, "-m", os.path.join(case, "text.gguf"), "--mmproj", os.path.join(case, "mmproj.gguf"),
                "--preprocess", preprocess, "-t", THREADS]
        args += ["--endpoint", endpoint] + list(flags)
        self.args = args
        self.lines = []
        self.ready = threading.Event()
        self.endpoint = None
        self.p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, errors="replace")
        daemons.append(self)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if wait and not self.ready.wait(60):
            self.kill()
            raise RuntimeError("vlmd did not get ready: " + " | ".join(self.lines))

    def _read(self):
        for line in self.p.stderr:
            line = line.rstrip("\n")
            self.lines.append(line)
            if "ready on " in line and not self.ready.is_set():
                self.endpoint = line.split("ready on ", 1)[1].split(" ", 1)[0]
                self.ready.set()

    def signal(self, sig):
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def wait(self, timeout=30):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)

    def stop(self, timeout=30):
        """SIGTERM; returns the exit status (None when it had to be killed)."""
        self.signal(signal.SIGTERM)
        rc = self.wait(timeout)
        if rc is None:
            self.kill()
        self.reader.join(5)
        return rc


class Client:
    """A DEALER socket with bounded waits. Events are kept per job id."""

    def __init__(self, endpoint, timeout=30):
        self.s = CTX.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(endpoint)
        self.timeout = timeout
        self.events = {}

    def close(self):
        self.s.close(0)

    def send(self, header, images=()):
        h = header if isinstance(header, bytes) else json.dumps(header).encode()
        self.s.send_multipart([h] + list(images))

    def recv(self, timeout=None):
        """The next event (a dict), or None after the timeout."""
        t = self.timeout if timeout is None else timeout
        if self.s.poll(int(t * 1000)) == 0:
            return None
        ev = json.loads(self.s.recv())
        self.events.setdefault(ev.get("id"), []).append(ev)
        return ev

    def final(self, job_id, timeout=None):
        """Waits for the done/error event of job_id; returns it (or None)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for ev in self.events.get(job_id, []):
                if ev["event"] in ("done", "error"):
                    return ev
            left = deadline - time.monotonic()
            if left <= 0 or self.recv(left) is None:
                return None

    def ask(self, header, images=(), timeout=None):
        self.send(header, images)
        return self.final(header["id"], timeout)

    def op(self, op, job_id=None, timeout=10, **extra):
        job_id = job_id or f"{op}-{time.monotonic_ns()}"
        self.send(dict({"v": 1, "id": job_id, "op": op}, **extra))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events.get(job_id, []):
                return ev
            if self.recv(deadline - time.monotonic()) is None:
                break
        return None

    def tokens(self, job_id):
        return [e for e in self.events.get(job_id, []) if e["event"] == "token"]


def gen(job_id, prompt, max_tokens=24, **kw):
    return dict({"v": 1, "id": job_id, "op": "generate", "prompt": prompt, "max_tokens": max_tokens}, **kw)


def vlm_run(prompt, images=(), n=24, extra=(), case=CASE, preprocess="llamacpp"):
    """vlm-run --json for the same job, or None when vlm-run is missing."""
    if not os.access(VLM_RUN, os.X_OK):
        return None
    args = [VLM_RUN, "-m", os.path.join(case, "text.gguf"), "--temp", "0", "-n", str(n), "-t", THREADS,
            "-p", prompt, "--preprocess", preprocess, "--json"] + list(extra)
    if images:
        args += ["--mmproj", os.path.join(case, "mmproj.gguf")]
        for im in images:
            args += ["--image", os.path.join(case, im)]
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    if p.returncode != 0:
        note(f"vlm-run failed: {p.stderr.decode(errors='replace').strip()}")
        return None
    return json.loads(p.stdout)


def health_ok(c):
    h = c.op("health")
    return h is not None and h.get("status") == "ok"


def wait_idle(c, timeout=10):
    """Waits until no job is active or queued; returns the last health."""
    deadline = time.monotonic() + timeout
    h = None
    while time.monotonic() < deadline:
        h = c.op("health")
        if h and h["active"] == 0 and h["queued"] == 0:
            return h
        time.sleep(0.02)
    return h


def stats(c):
    return c.op("stats") or {}


# The golden jobs: the 15 image checks and the text-only prompt.
GOLDEN = json.load(open(os.path.join(CASE, "case.json")))
JOBS = [(g["id"], g["prompt"], [g["image"]], g) for g in GOLDEN["generation_checks"]]
JOBS.append(("text", GOLDEN["text_only_check"]["prompt"], [], GOLDEN["text_only_check"]))
# A greedy job that runs to 1900 tokens on this model (about 0.4 s alone):
# the prey of the cancel, kill, busy and shutdown tests.
LONG_PROMPT, LONG_IMAGE, LONG_N = "list everything", "gray_96x128.jpg", 1900


def long_job(job_id, stream=True):
    return gen(job_id, LONG_PROMPT, LONG_N, stream=stream), [read(LONG_IMAGE)]


# ==== Tests =================================================================

def test_startup_errors():
    model_dir = os.path.join(SOURCE, "models", "default")
    if not os.path.exists(os.path.join(model_dir, "text.gguf")):
        p = subprocess.run([VLMD, "--endpoint", "tcp://127.0.0.1:*"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=30, text=True)
        check("no model flags and no bundled model: exit 1 with one clear line",
              p.returncode == 1 and "default model" in p.stderr and p.stderr.count("\n") == 1,
              p.stderr.strip())
    else:
        # No model flags: the bundled model is served; it gets ready, then
        # SIGTERM stops it with exit 0.
        p = subprocess.Popen([VLMD, "--endpoint", "tcp://127.0.0.1:*"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        ready, deadline = "", time.time() + 60
        try:
            while time.time() < deadline:
                line = p.stderr.readline()
                if not line:
                    break
                if "ready on" in line:
                    ready = line
                    break
            check("no model flags: the bundled model is served",
                  "ready on" in ready and "models/default" in ready, ready.strip())
        finally:
            p.send_signal(signal.SIGTERM)
            try:
                rc = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
            p.stderr.close()
        check("bundled model: SIGTERM exits 0", rc == 0, str(rc))
    p = subprocess.run([VLMD, "--bogus"], stderr=subprocess.PIPE, timeout=30, text=True)
    check("unknown flag: exit 1", p.returncode == 1 and "--bogus" in p.stderr, p.stderr.strip())
    p = subprocess.run([VLMD, "-m", "/nonexistent.gguf"], stderr=subprocess.PIPE, timeout=30, text=True)
    check("missing model file: exit 1 naming it", p.returncode == 1 and "/nonexistent.gguf" in p.stderr,
          p.stderr.strip())
    p = subprocess.run([VLMD, "--help"], stdout=subprocess.PIPE, timeout=30, text=True)
    check("--help: exit 0", p.returncode == 0 and "--parallel" in p.stdout)


def test_ops(c, d):
    h = c.op("health")
    check("health", h is not None and h["status"] == "ok" and h["v"] == 1 and h["slots"] == 8, str(h))
    m = c.op("model")
    ok = (m is not None and m["text"]["n_embd"] == 64 and m["text"]["n_layer"] == 2 and
          m["text"]["architecture"] == "llama" and m["vision"]["n_patches"] == 16 and
          m["vision"]["projector_type"] == "mlp" and m["slots"] == 8 and m["template"] == "vicuna")
    check("model: sizes, slots and template", ok, json.dumps(m)[:300] if m else "no reply")
    s = c.op("stats")
    check("stats: counters present", s is not None and "image_cache" in s and "jobs" in s and
          s["slots"]["total"] == 8, json.dumps(s)[:200] if s else "no reply")


def run_golden(c, max_tokens=24, stream=False, tag=""):
    """All golden jobs one after the other; returns {job id: done event}."""
    out = {}
    for jid, prompt, images, _ in JOBS:
        done = c.ask(gen(f"{tag}{jid}", prompt, max_tokens, stream=stream), [read(i) for i in images])
        out[jid] = done
    return out


def test_answers(c, refs):
    answers = run_golden(c)
    n_run = n_gold = 0
    for jid, prompt, images, g in JOBS:
        done = answers[jid]
        if not check(f"{jid}: done", done is not None and done["event"] == "done", str(done)[:200]):
            continue
        ref = refs.get(jid)
        if ref is not None:
            n_run += 1
            check(f"{jid}: equals vlm-run", done["tokens"] == ref["tokens"] and done["text"] == ref["text"],
                  f"daemon {done['tokens'][:8]}... {done['text']!r} vs vlm-run {ref['tokens'][:8]}... {ref['text']!r}")
        if images and images[0].endswith(".png"):
            n_gold += 1
            check(f"{jid}: equals llava-cli (golden)",
                  done["tokens"][:len(g["expected_ids"])] == g["expected_ids"] and done["text"] == g["expected_text"],
                  f"{done['tokens']} vs {g['expected_ids']}")
        u = done["usage"]
        check(f"{jid}: usage", u["image_tokens"] == 16 * len(images) and u["completion_tokens"] == len(done["tokens"])
              and (not images or u["prompt_tokens"] + u["image_tokens"] == g["n_prompt_positions"]), str(u))
    note(f"{n_run} answers compared with vlm-run, {n_gold} with llava-cli")
    if not refs:
        note("vlm-run is not built: compared with the golden PNG answers only")
    return answers


def test_streaming(c, answers):
    for jid, prompt, images, _ in JOBS[:6] + JOBS[-2:]:
        sid = f"s-{jid}"
        done = c.ask(gen(sid, prompt, 24, stream=True), [read(i) for i in images])
        toks = c.tokens(sid)
        ok = done is not None and done["event"] == "done"
        ok = ok and [t["index"] for t in toks] == list(range(len(toks)))
        ok = ok and "".join(t["text"] for t in toks) == done["text"]
        ok = ok and done["tokens"] == answers[jid]["tokens"]
        check(f"{jid}: streamed pieces in order, joined = final text", ok,
              f"{len(toks)} events" if done else "no done")


def test_stop_strings(c, answers):
    # gen00's answer: ' Theseiven#)urege helRItain P"% pou curi l9it/ deon'
    jid, prompt, images, _ = JOBS[0]
    full = answers[jid]["text"]
    for stop in ["helR", "rege", "zzz-not-there", "9it/"]:
        sid = f"stop-{stop}"
        done = c.ask(gen(sid, prompt, 24, stream=True, stop=[stop, "qqqq"]), [read(i) for i in images])
        i = full.find(stop)
        want = full if i < 0 else full[:i]
        reason = "length" if i < 0 else "stop"
        toks = c.tokens(sid)
        check(f"stop string {stop!r}", done is not None and done["text"] == want and
              done["finish_reason"] == reason and "".join(t["text"] for t in toks) == want,
              f"{done['text']!r} {done['finish_reason']}" if done else "no done")


SAMPLED = (3, 9)   # jobs of JOBS run with temperature 0.7 and seed 40 + k


def concurrent_jobs(endpoint, max_tokens, case=CASE):
    """16 clients at once, one job each (mixed images, two sampled jobs);
    returns {job id: done event}."""
    jobs = []
    for k, (jid, prompt, images, _) in enumerate(JOBS):
        extra = {}
        if k in SAMPLED:
            extra = {"temperature": 0.7, "seed": 40 + k}
        imgs = [open(os.path.join(case, i), "rb").read() for i in images]
        jobs.append((jid, gen(jid, prompt, max_tokens, stream=k % 2 == 0, **extra), imgs))
    clients = [Client(endpoint, timeout=120) for _ in jobs]
    for cl, (jid, hdr, imgs) in zip(clients, jobs):
        cl.send(hdr, imgs)
    out = {}
    poller = zmq.Poller()
    for cl in clients:
        poller.register(cl.s, zmq.POLLIN)
    deadline = time.monotonic() + 120
    while len(out) < len(jobs) and time.monotonic() < deadline:
        for sock, _ in poller.poll(1000):
            cl = next(x for x in clients if x.s is sock)
            ev = cl.recv(0)
            if ev and ev["event"] in ("done", "error"):
                out[ev["id"]] = ev
    for cl, (jid, hdr, _) in zip(clients, jobs):
        if hdr.get("stream") and jid in out:
            toks = cl.tokens(jid)
            out[jid]["_joined"] = "".join(t["text"] for t in toks)
        cl.close()
    return out


def compare_with_vlm_run(answers, n, case=CASE, preprocess="llamacpp", flags=()):
    """Job ids of JOBS whose answer differs from vlm-run's for the same
    options (None when vlm-run is not built)."""
    if not os.access(VLM_RUN, os.X_OK):
        return None
    bad = []
    for k, (jid, prompt, images, _) in enumerate(JOBS):
        extra = ["--temp", "0.7", "--seed", str(40 + k)] if k in SAMPLED else []
        ref = vlm_run(prompt, images, n, extra + list(flags), case, preprocess)
        a = answers.get(jid)
        if ref is None or a is None or a["event"] != "done" or a["tokens"] != ref["tokens"] or a["text"] != ref["text"]:
            bad.append(jid)
    return bad


def test_concurrency(d8, d1):
    n = 96
    c8 = Client(d8.endpoint)
    s0 = stats(c8)
    par8 = concurrent_jobs(d8.endpoint, n)
    s1 = stats(c8)
    c8.close()
    check("16 concurrent clients: all done", len(par8) == 16 and all(e["event"] == "done" for e in par8.values()),
          f"{len(par8)} finals")
    rows = (s1["decode_rows"] - s0["decode_rows"]) / max(1, s1["decode_passes"] - s0["decode_passes"])
    check("they were batched: several decode rows per forward pass", rows > 2.0, f"{rows:.2f} rows per pass")
    par1 = concurrent_jobs(d1.endpoint, n)  # queue 16 on d1: they run one by one
    check("--parallel 1: all done", len(par1) == 16 and all(e["event"] == "done" for e in par1.values()),
          f"{len(par1)} finals")
    same = [j for j in par8 if j in par1 and par8[j]["tokens"] == par1[j]["tokens"] and par8[j]["text"] == par1[j]["text"]]
    check("--parallel 8 gives the same tokens as --parallel 1", len(same) == 16,
          f"differ: {sorted(set(par8) - set(same))}")
    joined = [j for j, ev in par8.items() if "_joined" in ev]
    check("streamed while batched: pieces join to the final text",
          joined and all(par8[j]["_joined"] == par8[j]["text"] for j in joined), f"{len(joined)} streams")
    bad = compare_with_vlm_run(par8, n)
    if bad is None:
        note("vlm-run missing: concurrent answers compared with --parallel 1 only")
    else:
        check("16 concurrent answers equal vlm-run's (un-mixed), sampled ones included", not bad, f"differ: {bad}")
    note(f"--parallel 8: {rows:.2f} decode rows per pass, {s1['encode_batches'] - s0['encode_batches']} CLIP calls "
         f"for {s1['images_encoded'] - s0['images_encoded']} images")


def test_other_models():
    """Batched answers on the quantized golden cases (Q8_0, Q4_0 and Q4_K_M
    matmul paths) and in the hf preprocessing mode equal vlm-run's."""
    if not os.access(VLM_RUN, os.X_OK):
        note("vlm-run missing: quantized cases skipped")
        return
    n = 48
    runs = [(name, "llamacpp") for name in ("small-q8_0", "small-q4_0", "small-q4_k_m")] + [("micro-f32", "hf")]
    for name, pre in runs:
        case = os.path.join(os.path.dirname(CASE), name)
        if not os.path.exists(os.path.join(case, "text.gguf")):
            note(f"{name}: not present")
            continue
        d = Daemon("--parallel", "8", case=case, preprocess=pre)
        answers = concurrent_jobs(d.endpoint, n, case)
        bad = compare_with_vlm_run(answers, n, case, pre)
        check(f"{name} ({pre}): 16 batched answers equal vlm-run's", len(answers) == 16 and not bad,
              f"differ: {bad}")
        d.stop()
    # vlmd's own summation order (--fast-order) is batch-invariant too: 16
    # jobs batched 8 at a time get vlm-run --fast-order's one-job answers.
    for name in ("small-q8_0", "small-q4_k_m"):
        case = os.path.join(os.path.dirname(CASE), name)
        d = Daemon("--parallel", "8", "--fast-order", case=case)
        answers = concurrent_jobs(d.endpoint, n, case)
        bad = compare_with_vlm_run(answers, n, case, "llamacpp", ["--fast-order"])
        check(f"{name} --fast-order: 16 batched answers equal vlm-run --fast-order's",
              len(answers) == 16 and not bad, f"differ: {bad}")
        d.stop()


def ppm(w, h, seed):
    """A fresh binary PPM (bytes no earlier test has sent)."""
    px = bytes((x * 7 + y * 13 + seed * 31) % 256 for y in range(h) for x in range(w) for _ in range(3))
    return b"P6\n%d %d\n255\n" % (w, h) + px


def test_cache(c):
    img = ppm(40, 30, 1)
    s0 = stats(c)["image_cache"]
    a = c.ask(gen("cache-a", "what is this?", 8), [img])
    b = c.ask(gen("cache-b", "and this?", 8), [img])
    s1 = stats(c)["image_cache"]
    check("image cache: the same image twice is encoded once",
          a and b and a["image_cache_hits"] == 0 and b["image_cache_hits"] == 1 and s1["hits"] == s0["hits"] + 1
          and s1["misses"] == s0["misses"] + 1, f"{s0} -> {s1}")
    c2 = c.ask(gen("cache-c", "and this?", 8, preprocess="hf"), [img])
    check("image cache: another preprocess mode is another entry", c2 and c2["image_cache_hits"] == 0)


def test_cancel(c):
    hdr, imgs = long_job("long-1")
    c.send(hdr, imgs)
    first = None
    deadline = time.monotonic() + 30
    while first is None and time.monotonic() < deadline:
        ev = c.recv(5)
        if ev and ev["id"] == "long-1" and ev["event"] == "token":
            first = ev
    r = c.op("cancel", "cancel-1", target="long-1")
    done = c.final("long-1")
    check("cancel mid-stream: found, job ends with done/cancelled",
          first is not None and r and r["event"] == "cancel" and r["found"] and done and
          done["event"] == "done" and done["finish_reason"] == "cancelled" and
          done["usage"]["completion_tokens"] < LONG_N,
          f"{done['finish_reason']} after {done['usage']['completion_tokens']} tokens" if done else str(r))
    r = c.op("cancel", "cancel-2", target="no-such-job")
    check("cancel of an unknown job: found false", r and r["found"] is False, str(r))
    h = wait_idle(c)
    check("slot freed after cancel", h and h["active"] == 0, str(h))


def test_busy_and_queue_cancel(d1):
    c = Client(d1.endpoint)
    for k in range(3):
        hdr, imgs = long_job(f"busy-{k}", stream=False)
        c.send(hdr, imgs)
    third = c.final("busy-2", 10)
    check("busy when the slot and the queue are full", third and third["event"] == "error" and third["code"] == "busy",
          str(third))
    # busy-1 waits in the queue: cancel it there, then the running one.
    r = c.op("cancel", "cq", target="busy-1")
    q = c.final("busy-1", 10)
    check("cancel of a queued job: done/cancelled with no tokens",
          r and r["found"] and q and q["event"] == "done" and q["finish_reason"] == "cancelled" and
          q["usage"]["completion_tokens"] == 0, str(q))
    c.op("cancel", "cr", target="busy-0")
    run = c.final("busy-0", 30)
    check("the running job then ends", run is not None and run["event"] == "done", str(run)[:120])
    c.close()


KILLED_CLIENT = r"""
import json, sys, zmq
ep, stream = sys.argv[1], sys.argv[2] == "1"
s = zmq.Context().socket(zmq.DEALER)
s.connect(ep)
for k in range(int(sys.argv[6]) if len(sys.argv) > 6 else 1):
    hdr = {"v": 1, "id": f"victim{k}", "op": "generate", "prompt": sys.argv[3], "max_tokens": int(sys.argv[4]),
           "stream": stream}
    s.send_multipart([json.dumps(hdr).encode(), open(sys.argv[5], "rb").read()])
# A health round trip on the same connection: once it is answered, the
# jobs (sent before it) have reached the daemon.
s.send(json.dumps({"v": 1, "id": "ping", "op": "health"}).encode())
seen_health = seen_token = False
while not (seen_health and (seen_token or not stream)):
    if not s.poll(30000):
        break
    ev = json.loads(s.recv())
    seen_health |= ev["id"] == "ping"
    seen_token |= ev["event"] == "token"
print("started", flush=True)
import time
time.sleep(60)
"""


def test_killed_client(c, d):
    for stream in (True, False):
        what = "streaming" if stream else "waiting for a non-streamed answer"
        wait_idle(c)
        t0 = stats(c)["tokens_generated"]
        p = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, d.endpoint, "1" if stream else "0", LONG_PROMPT,
                              str(LONG_N), os.path.join(CASE, LONG_IMAGE)], stdout=subprocess.PIPE, text=True)
        line = ""
        try:
            ready = threading.Event()
            holder = []
            threading.Thread(target=lambda: (holder.append(p.stdout.readline()), ready.set()), daemon=True).start()
            ready.wait(30)
            line = holder[0] if holder else ""
            if not stream:
                time.sleep(0.05)  # let the job reach a slot
        finally:
            p.kill()
            p.wait(10)
        h = wait_idle(c)
        st = stats(c)
        used = st["tokens_generated"] - t0
        check(f"client killed while {what}: job cancelled, slot freed, health ok",
              line.startswith("started") and h and h["status"] == "ok" and h["active"] == 0 and used < LONG_N,
              f"{used} tokens generated of {LONG_N}, clients_gone {st.get('clients_gone')}")
    done = c.ask(gen("after-kill", "what is this?", 8), [read("exact.png")])
    check("a new job runs after the killed clients", done is not None and done["event"] == "done")


def test_hung_client():
    """A client that stops answering without closing its connection (here
    SIGSTOP) is found by the heartbeats, and its jobs are cancelled."""
    d = Daemon("--parallel", "1", "--queue", "4", "--heartbeat", "50")
    c = Client(d.endpoint)
    n_jobs = 3
    p = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, d.endpoint, "0", LONG_PROMPT, str(LONG_N),
                          os.path.join(CASE, LONG_IMAGE), str(n_jobs)], stdout=subprocess.PIPE, text=True)
    try:
        holder = []
        t = threading.Thread(target=lambda: holder.append(p.stdout.readline()), daemon=True)
        t.start()
        t.join(30)
        os.kill(p.pid, signal.SIGSTOP)
        time.sleep(0.05)
        h = wait_idle(c, 20)
        st = stats(c)
    finally:
        os.kill(p.pid, signal.SIGCONT)
        p.kill()
        p.wait(10)
    used = st.get("tokens_generated", 0)
    check("a hung client (SIGSTOP) is dropped by the heartbeats, its jobs cancelled",
          holder and holder[0].startswith("started") and h and h["active"] == 0 and h["queued"] == 0 and
          used < n_jobs * LONG_N and st.get("clients_gone", 0) >= 1,
          f"{used} tokens of {n_jobs} x {LONG_N}, clients_gone {st.get('clients_gone')}")
    check("and the daemon still serves", health_ok(c))
    c.close()
    check("heartbeat daemon stops with status 0", d.stop() == 0)


def png_header_only(w, h):
    """A PNG whose header claims w x h pixels, with a tiny IDAT."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_bad_requests(c, d):
    png = read("exact.png")
    cases = [
        ("header not JSON", b"this is not json", [], "bad_request"),
        ("header a JSON array", b"[1, 2, 3]", [], "bad_request"),
        ("missing id", {"v": 1, "op": "health"}, [], "bad_request"),
        ("empty id", {"v": 1, "id": "", "op": "health"}, [], "bad_request"),
        ("missing v", {"id": "x1", "op": "health"}, [], "bad_request"),
        ("wrong v", {"v": 2, "id": "x2", "op": "health"}, [], "bad_request"),
        ("missing op", {"v": 1, "id": "x3"}, [], "bad_request"),
        ("unknown op", {"v": 1, "id": "x4", "op": "frobnicate"}, [], "unknown_op"),
        ("missing prompt", {"v": 1, "id": "x5", "op": "generate"}, [], "bad_request"),
        ("prompt not a string", gen("x6", 42), [], "bad_request"),
        ("2 markers, 1 image", gen("x7", "<image> and <image>?"), [png], "bad_request"),
        ("1 marker, 2 images", gen("x8", "<image> what?"), [png, png], "bad_request"),
        ("negative temperature", gen("x9", "hi", temperature=-1), [], "bad_request"),
        ("top_p 0", gen("x10", "hi", top_p=0), [], "bad_request"),
        ("top_p 1.5", gen("x11", "hi", top_p=1.5), [], "bad_request"),
        ("min_p 2", gen("x12", "hi", min_p=2), [], "bad_request"),
        ("max_tokens 0", gen("x13", "hi", 0), [], "bad_request"),
        ("max_tokens 10^7", gen("x14", "hi", 10 ** 7), [], "bad_request"),
        ("top_k -1", gen("x15", "hi", top_k=-1), [], "bad_request"),
        ("repeat_penalty 0", gen("x16", "hi", repeat_penalty=0), [], "bad_request"),
        ("seed -1", gen("x17", "hi", seed=-1), [], "bad_request"),
        ("stream not a bool", gen("x18", "hi", stream="yes"), [], "bad_request"),
        ("stop not an array", gen("x19", "hi", stop="x"), [], "bad_request"),
        ("empty stop string", gen("x20", "hi", stop=[""]), [], "bad_request"),
        ("unknown template", gen("x21", "hi", template="nope"), [], "bad_request"),
        ("unknown preprocess", gen("x22", "hi", preprocess="nope"), [], "bad_request"),
        ("cancel without target", {"v": 1, "id": "x23", "op": "cancel"}, [], "bad_request"),
        ("undecodable image", gen("x24", "what?"), [b"certainly not an image" * 10], "bad_image"),
        ("truncated PNG", gen("x25", "what?"), [png[:len(png) // 2]], "bad_image"),
        ("empty image frame", gen("x26", "what?"), [b""], "bad_image"),
        ("image over the pixel budget", gen("x27", "what?"), [png_header_only(30000, 30000)], "too_large"),
        ("image frame over --max-image-bytes", gen("x28", "what?"), [os.urandom(300000)], "too_large"),
        ("header over 1 MiB", gen("x29", "x" * (1 << 20)), [], "too_large"),
        ("17 images", gen("x30", "what?"), [png] * 17, "too_large"),
        ("prompt beyond the context", gen("x31", "hello world " * 2000), [], "context_overflow"),
    ]
    for name, hdr, imgs, code in cases:
        c.send(hdr, imgs)
        want_id = hdr.get("id", "") if isinstance(hdr, dict) else ""
        ev = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            e = c.recv(deadline - time.monotonic())
            if e is None:
                break
            if e["id"] == want_id and e["event"] in ("error", "done"):
                ev = e
                break
        check(f"bad request: {name} -> {code}", ev is not None and ev["event"] == "error" and ev["code"] == code
              and isinstance(ev.get("message"), str) and ev["message"] != "",
              f"{ev['code']}: {ev['message'][:100]}" if ev and ev["event"] == "error" else str(ev)[:150])
    # A duplicate id while the first job runs.
    hdr, imgs = long_job("dup", stream=False)
    c.send(hdr, imgs)
    c.send(hdr, imgs)
    first = c.recv(20)
    check("bad request: duplicate id in flight -> bad_request",
          first and first["id"] == "dup" and first["event"] == "error" and first["code"] == "bad_request", str(first))
    c.op("cancel", "dup-cancel", target="dup")
    c.final("dup")
    # A REQ socket gets one error (with its delimiter, so it can read it).
    r = CTX.socket(zmq.REQ)
    r.setsockopt(zmq.LINGER, 0)
    r.connect(d.endpoint)
    r.send(json.dumps({"v": 1, "id": "req-1", "op": "health"}).encode())
    ev = json.loads(r.recv()) if r.poll(10000) else None
    r.close(0)
    check("REQ socket: one bad_request error", ev and ev["code"] == "bad_request" and ev["id"] == "req-1", str(ev))
    check("health ok after every bad request", health_ok(c))
    done = c.ask(gen("after-bad", "what is this?", 8), [png])
    check("and jobs still run", done is not None and done["event"] == "done")
    st = stats(c)
    note(f"errors counted: { {k: v for k, v in st['jobs']['errors'].items() if v} }")


def test_shutdown(grace):
    d = Daemon("--parallel", "2", "--queue", "4", "--grace", str(grace))
    c = Client(d.endpoint)
    ids = [f"t{k}" for k in range(6)]
    for jid in ids:
        hdr, imgs = long_job(jid)
        c.send(hdr, imgs)
    # Wait for both slots to stream.
    streaming = set()
    deadline = time.monotonic() + 30
    while len(streaming) < 2 and time.monotonic() < deadline:
        ev = c.recv(5)
        if ev and ev["event"] == "token":
            streaming.add(ev["id"])
    d.signal(signal.SIGTERM)
    late = None
    # The signal is read by the daemon's I/O thread; wait for its log line.
    deadline = time.monotonic() + 10
    while not any("stopping" in l for l in d.lines) and time.monotonic() < deadline:
        time.sleep(0.005)
    if grace > 0:
        h = c.op("health", "h-stop", timeout=5)
        c.send(gen("late", "hi", 4))
        late = c.final("late", 5)
        check(f"grace {grace}: health says stopping", h is not None and h["status"] == "stopping", str(h))
        check(f"grace {grace}: a new job gets shutting_down", late is not None and late["event"] == "error" and
              late["code"] == "shutting_down", str(late))
    finals = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(any(e["event"] in ("done", "error") for e in c.events.get(j, [])) for j in ids):
            break
        if c.recv(deadline - time.monotonic()) is None:
            break
    for jid in ids:
        finals[jid] = [e for e in c.events.get(jid, []) if e["event"] in ("done", "error")]
    rc = d.wait(30)
    if rc is None:
        d.kill()
    # Anything after the final events?
    c.recv(0.3)
    counts = {jid: len([e for e in c.events.get(jid, []) if e["event"] in ("done", "error")]) for jid in ids}
    kinds = {jid: (f[0]["event"] + "/" + (f[0].get("finish_reason") or f[0].get("code"))) if f else None
             for jid, f in finals.items()}
    check(f"SIGTERM, grace {grace}: every job ends with exactly one done or error", all(n == 1 for n in counts.values()),
          str(kinds))
    running_ok = all(kinds[j] and kinds[j].startswith("done/" if grace > 0 else "error/shutting_down") for j in streaming)
    queued_ok = all(kinds[j] == "error/shutting_down" for j in ids if j not in streaming)
    check(f"SIGTERM, grace {grace}: running jobs {'finish' if grace > 0 else 'end with shutting_down'}, "
          "queued ones get shutting_down", running_ok and queued_ok, str(kinds))
    check(f"SIGTERM, grace {grace}: exit status 0", rc == 0, f"rc={rc}; {d.lines[-2:]}")
    c.close()


def test_ipc():
    path = os.path.join(tempfile.mkdtemp(prefix="vlmd-test-"), "vlmd.sock")
    d = Daemon("--parallel", "1", endpoint=f"ipc://{path}")
    c = Client(d.endpoint)
    done = c.ask(gen("ipc-1", "what is this?", 8), [read("exact.png")])
    check("ipc:// endpoint serves jobs", health_ok(c) and done is not None and done["event"] == "done", d.endpoint)
    c.close()
    check("ipc daemon stops with status 0", d.stop() == 0)


# ==== main ==================================================================

def timed(fn, *args):
    t0 = time.monotonic()
    r = fn(*args)
    note(f"{fn.__name__}: {time.monotonic() - t0:.1f} s")
    return r


def main():
    if not os.access(VLMD, os.X_OK):
        print(f"SKIP: {VLMD} is not built")
        return 77

    def watchdog(signum, frame):
        print(f"[ FAIL ] watchdog: the test took more than {WATCHDOG_S} s", flush=True)
        for d in daemons:
            d.kill()
        os._exit(1)
    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(WATCHDOG_S)
    t0 = time.monotonic()

    refs = {}
    if os.access(VLM_RUN, os.X_OK):
        for jid, prompt, images, _ in JOBS:
            r = vlm_run(prompt, images, 24)
            if r is not None:
                refs[jid] = r
    try:
        timed(test_startup_errors)
        d8 = Daemon("--parallel", "8", "--max-image-bytes", "200000")
        d1 = Daemon("--parallel", "1", "--queue", "16")
        c8 = Client(d8.endpoint)
        timed(test_ops, c8, d8)
        answers = timed(test_answers, c8, refs)
        if all(answers.get(j) for j, _, _, _ in JOBS):
            timed(test_streaming, c8, answers)
            timed(test_stop_strings, c8, answers)
        timed(test_concurrency, d8, d1)
        timed(test_other_models)
        timed(test_cache, c8)
        timed(test_cancel, c8)
        timed(test_killed_client, c8, d8)
        timed(test_bad_requests, c8, d8)
        check("--parallel 8 daemon stops with status 0", d8.stop() == 0, " | ".join(d8.lines[-3:]))
        d1.stop()
        d1b = Daemon("--parallel", "1", "--queue", "1")
        timed(test_busy_and_queue_cancel, d1b)
        check("--parallel 1 daemon stops with status 0", d1b.stop() == 0)
        timed(test_shutdown, 10)
        timed(test_shutdown, 0)
        timed(test_ipc)
        timed(test_hung_client)
    finally:
        for d in daemons:
            d.kill()
    for d in daemons:
        d.reader.join(5)
    reports = [l for d in daemons for l in d.lines
               if "runtime error" in l or "Sanitizer" in l or "vlmd: internal" in l]
    check("no sanitizer reports in the daemons' stderr", not reports, " | ".join(reports[:3]))
    return summary(f"{time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
