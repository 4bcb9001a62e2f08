"""OCRService on its own, with a scripted engine: the retry ladder's policies and the document's assembly.

The engine double is passed through `OCRService(engine=...)`, so every attempt's
outcome is chosen by the test: no HTTP, no model, no timing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest
from PIL import Image

from app.blocks import parse_blocks
from app.engines import Sampling
from app.errors import (
    CorruptDocument,
    DocumentFailed,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    OCRError,
)
from app.intake import DocType
from app.results import FinishedPage, Generation, PageError, PageResult, PageStatus
from app.service import OCRService
from tests.conftest import make_settings
from tests.support.documents import make_pdf, make_png, page_id_of
from tests.support.engines import Outcome, ScriptedEngine

pytestmark = pytest.mark.anyio

# Texts that the repetition rule (app/quality.py) does and does not flag.
CLEAN = "# Title\n\nA page that ends normally."
LOOP = "intro\n" + "\n".join(["the same line"] * 12)


def clean(text: str = CLEAN, tokens: int = 10) -> Generation:
    return Generation(text=text, finish_reason="stop", tokens=tokens)


def repetitive(text: str = LOOP, tokens: int = 20) -> Generation:
    """Stopped on its own, but loops."""
    return Generation(text=text, finish_reason="stop", tokens=tokens)


def truncated(text: str = "cut off mid", tokens: int = 30) -> Generation:
    return Generation(text=text, finish_reason="length", tokens=tokens)


def truncated_loop(tokens: int = 40) -> Generation:
    return Generation(text=LOOP, finish_reason="length", tokens=tokens)


async def started(engine: ScriptedEngine, **overrides: Any) -> OCRService:
    values: dict[str, Any] = {"model_source": "vllm", "retry_temperatures": [0.4, 0.7], **overrides}
    service = OCRService(make_settings(**values), engine=engine)
    await service.start(wait=True)
    return service


async def one_page(outcomes: Sequence[Outcome], **overrides: Any) -> tuple[PageResult, ScriptedEngine]:
    engine = ScriptedEngine(outcomes)
    service = await started(engine, **overrides)
    try:
        result = await service.recognize(make_png(300, 400))
    finally:
        await service.close()
    assert engine.outcomes == [], "every scripted attempt was used"
    [page] = result.pages
    return page, engine


# --------------------------------------------------------------------------- the retry ladder


async def test_a_clean_first_attempt_is_not_retried() -> None:
    page, engine = await one_page([clean()])
    assert (page.status, page.attempts, page.text, page.finish_reason, page.tokens) == ("ok", 1, CLEAN, "stop", 10)
    assert engine.temperatures == [0.2]
    assert engine.calls[0] == Sampling(temperature=0.2, top_p=0.9, max_new_tokens=4096)


async def test_retries_climb_the_temperatures_until_a_clean_attempt() -> None:
    page, engine = await one_page([truncated(), clean("second try")])
    assert (page.status, page.attempts, page.text) == ("retried", 2, "second try")
    assert engine.temperatures == [0.2, 0.4]


async def test_retries_use_the_configured_temperatures_in_order() -> None:
    page, engine = await one_page(
        [truncated(), truncated(), truncated(), clean("fourth")], temperature=0.1, retry_temperatures=[0.3, 0.5, 0.9]
    )
    assert (page.status, page.attempts, page.text) == ("retried", 4, "fourth")
    assert engine.temperatures == [0.1, 0.3, 0.5, 0.9]


async def test_no_retries_when_the_ladder_is_empty() -> None:
    page, engine = await one_page([truncated("only")], retry_temperatures=[])
    assert (page.status, page.attempts, page.text) == ("truncated", 1, "only")
    assert engine.temperatures == [0.2]


async def test_an_engine_error_on_a_retry_keeps_the_best_earlier_attempt() -> None:
    page, engine = await one_page([truncated("kept", tokens=33), EngineError("upstream said 500")])
    assert (page.status, page.attempts, page.text, page.tokens) == ("truncated", 2, "kept", 33)
    assert page.finish_reason == "length"
    assert page.error is None
    assert engine.temperatures == [0.2, 0.4], "no attempt after the error"


async def test_an_engine_error_on_a_retry_keeps_the_best_not_the_last_attempt() -> None:
    page, _ = await one_page(
        [repetitive(), truncated("worse"), EngineTimeout("too slow")], retry_temperatures=[0.4, 0.7, 0.9]
    )
    assert (page.status, page.attempts, page.text) == ("repetitive", 3, LOOP)


async def test_an_engine_error_on_the_first_attempt_fails_the_page_without_retrying() -> None:
    page, engine = await one_page([EngineError("upstream said 500")], max_failed_page_ratio=1)
    assert (page.status, page.attempts, page.text, page.tokens) == ("failed", 1, "", 0)
    assert page.error == PageError(code="engine_error", message="upstream said 500")
    assert page.finish_reason is None
    assert (page.width, page.height) == (300, 400), "the page was rendered before it failed"
    assert engine.temperatures == [0.2]


@pytest.mark.parametrize(
    ("outcomes", "status", "kept"),
    [
        # "repetitive but stopped" beats "truncated", whichever comes first.
        ([truncated("cut"), repetitive(), truncated("cut again")], "repetitive", LOOP),
        ([repetitive(), truncated("cut"), truncated("cut again")], "repetitive", LOOP),
        # "truncated" beats "truncated and repetitive", whichever comes first.
        ([truncated_loop(), truncated("cut"), truncated_loop()], "truncated", "cut"),
        ([truncated("cut"), truncated_loop(), truncated_loop()], "truncated", "cut"),
    ],
)
async def test_the_best_attempt_is_kept(outcomes: list[Outcome], status: PageStatus, kept: str) -> None:
    page, _ = await one_page(outcomes)
    assert (page.status, page.attempts, page.text) == (status, 3, kept)


async def test_truncated_and_repetitive_on_every_attempt_is_reported_repetitive() -> None:
    page, _ = await one_page([truncated_loop(41), truncated_loop(42), truncated_loop(43)])
    assert (page.status, page.attempts, page.finish_reason, page.tokens) == ("repetitive", 3, "length", 41)


@pytest.mark.parametrize("make", [truncated, repetitive])
async def test_on_a_tie_the_earliest_attempt_is_kept(make: Any) -> None:
    outcomes = [make(f"{LOOP}\nattempt {n}\n" + "\n".join(["again"] * 8), tokens=n) for n in (1, 2, 3)]
    page, _ = await one_page(outcomes)
    assert page.attempts == 3
    assert page.tokens == 1
    assert "attempt 1" in page.text


async def test_an_unavailable_engine_aborts_instead_of_failing_the_page() -> None:
    with pytest.raises(EngineUnavailable):
        await one_page([truncated(), EngineUnavailable("vLLM is unreachable", retry_after=5)])


async def test_escaped_dollars_are_repaired_before_ranking_and_in_the_kept_text() -> None:
    page, _ = await one_page([clean(r"Let \$x\$ be real.")])
    assert page.text == "Let $x$ be real."


async def test_seconds_measure_the_page() -> None:
    page, _ = await one_page([clean()])
    assert 0 < page.seconds < 4  # a scripted page takes milliseconds


# --------------------------------------------------------------------------- documents


class MarkerEngine(ScriptedEngine):
    """Answers with the page marker it sees, so results can be matched to pages whatever the order."""

    async def recognize(self, image: Image.Image, sampling: Sampling) -> Generation:
        self.calls.append(sampling)
        return clean(f"page text {page_id_of(image)}")


async def test_pages_of_a_document_are_assembled_in_order() -> None:
    engine = MarkerEngine()
    service = await started(engine)
    try:
        result = await service.recognize(make_pdf(3, (200, 260)))
    finally:
        await service.close()
    assert [page.page for page in result.pages] == [1, 2, 3]
    assert result.text == "page text 1\n\npage text 2\n\npage text 3"
    assert (result.status, result.failed_pages) == ("ok", [])
    assert [block.page for block in result.blocks] == [1, 2, 3]


def page(
    number: int, status: PageStatus = "ok", text: str | None = None, error: OCRError | None = None
) -> FinishedPage:
    """A finished page as the core hands it to `assemble`, with its blocks parsed from its text."""
    body = "" if status == "failed" else (text if text is not None else f"text {number}")
    result = PageResult(
        page=number,
        text=body,
        width=10,
        height=10,
        finish_reason=None if status == "failed" else "stop",
        tokens=0 if status == "failed" else 5,
        seconds=0.1,
        status=status,
        attempts=1,
        error=None if error is None else PageError(code=error.code, message=error.message),
    )
    return FinishedPage(result, parse_blocks(body, number))


def assembler(**overrides: Any) -> OCRService:
    return OCRService(make_settings(model_source="vllm", **overrides), engine=ScriptedEngine())


def test_assemble_sorts_pages_and_skips_failed_ones_in_the_text() -> None:
    pages = [page(3), page(1, "retried"), page(2, "failed", error=EngineError("boom")), page(4, "truncated")]
    result = assembler(max_failed_page_ratio=0.5).assemble(pages)
    assert [p.page for p in result.pages] == [1, 2, 3, 4]
    assert result.text == "text 1\n\ntext 3\n\ntext 4"
    assert result.status == "partial"
    assert result.failed_pages == [2]
    assert [block.page for block in result.blocks] == [1, 3, 4]
    assert result.model_version == "lightonocr-2-1b"


@pytest.mark.parametrize("status", ["truncated", "repetitive", "failed"])
def test_any_page_that_is_not_ok_or_retried_makes_the_document_partial(status: PageStatus) -> None:
    error = EngineError("boom") if status == "failed" else None
    result = assembler(max_failed_page_ratio=1).assemble([page(1), page(2, status, error=error), page(3, "retried")])
    assert result.status == "partial"


def test_ok_and_retried_pages_make_an_ok_document() -> None:
    assert assembler().assemble([page(1), page(2, "retried")]).status == "ok"


def test_exactly_at_the_failed_page_ratio_is_still_partial() -> None:
    failed = [page(n, "failed", error=EngineError("boom")) for n in (1, 2)]
    result = assembler(max_failed_page_ratio=0.5).assemble([*failed, page(3), page(4)])
    assert (result.status, result.failed_pages) == ("partial", [1, 2])


def test_past_the_failed_page_ratio_the_document_fails() -> None:
    failed = [page(1, "failed", error=EngineError("boom")), page(2, "failed", error=EngineTimeout("slow"))]
    failed.append(page(3, "failed", error=EngineError("boom again")))
    with pytest.raises(DocumentFailed) as caught:
        assembler(max_failed_page_ratio=0.5).assemble([*failed, page(4)])
    assert caught.value.details == {"failed_pages": [1, 2, 3], "errors": ["engine_error", "engine_timeout"]}
    assert "3 of 4 pages failed" in caught.value.message
    assert "MAX_FAILED_PAGE_RATIO=0.5" in caught.value.message


def test_a_zero_ratio_fails_on_any_failed_page() -> None:
    pages = [page(1, "failed", error=EngineError("x")), *map(page, range(2, 11))]
    with pytest.raises(DocumentFailed):
        assembler(max_failed_page_ratio=0).assemble(pages)


def test_every_page_failing_the_same_way_is_that_error() -> None:
    error = CorruptDocument("cannot render")
    with pytest.raises(CorruptDocument) as caught:
        assembler().assemble([page(1, "failed", error=error), page(2, "failed", error=CorruptDocument("also"))])
    assert caught.value.message == "cannot render"


def test_every_page_failing_in_different_ways_is_document_failed() -> None:
    pages = [page(1, "failed", error=EngineError("x")), page(2, "failed", error=EngineTimeout("y"))]
    with pytest.raises(DocumentFailed):
        assembler().assemble(pages)


def test_a_single_failed_page_is_its_own_error() -> None:
    with pytest.raises(EngineTimeout):
        assembler().assemble([page(1, "failed", error=EngineTimeout("slow"))])


def test_every_page_failing_the_same_way_keeps_its_details_and_the_retry_after() -> None:
    """A stored or streamed page error is raised again as itself: details and Retry-After included."""
    error = PageError(code="engine_unavailable", message="vLLM is down", details={"attempts": 3})
    pages = [FinishedPage(page(n, "failed").result.model_copy(update={"error": error}), []) for n in (1, 2)]
    with pytest.raises(EngineUnavailable) as caught:
        assembler(retry_after_s=17).assemble(pages)
    assert caught.value.message == "vLLM is down"
    assert caught.value.details == {"attempts": 3}
    assert caught.value.retry_after == 17


class UnrenderableDocument:
    """A document whose page cannot be rendered (say, a broken PDF page)."""

    doc_type = DocType.PDF
    page_count = 1

    def render(self, index: int) -> Image.Image:
        raise CorruptDocument(f"page {index + 1} cannot be rendered", page=index + 1)

    def close(self) -> None:
        return None


async def test_a_page_that_cannot_be_rendered_fails_without_reaching_the_engine() -> None:
    engine = ScriptedEngine()
    service = await started(engine)
    try:
        finished = await service.recognize_page(UnrenderableDocument(), 0)
    finally:
        await service.close()
    page = finished.result
    assert (page.page, page.status, page.attempts, page.text, page.tokens) == (1, "failed", 0, "", 0)
    assert (page.width, page.height, page.finish_reason) == (None, None, None)
    assert page.error == PageError(code="corrupt_document", message="page 1 cannot be rendered", details={"page": 1})
    assert 0 <= page.seconds < 60
    assert finished.blocks == []
    assert engine.calls == []


async def test_each_attempt_is_logged_and_loops_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    engine = ScriptedEngine([truncated(), truncated_loop(), truncated()])
    service = await started(engine)
    caplog.set_level(logging.INFO, logger="app.service")
    try:
        result = await service.recognize(make_png(300, 400))
    finally:
        await service.close()
    [page] = result.pages
    assert (page.width, page.height) == (300, 400)
    attempts = [record.getMessage() for record in caplog.records if " attempt " in record.getMessage()]
    assert attempts == [
        "page 1 attempt 1 at T=0.20 is truncated; retrying",
        "page 1 attempt 2 at T=0.40 is truncated and repetitive; retrying",
        "page 1 attempt 3 at T=0.70 is truncated; no attempts left",
    ]
    # One attempt looped; the two that were only cut off are not loops.
    assert service.metrics.repetitions._value.get() == 1
