"""Pages the model cannot take as they are (a side under one 28-px merged patch), on both engines.

Issue: a 20x3000 strip made the `huggingface` engine fail with "calculated shape of the array
of sliding blocks as (55, 0)" and failed every page batched with it; a real vLLM server answered
500, retried four times. Now such pages are padded with white to 28 px before they reach the
model (README, "How pages are prepared"): every odd page is answered like any other, alone or
among concurrent normal pages, and a page the model still cannot take fails alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.intake.document import fit_to_model
from app.main import create_app
from tests.conftest import ServiceFactory, make_settings, wait_ready
from tests.hostile.cases import THIN_SHAPES
from tests.support.documents import make_png
from tests.support.http import ok, post
from tests.support.openai_stub import StubVLLM
from tests.support.server import ServedApp

NORMAL = [(300, 220), (220, 300), (280, 280)]


def read(url: str, payload: bytes) -> httpx.Response:
    return post(url, payload, "page.png", timeout=120)


def page_of(response: httpx.Response) -> dict[str, Any]:
    (page,) = ok(response)["pages"]
    assert page["status"] != "failed", page
    assert page.get("error") is None
    return dict(page)


def rendered_size(width: int, height: int) -> tuple[int, int]:
    """The page's size as the service reports it: sized for the model, before any padding."""
    from PIL import Image

    size: tuple[int, int] = fit_to_model(Image.new("RGB", (width, height))).size
    return size


def send_together(url: str, shapes: list[tuple[int, int]]) -> list[httpx.Response]:
    """One request per shape, all released at the same moment from their own threads."""
    barrier = threading.Barrier(len(shapes))

    def send(shape: tuple[int, int]) -> httpx.Response:
        payload = make_png(*shape, page_id=shapes.index(shape) + 1) if min(shape) >= 100 else make_png(*shape)
        barrier.wait(timeout=30)
        return read(url, payload)

    with ThreadPoolExecutor(len(shapes)) as pool:
        return list(pool.map(send, shapes))


# --------------------------------------------------------------------------- huggingface (tiny checkpoint)


@pytest.fixture(scope="module")
def hf_batching(tiny_checkpoint: Path) -> Iterator[tuple[str, Callable[[], list[int]]]]:
    """A service whose batcher waits long enough that concurrent requests share one `generate`."""
    settings = make_settings(
        model_source="huggingface",
        model_name=str(tiny_checkpoint),
        device="cpu",
        max_new_tokens=8,
        hf_max_batch_size=4,
        hf_batch_wait_ms=400,
        retry_temperatures="",  # the random model's pages are truncated: one attempt each keeps this fast
    )
    app = create_app(settings)
    with ServedApp(app) as served:
        wait_ready(served.url)
        yield served.url, lambda: list(app.state.service.engine.batch_sizes)


@pytest.mark.parametrize("shape", THIN_SHAPES, ids=[f"{w}x{h}" for w, h in THIN_SHAPES])
def test_hf_thin_page_alone_is_read(hf_batching: tuple[str, Callable[[], list[int]]], shape: tuple[int, int]) -> None:
    page = page_of(read(hf_batching[0], make_png(*shape)))
    assert (page["width"], page["height"]) == rendered_size(*shape)  # the page's own size, not the padding


def test_hf_thin_pages_among_concurrent_normal_pages_fail_nobody(
    hf_batching: tuple[str, Callable[[], list[int]]],
) -> None:
    url, batch_sizes = hf_batching
    for thin in THIN_SHAPES:
        before = len(batch_sizes())
        shapes = [NORMAL[0], thin, NORMAL[1], NORMAL[2]]
        responses = send_together(url, shapes)
        for shape, response in zip(shapes, responses, strict=True):
            page = page_of(response)
            assert (page["width"], page["height"]) == rendered_size(*shape)
        # The odd page really shared a batch with the others (the case that used to fail them all).
        assert max(batch_sizes()[before:]) > 1, batch_sizes()[before:]


# --------------------------------------------------------------------------- vllm (the stand-in)


@pytest.mark.parametrize("shape", THIN_SHAPES, ids=[f"{w}x{h}" for w, h in THIN_SHAPES])
def test_vllm_thin_page_alone_is_padded_and_read(
    vllm_service: ServiceFactory, stub: StubVLLM, shape: tuple[int, int]
) -> None:
    page = page_of(read(vllm_service(), make_png(*shape)))
    width, height = rendered_size(*shape)
    assert (page["width"], page["height"]) == (width, height)
    (request,) = stub.requests  # one request, no retries: the stand-in never saw a side under 28 px
    assert (request.width, request.height) == (max(width, 28), max(height, 28))
    assert request.outcome == "ok"


def test_vllm_thin_pages_among_concurrent_normal_pages_fail_nobody(
    vllm_service: ServiceFactory, stub: StubVLLM
) -> None:
    url = vllm_service()
    shapes = [*NORMAL, *THIN_SHAPES]
    for shape, response in zip(shapes, send_together(url, shapes), strict=True):
        page = page_of(response)
        assert (page["width"], page["height"]) == rendered_size(*shape)
    assert [r.outcome for r in stub.requests] == ["ok"] * len(shapes)
    assert min(min(r.width, r.height) for r in stub.requests) >= 28


def test_vllm_page_it_cannot_process_fails_at_once_with_its_own_code(
    stub: StubVLLM, caplog: pytest.LogCaptureFixture
) -> None:
    """A stand-in stricter than the padding (sides under 100 px) answers 500 as vLLM does: not retried."""
    with StubVLLM(min_side=100) as strict:
        settings = make_settings(model_source="vllm", vllm_base_url=strict.base_url, vllm_retry_backoff_s=0.01)
        with ServedApp(create_app(settings)) as served:
            wait_ready(served.url, timeout=30)
            shapes = [(300, 220), (60, 900), (220, 300)]
            responses = send_together(served.url, shapes)
        assert page_of(responses[0])["status"] in {"ok", "retried"}
        assert page_of(responses[2])["status"] in {"ok", "retried"}
        refused = responses[1]
        assert refused.status_code == 502, refused.text
        error = refused.json()["error"]
        assert error["code"] == "page_rejected"
        assert "http://" not in error["message"]
        assert "Error(" not in error["message"]
        statuses = sorted(r.status for r in strict.requests if r.status is not None)
        assert statuses == [200, 200, 500]  # the refused page was sent once, never retried
    assert any("Expected reduction dim 0" in record.getMessage() for record in caplog.records)
