"""The OCR core: document bytes in, `DocumentResult` (or pages as they finish) out.

`OCRService` owns the engine's life cycle and readiness, admits documents
(limits, per-client fairness, overload), and runs their pages through
intake → engine → quality checks → post-processing. The HTTP API and the CLI
are thin faces over it; nothing here knows about FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

import anyio

from app.admission import Admission, FairScheduler, Ticket
from app.engines import Engine, Sampling, build_engine
from app.errors import (
    DocumentFailed,
    EngineNotReady,
    EngineUnavailable,
    OCRError,
    RequestTimeout,
    ServiceUnavailable,
    TooManyPages,
)
from app.intake import Document, IntakeLimits, open_document, parse_page_selection
from app.metrics import Metrics
from app.postprocess import repair_escaped_dollars
from app.quality import is_repetitive
from app.results import DocumentResult, Generation, PageError, PageResult, PageStatus
from app.settings import Settings

log = logging.getLogger(__name__)

PAGE_SEPARATOR = "\n\n"
ANONYMOUS = "anonymous"


@dataclass
class Job:
    """A document admitted for recognition: opened, pages selected, capacity reserved."""

    document: Document
    pages: list[int]  # 0-based indices, in document order
    ticket: Ticket

    @property
    def total(self) -> int:
        return len(self.pages)


class OCRService:
    def __init__(self, settings: Settings, engine: Engine | None = None, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.engine = engine if engine is not None else build_engine(settings)
        self._startup: asyncio.Task[None] | None = None
        self._limits = IntakeLimits(max_image_pixels=settings.max_image_pixels)
        self.admission = Admission(
            max_queued=settings.max_queued_pages,
            per_client=settings.key_max_pages_in_flight,
            pages_per_minute=settings.rate_limit_pages_per_min,
            retry_after=settings.retry_after_s,
        )
        window = self.engine.info().max_pages_in_flight
        # A few pages beyond the engine's window are rendered ahead so encoding overlaps inference.
        self.scheduler = FairScheduler(window + max(2, window // 4))
        # Injected by the app so /metrics shows it; a private one otherwise (own registry, no globals).
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.track(
            queued=lambda: self.admission.queued,
            in_flight=lambda: self.scheduler.busy,
            waiting=lambda: self.scheduler.waiting,
        )

    # -- life cycle ----------------------------------------------------------------------

    async def start(self, *, wait: bool = False) -> None:
        """Start the engine in the background so probes answer while weights load."""
        self._startup = asyncio.create_task(self.engine.start(), name="engine-start")
        self._startup.add_done_callback(self._log_startup)
        if wait:
            await self._startup

    def _log_startup(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            log.error("engine failed to start: %s", exc)
        else:
            info = self.engine.info()
            log.info("engine ready: %s, model %s on %s", info.engine, info.model, info.device)

    async def close(self) -> None:
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._startup
        await self.engine.close()

    def check_started(self) -> None:
        retry_after = self.settings.retry_after_s
        if self._startup is None or not self._startup.done():
            raise EngineNotReady("the model is still loading", retry_after=retry_after)
        if self._startup.cancelled():
            raise EngineUnavailable("the engine was stopped", retry_after=retry_after)
        if (exc := self._startup.exception()) is not None:
            raise EngineUnavailable(f"the engine failed to start: {exc}", retry_after=retry_after)

    async def check_ready(self) -> None:
        """Raise a `ServiceUnavailable` unless a page sent now would be served."""
        self.check_started()
        await self.engine.check_health()

    # -- admission -----------------------------------------------------------------------

    async def open(self, data: bytes, *, password: str | None = None) -> Document:
        return await anyio.to_thread.run_sync(partial(open_document, data, limits=self._limits, password=password))

    def select_pages(self, document: Document, pages: str | None) -> list[int]:
        indices = parse_page_selection(pages, document.page_count)
        if len(indices) > self.settings.max_pages:
            raise TooManyPages(
                f"{len(indices)} pages selected; the limit is {self.settings.max_pages} (MAX_PAGES). "
                "Send fewer pages with the `pages` field, e.g. '1-50'.",
                pages_selected=len(indices),
                max_pages=self.settings.max_pages,
            )
        return indices

    @contextlib.asynccontextmanager
    async def admit(
        self,
        data: bytes,
        *,
        pages: str | None = None,
        password: str | None = None,
        client: str = ANONYMOUS,
        charge_rate: bool = True,
    ) -> AsyncIterator[Job]:
        """Open, select and reserve capacity, or refuse at once; always releases both.

        `charge_rate=False` is for work already charged to the client's rate (a job, at submit time).
        """
        self.check_started()
        document = await self.open(data, password=password)
        try:
            indices = self.select_pages(document, pages)
            ticket = self.admission.admit(client, len(indices), charge_rate=charge_rate)
            try:
                yield Job(document=document, pages=indices, ticket=ticket)
            finally:
                ticket.close()
        finally:
            await anyio.to_thread.run_sync(document.close)

    # -- recognition ---------------------------------------------------------------------

    async def recognize(
        self, data: bytes, *, pages: str | None = None, password: str | None = None, client: str = ANONYMOUS
    ) -> DocumentResult:
        async with self.admit(data, pages=pages, password=password, client=client) as job:
            done: list[PageResult] = []
            try:
                async with asyncio.timeout(self.settings.request_timeout_s):
                    async for page in self.iter_pages(job):
                        done.append(page)
            except TimeoutError:
                raise RequestTimeout(
                    f"the document was not finished within {self.settings.request_timeout_s:g}s "
                    f"(REQUEST_TIMEOUT_S): {len(done)} of {job.total} pages done",
                    pages_done=len(done),
                    pages_total=job.total,
                ) from None
        return self.assemble(done)

    async def iter_pages(
        self, job: Job, *, skip: frozenset[int] = frozenset(), on_start: Callable[[int], None] | None = None
    ) -> AsyncGenerator[PageResult, None]:
        """Yield pages as they finish (any order). Closing the iterator cancels pages not yet done.

        Pages are rendered only once they hold an engine slot, so memory is bounded
        by the scheduler's slots, not by the document's length. A failed page is
        yielded with status `failed`; an unavailable engine aborts the document.
        """
        results: asyncio.Queue[PageResult | BaseException] = asyncio.Queue()
        todo = [index for index in job.pages if index + 1 not in skip]

        async def one(index: int) -> None:
            try:
                async with self.scheduler.slot(job.ticket.client):
                    if on_start is not None:
                        on_start(index + 1)
                    result = await self.recognize_page(job.document, index)
            except BaseException as exc:  # handed to the consumer, which decides
                results.put_nowait(exc)
                raise
            job.ticket.release()
            self.metrics.observe_page(result)
            results.put_nowait(result)

        tasks = [asyncio.create_task(one(index), name=f"page-{index + 1}") for index in todo]
        try:
            for _ in todo:
                item = await results.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await _settle(tasks)

    async def recognize_page(self, document: Document, index: int) -> PageResult:
        """Render, then generate with the temperature ladder until a clean attempt."""
        started = time.perf_counter()
        number = index + 1
        try:
            image = await anyio.to_thread.run_sync(document.render, index)
        except OCRError as exc:
            return _failed_page(number, exc, started, attempts=0)
        width, height = image.size
        temperatures = [self.settings.temperature, *self.settings.retry_temperatures]
        best: tuple[int, Generation] | None = None
        attempts = 0
        for temperature in temperatures:
            sampling = Sampling(temperature, self.settings.top_p, self.settings.max_new_tokens)
            attempts += 1
            try:
                generation = await self.engine.recognize(image, sampling)
            except ServiceUnavailable:
                raise
            except OCRError as exc:
                if best is None:
                    return _failed_page(number, exc, started, attempts, width, height)
                break
            generation = dataclasses.replace(generation, text=repair_escaped_dollars(generation.text))
            rank = _rank(generation)
            if rank in (1, 3):
                self.metrics.observe_repetition()
            if best is None or rank < best[0]:
                best = (rank, generation)
            if rank == 0:
                break
            more = "retrying" if attempts < len(temperatures) else "no attempts left"
            log.info("page %d attempt %d at T=%.2f is %s; %s", number, attempts, temperature, _RANKS[rank], more)
        assert best is not None
        rank, kept = best
        status: PageStatus = ("ok" if attempts == 1 else "retried") if rank == 0 else _RANK_STATUS[rank]
        result = PageResult(
            page=number,
            text=kept.text,
            width=width,
            height=height,
            finish_reason=kept.finish_reason,
            tokens=kept.tokens,
            seconds=round(time.perf_counter() - started, 4),
            status=status,
            attempts=attempts,
        )
        # Parse blocks now, off the event loop, instead of all at once when the document ends.
        await anyio.to_thread.run_sync(result.blocks)
        return result

    def assemble(self, pages: list[PageResult]) -> DocumentResult:
        """Order pages, apply MAX_FAILED_PAGE_RATIO, and build the document's text and blocks."""
        pages = sorted(pages, key=lambda page: page.page)
        failed = [page for page in pages if page.status == "failed"]
        if failed and len(failed) / len(pages) > self.settings.max_failed_page_ratio:
            raise _document_failure(failed, len(pages), self.settings.max_failed_page_ratio)
        return DocumentResult(
            status="ok" if all(page.status in ("ok", "retried") for page in pages) else "partial",
            text=PAGE_SEPARATOR.join(page.text for page in pages if page.status != "failed"),
            blocks=[block for page in pages for block in page.blocks()],
            model_version=self.settings.model_version,
            pages=pages,
            failed_pages=[page.page for page in failed],
        )


