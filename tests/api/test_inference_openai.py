"""MODEL_SOURCE=openai end to end over HTTP, against the stand-in answering as llama.cpp's llama-server."""

from __future__ import annotations

import time

import httpx

from app.main import create_app
from tests.conftest import make_settings, wait_ready
from tests.support.documents import small_pdf
from tests.support.http import ok, post
from tests.support.openai_stub import StubVLLM
from tests.support.server import ServedApp

GGUF = "LightOnOCR-2-1B-Q4_K_M.gguf"


def test_a_llama_server_without_model_name_serves_documents_and_info_names_its_model() -> None:
    with (
        StubVLLM(model=GGUF, server="llama-server") as stub,
        ServedApp(
            create_app(make_settings(model_source="openai", vllm_base_url=stub.base_url, vllm_retry_backoff_s=0.01))
        ) as served,
    ):
        wait_ready(served.url, timeout=30)
        body = ok(post(served.url, small_pdf(2)))
        info = httpx.get(f"{served.url}/info").json()
    assert [page["text"] for page in body["pages"]] == ["page 1", "page 2"]
    assert body["model_version"] == GGUF.lower()
    assert (info["engine"], info["model"], info["model_version"]) == ("openai", GGUF, GGUF.lower())
    assert info["ready"] is True
    assert stub.violations == []


def test_several_models_and_no_model_name_is_a_start_up_error_on_ready() -> None:
    with (
        StubVLLM(model="a/one", also_serves=("b/two",)) as stub,
        ServedApp(create_app(make_settings(model_source="openai", vllm_base_url=stub.base_url))) as served,
    ):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = httpx.get(f"{served.url}/ready")
            if "failed to start" in ready.text:
                break
            time.sleep(0.05)  # polling only: nothing is timed
    assert ready.status_code == 503
    assert "MODEL_NAME is not set" in ready.json()["error"]["message"]
