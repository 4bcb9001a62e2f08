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
import io
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

import anyio
from PIL import Image

from app.admission import Admission, FairScheduler, Ticket
from app.engines import Engine, Sampling, build_engine
from app.engines.base import SendsPng, startup_status
from app.errors import (
    DocumentFailed,
    EngineUnavailable,
    ModeNotSupported,
    OCRError,
    RequestTimeout,
    ServiceUnavailable,
    TooManyPages,
    rebuild_error,
)
from app.events import ErrorEvent, ErrorInfo, Event, PageEvent, ProgressEvent, ResultEvent, StartEvent
from app.grounding import ParsedPage, inline_pictures, read_grounding, read_plain
from app.intake import Document, EncodedPage, IntakeLimits, open_document, parse_page_selection
from app.intake.pool import IntakePool, PooledDocument
from app.metrics import Metrics
from app.postprocess import repair_escaped_dollars
from app.profiles import GROUNDING_PROMPT, ActiveProfile, active_profile
from app.quality import is_repetitive
from app.results import DocumentResult, FinishedPage, Generation, PageError, PageResult, PageStatus, ReadOptions
from app.settings import Settings, short_model_name

log = logging.getLogger(__name__)

PAGE_SEPARATOR = "\n\n"
PLAIN = ReadOptions()  # the default: markdown, as the model writes it
ANONYMOUS = "anonymous"


@dataclass
class AdmittedDocument:
    """A document admitted for recognition: opened, pages selected, capacity reserved (not a durable job)."""

    document: Document
    indices: list[int]  # 0-based page indices, in document order
    ticket: Ticket
    options: ReadOptions = PLAIN

    @property
    def total(self) -> int:
        return len(self.indices)

    @property
    def numbers(self) -> list[int]:
        """The selected pages, 1-based, as every face shows them."""
        return [index + 1 for index in self.indices]


