"""JobRunner with a real store and a held engine: what a resumed job counts against admission.

A job resumed after a restart has some pages already stored; only its unfinished
pages may be held against the queue bound and the client's pages in flight, or
a busy service refuses (and delays) work it has already done.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from app.admission import Ticket
from app.jobs import JobRunner, NewJob, SqliteJobStore
from app.results import FinishedPage, Generation, PageResult
from app.service import OCRService
from tests.conftest import make_settings
from tests.support.documents import make_pdf
from tests.support.engines import FakeEngine

pytestmark = pytest.mark.anyio

OWNER = "addr:10.0.0.1"
PAGES = 4
DONE = [1, 2, 3]


class HeldEngine(FakeEngine):
    """Every page waits until `release` is set; `asked` lists the pages that reached the engine."""

    def __init__(self) -> None:
        super().__init__(self._held, window=4)
        self.release = asyncio.Event()
        self.reached = asyncio.Event()

    async def _held(self, page: int) -> Generation:
        self.reached.set()
        await self.release.wait()
        return Generation(text="fresh", finish_reason="stop", tokens=1)


def finished_page(number: int) -> FinishedPage:
    text = f"stored {number}"
    result = PageResult(
        page=number,
        text=text,
        width=10,
        height=10,
        finish_reason="stop",
        tokens=1,
        seconds=0.1,
        status="ok",
        attempts=1,
    )
    return FinishedPage(result, [])


async def first_page_reached(engine: HeldEngine) -> None:
    """Wait (bounded) until a page of the job reached the engine: it was admitted."""
    async with asyncio.timeout(10):
        await engine.reached.wait()
    assert len(engine.asked) == 1


@contextlib.asynccontextmanager
async def resumed_job(
    tmp_path: Path, before: Callable[[OCRService], object] = lambda service: None, **overrides: Any
) -> AsyncIterator[tuple[OCRService, HeldEngine]]:
    """A 4-page job whose pages 1-3 a previous process finished, picked up by a fresh runner.

    `before` runs once the service is up and before the runner starts (say, to hold pages for another client).
    """
    store = SqliteJobStore(tmp_path / "jobs.db", ttl_s=3600, max_bytes=10**7)
    new = NewJob(owner=OWNER, pages=list(range(1, PAGES + 1)), pages_spec=None, password=None, callback_url=None,
                 filename=None)  # fmt: skip
    await store.create(new, make_pdf(PAGES, (100, 130)))
    leases = await store.claim("previous-process", limit=len(DONE), lease_s=30)
    for lease in leases:
        assert (await store.complete(lease, finished_page(lease.page))).accepted
    assert [lease.page for lease in leases] == DONE
    engine = HeldEngine()
    service = OCRService(make_settings(model_source="vllm", **overrides), engine=engine)
    await service.start(wait=True)
    before(service)
    runner = JobRunner(service, store, concurrency=1)
    await runner.start()
    try:
        yield service, engine
    finally:
        engine.release.set()
        await runner.stop()
        await service.close()


async def test_a_resumed_job_holds_only_its_unfinished_pages(tmp_path: Path) -> None:
    async with resumed_job(tmp_path) as (service, engine):
        await first_page_reached(engine)
        assert service.admission.queued == PAGES - len(DONE)


async def test_a_busy_service_still_admits_a_resumed_job_whose_unfinished_pages_fit(tmp_path: Path) -> None:
    """MAX_QUEUED_PAGES=2 with one page held by another client: the job's one unfinished page fits.

    Counting its finished pages too (1 + 4 > 2) would refuse it with `overloaded` and keep it waiting.
    """
    held: list[Ticket] = []
    async with resumed_job(tmp_path, lambda service: held.append(service.admission.admit("addr:other", 1)),
                           max_queued_pages=2) as (service, engine):  # fmt: skip
        await first_page_reached(engine)
        assert service.admission.queued == 2
    held[0].close()


async def test_a_client_limit_counts_only_the_unfinished_pages(tmp_path: Path) -> None:
    """KEY_MAX_PAGES_IN_FLIGHT=2 and the owner has one page in flight elsewhere: one more page fits, four would not."""
    held: list[Ticket] = []
    async with resumed_job(tmp_path, lambda service: held.append(service.admission.admit(OWNER, 1)),
                           key_max_pages_in_flight=2) as (service, engine):  # fmt: skip
        await first_page_reached(engine)
        assert service.admission.queued == 2
    held[0].close()
