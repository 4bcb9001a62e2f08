"""GET /api/jobs/{id}/events: a job followed as the streaming API's events, from any process, resumable."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.jobs import NewJob, SqliteJobStore
from app.results import Block, FinishedPage, PageResult
from tests.conftest import ServiceFactory
from tests.jobs.test_jobs_api import SMALL, Gates, holding
from tests.support.documents import make_pdf
from tests.support.jobs import submit, wait_status
from tests.support.openai_stub import StubVLLM


@pytest.fixture
def gates() -> Iterator[Gates]:
    held = Gates()
    yield held
    held.open_all()  # never leave a stub handler waiting


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


def ndjson_lines(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if line:
            event: dict[str, Any] = json.loads(line)
            if event["event"] != "ping":
                yield event


def sse_messages(response: httpx.Response) -> Iterator[dict[str, str]]:
    message: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if message:
                yield message
            message = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(": ")
            message[field] = value


def test_pages_show_as_soon_as_they_are_stored_then_the_result(
    stub: StubVLLM, vllm_service: ServiceFactory, db: Path, gates: Gates
) -> None:
    stub.responder = holding(gates)
    url = vllm_service(jobs_db=db)
    job = submit(url, make_pdf(3, SMALL)).json()
    with httpx.stream("GET", f"{url}/api/jobs/{job['id']}/events", timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        events = ndjson_lines(response)
        assert next(events) == {"event": "start", "total": 3, "pages": [1, 2, 3]}
        gates[2].set()  # page 2 finishes first: it is shown while 1 and 3 are still held
        page = next(events)
        assert (page["event"], page["page"]["page"], page["page"]["text"]) == ("page", 2, "page 2")
        assert next(events) == {"event": "progress", "done": 1, "total": 3}
        gates.open_all()
        rest = list(events)
    assert [e["event"] for e in rest] == ["page", "progress", "page", "progress", "result"]
    assert sorted(e["page"]["page"] for e in rest if e["event"] == "page") == [1, 3]
    final = rest[-1]["result"]
    assert final["status"] == "ok"
    assert [p["page"] for p in final["pages"]] == [1, 2, 3]
    assert final == httpx.get(f"{url}/api/jobs/{job['id']}/result", timeout=10).json()


def test_sse_ids_resume_after_the_pages_received(
    stub: StubVLLM, vllm_service: ServiceFactory, db: Path, gates: Gates
) -> None:
    stub.responder = holding(gates)
    url = vllm_service(jobs_db=db)
    job_id = submit(url, make_pdf(3, SMALL)).json()["id"]
    gates[3].set()
    gates[1].set()
    wait_status(url, job_id, "running")
    sse = {"Accept": "text/event-stream"}
    with httpx.stream("GET", f"{url}/api/jobs/{job_id}/events", headers=sse, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        messages = sse_messages(response)
        assert next(messages)["id"] == "0"  # start
        stored = []
        for _ in range(2):
            page, progress = next(messages), next(messages)
            assert page["event"] == "page"
            assert "id" not in page
            assert progress["event"] == "progress"
            stored.append(json.loads(page["data"])["page"]["page"])
            last_id = progress["id"]
    assert last_id == "2"
    # Reconnect as EventSource does: only what came after the second stored page, no `start` again.
    gates.open_all()
    resumed = {**sse, "Last-Event-ID": last_id}
    with httpx.stream("GET", f"{url}/api/jobs/{job_id}/events", headers=resumed, timeout=30) as response:
        rest = list(sse_messages(response))
    assert [m["event"] for m in rest] == ["page", "progress", "result"]
    assert json.loads(rest[0]["data"])["page"]["page"] == 2
    assert sorted(stored) == [1, 3]
    assert rest[1]["id"] == "3"
    # A finished job replays from any point at once; past its end only the final event is left.
    with httpx.stream("GET", f"{url}/api/jobs/{job_id}/events", headers={"Last-Event-ID": "3"}, timeout=30) as response:
        assert [e["event"] for e in ndjson_lines(response)] == ["result"]


@pytest.mark.parametrize("value", ["x", "-1", "4", "1.5"])
def test_a_bad_last_event_id_is_refused(stub: StubVLLM, vllm_service: ServiceFactory, db: Path, value: str) -> None:
    url = vllm_service(jobs_db=db)
    job_id = submit(url, make_pdf(3, SMALL)).json()["id"]
    response = httpx.get(f"{url}/api/jobs/{job_id}/events", headers={"Last-Event-ID": value}, timeout=10)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_last_event_id"


def test_unknown_job_is_404(stub: StubVLLM, vllm_service: ServiceFactory, db: Path) -> None:
    url = vllm_service(jobs_db=db)
    response = httpx.get(f"{url}/api/jobs/nope/events", timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"


def test_a_cancelled_job_ends_with_job_cancelled(
    stub: StubVLLM, vllm_service: ServiceFactory, db: Path, gates: Gates
) -> None:
    stub.responder = holding(gates)
    url = vllm_service(jobs_db=db)
    job_id = submit(url, make_pdf(3, SMALL)).json()["id"]
    with httpx.stream("GET", f"{url}/api/jobs/{job_id}/events", timeout=30) as response:
        events = ndjson_lines(response)
        assert next(events)["event"] == "start"
        gates[1].set()
        assert next(events)["event"] == "page"
        assert next(events)["event"] == "progress"
        assert httpx.delete(f"{url}/api/jobs/{job_id}", timeout=10).json()["status"] == "cancelled"
        final = next(events)
    assert final["event"] == "error"
    assert final["error"]["code"] == "job_cancelled"
    assert final["error"]["details"] == {"pages_done": 1, "pages_total": 3}


def test_followed_from_a_process_that_does_not_run_it(
    stub: StubVLLM, vllm_service: ServiceFactory, db: Path, gates: Gates
) -> None:
    """Two services on one SQLite file: only the first runs jobs; the second's followers see pages by polling."""
    stub.responder = holding(gates)
    runner_url = vllm_service(jobs_db=db)
    job_id = submit(runner_url, make_pdf(2, SMALL)).json()["id"]
    wait_status(runner_url, job_id, "running")
    follower_url = vllm_service(jobs_db=db)
    with httpx.stream("GET", f"{follower_url}/api/jobs/{job_id}/events", timeout=30) as response:
        events = ndjson_lines(response)
        assert next(events)["event"] == "start"
        gates[2].set()
        page = next(events)
        assert page["page"]["page"] == 2
        gates.open_all()
        assert [e["event"] for e in events] == ["progress", "page", "progress", "result"]


