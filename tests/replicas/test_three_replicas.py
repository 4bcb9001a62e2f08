"""Three real uvicorn replicas on one job store, the vLLM stand-in as engine; one of them killed with kill -9.

20 jobs of 10 pages are submitted over the three replicas, one replica is killed mid-way and started again
later. Every job must end `succeeded` with the result a single process gives; the stand-in must have seen every
page once, plus at most the pages that were in flight on the killed replica. Meanwhile a job is followed from
replica C (GET /api/jobs/{id}/events), and every job's webhook arrives once: twice only for a job whose webhook
the killed replica had sent and not yet recorded (delivery is at least once, `app/jobs/outbox.py`). A job
submitted to A and cancelled through B stops everywhere.

On PostgreSQL every replica works on every job (page leases); on a SQLite file one replica runs the jobs and
another takes over when it dies, which the same scenario checks.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.jobs.outbox import BATCH as OUTBOX_BATCH
from app.jobs.webhooks import TIMESTAMP_HEADER
from app.main import create_app
from tests.conftest import make_settings
from tests.jobs.test_webhooks import Receiver
from tests.replicas.cluster import Replica, replica_env, start_cluster
from tests.support.documents import make_pdf, page_id_of
from tests.support.jobs import wait_job
from tests.support.openai_stub import Reply, StubRequest, StubVLLM
from tests.support.server import ServedApp

JOBS, PAGES = 20, 10
CONCURRENCY, BATCH = 2, 2  # per replica: at most CONCURRENCY * BATCH pages in flight (bounds the recomputed pages)
TERMINAL = ("succeeded", "partial", "failed", "cancelled")


def document(index: int) -> bytes:
    """Job `index`'s PDF: its own page width, so its pages' images differ from every other job's."""
    return make_pdf(PAGES, (120 + 7 * index, 160))


