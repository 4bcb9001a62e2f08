"""The `JobStore` contract, on SQLite (a real file) and on a real PostgreSQL, with a fake clock for TTL,
ETA and leases; then what only one of them has (SQLite's file, PostgreSQL's start-up checks)."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from app.errors import IdempotencyKeyReused, JobsStorageFull
from app.jobs import Lease, NewJob, PostgresJobStore, SqliteJobStore
from app.jobs.store import SqlJobStore, migrations
from app.results import Block, FinishedPage, PageError, PageResult
from app.settings import SettingsError, check_jobs_db
from tests.support.postgres import PASSWORD, PostgresServer
from tests.test_main import assert_one_line_naming, start

pytestmark = pytest.mark.anyio

TTL_S = 3600.0
LEASE_S = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(kind: str, tmp_path: Path, clock: Clock, request: pytest.FixtureRequest) -> AsyncIterator[SqlJobStore]:
    """The store under test; `other()` below opens a second handle on the same data (another process)."""
    made = make_store(kind, tmp_path, clock, request)
    yield made
    made.close()


def make_store(kind: str, tmp_path: Path, clock: Clock, request: pytest.FixtureRequest) -> SqlJobStore:
    if kind == "sqlite":
        return SqliteJobStore(tmp_path / "jobs.db", ttl_s=TTL_S, max_bytes=10_000, clock=clock)
    url = request.getfixturevalue("postgres_url")
    return PostgresJobStore(url, ttl_s=TTL_S, max_bytes=10_000, pool_size=4, clock=clock)


def other(store: SqlJobStore, clock: Clock) -> SqlJobStore:
    """A second store on the same database: what another process (replica) sees."""
    if isinstance(store, SqliteJobStore):
        return SqliteJobStore(store.path, ttl_s=TTL_S, max_bytes=10_000, clock=clock)
    assert isinstance(store, PostgresJobStore)
    return PostgresJobStore(store.conninfo, ttl_s=TTL_S, max_bytes=10_000, pool_size=4, clock=clock)


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


async def store_pages(store: SqlJobStore, *pages: FinishedPage, worker: str = "w") -> list[Lease]:
    """Claim and complete the given pages (of the oldest job); the other claimed pages are given back."""
    leases = await store.claim(worker, limit=1000, lease_s=LEASE_S)
    by_page = {lease.page: lease for lease in leases}
    for finished in pages:
        assert (await store.complete(by_page.pop(finished.result.page), finished)).accepted
    await store.release(list(by_page.values()))
    return leases


# -- the contract, on both stores ---------------------------------------------------------------


async def test_create_stores_the_job_its_document_and_pages_to_do(store: SqlJobStore, clock: Clock) -> None:
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
    assert await store.unfinalized() == []


async def test_a_claim_takes_pages_of_one_job_oldest_first_and_never_twice(store: SqlJobStore, clock: Clock) -> None:
    """One owner's jobs in submission order (between owners, see the fairness tests below)."""
    first = await store.create(new_job("key:a", pages=5), b"1")
    clock.now += 1
    second = await store.create(new_job("key:a", pages=2), b"2")
    leases = await store.claim("w1", limit=3, lease_s=LEASE_S)
    assert [(lease.job_id, lease.page, lease.attempt) for lease in leases] == [(first.id, n, 1) for n in (1, 2, 3)]
    running = await store.get(first.id)
    assert running is not None
    assert running.status == "running"
    assert running.run_started_at == clock.now
    # Another worker gets what is left of the oldest job; the leased pages are not offered again.
    assert [lease.page for lease in await store.claim("w2", limit=3, lease_s=LEASE_S)] == [4, 5]
    assert [(lease.job_id, lease.page) for lease in await store.claim("w3", limit=3, lease_s=LEASE_S)] == [
        (second.id, 1),
        (second.id, 2),
    ]
    assert await store.claim("w4", limit=3, lease_s=LEASE_S) == []


