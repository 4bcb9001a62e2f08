"""The `JobStore` protocol, its records, and the SQL both stores share (SQLite and PostgreSQL).

The unit of work is the page. A job's selected pages are rows of `page_tasks`; workers of every process
(every replica) claim a few pages of one job at a time, hold a lease on them that they renew while the
pages are in flight, and a page's result is stored only when it comes from the current lease holder:
the completion is fenced on (job, page, worker, attempt). A worker that died (kill -9) just stops
renewing: its pages are claimed again once the lease expired. A cancelled job's open pages become
`void`, so their renewals fail and the holders abort them at the engine.

Which job's pages a worker claims next is fair between owners (API keys) across every process: the
owner with the fewest pages leased anywhere goes first; among equals, the one served longest ago
(`owner_turns`, stamped at each claim), then the one waiting longest; its oldest job's pages are taken.
So one key's 2-page job does not wait behind another key's 500 pages on any replica, and keys sharing
one slot take turns (`TURNS` below).

Job status derives from the pages: `queued` until a page is first claimed, `running` after, and the
worker storing the last page assembles the result and ends the job (any worker finishes a job whose
pages are all stored but that never ended: its finisher died in between).

Every method is one transaction. The SQL is written once, with `?` placeholders; each store runs it
through its own `Tx` (blocking calls in a worker thread: the event loop never waits on the database).
"""

from __future__ import annotations

import json
import uuid
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeVar

from app.blocks import parse_blocks
from app.errors import IdempotencyKeyReused, JobsStorageFull
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
    pages_spec: str | None  # the `pages` field as sent (re-applied when a page is run)
    password: str | None
    callback_url: str | None
    filename: str | None
    options: dict[str, Any] | None = None  # how to read the pages (`ReadOptions.to_dict`); None: the defaults
    idempotency_key: str | None = None  # the client's Idempotency-Key: one job per (owner, key)
    request_sha256: str | None = None  # what the key was used for (document, pages, password, options, callback)


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
    pages_done_in_run: int  # pages finished since the job started running (for the ETA)
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
    replayed: bool = False  # `create` found the job an earlier submission with the same Idempotency-Key made

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


@dataclass(frozen=True, slots=True, order=True)
class Lease:
    """One claimed page: its result counts only while (job, page, worker, attempt) is still the holder."""

    job_id: str
    page: int  # 1-based page number
    worker: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Completion:
    accepted: bool  # False: not (any longer) the lease holder, or the job ended; the result was dropped
    job_done: bool  # True: this was the job's last page; the caller assembles and ends the job


class JobStore(Protocol):
    """What the API and the runner need from durable storage; every method is one transaction."""

    async def open(self) -> None:
        """Connect and migrate (PostgreSQL), or nothing (SQLite opens on the first job); raises when it cannot."""
        ...

    async def ping(self) -> None:
        """Raise `StoreUnavailable` when the database cannot be reached now (readiness)."""
        ...

    async def create(self, job: NewJob, document: bytes) -> JobRecord:
        """Store a queued job, its document and its pages to do, or raise `JobsStorageFull`. With an
        idempotency key already used by the owner: that job (`replayed`), or `IdempotencyKeyReused`."""
        ...

    async def get(self, job_id: str) -> JobRecord | None:
        """The job, or None when unknown or expired."""
        ...

    async def replay(self, job: NewJob) -> JobRecord | None:
        """The job an earlier submission with `job`'s owner and idempotency key made (`replayed`), None if
        there was none; `IdempotencyKeyReused` when that submission was a different one."""
        ...

    async def list_jobs(self, owner: str | None = None, limit: int = 100) -> list[JobRecord]: ...

    async def document(self, job_id: str) -> bytes | None: ...

    async def pages(self, job_id: str) -> list[FinishedPage]:
        """The finished pages, in page order, each with its blocks as stored (never parsed on the event loop)."""
        ...

    async def page_log(self, job_id: str, after: int = 0) -> list[FinishedPage]:
        """The finished pages in the order they were stored, skipping the first `after` (resumable events)."""
        ...

    async def claim(self, worker: str, *, limit: int, lease_s: float) -> list[Lease]:
        """Lease up to `limit` unstarted (or expired) pages of ONE job, of the owner whose turn it is (`TURNS`)."""
        ...

    async def renew(self, leases: Sequence[Lease], lease_s: float) -> set[int]:
        """Extend the leases still held; the page numbers renewed (a missing one: abort it, it is not ours)."""
        ...

    async def complete(self, lease: Lease, page: FinishedPage) -> Completion:
        """Store a page's result if `lease` is still the holder (fencing); whether it was the job's last."""
        ...

    async def release(self, leases: Sequence[Lease]) -> None:
        """Give pages back unfinished (graceful stop): another worker may claim them at once."""
        ...

    async def unfinalized(self) -> list[JobRecord]:
        """Jobs whose pages are all stored but that never ended (their finisher died): to be finished."""
        ...

    async def finish(self, job_id: str, status: JobStatus, error: dict[str, Any] | None = None) -> JobRecord | None:
        """queued/running -> a terminal status; None if the job had already ended (say, cancelled meanwhile)."""
        ...

    async def cancel(self, job_id: str) -> tuple[JobRecord | None, bool]:
        """Cancel an unfinished job: (the job, whether this call cancelled it); a finished one is unchanged."""
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

    def close(self) -> None: ...

    async def aclose(self) -> None:
        """Close, from the event loop (pools with async users are closed there)."""
        ...


