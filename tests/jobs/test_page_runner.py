"""Page-level runners sharing one store (SQLite file or real PostgreSQL): two runners work one job, a cancel
through one stops the other's pages at the engine, and a dead worker's pages are taken over once its lease
expired. Each runner has its own service and engine, as two replicas would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from app.errors import StoreUnavailable
from app.jobs import JobRecord, JobRunner, Lease, NewJob, PostgresJobStore, SqliteJobStore
from app.jobs import runner as runner_module
from app.jobs.store import SqlJobStore
from app.main import notify_listener
from app.results import Generation
from app.service import OCRService
from tests.conftest import make_settings
from tests.support.documents import make_pdf
from tests.support.engines import FakeEngine
from tests.support.postgres import PASSWORD, start_postgres

pytestmark = pytest.mark.anyio

LEASE_S = 30.0
OWNER = "key:a"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Callable[[], float]], SqlJobStore]:
    """Opens a handle on one shared database per call (one per runner, as one per process)."""
    if request.param == "sqlite":
        return lambda clock: SqliteJobStore(tmp_path / "jobs.db", ttl_s=3600, max_bytes=10**8, clock=clock)
    url = request.getfixturevalue("postgres_url")
    return lambda clock: PostgresJobStore(url, ttl_s=3600, max_bytes=10**8, pool_size=4, clock=clock)


@contextlib.asynccontextmanager
async def runner(
    store: SqlJobStore, answer: Callable[[int], Awaitable[Generation]], **options: int
) -> AsyncIterator[tuple[JobRunner, FakeEngine]]:
    engine = FakeEngine(answer, window=16)
    service = OCRService(make_settings(model_source="vllm"), engine=engine)
    await service.start(wait=True)
    jobs = JobRunner(service, store, concurrency=options.get("concurrency", 2),
                     batch=options.get("batch", 2), lease_s=LEASE_S, clock=store.clock)  # fmt: skip
    await jobs.start()
    try:
        yield jobs, engine
    finally:
        await jobs.stop()
        await service.close()


async def submit(store: SqlJobStore, pages: int, owner: str = OWNER) -> JobRecord:
    new = NewJob(owner=owner, pages=list(range(1, pages + 1)), pages_spec=None, password=None, callback_url=None,
                 filename=None)  # fmt: skip
    return await store.create(new, make_pdf(pages, (100, 130)))


async def until(condition: Callable[[], Awaitable[bool]], within: float = 20) -> None:
    """Poll (bounded) until `condition()`; a failure says it timed out."""
    async with asyncio.timeout(within):
        while not await condition():  # noqa: ASYNC110  (the condition is in the database: nothing to wait on)
            await asyncio.sleep(0.02)


async def ended(store: SqlJobStore, job_id: str) -> str:
    async def done() -> bool:
        record = await store.get(job_id)
        return record is not None and record.finished

    await until(done)
    record = await store.get(job_id)
    assert record is not None
    return record.status


async def test_two_runners_share_one_job_and_compute_each_page_once(
    open_store: Callable[[Callable[[], float]], SqlJobStore],
) -> None:
    clock = Clock()
    a_store, b_store = open_store(clock), open_store(clock)
    record = await submit(a_store, 12)
    seen: dict[str, set[int]] = {"a": set(), "b": set()}
    both = asyncio.Event()

    def answer_for(name: str) -> Callable[[int], Awaitable[Generation]]:
        async def answer(page: int) -> Generation:
            seen[name].add(page)
            if seen["a"] and seen["b"]:
                both.set()
            await both.wait()  # no runner finishes a page before both have one: the job is shared
            return Generation(text=f"page {page}", finish_reason="stop", tokens=2)

        return answer

    async with runner(a_store, answer_for("a")) as (_, a_engine), runner(b_store, answer_for("b")) as (_, b_engine):
        assert await ended(a_store, record.id) == "succeeded"
    assert a_engine.asked
    assert b_engine.asked
    assert sorted(a_engine.asked + b_engine.asked) == record.pages  # each page computed once, by one of them
    pages = await b_store.pages(record.id)
    assert [p.result.text for p in pages] == [f"page {n}" for n in record.pages]


async def test_another_keys_small_job_overtakes_a_big_job_already_running_on_every_runner(
    open_store: Callable[[Callable[[], float]], SqlJobStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fair round robin across processes: both runners hold a batch of key A's 40 pages when key B submits
    2 pages; the next claim anywhere is B's, before A's 17th page."""
    clock = Clock()
    a_store, b_store = open_store(clock), open_store(clock)
    big = await submit(a_store, 40, owner="key:a")
    claims: list[tuple[str, list[int]]] = []
    for store in (a_store, b_store):

        def recording(claim: Callable[..., Awaitable[list[Lease]]]) -> Callable[..., Awaitable[list[Lease]]]:
            async def claim_and_log(*args: Any, **kwargs: Any) -> list[Lease]:
                leases = await claim(*args, **kwargs)
                if leases:
                    claims.append((leases[0].job_id, [lease.page for lease in leases]))
                return leases

            return claim_and_log

        monkeypatch.setattr(store, "claim", recording(store.claim))
    gate = asyncio.Event()

    async def answer(page: int) -> Generation:
        await gate.wait()
        return Generation(text=f"page {page}", finish_reason="stop", tokens=2)

    async with (
        runner(a_store, answer, concurrency=1, batch=8),
        runner(b_store, answer, concurrency=1, batch=8),
    ):

        async def both_hold_a_batch() -> bool:
            return len(claims) == 2

        await until(both_hold_a_batch)
        small = await submit(b_store, 2, owner="key:b")
        gate.set()
        assert await ended(a_store, small.id) == "succeeded"
        assert await ended(a_store, big.id) == "succeeded"
    assert sorted(page for _, pages in claims[:2] for page in pages) == list(range(1, 17))
    assert claims[2] == (small.id, [1, 2])
    assert sorted(page for job, pages in claims if job == big.id for page in pages) == big.pages