async def test_a_small_job_of_another_owner_goes_before_the_big_jobs_next_batch_on_any_replica(
    store: SqlJobStore, clock: Clock
) -> None:
    """Fair across replicas: B's 2 pages are claimed (by another process) before A's 9th page."""
    big = await store.create(new_job("key:a", pages=50), b"1")
    clock.now += 1
    small = await store.create(new_job("key:b", pages=2), b"2")
    replica = other(store, clock)
    try:
        first = await store.claim("r1", limit=8, lease_s=LEASE_S)
        assert [(lease.job_id, lease.page) for lease in first] == [(big.id, n) for n in range(1, 9)]
        clock.now += 1
        second = await replica.claim("r2", limit=8, lease_s=LEASE_S)
        assert [(lease.job_id, lease.page) for lease in second] == [(small.id, 1), (small.id, 2)]
        clock.now += 1
        third = await replica.claim("r2", limit=8, lease_s=LEASE_S)
        assert [(lease.job_id, lease.page) for lease in third] == [(big.id, n) for n in range(9, 17)]
    finally:
        replica.close()


async def test_owners_with_as_many_pages_in_flight_take_turns(store: SqlJobStore, clock: Clock) -> None:
    """Two slots, three owners: the owner served longest ago (or never) goes next, not the oldest job's."""
    jobs = {}
    for owner in ("key:a", "key:b", "key:c"):
        jobs[owner] = await store.create(new_job(owner, pages=20), b"1")
        clock.now += 1
    served: list[str] = []

    async def run_one_batch(worker: str) -> list[Lease]:
        clock.now += 1
        leases = await store.claim(worker, limit=4, lease_s=LEASE_S)
        served.append(next(owner for owner, job in jobs.items() if job.id == leases[0].job_id))
        return leases

    async def finish(leases: list[Lease]) -> None:
        for lease in leases:
            assert (await store.complete(lease, page(lease.page))).accepted

    slot1, slot2 = await run_one_batch("w1"), await run_one_batch("w2")
    for _ in range(3):
        await finish(slot1)
        slot1 = await run_one_batch("w1")
        await finish(slot2)
        slot2 = await run_one_batch("w2")
    assert served == ["key:a", "key:b", "key:c", "key:a", "key:b", "key:c", "key:a", "key:b"]


async def test_expired_leases_do_not_count_as_pages_in_flight(store: SqlJobStore, clock: Clock) -> None:
    big = await store.create(new_job("key:a", pages=50), b"1")
    clock.now += 1
    other_job = await store.create(new_job("key:b", pages=10), b"2")
    dead = await store.claim("killed", limit=8, lease_s=LEASE_S)  # a replica that dies with A's 8 pages
    clock.now += 1
    alive = await store.claim("w2", limit=2, lease_s=LEASE_S)
    assert {lease.job_id for lease in alive} == {other_job.id}
    clock.now += LEASE_S - 5
    assert await store.renew(alive, LEASE_S) == {1, 2}
    clock.now += 10  # A's leases expired; B's 2 pages are still in flight
    taken = await store.claim("w3", limit=8, lease_s=LEASE_S)
    assert [(lease.job_id, lease.page, lease.attempt) for lease in taken] == [(big.id, lease.page, 2) for lease in dead]


def keyed(owner: str, key: str | None, sha: str, pages: int = 3) -> NewJob:
    return replace(new_job(owner, pages=pages), idempotency_key=key, request_sha256=sha)


async def test_an_idempotency_key_makes_one_job_per_owner(store: SqlJobStore) -> None:
    first = await store.create(keyed("key:a", "k1", "sha-1"), b"doc")
    assert not first.replayed
    again = await store.create(keyed("key:a", "k1", "sha-1"), b"doc")
    assert (again.id, again.replayed) == (first.id, True)
    assert await store.replay(keyed("key:a", "k1", "sha-1")) == again
    assert await store.replay(keyed("key:a", "k2", "sha-1")) is None
    with pytest.raises(IdempotencyKeyReused) as reused:
        await store.create(keyed("key:a", "k1", "sha-2"), b"other")
    assert reused.value.details == {"job_id": first.id}
    other_owner = await store.create(keyed("key:b", "k1", "sha-1"), b"doc")  # keys are per owner
    unkeyed = [await store.create(keyed("key:a", None, "sha-1"), b"doc") for _ in range(2)]
    ids = {job.id for job in await store.list_jobs()}
    assert ids == {first.id, other_owner.id, *(job.id for job in unkeyed)}
    assert len(await store.claim("w", limit=100, lease_s=LEASE_S)) == 3  # pages of one job: stored once


async def test_an_idempotency_key_is_free_again_once_its_job_expired(store: SqlJobStore, clock: Clock) -> None:
    first = await store.create(keyed("key:a", "k1", "sha-1"), b"doc")
    await store.finish(first.id, "succeeded")
    clock.now += TTL_S + 1  # expired, not swept yet
    second = await store.create(keyed("key:a", "k1", "sha-2"), b"new")
    assert (second.id != first.id, second.replayed) == (True, False)
    assert await store.replay(keyed("key:a", "k1", "sha-2")) == replace(second, replayed=True)