class Tx(Protocol):
    """One open transaction; SQL with `?` placeholders."""

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute; the number of rows changed."""
        ...


# A claimable page: never claimed, or its lease expired. The IN term lets both databases use the partial indexes.
OPEN = "(t.state IN ('todo', 'leased') AND (t.state = 'todo' OR t.lease_until < ?))"

# The owners with open pages, in the order they should be served (one `?`: now). `owners` walks the distinct
# owners of open pages through the index (one probe per owner, not a scan of every queued page); `turns` adds
# each one's live leases (pages in flight on every replica), when it was last served, and its oldest open page.
TURNS = """
WITH RECURSIVE owners (owner) AS (
    SELECT (SELECT t.owner FROM page_tasks t WHERE t.state IN ('todo', 'leased') ORDER BY t.owner LIMIT 1)
    UNION ALL
    SELECT (SELECT t.owner FROM page_tasks t WHERE t.state IN ('todo', 'leased') AND t.owner > o.owner
            ORDER BY t.owner LIMIT 1)
    FROM owners o WHERE o.owner IS NOT NULL
), turns AS (
    SELECT o.owner,
        (SELECT COUNT(*) FROM page_tasks l WHERE l.owner = o.owner AND l.state = 'leased' AND l.lease_until >= ?)
            AS leased,
        COALESCE((SELECT s.served_at FROM owner_turns s WHERE s.owner = o.owner), 0) AS served_at,
        (SELECT MIN(t.created_at) FROM page_tasks t WHERE t.owner = o.owner AND t.state IN ('todo', 'leased'))
            AS since
    FROM owners o WHERE o.owner IS NOT NULL
)
"""
TURN_COLUMNS = ("leased", "served_at", "since", "owner")  # the order of `turns`, first key first
TURN_ORDER = ", ".join(TURN_COLUMNS)

_SELECT = """
SELECT j.*,
    (SELECT COUNT(*) FROM pages p WHERE p.job_id = j.id) AS pages_done,
    (SELECT COUNT(*) FROM pages p WHERE p.job_id = j.id AND p.finished_at >= j.run_started_at) AS pages_done_in_run
