"""`JobStore` on PostgreSQL (12 or newer): one database shared by every replica.

Selected with `JOBS_DB=postgresql://user:pass@host:port/db`. psycopg 3 with a connection pool of
JOBS_DB_POOL_SIZE; blocking calls in worker threads, like the SQLite store, so both stores run the
same SQL (`base.py`) and differ only in how a transaction is opened and how pages are claimed: here
with `FOR UPDATE SKIP LOCKED`, so replicas claiming at once never wait on each other nor get the
same page. Schema created and migrated at start (`migrations.py`, under an advisory lock so replicas
starting together migrate once).

Why the SQL is ours rather than procrastinate's or pgqueuer's: both are job-level queues (one row per
task, a worker runs it to the end) without a SQLite backend. What this service needs is per-page
leases renewed while the page is in flight, completions fenced on (page, worker, attempt) so a stale
holder's late result is refused, a cancel that voids the job's open pages so every replica's renewal
sees it within a second, and the same protocol on the embedded SQLite default. Expressing that on top
of either library would mean a job per page plus our own fencing and cancel tables beside theirs: more
SQL, not less. The whole claim path is a handful of statements, kept here and in `base.py`.

Database lost while running: calls raise `StoreUnavailable` (503 `store_unavailable`, Retry-After);
the pool reconnects by itself when the server is back.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import psycopg
import psycopg_pool
from psycopg.rows import dict_row

from app.errors import StoreUnavailable
from app.jobs.store import migrations
from app.jobs.store.base import OPEN, TURN_COLUMNS, TURN_ORDER, TURNS, Completion, Lease, SqlJobStore, Tx, dump_page
from app.results import FinishedPage

log = logging.getLogger(__name__)

T = TypeVar("T")

NOTIFY_CHANNEL = "lightonocr_jobs"  # payload: a job id whose pages or state changed (followers)
WORK_CHANNEL = "lightonocr_work"  # no payload: pages became claimable (idle runners claim now, not at their poll)
_MIGRATION_LOCK = 7_420_512_012  # pg_advisory_xact_lock key: one migrator at a time
_CONNECT_TIMEOUT_S = 5
_POOL_TIMEOUT_S = 5.0
_PING_TIMEOUT_S = 1.0  # how long a call waits for a connection before answering store_unavailable


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def hide_password(url: str) -> str:
    """The URL as it may be shown (logs, errors): password replaced, user and host kept."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class StoreStartError(RuntimeError):
    """The database cannot be used at start (unreachable, refused, or a newer schema); the message says why."""


def _sql(sql: str) -> bytes:
    """`?` placeholders (shared SQL) to psycopg's `%s`; the shared SQL holds no literal `?` or `%`."""
    return sql.replace("?", "%s").encode()


class _PgTx:
    def __init__(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        self.conn = conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self.conn.execute(_sql(sql), params)
        return cursor.fetchall() if cursor.description is not None else []

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.conn.execute(_sql(sql), params).rowcount


def schema_version(conn: psycopg.Connection[Any]) -> int:
    if conn.execute("SELECT to_regclass('schema_version')").fetchone() in (None, (None,)):
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0) if row is not None else 0


def prepare(url: str) -> None:
    """Start-up: connect, refuse a newer schema, apply the missing migrations; `StoreStartError` says why not."""
    shown = hide_password(url)
    try:
        with psycopg.connect(url, connect_timeout=_CONNECT_TIMEOUT_S) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            found = schema_version(conn)
            known = len(migrations.POSTGRES)
            if found > known:
                raise StoreStartError(migrations.too_new(found, known, shown))
            for version in range(found + 1, known + 1):
                conn.execute(migrations.POSTGRES[version - 1].encode())
                conn.execute(migrations.VERSION_TABLE)
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
                log.info("job store at %s migrated to schema version %d", shown, version)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreStartError(f"JOBS_DB: cannot use the PostgreSQL job store at {shown}: {reason}") from None


_W_ORDER = ", ".join(f"w.{column}" for column in TURN_COLUMNS)


