"""What runs inside an intake worker process (`app/intake/pool.py` starts them).

A worker serves one request at a time on its end of a `multiprocessing` pipe: open a
document, or render one page of it. The document comes as a path to a private temp file
the main process wrote once; a worker reads it on first use and keeps a few documents
open (LRU), so the next pages of the same document cost no re-read and no re-parse.
A document whose file is gone (the main process closed it) is dropped at the next request.

Errors travel as `(code, message, details)` and are rebuilt in the main process
(`rebuild_error`); a worker never pickles an exception. Everything here is plain
functions and picklable values, so tests can hand the pool a wrapper (a gated page) by
reference.
"""

from __future__ import annotations

import os
import signal
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from PIL import Image

from app.errors import OCRError
from app.intake.document import Document, IntakeLimits, open_document, pad_to_min_side

# Documents a worker keeps open: the few being rendered now, so pages of one document need not re-open it.
_CACHE_SIZE = 4


@dataclass(frozen=True, slots=True)
class OpenRequest:
    path: str
    password: str | None
    limits: IntakeLimits


@dataclass(frozen=True, slots=True)
class PageRequest:
    """Page `index` of the document at `path`; as a padded PNG (`png_min_side` set) or raw RGB pixels."""

    path: str
    password: str | None
    limits: IntakeLimits
    index: int
    png_min_side: int | None


@dataclass(frozen=True, slots=True)
class Opened:
    doc_type: str
    page_count: int


@dataclass(frozen=True, slots=True)
class RenderedPng:
    png: bytes
    size: tuple[int, int]  # the page's size before any padding


@dataclass(frozen=True, slots=True)
class RenderedPixels:
    mode: str
    size: tuple[int, int]
    pixels: bytes


@dataclass(frozen=True, slots=True)
class Failed:
    code: str
    message: str
    details: dict[str, Any]


Request = OpenRequest | PageRequest
Reply = Opened | RenderedPng | RenderedPixels | Failed
Handler = Callable[[Request], Reply]

# What ps, top and pkill show for a worker (the command line is the forkserver's, shared by all of them).
PROCESS_NAME = "ocr-intake"

_documents: OrderedDict[tuple[str, str | None], Document] = OrderedDict()


def open_cached(path: str, password: str | None, limits: IntakeLimits) -> Document:
    """The open document for `path`, from the cache or read now; documents whose file is gone are closed."""
    for key in [key for key in _documents if not os.path.exists(key[0])]:
        _documents.pop(key).close()
    key = (path, password)
    document = _documents.get(key)
    if document is not None:
        _documents.move_to_end(key)
        return document
    with open(path, "rb") as file:
        data = file.read()
    document = open_document(data, limits=limits, password=password)
    _documents[key] = document
    while len(_documents) > _CACHE_SIZE:
        _documents.popitem(last=False)[1].close()
    return document


def handle(request: Request) -> Reply:
    """The default handler: open a document, or render (and encode) one page."""
    try:
        document = open_cached(request.path, request.password, request.limits)
        if isinstance(request, OpenRequest):
            return Opened(doc_type=document.doc_type.value, page_count=document.page_count)
        image = document.render(request.index)
        if request.png_min_side is None:
            return RenderedPixels(mode=image.mode, size=image.size, pixels=image.tobytes())
        # Imported here: app.imaging imports app.intake, which must be complete first.
        from app.imaging import encode_png

        png = encode_png(pad_to_min_side(image, request.png_min_side))
        return RenderedPng(png=png, size=image.size)
    except OCRError as exc:
        return Failed(code=exc.code, message=exc.message, details=exc.details)


def _name_process(name: str) -> None:
    """Name the process for ps, top and `pkill ocr-intake` (Linux: /proc/self/comm; elsewhere nothing)."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name)
    except OSError:
        pass


def serve(conn: Connection, handler: Handler) -> None:
    """The worker's loop: one request in, one reply out, until the main process closes the pipe."""
    # Ctrl-C reaches the whole process group: the main process decides when workers stop (it closes the pipe).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _name_process(PROCESS_NAME)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            break
        try:
            reply = handler(request)
        except Exception as exc:  # a bug, not a document error: reported as the service's internal error
            reply = Failed(code="internal_error", message=f"intake worker: {type(exc).__name__}: {exc}", details={})
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            break
    for document in _documents.values():
        document.close()
    _documents.clear()


def pixels_to_image(reply: RenderedPixels) -> Image.Image:
    return Image.frombytes(reply.mode, reply.size, reply.pixels)