class Engine:
    """The stand-in's answers: each page's text names its image, so results tell pages apart."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.key_of: dict[str, tuple[int, int]] = {}  # image sha -> (width, page)
        self.go = threading.Event()  # pages wait until every job is submitted: the kill finds work left
        self.go.set()
        self._lock = threading.Lock()

    async def __call__(self, request: StubRequest) -> Reply:
        page = page_id_of(request.image)
        assert page is not None
        key = (request.image.width, page)
        with self._lock:
            self.key_of[request.sha256] = key
        if not self.go.is_set():
            await asyncio.to_thread(self.go.wait, 60)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return Reply(text=f"# Page {page} of the {request.image.width} px document\n\nBody of page {page}.")


def normalized(result: Any) -> Any:
    """A result without its timings (the only fields a run may change)."""
    if isinstance(result, dict):
        return {key: normalized(value) for key, value in result.items() if key not in ("seconds", "eta_s")}
    if isinstance(result, list):
        return [normalized(value) for value in result]
    return result


def single_process_results(stub: StubVLLM, tmp_path: Path) -> list[Any]:
    settings = make_settings(model_source="vllm", vllm_base_url=stub.base_url, jobs_db=tmp_path / "single.db")
    with ServedApp(create_app(settings)) as served:
        results = []
        for index in range(JOBS):
            response = httpx.post(
                f"{served.url}/api/inference", files={"file": ("d.pdf", document(index))}, timeout=120
            )
            assert response.status_code == 200, response.text
            results.append(normalized(response.json()))
    return results


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    hook = Receiver()
    with ServedApp(hook.app, lifespan="off") as served:
        yield hook, f"{served.url}/hook"


def follow(url: str, job_id: str, into: list[dict[str, Any]]) -> None:
    with httpx.stream("GET", f"{url}/api/jobs/{job_id}/events", timeout=httpx.Timeout(10, read=120)) as response:
        for line in response.iter_lines():
            if line:
                event = json.loads(line)
                if event["event"] != "ping":
                    into.append(event)


def pages_done(replica: Replica, ids: list[str]) -> int:
    jobs = httpx.get(f"{replica.url}/api/jobs", params={"limit": 1000}, timeout=10).json()["jobs"]
    return sum(job["pages_done"] for job in jobs if job["id"] in ids)


@pytest.fixture(params=["postgres", "sqlite"])
def jobs_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "jobs.db")
    if not hasattr(importlib.import_module("app.jobs.store"), "PostgresJobStore"):
        pytest.skip("the PostgreSQL job store is not in this tree yet")
    url: str = request.getfixturevalue("postgres_url")
    return url


def test_three_replicas_one_killed(jobs_db: str, tmp_path: Path, receiver: tuple[Receiver, str]) -> None:
    hook, hook_url = receiver
    engine = Engine(delay_s=0.0)
    with StubVLLM(engine) as stub:
        expected = single_process_results(stub, tmp_path)
        stub.reset()
        engine.delay_s = 0.1  # pages take a moment: the kill finds some in flight
        engine.go.clear()
        env = replica_env(
            stub.base_url,
            jobs_db,
            JOB_LEASE_S="2",
            JOBS_CONCURRENCY=str(CONCURRENCY),
            JOBS_CLAIM_BATCH=str(BATCH),
            MAX_CONCURRENT_PAGES=str(CONCURRENCY * BATCH),
        )
        a, b, c = replicas = start_cluster(["a", "b", "c"], env, tmp_path / "logs")
        try:
            ids = []
            for index in range(JOBS):
                response = httpx.post(
                    f"{replicas[index % 3].url}/api/jobs",
                    files={"file": ("d.pdf", document(index))},
                    data={"callback_url": hook_url},
                    timeout=30,
                )
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])
            engine.go.set()
            followed: list[dict[str, Any]] = []
            follower = threading.Thread(target=follow, args=(c.url, ids[JOBS - 1], followed), daemon=True)
            follower.start()

            # Mid-way: kill -9 replica b, then start it again a little later.
            deadline = time.monotonic() + 120
            while pages_done(c, ids) < JOBS * PAGES // 4:
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.05)
            killed_wall = time.time()
            b.kill9()
            killed_at = pages_done(c, ids)
            while pages_done(c, ids) < min(killed_at + PAGES, JOBS * PAGES):
                assert time.monotonic() < deadline, "no progress after the kill"
                time.sleep(0.05)
            b.start()
            b.wait_ready()

            # Cancel through b a job submitted to a, while it runs.
            engine.delay_s = 0.2
            target = httpx.post(f"{a.url}/api/jobs", files={"file": ("d.pdf", make_pdf(40, (111, 160)))}, timeout=30)
            target_id = target.json()["id"]
            wait_job(a.url, target_id, lambda job: job["pages_done"] >= 1, timeout=120)
            cancelled = httpx.delete(f"{b.url}/api/jobs/{target_id}", timeout=10).json()
            assert cancelled["status"] == "cancelled"
            stopped_at = time.monotonic()
            assert wait_job(a.url, target_id, lambda job: job["status"] == "cancelled", timeout=3)
            engine.delay_s = 0.0

            finished = [wait_job(c.url, job_id, lambda job: job["status"] in TERMINAL, timeout=240) for job_id in ids]
            assert [job["status"] for job in finished] == ["succeeded"] * JOBS
            for index, job_id in enumerate(ids):
                got = httpx.get(f"{replicas[(index + 1) % 3].url}/api/jobs/{job_id}/result", timeout=30)
                assert normalized(got.json()) == expected[index], f"job {index} differs from a single process"

            # The stand-in: each page answered; sent again only if it was in flight on the killed replica.
            sent = Counter(engine.key_of[record.sha256] for record in stub.requests)
            widths = {width for width, _ in sent}
            assert len(widths) == JOBS + 1  # the 20 jobs and the cancelled one
            target_width = min(widths)  # 111 pt: the narrowest
            job_pages = {key: count for key, count in sent.items() if key[0] != target_width}
            assert len(job_pages) == JOBS * PAGES
            twice = {key: count for key, count in job_pages.items() if count > 1}
            assert sum(count - 1 for count in twice.values()) <= CONCURRENCY * BATCH, twice

            # The cancelled job: pages stopped within a second or two; the rest never reached the engine.
            late = [
                record
                for record in stub.requests
                if engine.key_of[record.sha256][0] == target_width and record.received_at > stopped_at + 2
            ]
            assert late == []
            assert sum(1 for key in sent if key[0] == target_width) < 40

            # Followed from c: every page once, in stored order, then the same result.
            follower.join(60)
            assert followed[0]["event"] == "start"
            page_events = [event["page"]["page"] for event in followed if event["event"] == "page"]
            assert sorted(page_events) == list(range(1, PAGES + 1))
            progress = [event["done"] for event in followed if event["event"] == "progress"]
            assert progress == list(range(1, PAGES + 1))
            assert followed[-1]["event"] == "result"
            assert normalized(followed[-1]["result"]) == expected[JOBS - 1]

            # One webhook per job (and one for the cancelled job, which had no callback: none). A second copy
            # only where the killed replica had posted the first and died before recording it: that first copy
            # was sent before the kill, and b held at most one outbox claim then.
            for job_id in ids:
                wait_job(c.url, job_id, lambda job: (job["webhook"] or {}).get("state") == "delivered", timeout=60)
            delivered = Counter(json.loads(body)["id"] for _, body in hook.received)
            assert set(delivered) == set(ids)
            again = {job_id for job_id, count in delivered.items() if count > 1}
            assert all(delivered[job_id] == 2 for job_id in again), delivered
            assert len(again) <= OUTBOX_BATCH, again
            first_sent: dict[str, int] = {}
            for headers, body in hook.received:
                first_sent.setdefault(json.loads(body)["id"], int(headers[TIMESTAMP_HEADER.lower()]))
            assert all(first_sent[job_id] <= killed_wall for job_id in again), (first_sent, killed_wall)
            assert stub.violations == []
        except BaseException:
            for replica in replicas:  # what each replica said, for the failure report
                print(f"----- {replica.name} (log {replica.log}) -----\n{replica.tail(6000)}")
            raise
        finally:
            for replica in replicas:
                replica.kill9()
