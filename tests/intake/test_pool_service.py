"""The service with intake workers, over real HTTP on loopback, against the vLLM stand-in.

A worker is killed (SIGKILL) while it holds a page of one request and another request is in
flight: the first answers `partial` naming the lost page (`intake_worker_crashed`), the second
is untouched, and the server keeps serving.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from app.intake.pool import IntakePool
from app.main import create_app
from tests.api.test_grounding import GROUNDED_PAGE, GROUNDING_MODEL, Answer, crop_of, decode, noise_png
from tests.conftest import make_settings, wait_ready
from tests.support.documents import small_pdf
from tests.support.http import ok
from tests.support.http import post as post_file
from tests.support.intake_gate import Gate
from tests.support.openai_stub import StubVLLM
from tests.support.server import ServedApp


@pytest.fixture
def pooled_service(stub: StubVLLM, intake_pool: IntakePool) -> Iterator[str]:
    settings = make_settings(model_source="vllm", vllm_base_url=stub.base_url, vllm_retry_backoff_s=0.01)
    with ServedApp(create_app(settings, intake=intake_pool)) as served:
        wait_ready(served.url)
        yield served.url


def post(url: str, data: bytes) -> httpx.Response:
    return httpx.post(f"{url}/api/inference", files={"file": ("doc.pdf", data, "application/pdf")}, timeout=120)


def statuses(body: dict[str, Any]) -> list[str]:
    return [page["status"] for page in body["pages"]]


def test_pages_come_from_the_workers_as_png(pooled_service: str, stub: StubVLLM) -> None:
    response = post(pooled_service, small_pdf(3))
    assert response.status_code == 200, response.text
    body = response.json()
    assert statuses(body) == ["ok", "ok", "ok"]
    assert [page["text"] for page in body["pages"]] == ["page 1", "page 2", "page 3"]
    assert [(page["width"], page["height"]) for page in body["pages"]] == [(600, 800)] * 3
    assert stub.violations == []


def test_a_worker_killed_mid_page_fails_that_page_only(pooled_service: str, stub: StubVLLM, gate: Gate) -> None:
    gate.hold(3, 1)  # page 2 of the 3-page document
    gate.hold(5, 3)  # page 4 of the other request's 5-page document: both requests are in flight
    with ThreadPoolExecutor(2) as threads:
        first = threads.submit(post, pooled_service, small_pdf(3))
        second = threads.submit(post, pooled_service, small_pdf(5))
        victim = gate.started(3, 1)
        gate.started(5, 3)
        os.kill(victim, signal.SIGKILL)
        gate.release()
        crashed, untouched = first.result(), second.result()

    assert crashed.status_code == 200, crashed.text
    body = crashed.json()
    assert body["status"] == "partial"
    assert body["failed_pages"] == [2]
    assert statuses(body) == ["ok", "failed", "ok"]
    assert body["pages"][1]["error"]["code"] == "intake_worker_crashed"
    assert body["text"] == "page 1\n\npage 3"

    assert untouched.status_code == 200, untouched.text
    assert untouched.json()["status"] == "ok"
    assert statuses(untouched.json()) == ["ok"] * 5

    # The server and the pool carry on.
    assert httpx.get(f"{pooled_service}/health").status_code == 200
    again = post(pooled_service, small_pdf(3))
    assert again.status_code == 200
    assert statuses(again.json()) == ["ok", "ok", "ok"]


def test_every_page_lost_is_the_crash_error(pooled_service: str, gate: Gate) -> None:
    """A one-page document whose only page was lost fails with that error (500), like any single-page failure."""
    gate.hold(1, 0)
    with ThreadPoolExecutor(1) as threads:
        answer = threads.submit(post, pooled_service, small_pdf(1))
        os.kill(gate.started(1, 0), signal.SIGKILL)
        gate.release()
        response = answer.result()
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "intake_worker_crashed"


def test_inline_picture_crops_from_the_workers_png(intake_pool: IntakePool) -> None:
    """images=inline crops the page the model saw; with workers that page arrives as the worker's PNG."""
    with StubVLLM(model=GROUNDING_MODEL) as model:
        answer = Answer(GROUNDED_PAGE)
        model.responder = answer
        settings = make_settings(model_source="vllm", vllm_base_url=model.base_url, model_name=model.model)
        with ServedApp(create_app(settings, intake=intake_pool)) as served:
            wait_ready(served.url)
            fields = {"mode": "grounding", "images": "inline"}
            body = ok(post_file(served.url, noise_png(), "page.png", data=fields))
    [(_, seen)] = answer.seen
    picture = next(block for block in body["blocks"] if block.get("picture") == 1)
    assert decode(picture["image"]).convert("RGB").tobytes() == crop_of(seen, picture["bbox"])