async def _settle(tasks: list[asyncio.Task[None]]) -> None:
    """Wait until cancelled page tasks have really finished, even if we are cancelled again meanwhile.

    `gather` would pass a second cancellation on to the tasks and cut short their own
    clean-up (httpx closing the connection, so vLLM aborts the page); and the document
    must not be closed while a page is still rendering from it.
    """
    if not tasks:
        return
    waiting = asyncio.ensure_future(asyncio.wait(tasks))
    interrupted = False
    while not waiting.done():
        try:
            await asyncio.shield(waiting)
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        raise asyncio.CancelledError


# Lower is better: a clean page, then one that stopped but loops, then truncated ones.
_RANKS = ("clean", "repetitive", "truncated", "truncated and repetitive")
_RANK_STATUS: dict[int, PageStatus] = {1: "repetitive", 2: "truncated", 3: "repetitive"}


def _rank(generation: Generation) -> int:
    repetitive = is_repetitive(generation.text)
    if generation.finish_reason == "length":
        return 3 if repetitive else 2
    return 1 if repetitive else 0


def _failed_page(
    number: int, exc: OCRError, started: float, attempts: int, width: int | None = None, height: int | None = None
) -> PageResult:
    log.warning("page %d failed: %s %s", number, exc.code, exc.message)
    result = PageResult(
        page=number,
        text="",
        width=width,
        height=height,
        finish_reason=None,
        tokens=0,
        seconds=round(time.perf_counter() - started, 4),
        status="failed",
        attempts=attempts,
        error=PageError(code=exc.code, message=exc.message),
    )
    result.exception = exc
    return result


def _document_failure(failed: list[PageResult], total: int, ratio: float) -> OCRError:
    """Every page failed the same way (say, one corrupt image): that error. Otherwise `document_failed`."""
    errors = [page.exception for page in failed if page.exception is not None]
    if len(failed) == total and errors and len({type(error) for error in errors}) == 1:
        return errors[0]
    return DocumentFailed(
        f"{len(failed)} of {total} pages failed (more than MAX_FAILED_PAGE_RATIO={ratio:g})",
        failed_pages=[page.page for page in failed],
        errors=sorted({page.error.code for page in failed if page.error is not None}),
    )
