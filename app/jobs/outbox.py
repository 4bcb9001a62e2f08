"""Webhooks through an outbox in the job database: each finished job is delivered by one live replica.

A job that ends with a `callback_url` has `webhook = 'pending'` (set with its end, in the same transaction).
Every replica runs `Outbox`: it copies such jobs into `webhook_outbox` (one row per job; inserting twice is a
no-op), claims due rows under a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL, `BEGIN IMMEDIATE` on SQLite),
makes ONE signed attempt per claim, and then either ends the row (delivered, refused with a 4xx, or out of
attempts: `jobs.webhook` says which) or schedules the next attempt with today's backoff and lets the lease go.
Each step is fenced on the lease holder, so a replica whose lease ran out cannot overwrite another's outcome. An
ended row stays (`next_at` NULL) until its job is deleted: a claim that read the job as still `pending` just
before the end was stored then finds the row and does not insert it again (no second delivery).

A replica killed mid-attempt holds its lease for `lease_s` at most; then any replica claims the row again:
delivery is at least once (a receiver may see the same job twice only when a replica died mid-POST, and the
body's `id` and `timestamp` let it tell).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio

from app.background import cancel_and_wait
from app.jobs.store import JobStore, PostgresJobStore, SqliteJobStore, WebhookState
from app.jobs.views import summarize
from app.jobs.webhooks import WebhookSender

log = logging.getLogger(__name__)

T = TypeVar("T")

POLL_S = 1.0  # how often a replica looks for due rows (finished jobs, retries) when nothing woke it
BATCH = 8  # rows claimed at once: attempts of one claim run concurrently

_TERMINAL = "('succeeded', 'partial', 'failed', 'cancelled')"


def replica_name() -> str:
    """This process among the replicas: host, pid and a random part (pids repeat after a restart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class Claimed:
    job_id: str
    attempts: int  # attempts made before this claim


class OutboxBackend(Protocol):
    """The outbox's SQL, one transaction per call; every write is fenced on `worker` holding the row."""

    async def claim(self, worker: str, *, lease_s: float, limit: int) -> list[Claimed]:
        """Copy newly finished jobs in, then lease up to `limit` due rows nobody holds."""
        ...

    async def retry(self, job_id: str, worker: str, *, attempts: int, delay_s: float) -> bool:
        """Schedule the next attempt `delay_s` from now and let the lease go; False when no longer ours."""
        ...

    async def done(self, job_id: str, worker: str, *, state: WebhookState, attempts: int) -> bool:
        """End the row and record the outcome on the job; False when no longer ours (nothing written)."""
        ...

    async def close(self) -> None: ...


class SqliteOutbox:
    """The outbox in the JOBS_DB SQLite file, on a connection of its own (WAL: readers and one writer)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is None:
            if not self.path.exists():  # no job was ever stored: nothing to deliver, and nothing written
                return None
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA busy_timeout = 5000")
            # The store's migrations create the table (app/jobs/store/migrations.py) with the file.
            if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'webhook_outbox'").fetchone() is None:
                db.close()
                return None
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T], default: T) -> T:
        def locked() -> T:
            with self._lock:
                db = self._connect()
                if db is None:
                    return default
                db.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(db)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
                return result

        return await anyio.to_thread.run_sync(locked)

    async def claim(self, worker: str, *, lease_s: float, limit: int) -> list[Claimed]:
        def claim(db: sqlite3.Connection) -> list[Claimed]:
            now = self.clock()
            db.execute(
                "INSERT OR IGNORE INTO webhook_outbox (job_id, attempts) SELECT id, webhook_attempts FROM jobs "
                f"WHERE webhook = 'pending' AND status IN {_TERMINAL}"
            )
            rows = db.execute(
                "SELECT job_id, attempts FROM webhook_outbox WHERE next_at <= ? AND lease_until <= ? "
                "ORDER BY next_at LIMIT ?",
                (now, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE webhook_outbox SET lease_owner = ?, lease_until = ? WHERE job_id = ?",
                [(worker, now + lease_s, row["job_id"]) for row in rows],
            )
            return [Claimed(row["job_id"], row["attempts"]) for row in rows]

        return await self._run(claim, [])

    async def retry(self, job_id: str, worker: str, *, attempts: int, delay_s: float) -> bool:
        def retry(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE webhook_outbox SET attempts = ?, next_at = ?, lease_owner = NULL, lease_until = 0 "
                "WHERE job_id = ? AND lease_owner = ?",
                (attempts, self.clock() + delay_s, job_id, worker),
            )
            if cursor.rowcount != 1:
                return False
            db.execute("UPDATE jobs SET webhook_attempts = ? WHERE id = ?", (attempts, job_id))
            return True

        return await self._run(retry, False)

    async def done(self, job_id: str, worker: str, *, state: WebhookState, attempts: int) -> bool:
        def done(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE webhook_outbox SET next_at = NULL, lease_owner = NULL, lease_until = 0, attempts = ? "
                "WHERE job_id = ? AND lease_owner = ?",
                (attempts, job_id, worker),
            )
            if cursor.rowcount != 1:
                return False
            db.execute("UPDATE jobs SET webhook = ?, webhook_attempts = ? WHERE id = ?", (state, attempts, job_id))
            return True

        return await self._run(done, False)

    async def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class PostgresOutbox:
    """The outbox in PostgreSQL, on the store's pool; leases use the server's clock (replicas' clocks may differ)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool  # psycopg_pool.AsyncConnectionPool; the tables come from the store's migrations

    async def claim(self, worker: str, *, lease_s: float, limit: int) -> list[Claimed]:
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO webhook_outbox (job_id, attempts) SELECT id, webhook_attempts FROM jobs "
                f"WHERE webhook = 'pending' AND status IN {_TERMINAL} ON CONFLICT DO NOTHING"
            )
            cursor = await conn.execute(
                "UPDATE webhook_outbox SET lease_owner = %(worker)s, "
                "lease_until = extract(epoch FROM clock_timestamp()) + %(lease)s "
                "WHERE job_id IN (SELECT job_id FROM webhook_outbox "
                "  WHERE next_at <= extract(epoch FROM clock_timestamp()) "
                "  AND lease_until <= extract(epoch FROM clock_timestamp()) "
                "  ORDER BY next_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
                "RETURNING job_id, attempts",
                {"worker": worker, "lease": lease_s, "limit": limit},
            )
            return [Claimed(job_id, attempts) for job_id, attempts in await cursor.fetchall()]

    async def retry(self, job_id: str, worker: str, *, attempts: int, delay_s: float) -> bool:
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE webhook_outbox SET attempts = %s, next_at = extract(epoch FROM clock_timestamp()) + %s, "
                "lease_owner = NULL, lease_until = 0 WHERE job_id = %s AND lease_owner = %s",
                (attempts, delay_s, job_id, worker),
            )
            if cursor.rowcount != 1:
                return False
            await conn.execute("UPDATE jobs SET webhook_attempts = %s WHERE id = %s", (attempts, job_id))
            return True

    async def done(self, job_id: str, worker: str, *, state: WebhookState, attempts: int) -> bool:
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE webhook_outbox SET next_at = NULL, lease_owner = NULL, lease_until = 0, attempts = %s "
                "WHERE job_id = %s AND lease_owner = %s",
                (attempts, job_id, worker),
            )
            if cursor.rowcount != 1:
                return False
            await conn.execute(
                "UPDATE jobs SET webhook = %s, webhook_attempts = %s WHERE id = %s", (state, attempts, job_id)
            )
            return True

    async def close(self) -> None:
        return None  # the pool belongs to the store


