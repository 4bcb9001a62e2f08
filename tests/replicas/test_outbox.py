"""The webhook outbox: every finished job delivered by exactly one of several replicas, also when one died.

Run against both backends: the SQLite file (the store's own schema) and a real PostgreSQL server (a minimal
`jobs` table carrying the columns the outbox reads, until the PostgreSQL job store provides it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from app.jobs import NewJob, SqliteJobStore, WebhookSender, verify
from app.jobs.outbox import Outbox, OutboxBackend, PostgresOutbox, SqliteOutbox
from app.jobs.store import JobRecord
from app.jobs.store.postgres import prepare
from tests.jobs.test_webhooks import Receiver
from tests.support.server import ServedApp

pytestmark = pytest.mark.anyio

SECRET = "outbox-secret"


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    hook = Receiver()
    with ServedApp(hook.app, lifespan="off") as served:
        yield hook, f"{served.url}/hook"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def sender(**overrides: Any) -> WebhookSender:
    values: dict[str, Any] = {"secret": SECRET, "max_attempts": 3, "backoff_s": 0.0, "timeout_s": 5.0, **overrides}
    return WebhookSender(**values)


async def finished_jobs(store: SqliteJobStore, hook_url: str, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        new = NewJob(owner="a", pages=[1], pages_spec=None, password=None, callback_url=hook_url, filename=None)
        record = await store.create(new, b"doc")
        assert await store.finish(record.id, "succeeded") is not None
        ids.append(record.id)
    return ids


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteJobStore]:
    opened = SqliteJobStore(tmp_path / "jobs.db", ttl_s=3600, max_bytes=10**7)
    yield opened
    opened.close()


async def test_three_replicas_deliver_each_job_once(store: SqliteJobStore, receiver: tuple[Receiver, str]) -> None:
    hook, hook_url = receiver
    ids = await finished_jobs(store, hook_url, 12)
    replicas = [Outbox(store, sender(), SqliteOutbox(store.path), worker=f"r{i}", poll_s=0.01) for i in range(3)]
    for outbox in replicas:
        await outbox.start()
    try:
        for job_id in ids:
            await wait_until(store, job_id, lambda record: record.webhook == "delivered")
    finally:
        for outbox in replicas:
            await outbox.stop()
    delivered = [json.loads(body)["id"] for _, body in hook.received]
    assert sorted(delivered) == sorted(ids)  # each once, none twice
    for headers, body in hook.received:
        assert verify(SECRET, body, headers["x-lightonocr-signature"])


async def test_a_dead_replicas_lease_runs_out_then_another_delivers(
    store: SqliteJobStore, receiver: tuple[Receiver, str]
) -> None:
    hook, hook_url = receiver
    [job_id] = await finished_jobs(store, hook_url, 1)
    clock = Clock()
    dead, alive = SqliteOutbox(store.path, clock), SqliteOutbox(store.path, clock)
    assert [row.job_id for row in await dead.claim("dead", lease_s=30, limit=8)] == [job_id]  # then it was killed
    survivor = Outbox(store, sender(), alive, worker="alive")
    assert await survivor.run_once() == 0  # held by the dead replica's lease
    clock.now += 31
    assert await survivor.run_once() == 1
    hook.wait_for(1)
    record = await store.get(job_id)
    assert record is not None
    assert (record.webhook, record.webhook_attempts) == ("delivered", 1)
    # The dead replica, back from a pause, cannot overwrite the outcome: its lease is gone.
    assert not await dead.done(job_id, "dead", state="failed", attempts=1)
    record = await store.get(job_id)
    assert record is not None
    assert record.webhook == "delivered"
    await survivor.stop()
    await dead.close()


async def test_retries_follow_the_backoff_then_give_up(store: SqliteJobStore, receiver: tuple[Receiver, str]) -> None:
    hook, hook_url = receiver
    hook.statuses = [503, 503, 503]
    [job_id] = await finished_jobs(store, hook_url, 1)
    clock = Clock()
    outbox = Outbox(store, sender(backoff_s=10.0), SqliteOutbox(store.path, clock), worker="r")
    assert await outbox.run_once() == 1
    assert await outbox.run_once() == 0  # next attempt due in 10 s
    clock.now += 10
    assert await outbox.run_once() == 1
    clock.now += 19  # the second wait is 20 s
    assert await outbox.run_once() == 0
    clock.now += 1
    assert await outbox.run_once() == 1
    record = await store.get(job_id)
    assert record is not None
    assert (record.webhook, record.webhook_attempts) == ("failed", 3)
    assert len(hook.received) == 3
    clock.now += 1000
    assert await outbox.run_once() == 0  # ended: never again
    await outbox.stop()


async def wait_until(store: SqliteJobStore, job_id: str, predicate: Callable[[JobRecord], bool]) -> None:
    for _ in range(2000):
        record = await store.get(job_id)
        if record is not None and predicate(record):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id}: {await store.get(job_id)}")


# -- PostgreSQL ------------------------------------------------------------------------------------------


@pytest.fixture
async def pg_pool(postgres_url: str) -> AsyncIterator[AsyncConnectionPool]:
    prepare(postgres_url)  # the store's migrations: jobs, webhook_outbox, ...
    pool = AsyncConnectionPool(postgres_url, min_size=1, max_size=4, open=False)
    await pool.open()
    async with pool.connection() as conn:
        columns = "id, owner, status, pages, doc_bytes, created_at, updated_at, webhook"
        await conn.execute(
            f"INSERT INTO jobs ({columns}) SELECT 'job' || n, 'a', 'succeeded', '[1]', 1, 0, 0, 'pending' "
            "FROM generate_series(1, 20) n"
        )
        await conn.execute(
            f"INSERT INTO jobs ({columns}) VALUES ('running', 'a', 'running', '[1]', 1, 0, 0, 'pending')"
        )
    yield pool
    await pool.close()


async def test_postgres_claims_skip_locked_rows_and_are_fenced(pg_pool: AsyncConnectionPool) -> None:
    a, b = PostgresOutbox(pg_pool), PostgresOutbox(pg_pool)
    first, second = await asyncio.gather(a.claim("a", lease_s=30, limit=15), b.claim("b", lease_s=30, limit=15))
    got_a, got_b = {row.job_id for row in first}, {row.job_id for row in second}
    assert not got_a & got_b  # never the same row to two replicas
    assert got_a | got_b == {f"job{n}" for n in range(1, 21)}  # the running job is not due
    some = next(iter(got_a))
    assert not await b.done(some, "b", state="delivered", attempts=1)  # not b's
    assert await a.retry(some, "a", attempts=1, delay_s=30)
    assert some not in {row.job_id for row in await b.claim("b", lease_s=30, limit=50)}  # not due yet
    other = next(iter(got_a - {some}))
    assert await a.done(other, "a", state="delivered", attempts=1)
    async with pg_pool.connection() as conn:
        row = await (
            await conn.execute("SELECT webhook, webhook_attempts FROM jobs WHERE id = %s", (other,))
        ).fetchone()
    assert row == ("delivered", 1)


async def test_postgres_a_dead_holders_rows_are_claimed_again(pg_pool: AsyncConnectionPool) -> None:
    dead, alive = PostgresOutbox(pg_pool), PostgresOutbox(pg_pool)
    held = {row.job_id for row in await dead.claim("dead", lease_s=0.05, limit=50)}
    assert len(held) == 20
    again: set[str] = set()
    for _ in range(500):  # the server's clock passes the 50 ms lease
        again |= {row.job_id for row in await alive.claim("alive", lease_s=30, limit=50)}
        if again == held:
            break
        await asyncio.sleep(0.01)
    assert again == held
    assert not await dead.done(next(iter(held)), "dead", state="delivered", attempts=1)


def _backends() -> list[type[OutboxBackend]]:
    return [SqliteOutbox, PostgresOutbox]  # both satisfy the protocol (checked by mypy through this list)
