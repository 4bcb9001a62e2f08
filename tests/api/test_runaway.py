"""Runaway generations and failing pages, end to end over HTTP.

The stub answers loops, truncations and errors on chosen pages only (it reads the
page marker off the image and counts attempts per image), so each test shows one
page's fate inside an otherwise healthy document.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from app.quality import is_repetitive
from app.settings import Settings
from tests.conftest import ServiceFactory
from tests.support.documents import make_pdf, make_png, page_id_of, small_pdf
from tests.support.http import ok, post
from tests.support.openai_stub import Reply, StubRequest, StubVLLM, describe

LOOP = "\n".join(["| 1 | total | 1 |"] * 30)  # a line cycle
WORD_LOOP = "Summary: " + " ".join(["and the"] * 60)  # a word cycle in one line


def page(body: dict[str, Any], number: int) -> dict[str, Any]:
    found: dict[str, Any] = next(p for p in body["pages"] if p["page"] == number)
    return found


class ByPage:
    """Responder: `plan(page, attempt)` for marked pages (None → the default answer); remembers each page's sha."""

    def __init__(self, plan: Callable[[int, int], Reply | None]) -> None:
        self.plan = plan
        self.sha_of: dict[int, str] = {}
        self._lock = threading.Lock()

    def __call__(self, request: StubRequest) -> Reply:
        number = page_id_of(request.image)
        assert number is not None, "every test page carries a marker"
        with self._lock:
            self.sha_of[number] = request.sha256
        return self.plan(number, request.attempt) or Reply(text=describe(request.image))

    def temperatures(self, stub: StubVLLM, number: int) -> list[float]:
        sha = self.sha_of[number]
        return [record.params.temperature for record in stub.requests if record.sha256 == sha]


# --------------------------------------------------------------------------- retries


