"""POST /api/inference end to end over HTTP, with the vLLM engine talking to the strict stub."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from app.results import DocumentResult
from tests.conftest import CORPUS, ServiceFactory, corpus_manifest
from tests.support.documents import ImageFormat, make_image, make_pdf, page_id_of, small_pdf
from tests.support.http import ok, post
from tests.support.loop import calls_on_the_loop
from tests.support.openai_stub import DEFAULT_MODEL, Reply, SamplingParams, StubRequest, StubVLLM, describe

LETTER_RENDER = (1190, 1540)  # US Letter at 200 DPI, capped at 1540 px on the longest edge


def texts(body: dict[str, Any]) -> list[str]:
    return [page["text"] for page in body["pages"]]


class PageLog:
    """A responder that records which marked page each request carried (the stub's log has no image)."""

    def __init__(self) -> None:
        self.seen: list[int | None] = []
        self._lock = threading.Lock()

    def __call__(self, request: StubRequest) -> Reply:
        with self._lock:
            self.seen.append(_page_id(request))
        return Reply(text=describe(request.image))


def _page_id(request: StubRequest) -> int | None:
    return page_id_of(request.image)


# --------------------------------------------------------------------------- a whole document


def test_multipage_pdf_in_order_with_full_result(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    body = ok(post(vllm_service(), make_pdf(6), "six.pdf"))  # US Letter
    expected = [f"page {i}" for i in range(1, 7)]
    assert texts(body) == expected
    assert [page["page"] for page in body["pages"]] == list(range(1, 7))
    for page in body["pages"]:
        assert (page["width"], page["height"]) == LETTER_RENDER
        assert page["finish_reason"] == "stop"
        assert page["tokens"] == 2
        assert 0 < page["seconds"] < 600
    assert body["text"] == "\n\n".join(expected)
    assert body["blocks"] == [{"type": "paragraph", "page": i, "text": f"page {i}", "level": None} for i in range(1, 7)]
    assert body["model_version"] == "lightonocr-2-1b"
    assert all((record.width, record.height) == LETTER_RENDER for record in stub.requests)
    assert stub.violations == []


def test_sampling_settings_reach_vllm(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    url = vllm_service(temperature=0.4, top_p=0.8, max_new_tokens=512)
    ok(post(url, small_pdf(2)))
    assert {record.params for record in stub.requests} == {SamplingParams(0.4, 0.8, 512)}
    assert stub.violations == []


class HoldFirstPage:
    """Answers page 1 only after every other page of the document has been answered."""

    def __init__(self, stub: StubVLLM, others: int) -> None:
        self.stub, self.others = stub, others
        self.page_one_sha: str | None = None

    async def __call__(self, request: StubRequest) -> Reply:
        if _page_id(request) == 1:
            self.page_one_sha = request.sha256
            await asyncio.to_thread(self.stub.wait_until, lambda s: s.completed >= self.others, 20.0)
        return Reply(text=describe(request.image))


def test_out_of_order_completion_keeps_page_order(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    hold = HoldFirstPage(stub, others=5)
    stub.responder = hold
    body = ok(post(vllm_service(), small_pdf(6)))
    assert texts(body) == [f"page {i}" for i in range(1, 7)]
    finished = {record.sha256: record.finished_at for record in stub.requests}
    assert finished[hold.page_one_sha or ""] == max(t for t in finished.values() if t is not None)


def test_page_ranges_send_only_those_pages(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    log = PageLog()
    stub.responder = log
    body = ok(post(vllm_service(), small_pdf(6), data={"pages": "2-3,5"}))
    assert [page["page"] for page in body["pages"]] == [2, 3, 5]
    assert texts(body) == ["page 2", "page 3", "page 5"]
    assert [block["page"] for block in body["blocks"]] == [2, 3, 5]
    assert sorted(page or 0 for page in log.seen) == [2, 3, 5]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_single_image_formats(vllm_service: ServiceFactory, stub: StubVLLM, fmt: ImageFormat) -> None:
    body = ok(post(vllm_service(), make_image(fmt, 425, 550, page_id=7), f"scan.{fmt.lower()}"))
    assert texts(body) == ["page 7"]
    assert (body["pages"][0]["width"], body["pages"][0]["height"]) == (425, 550)  # never upscaled
    assert stub.violations == []


def test_multiframe_tiff_is_one_page_per_frame(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    body = ok(post(vllm_service(), make_image("TIFF", 425, 550, page_id=1, frames=3), "scan.tiff"))
    assert texts(body) == ["page 1", "page 2", "page 3"]
    assert [page["page"] for page in body["pages"]] == [1, 2, 3]
    assert len(stub.requests) == 3


# --------------------------------------------------------------------------- concurrency


def test_concurrent_requests_share_the_page_bound(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    """Five 4-page documents at once: each gets its own pages back, and vLLM sees 4 at once, never more."""
    filled = threading.Event()

    async def responder(request: StubRequest) -> Reply:
        # Hold the first pages until the bound is full once, so the test sees it reached, not only respected.
        if not filled.is_set():
            await asyncio.to_thread(stub.wait_until, lambda s: s.in_flight >= 4, 30)
            filled.set()
        return Reply(text=f"{describe(request.image)} w{request.image.width}")

    stub.responder = responder
    url = vllm_service(max_concurrent_pages=4)
    # A different page width per document makes every document's pages distinguishable.
    documents = [make_pdf(4, page_size_pt=(150 + 20 * k, 288)) for k in range(5)]
    with ThreadPoolExecutor(len(documents)) as pool:
        bodies = [ok(response) for response in pool.map(lambda pdf: post(url, pdf), documents)]
    widths = []
    for body in bodies:
        pages = body["pages"]
        assert texts(body) == [f"page {i} w{page['width']}" for i, page in enumerate(pages, start=1)]
        assert len({page["width"] for page in pages}) == 1
        widths.append(pages[0]["width"])
    assert widths == sorted(set(widths))  # five documents, five widths, each in its own response
    assert stub.max_in_flight == 4
    assert stub.completed == 20
    assert stub.violations == []


# --------------------------------------------------------------------------- failures and limits


def fail_page(page_id: int, status: int = 500) -> tuple[Callable[[StubRequest], Reply], dict[str, int]]:
    """A responder that always fails one marked page, and the attempts that page received."""
    attempts: dict[str, int] = {}

    def respond(request: StubRequest) -> Reply:
        if _page_id(request) == page_id:
            attempts[request.sha256] = request.attempt
            return Reply(status=status, message="CUDA error: out of memory")
        return Reply(text=describe(request.image))

    return respond, attempts


def assert_still_serving(url: str, stub: StubVLLM) -> None:
    stub.responder = lambda request: Reply(text=describe(request.image))
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").status_code == 200
    assert texts(ok(post(url, small_pdf(2)))) == ["page 1", "page 2"]


def test_vllm_error_after_retries_is_502_and_server_stays_healthy(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    stub.responder, attempts = fail_page(7)
    url = vllm_service(vllm_max_retries=2)
    response = post(url, make_image("PNG", 300, 400, page_id=7))
    assert response.status_code == 502, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == "engine_error"
    assert "3 times" in body["error"]["message"]
    assert list(attempts.values()) == [3]  # the first try plus two retries
    assert_still_serving(url, stub)


def test_one_failed_page_of_many_gives_a_partial_document(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    stub.responder, attempts = fail_page(3)
    url = vllm_service(vllm_max_retries=1)
    body = ok(post(url, small_pdf(4)))
    assert body["status"] == "partial"
    assert body["failed_pages"] == [3]
    assert [page["status"] for page in body["pages"]] == ["ok", "ok", "failed", "ok"]
    assert body["pages"][2]["error"]["code"] == "engine_error"
    assert body["text"] == "page 1\n\npage 2\n\npage 4"
    assert [block["page"] for block in body["blocks"]] == [1, 2, 4]
    assert list(attempts.values()) == [2]
    assert_still_serving(url, stub)


def test_failed_pages_beyond_the_ratio_fail_the_document(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    stub.responder, _ = fail_page(3)
    url = vllm_service(vllm_max_retries=0, max_failed_page_ratio=0)
    response = post(url, small_pdf(4))
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "document_failed"
    assert error["details"]["failed_pages"] == [3]
    assert_still_serving(url, stub)


def test_page_at_token_limit_reports_length(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    """A page that always hits MAX_NEW_TOKENS is retried warmer, then kept and marked truncated."""
    temperatures: list[float] = []

    def respond(request: StubRequest) -> Reply:
        if _page_id(request) == 2:
            temperatures.append(request.params.temperature)
            return Reply(text="| a | b |\n|---|---|\n| 1 | 2 | 3 | 4", finish_reason="length")
        return Reply(text=describe(request.image))

    stub.responder = respond
    body = ok(post(vllm_service(max_new_tokens=300, retry_temperatures=[0.6]), small_pdf(3)))
    assert [page["finish_reason"] for page in body["pages"]] == ["stop", "length", "stop"]
    assert [page["status"] for page in body["pages"]] == ["ok", "truncated", "ok"]
    assert body["status"] == "partial"
    assert body["pages"][1]["tokens"] == 300
    assert body["pages"][1]["attempts"] == 2
    assert temperatures == [0.2, 0.6]


def test_escaped_dollars_are_repaired(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    stub.responder = lambda request: Reply(text=r"Let \$x\$ be")
    body = ok(post(vllm_service(), make_image("PNG", 300, 400)))
    assert texts(body) == ["Let $x$ be"]
    assert body["text"] == "Let $x$ be"


# --------------------------------------------------------------------------- info and probes


def test_info_describes_the_vllm_engine(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    url = vllm_service(max_concurrent_pages=8, max_pages=40, max_file_size_mb=5, max_new_tokens=1024)
    assert httpx.get(f"{url}/ready").status_code == 200
    info = httpx.get(f"{url}/info").json()
    assert info["engine"] == "vllm"
    assert info["model"] == DEFAULT_MODEL
    assert info["model_version"] == "lightonocr-2-1b"
    assert stub.base_url in info["device"]
    assert info["ready"] is True
    assert info["limits"] == {
        "max_file_size_mb": 5,
        "max_pages": 40,
        "max_image_pixels": 80_000_000,
        "max_new_tokens": 1024,
        "max_concurrent_pages": 8,
    }


def test_info_ready_agrees_with_ready_when_vllm_is_down(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    """/info's `ready` was "the engine has started" only: true while /ready said 503."""
    url = vllm_service()
    assert httpx.get(f"{url}/info").json()["ready"] is True
    stub.stop()  # vLLM goes away
    ready = httpx.get(f"{url}/ready")
    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "engine_unavailable"
    assert "127.0.0.1" not in ready.json()["error"]["message"]  # the address is in the log, not the answer
    assert httpx.get(f"{url}/info").json()["ready"] is False


# --------------------------------------------------------------------------- real documents


def test_corpus_documents_have_the_right_page_count(vllm_service: ServiceFactory, stub: StubVLLM) -> None:
    documents = corpus_manifest()
    url = vllm_service()

    def run(document: dict[str, Any]) -> tuple[dict[str, Any], httpx.Response]:
        return document, post(url, (CORPUS / document["file"]).read_bytes(), document["file"])

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(run, documents))
    for document, response in answers:
        body = ok(response)
        assert len(body["pages"]) == document["pages"], document["id"]
        for page in body["pages"]:
            assert max(page["width"], page["height"]) <= 1540, document["id"]
            assert page["text"] == f"image {page['width']}x{page['height']}", document["id"]
    assert stub.violations == []


def test_the_json_answer_is_encoded_off_the_event_loop(
    vllm_service: ServiceFactory, stub: StubVLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 100-page result is megabytes of JSON: encoding it on the loop would stall every other request."""
    on_loop = calls_on_the_loop(monkeypatch, DocumentResult, "model_dump_json")
    body = ok(post(vllm_service(), small_pdf(2)))
    assert [page["page"] for page in body["pages"]] == [1, 2]
    assert on_loop == [False]
