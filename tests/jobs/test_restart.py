"""kill -9 in the middle of a job, restart on the same JOBS_DB: every page is computed exactly once.

The service runs as a real uvicorn process (so kill -9 really kills it); the
vLLM stand-in runs in this test process and counts page-level work. The killed
process's pages are leased to it until JOB_LEASE_S (3 s here) passed; then any
process takes them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from app.jobs import NewJob, SqliteJobStore
from tests.conftest import ServiceFactory
from tests.support.documents import make_pdf, page_id_of
from tests.support.http import free_port
from tests.support.jobs import wait_job, wait_status
from tests.support.openai_stub import Reply, StubRequest, StubVLLM

ROOT = Path(__file__).resolve().parents[2]
PAGES, ANSWERED_FIRST = 5, 2


@contextmanager
def service_process(stub: StubVLLM, jobs_db: Path | str, log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {
        **os.environ,
        "MODEL_SOURCE": "vllm",
        "VLLM_BASE_URL": stub.base_url,
        "JOBS_DB": str(jobs_db),
        "MAX_CONCURRENT_PAGES": "4",
        "JOB_LEASE_S": "3",
        "VLLM_RETRY_BACKOFF_S": "0.01",
        "API_KEYS": "",
        "API_KEYS_FILE": "",
    }
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("ab") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"service exited with {process.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"service never answered: {log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


@pytest.fixture(params=["sqlite", "postgres"])
def jobs_db(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """A SQLite file, or a fresh database on the test session's PostgreSQL."""
    if request.param == "sqlite":
        return tmp_path / "jobs.db"
    return str(request.getfixturevalue("postgres_url"))


def test_kill_9_mid_job_then_resume(tmp_path: Path, jobs_db: Path | str) -> None:
    restarted = threading.Event()
    page_of: dict[str, int] = {}

    async def responder(request: StubRequest) -> Reply:
        page = page_id_of(request.image)
        assert page is not None
        page_of[request.sha256] = page
        if page > ANSWERED_FIRST and not restarted.is_set():
            await asyncio.to_thread(restarted.wait, 60)  # held until the first process is dead
        return Reply(text=f"page {page}")

    log = tmp_path / "service.log"
    with StubVLLM(responder) as stub:
        try:
            with service_process(stub, jobs_db, log) as (url, process):
                response = httpx.post(
                    f"{url}/api/jobs", files={"file": ("a.pdf", make_pdf(PAGES, (200, 260)))}, timeout=30
                )
                assert response.status_code == 202
                job_id = response.json()["id"]
                wait_job(url, job_id, lambda job: job["pages_done"] == ANSWERED_FIRST)
                stub.wait_until(lambda s: s.in_flight == PAGES - ANSWERED_FIRST, timeout=30)
                process.send_signal(signal.SIGKILL)
                process.wait(10)
            # The held pages were in flight when the process died: vLLM saw them dropped, not answered.
            stub.wait_until(lambda s: s.in_flight == 0, timeout=30)
            assert stub.completed == ANSWERED_FIRST
            restarted.set()

            with service_process(stub, jobs_db, log) as (url, _):
                job = wait_status(url, job_id, "succeeded", "partial", "failed")
                result = httpx.get(f"{url}/api/jobs/{job_id}/result", timeout=10).json()
        finally:
            restarted.set()

        assert job["status"] == "succeeded", job
        assert [page["page"] for page in result["pages"]] == list(range(1, PAGES + 1))
        assert result["text"] == "\n\n".join(f"page {n}" for n in range(1, PAGES + 1))
        requests = stub.requests
        answered = Counter(page_of[record.sha256] for record in requests if record.outcome == "ok")
        sent = Counter(page_of[record.sha256] for record in requests)
        assert answered == dict.fromkeys(range(1, PAGES + 1), 1)  # every page computed exactly once
        for page in range(1, ANSWERED_FIRST + 1):
            assert sent[page] == 1  # finished before the kill: never sent again
        assert stub.violations == []


def seed(path: Path, *documents: bytes, owner: str = "addr:127.0.0.1") -> list[str]:
    """Jobs queued by an earlier process, as that process left them in JOBS_DB."""

    async def create() -> list[str]:
        store = SqliteJobStore(path, ttl_s=3600, max_bytes=10**7)
        ids = []
        for document in documents:
            new = NewJob(owner=owner, pages=[1, 2], pages_spec=None, password=None, callback_url=None, filename=None)
            ids.append((await store.create(new, document)).id)
        store.close()
        return ids

    return asyncio.run(create())


