"""`JobStore` on one SQLite file: the embedded default, for one host.

WAL mode with `synchronous=FULL`: every method is one `BEGIN IMMEDIATE` transaction, so a process
killed at any instant (kill -9) leaves either the page stored or not, never half of it. The immediate
transaction takes the file's write lock first, which is what makes a page claim exclusive here (the
role `FOR UPDATE SKIP LOCKED` plays on PostgreSQL): several processes on one host may share the file
and all work its jobs.

Blocking sqlite3 calls run in worker threads (one connection, one lock), so the event loop never waits
on the disk. The file is created on the first submitted job, not at start-up: a service that never
takes a job writes nothing.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio

from app.jobs.store import migrations
from app.jobs.store.base import OPEN, TURN_ORDER, TURNS, SqlJobStore, Tx

T = TypeVar("T")


class _SqliteTx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(row) for row in self.db.execute(sql, params).fetchall()]

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self.db.execute(sql, params).rowcount


class SchemaTooNew(RuntimeError):
    """The file was migrated by a newer release (message names JOBS_DB)."""


def schema_version(db: sqlite3.Connection) -> int:
    """The file's applied version: 0 for a file from before versions (or an empty one)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone() is None:
        return 0
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def check_schema(path: Path) -> None:
    """Raise `SchemaTooNew` when an existing file is newer than this code (start-up check; opens read-only)."""
    if not path.is_file():
        return
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        found = schema_version(db)
    except sqlite3.DatabaseError:
        return  # not ours to judge here; the first job's transaction says what is wrong
    finally:
        db.close()
    if found > len(migrations.SQLITE):
        raise SchemaTooNew(migrations.too_new(found, len(migrations.SQLITE), str(path)))


def migrate(db: sqlite3.Connection, where: str) -> None:
    """Apply the missing migrations, one transaction each; the version is read under the write lock, so processes
    opening a new file at once (uvicorn --workers, replicas) apply each migration once."""
    while True:
        db.execute("BEGIN IMMEDIATE")
        try:
            found = schema_version(db)
            if found > len(migrations.SQLITE):
                raise SchemaTooNew(migrations.too_new(found, len(migrations.SQLITE), where))
            if found == len(migrations.SQLITE):
                db.execute("COMMIT")
                return
            version = found + 1
            for statement in _statements(migrations.SQLITE[version - 1]):
                db.execute(statement)
            if version == 1:
                columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
                if "waiting" not in columns:  # a file from before `waiting` existed
                    db.execute("ALTER TABLE jobs ADD COLUMN waiting TEXT")
                if "options" not in columns:  # a file from before reading options (mode=grounding) existed
                    db.execute("ALTER TABLE jobs ADD COLUMN options TEXT")
            db.execute(migrations.VERSION_TABLE)
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


def _statements(script: str) -> list[str]:
    """A migration script's statements (they hold no `;` inside literals)."""
    return [part.strip() for part in script.split(";") if part.strip()]


class SqliteJobStore(SqlJobStore):
    """`JobStore` on one SQLite file (WAL); several processes on one host may share it."""

    def __init__(self, path: Path, *, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        super().__init__(ttl_s=ttl_s, max_bytes=max_bytes, clock=clock)
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

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
            db.execute("PRAGMA busy_timeout = 10000")
            try:
                migrate(db, str(self.path))
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[Tx], T], *, default: T) -> T:
        return await anyio.to_thread.run_sync(partial(self._locked, fn, default))

    def _locked(self, fn: Callable[[Tx], T], default: T) -> T:
        with self._lock:
            db = self._connect(create=False)
            return default if db is None else _transaction(db, fn)

    async def _run_creating(self, fn: Callable[[Tx], T]) -> T:
        def locked() -> T:
            with self._lock:
                db = self._connect(create=True)
                assert db is not None
                return _transaction(db, fn)

        return await anyio.to_thread.run_sync(locked)

    def _claim(self, tx: Tx, worker: str, limit: int, lease_until: float) -> list[dict[str, Any]]:
        """Under `BEGIN IMMEDIATE` (one writer at a time): the first owner in turn order with a claimable page."""
        now = self.clock()
        turns = tx.rows(
            f"{TURNS} SELECT w.owner, (SELECT t.job_id FROM page_tasks t WHERE t.owner = w.owner AND {OPEN} "
            f"ORDER BY t.created_at, t.job_id, t.page LIMIT 1) AS job_id FROM turns w ORDER BY {TURN_ORDER}",
            (now, now),
        )
        first = next((turn for turn in turns if turn["job_id"] is not None), None)
        if first is None:
            return []
        job_id = first["job_id"]
        tx.run(
            "INSERT INTO owner_turns (owner, served_at) VALUES (?, ?) "
            "ON CONFLICT (owner) DO UPDATE SET served_at = excluded.served_at",
            (first["owner"], now),
        )
        return tx.rows(
            "UPDATE page_tasks SET state = 'leased', worker = ?, attempt = attempt + 1, lease_until = ? "
            f"WHERE job_id = ? AND page IN (SELECT t.page FROM page_tasks t WHERE t.job_id = ? AND {OPEN} "
            "ORDER BY t.page LIMIT ?) RETURNING job_id, page, attempt",
            (worker, lease_until, job_id, job_id, now, limit),
        )

    async def sweep(self) -> int:
        deleted = await super().sweep()
        if deleted:
            await anyio.to_thread.run_sync(self._vacuum)
        return deleted

    async def delete(self, job_id: str) -> bool:
        deleted = await super().delete(job_id)
        if deleted:
            await anyio.to_thread.run_sync(self._vacuum)
        return deleted

    def _vacuum(self) -> None:
        """Give freed pages back to the file system (auto_vacuum=INCREMENTAL; outside a transaction)."""
        with self._lock:
            if self._db is not None:
                self._db.execute("PRAGMA incremental_vacuum")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _transaction(db: sqlite3.Connection, fn: Callable[[Tx], T]) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(_SqliteTx(db))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result
