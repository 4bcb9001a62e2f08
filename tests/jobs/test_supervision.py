"""The job runner's background loops are watched: one that dies makes /ready 503 with a message."""

from __future__ import annotations

import time

import httpx
import pytest

from app.jobs import JobRunner
from app.main import create_app
from tests.conftest import make_settings, wait_ready
from tests.support.openai_stub import StubVLLM
from tests.support.server import ServedApp


@pytest.mark.parametrize("loop", ["jobs-loop", "jobs-sweep"])
def test_a_dead_runner_loop_makes_ready_fail(stub: StubVLLM, loop: str) -> None:
    app = create_app(make_settings(model_source="vllm", vllm_base_url=stub.base_url))
    with ServedApp(app) as served:
        wait_ready(served.url)
        runner: JobRunner = app.state.jobs
        task = next(task for task in runner._background if task.get_name() == loop)
        task.get_loop().call_soon_threadsafe(task.cancel)  # the way a bug would end it, from outside
        deadline = time.monotonic() + 20
        while (ready := httpx.get(f"{served.url}/ready")).status_code == 200:
            assert time.monotonic() < deadline, "/ready never noticed the dead loop"
            time.sleep(0.02)
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "service_unavailable"
        assert loop in ready.json()["error"]["message"]
        assert "Retry-After" in ready.headers
