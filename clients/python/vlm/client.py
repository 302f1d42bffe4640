"""vlm.client - the Python client of the vlmd daemon (docs/protocol.md).

One :class:`Client` holds one ZeroMQ DEALER socket, so it can have several
jobs in flight and receive their events interleaved; it is not thread-safe
(use one client per thread).

How waiting works (the same as libvlm, clients/c/vlm.c):
  - a request is sent only over a live connection (ZMQ_IMMEDIATE), waiting
    at most ``timeout`` seconds for one;
  - every request waits for its events; when the daemon is silent for half
    of ``timeout`` while something waits, the client sends a ``health``
    probe (the daemon answers it at once even under load), and after a full
    ``timeout`` of silence every waiting request fails with
    :class:`~vlm.errors.TimeoutError`;
  - a socket monitor notices a lost connection at once
    (:class:`~vlm.errors.ConnectionError`);
  - a job may also carry its own deadline (``job_timeout=`` seconds).
So no call waits forever on a daemon that is gone.
"""
import collections
import io
import json
import os
import secrets
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from .errors import ConnectionError, ProtocolError, TimeoutError, VlmError, error_for

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_TIMEOUT = 10.0
PROTO_VERSION = 1

# Keyword arguments of ask()/stream()/submit() -> protocol fields.
_FIELDS = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "seed": "seed",
    "stop": "stop",
    "template": "template",
    "preprocess": "preprocess",
    "system": "system",
}


class Result(str):
    """The answer of a job: a ``str`` (the whole text) that also carries
    ``.text``, ``.finish_reason`` ("stop", "length" or "cancelled"),
    ``.usage`` (dict: prompt_tokens, image_tokens, completion_tokens),
    ``.timings`` (dict: queue_ms, image_decode_ms, encode_ms, prefill_ms,
    decode_ms, total_ms), ``.tokens`` (the token ids when the daemon sends
    them, else None), ``.job_id`` and ``.event`` (the whole done event)."""

    def __new__(cls, event, job_id=None):
        text = event.get("text")
        if not isinstance(text, str):
            raise ProtocolError("a done event without its text", job_id=job_id)
        self = super().__new__(cls, text)
        self.event = event
        self.job_id = job_id
        return self

    @property
    def text(self):
        return str(self)

    @property
    def finish_reason(self):
        return self.event.get("finish_reason", "stop")

    @property
    def usage(self):
        return self.event.get("usage", {})

    @property
    def timings(self):
        return self.event.get("timings", {})

    @property
    def tokens(self):
        return self.event.get("tokens")


Event = collections.namedtuple("Event", "type job_id user data")
Event.__doc__ = """One event of a submitted job (from :meth:`Client.poll`):
``type`` is "token" (``data`` is the piece, a str), "done" (``data`` is a
:class:`Result`) or "error" (``data`` is the :class:`~vlm.errors.VlmError`);
``user`` is what was given to :meth:`Client.submit`."""


