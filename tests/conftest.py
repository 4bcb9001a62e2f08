"""Shared fixtures: the tiny real checkpoint, the vLLM stand-in and live services on loopback."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.intake.pool import IntakePool
from app.main import create_app
from app.settings import Settings, load_settings
from tests.support.intake_gate import Gate
from tests.support.openai_stub import StubVLLM
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401  (fixtures: a real PostgreSQL)
from tests.support.server import ServedApp
from tests.support.tiny_checkpoint import build_tiny_checkpoint

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def make_settings(**overrides: Any) -> Settings:
    """Settings for tests: never read the developer's `.env`, never write a job store into the repo.

    Intake runs in threads (INTAKE_WORKERS=0) unless a test asks for workers: starting processes for every
    service the suite builds would cost seconds on a 2-core box; tests/intake/test_pool.py and the pixel
    tests run the worker processes (one shared pool, `intake_pool`).
    """
    overrides.setdefault("jobs_db", Path(tempfile.mkdtemp(prefix="lightonocr-jobs-")) / "jobs.db")
    overrides.setdefault("intake_workers", 0)
    return load_settings(_env_file=None, **overrides)


def wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"{url} never became ready: {httpx.get(f'{url}/ready').text}")


@pytest.fixture
def anyio_backend() -> str:
    """The app runs on asyncio (engines and admission use its primitives): async tests run there only."""
    return "asyncio"


@pytest.fixture(scope="session")
def intake_gate(tmp_path_factory: pytest.TempPathFactory) -> Gate:
    return Gate(tmp_path_factory.mktemp("intake-gate"))


@pytest.fixture(scope="session")
def intake_pool(intake_gate: Gate) -> Iterator[IntakePool]:
    """Two intake worker processes for the whole session (started once: a few hundred ms each on this box).

    Their handler is the real one behind a gate that holds nothing unless a test asks (`gate`).
    """
    pool = IntakePool(2, handler=intake_gate.handler)
    pool.start()
    yield pool
    pool.close()


@pytest.fixture
def gate(intake_gate: Gate) -> Iterator[Gate]:
    """The shared pool's gate, released (and cleared) when the test ends, whatever happened."""
    yield intake_gate
    intake_gate.release()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-lightonocr"))


@pytest.fixture(scope="session")
def hf_settings(tiny_checkpoint: Path) -> Settings:
    return make_settings(
        model_source="huggingface",
        model_name=str(tiny_checkpoint),
        device="cpu",
        max_new_tokens=24,
        hf_max_batch_size=4,
        max_pages=20,
    )


@pytest.fixture(scope="session")
def hf_service(hf_settings: Settings) -> Iterator[str]:
    """One live HF-engine service for the whole session: the model loads once."""
    with ServedApp(create_app(hf_settings)) as served:
        wait_ready(served.url)
        yield served.url


@pytest.fixture
def stub() -> Iterator[StubVLLM]:
    with StubVLLM() as server:
        yield server


ServiceFactory = Callable[..., str]


@pytest.fixture
def vllm_service(stub: StubVLLM) -> Iterator[ServiceFactory]:
    """Start a vLLM-engine service against `stub`; keyword arguments override settings."""
    started: list[ServedApp] = []

    def start(**overrides: Any) -> str:
        values: dict[str, Any] = {
            "model_source": "vllm",
            "vllm_base_url": stub.base_url,
            "vllm_retry_backoff_s": 0.01,
            **overrides,
        }
        served = ServedApp(create_app(make_settings(**values))).start()
        started.append(served)
        return served.url

    yield start
    for served in started:
        served.stop()


def corpus_document(name: str) -> Path:
    path = CORPUS / name
    if not path.exists():
        pytest.skip(f"corpus document {name} not present (../shared/corpus)")
    return path


def corpus_manifest() -> list[dict[str, Any]]:
    manifest = CORPUS / "manifest.json"
    if not manifest.exists():
        pytest.skip("../shared/corpus not present")
    documents: list[dict[str, Any]] = json.loads(manifest.read_text())["documents"]
    return documents
