"""Per-key limits held across replicas: two `SharedAdmission`s on one real PostgreSQL act as one service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from app.admission import Admission, SharedAdmission
from app.errors import Overloaded, RateLimited, TooManyPagesInFlight
from app.jobs.limits import PostgresLimits
from app.jobs.store.postgres import prepare

pytestmark = pytest.mark.anyio

Replica = Callable[..., SharedAdmission]


@pytest.fixture
async def pool(postgres_url: str) -> AsyncIterator[AsyncConnectionPool]:
    prepare(postgres_url)  # the store's migrations create key_rate and key_inflight
    opened = AsyncConnectionPool(postgres_url, min_size=1, max_size=6, open=False)
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def replica(pool: AsyncConnectionPool) -> AsyncIterator[Replica]:
    started: list[SharedAdmission] = []

    def make(name: str, **overrides: Any) -> SharedAdmission:
        values: dict[str, Any] = {
            "replica": name,
            "lease_s": 30.0,
            "max_queued": 1000,
            "per_client": 4,
            "pages_per_minute": None,
            "retry_after": 5,
            **overrides,
        }
        admission = SharedAdmission(PostgresLimits(pool), **values)
        started.append(admission)
        return admission

    yield make
    for admission in started:
        await admission.stop()


async def settled(condition: Callable[[], Any]) -> None:
    """Until `condition()` (an awaitable) holds: publishing is asynchronous; bounded, no fixed sleep."""
    deadline = time.monotonic() + 30  # generous: two shared cores under load
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never settled")


async def test_pages_in_flight_count_on_every_replica(replica: Replica) -> None:
    a, b = replica("a"), replica("b")
    await a.start()
    await b.start()
    ticket = await a.acquire("key:k", 3)
    with pytest.raises(TooManyPagesInFlight) as refused:
        await b.acquire("key:k", 2)  # 3 on replica a + 2 > 4
    assert refused.value.details == {"pages_in_flight": 3}
    other = await b.acquire("key:other", 4)  # another client is not held back
    one_more = await b.acquire("key:k", 1)  # 3 + 1 fits
    # Every replica sees the others' pages: a reads b's from the database.
    assert await a.in_flight_by_client() == {"key:k": 4, "key:other": 4}
    ticket.close()
    await settled(lambda: _admits(b, "key:k", 3))  # a's release reached the database
    one_more.close()
    other.close()
    await settled(lambda: _nothing_in_flight(a))  # and b's releases reach a


async def _nothing_in_flight(admission: SharedAdmission) -> bool:
    return not any((await admission.in_flight_by_client()).values())


async def _admits(admission: SharedAdmission, client: str, pages: int) -> bool:
    try:
        ticket = await admission.acquire(client, pages)
    except TooManyPagesInFlight:
        return False
    ticket.close()
    return True


async def test_a_lone_big_document_is_never_refused_but_waits_for_none(replica: Replica) -> None:
    a, b = replica("a"), replica("b")
    big = await a.acquire("key:k", 50)  # nothing else in flight: admitted, as in one process
    with pytest.raises(TooManyPagesInFlight):
        await b.acquire("key:k", 1)
    big.close()


async def test_the_rate_is_one_bucket_for_all_replicas(replica: Replica) -> None:
    a, b = replica("a", pages_per_minute=10, per_client=None), replica("b", pages_per_minute=10, per_client=None)
    (await a.acquire("key:k", 6)).close()
    with pytest.raises(RateLimited) as refused:
        await b.acquire("key:k", 6)  # 4 tokens left across both
    assert refused.value.retry_after >= 12  # 2 more tokens at 10 a minute
    (await b.acquire("key:k", 4)).close()
    (await b.acquire("key:k", 6, charge_rate=False)).close()  # a job's run: charged at submit


async def test_a_killed_replicas_pages_stop_counting_when_its_lease_ends(replica: Replica) -> None:
    dead, alive = replica("dead", lease_s=0.2), replica("alive")
    await dead.acquire("key:k", 4)  # then the process is killed: no release, no publish
    with pytest.raises(TooManyPagesInFlight):
        await alive.acquire("key:k", 1)
    await settled(lambda: _admits(alive, "key:k", 1))  # the lease ran out on the server's clock


async def test_concurrent_admissions_on_several_replicas_never_exceed_the_limit(replica: Replica) -> None:
    replicas = [replica(f"r{i}", per_client=10) for i in range(5)]
    first = await replicas[0].acquire("key:k", 1)  # from now on the limit bites (a lone document is exempt)

    async def one(admission: SharedAdmission) -> int:
        try:
            await admission.acquire("key:k", 1)
        except TooManyPagesInFlight:
            return 0
        return 1

    admitted = await asyncio.gather(*(one(replicas[i % 5]) for i in range(60)))
    assert sum(admitted) == 9  # 1 + 9 = 10, however the replicas interleave
    first.close()


async def test_the_queue_bound_stays_per_replica(replica: Replica) -> None:
    a, b = replica("a", max_queued=5, per_client=None), replica("b", max_queued=5, per_client=None)
    await a.acquire("key:x", 5)
    with pytest.raises(Overloaded):
        await a.acquire("key:y", 1)
    (await b.acquire("key:y", 5)).close()  # b's own capacity


async def test_in_process_admission_has_the_same_interface() -> None:
    admission = Admission(max_queued=10, per_client=2, pages_per_minute=None, retry_after=1)
    ticket = await admission.acquire("a", 2)
    with pytest.raises(TooManyPagesInFlight):
        await admission.acquire("a", 1)
    ticket.close()
    (await admission.acquire("a", 1)).close()