async def test_a_cancel_through_one_runner_aborts_the_other_runners_pages_at_the_engine(
    open_store: Callable[[Callable[[], float]], SqlJobStore],
) -> None:
    clock = Clock()
    a_store, b_store = open_store(clock), open_store(clock)
    record = await submit(a_store, 10)
    started: asyncio.Queue[int] = asyncio.Queue()
    aborted: list[int] = []

    async def held(page: int) -> Generation:
        started.put_nowait(page)
        try:
            await asyncio.Event().wait()  # never answers
        except asyncio.CancelledError:
            aborted.append(page)
            raise
        raise AssertionError("unreachable")

    async with runner(a_store, held, concurrency=1) as (_, a_engine):
        async with asyncio.timeout(10):
            for _ in range(2):  # runner A's batch of two pages is at its engine
                await started.get()
        async with runner(b_store, held, concurrency=1) as (b_runner, b_engine):
            async with asyncio.timeout(10):
                for _ in range(2):  # and runner B's
                    await started.get()
            cancelled = await b_runner.cancel(record.id)
            assert cancelled is not None
            assert cancelled.status == "cancelled"
            assert sorted(aborted) == sorted(b_engine.asked)  # B's own pages: at once

            async def a_aborted() -> bool:
                return len(aborted) == 4

            await until(a_aborted, within=5)  # A's: at its next lease renewal (every second)
        assert sorted(aborted) == sorted(a_engine.asked + b_engine.asked)
    assert len(a_engine.asked) + len(b_engine.asked) == 4  # the six pages not started were never sent
    assert (await a_store.get(record.id)).status == "cancelled"  # type: ignore[union-attr]


async def test_a_dead_workers_pages_are_taken_over_once_its_lease_expired(
    open_store: Callable[[Callable[[], float]], SqlJobStore],
) -> None:
    """A worker claimed every page and died (kill -9: no renewal, no release). Nothing is lost."""
    clock = Clock()
    store = open_store(clock)
    record = await submit(store, 4)
    dead = await store.claim("dead-worker", limit=8, lease_s=LEASE_S)
    assert len(dead) == 4

    async def answer(page: int) -> Generation:
        return Generation(text=f"page {page}", finish_reason="stop", tokens=2)

    async with runner(store, answer) as (jobs, engine):
        await asyncio.sleep(0)
        assert engine.asked == []  # the leases still hold
        clock.now += LEASE_S + 1
        jobs.notify()
        assert await ended(store, record.id) == "succeeded"
    assert sorted(engine.asked) == [1, 2, 3, 4]
    assert not (await store.complete(dead[0], (await store.pages(record.id))[0])).accepted  # the dead one is fenced