FROM jobs j
"""


class SqlJobStore:
    """The `JobStore` logic over `Tx`; subclasses say how a transaction is opened, and how pages are claimed."""

    def __init__(self, *, ttl_s: float, max_bytes: int, clock: Callable[[], float]) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.clock = clock

    # -- what a store provides -------------------------------------------------------------

    @abstractmethod
    async def _run(self, fn: Callable[[Tx], T], *, default: T) -> T:
        """`fn` in one transaction in a worker thread; `default` while there is no database yet (SQLite)."""

    @abstractmethod
    async def _run_creating(self, fn: Callable[[Tx], T]) -> T:
        """`fn` in one transaction, creating the database first when there is none yet."""

    def _claim(self, tx: Tx, worker: str, limit: int, lease_until: float) -> list[dict[str, Any]]:
        """Lease the pages (rows with job_id, page, attempt): locking is where the stores differ."""
        raise NotImplementedError  # PostgreSQL claims in one statement of its own (`PostgresJobStore.claim`)

    def _mark_running(self, tx: Tx, job_id: str, now: float) -> None:
        """queued -> running at the job's first claim (its ETA counts from here)."""
        tx.run(
            "UPDATE jobs SET status = 'running', run_started_at = ?, updated_at = ? WHERE id = ? AND status = 'queued'",
            (now, now, job_id),
        )

    def _announce_work(self, tx: Tx) -> None:
        """Tell other replicas' runners that pages became claimable; nothing on SQLite (one process runs jobs)."""

    def _notify(self, tx: Tx, job_id: str) -> None:
        """Tell listeners (other replicas) that the job moved; nothing on SQLite."""

    def _lock_job(self, tx: Tx, job_id: str) -> dict[str, Any] | None:
        """The job's status row, locked until the transaction ends (SQLite's transactions lock the file)."""
        found = tx.rows("SELECT status FROM jobs WHERE id = ?", (job_id,))
        return found[0] if found else None

    async def open(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    def close(self) -> None:
        return None

    async def aclose(self) -> None:
        self.close()

    # -- reads ---------------------------------------------------------------------------

    @staticmethod
    def _record(row: dict[str, Any]) -> JobRecord:
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

    def _get(self, tx: Tx, job_id: str) -> JobRecord | None:
        found = tx.rows(_SELECT + " WHERE j.id = ? AND (j.expires_at IS NULL OR j.expires_at > ?)",
                        (job_id, self.clock()))  # fmt: skip
        return self._record(found[0]) if found else None

    async def replay(self, job: NewJob) -> JobRecord | None:
        if job.idempotency_key is None:
            return None
        return await self._run(lambda tx: self._replay(tx, job), default=None)

    async def get(self, job_id: str) -> JobRecord | None:
        return await self._run(lambda tx: self._get(tx, job_id), default=None)

    async def list_jobs(self, owner: str | None = None, limit: int = 100) -> list[JobRecord]:
        def query(tx: Tx) -> list[JobRecord]:
            where = "WHERE (j.expires_at IS NULL OR j.expires_at > ?)"
            params: list[Any] = [self.clock()]
            if owner is not None:
                where += " AND j.owner = ?"
                params.append(owner)
            rows = tx.rows(f"{_SELECT} {where} ORDER BY j.created_at DESC LIMIT ?", [*params, limit])
            return [self._record(row) for row in rows]

        return await self._run(query, default=[])

    async def document(self, job_id: str) -> bytes | None:
        def query(tx: Tx) -> bytes | None:
            found = tx.rows("SELECT data FROM documents WHERE job_id = ?", (job_id,))
            return bytes(found[0]["data"]) if found else None

        return await self._run(query, default=None)

    async def pages(self, job_id: str) -> list[FinishedPage]:
        def query(tx: Tx) -> list[FinishedPage]:
            rows = tx.rows("SELECT result FROM pages WHERE job_id = ? ORDER BY page", (job_id,))
            return [_load_page(row["result"]) for row in rows]

        return await self._run(query, default=[])

    async def page_log(self, job_id: str, after: int = 0) -> list[FinishedPage]:
        def query(tx: Tx) -> list[FinishedPage]:
            rows = tx.rows("SELECT result FROM pages WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after))
            return [_load_page(row["result"]) for row in rows]

        return await self._run(query, default=[])

    async def pending_webhooks(self) -> list[JobRecord]:
        def query(tx: Tx) -> list[JobRecord]:
            return [self._record(row) for row in tx.rows(f"{_SELECT} WHERE j.webhook = 'pending'")]

        return await self._run(query, default=[])

    async def used_bytes(self) -> int:
        return await self._run(self._used, default=0)

    @staticmethod
    def _used(tx: Tx) -> int:
        return int(tx.rows("SELECT COALESCE(SUM(doc_bytes + result_bytes), 0) AS used FROM jobs")[0]["used"])

    async def unfinalized(self) -> list[JobRecord]:
        def query(tx: Tx) -> list[JobRecord]:
            rows = tx.rows(
                f"{_SELECT} WHERE j.status IN ('queued', 'running') AND NOT EXISTS "
                "(SELECT 1 FROM page_tasks t WHERE t.job_id = j.id AND t.state <> 'done')"
            )
            return [self._record(row) for row in rows]

        return await self._run(query, default=[])

    # -- writes --------------------------------------------------------------------------

    async def create(self, job: NewJob, document: bytes) -> JobRecord:
        def insert(tx: Tx) -> JobRecord:
            if (earlier := self._replay(tx, job)) is not None:
                return earlier
            used = self._used(tx)
            if used + len(document) > self.max_bytes:
                raise JobsStorageFull(
                    f"job storage is full: {used} of {self.max_bytes} bytes used (JOBS_MAX_BYTES); "
                    "retry once older jobs expire",
                    used_bytes=used,
                    max_bytes=self.max_bytes,
                    document_bytes=len(document),
                )
            job_id, now = uuid.uuid4().hex, self.clock()
            inserted = tx.rows(
                "INSERT INTO jobs (id, owner, status, pages, pages_spec, password, callback_url, filename, "
                "doc_bytes, created_at, updated_at, webhook, options, idempotency_key, request_sha256) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?) "
                "ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id",
                (job_id, job.owner, json.dumps(job.pages), job.pages_spec, job.password, job.callback_url,
                 job.filename, len(document), now, now, json.dumps(job.options) if job.options else None,
                 job.idempotency_key, job.request_sha256),
            )  # fmt: skip
            if not inserted:  # the same key, submitted concurrently on another replica, won (SQLite serialises)
                earlier = self._replay(tx, job)
                assert earlier is not None
                return earlier
            tx.run("INSERT INTO documents (job_id, data) VALUES (?, ?)", (job_id, document))
            values = ", ".join("(?, ?, 'todo', 0, ?, ?)" for _ in job.pages)
            params: list[Any] = []
            for number in job.pages:
                params += [job_id, number, job.owner, now]
            tx.run(f"INSERT INTO page_tasks (job_id, page, state, attempt, owner, created_at) VALUES {values}", params)
            tx.run("INSERT INTO owner_turns (owner, served_at) VALUES (?, 0) ON CONFLICT DO NOTHING", (job.owner,))
            if job.pages:
                self._announce_work(tx)
            record = self._get(tx, job_id)
            assert record is not None
            return record

        return await self._run_creating(insert)

    def _replay(self, tx: Tx, job: NewJob) -> JobRecord | None:
        """The job an earlier submission with the same owner and Idempotency-Key made, if any."""
        if job.idempotency_key is None:
            return None
        rows = tx.rows(
            "SELECT id, request_sha256 FROM jobs WHERE owner = ? AND idempotency_key = ?",
            (job.owner, job.idempotency_key),
        )
        if not rows:
            return None
        record = self._get(tx, rows[0]["id"])
        if record is None:  # expired, not swept yet: its key is free again
            tx.run("UPDATE jobs SET idempotency_key = NULL WHERE id = ?", (rows[0]["id"],))
            return None
        if rows[0]["request_sha256"] != job.request_sha256:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was already used for a different submission (another document, pages, "
                "password, options or callback_url); use a new key for a new job",
                job_id=record.id,
            )
        return replace(record, replayed=True)

    async def claim(self, worker: str, *, limit: int, lease_s: float) -> list[Lease]:
        def claim(tx: Tx) -> list[Lease]:
            now = self.clock()
            rows = self._claim(tx, worker, limit, now + lease_s)
            if not rows:
                return []
            self._mark_running(tx, rows[0]["job_id"], now)
            return sorted(Lease(row["job_id"], row["page"], worker, row["attempt"]) for row in rows)

        return await self._run(claim, default=[])

    async def renew(self, leases: Sequence[Lease], lease_s: float) -> set[int]:
        def renew(tx: Tx) -> set[int]:
            until = self.clock() + lease_s
            held: set[int] = set()
            for lease in leases:
                if tx.run(
                    "UPDATE page_tasks SET lease_until = ? "
                    "WHERE job_id = ? AND page = ? AND worker = ? AND attempt = ? AND state = 'leased'",
                    (until, lease.job_id, lease.page, lease.worker, lease.attempt),
                ):
                    held.add(lease.page)
            return held

        return await self._run(renew, default=set())

    async def complete(self, lease: Lease, page: FinishedPage) -> Completion:
        payload = dump_page(page)

        def complete(tx: Tx) -> Completion:
            if self._lock_job(tx, lease.job_id) is None:
                return Completion(False, False)
            if not tx.run(
                "UPDATE page_tasks SET state = 'done', lease_until = NULL "
                "WHERE job_id = ? AND page = ? AND worker = ? AND attempt = ? AND state = 'leased'",
                (lease.job_id, lease.page, lease.worker, lease.attempt),
            ):
                return Completion(False, False)  # fenced: not (any longer) ours, or the job ended
            now = self.clock()
            seq = tx.rows("SELECT COALESCE(MAX(seq), 0) + 1 AS seq FROM pages WHERE job_id = ?", (lease.job_id,))
            inserted = tx.run(
                "INSERT INTO pages (job_id, page, result, finished_at, seq) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (lease.job_id, lease.page, payload, now, seq[0]["seq"]),
            )
            tx.run(
                "UPDATE jobs SET result_bytes = result_bytes + ?, updated_at = ?, waiting = NULL, "
                "status = CASE WHEN status = 'queued' THEN 'running' ELSE status END, "
                "run_started_at = COALESCE(run_started_at, ?) WHERE id = ?",
                (len(payload) if inserted else 0, now, now, lease.job_id),
            )
            left = tx.rows(
                "SELECT COUNT(*) AS n FROM page_tasks WHERE job_id = ? AND state <> 'done'", (lease.job_id,)
            )[0]["n"]
            self._notify(tx, lease.job_id)
            return Completion(True, left == 0)

        return await self._run(complete, default=Completion(False, False))

    async def release(self, leases: Sequence[Lease]) -> None:
        def release(tx: Tx) -> None:
            released = 0
            for lease in leases:
                released += tx.run(
                    "UPDATE page_tasks SET state = 'todo', worker = NULL, lease_until = NULL "
                    "WHERE job_id = ? AND page = ? AND worker = ? AND attempt = ? AND state = 'leased'",
                    (lease.job_id, lease.page, lease.worker, lease.attempt),
                )
            if released:
                self._announce_work(tx)

        await self._run(release, default=None)

    def _terminate(self, tx: Tx, job_id: str, status: JobStatus, error: dict[str, Any] | None) -> bool:
        now = self.clock()
        changed = tx.run(
            "UPDATE jobs SET status = ?, error = ?, finished_at = ?, updated_at = ?, expires_at = ?, waiting = NULL, "
            "webhook = CASE WHEN callback_url IS NULL THEN NULL ELSE 'pending' END "
            "WHERE id = ? AND status IN ('queued', 'running')",
            (status, json.dumps(error) if error else None, now, now, now + self.ttl_s, job_id),
        )
        if changed:
            # Pages not stored yet are never run: their holders' renewals fail, and they abort them.
            tx.run("UPDATE page_tasks SET state = 'void' WHERE job_id = ? AND state IN ('todo', 'leased')", (job_id,))
            self._notify(tx, job_id)
        return changed == 1

    async def finish(self, job_id: str, status: JobStatus, error: dict[str, Any] | None = None) -> JobRecord | None:
        def update(tx: Tx) -> JobRecord | None:
            if not self._terminate(tx, job_id, status, error):
                return None
            return self._get(tx, job_id)

        return await self._run(update, default=None)

    async def cancel(self, job_id: str) -> tuple[JobRecord | None, bool]:
        def update(tx: Tx) -> tuple[JobRecord | None, bool]:
            changed = self._terminate(tx, job_id, "cancelled", None)
            return self._get(tx, job_id), changed

        return await self._run(update, default=(None, False))

    async def set_waiting(self, job_id: str, error: dict[str, Any]) -> None:
        waiting = json.dumps({**error, "since": self.clock()})

        def update(tx: Tx) -> None:
            tx.run("UPDATE jobs SET waiting = ? WHERE id = ? AND status IN ('queued', 'running')", (waiting, job_id))

        await self._run(update, default=None)

    async def set_webhook(self, job_id: str, state: WebhookState, attempts: int) -> None:
        def update(tx: Tx) -> None:
            tx.run("UPDATE jobs SET webhook = ?, webhook_attempts = ? WHERE id = ?", (state, attempts, job_id))

        await self._run(update, default=None)

    async def sweep(self) -> int:
        def delete(tx: Tx) -> int:
            deleted = tx.run("DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (self.clock(),))
            if deleted:
                # The turns of owners with no job left: without API keys an owner is a client address, so they
                # would pile up. A submission racing this (its job not committed yet) may lose its owner's row:
                # that owner counts as never served, winning ties, until its next submission writes the row again.
                tx.run(
                    "DELETE FROM owner_turns WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.owner = owner_turns.owner)"
                )
            return deleted

        return await self._run(delete, default=0)

    async def delete(self, job_id: str) -> bool:
        def delete(tx: Tx) -> bool:
            return tx.run("DELETE FROM jobs WHERE id = ?", (job_id,)) == 1

        return await self._run(delete, default=False)


def dump_page(page: FinishedPage) -> str:
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