class PostgresJobStore(SqlJobStore):
    """`JobStore` on a PostgreSQL database shared by every replica."""

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float,
        max_bytes: int,
        pool_size: int = 10,
        retry_after_s: int = 5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(ttl_s=ttl_s, max_bytes=max_bytes, clock=clock)
        self.conninfo = url
        self.shown = hide_password(url)
        self.retry_after_s = retry_after_s
        self.pool_size = pool_size
        self.sync_pool = self._make_pool()
        # For async users beside the store (webhook outbox, shared limits, LISTEN): opened by `open()`.
        self.pool = self._make_async_pool()
        self._opened = False

    def _make_async_pool(self) -> psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        """The async pool for users beside the store (tuple rows), not opened yet."""
        return psycopg_pool.AsyncConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=max(2, self.pool_size // 2),
            open=False,
            timeout=_POOL_TIMEOUT_S,
            kwargs={"connect_timeout": _CONNECT_TIMEOUT_S},
            check=psycopg_pool.AsyncConnectionPool.check_connection,
            reconnect_timeout=0,
            name="jobs-async",
        )

    def _make_pool(self) -> psycopg_pool.ConnectionPool[psycopg.Connection[dict[str, Any]]]:
        """A pool not opened yet (a closed pool cannot reopen: `close()` leaves a fresh one for a later use)."""
        return psycopg_pool.ConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            timeout=_POOL_TIMEOUT_S,
            # autocommit: the hot calls (claim, complete) are one statement, one round trip; the others open
            # their transaction explicitly. Asynchronous commit for those hot calls only (see `_transaction`).
            kwargs={
                "row_factory": dict_row,
                "connect_timeout": _CONNECT_TIMEOUT_S,
                "autocommit": True,
                "options": "-c synchronous_commit=off",
            },
            check=psycopg_pool.ConnectionPool.check_connection,
            reconnect_timeout=0,  # never give up reconnecting: the database comes back
            name="jobs",
        )

    async def open(self) -> None:
        """Migrate (idempotent) and open the pool; `StoreStartError` when the database cannot be used."""
        if self._opened:
            return
        await anyio.to_thread.run_sync(prepare, self.conninfo)
        await anyio.to_thread.run_sync(self.sync_pool.open)
        await self.pool.open()
        self._opened = True

    def _transaction(self, fn: Callable[[Tx], T], *, single: bool = False, timeout: float | None = None) -> T:
        """`fn` in one transaction; `single`: `fn` runs one statement, its own transaction (autocommit).

        Durability: every transaction commits synchronously (a submitted job, a cancel, a job's end survive a
        database crash) except the single-statement claims and page completions, which commit asynchronously:
        a database crash may forget the last fraction of a second of them, and those pages are then claimed and
        computed again after their lease, never half-stored (WAL order is kept). A later synchronous commit (the
        job's end) flushes every earlier one, so a job never ends without its pages.
        """
        if not self._opened:  # used without open() (tests, tools): prepare once
            prepare(self.conninfo)
            self.sync_pool.open()
            self._opened = True
        try:
            with self.sync_pool.connection(timeout=timeout) as conn:
                if single:
                    return fn(_PgTx(conn))
                with conn.transaction():
                    conn.execute("SET LOCAL synchronous_commit TO on")
                    return fn(_PgTx(conn))
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreUnavailable(
                f"the job store (PostgreSQL at {self.shown}) cannot be reached: {reason}; retry later",
                retry_after=self.retry_after_s,
            ) from exc

    async def _run(self, fn: Callable[[Tx], T], *, default: T) -> T:
        return await anyio.to_thread.run_sync(self._transaction, fn)

    async def _run_creating(self, fn: Callable[[Tx], T]) -> T:
        return await anyio.to_thread.run_sync(self._transaction, fn)

    async def _run_single(self, fn: Callable[[Tx], T]) -> T:
        return await anyio.to_thread.run_sync(partial(self._transaction, fn, single=True))

    async def claim(self, worker: str, *, limit: int, lease_s: float) -> list[Lease]:
        """One statement: take the first owner in turn order (`TURNS`) with a page no other claim holds
        (SKIP LOCKED), lease up to `limit` pages of that page's job, stamp the owner's turn, and mark the job
        running; it never waits on another claim (the turn stamp is skipped when a concurrent claim of the same
        owner holds it: that claim stamps the same moment)."""
        now = self.clock()
        sql = f"""
            {TURNS}, pick AS (
                SELECT p.job_id, p.owner FROM (SELECT * FROM turns ORDER BY {TURN_ORDER}) w
                CROSS JOIN LATERAL (
                    SELECT t.job_id, t.owner FROM page_tasks t WHERE t.owner = w.owner AND {OPEN}
                    ORDER BY t.created_at, t.job_id, t.page LIMIT 1 FOR UPDATE SKIP LOCKED
                ) p
                ORDER BY {_W_ORDER} LIMIT 1
            ), batch AS (
                SELECT t.job_id, t.page FROM page_tasks t JOIN pick ON t.job_id = pick.job_id WHERE {OPEN}
                ORDER BY t.page LIMIT ? FOR UPDATE OF t SKIP LOCKED
            ), running AS (
                UPDATE jobs SET status = 'running', run_started_at = ?, updated_at = ? WHERE id IN
                    (SELECT id FROM jobs WHERE id = (SELECT job_id FROM pick) AND status = 'queued'
                     FOR UPDATE SKIP LOCKED)
            ), turn AS (
                UPDATE owner_turns SET served_at = ? WHERE owner IN
                    (SELECT s.owner FROM owner_turns s WHERE s.owner = (SELECT owner FROM pick)
                     FOR UPDATE SKIP LOCKED)
            )
            UPDATE page_tasks u SET state = 'leased', worker = ?, attempt = u.attempt + 1, lease_until = ?
            FROM batch WHERE u.job_id = batch.job_id AND u.page = batch.page
            RETURNING u.job_id, u.page, u.attempt
            """
        values = [now, now, now, limit, now, now, now, worker, now + lease_s]
        rows = await self._run_single(lambda tx: tx.rows(sql, values))
        return sorted(Lease(row["job_id"], row["page"], worker, row["attempt"]) for row in rows)

    async def renew(self, leases: Sequence[Lease], lease_s: float) -> set[int]:
        """One statement for the whole batch (it runs every second per batch in flight)."""
        if not leases:
            return set()
        sql = (
            "UPDATE page_tasks t SET lease_until = ? FROM unnest(?::text[], ?::int[], ?::text[], ?::int[]) "
            "AS l(job_id, page, worker, attempt) WHERE t.job_id = l.job_id AND t.page = l.page "
            "AND t.worker = l.worker AND t.attempt = l.attempt AND t.state = 'leased' RETURNING t.page"
        )
        values = [
            self.clock() + lease_s,
            [lease.job_id for lease in leases],
            [lease.page for lease in leases],
            [lease.worker for lease in leases],
            [lease.attempt for lease in leases],
        ]
        rows = await self._run_single(lambda tx: tx.rows(sql, values))
        return {row["page"] for row in rows}

    async def complete(self, lease: Lease, page: FinishedPage) -> Completion:
        """One call of `lightonocr_complete_page` (migration 2): the fenced completion in one round trip."""
        values = (lease.job_id, lease.page, lease.worker, lease.attempt, dump_page(page), self.clock())
        rows = await self._run_single(
            lambda tx: tx.rows("SELECT accepted, job_done FROM lightonocr_complete_page(?, ?, ?, ?, ?, ?)", values)
        )
        return Completion(bool(rows[0]["accepted"]), bool(rows[0]["job_done"]))

    async def ping(self) -> None:
        """Readiness: answers within about a second even while the database is away (probes time out)."""
        await anyio.to_thread.run_sync(partial(self._transaction, lambda tx: tx.run("SELECT 1"), single=True,
                                               timeout=_PING_TIMEOUT_S))  # fmt: skip

    def _lock_job(self, tx: Tx, job_id: str) -> dict[str, Any] | None:
        found = tx.rows("SELECT status FROM jobs WHERE id = ? FOR UPDATE", (job_id,))
        return found[0] if found else None

    def _notify(self, tx: Tx, job_id: str) -> None:
        tx.rows(f"SELECT pg_notify('{NOTIFY_CHANNEL}', ?)", (job_id,))

    def _announce_work(self, tx: Tx) -> None:
        tx.rows(f"SELECT pg_notify('{WORK_CHANNEL}', '')")

    async def aclose(self) -> None:
        if self._opened:
            await self.pool.close()
            self.pool = self._make_async_pool()
        await anyio.to_thread.run_sync(self.close)

    def close(self) -> None:
        if self._opened:
            self.sync_pool.close()
            self.sync_pool = self._make_pool()
            self._opened = False
