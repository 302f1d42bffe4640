#!/usr/bin/python3
"""tests/test_clients.py - the three clients of vlmd against a real daemon.

Starts build/daemon/vlmd on the micro golden model (tests/data/golden/
micro-f32) on a random free loopback port and checks, with bounded waits
everywhere (nothing here can hang):
  - the `vlm` command line (libvlm underneath) and the Python package `vlm`
    (clients/python, from the source tree) give the same greedy answers as
    `vlm-run --json` for the 15 golden image prompts (default template and
    <image> markers) and for two-image prompts with and without markers,
    with --preprocess llamacpp --temp 0 -n 24;
  - streamed pieces arrive in order (raw DEALER: index 0, 1, 2, ...) and
    join to the final text (CLI stdout, Python stream());
  - `vlm caption` on a folder of golden images plus one corrupt image: N-1
    captions equal to vlm-run's answers, one bad_image record, exit 1; the
    same with vlm.caption_folder(); --sidecar writes the .txt files;
  - `vlm caption --resume` after the CLI was killed (SIGKILL) mid-run, with
    a cut-off last line added: every image exactly once in the end;
  - the webcam path: an MJPEG stream (concatenated JPEGs, one with a JPEG
    thumbnail inside an APP1 segment) and a PPM stream on stdin to
    `vlm ask -` (last frame) and `vlm watch -` (timestamped lines, the last
    one about the last frame);
  - errors as codes: bad image (exit 1, bad_image; BadImageError), marker
    count (bad_request), unknown op (UnknownOpError), usage errors (exit 2);
  - timeouts: no daemon (exit 3 / vlm.TimeoutError, within about the
    --timeout), a silent daemon (a ROUTER that never answers: the liveness
    probe goes unanswered), a daemon that dies mid-job (connection lost);
  - cancel mid-stream from Python, SIGINT on `vlm ask` (exit 130), and
    `pip install` of clients/python into a scratch venv (offline).
Prints "N passed, N failed" and exits non-zero on any failure.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

BUILD = os.path.abspath(os.environ.get("VLM_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "build")))
SOURCE = os.path.abspath(os.environ.get("VLM_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..")))
VLMD = os.path.join(BUILD, "daemon", "vlmd")
VLM = os.path.join(BUILD, "clients", "vlm")
VLM_RUN = os.path.join(BUILD, "clients", "vlm-run")
GOLDEN = os.path.join(SOURCE, "tests", "data", "golden", "micro-f32")
PYDIR = os.path.join(SOURCE, "clients", "python")
THREADS = "2"
GEN = ["--preprocess", "llamacpp", "--temp", "0", "-n", "24"]   # the same options everywhere
PY_GEN = {"preprocess": "llamacpp", "temperature": 0, "max_tokens": 24}
CAPTION_PROMPT = "Describe the image."

sys.path.insert(0, PYDIR)
import zmq  # noqa: E402  (Debian's python3-zmq)

import vlm  # noqa: E402  (clients/python from the source tree)
from checks import check, note, summary  # noqa: E402



def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpath(name):
    return os.path.join(GOLDEN, name)


def read(path):
    with open(path, "rb") as f:
        return f.read()


# ==== The daemon ==============================================================

class Daemon:
    """vlmd on a free port, its log in a temporary file."""

    def __init__(self, *extra):
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="vlmd-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [VLMD, "-m", gpath("text.gguf"), "--mmproj", gpath("mmproj.gguf"), "--endpoint", self.endpoint,
             "-t", THREADS] + list(extra),
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vlmd exited with {self.proc.returncode}: {self.log_text()}")
            if "ready" in self.log_text():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("vlmd did not get ready within 60 s: " + self.log_text())

    def log_text(self):
        with open(self.log.name, "r", errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        os.unlink(self.log.name)
        return self.proc.returncode


def vlm_cli(args, endpoint=None, stdin=None, timeout=120, env=None):
    e = dict(os.environ)
    e.pop("VLM_ENDPOINT", None)
    if env:
        e.update(env)
    pre = ["--endpoint", endpoint] if endpoint else []
    p = subprocess.run([VLM] + pre + args, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout, env=e)
    return p.returncode, p.stdout, p.stderr.decode("utf-8", "replace")


_ref_cache = {}


def reference(images, prompt, stdin=None):
    """vlm-run --json for images (paths; '-' with stdin bytes)."""
    key = (tuple(images), prompt, stdin)
    if key in _ref_cache:
        return _ref_cache[key]
    args = [VLM_RUN, "-m", gpath("text.gguf"), "--mmproj", gpath("mmproj.gguf"), "-p", prompt, "-t", THREADS,
            "--json"] + GEN
    for im in images:
        args += ["--image", im]
    p = subprocess.run(args, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"vlm-run failed: {p.stderr.decode(errors='replace')}")
    res = json.loads(p.stdout)
    _ref_cache[key] = res
    return res


def load_case():
    with open(gpath("case.json")) as f:
        return json.load(f)


def prompt_cases():
    """(name, [image paths], prompt): the 15 golden checks and two-image
    prompts with and without markers."""
    cases = []
    for g in load_case()["generation_checks"]:
        cases.append((f"{g['id']} {g['image']} {g['mode']}", [gpath(g["image"])], g["prompt"]))
    two = [gpath("exact.png"), gpath("photo_200x150.jpg")]
    cases.append(("two images, no markers", two, "Compare the two pictures."))
    cases.append(("two images, markers", two,
                  "USER: first <image> then <image>\nwhich is brighter?\nASSISTANT:"))
    return cases


# ==== Answers: CLI, Python, streaming ========================================

def test_answers(d):
    cli_ok = py_ok = stream_ok = json_ok = 0
    cases = prompt_cases()
    with vlm.Client(d.endpoint, timeout=30) as c:
        for name, images, prompt in cases:
            ref = reference(images, prompt)
            want = ref["text"]
            rc, out, err = vlm_cli(["ask"] + GEN + images + [prompt], d.endpoint)
            ok = rc == 0 and out == want.encode("utf-8") + b"\n"
            cli_ok += ok
            if not ok:
                check(f"vlm ask = vlm-run: {name}", False, f"rc {rc}, got {out[:60]!r}, want {want[:60]!r} {err}")
            rc, out, err = vlm_cli(["ask", "--json"] + GEN + images + [prompt], d.endpoint)
            try:
                done = json.loads(out)
            except ValueError:
                done = {}
            ok = (rc == 0 and done.get("event") == "done" and done.get("text") == want
                  and done.get("tokens", ref["tokens"]) == ref["tokens"]
                  and done.get("usage", {}).get("completion_tokens") == len(ref["tokens"])
                  and done.get("usage", {}).get("image_tokens") == ref["n_image_tokens"])
            json_ok += ok
            if not ok:
                check(f"vlm ask --json = vlm-run: {name}", False, f"rc {rc}, {out[:200]!r} {err}")
            try:
                res = c.ask(prompt, images=images, **PY_GEN)
                ok = (res == want and res.text == want and res.finish_reason in ("stop", "length")
                      and (res.tokens is None or res.tokens == ref["tokens"])
                      and res.usage.get("completion_tokens") == len(ref["tokens"]))
            except vlm.VlmError as e:
                ok, res = False, str(e)
            py_ok += ok
            if not ok:
                check(f"Client.ask = vlm-run: {name}", False, f"got {str(res)[:60]!r}, want {want[:60]!r}")
            st = c.stream(prompt, images=images, **PY_GEN)
            pieces = list(st)
            ok = "".join(pieces) == want and st.result == want and len(pieces) >= 1
            stream_ok += ok
            if not ok:
                check(f"Client.stream joins to vlm-run's text: {name}", False, f"{pieces[:5]}")
    n = len(cases)
    check("vlm ask (libvlm) streams vlm-run's greedy answers", cli_ok == n, f"{cli_ok}/{n}")
    check("vlm ask --json done event = vlm-run (text, tokens, usage)", json_ok == n, f"{json_ok}/{n}")
    check("Python Client.ask = vlm-run", py_ok == n, f"{py_ok}/{n}")
    check("Python Client.stream pieces join to the answer", stream_ok == n, f"{stream_ok}/{n}")

    # Images as bytes and as PIL images (saved as PNG: lossless, so the
    # same pixels as the PNG file).
    g = load_case()["generation_checks"][0]
    want = reference([gpath(g["image"])], g["prompt"])["text"]
    with vlm.Client(d.endpoint, timeout=30) as c:
        check("Python image as bytes", c.ask(g["prompt"], images=[read(gpath(g["image"]))], **PY_GEN) == want)
        try:
            from PIL import Image
            with Image.open(gpath(g["image"])) as im:
                im.load()
                got = c.ask(g["prompt"], images=[im.convert("RGB")], **PY_GEN)
            check("Python image as a PIL image", got == want, f"{got[:40]!r}")
        except ImportError:
            print("[ SKIP ] Python image as a PIL image (no PIL)")
        # Async: several jobs in flight on one client, events told apart.
        ids = {}
        for name, images, prompt in cases[:6]:
            ids[c.submit(prompt, images, stream=True, user=name, **PY_GEN)] = (name, images, prompt)
        pieces = {k: [] for k in ids}
        results = {}
        deadline = time.monotonic() + 60
        while len(results) < len(ids) and time.monotonic() < deadline:
            ev = c.poll(1.0)
            if ev is None:
                continue
            if ev.type == "token":
                pieces[ev.job_id].append(ev.data)
            else:
                results[ev.job_id] = ev
        ok = len(results) == len(ids)
        for k, ev in results.items():
            name, images, prompt = ids[k]
            want = reference(images, prompt)["text"]
            ok = ok and ev.type == "done" and ev.data == want and "".join(pieces[k]) == want and ev.user == name
        check("Python submit/poll: 6 jobs in flight on one client, un-mixed", ok, f"{len(results)}/{len(ids)} ended")


def test_stream_order(d):
    """Raw protocol: token indexes 0, 1, 2, ... and the pieces join to done."""
    g = load_case()["generation_checks"][3]
    want = reference([gpath(g["image"])], g["prompt"])["text"]
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(d.endpoint)
    hdr = {"v": 1, "id": "raw-1", "op": "generate", "prompt": g["prompt"], "stream": True,
           "preprocess": "llamacpp", "temperature": 0, "max_tokens": 24}
    s.send_multipart([json.dumps(hdr).encode(), read(gpath(g["image"]))])
    idx, text, done = [], [], None
    deadline = time.monotonic() + 30
    while done is None and time.monotonic() < deadline:
        if not s.poll(1000):
            continue
        ev = json.loads(s.recv())
        if ev["event"] == "token":
            idx.append(ev["index"])
            text.append(ev["text"])
        else:
            done = ev
    s.close()
    check("streamed token events in order (index 0..n-1) and join to done.text",
          done is not None and done.get("event") == "done" and idx == list(range(len(idx)))
          and "".join(text) == done["text"] == want, f"{len(idx)} pieces")


# ==== Caption =================================================================

CAPTION_IMAGES = ["exact.png", "rgba_77x45.png", "photo_200x150.jpg", "gray_96x128.jpg", "prog_131x97.jpg"]


def make_caption_folder(tmp):
    """A tree: top-level and nested golden images (one with an upper-case
    extension), a corrupt JPEG, and files that are not candidates."""
    root = os.path.join(tmp, "photos")
    os.makedirs(os.path.join(root, "sub", "deeper"))
    expect = {}
    layout = {"exact.png": "a_exact.png", "rgba_77x45.png": "sub/rgba.PNG", "photo_200x150.jpg": "sub/photo.jpg",
              "gray_96x128.jpg": "sub/deeper/gray.jpeg", "prog_131x97.jpg": "z_prog.JPG"}
    for src, rel in layout.items():
        dst = os.path.join(root, rel)
        shutil.copyfile(gpath(src), dst)
        expect[dst] = src
    jpg = read(gpath("photo_200x150.jpg"))
    with open(os.path.join(root, "sub", "broken.jpg"), "wb") as f:
        f.write(jpg[: len(jpg) // 2])
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not a candidate\n")
    with open(os.path.join(root, "sub", "raw.rgb"), "wb") as f:
        f.write(b"\0" * 30)
    return root, expect, os.path.join(root, "sub", "broken.jpg")


def check_caption_records(name, records, expect, broken):
    by_path = {}
    dup = False
    for r in records:
        dup |= r["path"] in by_path
        by_path[r["path"]] = r
    ok_caps = 0
    for path, src in expect.items():
        r = by_path.get(path, {})
        want = reference([gpath(src)], CAPTION_PROMPT)
        ok_caps += r.get("caption") == want["text"] and r.get("tokens") == len(want["tokens"]) \
            and isinstance(r.get("ms"), (int, float))
    err = by_path.get(broken, {}).get("error", {})
    check(f"{name}: {len(expect)} captions = vlm-run, one bad_image, no duplicates",
          ok_caps == len(expect) and err.get("code") == "bad_image" and err.get("message")
          and len(by_path) == len(expect) + 1 and not dup,
          f"{ok_caps}/{len(expect)} captions, error {err}, {len(records)} records")


def test_caption(d):
    with tempfile.TemporaryDirectory() as tmp:
        root, expect, broken = make_caption_folder(tmp)
        out = os.path.join(tmp, "captions.jsonl")
        rc, stdout, err = vlm_cli(["caption", root, "--out", out, "--inflight", "3", "--prompt", CAPTION_PROMPT]
                                  + GEN, d.endpoint)
        with open(out) as f:
            lines = f.read().splitlines()
        records = [json.loads(x) for x in lines]
        check("vlm caption exits 1 when an image failed", rc == 1, f"rc {rc}")
        check_caption_records("vlm caption --out", records, expect, broken)
        check("vlm caption summary on stderr", re.search(r"5 captioned, 1 failed", err) is not None,
              err.strip().splitlines()[-1] if err.strip() else "")
        check("vlm caption JSON lines: keys path, caption, tokens, ms",
              all(list(r.keys()) in (["path", "caption", "tokens", "ms"], ["path", "error"]) for r in records))

        # Default output is stdout; plain progress lines (stderr is not a tty).
        rc, stdout, err = vlm_cli(["caption", root] + GEN, d.endpoint)
        records = [json.loads(x) for x in stdout.decode().splitlines()]
        check_caption_records("vlm caption to stdout", records, expect, broken)

        # Sidecars.
        rc, stdout, err = vlm_cli(["caption", "--sidecar", root + "/"] + GEN, d.endpoint)
        ok = rc == 1 and stdout == b""
        for path, src in expect.items():
            txt = os.path.splitext(path)[0] + ".txt"
            want = reference([gpath(src)], CAPTION_PROMPT)["text"]
            ok = ok and os.path.exists(txt) and read(txt).decode() == want + "\n"
        ok = ok and not os.path.exists(os.path.splitext(broken)[0] + ".txt") and "bad_image" in err
        check("vlm caption --sidecar writes name.txt beside each image", ok, f"rc {rc}")
        rc, stdout, err = vlm_cli(["caption", "--sidecar", "--resume", root] + GEN, d.endpoint)
        check("vlm caption --sidecar --resume retries only the failed image",
              rc == 1 and "0 captioned, 1 failed, 5 skipped" in err, err.strip().splitlines()[-1])

        # The Python client.
        out2 = os.path.join(tmp, "py.jsonl")
        summary = vlm.caption_folder(root, inflight=2, out=out2, endpoint=d.endpoint, **PY_GEN)
        with open(out2) as f:
            records = [json.loads(x) for x in f.read().splitlines()]
        check_caption_records("vlm.caption_folder", records, expect, broken)
        check("vlm.caption_folder summary", summary["captioned"] == 5 and summary["failed"] == 1, str(
            {k: v for k, v in summary.items() if k != "results"}))
        summary = vlm.caption_folder(root, out=out2, resume=True, endpoint=d.endpoint, **PY_GEN)
        check("vlm.caption_folder resume skips what is recorded",
              summary["skipped"] == 6 and summary["captioned"] == 0 and len(read(out2).splitlines()) == 6)


def test_resume(d):
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "many")
        os.makedirs(root)
        n = 150
        for i in range(n):
            src = CAPTION_IMAGES[i % len(CAPTION_IMAGES)]
            shutil.copyfile(gpath(src), os.path.join(root, f"img{i:03d}{os.path.splitext(src)[1]}"))
        out = os.path.join(tmp, "out.jsonl")
        args = [VLM, "--endpoint", d.endpoint, "caption", root, "--out", out, "--inflight", "2",
                "--preprocess", "llamacpp", "--temp", "0", "-n", "256"]
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed_at = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            try:
                k = read(out).count(b"\n")
            except FileNotFoundError:
                k = 0
            if k >= 10:
                p.send_signal(signal.SIGKILL)
                killed_at = k
                break
            time.sleep(0.005)
        p.wait(timeout=30)
        first = read(out).count(b"\n")
        if killed_at is None or first >= n:
            note(f"the first run finished before it could be killed ({first} lines)")
        # A line cut off by the kill (made sure of here).
        with open(out, "ab") as f:
            f.write(b'{"path": "' + root.encode() + b'/img0')
        p = subprocess.run(args + ["--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
        data = read(out)
        lines = data.decode().splitlines()
        try:
            paths = [json.loads(x)["path"] for x in lines]
        except (ValueError, KeyError):
            paths = []
        want = sorted(os.path.join(root, x) for x in os.listdir(root))
        check("vlm caption --resume after a kill: every image once, nothing lost",
              p.returncode == 0 and sorted(paths) == want and len(paths) == n and data.endswith(b"\n"),
              f"killed after {first} lines, rc {p.returncode}, {len(paths)} lines, {len(set(paths))} distinct")
        check("vlm caption --resume removed the cut-off line", b"cut-off" in p.stderr,
              p.stderr.decode(errors="replace").strip()[:200])
        rc, _, err = vlm_cli(["caption", root, "--out", out, "--resume"] + GEN, d.endpoint)
        check("vlm caption --resume of a finished run does nothing",
              rc == 0 and f"0 captioned, 0 failed, {n} skipped" in err and read(out) == data, err.strip()[-120:])


# ==== Webcam: frames on stdin =================================================

def jpeg_with_thumbnail(outer, thumb):
    """outer with an APP1 (Exif) segment right after SOI holding a whole
    JPEG (thumb), as cameras embed thumbnails."""
    body = b"Exif\0\0" + thumb
    assert len(body) + 2 < 65536
    seg = b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body
    return outer[:2] + seg + outer[2:]


def ppm_of(name):
    case = load_case()
    info = next(i for i in case["images"] if i["file"] == name)
    rgb = read(gpath(os.path.splitext(name)[0] + ".rgb.u8"))
    return b"P6\n# a comment\n%d %d\n255\n" % (info["width"], info["height"]) + rgb


def watch_lines(out):
    """The lines of `vlm watch` output (split at \\n only: an answer may
    hold other line-breaking characters)."""
    return [x for x in out.decode("utf-8", "replace").split("\n") if x]


def one_line(text):
    """An answer as `vlm watch` prints it: trimmed of spaces, tabs and
    newlines, CR and LF inside made spaces."""
    return text.strip(" \t\r\n").replace("\r", " ").replace("\n", " ")


def test_webcam(d):
    prompt = "What is on my desk?"
    frames = ["photo_200x150.jpg", "gray_96x128.jpg", "prog_131x97.jpg"]
    answers = {f: reference([gpath(f)], prompt)["text"] for f in frames}
    mjpeg = b"".join(read(gpath(f)) for f in frames)
    rc, out, err = vlm_cli(["ask"] + GEN + ["-", prompt], d.endpoint, stdin=mjpeg)
    check("vlm ask - with an MJPEG stream on stdin answers about the last frame",
          rc == 0 and out == answers[frames[-1]].encode() + b"\n", f"rc {rc} {err}")

    # A thumbnail inside the last frame must not cut it.
    thumbed = jpeg_with_thumbnail(read(gpath("photo_200x150.jpg")), read(gpath("gray_96x128.jpg")))
    stream = read(gpath("prog_131x97.jpg")) + b"garbage\n" + thumbed
    rc, out, err = vlm_cli(["ask"] + GEN + ["-", prompt], d.endpoint, stdin=stream)
    check("vlm ask -: a JPEG with an embedded JPEG thumbnail is one frame",
          rc == 0 and out == answers["photo_200x150.jpg"].encode() + b"\n", f"rc {rc} {out[:50]!r} {err}")

    # watch: one line per answer, "YYYY-MM-DDTHH:MM:SS answer"; the last
    # frame is always answered at end of input.
    rc, out, err = vlm_cli(["watch", "-", prompt, "--interval", "0.2"] + GEN, d.endpoint, stdin=mjpeg + thumbed)
    lines = watch_lines(out)
    pat = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d (.*)$", re.S)
    flat = {k: one_line(v) for k, v in answers.items()}
    got = [pat.match(x).group(1) if pat.match(x) else None for x in lines]
    check("vlm watch - (MJPEG): timestamped lines, the last about the last frame, exit 0",
          rc == 0 and len(got) >= 1 and all(g in flat.values() for g in got) and got[-1] == flat["photo_200x150.jpg"],
          f"rc {rc}, {len(lines)} lines, {err.strip()[:200]}")

    # A slow stream: frames every 0.3 s; the interval and the one-job rule
    # give several answers, each about a frame of the stream.
    p = subprocess.Popen([VLM, "--endpoint", d.endpoint, "watch", "--prompt", prompt, "-", "--interval", "0.5"]
                         + GEN, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for i in range(8):
            p.stdin.write(read(gpath(frames[i % 3])))
            p.stdin.flush()
            time.sleep(0.3)
        out, err = p.communicate(timeout=60)   # closes stdin: end of the stream
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    lines = watch_lines(out)
    got = [pat.match(x).group(1) if pat.match(x) else None for x in lines]
    check("vlm watch - on a live stream: an answer per interval, not per frame; the last frame answered",
          p.returncode == 0 and 1 <= len(got) <= 7 and all(g in flat.values() for g in got)
          and got[-1] == flat[frames[7 % 3]], f"{len(got)} answers for 8 frames in 2.4 s at --interval 0.5")

    # PPM frames (P6 with a comment in the header).
    ppm_frames = ["exact.png", "rgba_77x45.png"]
    ppm_stream = b"".join(ppm_of(f) for f in ppm_frames)
    want = reference(["-"], prompt, stdin=ppm_of(ppm_frames[-1]))["text"]
    rc, out, err = vlm_cli(["ask"] + GEN + ["-", prompt], d.endpoint, stdin=ppm_stream)
    check("vlm ask - with a PPM stream: the last frame", rc == 0 and out == want.encode() + b"\n", f"rc {rc} {err}")
    rc, out, err = vlm_cli(["watch", "-", prompt] + GEN, d.endpoint, stdin=ppm_stream)
    lines = watch_lines(out)
    check("vlm watch - with a PPM stream", rc == 0 and lines and pat.match(lines[-1])
          and pat.match(lines[-1]).group(1) == one_line(want), f"rc {rc} {lines} {err}")
    rc, out, err = vlm_cli(["watch", "-", prompt] + GEN, d.endpoint, stdin=b"no frames here")
    check("vlm watch - with no frame says so", rc == 0 and out == b"" and "no frame" in err, f"rc {rc} {err}")


# ==== Errors ==================================================================

def test_errors(d):
    with tempfile.TemporaryDirectory() as tmp:
        jpg = read(gpath("photo_200x150.jpg"))
        bad = os.path.join(tmp, "bad.jpg")
        with open(bad, "wb") as f:
            f.write(jpg[: len(jpg) // 2])
        rc, out, err = vlm_cli(["ask", bad, "What is this?"], d.endpoint)
        check("vlm ask: bad image -> exit 1, bad_image", rc == 1 and "bad_image" in err and out == b"", err.strip())
        rc, out, err = vlm_cli(["ask", "-", "What is this?"], d.endpoint, stdin=b"hello, not an image")
        check("vlm ask -: not an image on stdin -> bad_image", rc == 1 and "bad_image" in err, err.strip())
        rc, out, err = vlm_cli(["ask", gpath("exact.png"), "<image> and <image>"], d.endpoint)
        check("vlm ask: marker count -> exit 1, bad_request", rc == 1 and "bad_request" in err, err.strip())
        rc, out, err = vlm_cli(["ask", os.path.join(tmp, "missing.png"), "x"], d.endpoint)
        check("vlm ask: missing file -> exit 1 naming it", rc == 1 and "missing.png" in err, err.strip())
        with vlm.Client(d.endpoint, timeout=10) as c:
            try:
                c.ask("What is this?", images=[bad])
                check("Python: bad image raises BadImageError", False)
            except vlm.BadImageError as e:
                check("Python: bad image raises BadImageError", e.code == "bad_image" and e.message, str(e))
            try:
                c.op("frobnicate")
                check("Python: unknown op raises UnknownOpError", False)
            except vlm.UnknownOpError as e:
                check("Python: unknown op raises UnknownOpError", e.code == "unknown_op", str(e))
            try:
                c.ask("x", max_tokens=0)
                check("Python: max_tokens 0 raises BadRequestError", False)
            except vlm.BadRequestError as e:
                check("Python: max_tokens 0 raises BadRequestError", e.code == "bad_request", str(e))
            h = c.health()
            check("Python: the daemon stays healthy", h.get("status") == "ok", str(h))
            m = c.model()
            s = c.stats()
            check("Python: model and stats answer", m.get("event") == "model" and s.get("event") == "stats")
    for args in (["ask"], ["ask", "--temp", "warm", "x"], ["ask", "--top-p", "0", "x"], ["frobnicate"],
                 ["caption"], ["caption", "/nonexistent-dir-xyz"], ["watch", "x"], ["caption", "/tmp", "--resume"],
                 ["ask", "-", "-", "x"], ["health", "extra"], ["ask", "--json=false", "x"],
                 ["caption", "/tmp", "--sidecar=1"], ["caption", "/tmp", "--out", "o.jsonl", "--resume=yes"]):
        rc, out, err = vlm_cli(args, d.endpoint)
        check(f"usage error exit 2: vlm {' '.join(args)}", rc == 2 and err.startswith("vlm"), f"rc {rc} {err.strip()}")
    for cmd in ("ask", "watch", "caption", "health", "stats", "model"):
        rc, out, err = vlm_cli([cmd, "--help"])
        check(f"vlm {cmd} --help", rc == 0 and b"usage: vlm" in out and b"Exit status" in out and not err)
    rc, out, err = vlm_cli(["--help"])
    check("vlm --help", rc == 0 and b"VLM_ENDPOINT" in out)
    for cmd in ("health", "stats", "model"):
        rc, out, err = vlm_cli([cmd], env={"VLM_ENDPOINT": d.endpoint})
        try:
            j = json.loads(out)
        except ValueError:
            j = {}
        check(f"vlm {cmd} (endpoint from VLM_ENDPOINT) pretty-prints JSON",
              rc == 0 and j.get("event") == cmd and b"\n  " in out, f"rc {rc} {err.strip()}")


# ==== Timeouts and lost daemons ===============================================

def test_timeouts():
    absent = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    rc, out, err = vlm_cli(["ask", "--timeout", "1", gpath("exact.png"), "x"], absent, timeout=30)
    el = time.monotonic() - t0
    check("no daemon: vlm ask exits 3 within about --timeout", rc == 3 and el < 5 and "timeout" in err,
          f"rc {rc} in {el:.2f} s: {err.strip()}")
    t0 = time.monotonic()
    rc, out, err = vlm_cli(["health", "--timeout", "0.5"], absent, timeout=30)
    el = time.monotonic() - t0
    check("no daemon: vlm health exits 3", rc == 3 and el < 5, f"rc {rc} in {el:.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(gpath("exact.png"), os.path.join(tmp, "a.png"))
        rc, out, err = vlm_cli(["caption", tmp, "--timeout", "0.5"], absent, timeout=30)
        check("no daemon: vlm caption exits 3 and records nothing", rc == 3 and out == b"", f"rc {rc} {err.strip()}")
    t0 = time.monotonic()
    try:
        with vlm.Client(absent, timeout=1) as c:
            c.health()
        ok = False
    except vlm.TimeoutError as e:
        ok = e.code == "timeout"
    el = time.monotonic() - t0
    check("no daemon: Python raises vlm.TimeoutError", ok and el < 5, f"{el:.2f} s")

    # A daemon that accepts connections and never answers: the client's
    # health probe goes unanswered, so the job times out.
    ctx = zmq.Context.instance()
    port = free_port()
    silent = ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind(f"tcp://127.0.0.1:{port}")
    stop = threading.Event()

    def swallow():
        while not stop.is_set():
            if silent.poll(50):
                silent.recv_multipart()
    th = threading.Thread(target=swallow)
    th.start()
    try:
        t0 = time.monotonic()
        rc, out, err = vlm_cli(["ask", "--timeout", "1", gpath("exact.png"), "x"], f"tcp://127.0.0.1:{port}",
                               timeout=30)
        el = time.monotonic() - t0
        check("silent daemon: vlm ask exits 3 after about --timeout", rc == 3 and 0.8 < el < 5,
              f"rc {rc} in {el:.2f} s: {err.strip()}")
        t0 = time.monotonic()
        try:
            with vlm.Client(f"tcp://127.0.0.1:{port}", timeout=1) as c:
                c.ask("x", images=[gpath("exact.png")])
            ok = False
        except vlm.TimeoutError:
            ok = True
        el = time.monotonic() - t0
        check("silent daemon: Python ask raises vlm.TimeoutError", ok and el < 5, f"{el:.2f} s")
        # A job deadline shorter than the silence timeout.
        t0 = time.monotonic()
        try:
            with vlm.Client(f"tcp://127.0.0.1:{port}", timeout=30) as c:
                c.ask("x", job_timeout=0.5)
            ok = False
        except vlm.TimeoutError:
            ok = True
        el = time.monotonic() - t0
        check("Python job_timeout ends a job that takes too long", ok and el < 3, f"{el:.2f} s")
    finally:
        stop.set()
        th.join(timeout=5)
        silent.close()

    # A daemon that dies mid-job: the lost connection ends the job at once,
    # long before the 30 s timeout.
    port = free_port()
    dying = ctx.socket(zmq.ROUTER)
    dying.setsockopt(zmq.LINGER, 0)
    dying.bind(f"tcp://127.0.0.1:{port}")

    def die():
        if dying.poll(10000):
            dying.recv_multipart()
            time.sleep(0.3)
        dying.close()
    th = threading.Thread(target=die)
    th.start()
    t0 = time.monotonic()
    rc, out, err = vlm_cli(["ask", "--timeout", "30", gpath("exact.png"), "x"], f"tcp://127.0.0.1:{port}", timeout=60)
    el = time.monotonic() - t0
    th.join(timeout=15)
    check("daemon gone mid-job: vlm ask exits 3 at once (connect)", rc == 3 and el < 5 and "connect" in err,
          f"rc {rc} in {el:.2f} s: {err.strip()}")


class SlowDaemon:
    """A stand-in daemon (a ROUTER thread) whose generate jobs stream a
    piece every 20 ms until max_tokens or a cancel: long jobs on demand, to
    test cancelling deterministically. Records the requests it got."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.requests = []
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def send(self, ident, ev):
        ev = dict(ev, v=1)
        self.sock.send_multipart([ident, json.dumps(ev).encode()])

    def run(self):
        jobs = {}   # (ident, id) -> [index, max_tokens, text, stream]
        next_tick = time.monotonic()
        while not self.stop_flag.is_set():
            if self.sock.poll(5):
                frames = self.sock.recv_multipart()
                ident, hdr = frames[0], json.loads(frames[1])
                self.requests.append(hdr)
                op = hdr.get("op")
                if op == "generate":
                    jobs[(ident, hdr["id"])] = [0, hdr.get("max_tokens", 256), "", hdr.get("stream", False)]
                elif op == "cancel":
                    key = (ident, hdr["target"])
                    found = key in jobs
                    self.send(ident, {"id": hdr["id"], "event": "cancel", "target": hdr["target"], "found": found})
                    if found:
                        _, _, text, _ = jobs.pop(key)
                        self.send(ident, {"id": key[1], "event": "done", "text": text, "finish_reason": "cancelled",
                                          "usage": {"prompt_tokens": 1, "image_tokens": 0,
                                                    "completion_tokens": len(text)}, "timings": {}})
                elif op == "health":
                    self.send(ident, {"id": hdr["id"], "event": "health", "status": "ok"})
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + 0.02
                for key in list(jobs):
                    job = jobs[key]
                    if job[3]:
                        self.send(key[0], {"id": key[1], "event": "token", "index": job[0], "text": "a"})
                    job[0] += 1
                    job[2] += "a"
                    if job[0] >= job[1]:
                        del jobs[key]
                        self.send(key[0], {"id": key[1], "event": "done", "text": job[2], "finish_reason": "length",
                                           "usage": {"completion_tokens": job[0]}, "timings": {}})

    def close(self):
        self.stop_flag.set()
        self.thread.join(timeout=10)
        self.sock.close()