def test_page_looping_once_is_retried_at_the_next_temperature(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    responder = ByPage(lambda n, attempt: Reply(text=LOOP, finish_reason="length") if n == 2 and attempt == 1 else None)
    stub.responder = responder
    body = ok(post(vllm_service(), small_pdf(3)))

    retried = page(body, 2)
    assert (retried["status"], retried["attempts"], retried["text"]) == ("retried", 2, "page 2")
    assert retried["finish_reason"] == "stop"
    assert responder.temperatures(stub, 2) == [0.2, 0.4]
    for number in (1, 3):
        assert (page(body, number)["status"], page(body, number)["attempts"]) == ("ok", 1)
        assert responder.temperatures(stub, number) == [0.2]
    assert body["status"] == "ok"
    assert body["failed_pages"] == []
    assert body["text"] == "page 1\n\npage 2\n\npage 3"
    assert stub.violations == []


def test_page_always_truncated_keeps_its_best_attempt(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    retries = [0.4, 0.7]

    def plan(number: int, attempt: int) -> Reply | None:
        if number != 1:
            return None
        if attempt == 2:  # truncated but not looping: the best of the three
            return Reply(text="A long table that was cut off at", finish_reason="length")
        return Reply(text=WORD_LOOP, finish_reason="length")

    responder = ByPage(plan)
    stub.responder = responder
    body = ok(post(vllm_service(retry_temperatures=retries, max_new_tokens=512), small_pdf(2)))

    truncated = page(body, 1)
    assert truncated["status"] == "truncated"
    assert truncated["attempts"] == 1 + len(retries)
    assert truncated["text"] == "A long table that was cut off at"
    assert (truncated["finish_reason"], truncated["tokens"]) == ("length", 512)
    assert responder.temperatures(stub, 1) == [0.2, 0.4, 0.7]
    assert page(body, 2)["status"] == "ok"
    assert body["status"] == "partial"
    assert body["failed_pages"] == []
    assert body["text"].startswith("A long table that was cut off at")


def test_page_always_repetitive_is_flagged(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    def plan(number: int, attempt: int) -> Reply | None:
        if number != 2:
            return None
        # Attempt 2 loops but stopped: better than the truncated loops around it.
        return Reply(text=LOOP, finish_reason="stop" if attempt == 2 else "length")

    stub.responder = ByPage(plan)
    body = ok(post(vllm_service(), small_pdf(2)))

    looping = page(body, 2)
    assert (looping["status"], looping["attempts"], looping["finish_reason"]) == ("repetitive", 3, "stop")
    assert looping["text"] == LOOP
    assert is_repetitive(looping["text"])
    assert body["status"] == "partial"
    assert body["failed_pages"] == []
    assert len(stub.requests) == 1 + 3


def test_no_retry_temperatures_means_no_retries(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    stub.responder = ByPage(lambda n, attempt: Reply(text=WORD_LOOP, finish_reason="length"))
    body = ok(post(vllm_service(retry_temperatures=[]), small_pdf(2)))
    assert [(p["status"], p["attempts"]) for p in body["pages"]] == [("repetitive", 1)] * 2
    assert len(stub.requests) == 2
    assert {record.params.temperature for record in stub.requests} == {0.2}


# --------------------------------------------------------------------------- failures


def failing(pages: set[int], status: int = 400) -> ByPage:
    return ByPage(lambda n, attempt: Reply(status=status, message=f"page {n} is cursed") if n in pages else None)


def test_engine_error_on_one_page_of_four_is_a_partial_result(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    stub.responder = failing({3}, status=503)  # overloaded: the engine retries the HTTP call, then gives up
    body = ok(post(vllm_service(vllm_max_retries=1), small_pdf(4)))

    failed = page(body, 3)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "engine_error"
    assert "HTTP 503" in failed["error"]["message"]  # vLLM's own words ("page 3 is cursed") go to the log
    assert (failed["text"], failed["finish_reason"], failed["tokens"], failed["attempts"]) == ("", None, 0, 1)
    assert (failed["width"], failed["height"]) == (600, 800)  # rendered before it failed
    assert body["status"] == "partial"
    assert body["failed_pages"] == [3]
    assert body["text"] == "page 1\n\npage 2\n\npage 4"
    assert {block["page"] for block in body["blocks"]} == {1, 2, 4}
    assert len(stub.requests) == 3 + 2  # the failing page: first call plus one HTTP retry, no temperature retry


def test_failed_share_at_the_ratio_is_still_partial(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    stub.responder = failing({1, 4})
    body = ok(post(vllm_service(max_failed_page_ratio=0.5), small_pdf(4)))
    assert body["status"] == "partial"
    assert body["failed_pages"] == [1, 4]


def test_too_many_failed_pages_fail_the_document(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    stub.responder = ByPage(
        lambda n, attempt: Reply(status=400, message="bad") if n in {1, 2} else Reply(status=500) if n == 3 else None
    )
    response = post(vllm_service(max_failed_page_ratio=0.5, vllm_max_retries=0), small_pdf(4))
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "document_failed"
    assert "3 of 4 pages failed" in error["message"]
    assert error["details"] == {"failed_pages": [1, 2, 3], "errors": ["page_rejected"]}


def test_zero_ratio_fails_on_any_failed_page(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    stub.responder = failing({2})
    response = post(vllm_service(max_failed_page_ratio=0), small_pdf(3))
    assert response.status_code == 502
    assert response.json()["error"]["details"]["failed_pages"] == [2]


def test_single_image_failing_gets_the_pages_own_error(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    stub.responder = failing({7})
    response = post(vllm_service(), make_png(500, 600, page_id=7), "scan.png")
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "page_rejected"
    assert error["details"] == {"upstream_status": 400}


def test_single_image_timing_out_gets_engine_timeout(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    release = threading.Event()

    async def never_answers(request: StubRequest) -> Reply:
        await asyncio.to_thread(release.wait, 30)
        return Reply(text="late")

    stub.responder = never_answers
    try:
        response = post(vllm_service(vllm_page_timeout_s=0.3), make_png(500, 600, page_id=1), "scan.png")
    finally:
        release.set()
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "engine_timeout"
    stub.wait_until(lambda s: s.cancelled == 1)  # the service hung up; vLLM would abort the page


def test_every_page_failing_alike_gets_that_error(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    stub.responder = failing({1, 2, 3})
    response = post(vllm_service(), small_pdf(3))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "page_rejected"


# --------------------------------------------------------------------------- the real tiny model


def test_hf_pages_report_status_and_attempts_consistently(hf_service: str, hf_settings: Settings) -> None:
    """The random model loops and truncates by nature: whatever it does, the accounting must add up."""
    most = 1 + len(hf_settings.retry_temperatures)
    documents = [(make_pdf(2, page_size_pt=(108, 144)), "two.pdf"), (make_png(160, 200, page_id=3), "p.png")]
    for content, name in documents:
        body = ok(httpx.post(f"{hf_service}/api/inference", files={"file": (name, content)}, timeout=300))
        for result in body["pages"]:
            status, attempts, finish = result["status"], result["attempts"], result["finish_reason"]
            assert 1 <= attempts <= most
            if status == "ok":
                assert (attempts, finish) == (1, "stop")
                assert not is_repetitive(result["text"])
            elif status == "retried":
                assert attempts > 1
                assert finish == "stop"
                assert not is_repetitive(result["text"])
            elif status == "truncated":
                assert (attempts, finish) == (most, "length")
                assert not is_repetitive(result["text"])
            else:
                assert status == "repetitive"
                assert attempts == most
                assert is_repetitive(result["text"])
            if finish == "length":
                assert result["tokens"] == hf_settings.max_new_tokens
        clean = all(p["status"] in ("ok", "retried") for p in body["pages"])
        assert body["status"] == ("ok" if clean else "partial")
        assert body["failed_pages"] == []


@pytest.mark.parametrize("retries", [[], [0.5]])
def test_retry_budget_is_what_settings_say(vllm_service: ServiceFactory, stub: StubVLLM, retries: list[float]) -> None:
    stub.responder = ByPage(lambda n, attempt: Reply(text=LOOP, finish_reason="length"))
    body = ok(post(vllm_service(retry_temperatures=retries), small_pdf(1)))
    assert body["pages"][0]["attempts"] == 1 + len(retries)
    assert [record.params.temperature for record in stub.requests] == [0.2, *retries]
