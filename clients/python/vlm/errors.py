"""vlm.errors - exceptions that carry the daemon's stable error codes.

Every failure is a :class:`VlmError` with ``.code`` (the wire name, e.g.
``"bad_image"``), ``.message`` (the daemon's or the client's sentence) and
``.job_id`` (the request it belongs to, or None). Each code has its own
subclass, so callers can catch exactly what they handle::

    try:
        client.ask("What is this?", images=["photo.jpg"])
    except vlm.BadImageError as e:
        print("not an image:", e.message)
    except vlm.TimeoutError:
        print("the daemon did not answer")

The daemon's codes (docs/protocol.md): bad_request, unknown_op, bad_image,
too_large, context_overflow, busy, cancelled, shutting_down, internal. The
client's own: timeout, connect, protocol. ``TimeoutError`` and
``ConnectionError`` also derive from the built-in exceptions of those names.
"""
import builtins


class VlmError(Exception):
    """A failed request: ``code`` (wire name), ``message``, ``job_id``."""

    code = "internal"

    def __init__(self, message="", code=None, job_id=None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.job_id = job_id

    def __str__(self):
        return f"{self.code}: {self.message}" if self.message else self.code


class BadRequestError(VlmError):
    code = "bad_request"


class UnknownOpError(VlmError):
    code = "unknown_op"


class BadImageError(VlmError):
    code = "bad_image"


class TooLargeError(VlmError):
    code = "too_large"


class ContextOverflowError(VlmError):
    code = "context_overflow"


class BusyError(VlmError):
    code = "busy"


class CancelledError(VlmError):
    code = "cancelled"


class ShuttingDownError(VlmError):
    code = "shutting_down"


class InternalError(VlmError):
    code = "internal"


class TimeoutError(VlmError, builtins.TimeoutError):  # noqa: A001 - deliberately shadows the built-in
    """The daemon did not answer (or connect) within the client's timeout,
    or a job passed its own deadline."""

    code = "timeout"


class ConnectionError(VlmError, builtins.ConnectionError):  # noqa: A001
    """The connection to the daemon was lost while requests were waiting."""

    code = "connect"


class ProtocolError(VlmError):
    """The daemon's answer broke the protocol."""

    code = "protocol"


ERRORS = {cls.code: cls for cls in (
    BadRequestError, UnknownOpError, BadImageError, TooLargeError, ContextOverflowError, BusyError,
    CancelledError, ShuttingDownError, InternalError, TimeoutError, ConnectionError, ProtocolError)}


def error_for(code, message="", job_id=None):
    """The exception for a wire code; an unknown code gives a plain
    :class:`VlmError` that keeps the code."""
    cls = ERRORS.get(code)
    if cls is None:
        return VlmError(message, code=code or "internal", job_id=job_id)
    return cls(message, job_id=job_id)