async def test_the_same_key_submitted_on_two_replicas_at_once_makes_one_job(store: SqlJobStore, clock: Clock) -> None:
    replica = other(store, clock)
    try:
        made = await asyncio.gather(
            *(on.create(keyed("key:a", "retry-1", "sha"), b"doc") for on in (store, replica, store, replica))
        )
    finally:
        replica.close()
    assert len({job.id for job in made}) == 1
    assert sorted(job.replayed for job in made) == [False, True, True, True]
    assert len(await store.list_jobs()) == 1


async def test_only_the_current_lease_holder_can_store_a_page(store: SqlJobStore, clock: Clock) -> None:
    """Fencing: a holder whose lease expired and was taken over is refused, whatever it sends."""
    record = await store.create(new_job(pages=2), b"doc")
    stale = await store.claim("w1", limit=1, lease_s=LEASE_S)
    assert [lease.page for lease in stale] == [1]
    clock.now += LEASE_S + 1  # w1 stopped renewing (killed): the page is claimable again
    current = await store.claim("w2", limit=1, lease_s=LEASE_S)
    assert [(lease.page, lease.attempt) for lease in current] == [(1, 2)]
    assert await store.renew(stale, LEASE_S) == set()  # w1 learns it lost the page
    refused = await store.complete(stale[0], page(1, "failed"))
    assert not refused.accepted
    # Same worker name but the old attempt: still refused (a restarted process reusing its id).
    assert not (await store.complete(Lease(record.id, 1, "w2", 1), page(1))).accepted
    accepted = await store.complete(current[0], page(1))
    assert accepted.accepted
    assert not accepted.job_done  # page 2 is still to do
    stored = await store.pages(record.id)
    assert [(p.page, p.result.status) for p in stored] == [(1, "ok")]
    # A second completion of the same lease is refused (the page is done).
    assert not (await store.complete(current[0], page(1))).accepted


async def test_a_renewed_lease_is_not_taken_over(store: SqlJobStore, clock: Clock) -> None:
    await store.create(new_job(pages=1), b"doc")
    leases = await store.claim("w1", limit=1, lease_s=LEASE_S)
    clock.now += LEASE_S - 1
    assert await store.renew(leases, LEASE_S) == {1}
    clock.now += LEASE_S - 1
    assert await store.claim("w2", limit=1, lease_s=LEASE_S) == []
    clock.now += 2
    assert [lease.attempt for lease in await store.claim("w2", limit=1, lease_s=LEASE_S)] == [2]


async def test_released_pages_are_claimable_at_once(store: SqlJobStore) -> None:
    await store.create(new_job(pages=2), b"doc")
    leases = await store.claim("w1", limit=2, lease_s=LEASE_S)
    await store.release(leases)
    assert not (await store.complete(leases[0], page(1))).accepted  # given back: no longer ours
    again = await store.claim("w2", limit=2, lease_s=LEASE_S)
    assert [(lease.page, lease.attempt) for lease in again] == [(1, 2), (2, 2)]


async def test_the_last_page_says_so_and_an_unfinished_job_is_found(store: SqlJobStore) -> None:
    record = await store.create(new_job(pages=2), b"doc")
    leases = await store.claim("w", limit=2, lease_s=LEASE_S)
    assert not (await store.complete(leases[1], page(2))).job_done
    assert (await store.complete(leases[0], page(1))).job_done
    # The finisher died before ending the job: any runner finds it.
    assert [r.id for r in await store.unfinalized()] == [record.id]
    assert await store.finish(record.id, "succeeded") is not None
    assert await store.unfinalized() == []


async def test_cancel_voids_open_pages_everywhere(store: SqlJobStore, clock: Clock) -> None:
    record = await store.create(new_job(pages=3), b"doc")
    leases = await store.claim("w1", limit=2, lease_s=LEASE_S)
    replica = other(store, clock)
    try:
        cancelled, changed = await replica.cancel(record.id)  # accepted by another process
        assert changed
        assert cancelled is not None
        assert cancelled.status == "cancelled"
        assert cancelled.webhook is None  # no callback_url, no webhook
    finally:
        replica.close()
    assert await store.renew(leases, LEASE_S) == set()  # the holder learns at its next renewal, and aborts
    assert not (await store.complete(leases[0], page(1))).accepted
    assert await store.claim("w2", limit=8, lease_s=LEASE_S) == []  # the unstarted page is never sent
    clock.now += LEASE_S + 1
    assert await store.claim("w2", limit=8, lease_s=LEASE_S) == []
    assert await store.finish(record.id, "succeeded") is None  # cancel wins over a late finish


