"""The core's paths through `OCRService` with an engine double: one rule whatever the face."""

from __future__ import annotations

import asyncio

import pytest

from app.errors import EngineError, EngineUnavailable, OCRError, RequestTimeout
from app.events import ErrorEvent, PageEvent, ProgressEvent, ResultEvent, StartEvent
from app.results import FinishedPage, Generation
from app.service import OCRService
from tests.conftest import make_settings
from tests.support.documents import make_pdf
from tests.support.engines import FakeEngine, clean

SMALL = (200, 260)

pytestmark = pytest.mark.anyio


async def started(engine: FakeEngine, **overrides: object) -> OCRService:
    service = OCRService(make_settings(retry_temperatures=[], **overrides), engine)
    await service.start(wait=True)
    return service


@pytest.fixture
def outage() -> tuple[FakeEngine, asyncio.Event]:
    """Page 1 is read; every other page waits until page 1 is in, then finds the engine gone."""
    first_done = asyncio.Event()

    async def answer(page: int) -> Generation:
        if page == 1:
            return await clean(page)
        await first_done.wait()
        raise EngineUnavailable("the engine went away", retry_after=7)

    return FakeEngine(answer), first_done


async def test_engine_outage_mid_document_keeps_finished_pages(
    outage: tuple[FakeEngine, asyncio.Event],
) -> None:
    engine, first_done = outage
    service = await started(engine, max_failed_page_ratio=1.0)
    async with service.admit(make_pdf(3, SMALL)) as admitted:
        result = await service.run(admitted, on_page=lambda page: first_done.set())
    assert result.status == "partial"
    assert result.text == "page 1"
    assert result.failed_pages == [2, 3]
    for page in result.pages[1:]:
        assert page.error is not None
        assert page.error.code == "engine_unavailable"
    await service.close()


async def test_engine_outage_the_same_as_events(outage: tuple[FakeEngine, asyncio.Event]) -> None:
    engine, first_done = outage
    service = await started(engine, max_failed_page_ratio=1.0)
    async with service.admit(make_pdf(3, SMALL)) as admitted:
        events = []
        async for event in service.events(admitted):
            events.append(event)
            if isinstance(event, PageEvent):
                first_done.set()
    assert isinstance(events[0], StartEvent)
    pages = [event.page for event in events if isinstance(event, PageEvent)]
    assert sorted(page.page for page in pages) == [1, 2, 3]
    assert [event.done for event in events if isinstance(event, ProgressEvent)] == [1, 2, 3]
    last = events[-1]
    assert isinstance(last, ResultEvent)
    assert last.result.status == "partial"
    assert last.result.failed_pages == [2, 3]
    await service.close()


async def test_engine_outage_past_the_failure_ratio_fails_the_document(
    outage: tuple[FakeEngine, asyncio.Event],
) -> None:
    engine, first_done = outage
    service = await started(engine)  # MAX_FAILED_PAGE_RATIO=0.5: 2 of 3 failed is too many
    async with service.admit(make_pdf(3, SMALL)) as admitted:
        with pytest.raises(OCRError) as failed:
            await service.run(admitted, on_page=lambda page: first_done.set())
    assert failed.value.code == "document_failed"
    assert failed.value.details["errors"] == ["engine_unavailable"]
    await service.close()


async def test_engine_gone_for_every_page_is_the_engines_error() -> None:
    async def gone(page: int) -> Generation:
        raise EngineUnavailable("the engine went away")

    service = await started(FakeEngine(gone), retry_after_s=9)
    with pytest.raises(EngineUnavailable) as refused:
        await service.recognize(make_pdf(3, SMALL))
    assert refused.value.retry_after == 9
    await service.close()


async def test_every_page_failing_the_same_way_is_that_error_with_its_details() -> None:
    async def rejected(page: int) -> Generation:
        raise EngineError("vLLM rejected the page with HTTP 400", upstream_status=400)

    service = await started(FakeEngine(rejected))
    async with service.admit(make_pdf(2, SMALL)) as admitted:
        finished: list[FinishedPage] = []
        async for page in service.iter_pages(admitted):
            finished.append(page)
    with pytest.raises(EngineError) as direct:
        service.assemble(finished)
    assert direct.value.code == "engine_error"
    assert direct.value.details == {"upstream_status": 400}
    # The same decision from the pages as a job stores them (JSON: no exception travels with a page).
    stored = [FinishedPage(type(p.result).model_validate_json(p.result.model_dump_json()), []) for p in finished]
    with pytest.raises(EngineError) as from_store:
        service.assemble(stored)
    assert from_store.value.to_dict() == direct.value.to_dict()
    await service.close()


async def test_timeout_is_the_same_error_for_every_intent() -> None:
    hold = asyncio.Event()

    async def slow(page: int) -> Generation:
        await hold.wait()
        return await clean(page)

    service = await started(FakeEngine(slow), request_timeout_s=0.05)
    with pytest.raises(RequestTimeout) as timed_out:
        await service.recognize(make_pdf(2, SMALL))
    async with service.admit(make_pdf(2, SMALL)) as admitted:
        events = [event async for event in service.events(admitted)]
    last = events[-1]
    assert isinstance(last, ErrorEvent)
    assert last.error.model_dump() == timed_out.value.to_dict()
    assert timed_out.value.details == {"pages_done": 0, "pages_total": 2}
    hold.set()
    await service.close()


async def test_blocks_travel_with_the_page() -> None:
    async def heading(page: int) -> Generation:
        return Generation(text=f"# Title {page}\n\nBody", finish_reason="stop", tokens=3)

    service = await started(FakeEngine(heading))
    async with service.admit(make_pdf(2, SMALL)) as admitted:
        pages = [page async for page in service.iter_pages(admitted)]
    assert {page.page: [block.type for block in page.blocks] for page in pages} == {
        1: ["heading", "paragraph"],
        2: ["heading", "paragraph"],
    }
    result = service.assemble(pages)
    assert [block.page for block in result.blocks] == [1, 1, 2, 2]
    await service.close()


async def test_check_admission_answers_the_pages_and_reserves_nothing() -> None:
    service = await started(FakeEngine(), key_max_pages_in_flight=2)
    assert await service.check_admission(make_pdf(3, SMALL), pages="2-3", client="a") == [2, 3]
    assert service.admission.queued == 0
    await service.close()