def backend_for(store: JobStore) -> OutboxBackend:
    """The outbox beside the store: the same SQLite file, or the same PostgreSQL pool."""
    if isinstance(store, PostgresJobStore):
        return PostgresOutbox(store.pool)
    if isinstance(store, SqliteJobStore):
        return SqliteOutbox(store.path)
    raise TypeError(f"no outbox for a {type(store).__name__}")


class Outbox:
    """Delivers finished jobs' webhooks from the database, on every replica, each job by one of them at a time."""

    def __init__(
        self,
        store: JobStore,
        sender: WebhookSender,
        backend: OutboxBackend | None = None,
        *,
        worker: str | None = None,
        poll_s: float = POLL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.sender = sender
        self._backend = backend  # None: the store's own, once the store is open (its pool exists then)
        self.worker = worker or replica_name()
        self.poll_s = poll_s
        self.clock = clock
        # Longer than one attempt can take, so a live holder never loses its row mid-POST.
        self.lease_s = sender.timeout_s + 10
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def backend(self) -> OutboxBackend:
        if self._backend is None:
            self._backend = backend_for(self.store)
        return self._backend

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="webhook-outbox")

    def notify(self) -> None:
        """A job ended here: look now instead of at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop; an attempt cut here is made again by a replica once its lease runs out."""
        await cancel_and_wait(self._task)
        self._task = None
        await self.sender.aclose()
        if self._backend is not None:
            await self._backend.close()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            wait = self.poll_s
            try:
                claimed = await self.backend.claim(self.worker, lease_s=self.lease_s, limit=BATCH)
                if claimed:
                    delays = await asyncio.gather(*(self._attempt(row) for row in claimed))
                    wait = min([self.poll_s, *(d for d in delays if d is not None)])
                    if len(claimed) == BATCH:
                        wait = 0  # more may be due
            except Exception:  # the database may be away for a while: try again at the next poll
                log.exception("webhook outbox: cannot claim deliveries")
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    async def run_once(self) -> int:
        """One claim and its attempts (tests and tools); how many rows were attempted."""
        claimed = await self.backend.claim(self.worker, lease_s=self.lease_s, limit=BATCH)
        await asyncio.gather(*(self._attempt(row) for row in claimed))
        return len(claimed)

    async def _attempt(self, row: Claimed) -> float | None:
        """One attempt for a claimed row; the delay until its next attempt, if one is due."""
        record = await self.store.get(row.job_id)
        if record is None or record.callback_url is None:  # deleted or expired meanwhile
            await self.backend.done(row.job_id, self.worker, state="failed", attempts=row.attempts)
            return None
        number = row.attempts + 1
        payload = summarize(record, self.clock()).model_dump(mode="json", exclude={"webhook"})
        attempt = await self.sender.attempt(record.callback_url, payload, number)
        if attempt.final:
            state: WebhookState = "delivered" if attempt.delivered else "failed"
            if not await self.backend.done(row.job_id, self.worker, state=state, attempts=number):
                log.warning("webhook for job %s: lease lost during the attempt; another replica owns it", row.job_id)
            return None
        delay = self.sender.backoff(number)
        await self.backend.retry(row.job_id, self.worker, attempts=number, delay_s=delay)
        return delay
