"""Durable job state: a small `JobStore` protocol and its SQLite implementation.

SQLite in WAL mode with `synchronous=FULL`: every write below is one
transaction, so a process killed at any instant (kill -9) leaves either the
page stored or not, never half of it. The runner resumes from what is here.

Blocking sqlite3 calls run in worker threads (one connection, one lock), so
the event loop never waits on the disk. The file is created on the first
submitted job, not at start-up: a service that never takes a job writes nothing.

Several processes may share one file (on one host): each can take and read
jobs, but only the one holding the worker lock (`flock` on `<JOBS_DB>.lock`,
released by the kernel even on kill -9) runs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import anyio

from app.blocks import parse_blocks
from app.errors import JobsStorageFull
from app.results import Block, FinishedPage, PageResult

JobStatus = Literal["queued", "running", "succeeded", "partial", "failed", "cancelled"]
WebhookState = Literal["pending", "delivered", "failed"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "partial", "failed", "cancelled"})

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class NewJob:
    """What the API knows at submit time; the document bytes travel beside it."""

    owner: str
    pages: list[int]  # 1-based page numbers selected, in document order
    pages_spec: str | None  # the `pages` field as sent (re-applied on resume)
    password: str | None
    callback_url: str | None
    filename: str | None
    options: dict[str, Any] | None = None  # how to read the pages (`ReadOptions.to_dict`); None: the defaults


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    owner: str
    status: JobStatus
    pages: list[int]
    pages_spec: str | None
    password: str | None
    callback_url: str | None
    filename: str | None
    pages_done: int
    pages_done_in_run: int  # pages finished since the current run started (for the ETA)
    error: dict[str, Any] | None
    created_at: float
    updated_at: float
    run_started_at: float | None
    finished_at: float | None
    expires_at: float | None
    webhook: WebhookState | None
    webhook_attempts: int
    stored_bytes: int
    waiting: dict[str, Any] | None = None  # {code, message, since}: why the job is not moving, since when
    options: dict[str, Any] | None = None  # how to read the pages (`ReadOptions.to_dict`); None: the defaults

    @property
    def pages_total(self) -> int:
        return len(self.pages)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def eta_s(self, now: float) -> float | None:
        """Seconds left at this run's measured page rate; null until a page of this run finished."""
        if self.status != "running" or self.run_started_at is None or self.pages_done_in_run == 0:
            return None
        rate = self.pages_done_in_run / max(now - self.run_started_at, 1e-6)
        return round((self.pages_total - self.pages_done) / rate, 1)


class JobStore(Protocol):
    """What the API and the runner need from durable storage; every method is one transaction."""

    async def create(self, job: NewJob, document: bytes) -> JobRecord:
        """Store a queued job and its document, or raise `JobsStorageFull`."""
        ...

    async def get(self, job_id: str) -> JobRecord | None:
        """The job, or None when unknown or expired."""
        ...

    async def list_jobs(self, owner: str | None = None, limit: int = 100) -> list[JobRecord]: ...

    async def document(self, job_id: str) -> bytes | None: ...

    async def pages(self, job_id: str) -> list[FinishedPage]:
        """The finished pages, in page order, each with its blocks as stored (never parsed on the event loop)."""
        ...

    async def page_log(self, job_id: str, after: int = 0) -> list[FinishedPage]:
        """The finished pages in the order they were stored, less the first `after` (a follower's resume point).

        Stored order is commit order and never changes (pages are deleted only with their job), so the k-th
        stored page is the same on every replica: event ids are built on it (`app/jobs/events.py`).
        """
        ...

    async def add_page(self, job_id: str, page: FinishedPage) -> bool:
        """Store a finished page; False when the job is no longer running (cancelled elsewhere: stop)."""
        ...

    async def next_queued(self, exclude: Collection[str] = (), busy_owners: Collection[str] = ()) -> JobRecord | None:
        """The oldest queued job not in `exclude`, preferring owners with no job running (fairness)."""
        ...

    async def mark_running(self, job_id: str) -> bool:
        """queued -> running (a new run: the ETA restarts); False if the job is no longer queued/running."""
        ...

    async def finish(self, job_id: str, status: JobStatus, error: dict[str, Any] | None = None) -> JobRecord | None:
        """queued/running -> a terminal status; None if the job had already ended (say, cancelled meanwhile)."""
        ...

    async def cancel(self, job_id: str) -> tuple[JobRecord | None, bool]:
        """Cancel an unfinished job: (the job, whether this call cancelled it); a finished one is unchanged."""
        ...

    async def requeue_running(self) -> int:
        """After a restart, jobs left `running` by the previous process are queued again."""
        ...

    async def pending_webhooks(self) -> list[JobRecord]: ...

    async def set_waiting(self, job_id: str, error: dict[str, Any]) -> None:
        """The job cannot move for now (`error`: code, message); cleared by its next page or its end."""
        ...

    async def set_webhook(self, job_id: str, state: WebhookState, attempts: int) -> None: ...

    async def sweep(self) -> int:
        """Delete expired jobs with their document and pages; how many were deleted."""
        ...

    async def delete(self, job_id: str) -> bool:
        """Delete one job now, with its document, password and pages; False when there was none."""
        ...

    async def used_bytes(self) -> int: ...

    def claim_worker(self) -> bool:
        """Try to become the one process that runs this store's jobs; True once held (non-blocking)."""
        ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    pages TEXT NOT NULL,
    pages_spec TEXT,
    password TEXT,
    callback_url TEXT,
    filename TEXT,
    doc_bytes INTEGER NOT NULL,
    result_bytes INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    run_started_at REAL,
    finished_at REAL,
    expires_at REAL,
    webhook TEXT,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    waiting TEXT,
    options TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs (expires_at);