class OCRService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        metrics: Metrics | None = None,
        intake: IntakePool | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine if engine is not None else build_engine(settings)
        # Intake in worker processes (INTAKE_WORKERS > 0), or in threads of this process (0). A pool passed in
        # (tests share one) belongs to the caller; one built here is started and closed with the service.
        self._own_intake = intake is None and settings.intake_worker_count > 0
        self.intake = (
            IntakePool(settings.intake_worker_count, timeout_s=settings.intake_timeout_s)
            if self._own_intake
            else intake
        )
        # An engine that sends PNGs (vLLM) gets them encoded by the worker, padded to its smallest side.
        self._png_engine = self.engine if isinstance(self.engine, SendsPng) else None
        self._intake_start: asyncio.Task[None] | None = None
        self._startup: asyncio.Task[None] | None = None
        self._profile: tuple[str, ActiveProfile] | None = None
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
        self.metrics.track_endpoints(lambda: self.engine.info().endpoints)

    @property
    def profile(self) -> ActiveProfile:
        """The model's profile (app/profiles.py): page size and first-attempt sampling.

        Looked up by MODEL_NAME, or by the name the engine found served once started (an engine may
        define a `served_model` attribute, None until it knows), and again only when that name changes.
        """
        served: str | None = getattr(self.engine, "served_model", None)
        model = served or self.settings.model_name
        if self._profile is None or self._profile[0] != model:
            self._profile = (model, active_profile(self.settings, model))
        return self._profile[1]

    @property
    def _limits(self) -> IntakeLimits:
        return IntakeLimits(max_image_pixels=self.settings.max_image_pixels, longest_edge=self.profile.longest_edge)

    # -- life cycle ----------------------------------------------------------------------

    async def start(self, *, wait: bool = False) -> None:
        """Start the engine in the background so probes answer while weights load (and the intake workers)."""
        if self._own_intake and self.intake is not None:
            self._intake_start = asyncio.create_task(asyncio.to_thread(self.intake.start), name="intake-start")
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
        if self._own_intake and self.intake is not None:
            if self._intake_start is not None:
                with contextlib.suppress(Exception):
                    await self._intake_start  # a start in progress finishes first (it runs in a thread)
            await asyncio.to_thread(self.intake.close)

    def check_started(self) -> None:
        retry_after = self.settings.retry_after_s
        if self._startup is None or not self._startup.done():
            # The engine says what it is doing (loading, downloading, waiting for the hub).
            kind, message = startup_status(self.engine)
            raise kind(message, retry_after=retry_after)
        if self._startup.cancelled():
            raise EngineUnavailable("the engine was stopped", retry_after=retry_after)
        if (exc := self._startup.exception()) is not None:
            raise EngineUnavailable(f"the engine failed to start: {exc}", retry_after=retry_after)

    async def check_ready(self) -> None:
        """Raise a `ServiceUnavailable` unless a page sent now would be served."""
        self.check_started()
        self.check_intake()
        await self.engine.check_health()

    def check_intake(self) -> None:
        """The intake workers this service starts must be up: a page sent before would wait for them."""
        task = self._intake_start
        if task is None:
            return
        if not task.done():
            raise ServiceUnavailable("the intake workers are starting", retry_after=self.settings.retry_after_s)
        if not task.cancelled() and (exc := task.exception()) is not None:
            raise ServiceUnavailable(
                f"the intake workers could not start: {exc}", retry_after=self.settings.retry_after_s
            )

    # -- admission -----------------------------------------------------------------------

    def check_options(self, options: ReadOptions) -> None:
        """Refuse what this model cannot do: grounding needs a generation-3 model (its profile says)."""
        profile = self.profile
        if options.mode == "grounding" and not profile.supports_grounding:
            model = self._profile[0] if self._profile is not None else self.settings.model_name
            raise ModeNotSupported(
                f"mode=grounding needs a generation-3 model (LightOnOCR-3); {model} (profile {profile.row.name}, "
                f"generation {profile.row.generation}) has no grounding mode. Use mode=plain.",
                model=model,
                profile=profile.row.name,
            )

    def select_pages(self, document: Document, selection: str | None) -> list[int]:
        """0-based indices of the pages `selection` names (the `pages` field as sent, e.g. '1-3,7'; None: all)."""
        indices = parse_page_selection(selection, document.page_count)
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
        done: frozenset[int] = frozenset(),
        options: ReadOptions = PLAIN,
    ) -> AsyncIterator[AdmittedDocument]:
        """Open, select and reserve capacity, or refuse at once; always releases both.

        `charge_rate=False` is for work already charged to the client's rate (a job, at submit time).
        `done` (1-based page numbers, a resumed job's stored pages) are not reserved: only the
        pages still to run count against the limits.
        """
        self.check_options(options)
        self.check_started()
        async with self.opened(data, pages=pages, password=password) as (document, indices):
            todo = sum(1 for index in indices if index + 1 not in done)
            ticket = await self.admission.acquire(client, todo, charge_rate=charge_rate)
            try:
                yield AdmittedDocument(document=document, indices=indices, ticket=ticket, options=options)
            finally:
                ticket.close()

    @contextlib.asynccontextmanager
    async def opened(
        self, data: bytes, *, pages: str | None = None, password: str | None = None
    ) -> AsyncIterator[tuple[Document, list[int]]]:
        """The document opened (in a thread) with its selected page indices; closed however the block ends.

        Every face opens documents through here: `admit`, `check_admission`, the web page's previews and a job's
        page images.
        """
        document: Document
        if self.intake is not None:
            document = await self.intake.open(data, limits=self._limits, password=password)
        else:
            document = await anyio.to_thread.run_sync(
                partial(open_document, data, limits=self._limits, password=password)
            )
        try:
            yield document, self.select_pages(document, pages)
        finally:
            await anyio.to_thread.run_sync(document.close)

    async def check_admission(
        self,
        data: bytes,
        *,
        pages: str | None = None,
        password: str | None = None,
        client: str = ANONYMOUS,
        options: ReadOptions = PLAIN,
    ) -> list[int]:
        """Admit-only, for a job's submit: refuse now what would be refused, charge the rate, reserve nothing.

        Answers the selected page numbers (1-based). The engine need not be ready: the job waits for it.
        """
        self.check_options(options)
        async with self.opened(data, pages=pages, password=password) as (_, indices):
            pass
        (await self.admission.acquire(client, len(indices))).close()
        return [index + 1 for index in indices]

    # -- recognition: one call per intent -----------------------------------------------

    async def recognize(
        self,
        data: bytes,
        *,
        pages: str | None = None,
        password: str | None = None,
        client: str = ANONYMOUS,
        options: ReadOptions = PLAIN,
    ) -> DocumentResult:
        """Admit and run a document to its result (the JSON API)."""
        async with self.admit(data, pages=pages, password=password, client=client, options=options) as admitted:
            return await self.run(admitted)

    async def run(
        self,
        admitted: AdmittedDocument,
        *,
        on_page: Callable[[FinishedPage], None] | None = None,
        request_timeout: bool = True,
    ) -> DocumentResult:
        """Run an admitted document to its result; `on_page` sees each page as it finishes (progress bars)."""
        done: list[FinishedPage] = []
        async with contextlib.aclosing(self._pages(admitted, request_timeout)) as pages:
            async for page in pages:
                done.append(page)
                if on_page is not None:
                    on_page(page)
        return await anyio.to_thread.run_sync(self.assemble, done)

    async def events(self, admitted: AdmittedDocument, *, request_timeout: bool = True) -> AsyncGenerator[Event, None]:
        """Run an admitted document as events (`app/events.py`); failures end it with an `error` event.

        Closing the generator cancels the pages not yet done.
        """
        yield StartEvent(total=admitted.total, pages=admitted.numbers)
        done: list[FinishedPage] = []
        try:
            async with contextlib.aclosing(self._pages(admitted, request_timeout)) as pages:
                async for page in pages:
                    done.append(page)
                    yield PageEvent(page=page.result, blocks=page.blocks)
                    yield ProgressEvent(done=len(done), total=admitted.total)
            result = await anyio.to_thread.run_sync(self.assemble, done)
        except OCRError as exc:
            yield ErrorEvent(error=ErrorInfo.of(exc))
            return
        yield ResultEvent(result=result)

    async def _pages(self, admitted: AdmittedDocument, request_timeout: bool) -> AsyncGenerator[FinishedPage, None]:
        """Pages as they finish, within REQUEST_TIMEOUT_S, with the engine-outage rule applied.

        The rule: when the engine becomes unavailable mid-document, the pages that finished are kept and every
        other page fails with the engine's error, so `assemble` answers `partial` (or fails whole by
        MAX_FAILED_PAGE_RATIO, with the engine's own error when no page finished). Jobs do not use this: they
        wait for the engine and resume.
        """
        timeout = self.settings.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout if request_timeout else None
        finished: set[int] = set()
        pages = self.iter_pages(admitted)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        page = await anext(pages)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise RequestTimeout(
                        f"the document was not finished within {timeout:g}s (REQUEST_TIMEOUT_S): "
                        f"{len(finished)} of {admitted.total} pages done",
                        pages_done=len(finished),
                        pages_total=admitted.total,
                    ) from None
                except ServiceUnavailable as exc:
                    left = [number for number in admitted.numbers if number not in finished]
                    log.warning("engine unavailable mid-document: %d page(s) failed with %s", len(left), exc.code)
                    for number in left:
                        yield FinishedPage(_failed_page(number, exc, time.perf_counter(), attempts=0, quiet=True), [])
                    return
                finished.add(page.page)
                yield page
        finally:
            await pages.aclose()

    async def iter_pages(
        self, admitted: AdmittedDocument, *, skip: frozenset[int] = frozenset()
    ) -> AsyncGenerator[FinishedPage, None]:
        """Yield pages as they finish (any order). Closing the iterator cancels pages not yet done.

        Pages are rendered only once they hold an engine slot, so memory is bounded
        by the scheduler's slots, not by the document's length. A failed page is
        yielded with status `failed`; an unavailable engine raises (`ServiceUnavailable`):
        the faces apply the outage rule (`_pages`), the job runner waits and resumes.
        `skip`: page numbers already done (a resumed job).
        """
        results: asyncio.Queue[FinishedPage | BaseException] = asyncio.Queue()
        todo = [index for index in admitted.indices if index + 1 not in skip]

        async def one(index: int) -> None:
            try:
                async with self.scheduler.slot(admitted.ticket.client):
                    page = await self.recognize_page(admitted.document, index, admitted.options)
            except BaseException as exc:  # handed to the consumer, which decides
                results.put_nowait(exc)
                raise
            admitted.ticket.release()
            self.metrics.observe_page(page.result)
            results.put_nowait(page)

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

    async def recognize_page(self, document: Document, index: int, options: ReadOptions = PLAIN) -> FinishedPage:
        """Render, then generate with the temperature ladder until a clean attempt."""
        started = time.perf_counter()
        number = index + 1
        image: Image.Image | EncodedPage
        try:
            if isinstance(document, PooledDocument):
                min_side = self._png_engine.png_min_side if self._png_engine is not None else None
                image = await document.page(index, png_min_side=min_side)
            else:
                image = await anyio.to_thread.run_sync(document.render, index)
        except OCRError as exc:
            return FinishedPage(_failed_page(number, exc, started, attempts=0), [])
        width, height = image.size
        profile = self.profile
        temperatures = [profile.temperature, *self.settings.retry_temperatures]
        best: tuple[int, Generation] | None = None
        attempts = 0
        for temperature in temperatures:
            prompt = GROUNDING_PROMPT if options.mode == "grounding" else None
            sampling = Sampling(temperature, profile.top_p, self.settings.max_new_tokens, prompt=prompt)
            attempts += 1
            try:
                if isinstance(image, EncodedPage):
                    assert self._png_engine is not None  # PNGs are asked for only for such an engine
                    generation = await self._png_engine.recognize_png(image, sampling)
                else:
                    generation = await self.engine.recognize(image, sampling)
            except ServiceUnavailable:
                raise
            except OCRError as exc:
                if best is None:
                    return FinishedPage(_failed_page(number, exc, started, attempts, width, height), [])
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
        # Blocks are parsed (and pictures cropped) once, now, off the event loop; they travel (and are stored)
        # with the page.
        parsed = await anyio.to_thread.run_sync(_read_page, kept.text, number, image, options)
        result = PageResult(
            page=number,
            text=parsed.text,
            width=width,
            height=height,
            finish_reason=kept.finish_reason,
            tokens=kept.tokens,
            seconds=round(time.perf_counter() - started, 4),
            status=status,
            attempts=attempts,
            warnings=parsed.warnings,
        )
        return FinishedPage(result, parsed.blocks)

    def assemble(self, finished: list[FinishedPage]) -> DocumentResult:
        """Order pages, apply MAX_FAILED_PAGE_RATIO, and build the document's text and blocks.

        Pure and quick (no parsing): callers on the event loop with long documents run it in a thread.
        """
        finished = sorted(finished, key=lambda page: page.page)
        pages = [page.result for page in finished]
        failed = [page for page in pages if page.status == "failed"]
        if failed and len(failed) / len(pages) > self.settings.max_failed_page_ratio:
            raise self._document_failure(failed, len(pages))
        return DocumentResult(
            status="ok" if all(page.status in ("ok", "retried") for page in pages) else "partial",
            text=PAGE_SEPARATOR.join(page.text for page in pages if page.status != "failed"),
            blocks=[block for page in finished for block in page.blocks],
            model_version=short_model_name(self.engine.info().model),
            pages=pages,
            failed_pages=[page.page for page in failed],
        )

    def _document_failure(self, failed: list[PageResult], total: int) -> OCRError:
        """Every page failed the same way (say, one corrupt image): that error. Otherwise `document_failed`.

        Decided from the pages' recorded errors, so a job's stored pages give the same answer as a request's.
        """
        errors = [page.error for page in failed if page.error is not None]
        if len(failed) == total and len(errors) == total and len({error.code for error in errors}) == 1:
            first = errors[0]
            return rebuild_error(first.code, first.message, first.details, retry_after=self.settings.retry_after_s)
        ratio = self.settings.max_failed_page_ratio
        return DocumentFailed(
            f"{len(failed)} of {total} pages failed (more than MAX_FAILED_PAGE_RATIO={ratio:g})",
            failed_pages=[page.page for page in failed],
            errors=sorted({error.code for error in errors}),
        )