async def test_pages_are_stored_once_and_survive_reopening(store: SqlJobStore, clock: Clock) -> None:
    record = await store.create(new_job(), b"doc")
    await store_pages(store, page(2), page(1, "failed"))
    store.close()
    reopened = other(store, clock)
    try:
        assert [p.page for p in await reopened.pages(record.id)] == [1, 2]
        assert (await reopened.pages(record.id))[0].result.status == "failed"
        again = await reopened.get(record.id)
        assert again is not None
        assert again.pages_done == 2
        assert again.status == "running"
        assert again.stored_bytes > len(b"doc")
    finally:
        reopened.close()


async def test_the_page_log_is_in_storing_order_and_resumable(store: SqlJobStore) -> None:
    record = await store.create(new_job(pages=3), b"doc")
    leases = {lease.page: lease for lease in await store.claim("w", limit=3, lease_s=LEASE_S)}
    for number in (3, 1, 2):
        assert (await store.complete(leases[number], page(number))).accepted
    assert [p.page for p in await store.page_log(record.id)] == [3, 1, 2]
    assert [p.page for p in await store.page_log(record.id, after=2)] == [2]


async def test_eta_from_the_page_rate(store: SqlJobStore, clock: Clock) -> None:
    record = await store.create(new_job(pages=5), b"doc")
    leases = await store.claim("w", limit=5, lease_s=LEASE_S)
    running = await store.get(record.id)
    assert running is not None
    assert running.eta_s(clock.now) is None
    clock.now += 4
    assert (await store.complete(leases[0], page(1))).accepted
    assert (await store.complete(leases[1], page(2))).accepted
    running = await store.get(record.id)
    assert running is not None
    assert running.eta_s(clock.now) == 6.0  # 2 pages in 4 s, 3 left


async def test_state_transitions(store: SqlJobStore) -> None:
    record = await store.create(new_job(callback_url="http://127.0.0.1:9/hook"), b"doc")
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


async def test_waiting_is_shown_until_the_next_page(store: SqlJobStore, clock: Clock) -> None:
    record = await store.create(new_job(), b"doc")
    await store.set_waiting(record.id, {"code": "engine_not_ready", "message": "loading"})
    waiting = await store.get(record.id)
    assert waiting is not None
    assert waiting.waiting == {"code": "engine_not_ready", "message": "loading", "since": clock.now}
    await store_pages(store, page(1))
    moving = await store.get(record.id)
    assert moving is not None
    assert moving.waiting is None


async def test_listing_by_owner(store: SqlJobStore, clock: Clock) -> None:
    a = await store.create(new_job("key:a"), b"1")
    clock.now += 1
    b = await store.create(new_job("key:b"), b"2")
    assert [r.id for r in await store.list_jobs()] == [b.id, a.id]  # newest first
    assert [r.id for r in await store.list_jobs("key:a")] == [a.id]


async def test_expired_jobs_vanish_and_free_their_bytes(store: SqlJobStore, clock: Clock) -> None:
    record = await store.create(new_job(), b"x" * 4000)
    await store_pages(store, page(1))
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


async def turns(store: SqlJobStore) -> list[str]:
    """The owners with a turn row (fair claiming's memory of who was served when)."""
    return await store._run(lambda tx: [r["owner"] for r in tx.rows("SELECT owner FROM owner_turns ORDER BY owner")],
                            default=[])  # fmt: skip


async def test_sweeping_forgets_the_turns_of_owners_with_no_job_left(store: SqlJobStore, clock: Clock) -> None:
    """Without API keys an owner is a client address: a turn row for every address ever seen would pile up."""
    gone = await store.create(new_job("addr:10.0.0.1"), b"1")
    await store.create(new_job("addr:10.0.0.2"), b"2")
    assert await turns(store) == ["addr:10.0.0.1", "addr:10.0.0.2"]
    assert await store.finish(gone.id, "cancelled") is not None
    assert await store.sweep() == 0
    assert await turns(store) == ["addr:10.0.0.1", "addr:10.0.0.2"]  # its job is still there
    clock.now += TTL_S
    assert await store.sweep() == 1
    assert await turns(store) == ["addr:10.0.0.2"]
    await store.create(new_job("addr:10.0.0.1"), b"3")  # it comes back: its turn is written again
    assert await turns(store) == ["addr:10.0.0.1", "addr:10.0.0.2"]