CREATE TABLE IF NOT EXISTS documents (
    job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS pages (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    page INTEGER NOT NULL,
    result TEXT NOT NULL,
    finished_at REAL NOT NULL,
    PRIMARY KEY (job_id, page)
);
"""

_SELECT = """
SELECT j.*,
    (SELECT COUNT(*) FROM pages p WHERE p.job_id = j.id) AS pages_done,
    (SELECT COUNT(*) FROM pages p WHERE p.job_id = j.id AND p.finished_at >= j.run_started_at) AS pages_done_in_run
FROM jobs j
"""


class SqliteJobStore:
    """`JobStore` on one SQLite file (WAL). One process per file: see the README on replicas."""

    def __init__(self, path: Path, *, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._worker_lock: int | None = None  # fd holding flock on <path>.lock

    # -- connection ----------------------------------------------------------------------

    def _connect(self, *, create: bool) -> sqlite3.Connection | None:
        if self._db is None:
            if not create and not self.path.exists():
                return None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                # The file holds documents and PDF passwords: readable by this user only.
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new file
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA busy_timeout = 5000")
            db.executescript(_SCHEMA)
            columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            if "waiting" not in columns:  # a file from before `waiting` existed
                db.execute("ALTER TABLE jobs ADD COLUMN waiting TEXT")
            if "options" not in columns:  # a file from before reading options (mode=grounding) existed
                db.execute("ALTER TABLE jobs ADD COLUMN options TEXT")
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, default: T) -> T:
        """`fn` in one transaction in a worker thread; `default` while no job was ever stored."""
        return await anyio.to_thread.run_sync(partial(self._locked, fn, default))

    def _locked(self, fn: Callable[[sqlite3.Connection], T], default: T) -> T:
        with self._lock:
            db = self._connect(create=False)
            return default if db is None else _transaction(db, fn)

    async def _run_creating(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                db = self._connect(create=True)
                assert db is not None
                return _transaction(db, fn)

        return await anyio.to_thread.run_sync(locked)

    def claim_worker(self) -> bool:
        if self._worker_lock is not None:
            return True
        if not self.path.exists():  # no job yet: nothing to run, and nothing written
            return False
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process guard, one process per file is on the operator
            return True
        fd = os.open(f"{self.path}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._worker_lock = fd
        return True

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._worker_lock is not None:
                with contextlib.suppress(OSError):
                    os.close(self._worker_lock)  # releases the flock
                self._worker_lock = None

    # -- reads ---------------------------------------------------------------------------

    def _record(self, row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            id=row["id"],
            owner=row["owner"],
            status=row["status"],
            pages=json.loads(row["pages"]),
            pages_spec=row["pages_spec"],
            password=row["password"],
            callback_url=row["callback_url"],
            filename=row["filename"],
            pages_done=row["pages_done"],
            pages_done_in_run=row["pages_done_in_run"],
            error=json.loads(row["error"]) if row["error"] else None,
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            run_started_at=row["run_started_at"],
            finished_at=row["finished_at"],
            expires_at=row["expires_at"],
            webhook=row["webhook"],
            webhook_attempts=row["webhook_attempts"],
            stored_bytes=row["doc_bytes"] + row["result_bytes"],
            waiting=json.loads(row["waiting"]) if row["waiting"] else None,
            options=json.loads(row["options"]) if row["options"] else None,
        )

    def _get(self, db: sqlite3.Connection, job_id: str) -> JobRecord | None:
        row = db.execute(_SELECT + " WHERE j.id = ? AND (j.expires_at IS NULL OR j.expires_at > ?)",
                         (job_id, self.clock())).fetchone()  # fmt: skip
        return None if row is None else self._record(row)

    async def get(self, job_id: str) -> JobRecord | None:
        return await self._run(lambda db: self._get(db, job_id), default=None)

    async def list_jobs(self, owner: str | None = None, limit: int = 100) -> list[JobRecord]:
        def query(db: sqlite3.Connection) -> list[JobRecord]:
            where = "WHERE (j.expires_at IS NULL OR j.expires_at > ?)"
            params: list[Any] = [self.clock()]
            if owner is not None:
                where += " AND j.owner = ?"
                params.append(owner)
            rows = db.execute(f"{_SELECT} {where} ORDER BY j.created_at DESC LIMIT ?", [*params, limit])
            return [self._record(row) for row in rows]

        return await self._run(query, default=[])

    async def document(self, job_id: str) -> bytes | None:
        def query(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT data FROM documents WHERE job_id = ?", (job_id,)).fetchone()
            return None if row is None else bytes(row["data"])

        return await self._run(query, default=None)

    async def pages(self, job_id: str) -> list[FinishedPage]:
        def query(db: sqlite3.Connection) -> list[FinishedPage]:
            rows = db.execute("SELECT result FROM pages WHERE job_id = ? ORDER BY page", (job_id,))
            return [_load_page(row["result"]) for row in rows]

        return await self._run(query, default=[])

    async def page_log(self, job_id: str, after: int = 0) -> list[FinishedPage]:
        def query(db: sqlite3.Connection) -> list[FinishedPage]:
            # rowid grows with each insert, and writes are serialized (BEGIN IMMEDIATE): rowid order is commit order.
            rows = db.execute(
                "SELECT result FROM pages WHERE job_id = ? ORDER BY rowid LIMIT -1 OFFSET ?", (job_id, max(after, 0))
            )
            return [_load_page(row["result"]) for row in rows]

        return await self._run(query, default=[])

    async def next_queued(self, exclude: Collection[str] = (), busy_owners: Collection[str] = ()) -> JobRecord | None:
        def query(db: sqlite3.Connection) -> JobRecord | None:
            excluded, busy = ",".join("?" * len(exclude)), ",".join("?" * len(busy_owners))
            row = db.execute(
                f"{_SELECT} WHERE j.status = 'queued' AND j.id NOT IN ({excluded}) "
                f"ORDER BY j.owner IN ({busy}), j.created_at LIMIT 1",
                [*exclude, *busy_owners],
            ).fetchone()
            return None if row is None else self._record(row)

        return await self._run(query, default=None)

    async def pending_webhooks(self) -> list[JobRecord]:
        def query(db: sqlite3.Connection) -> list[JobRecord]:
            return [self._record(row) for row in db.execute(f"{_SELECT} WHERE j.webhook = 'pending'")]

        return await self._run(query, default=[])

    async def used_bytes(self) -> int:
        return await self._run(self._used, default=0)

    @staticmethod
    def _used(db: sqlite3.Connection) -> int:
        used: int = db.execute("SELECT COALESCE(SUM(doc_bytes + result_bytes), 0) FROM jobs").fetchone()[0]
        return used

    # -- writes --------------------------------------------------------------------------

    async def create(self, job: NewJob, document: bytes) -> JobRecord:
        def insert(db: sqlite3.Connection) -> JobRecord:
            used = self._used(db)
            if used + len(document) > self.max_bytes:
                raise JobsStorageFull(
                    f"job storage is full: {used} of {self.max_bytes} bytes used (JOBS_MAX_BYTES); "
                    "retry once older jobs expire",
                    used_bytes=used,
                    max_bytes=self.max_bytes,
                    document_bytes=len(document),
                )
            job_id, now = uuid.uuid4().hex, self.clock()
            db.execute(
                "INSERT INTO jobs (id, owner, status, pages, pages_spec, password, callback_url, filename, "
                "doc_bytes, created_at, updated_at, webhook, options) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                (job_id, job.owner, json.dumps(job.pages), job.pages_spec, job.password, job.callback_url,
                 job.filename, len(document), now, now, json.dumps(job.options) if job.options else None),
            )  # fmt: skip
            db.execute("INSERT INTO documents (job_id, data) VALUES (?, ?)", (job_id, document))
            record = self._get(db, job_id)
            assert record is not None
            return record

        return await self._run_creating(insert)

    async def add_page(self, job_id: str, page: FinishedPage) -> bool:
        payload = _dump_page(page)

        def insert(db: sqlite3.Connection) -> bool:
            now = self.clock()
            cursor = db.execute(
                "INSERT OR IGNORE INTO pages (job_id, page, result, finished_at) "
                "SELECT id, ?, ?, ? FROM jobs WHERE id = ?",
                (page.result.page, payload, now, job_id),
            )
            if cursor.rowcount:
                db.execute(
                    "UPDATE jobs SET result_bytes = result_bytes + ?, updated_at = ?, waiting = NULL WHERE id = ?",
                    (len(payload), now, job_id),
                )
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return row is not None and row["status"] == "running"

        return await self._run(insert, default=False)

    async def mark_running(self, job_id: str) -> bool:
        def update(db: sqlite3.Connection) -> bool:
            now = self.clock()
            cursor = db.execute(
                "UPDATE jobs SET status = 'running', run_started_at = ?, updated_at = ? "
                "WHERE id = ? AND status IN ('queued', 'running')",
                (now, now, job_id),
            )
            return cursor.rowcount == 1

        return await self._run(update, default=False)

    def _terminate(
        self, db: sqlite3.Connection, job_id: str, status: JobStatus, error: dict[str, Any] | None, allowed: str
    ) -> bool:
        now = self.clock()
        cursor = db.execute(
            f"UPDATE jobs SET status = ?, error = ?, finished_at = ?, updated_at = ?, expires_at = ?, waiting = NULL, "
            f"webhook = CASE WHEN callback_url IS NULL THEN NULL ELSE 'pending' END "
            f"WHERE id = ? AND status IN ({allowed})",
            (status, json.dumps(error) if error else None, now, now, now + self.ttl_s, job_id),
        )
        return cursor.rowcount == 1

    async def finish(self, job_id: str, status: JobStatus, error: dict[str, Any] | None = None) -> JobRecord | None:
        def update(db: sqlite3.Connection) -> JobRecord | None:
            if not self._terminate(db, job_id, status, error, "'queued', 'running'"):
                return None
            return self._get(db, job_id)

        return await self._run(update, default=None)

    async def cancel(self, job_id: str) -> tuple[JobRecord | None, bool]:
        def update(db: sqlite3.Connection) -> tuple[JobRecord | None, bool]:
            changed = self._terminate(db, job_id, "cancelled", None, "'queued', 'running'")
            return self._get(db, job_id), changed

        return await self._run(update, default=(None, False))

    async def requeue_running(self) -> int:
        def update(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "UPDATE jobs SET status = 'queued', updated_at = ? WHERE status = 'running'", (self.clock(),)
            )
            return cursor.rowcount

        return await self._run(update, default=0)

    async def set_waiting(self, job_id: str, error: dict[str, Any]) -> None:
        waiting = json.dumps({**error, "since": self.clock()})

        def update(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE jobs SET waiting = ? WHERE id = ? AND status IN ('queued', 'running')", (waiting, job_id)
            )

        await self._run(update, default=None)

    async def set_webhook(self, job_id: str, state: WebhookState, attempts: int) -> None:
        def update(db: sqlite3.Connection) -> None:
            db.execute("UPDATE jobs SET webhook = ?, webhook_attempts = ? WHERE id = ?", (state, attempts, job_id))

        await self._run(update, default=None)

    async def sweep(self) -> int:
        def delete(db: sqlite3.Connection) -> int:
            cursor = db.execute("DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (self.clock(),))
            return cursor.rowcount

        deleted = await self._run(delete, default=0)
        if deleted:
            await anyio.to_thread.run_sync(self._vacuum)
        return deleted

    async def delete(self, job_id: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount == 1

        deleted = await self._run(delete, default=False)
        if deleted:
            await anyio.to_thread.run_sync(self._vacuum)
        return deleted

    def _vacuum(self) -> None:
        """Give freed pages back to the file system (auto_vacuum=INCREMENTAL; outside a transaction)."""
        with self._lock:
            if self._db is not None:
                self._db.execute("PRAGMA incremental_vacuum")


def _dump_page(page: FinishedPage) -> str:
    """The page's result as its JSON, plus its blocks under `blocks` (parsed once, when the page ended)."""
    body = page.result.model_dump(mode="json")
    body["blocks"] = [block.model_dump(mode="json") for block in page.blocks]
    return json.dumps(body, ensure_ascii=False)


def _load_page(payload: str) -> FinishedPage:
    """A stored page; one stored before blocks were kept has them parsed here (in the store's worker thread)."""
    body = json.loads(payload)
    stored = body.pop("blocks", None)
    result = PageResult.model_validate(body)
    if stored is None:
        return FinishedPage(result, parse_blocks(result.text, result.page))
    return FinishedPage(result, [Block.model_validate(block) for block in stored])


def _transaction(db: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result