def test_cancel(d):
    # On the micro model a job is over in milliseconds; this is best effort.
    with vlm.Client(d.endpoint, timeout=30) as c:
        st = c.stream("Tell me a very long story about the picture.", images=[gpath("photo_200x150.jpg")],
                      max_tokens=2000, temperature=0, preprocess="llamacpp")
        n = 0
        for piece in st:
            n += 1
            if n == 1:
                st.cancel()
        r = st.result
        note(f"vlmd: stream cancelled after the first piece: {n} pieces, finish_reason "
             f"{r.finish_reason if r else None}")
        check("Python: daemon healthy after a cancel", c.health()["status"] == "ok")

    slow = SlowDaemon()
    try:
        # Python: cancel mid-stream, and cancel() by id.
        with vlm.Client(slow.endpoint, timeout=5) as c:
            st = c.stream("x", max_tokens=1000)
            pieces = []
            for piece in st:
                pieces.append(piece)
                if len(pieces) == 3:
                    st.cancel()
            r = st.result
            check("Python stream.cancel() mid-stream: done with finish_reason cancelled",
                  r is not None and r.finish_reason == "cancelled" and r == "".join(pieces) and len(pieces) < 20,
                  f"{len(pieces)} pieces")
            job = c.submit("y", max_tokens=1000)
            time.sleep(0.1)
            found = c.cancel(job)
            ev = c.poll(5)
            check("Python cancel(job_id): found, then the job's done/cancelled",
                  found and ev is not None and ev.type == "done" and ev.data.finish_reason == "cancelled")
            # A stream left early (break) cancels its job.
            n_before = len([q for q in slow.requests if q.get("op") == "cancel"])
            st = c.stream("z", max_tokens=1000)
            for piece in st:
                break
            st.close()
            time.sleep(0.2)
            n_after = len([q for q in slow.requests if q.get("op") == "cancel"])
            check("Python: leaving a stream early cancels the job", n_after == n_before + 1)
        # The CLI: SIGINT sends a cancel for the job, prints what came, exits 130.
        p = subprocess.Popen([VLM, "--endpoint", slow.endpoint, "ask", "-n", "1000", "Tell me a long story."],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = p.stdout.read(3)
        p.send_signal(signal.SIGINT)
        try:
            out, err = p.communicate(timeout=30)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            p.kill()
            out, err, rc = b"", b"", None
        gen = [q for q in slow.requests if q.get("op") == "generate" and q.get("prompt") == "Tell me a long story."]
        cancels = [q for q in slow.requests if q.get("op") == "cancel"]
        check("vlm ask: SIGINT cancels the job (cancel op for its id) and exits 130",
              rc == 130 and first == b"aaa" and gen and cancels and cancels[-1]["target"] == gen[-1]["id"]
              and (first + out).rstrip(b"\n") == b"a" * len((first + out).rstrip(b"\n")), f"rc {rc}")
        # A silent health probe keeps a long job alive: 1 s timeout, 2 s job
        # without streaming (nothing comes until done).
        t0 = time.monotonic()
        rc, out, err = vlm_cli(["ask", "--json", "--timeout", "1", "-n", "100", "quiet job"], slow.endpoint,
                               timeout=30)
        el = time.monotonic() - t0
        probes = [q for q in slow.requests if q.get("op") == "health"]
        check("a job longer than --timeout lives on health probes",
              rc == 0 and json.loads(out)["finish_reason"] == "length" and el > 1.5 and len(probes) >= 2,
              f"rc {rc}, {el:.1f} s, {len(probes)} probes, {err.strip()}")
    finally:
        slow.close()


def test_pip_install():
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        shutil.copytree(PYDIR, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        venv = os.path.join(tmp, "venv")
        p = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], capture_output=True,
                           timeout=120)
        if p.returncode != 0:
            print("[ SKIP ] pip install clients/python (no venv module)")
            return
        py = os.path.join(venv, "bin", "python")
        p = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", src],
                           capture_output=True, timeout=300)
        ok = p.returncode == 0
        if ok:
            q = subprocess.run([py, "-c", "import vlm, sys; print(vlm.__file__); print(vlm.Client, vlm.BadImageError)"],
                               capture_output=True, timeout=60, cwd=tmp)
            ok = q.returncode == 0 and venv.encode() in q.stdout
        check("pip install clients/python (offline, --no-deps --no-build-isolation)", ok,
              (p.stderr or b"").decode(errors="replace").strip()[-300:])