def image_bytes(image):
    """The bytes to send for an image: a path (str or os.PathLike) is read;
    bytes-like objects are sent as they are; an object with a ``save()``
    method (a PIL image, for one) is saved as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    if hasattr(image, "save"):
        buf = io.BytesIO()
        try:
            image.save(buf, format="PNG")
        except TypeError:
            image.save(buf)
        return buf.getvalue()
    raise TypeError(f"an image must be a path, bytes or an object with save(), not {type(image).__name__}")


class Stream:
    """An iterator of the text pieces of one job, in order. After the last
    piece, ``.result`` holds the :class:`Result` (the pieces join to its
    text). ``.cancel()`` asks the daemon to stop; the iteration then ends
    with ``result.finish_reason == "cancelled"``. Leaving the loop early
    (break, an exception) cancels the job too."""

    def __init__(self, client, job_id):
        self._client = client
        self.job_id = job_id
        self.result = None
        self._ended = False

    def __iter__(self):
        return self

    def __next__(self):
        if self._ended:
            raise StopIteration
        try:
            while True:
                ev = self._client._wait(self.job_id)
                kind = ev.get("event")
                if kind == "token":
                    text = ev.get("text")
                    if isinstance(text, str):
                        return text
                    raise ProtocolError("a token event without its text", job_id=self.job_id)
                self._ended = True
                if kind == "done":
                    self.result = Result(ev, self.job_id)
                    raise StopIteration
                raise self._client._error_of(ev, self.job_id)
        except StopIteration:
            raise
        except BaseException:
            self.close()
            raise

    def cancel(self):
        """Asks the daemon to cancel the job (without waiting)."""
        if not self._ended:
            self._client._send_cancel_nowait(self.job_id)

    def close(self):
        """Cancels the job if it still runs and forgets it."""
        if not self._ended:
            self._ended = True
            self._client._abandon(self.job_id)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Client:
    """A connection to vlmd.

    ``endpoint``: e.g. "tcp://127.0.0.1:5555" or "ipc:///run/vlmd.sock";
    None means ``$VLM_ENDPOINT``, else tcp://127.0.0.1:5555.
    ``timeout``: seconds the daemon may stay silent (to connect, to answer
    an op, to show a sign of life during a job); see the module docstring.
    ``context``: a zmq.Context to share (default: the process's instance).

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, endpoint=None, timeout=DEFAULT_TIMEOUT, context=None):
        self.endpoint = endpoint or os.environ.get("VLM_ENDPOINT") or DEFAULT_ENDPOINT
        if timeout is None or timeout <= 0:
            timeout = DEFAULT_TIMEOUT
        self.timeout = max(float(timeout), 0.05)
        self._ctx = context or zmq.Context.instance()
        self._prefix = secrets.token_hex(6)
        self._seq = 0
        self._entries = collections.OrderedDict()   # id -> [kind, user, deadline]
        self._queue = collections.deque()           # (id, kind, user, event dict)
        self._last_heard = 0.0
        self._probe_out = False
        ms = int(self.timeout * 1000)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.LINGER, 200)
        # ZMTP heartbeats drop a connection whose peer vanished silently
        # (the monitor then fails its requests); kept above a second or two
        # so a loaded machine does not drop a healthy daemon.
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, max(ms // 4, 500))
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(ms, 2000))
        self._mon = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            self._sock.connect(self.endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise ConnectionError(f"cannot connect to endpoint '{self.endpoint}': {e}") from None
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._mon, zmq.POLLIN)

    # ---- lifetime ---------------------------------------------------------

    def close(self):
        """Cancels the jobs still in flight (best effort) and closes the
        socket. Safe to call twice."""
        sock = getattr(self, "_sock", None)
        if sock is None:
            return
        for job_id, (kind, _, _) in list(self._entries.items()):
            if kind == "job":
                self._send_cancel_nowait(job_id)
        self._entries.clear()
        self._queue.clear()
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        if getattr(self, "_mon", None) is not None:
            self._mon.close(linger=0)
            self._mon = None
        sock.close()
        self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- ids, sending -----------------------------------------------------

    def _next_id(self, tag=""):
        self._seq += 1
        return f"{self._prefix}-{tag}{self._seq}"

    def _send(self, header, images=(), wait=True):
        frames = [json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")]
        frames += list(images)
        until = time.monotonic() + (self.timeout if wait else 0.0)
        while True:
            try:
                self._sock.send_multipart(frames, flags=zmq.DONTWAIT, copy=len(frames[-1]) < 65536)
                return
            except zmq.Again:
                left = until - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no daemon answered at {self.endpoint} within {self.timeout:.1f} s "
                                       "(is vlmd running?)") from None
                self._sock.poll(min(left, 0.1) * 1000, zmq.POLLOUT)

    def _send_cancel_nowait(self, target):
        if self._sock is None:
            return
        try:
            self._send({"v": PROTO_VERSION, "id": self._next_id("c"), "op": "cancel", "target": target},
                       wait=False)
        except (VlmError, zmq.ZMQError):
            pass

    def _add(self, job_id, kind, user=None, deadline=None):
        if not self._entries:
            self._last_heard = time.monotonic()
            self._probe_out = False
        self._entries[job_id] = [kind, user, deadline]

    def _abandon(self, job_id):
        """Forgets a request (its later events are dropped); a job is also
        cancelled."""
        entry = self._entries.pop(job_id, None)
        if entry and entry[0] == "job":
            self._send_cancel_nowait(job_id)
        self._queue = collections.deque(q for q in self._queue if q[0] != job_id)

    # ---- receiving --------------------------------------------------------

    def _fail(self, job_id, code, message):
        kind, user, _ = self._entries.pop(job_id)
        if kind == "job" and code != "connect":
            self._send_cancel_nowait(job_id)
        self._queue.append((job_id, kind, user, {"v": PROTO_VERSION, "id": job_id, "event": "error",
                                                 "code": code, "message": message}))

    def _fail_all(self, code, message):
        for job_id in list(self._entries):
            self._fail(job_id, code, message)

    def _check_timers(self, now):
        """Deadlines and liveness; True when something failed."""
        if not self._entries:
            return False
        failed = False
        for job_id, (kind, _, deadline) in list(self._entries.items()):
            if deadline is not None and now >= deadline:
                what = "the job" if kind == "job" else "the daemon's answer"
                self._fail(job_id, "timeout", f"{what} did not end within its time limit")
                failed = True
        if self._entries and now - self._last_heard >= self.timeout:
            self._fail_all("timeout", f"no answer from the daemon at {self.endpoint} within {self.timeout:.1f} s")
            return True
        if self._entries and not self._probe_out and now - self._last_heard >= self.timeout / 2:
            try:
                self._send({"v": PROTO_VERSION, "id": self._next_id("h"), "op": "health"}, wait=False)
            except (VlmError, zmq.ZMQError):
                pass
            self._probe_out = True
        return failed

    def _next_timer(self):
        if not self._entries:
            return None
        t = self._last_heard + (self.timeout if self._probe_out else self.timeout / 2)
        for _, _, deadline in self._entries.values():
            if deadline is not None and deadline < t:
                t = deadline
        return t

    def _drain_monitor(self):
        failed = False
        while True:
            try:
                msg = recv_monitor_message(self._mon, flags=zmq.NOBLOCK)
            except zmq.Again:
                return failed
            if msg["event"] == zmq.EVENT_DISCONNECTED and self._entries:
                self._fail_all("connect", f"lost the connection to the daemon at {self.endpoint}")
                failed = True

    def _receive_one(self):
        """Takes one message; True when it was queued for a request."""
        frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
        self._last_heard = time.monotonic()
        self._probe_out = False
        try:
            ev = json.loads(frames[0].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return False
        if not isinstance(ev, dict):
            return False
        job_id = ev.get("id")
        kind_ev = ev.get("event")
        if job_id not in self._entries:
            # An error the daemon could not address goes to the oldest request.
            if not job_id and kind_ev == "error" and self._entries:
                job_id = next(iter(self._entries))
            else:
                return False   # a probe's answer or an abandoned job's event
        kind, user, _ = self._entries[job_id]
        if kind == "op" or kind_ev != "token":
            del self._entries[job_id]
        self._queue.append((job_id, kind, user, ev))
        return True

    def _pump(self, until=None):
        """Waits until something is queued (True) or until `until`
        (monotonic seconds; None: no limit) passes (False)."""
        while True:
            now = time.monotonic()
            if self._drain_monitor() or self._check_timers(now):
                return True
            if until is not None and now >= until:
                return False
            wake = self._next_timer()
            if until is not None and (wake is None or until < wake):
                wake = until
            wait = None if wake is None else max(0.0, wake - now) * 1000
            ready = dict(self._poller.poll(wait))
            if self._mon in ready and self._drain_monitor():
                return True
            if self._sock in ready:
                got = False
                while self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    got |= self._receive_one()
                if got:
                    return True

    def _wait(self, job_id):
        """The next event of request job_id (its entry guarantees one comes)."""
        while True:
            for i, item in enumerate(self._queue):
                if item[0] == job_id:
                    del self._queue[i]
                    return item[3]
            if job_id not in self._entries:
                raise VlmError(f"request {job_id} is no longer tracked", code="internal", job_id=job_id)
            self._pump()

    @staticmethod
    def _error_of(ev, job_id):
        if ev.get("event") == "error":
            return error_for(ev.get("code"), ev.get("message", ""), job_id)
        return ProtocolError(f"unexpected '{ev.get('event')}' event", job_id=job_id)

    # ---- generate ---------------------------------------------------------

    def _header(self, job_id, prompt, stream, opts):
        if not isinstance(prompt, str):
            raise TypeError("the prompt must be a str")
        h = {"v": PROTO_VERSION, "id": job_id, "op": "generate", "prompt": prompt, "stream": bool(stream)}
        for key, value in opts.items():
            if key not in _FIELDS:
                raise TypeError(f"unknown option '{key}'")
            if value is None:
                continue
            if key == "stop":
                value = [value] if isinstance(value, str) else list(value)
            h[_FIELDS[key]] = value
        return h

    def submit(self, prompt, images=(), stream=False, user=None, job_timeout=None, **opts):
        """Sends a job and returns its id at once; its events come from
        :meth:`poll`. ``user`` comes back in each event. Options as for
        :meth:`ask`."""
        job_id = self._next_id()
        header = self._header(job_id, prompt, stream, opts)
        frames = [image_bytes(im) for im in images]
        self._drain_monitor()
        self._send(header, frames)
        deadline = time.monotonic() + job_timeout if job_timeout else None
        self._add(job_id, "job", user, deadline)
        return job_id

    def poll(self, timeout=None):
        """The next :class:`Event` of a submitted job, or None when none
        came within ``timeout`` seconds (None: wait) or no job is in flight.
        Every submitted job ends with exactly one "done" or "error" event,
        including the failures the client detects itself."""
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            for i, item in enumerate(self._queue):
                if item[1] == "job":
                    del self._queue[i]
                    job_id, _, user, ev = item
                    kind = ev.get("event")
                    if kind == "token":
                        return Event("token", job_id, user, ev.get("text", ""))
                    if kind == "done":
                        try:
                            return Event("done", job_id, user, Result(ev, job_id))
                        except ProtocolError as e:
                            return Event("error", job_id, user, e)
                    return Event("error", job_id, user, self._error_of(ev, job_id))
            if self.pending() == 0:
                return None
            if not self._pump(until):
                return None

    def pending(self):
        """The number of submitted jobs that have not ended."""
        return sum(1 for kind, _, _ in self._entries.values() if kind == "job")

    def stream(self, prompt, images=(), job_timeout=None, **opts):
        """Starts a job and returns a :class:`Stream`, an iterator of its
        text pieces; the final :class:`Result` is ``stream.result``
        afterwards. Options as for :meth:`ask`."""
        job_id = self.submit(prompt, images, stream=True, job_timeout=job_timeout, **opts)
        return Stream(self, job_id)

    def ask(self, prompt, images=(), job_timeout=None, **opts):
        """Asks and waits for the whole answer, a :class:`Result` (a str
        with .usage, .timings, .finish_reason, .tokens).

        ``images``: paths, bytes or objects with ``save()`` (PIL images),
        placed by ``<image>`` markers in the prompt or by the chat template.
        Options (the daemon's default when None or not given):
        ``max_tokens``, ``temperature`` (0: greedy), ``top_k``, ``top_p``,
        ``min_p``, ``repeat_penalty``, ``repeat_last_n``, ``seed``,
        ``stop`` (a str or a list), ``template``, ``preprocess`` ("hf" or
        "llamacpp"), ``system``. ``job_timeout``: seconds for the whole job.
        Raises a :class:`~vlm.errors.VlmError` subclass on failure."""
        job_id = self.submit(prompt, images, stream=False, job_timeout=job_timeout, **opts)
        try:
            ev = self._wait(job_id)
        except BaseException:
            self._abandon(job_id)
            raise
        if ev.get("event") == "done":
            return Result(ev, job_id)
        raise self._error_of(ev, job_id)

    # ---- ops --------------------------------------------------------------

    def op(self, op, **fields):
        """Any op by name; returns the answer event as a dict."""
        job_id = self._next_id("o")
        header = {"v": PROTO_VERSION, "id": job_id, "op": op}
        header.update(fields)
        self._drain_monitor()
        self._send(header)
        self._add(job_id, "op", None, time.monotonic() + self.timeout)
        try:
            ev = self._wait(job_id)
        except BaseException:
            self._abandon(job_id)
            raise
        if ev.get("event") == "error" or "event" not in ev:
            raise self._error_of(ev, job_id)
        return ev

    def health(self):
        """{"status": "ok"|"stopping", "uptime_s", "active", "queued", ...}"""
        return self.op("health")

    def stats(self):
        """The daemon's counters (see docs/protocol.md)."""
        return self.op("stats")

    def model(self):
        """What the daemon has loaded (see docs/protocol.md)."""
        return self.op("model")

    def cancel(self, job_id):
        """Asks the daemon to cancel a job of this client; returns whether
        the daemon still had it. The job itself then ends with a done event,
        finish_reason "cancelled"."""
        return bool(self.op("cancel", target=job_id).get("found"))