def _read_page(text: str, number: int, image: Image.Image | EncodedPage, options: ReadOptions) -> ParsedPage:
    """The kept output as the page's markdown and blocks (grounding markers or -bbox picture boxes read)."""
    width, height = image.size
    if options.mode == "grounding":
        parsed = read_grounding(text, number, width, height, drop_headers_footers=options.drop_headers_footers)
    else:
        parsed = read_plain(text, number, width, height)
    if options.images == "inline" and any(block.picture and block.bbox for block in parsed.blocks):
        if isinstance(image, EncodedPage):
            # The worker's PNG (gray pages as L, padding right and bottom): decoded only to crop pictures.
            image = Image.open(io.BytesIO(image.png)).convert("RGB").crop((0, 0, width, height))
        parsed.blocks = inline_pictures(parsed.blocks, image)
    return parsed


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
    number: int,
    exc: OCRError,
    started: float,
    attempts: int,
    width: int | None = None,
    height: int | None = None,
    *,
    quiet: bool = False,
) -> PageResult:
    if not quiet:
        log.warning("page %d failed: %s %s", number, exc.code, exc.message)
    return PageResult(
        page=number,
        text="",
        width=width,
        height=height,
        finish_reason=None,
        tokens=0,
        seconds=round(time.perf_counter() - started, 4),
        status="failed",
        attempts=attempts,
        error=PageError(code=exc.code, message=exc.message, details=exc.details or None),
    )
