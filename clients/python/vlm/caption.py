"""vlm.caption - caption a folder tree of images, as `vlm caption` does.

The output format and the rules are the command line's (clients/cli/vlm.c),
so either can resume what the other started:
  - candidates are the files under the folder whose names end in .jpg,
    .jpeg or .png (any case); the daemon reads the format from the bytes, so
    a file that is not an image is recorded as a failure; links to files
    are followed, links to folders are not; paths are "DIR/rel/name" in byte
    order;
  - one JSON line per image: {"path", "caption", "tokens", "ms"} or
    {"path", "error": {"code", "message"}}; with ``sidecar=True`` the caption
    goes to a .txt beside the image (a.jpg -> a.txt, or a.png.txt when an
    earlier image has the same stem);
  - ``resume=True`` skips the images that already have a line in ``out``
    (a cut-off last line is removed first) or, with ``sidecar``, a .txt;
  - a busy daemon is retried; a lost daemon stops the run without recording
    the unfinished images (raising the error), so a resumed run does them.
"""
import json
import os
import sys
import time

from .client import Client
from .errors import VlmError

EXTENSIONS = (".jpg", ".jpeg", ".png")
_EXT_BYTES = tuple(x.encode() for x in EXTENSIONS)
MAX_BUSY_TRIES = 20


def find_images(folder):
    """The candidate image paths under folder, sorted by their bytes."""
    root = os.fsencode(folder).rstrip(b"/") or b"/"
    found = []

    def walk(d):
        try:
            entries = list(os.scandir(d))
        except OSError:
            if d == root:
                raise
            return
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                walk(e.path)
            elif e.is_file(follow_symlinks=True) and os.path.splitext(e.name)[1].lower() in _EXT_BYTES:
                found.append(e.path)

    walk(root)
    found.sort()
    return [os.fsdecode(p) for p in found]


def _key(path):
    """The path as it is written to JSON (invalid UTF-8 replaced)."""
    return os.fsencode(path).decode("utf-8", "replace")


def sidecar_paths(paths):
    """path -> its .txt file (a later image with a taken stem gets
    name.ext.txt)."""
    taken = set()
    out = {}
    for p in paths:
        s = os.path.splitext(p)[0] + ".txt"
        if s in taken:
            s = p + ".txt"
        taken.add(s)
        out[p] = s
    return out


def _resume_keys(out_path):
    """The paths recorded in a JSON lines file, after cutting off a partial
    last line."""
    try:
        with open(out_path, "r+b") as f:
            data = f.read()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                print(f"vlm caption: {out_path}: removing a cut-off last line ({len(data) - keep} bytes)",
                      file=sys.stderr)
                f.truncate(keep)
    except FileNotFoundError:
        return set()
    keys = set()
    for line in data[:keep].splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("path"), str):
            keys.add(rec["path"])
    return keys


def caption_folder(folder, prompt="Describe the image.", inflight=4, out=None, resume=False, sidecar=False,
                   client=None, endpoint=None, timeout=None, progress=None, **opts):
    """Captions every JPEG/PNG under ``folder`` with up to ``inflight`` jobs
    in the daemon at once.

    ``out``: a path (JSON lines, appended with ``resume``, else rewritten) or
    a writable text file, or None. ``progress``: None, or a function called
    as progress(finished, total, failed) after each image. ``client``: a
    :class:`Client` to use (else one is made for ``endpoint``/``timeout``).
    Other keywords are generation options (see :meth:`Client.ask`).

    Returns a dict: {"captioned", "failed", "skipped", "results"} where
    results holds this run's records in the order they finished. Raises
    :class:`~vlm.errors.TimeoutError`/``ConnectionError``/
    ``ShuttingDownError`` when the daemon goes away (what finished is
    already written)."""
    paths = find_images(folder)
    sidecars = sidecar_paths(paths) if sidecar else {}
    done = set()
    out_path = out if isinstance(out, (str, os.PathLike)) else None
    if resume:
        if sidecar:
            done = {p for p in paths if os.path.exists(sidecars[p])}
        elif out_path is not None:
            keys = _resume_keys(out_path)
            done = {p for p in paths if _key(p) in keys}
        else:
            raise ValueError("resume needs out as a file path, or sidecar=True")
    todo = [p for p in paths if p not in done]

    own_client = client is None
    if own_client:
        client = Client(endpoint, timeout=timeout) if timeout else Client(endpoint)
    fout = open(out_path, "a" if resume else "w", encoding="utf-8") if out_path is not None else out
    results = []
    n_ok = n_failed = 0
    retry = []          # (not_before, path, tries)
    tries = {}
    running = 0
    nxt = 0

    def record(rec):
        results.append(rec)
        if fout is not None:
            fout.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fout.flush()

    try:
        while True:
            while running < inflight:
                now = time.monotonic()
                ready = [r for r in retry if r[0] <= now]
                if ready:
                    retry.remove(ready[0])
                    path = ready[0][1]
                elif nxt < len(todo):
                    path = todo[nxt]
                    nxt += 1
                else:
                    break
                try:
                    client.submit(prompt, [path], user=path, **opts)
                    running += 1
                except OSError as e:   # a file that cannot be read
                    n_failed += 1
                    record({"path": _key(path), "error": {"code": "io", "message": f"{path}: {e.strerror}"}})
                    if progress:
                        progress(n_ok + n_failed, len(todo), n_failed)
            if running == 0 and nxt >= len(todo) and not retry:
                break
            ev = client.poll(0.1)
            if ev is None or ev.type == "token":
                continue
            running -= 1
            path = ev.user
            if ev.type == "error":
                err = ev.data
                if err.code == "busy" and tries.get(path, 0) < MAX_BUSY_TRIES:
                    tries[path] = tries.get(path, 0) + 1
                    retry.append((time.monotonic() + min(0.25 * tries[path], 2.0), path, tries[path]))
                    continue
                if err.code in ("timeout", "connect", "shutting_down"):
                    raise err
                n_failed += 1
                record({"path": _key(path), "error": {"code": err.code, "message": err.message}})
                if sidecar:
                    print(f"vlm caption: {_key(path)}: {err.code}: {err.message}", file=sys.stderr)
            else:
                res = ev.data
                if sidecar:
                    tmp = sidecars[path] + ".tmp"
                    with open(tmp, "w", encoding="utf-8") as f:
                        f.write(res.text + "\n")
                    os.replace(tmp, sidecars[path])
                rec = {"path": _key(path), "caption": res.text,
                       "tokens": res.usage.get("completion_tokens", 0),
                       "ms": round(float(res.timings.get("total_ms", 0.0)), 1)}
                if sidecar and fout is None:
                    results.append(rec)
                else:
                    record(rec)
                n_ok += 1
            if progress:
                progress(n_ok + n_failed, len(todo), n_failed)
    finally:
        if out_path is not None and fout is not None:
            fout.close()
        if own_client:
            client.close()
    return {"captioned": n_ok, "failed": n_failed, "skipped": len(done), "results": results}


__all__ = ["caption_folder", "find_images", "sidecar_paths", "VlmError"]