async def test_storage_bound(store: SqlJobStore) -> None:
    await store.create(new_job(), b"x" * 6000)
    with pytest.raises(JobsStorageFull) as refused:
        await store.create(new_job(), b"y" * 4001)
    assert refused.value.status == 507
    assert refused.value.details["max_bytes"] == 10_000
    assert len(await store.list_jobs()) == 1
    await store.create(new_job(), b"y" * 4000)  # exactly up to the bound is fine


async def test_pages_keep_their_blocks_and_error_details(store: SqlJobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks are stored with the page (never parsed again on read); a failed page keeps its error's details."""
    record = await store.create(new_job(), b"doc")
    stored = page(1)
    blocks = [Block(type="heading", page=1, text="# not the text", level=1)]  # differs from parsing the text
    error = PageError(code="engine_error", message="vLLM said 400", details={"upstream_status": 400})
    failed = stored.result.model_copy(update={"page": 2, "status": "failed", "text": "", "error": error})
    await store_pages(store, FinishedPage(stored.result, blocks), FinishedPage(failed, []))

    def no_parsing(*args: object) -> None:
        raise AssertionError("blocks parsed again on read")

    monkeypatch.setattr("app.jobs.store.base.parse_blocks", no_parsing)
    first, second = await store.pages(record.id)
    assert first.blocks == blocks
    assert second.result.error == error


async def test_delete_removes_the_job_document_and_pages(store: SqlJobStore) -> None:
    record = await store.create(new_job(), b"x" * 4000)
    await store_pages(store, page(1))
    assert await store.delete(record.id)
    assert await store.get(record.id) is None
    assert await store.document(record.id) is None
    assert await store.pages(record.id) == []
    assert await store.used_bytes() == 0
    assert not await store.delete(record.id)
    assert await store.claim("w", limit=8, lease_s=LEASE_S) == []


async def test_workers_claiming_at_once_never_share_a_page(store: SqlJobStore, clock: Clock) -> None:
    """Two processes' worth of claimers race over one 60-page job: every page leased exactly once."""
    record = await store.create(new_job(pages=60), b"doc")
    replica = other(store, clock)
    try:

        async def claimer(on: SqlJobStore, name: str) -> list[int]:
            got: list[int] = []
            while leases := await on.claim(name, limit=3, lease_s=LEASE_S):
                got += [lease.page for lease in leases]
            return got

        results = await asyncio.gather(*(claimer(on, f"w{i}-{j}") for i, on in enumerate((store, replica))
                                         for j in range(3)))  # fmt: skip
    finally:
        replica.close()
    everything = [number for got in results for number in got]
    assert sorted(everything) == record.pages


# -- SQLite only ---------------------------------------------------------------------------------


async def test_nothing_is_written_before_the_first_job(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = SqliteJobStore(path, ttl_s=TTL_S, max_bytes=1000)
    assert await store.get("x") is None
    assert await store.claim("w", limit=8, lease_s=LEASE_S) == []
    assert await store.pending_webhooks() == []
    assert await store.unfinalized() == []
    assert await store.sweep() == 0
    assert await store.list_jobs() == []
    assert not path.exists()


async def test_the_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs.db", ttl_s=TTL_S, max_bytes=1000)
    await store.create(new_job(), b"doc")
    store.close()
    # Passwords and documents live in the file: owner-only permissions, WAL journal.
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT version FROM schema_version").fetchone()[0] == len(migrations.SQLITE)


async def test_a_file_from_before_page_leases_is_migrated_and_its_jobs_resume(tmp_path: Path) -> None:
    """A queued and a running job (page 1 done) in a file of the previous release: their pages become tasks."""
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as db:
        db.executescript(migrations.SQLITE[0].replace("waiting TEXT,\n        options TEXT", "extra TEXT"))  # older
        for job_id, status in (("queued1", "queued"), ("running1", "running")):
            db.execute(
                "INSERT INTO jobs (id, owner, status, pages, doc_bytes, created_at, updated_at) "
                "VALUES (?, 'key:a', ?, '[1, 2]', 3, 1, 1)",
                (job_id, status),
            )
            db.execute("INSERT INTO documents VALUES (?, x'414243')", (job_id,))
        db.execute("INSERT INTO pages VALUES ('running1', 1, ?, 2)", (page(1).result.model_dump_json(),))
    check_jobs_db(path)  # an older schema is fine at start-up
    store = SqliteJobStore(path, ttl_s=TTL_S, max_bytes=10_000)
    try:
        running = await store.get("running1")
        assert running is not None
        assert running.pages_done == 1
        assert running.waiting is None
        claimed = [(lease.job_id, lease.page) for lease in await store.claim("w", limit=8, lease_s=LEASE_S)]
        claimed += [(lease.job_id, lease.page) for lease in await store.claim("w", limit=8, lease_s=LEASE_S)]
        assert sorted(claimed) == [("queued1", 1), ("queued1", 2), ("running1", 2)]
    finally:
        store.close()


async def test_processes_opening_a_new_sqlite_file_at_once_migrate_it_once(tmp_path: Path) -> None:
    """uvicorn --workers or replicas started together on a new JOBS_DB: each migration is applied once, whoever
    takes the write lock first (the others find the version moved on); nobody fails with 'duplicate column'."""
    for attempt in range(5):
        path = tmp_path / f"jobs-{attempt}.db"
        stores = [SqliteJobStore(path, ttl_s=TTL_S, max_bytes=10_000) for _ in range(4)]
        try:
            made = await asyncio.gather(*(store.create(new_job(), b"doc") for store in stores))
        finally:
            for store in stores:
                store.close()
        assert len({job.id for job in made}) == 4
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT version FROM schema_version").fetchall() == [(len(migrations.SQLITE),)]


def test_a_newer_sqlite_schema_stops_start_up_naming_jobs_db(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as db:
        db.execute(migrations.VERSION_TABLE)
        db.execute("INSERT INTO schema_version VALUES (?)", (len(migrations.SQLITE) + 1,))
    with pytest.raises(SettingsError, match=r"^invalid configuration: JOBS_DB: .* has schema version \d+, newer"):
        check_jobs_db(path)


# -- PostgreSQL only ------------------------------------------------------------------------------


def test_start_up_creates_the_schema_once(postgres_url: str) -> None:
    check_jobs_db(postgres_url)
    check_jobs_db(postgres_url)  # a second replica starting: nothing to do
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(len(migrations.POSTGRES),)]


def test_a_newer_postgres_schema_stops_start_up_naming_jobs_db(postgres_url: str) -> None:
    check_jobs_db(postgres_url)
    with psycopg.connect(postgres_url) as conn:
        conn.execute("UPDATE schema_version SET version = version + 1")
    with pytest.raises(SettingsError) as refused:
        check_jobs_db(postgres_url)
    message = str(refused.value)
    assert message.startswith("invalid configuration: JOBS_DB: ")
    assert f"schema version {len(migrations.POSTGRES) + 1}, newer than this release knows" in message
    assert PASSWORD not in message
    assert "ocr:***@127.0.0.1" in message


def test_an_unreachable_database_stops_start_up_with_the_url_and_the_reason(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.url("nosuchdb")
    with pytest.raises(SettingsError) as refused:
        check_jobs_db(url)
    message = str(refused.value)
    assert "JOBS_DB: cannot use the PostgreSQL job store at postgresql://ocr:***@127.0.0.1:" in message
    assert 'database "nosuchdb" does not exist' in message
    assert PASSWORD not in message
    closed = url.replace(f":{postgres_server.port}/", ":9/")  # nothing listens on port 9
    with pytest.raises(SettingsError, match=r"postgresql://ocr:\*\*\*@127\.0\.0\.1:9/nosuchdb: .*(refused|failed)"):
        check_jobs_db(closed)


def test_the_service_does_not_start_on_an_unreachable_database(tmp_path: Path) -> None:
    """A real uvicorn start: exit 3, one line naming JOBS_DB with the URL (password hidden) and the reason."""
    done = start(tmp_path, {"JOBS_DB": "postgresql://ocr:topsecret@127.0.0.1:9/jobs"})
    assert_one_line_naming(
        done, "JOBS_DB: cannot use the PostgreSQL job store at postgresql://ocr:***@127.0.0.1:9/jobs"
    )
    assert "topsecret" not in done.stderr
    assert "Connection refused" in done.stderr
