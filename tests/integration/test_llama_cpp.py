"""MODEL_SOURCE=openai against a real llama.cpp `llama-server` serving the tiny checkpoint converted to GGUF.

The stand-in (`StubVLLM(server="llama-server")`) only answers as we believe llama-server does; this module
checks it against llama-server itself: its model listing (no max_model_len; `meta.n_ctx`), the image-only
chat request with its mmproj, `top_k`/`min_p`, `finish_reason`, usage, and the service end to end. Opt-in, as
building llama.cpp takes long on two cores (see README, "No GPU"):

    export LIGHTONOCR_LLAMA_CPP_DIR=$(.ci/llama-server)
    uv run pytest -m llama_cpp tests/integration -v

The weights are random, so only the structure of the answers is asserted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.engines import build_engine
from app.engines.base import Sampling
from app.main import create_app
from tests.conftest import make_settings
from tests.support.documents import make_marked_image, make_pdf, make_png
from tests.support.http import free_port
from tests.support.server import ServedApp

DIR_ENV = "LIGHTONOCR_LLAMA_CPP_DIR"
MAX_NEW_TOKENS = 32
SLOT_CONTEXT = 4096  # -c 8192 over -np 2 slots
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 300.0

_DIR = Path(os.environ.get(DIR_ENV, "/nonexistent"))
_FILES = ("llama-server", "tiny-lightonocr-f32.gguf", "mmproj-tiny-lightonocr-f32.gguf")

pytestmark = [
    pytest.mark.llama_cpp,
    pytest.mark.skipif(
        not all((_DIR / name).exists() for name in _FILES),
        reason=f"set {DIR_ENV} to what .ci/llama-server prints (llama-server and the tiny GGUFs)",
    ),
]


@dataclass(frozen=True)
class LlamaServer:
    base_url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "llama-server.log"
    command = [
        str(_DIR / "llama-server"),
        "-m", str(_DIR / "tiny-lightonocr-f32.gguf"),
        "--mmproj", str(_DIR / "mmproj-tiny-lightonocr-f32.gguf"),
        "--host", "127.0.0.1", "--port", str(port),
        "-c", str(2 * SLOT_CONTEXT), "-np", "2", "-t", "2",
        "--no-webui",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = LlamaServer(f"http://127.0.0.1:{port}/v1", log_path, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"llama-server exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server not healthy after {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def settings_for(server: LlamaServer, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "model_source": "openai",  # MODEL_NAME unset: the GGUF's name, as llama-server lists it
        "model_profile": "LightOnOCR-2-1B",  # the file name says nothing: the tiny model is a 2-1B
        "vllm_base_url": server.base_url,
        "max_new_tokens": MAX_NEW_TOKENS,
        "max_concurrent_pages": 4,
        "vllm_page_timeout_s": REQUEST_TIMEOUT_S,
        "model_load_retry_s": 0.5,
        **overrides,
    }
    return make_settings(**values)


def test_listing_is_what_the_stand_in_imitates(llama_server: LlamaServer) -> None:
    body = httpx.get(f"{llama_server.base_url}/models", timeout=10).json()
    [card] = body["data"]
    assert card["owned_by"] == "llamacpp"
    assert "max_model_len" not in card
    assert card["meta"]["n_ctx"] == SLOT_CONTEXT
    assert "tiny-lightonocr" in card["id"]


def test_engine_reads_a_page_with_the_served_model(llama_server: LlamaServer) -> None:
    settings = settings_for(llama_server)

    async def scenario() -> tuple[Any, list[Any]]:
        async with build_engine(settings) as engine:
            await engine.check_health()
            pages = [make_marked_image(i, 600, 800) for i in range(3)]
            sampling = Sampling(0.2, 0.9, MAX_NEW_TOKENS)
            generations = await asyncio.gather(*(engine.recognize(page, sampling) for page in pages))
            return engine.info(), list(generations)

    info, generations = asyncio.run(scenario())
    assert info.engine == "openai"
    assert "tiny-lightonocr" in info.model
    for generation in generations:
        assert generation.finish_reason in {"stop", "length"}
        assert 0 < generation.tokens <= MAX_NEW_TOKENS


def test_readiness_checks_the_slot_context(llama_server: LlamaServer) -> None:
    settings = settings_for(llama_server, max_new_tokens=SLOT_CONTEXT + 1)

    async def scenario() -> str:
        async with build_engine(settings) as engine:
            try:
                await engine.check_health()
            except Exception as exc:
                return str(exc)
            return "ready"

    assert "--ctx-size" in asyncio.run(scenario())


@pytest.fixture(scope="module")
def service(llama_server: LlamaServer) -> Iterator[str]:
    with ServedApp(create_app(settings_for(llama_server))) as served:
        deadline = time.monotonic() + 60
        while httpx.get(f"{served.url}/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, httpx.get(f"{served.url}/ready").text
            time.sleep(0.2)
        yield served.url


def test_info_names_the_engine_and_the_served_model(service: str) -> None:
    info = httpx.get(f"{service}/info", timeout=10).json()
    assert info["engine"] == "openai"
    assert "tiny-lightonocr" in info["model"]
    assert info["ready"] is True


@pytest.mark.parametrize(("data", "filename"), [(make_pdf(2), "two.pdf"), (make_png(), "page.png")])
def test_documents_end_to_end(service: str, llama_server: LlamaServer, data: bytes, filename: str) -> None:
    response = httpx.post(f"{service}/api/inference", files={"file": (filename, data)}, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, f"{response.text}\n--- llama-server log ---\n{llama_server.log_tail()}"
    body = response.json()
    for page in body["pages"]:
        assert page["finish_reason"] in {"stop", "length"}
        assert 0 < page["tokens"] <= MAX_NEW_TOKENS
    assert "tiny-lightonocr" in body["model_version"]