def _page(number: int) -> FinishedPage:
    result = PageResult.model_validate(
        {"page": number, "text": f"p{number}", "width": 1, "height": 1, "finish_reason": "stop",
         "tokens": 1, "seconds": 0.1, "status": "ok", "attempts": 1}
    )  # fmt: skip
    return FinishedPage(result, [Block(type="paragraph", page=number, text=f"p{number}")])


@pytest.mark.anyio
async def test_page_log_is_stored_order_and_skips_what_was_read(db: Path) -> None:
    store = SqliteJobStore(db, ttl_s=3600, max_bytes=10_000)
    job = NewJob(owner="a", pages=[1, 2, 3], pages_spec=None, password=None, callback_url=None, filename=None)
    record = await store.create(job, b"doc")
    leases = {lease.page: lease for lease in await store.claim("w", limit=3, lease_s=30)}
    for number in (3, 1, 3, 2):  # the second 3 is a duplicate: refused, its place kept
        await store.complete(leases[number], _page(number))
    log: Callable[[int], Any] = lambda after: store.page_log(record.id, after=after)  # noqa: E731
    assert [p.page for p in await log(0)] == [3, 1, 2]
    assert [p.page for p in await log(2)] == [2]
    assert await log(3) == []
    assert [p.page for p in await store.pages(record.id)] == [1, 2, 3]  # page order, unchanged
    store.close()


@pytest.mark.anyio
async def test_a_notification_from_another_connection_wakes_followers_at_once(postgres_url: str) -> None:
    """LISTEN/NOTIFY: a page stored by another replica wakes this replica's followers, not its poll (an hour here)."""
    import psycopg

    from app.jobs.events import JobFeed, NotifyListener
    from app.jobs.store.postgres import NOTIFY_CHANNEL

    feed = JobFeed(poll_s=3600)
    listener = NotifyListener(postgres_url, {NOTIFY_CHANNEL: feed.notify})
    await listener.start()
    try:
        await asyncio.wait_for(listener.listening.wait(), 30)
        mine, other = feed.subscribe("job-1"), feed.subscribe("job-2")
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
            await conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, "job-1"))
        await asyncio.wait_for(feed.wait(mine), 30)  # returns at once when notified; the poll is an hour
        assert not other.is_set()
    finally:
        await listener.stop()
