"""vlm - the Python client of vlmd, the vision-language daemon.

    import vlm
    with vlm.Client() as c:                      # $VLM_ENDPOINT or tcp://127.0.0.1:5555
        answer = c.ask("What is on my desk?", images=["desk.jpg"], max_tokens=64)
        print(answer, answer.usage, answer.timings["total_ms"])
        for piece in c.stream("Describe it.", images=[pil_image]):
            print(piece, end="", flush=True)
        print(c.health()["status"])
    vlm.caption_folder("photos", out="captions.jsonl", resume=True)

``ask`` returns a :class:`Result`: a ``str`` holding the whole answer that
also has ``.text``, ``.finish_reason``, ``.usage``, ``.timings`` and
``.tokens``. Failures raise :class:`VlmError` subclasses that carry the
daemon's error code (``e.code``): ``BadImageError``, ``BusyError``,
``TimeoutError`` and so on (see :mod:`vlm.errors`).
"""
from .caption import caption_folder, find_images
from .client import DEFAULT_ENDPOINT, Client, Event, Result, Stream, image_bytes
from .errors import (BadImageError, BadRequestError, BusyError, CancelledError, ConnectionError,
                     ContextOverflowError, InternalError, ProtocolError, ShuttingDownError, TimeoutError,
                     TooLargeError, UnknownOpError, VlmError, error_for)

__version__ = "0.1.0"

__all__ = [
    "Client", "Result", "Stream", "Event", "caption_folder", "find_images", "image_bytes", "DEFAULT_ENDPOINT",
    "VlmError", "BadRequestError", "UnknownOpError", "BadImageError", "TooLargeError", "ContextOverflowError",
    "BusyError", "CancelledError", "ShuttingDownError", "InternalError", "TimeoutError", "ConnectionError",
    "ProtocolError", "error_for",
]
