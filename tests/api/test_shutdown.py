"""Graceful shutdown of the real process: SIGTERM stops new connections, lets in-flight requests finish.

The service runs as a real `python -m uvicorn app.main:app` subprocess (signals, listening socket and
exit status are the real ones); the vLLM stub runs in this process and holds the pages behind a gate,
so "in flight while SIGTERM arrives" is forced by events, not timing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.documents import make_pdf
from tests.support.gate import Gate
from tests.support.http import free_port
from tests.support.openai_stub import StubVLLM

ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 20


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll a condition of another process (no event to wait on across processes); bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def is_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


ServiceProcess = tuple[subprocess.Popen[bytes], int, Path]


@pytest.fixture
def service_process(stub: StubVLLM, tmp_path: Path) -> Iterator[ServiceProcess]:
    yield from _serve(stub, tmp_path, GRACE_S)


@pytest.fixture
def impatient_process(stub: StubVLLM, tmp_path: Path) -> Iterator[ServiceProcess]:
    """A grace period shorter than the work in flight: SIGTERM cuts the requests."""
    yield from _serve(stub, tmp_path, 1)


def _serve(stub: StubVLLM, tmp_path: Path, grace_s: int) -> Iterator[ServiceProcess]:
    port = free_port()
    env = {
        **os.environ,
        "MODEL_SOURCE": "vllm",
        "VLLM_BASE_URL": stub.base_url,
        "JOBS_DB": str(tmp_path / "jobs.db"),  # never write into the working tree
        "API_KEYS": "",
    }
    log = tmp_path / "service.log"
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
               "--timeout-graceful-shutdown", str(grace_s)]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: process.poll() is not None or is_ready(f"http://127.0.0.1:{port}"), "the service", 60)
        assert process.poll() is None, log.read_text()
        yield process, port, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(
    service_process: tuple[subprocess.Popen[bytes], int, Path], stub: StubVLLM
) -> None:
    process, port, log = service_process
    url = f"http://127.0.0.1:{port}"
    gate = Gate()
    stub.responder = gate
    pdf = make_pdf(2, page_size_pt=(216, 288))
    with ThreadPoolExecutor(1) as pool:
        try:
            in_flight = pool.submit(httpx.post, f"{url}/api/inference", files={"file": ("doc.pdf", pdf)}, timeout=60)
            stub.wait_until(lambda s: s.in_flight == 2, timeout=30)

            process.send_signal(signal.SIGTERM)
            wait_for(lambda: refuses_connections(port), "the listening socket to close")
            assert not in_flight.done()  # the request is still held by the stub
            assert process.poll() is None  # ... and the process waits for it
        finally:
            gate.open()
        response = in_flight.result(timeout=30)

    assert response.status_code == 200, response.text
    assert [page["text"] for page in response.json()["pages"]] == ["page 1", "page 2"]
    returncode = process.wait(GRACE_S)  # well within the grace period: nothing is left to wait for
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly, so "clean" is either 0
    # or death by that SIGTERM (-15 here, 143 in a shell); anything else is a crash.
    assert returncode in (0, -signal.SIGTERM), log.read_text()
    output = log.read_text()
    assert "Finished server process" in output
    assert "Traceback" not in output
    assert stub.cancelled == 0  # no page was abandoned


def test_requests_cut_by_shutdown_get_503_shutting_down(impatient_process: ServiceProcess, stub: StubVLLM) -> None:
    """Past the grace period a plain request gets the JSON 503 and a stream ends with an `error` event.

    The stub holds every page until the test ends, so both requests are still in flight when the
    grace period runs out (forced by the gate, not by timing).
    """
    process, port, log = impatient_process
    url = f"http://127.0.0.1:{port}"
    gate = Gate(max_wait_s=60)
    stub.responder = gate
    pdf = make_pdf(2, page_size_pt=(216, 288))

    def stream() -> list[dict[str, object]]:
        headers = {"Accept": "application/x-ndjson"}
        files = {"file": ("doc.pdf", pdf)}
        with httpx.stream("POST", f"{url}/api/inference", files=files, headers=headers, timeout=60) as response:
            assert response.status_code == 200
            return [json.loads(line) for line in response.iter_lines() if line]

    with ThreadPoolExecutor(2) as pool:
        try:
            plain = pool.submit(httpx.post, f"{url}/api/inference", files={"file": ("doc.pdf", pdf)}, timeout=60)
            stub.wait_until(lambda s: s.in_flight == 2, timeout=30)
            streamed = pool.submit(stream)
            stub.wait_until(lambda s: s.in_flight == 4, timeout=30)
            process.send_signal(signal.SIGTERM)
            response = plain.result(timeout=30)
            events = streamed.result(timeout=30)
        finally:
            gate.open()

    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "shutting_down"
    assert int(response.headers["retry-after"]) > 0
    assert [event["event"] for event in events] == ["start", "error"]
    assert events[-1]["error"]["code"] == "shutting_down"  # type: ignore[index]
    returncode = process.wait(30)
    output = log.read_text()
    assert returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output
    assert "Exception in ASGI application" not in output
