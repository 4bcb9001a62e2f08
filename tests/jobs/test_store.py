"""SqliteJobStore on a real file, with a fake clock for TTL and ETA."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from app.errors import JobsStorageFull
from app.jobs import NewJob, SqliteJobStore
from app.results import Block, FinishedPage, PageError, PageResult

pytestmark = pytest.mark.anyio

TTL_S = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> SqliteJobStore:
    return SqliteJobStore(tmp_path / "jobs.db", ttl_s=TTL_S, max_bytes=10_000, clock=clock)


def new_job(owner: str = "key:a", pages: int = 3, callback_url: str | None = None) -> NewJob:
    return NewJob(
        owner=owner,
        pages=list(range(1, pages + 1)),
        pages_spec=None,
        password="secret",
        callback_url=callback_url,
        filename="a.pdf",
    )


def page(number: int, status: str = "ok") -> FinishedPage:
    result = PageResult.model_validate(
        {"page": number, "text": f"page {number}", "width": 10, "height": 20, "finish_reason": "stop",
         "tokens": 2, "seconds": 0.1, "status": status, "attempts": 1}
    )  # fmt: skip
    return FinishedPage(result, [Block(type="paragraph", page=number, text=f"page {number}")])


async def test_nothing_is_written_before_the_first_job(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = SqliteJobStore(path, ttl_s=TTL_S, max_bytes=1000)
    assert await store.get("x") is None
    assert await store.next_queued() is None
    assert await store.requeue_running() == 0
    assert await store.pending_webhooks() == []
    assert await store.sweep() == 0
    assert await store.list_jobs() == []
    assert not path.exists()


async def test_create_stores_the_job_and_document(store: SqliteJobStore, clock: Clock) -> None:
    record = await store.create(new_job(), b"%PDF-bytes")
    assert record.status == "queued"
    assert record.pages == [1, 2, 3]
    assert record.pages_total == 3
    assert record.pages_done == 0
    assert record.password == "secret"
    assert record.created_at == clock.now
    assert record.stored_bytes == len(b"%PDF-bytes")
    assert await store.used_bytes() == len(b"%PDF-bytes")
    assert await store.document(record.id) == b"%PDF-bytes"
    assert await store.get(record.id) == record
    # Passwords and documents live in the file: owner-only permissions, WAL journal.
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_pages_are_stored_once_and_survive_reopening(store: SqliteJobStore, clock: Clock) -> None:
    record = await store.create(new_job(), b"doc")
    assert await store.mark_running(record.id)
    await store.add_page(record.id, page(2))
    await store.add_page(record.id, page(2))  # a duplicate is ignored, not double-counted
    await store.add_page(record.id, page(1, "failed"))
    store.close()
    reopened = SqliteJobStore(store.path, ttl_s=TTL_S, max_bytes=10_000, clock=clock)
    assert [p.page for p in await reopened.pages(record.id)] == [1, 2]
    assert (await reopened.pages(record.id))[0].result.status == "failed"
    again = await reopened.get(record.id)
    assert again is not None
    assert again.pages_done == 2
    assert again.status == "running"
    assert again.stored_bytes > len(b"doc")


async def test_eta_from_this_runs_page_rate(store: SqliteJobStore, clock: Clock) -> None:
    record = await store.create(new_job(pages=5), b"doc")
    assert await store.mark_running(record.id)
    running = await store.get(record.id)
    assert running is not None
    assert running.eta_s(clock.now) is None
    clock.now += 4
    await store.add_page(record.id, page(1))
    await store.add_page(record.id, page(2))
    running = await store.get(record.id)
    assert running is not None
    assert running.eta_s(clock.now) == 6.0  # 2 pages in 4 s, 3 left
    # A new run (after a restart) measures its own rate: pages of earlier runs do not count.
    clock.now += 100
    assert await store.requeue_running() == 1
    assert await store.mark_running(record.id)
    resumed = await store.get(record.id)
    assert resumed is not None
    assert resumed.pages_done == 2
    assert resumed.eta_s(clock.now) is None


async def test_state_transitions(store: SqliteJobStore) -> None:
    record = await store.create(new_job(callback_url="http://127.0.0.1:9/hook"), b"doc")
    assert await store.mark_running(record.id)
    done = await store.finish(record.id, "partial")
    assert done is not None
    assert done.status == "partial"
    assert done.webhook == "pending"
    assert done.expires_at == done.finished_at + TTL_S  # type: ignore[operator]
    cancelled, changed = await store.cancel(record.id)
    assert not changed
    assert cancelled is not None
    assert cancelled.status == "partial"
    assert [r.id for r in await store.pending_webhooks()] == [record.id]
    await store.set_webhook(record.id, "delivered", 2)
    delivered = await store.get(record.id)
    assert delivered is not None
    assert delivered.webhook == "delivered"
    assert delivered.webhook_attempts == 2
    assert await store.pending_webhooks() == []


async def test_cancel_wins_over_a_late_finish(store: SqliteJobStore) -> None:
    record = await store.create(new_job(), b"doc")
    assert await store.mark_running(record.id)
    cancelled, changed = await store.cancel(record.id)
    assert changed
    assert cancelled is not None
    assert cancelled.status == "cancelled"
    assert cancelled.webhook is None  # no callback_url, no webhook
    assert await store.finish(record.id, "succeeded") is None
    assert not await store.mark_running(record.id)


async def test_next_queued_is_fifo_but_prefers_idle_owners(store: SqliteJobStore, clock: Clock) -> None:
    first = await store.create(new_job("key:a"), b"1")
    clock.now += 1
    second = await store.create(new_job("key:a"), b"2")
    clock.now += 1
    third = await store.create(new_job("key:b"), b"3")
    assert (await store.next_queued()).id == first.id  # type: ignore[union-attr]
    assert (await store.next_queued([first.id])).id == second.id  # type: ignore[union-attr]
    # key:a already has a job running: key:b's younger job goes first.
    assert (await store.next_queued([first.id], {"key:a"})).id == third.id  # type: ignore[union-attr]
    assert await store.next_queued([first.id, second.id, third.id]) is None


async def test_listing_by_owner(store: SqliteJobStore, clock: Clock) -> None:
    a = await store.create(new_job("key:a"), b"1")
    clock.now += 1
    b = await store.create(new_job("key:b"), b"2")
    assert [r.id for r in await store.list_jobs()] == [b.id, a.id]  # newest first
    assert [r.id for r in await store.list_jobs("key:a")] == [a.id]


async def test_expired_jobs_vanish_and_free_their_bytes(store: SqliteJobStore, clock: Clock) -> None:
    record = await store.create(new_job(), b"x" * 4000)
    assert await store.mark_running(record.id)
    await store.add_page(record.id, page(1))
    assert await store.finish(record.id, "succeeded") is not None
    clock.now += TTL_S - 1
    assert await store.get(record.id) is not None
    assert await store.sweep() == 0
    clock.now += 1
    assert await store.get(record.id) is None  # checked on read, before any sweep
    assert await store.list_jobs() == []
    assert await store.sweep() == 1
    assert await store.used_bytes() == 0
    assert await store.document(record.id) is None
    assert await store.pages(record.id) == []


async def test_storage_bound(store: SqliteJobStore) -> None:
    await store.create(new_job(), b"x" * 6000)
    with pytest.raises(JobsStorageFull) as refused:
        await store.create(new_job(), b"y" * 4001)
    assert refused.value.status == 507
    assert refused.value.details["max_bytes"] == 10_000
    assert len(await store.list_jobs()) == 1
    await store.create(new_job(), b"y" * 4000)  # exactly up to the bound is fine


async def test_one_worker_per_file(store: SqliteJobStore, clock: Clock) -> None:
    other = SqliteJobStore(store.path, ttl_s=TTL_S, max_bytes=10_000, clock=clock)
    assert not store.claim_worker()  # no file yet: nothing to run
    record = await store.create(new_job(), b"doc")
    assert store.claim_worker()
    assert store.claim_worker()  # held: asking again is fine
    assert not other.claim_worker()
    store.close()  # (a dead process releases it the same way: the kernel closes its files)
    assert other.claim_worker()
    assert await other.mark_running(record.id)
    assert await other.add_page(record.id, page(1))
    await store.cancel(record.id)  # another process cancels: the worker learns at its next page
    assert not await other.add_page(record.id, page(2))
    other.close()


async def test_pages_keep_their_blocks_and_error_details(
    store: SqliteJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks are stored with the page (never parsed again on read); a failed page keeps its error's details."""
    record = await store.create(new_job(), b"doc")
    assert await store.mark_running(record.id)
    stored = page(1)
    blocks = [Block(type="heading", page=1, text="# not the text", level=1)]  # differs from parsing the text
    await store.add_page(record.id, FinishedPage(stored.result, blocks))
    error = PageError(code="engine_error", message="vLLM said 400", details={"upstream_status": 400})
    failed = stored.result.model_copy(update={"page": 2, "status": "failed", "text": "", "error": error})
    await store.add_page(record.id, FinishedPage(failed, []))

    def no_parsing(*args: object) -> None:
        raise AssertionError("blocks parsed again on read")

    monkeypatch.setattr("app.jobs.store.parse_blocks", no_parsing)
    first, second = await store.pages(record.id)
    assert first.blocks == blocks
    assert second.result.error == error


async def test_delete_removes_the_job_document_and_pages(store: SqliteJobStore) -> None:
    record = await store.create(new_job(), b"x" * 4000)
    assert await store.mark_running(record.id)
    await store.add_page(record.id, page(1))
    assert await store.delete(record.id)
    assert await store.get(record.id) is None
    assert await store.document(record.id) is None
    assert await store.pages(record.id) == []
    assert await store.used_bytes() == 0
    assert not await store.delete(record.id)