async def test_a_job_submitted_through_another_replica_wakes_an_idle_runner_at_once(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a submission anywhere wakes every idle runner (LISTEN/NOTIFY): their poll is an hour here."""
    monkeypatch.setattr(runner_module, "POLL_S", 3600.0)
    clock = Clock()
    idle = PostgresJobStore(postgres_url, ttl_s=3600, max_bytes=10**8, pool_size=4, clock=clock)
    elsewhere = PostgresJobStore(postgres_url, ttl_s=3600, max_bytes=10**8, pool_size=4, clock=clock)
    looked = asyncio.Event()
    claim = idle.claim

    async def watched(worker: str, *, limit: int, lease_s: float) -> list[Lease]:
        leases = await claim(worker, limit=limit, lease_s=lease_s)
        looked.set()
        return leases

    monkeypatch.setattr(idle, "claim", watched)

    async def answer(page: int) -> Generation:
        return Generation(text=f"page {page}", finish_reason="stop", tokens=2)

    async with runner(idle, answer) as (jobs, engine):
        listener = notify_listener(jobs)  # as the app wires it
        assert listener is not None
        await listener.start()
        try:
            await asyncio.wait_for(listener.listening.wait(), 30)
            await asyncio.wait_for(looked.wait(), 30)  # its look at start found nothing; the next is an hour away
            record = await submit(elsewhere, 3)
            assert await ended(elsewhere, record.id) == "succeeded"
        finally:
            await listener.stop()
    assert sorted(engine.asked) == [1, 2, 3]
    await elsewhere.aclose()


async def test_the_database_lost_while_pages_run_loses_nothing(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL stops while a batch is at the engine: readiness and submissions answer store_unavailable, the
    pages finish and are kept, and are stored once the database is back; no page is computed twice. The LISTEN
    connection says once that it is lost, and listens again."""
    import psycopg

    listens = 0  # connections the LISTEN task opened or tried to
    connect = psycopg.AsyncConnection.connect

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal listens
        task = asyncio.current_task()
        listens += task is not None and task.get_name() == "jobs-listen"
        return await connect(*args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", counted)
    server = start_postgres()
    try:
        store = PostgresJobStore(server.create_database(), ttl_s=3600, max_bytes=10**8, pool_size=4)
        record = await submit(store, 4)
        at_engine: asyncio.Queue[int] = asyncio.Queue()
        go = asyncio.Event()

        async def held(page: int) -> Generation:
            at_engine.put_nowait(page)
            await go.wait()
            return Generation(text=f"page {page}", finish_reason="stop", tokens=2)

        async with runner(store, held, concurrency=1, batch=4) as (jobs, engine):
            listener = notify_listener(jobs)
            assert listener is not None
            await listener.start()
            await asyncio.wait_for(listener.listening.wait(), 30)
            async with asyncio.timeout(10):
                for _ in range(4):
                    await at_engine.get()
            await anyio.to_thread.run_sync(server.stop)
            with pytest.raises(StoreUnavailable) as down:
                await jobs.check_store()
            assert down.value.status == 503
            assert down.value.code == "store_unavailable"
            assert PASSWORD not in down.value.message
            with pytest.raises(StoreUnavailable):
                await submit(store, 1)
            go.set()  # the pages finish while the database is away: kept, and retried

            async def kept() -> bool:
                return jobs.pages_kept > 0

            await until(kept, within=30)  # a finished page could not be stored, and is kept (stored one by one)

            async def retried() -> bool:  # the first connection, then three failed attempts
                return listens >= 4

            await until(retried, within=30)
            await anyio.to_thread.run_sync(server.start)
            assert await ended(store, record.id) == "succeeded"
            await jobs.check_store()
            await asyncio.wait_for(listener.listening.wait(), 30)
            await listener.stop()
        said = [r.getMessage() for r in caplog.records if r.name == "app.jobs.events"]
        assert len([m for m in said if "LISTEN connection lost" in m]) == 1, said
        assert "job events: listening again" in said
        assert sorted(engine.asked) == [1, 2, 3, 4]  # each page computed once
        assert [p.result.text for p in await store.pages(record.id)] == [f"page {n}" for n in range(1, 5)]
    finally:
        await anyio.to_thread.run_sync(server.destroy)


async def test_a_long_job_is_read_from_the_store_once_not_once_per_batch(
    open_store: Callable[[Callable[[], float]], SqlJobStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(Clock())
    record = await submit(store, 12)
    reads: list[str] = []
    document = store.document

    async def counted(job_id: str) -> bytes | None:
        reads.append(job_id)
        return await document(job_id)

    monkeypatch.setattr(store, "document", counted)

    async def answer(page: int) -> Generation:
        return Generation(text=f"page {page}", finish_reason="stop", tokens=2)

    async with runner(store, answer, concurrency=1, batch=2):
        assert await ended(store, record.id) == "succeeded"
    assert reads == [record.id]  # 6 batches, 1 read
