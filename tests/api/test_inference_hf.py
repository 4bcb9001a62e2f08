"""The HTTP API over the in-process Hugging Face engine and the tiny real checkpoint.

Most tests share the session's `hf_service` (the model loads once); documents
are small (PDF pages render to 400x500 px) so the whole module stays fast.
The random model's text is gibberish: tests check structure, order and
accounting, never the words.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.main import create_app
from app.settings import Settings
from tests.conftest import corpus_document, make_settings
from tests.support import http
from tests.support.documents import make_image, make_pdf, make_png
from tests.support.http import ok
from tests.support.server import ServedApp

post = partial(http.post, timeout=120)  # the model runs on this machine's CPU

SMALL_PAGE_PT = (144, 180)  # 2 x 2.5 in: 400 x 500 px at the 200 DPI cap
SMALL_PAGE_PX = (400, 500)
PAGE_SEPARATOR = "\n\n"


def assert_page_accounting(body: dict[str, Any], settings: Settings) -> None:
    """Every page respects the token bound, and `text`/`blocks` are built from the pages in order."""
    pages = body["pages"]
    assert body["text"] == PAGE_SEPARATOR.join(page["text"] for page in pages)
    numbers = [page["page"] for page in pages]
    block_pages = [block["page"] for block in body["blocks"]]
    assert set(block_pages) <= set(numbers)
    assert block_pages == sorted(block_pages, key=numbers.index)
    for page in pages:
        assert page["finish_reason"] in {"stop", "length"}
        assert 0 <= page["tokens"] <= settings.max_new_tokens
        if page["finish_reason"] == "length":
            assert page["tokens"] == settings.max_new_tokens
        assert 0 < page["seconds"] < 600


def test_png_is_one_page_at_its_own_size(hf_service: str, hf_settings: Settings) -> None:
    body = ok(post(hf_service, make_png(300, 220, page_id=1), "page.png"))
    assert len(body["pages"]) == 1
    page = body["pages"][0]
    assert (page["page"], page["width"], page["height"]) == (1, 300, 220)  # small images are not upscaled
    assert_page_accounting(body, hf_settings)


def test_pdf_pages_come_back_in_order(hf_service: str, hf_settings: Settings, tiny_checkpoint: Path) -> None:
    body = ok(post(hf_service, make_pdf(4, page_size_pt=SMALL_PAGE_PT), "doc.pdf"))
    assert [page["page"] for page in body["pages"]] == [1, 2, 3, 4]
    assert all((page["width"], page["height"]) == SMALL_PAGE_PX for page in body["pages"])
    assert body["model_version"] == tiny_checkpoint.name.lower()
    assert body["model_version"] == hf_settings.model_version
    assert_page_accounting(body, hf_settings)


def test_page_selection(hf_service: str, hf_settings: Settings) -> None:
    body = ok(post(hf_service, make_pdf(4, page_size_pt=SMALL_PAGE_PT), "doc.pdf", data={"pages": "2,4"}))
    assert [page["page"] for page in body["pages"]] == [2, 4]
    assert_page_accounting(body, hf_settings)


def test_multi_frame_tiff_is_one_page_per_frame(hf_service: str, hf_settings: Settings) -> None:
    body = ok(post(hf_service, make_image("TIFF", 200, 260, frames=3), "scan.tiff"))
    assert [page["page"] for page in body["pages"]] == [1, 2, 3]
    assert all((page["width"], page["height"]) == (200, 260) for page in body["pages"])
    assert_page_accounting(body, hf_settings)


def test_concurrent_requests_each_get_their_own_pages(hf_service: str, hf_settings: Settings) -> None:
    # Different page counts per request, so a mixed-up answer would show.
    counts = [2, 1, 3, 2]

    def one(count: int) -> dict[str, Any]:
        return ok(post(hf_service, make_pdf(count, page_size_pt=SMALL_PAGE_PT), f"{count}.pdf"))

    with ThreadPoolExecutor(max_workers=len(counts)) as pool:
        bodies = list(pool.map(one, counts))
    for count, body in zip(counts, bodies, strict=True):
        assert [page["page"] for page in body["pages"]] == list(range(1, count + 1))
        assert_page_accounting(body, hf_settings)


def test_info_describes_the_hf_engine(hf_service: str, hf_settings: Settings) -> None:
    response = httpx.get(f"{hf_service}/info")
    assert response.status_code == 200
    info = response.json()
    assert info["engine"] == "huggingface"
    assert info["device"] == "cpu"
    assert info["ready"] is True
    assert info["model"] == hf_settings.model_name
    assert info["model_version"] == hf_settings.model_version
    assert info["limits"]["max_new_tokens"] == 24
    assert info["limits"]["max_pages"] == hf_settings.max_pages


def test_probes(hf_service: str) -> None:
    ready = httpx.get(f"{hf_service}/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok"}
    health = httpx.get(f"{hf_service}/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}


def test_corpus_image(hf_service: str, hf_settings: Settings) -> None:
    path = corpus_document("dev01_clean_printed.png")
    with Image.open(path) as image:
        size = image.size
    body = ok(post(hf_service, path.read_bytes(), path.name))
    assert len(body["pages"]) == 1
    assert (body["pages"][0]["width"], body["pages"][0]["height"]) == size
    assert_page_accounting(body, hf_settings)


# --------------------------------------------------------------------------- model not loaded


def ready_once_settled(url: str, timeout: float = 60.0) -> httpx.Response:
    """/ready after the background start has finished (failed), i.e. past `engine_not_ready`."""
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"{url}/ready")
        if response.status_code != 503 or response.json()["error"]["code"] != "engine_not_ready":
            return response
        assert time.monotonic() < deadline, "the engine start never finished"
        time.sleep(0.05)


def test_model_that_cannot_load_is_unavailable_but_alive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = make_settings(
        model_source="huggingface",
        model_name=str(tmp_path / "no-such-checkpoint"),
        model_cache_dir=tmp_path / "cache",
        device="cpu",
        retry_after_s=7,
    )
    with ServedApp(create_app(settings)) as served:
        ready = ready_once_settled(served.url)
        assert ready.status_code == 503, ready.text
        assert ready.json()["error"]["code"] == "engine_unavailable"
        assert ready.headers["retry-after"] == "7"

        response = post(served.url, make_png(200, 200), "page.png")
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "engine_unavailable"
        assert response.headers["retry-after"] == "7"

        health = httpx.get(f"{served.url}/health")
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        info = httpx.get(f"{served.url}/info").json()
        assert info["ready"] is False
        assert info["engine"] == "huggingface"
