"""Page intake in worker processes (`INTAKE_WORKERS`): render, normalise and PNG-encode on every core.

One service process renders pages on one core (PDFium is serialised by a process-wide
lock). This pool runs `app/intake/worker.py` in N processes started with `forkserver`
(`spawn` where there is none), each serving one request at a time on its own
`multiprocessing` pipe. Owning the processes one by one, rather than using
`ProcessPoolExecutor`, is what crash isolation needs: the executor marks the whole
pool broken when one worker dies and fails every pending future, while here a dead
worker fails exactly the page it held (`IntakeWorkerCrashed`) and is replaced; other
workers, pages and requests carry on.

A document's bytes are written once to a private temp file (mode 0600 in a 0700
directory); workers open it by path and keep it open for its next pages. Rendered pages
come back as the PNG the vLLM engine sends (padded, encoded: the main process never
re-encodes) or as raw RGB pixels for engines that want images (HF).

Waiting for a free worker is asyncio (no thread held); the pipe round trip runs in a
small thread pool of its own, one thread per worker, so it never takes the threads the
rest of the service uses. The pool is not bound to one event loop (tests share one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import types
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from typing import TypeVar

from PIL import Image

from app.errors import IntakeWorkerCrashed, OCRError, RenderTimeout, ShuttingDown, rebuild_error
from app.intake.document import EncodedPage, IntakeLimits
from app.intake.sniff import DocType
from app.intake.worker import (
    Failed,
    Handler,
    Opened,
    OpenRequest,
    PageRequest,
    RenderedPixels,
    RenderedPng,
    Reply,
    Request,
    handle,
    pixels_to_image,
    serve,
)

log = logging.getLogger(__name__)

_R = TypeVar("_R")

_DIR_PREFIX = "lightonocr-intake-"
# How long close() waits for workers to finish their page and exit before killing them.
_CLOSE_GRACE_S = 5.0


def _context() -> ForkServerContext | SpawnContext:
    """forkserver: workers fork from a small server that already imported intake (fast replacement).

    Never plain fork: the service process has threads (the event loop's helpers), and forking those is unsafe.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["app.intake.worker"])
        return context
    return multiprocessing.get_context("spawn")


@dataclass(eq=False)
class _Worker:
    """One worker process and the main process's end of its pipe; `None` until started (or after it died)."""

    slot: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    pages: int = 0  # requests served by this process


@dataclass(eq=False)
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[_Worker] = field(init=False)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()


class IntakePool:
    """N intake worker processes; `open` a document, then ask for its pages (`PooledDocument`)."""

    def __init__(
        self, workers: int, *, handler: Handler = handle, tmp_dir: str | None = None, timeout_s: float | None = None
    ) -> None:
        if workers < 1:
            raise ValueError("an intake pool needs at least one worker")
        self.size = workers
        self.timeout_s = timeout_s  # per request (a page, or opening a document); None: no bound
        self._handler = handler
        self._context = _context()
        _remove_stale_dirs(tmp_dir)
        self.directory = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-", dir=tmp_dir)
        self._workers = [_Worker(slot) for slot in range(workers)]
        self._idle: deque[_Worker] = deque(self._workers)
        self._waiters: deque[_Waiter] = deque()
        self._lock = threading.Lock()  # idle workers and waiters (touched from threads and any loop)
        self._start_lock = threading.Lock()  # one process start at a time
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="intake-pipe")
        self._closed = False
        self.crashes = 0

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start every worker now (blocking: run it in a thread); otherwise each starts on first use."""
        for worker in self._workers:
            self._ensure_started(worker)

    def pids(self) -> list[int]:
        """The live workers' process ids (tests and the operator's `kill`)."""
        return [w.process.pid for w in self._workers if w.process is not None and w.process.pid is not None]

    def close(self) -> None:
        """Stop the workers (blocking): each finishes its page, sees its pipe closed and exits; the stuck are killed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle = list(self._idle)
            self._idle.clear()
            waiters = list(self._waiters)
            self._waiters.clear()
        for waiter in waiters:
            waiter.loop.call_soon_threadsafe(_fail, waiter.future)
        for worker in idle:
            if worker.conn is not None:
                worker.conn.close()
        # Busy workers answer their page, are closed at check-in and exit; past the grace they are killed
        # (their caller then sees a crash), so close() never hangs on a stuck page.
        deadline = time.monotonic() + _CLOSE_GRACE_S
        for worker in self._workers:
            if worker.process is not None:
                worker.process.join(max(0.0, deadline - time.monotonic()))
                if worker.process.is_alive():
                    log.warning("intake worker %s did not exit; killing it", worker.process.pid)
                    worker.process.kill()
                    worker.process.join(_CLOSE_GRACE_S)
        self._threads.shutdown(wait=True)
        for worker in self._workers:
            if worker.process is not None:
                worker.process.close()
                worker.process = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def _ensure_started(self, worker: _Worker) -> None:
        """A live process for `worker`'s slot, starting one if it has none or its process died (reaped here)."""
        if worker.process is not None and worker.process.exitcode is None:
            return
        self._reap(worker)
        if self._closed:
            raise _shutting_down()
        with self._start_lock:
            parent, child = self._context.Pipe(duplex=True)
            process = self._context.Process(
                target=serve, args=(child, self._handler), name=f"lightonocr-intake-{worker.slot}", daemon=True
            )
            with _without_main_module():
                process.start()
            child.close()  # only the worker holds its end: its death is EOF here
        worker.process, worker.conn, worker.pages = process, parent, 0

    def _replace(self, worker: _Worker) -> None:
        """Start the dead worker's successor now, so the next page does not wait for it (a failure: on next use)."""
        if self._closed:
            return
        try:
            self._ensure_started(worker)
        except Exception:
            log.exception("could not start a replacement intake worker; retrying on next use")

    def _kill_stuck(self, worker: _Worker) -> None:
        """A worker past INTAKE_TIMEOUT_S: SIGKILL (PDFium cannot be interrupted otherwise), reap, replace."""
        pid = worker.process.pid if worker.process is not None else None
        log.warning("intake worker %s held a request for more than %g s: killing it", pid, self.timeout_s)
        if worker.process is not None:
            worker.process.kill()
        self._reap(worker)
        self._replace(worker)

    def _reap(self, worker: _Worker) -> None:
        if worker.conn is not None:
            worker.conn.close()
            worker.conn = None
        if worker.process is not None:
            worker.process.join(1.0)
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join()
            worker.process.close()
            worker.process = None

    # -- workers in and out ----------------------------------------------------------------

    async def _checkout(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise _shutting_down()
            if self._idle:
                return self._idle.popleft()
            waiter = _Waiter(asyncio.get_running_loop())
            self._waiters.append(waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._checkin(waiter.future.result())  # handed over just as we were cancelled: pass it on
            raise

    def _checkin(self, worker: _Worker) -> None:
        """A worker is free: to the first waiter still waiting (on its own loop), else idle."""
        with self._lock:
            if self._closed:
                if worker.conn is not None:
                    worker.conn.close()
                return
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.loop.call_soon_threadsafe(self._hand_over, waiter, worker)
                return
            self._idle.append(worker)

    def _hand_over(self, waiter: _Waiter, worker: _Worker) -> None:
        if waiter.future.done():  # the waiter was cancelled meanwhile
            self._checkin(worker)
        else:
            waiter.future.set_result(worker)

    async def call(self, request: Request) -> Reply:
        """One request on a free worker; a worker that dies meanwhile raises `IntakeWorkerCrashed` (and is replaced).

        Cancelling the caller does not interrupt the worker: its thread waits for the answer and frees the worker.
        """
        worker = await self._checkout()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._round_trip, worker, request)

    def _round_trip(self, worker: _Worker, request: Request) -> Reply:
        try:
            try:
                self._ensure_started(worker)
                assert worker.conn is not None
                worker.conn.send(request)
            except (BrokenPipeError, ConnectionError, EOFError):
                # Died idle (killed between pages): it never held this request, so a fresh one takes it. Its
                # exit status may not have reached us yet (the forkserver reports it): reap it for sure first.
                self._reap(worker)
                self._ensure_started(worker)
                assert worker.conn is not None
                worker.conn.send(request)
            try:
                if self.timeout_s is not None and not worker.conn.poll(self.timeout_s):
                    self._kill_stuck(worker)
                    raise RenderTimeout(
                        f"rendering this page took longer than {self.timeout_s:g} s (INTAKE_TIMEOUT_S); the worker "
                        "rendering it was stopped and replaced",
                        timeout_s=self.timeout_s,
                    )
                reply: Reply = worker.conn.recv()
            except (EOFError, OSError):
                pid = worker.process.pid if worker.process is not None else None
                code = _exit_code(worker)
                self.crashes += 1
                log.error("intake worker %s died holding a request (exit code %s); replacing it", pid, code)
                self._reap(worker)
                self._replace(worker)
                raise IntakeWorkerCrashed(
                    "the process rendering this page died (a document that crashes the renderer, "
                    "or the process was killed); it was replaced",
                    exit_code=code,
                ) from None
            worker.pages += 1
            return reply
        finally:
            self._checkin(worker)

    # -- documents ---------------------------------------------------------------------------

    async def open(self, data: bytes, *, limits: IntakeLimits, password: str | None = None) -> PooledDocument:
        """Write `data` once to a temp file, open it in a worker (type, page count, password, limits checked there)."""
        path = os.path.join(self.directory, uuid.uuid4().hex)
        await asyncio.to_thread(_write_private, path, data)
        try:
            reply = await self.call(OpenRequest(path=path, password=password, limits=limits))
            opened = _expect(reply, Opened)
        except BaseException:
            await asyncio.to_thread(_unlink, path)
            raise
        return PooledDocument(self, path, password, limits, DocType(opened.doc_type), opened.page_count)


class PooledDocument:
    """A document opened in the pool: pages rendered by workers; `close` removes its temp file.

    It is a `Document` too (`render`, blocking, for callers in a thread such as the web page's previews).
    """

    def __init__(
        self,
        pool: IntakePool,
        path: str,
        password: str | None,
        limits: IntakeLimits,
        doc_type: DocType,
        page_count: int,
    ) -> None:
        self._pool = pool
        self._path = path
        self._password = password
        self._limits = limits
        self.doc_type = doc_type
        self.page_count = page_count
        self._loop = asyncio.get_running_loop()

    async def page(self, index: int, *, png_min_side: int | None) -> EncodedPage | Image.Image:
        """Page `index`: the PNG an engine sends (padded to `png_min_side`), or an RGB image when that is None."""
        request = PageRequest(self._path, self._password, self._limits, index, png_min_side)
        reply = await self._pool.call(request)
        if png_min_side is None:
            return pixels_to_image(_expect(reply, RenderedPixels))
        png = _expect(reply, RenderedPng)
        return EncodedPage(png=png.png, size=png.size)

    def _from_thread(self, index: int, png_min_side: int | None) -> EncodedPage | Image.Image:
        future = asyncio.run_coroutine_threadsafe(self.page(index, png_min_side=png_min_side), self._loop)
        return future.result()

    def render(self, index: int) -> Image.Image:
        """Blocking (call it in a thread, never on the loop): page `index` as an RGB image."""
        image = self._from_thread(index, None)
        assert isinstance(image, Image.Image)
        return image

    def render_png(self, index: int) -> EncodedPage:
        """Blocking (call it in a thread): page `index` as the exact PNG the model is sent, unpadded."""
        page = self._from_thread(index, 1)
        assert isinstance(page, EncodedPage)
        return page

    def close(self) -> None:
        """Remove the temp file; workers drop their open copy at their next request."""
        _unlink(self._path)


def _expect(reply: Reply, kind: type[_R]) -> _R:
    if isinstance(reply, Failed):
        raise rebuild_error(reply.code, reply.message, reply.details)
    if not isinstance(reply, kind):
        raise OCRError(f"intake worker answered {type(reply).__name__}, expected {kind.__name__}")
    return reply


@contextlib.contextmanager
def _without_main_module() -> Iterator[None]:
    """Start a worker without it re-importing the program that started us (multiprocessing's default).

    A spawned or forkserver child imports the parent's `__main__` (uvicorn's, the CLI's, pytest's, a script's)
    before it runs: seconds of imports per worker for nothing it needs, and a script without an
    `if __name__ == "__main__"` guard would run again in every worker. multiprocessing reads `__main__` only
    to describe it to the child (`spawn.get_preparation_data`), so a bare module stands in while a worker
    starts (under `_start_lock`); workers import only app.intake.worker and their handler's module.
    """
    real = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = real


def _remove_stale_dirs(tmp_dir: str | None) -> None:
    """Temp dirs left by a service process that was killed (kill -9 skips close()): their documents go now."""
    parent = tmp_dir or tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            pid = entry.name.removeprefix(_DIR_PREFIX).split("-", 1)[0]
            if not entry.name.startswith(_DIR_PREFIX) or not pid.isdigit() or _alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid == os.getuid():
                    shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _exit_code(worker: _Worker) -> int | None:
    if worker.process is None:
        return None
    worker.process.join(1.0)  # the pipe closes as the process dies; its exit status follows at once
    return worker.process.exitcode


def _shutting_down() -> OCRError:
    return ShuttingDown("the service is shutting down")


def _fail(future: asyncio.Future[_Worker]) -> None:
    if not future.done():
        future.set_exception(_shutting_down())