def test_a_job_that_no_longer_passes_fails_with_the_reason(
    stub: StubVLLM, vllm_service: ServiceFactory, tmp_path: Path
) -> None:
    """MAX_PAGES lowered between two runs: the resumed job fails with too_many_pages instead of looping."""
    [job_id] = seed(tmp_path / "jobs.db", make_pdf(2, (200, 260)))
    url = vllm_service(jobs_db=tmp_path / "jobs.db", max_pages=1)
    job = wait_status(url, job_id, "succeeded", "partial", "failed")
    assert job["status"] == "failed"
    assert job["error"]["code"] == "too_many_pages"
    assert stub.requests == []


def test_admission_refusals_at_run_time_wait(stub: StubVLLM, vllm_service: ServiceFactory, tmp_path: Path) -> None:
    """Two resumed jobs of one client, KEY_MAX_PAGES_IN_FLIGHT=2: the second waits its turn, it does not fail."""
    release = threading.Event()

    async def hold(request: StubRequest) -> Reply:
        await asyncio.to_thread(release.wait, 30)
        return Reply()

    stub.responder = hold
    ids = seed(tmp_path / "jobs.db", make_pdf(2, (200, 260)), make_pdf(2, (210, 260)))
    try:
        url = vllm_service(jobs_db=tmp_path / "jobs.db", key_max_pages_in_flight=2, jobs_concurrency=2)
        stub.wait_until(lambda s: s.in_flight == 2, timeout=20)
        jobs = [httpx.get(f"{url}/api/jobs/{job_id}").json() for job_id in ids]
        assert sorted(job["status"] for job in jobs) in (["queued", "running"], ["running", "running"])
        waiting = [job["waiting"]["code"] for job in jobs if job["waiting"] is not None]
        assert waiting in ([], ["too_many_pages_in_flight"])  # the second: claimed and waiting, or not claimed yet
    finally:
        release.set()
    for job_id in ids:
        assert wait_status(url, job_id, "succeeded", "partial", "failed")["status"] == "succeeded"
    assert stub.max_in_flight == 2


def test_two_services_on_one_db_share_a_job_and_a_cancel_through_either_stops_it(
    stub: StubVLLM, vllm_service: ServiceFactory, tmp_path: Path
) -> None:
    """Both services work the job (2 pages each claimed at a time); a cancel through one aborts the other's pages
    at the engine within a lease renewal, and the pages not started are never sent."""
    release = threading.Event()

    async def hold(request: StubRequest) -> Reply:
        await asyncio.to_thread(release.wait, 30)
        return Reply(text="held")

    path = tmp_path / "jobs.db"
    seed(path, make_pdf(2, (200, 260)))
    first = vllm_service(jobs_db=path, max_concurrent_pages=2, jobs_claim_batch=2, jobs_concurrency=1)
    second = vllm_service(jobs_db=path, max_concurrent_pages=2, jobs_claim_batch=2, jobs_concurrency=1)
    [first_id] = [job["id"] for job in httpx.get(f"{second}/api/jobs").json()["jobs"]]
    assert wait_status(second, first_id, "succeeded")["pages_done"] == 2

    stub.responder = hold
    try:
        response = httpx.post(f"{second}/api/jobs", files={"file": ("a.pdf", make_pdf(8, (200, 260)))}, timeout=30)
        job_id = response.json()["id"]
        stub.wait_until(lambda s: s.in_flight == 4, timeout=20)  # two pages at each service
        assert httpx.get(f"{first}/api/jobs/{job_id}").json()["status"] == "running"
        assert httpx.delete(f"{second}/api/jobs/{job_id}").json()["status"] == "cancelled"
        stub.wait_until(lambda s: s.in_flight == 0, timeout=5)  # both services dropped theirs, before any answer
    finally:
        release.set()
    assert [record.outcome for record in stub.requests[2:]] == ["cancelled"] * 4  # the 4 pages not started: never sent
    assert httpx.get(f"{first}/api/jobs/{job_id}").json()["status"] == "cancelled"