def main():
    only = set(sys.argv[1:])    # test names to run (default: all)

    def selected(t):
        return not only or t.__name__ in only
    for exe in (VLMD, VLM, VLM_RUN):
        if not os.path.exists(exe):
            print(f"not built: {exe}")
            print("0 passed, 1 failed")
            return 1
    try:
        d = Daemon()
    except RuntimeError as e:
        print(f"[ FAIL ] start vlmd: {e}")
        print("0 passed, 1 failed")
        return 1
    try:
        for t in (test_answers, test_stream_order, test_caption, test_resume, test_webcam, test_errors, test_cancel):
            if not selected(t):
                continue
            print(f"[ RUN  ] {t.__name__}", flush=True)
            try:
                t(d)
            except Exception as e:  # a crash in one group must not hide the others
                check(t.__name__, False, f"{type(e).__name__}: {e}")
        print("[ RUN  ] daemon log", flush=True)
        log = d.log_text()
        check("vlmd still running after the client tests", d.proc.poll() is None, log[-300:])
    finally:
        rc = d.stop()
    check("vlmd exits 0 on SIGTERM", rc == 0, f"rc {rc}")
    for t in (test_timeouts, test_pip_install):
        if not selected(t):
            continue
        print(f"[ RUN  ] {t.__name__}", flush=True)
        try:
            t()
        except Exception as e:
            check(t.__name__, False, f"{type(e).__name__}: {e}")
    return summary()


if __name__ == "__main__":
    sys.exit(main())
