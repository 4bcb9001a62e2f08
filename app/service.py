"""The OCR core: document bytes in, `DocumentResult` out.

`OCRService` owns the engine's life cycle and readiness, and runs documents
through intake → engine → post-processing. The HTTP API and the CLI are thin
faces over it; nothing here knows about FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import partial

import anyio

from app.blocks import parse_blocks
from app.engines import Engine, Sampling, build_engine
from app.errors import EngineNotReady, EngineUnavailable, TooManyPages
from app.intake import Document, IntakeLimits, open_document, parse_page_selection
from app.postprocess import repair_escaped_dollars
from app.results import DocumentResult, PageResult
from app.settings import Settings

log = logging.getLogger(__name__)

PAGE_SEPARATOR = "\n\n"


class OCRService:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine if engine is not None else build_engine(settings)
        self._startup: asyncio.Task[None] | None = None
        self._limits = IntakeLimits(max_image_pixels=settings.max_image_pixels)

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

    def default_sampling(self) -> Sampling:
        return Sampling(
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
            max_new_tokens=self.settings.max_new_tokens,
        )

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

    async def recognize(self, data: bytes, *, pages: str | None = None, password: str | None = None) -> DocumentResult:
        self.check_started()
        document = await self.open(data, password=password)
        try:
            indices = self.select_pages(document, pages)
            results = await self.recognize_pages(document, indices)
        finally:
            await anyio.to_thread.run_sync(document.close)
        return self.assemble(results)

    async def recognize_pages(self, document: Document, indices: list[int]) -> list[PageResult]:
        """Recognise pages concurrently, rendering each only when a window slot is free."""
        window = asyncio.Semaphore(self.engine.info().max_pages_in_flight)
        sampling = self.default_sampling()

        async def one(index: int) -> PageResult:
            async with window:
                return await self.recognize_page(document, index, sampling)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(index)) for index in indices]
        except BaseExceptionGroup as failure:
            raise failure.exceptions[0] from None
        return [task.result() for task in tasks]

    async def recognize_page(self, document: Document, index: int, sampling: Sampling) -> PageResult:
        started = time.perf_counter()
        image = await anyio.to_thread.run_sync(document.render, index)
        width, height = image.size
        generation = await self.engine.recognize(image, sampling)
        return PageResult(
            page=index + 1,
            text=repair_escaped_dollars(generation.text),
            width=width,
            height=height,
            finish_reason=generation.finish_reason,
            tokens=generation.tokens,
            seconds=round(time.perf_counter() - started, 4),
        )

    def assemble(self, pages: list[PageResult]) -> DocumentResult:
        return DocumentResult(
            text=PAGE_SEPARATOR.join(page.text for page in pages),
            blocks=[block for page in pages for block in parse_blocks(page.text, page.page)],
            model_version=self.settings.model_version,
            pages=pages,
        )
