"""The job runner: claims pages from the store and runs them through `OCRService`; one runner, both stores.

The unit of work is the page. Every process (every replica on PostgreSQL, every process on one SQLite
file) runs a runner: it claims up to JOBS_CLAIM_BATCH pages of one job at a time, up to JOBS_CONCURRENCY
batches at once, preferring owners it has nothing running for, so one client's backlog cannot hold every
slot. A batch is admitted and rendered here through the service's own entry points (`admit`,
`iter_pages`), counting only its own pages against the limits. Each claimed page is leased; the lease is
renewed every second while the page is in flight, and each finished page is stored in its own fenced
transaction: a result counts only from the page's current holder. A process killed with kill -9 stops
renewing, and its pages are claimed again by any runner once JOB_LEASE_S passed; a graceful stop gives
them back at once.

A cancel accepted by any process voids the job's open pages: renewals of those pages fail everywhere
within a second, and their holders abort them at the engine; pages not claimed yet are never sent. The
worker that stores a job's last page assembles the result and ends the job (and any runner ends a job
whose pages are all stored but whose finisher died).

Admission limits were checked when the job was submitted; a refusal here (rate, per-client pages, queue
bound, engine not ready or unreachable) only makes the batch wait (its leases still renewed) and retry.
When the store is unreachable, finished pages are kept in memory and written once it is back.

Webhooks are not sent from here: every process's `Outbox` delivers them from the database
(`app/jobs/outbox.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio

from app.errors import OCRError, Retryable, ServiceUnavailable, StoreUnavailable
from app.jobs.events import JobFeed
from app.jobs.store import Completion, JobRecord, JobStatus, JobStore, Lease, open_store
from app.logs import request_id
from app.results import FinishedPage, ReadOptions
from app.service import OCRService
from app.settings import Settings

log = logging.getLogger(__name__)

# Submits (any replica's, on PostgreSQL), cancels and finished batches wake the loop at once; the poll catches
# expired leases (a dead process's pages).
POLL_S = 1.0
RENEW_S = 1.0  # lease renewal (and cancel detection) period while pages are in flight
ORPHAN_CHECK_S = 5.0
SWEEP_INTERVAL_S = 60.0
_FIRST_RETRY_S = 0.1
_STORE_RETRY_S = 0.5
_DOCUMENTS_KEPT = 2  # documents kept between batches: a long job is read from the store once, not per batch
_INTERNAL_ERROR = {"code": "internal_error", "message": "internal error while running the job; it was logged"}


def worker_id() -> str:
    """Unique per runner instance: host, process and a random part (a restarted process is a new worker)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobRunner:
    def __init__(
        self,
        service: OCRService,
        store: JobStore,
        *,
        concurrency: int,
        batch: int = 8,
        lease_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        worker: str | None = None,
    ) -> None:
        self.service = service
        self.store = store
        self.concurrency = concurrency
        self.batch = batch
        self.lease_s = lease_s
        self.clock = clock
        self.worker = worker if worker is not None else worker_id()
        self._wake = asyncio.Event()
        self.feed = JobFeed()  # wakes GET /api/jobs/{id}/events followers on this replica at once
        self._batches: dict[asyncio.Task[None], str] = {}  # task -> job id
        self._background: list[asyncio.Task[None]] = []
        self._stopping = False
        self._dead: str | None = None  # why a background loop ended, once one has
        self._store_down: str | None = None  # the last store failure seen by the loop, until a call succeeds
        self._documents: dict[str, bytes] = {}  # a few recent jobs' documents (`_document`)
        self.pages_kept = 0  # finished pages held in memory because the store could not take them (yet)

    @classmethod
    def from_settings(cls, settings: Settings, service: OCRService) -> JobRunner:
        return cls(
            service,
            open_store(settings),
            concurrency=settings.jobs_concurrency,
            batch=settings.jobs_claim_batch,
            lease_s=settings.job_lease_s,
        )

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.open()
        self._background = [
            asyncio.create_task(self._loop(), name="jobs-loop"),
            asyncio.create_task(self._sweep_loop(), name="jobs-sweep"),
        ]
        for task in self._background:
            task.add_done_callback(self._supervise)

    def _supervise(self, task: asyncio.Task[None]) -> None:
        """The loops never end on their own: one that did is a bug, and jobs stop moving. Say so (/ready, log)."""
        if self._stopping:
            return
        if task.cancelled():
            why = "it was cancelled"
        elif (exc := task.exception()) is not None:
            why = f"{type(exc).__name__}: {exc}"
        else:
            why = "it returned"
        self._dead = f"the job runner's {task.get_name()} loop stopped ({why}); restart the service"
        log.error("%s", self._dead, exc_info=None if task.cancelled() else task.exception())

    def check_alive(self) -> None:
        """Raise `ServiceUnavailable` once a background loop has died (readiness)."""
        if self._dead is not None:
            raise ServiceUnavailable(self._dead, retry_after=self.service.settings.retry_after_s)

    async def check_store(self) -> None:
        """Raise `StoreUnavailable` while the store's database cannot be reached (readiness)."""
        await self.store.ping()

    async def stop(self) -> None:
        """Stop: batches in flight give their unfinished pages back, for any runner to take at once."""
        self._stopping = True
        tasks = [*self._background, *self._batches]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.aclose()

    def notify(self) -> None:
        """A job was queued: look for work now rather than at the next poll."""
        self._wake.set()

    async def cancel(self, job_id: str) -> JobRecord | None:
        """Mark the job cancelled, then stop its pages here at once (other processes see it at their renewal)."""
        record, changed = await self.store.cancel(job_id)
        self.feed.ended(job_id)
        mine = [task for task, job in self._batches.items() if job == job_id]
        if changed and mine:
            for task in mine:
                task.cancel()
            await asyncio.wait(mine)
        return record

    # -- scheduling ----------------------------------------------------------------------

    async def _loop(self) -> None:
        last_orphan_check = 0.0
        while True:
            self._wake.clear()
            try:
                if time.monotonic() - last_orphan_check >= ORPHAN_CHECK_S:
                    last_orphan_check = time.monotonic()
                    for record in await self.store.unfinalized():
                        await self._finalize(record.id)
                while len(self._batches) < self.concurrency:
                    leases = await self.store.claim(self.worker, limit=self.batch, lease_s=self.lease_s)
                    if not leases:
                        break
                    await self._launch(leases)
                if self._store_down is not None:
                    log.info("job store reachable again")
                    self._store_down = None
            except StoreUnavailable as exc:  # the database is gone for now: keep running pages, retry at wake-up
                if self._store_down is None:
                    log.warning("job runner: %s", exc.message)
                self._store_down = exc.message
            except Exception:  # a store failure must not kill the runner: retry at the next wake-up
                log.exception("job runner: cannot claim pages")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._wake.wait()

    async def _launch(self, leases: list[Lease]) -> None:
        record = await self.store.get(leases[0].job_id)
        task = asyncio.create_task(self._batch(leases, record), name=f"job-{leases[0].job_id}")
        self._batches[task] = leases[0].job_id

        def done(_: asyncio.Task[None]) -> None:
            self._batches.pop(task, None)
            self._wake.set()

        task.add_done_callback(done)

    async def _sweep_loop(self) -> None:
        while True:
            try:
                if deleted := await self.store.sweep():
                    log.info("deleted %d expired job(s)", deleted)
            except Exception:
                log.exception("job runner: sweep failed")
            await asyncio.sleep(SWEEP_INTERVAL_S)

    # -- one batch of one job's pages ----------------------------------------------------------

    async def _batch(self, leases: list[Lease], record: JobRecord | None) -> None:
        held = {lease.page: lease for lease in leases}
        this = asyncio.current_task()
        assert this is not None
        renewer = asyncio.create_task(self._renew(held, this), name=f"renew-{leases[0].job_id}")
        try:
            if record is None or record.finished:
                return  # deleted or ended meanwhile: its pages are void
            request_id.set(f"job:{record.id}")  # the batch's log lines carry the job id
            await self._run(record, held)
        except Exception:
            log.exception("job %s failed unexpectedly", leases[0].job_id)
            await self._finish(leases[0].job_id, "failed", _INTERNAL_ERROR)
        finally:
            renewer.cancel()
            with contextlib.suppress(BaseException):
                await renewer
            if held:
                with contextlib.suppress(Exception):
                    await self.store.release(list(held.values()))  # unfinished: any runner may take them now

    async def _renew(self, held: dict[int, Lease], batch: asyncio.Task[None]) -> None:
        """Renew the batch's leases; a page no longer ours (job cancelled, lease taken over) aborts the batch."""
        while True:
            await asyncio.sleep(RENEW_S)
            if not held:
                continue
            leases = list(held.values())
            try:
                still = await self.store.renew(leases, self.lease_s)
            except StoreUnavailable:
                continue  # the pages keep running; their results are written when the store is back
            lost = [lease.page for lease in leases if lease.page not in still and lease.page in held]
            if lost:
                log.info("job %s: page(s) %s no longer leased here (cancelled or taken over): aborting",
                         leases[0].job_id, lost)  # fmt: skip
                for page in lost:
                    held.pop(page, None)
                batch.cancel()
                return

    async def _document(self, job_id: str) -> bytes | None:
        """The job's document, read once per job while its batches follow each other (not once per batch)."""
        data = self._documents.pop(job_id, None)
        if data is None:
            data = await self.store.document(job_id)
            if data is None:
                return None
        self._documents[job_id] = data  # most recent last
        while len(self._documents) > _DOCUMENTS_KEPT:
            self._documents.pop(next(iter(self._documents)))
        return data

    async def _run(self, record: JobRecord, held: dict[int, Lease]) -> None:
        data = await self._document(record.id)
        if data is None:  # deleted meanwhile
            return
        wait = _FIRST_RETRY_S
        waiting_on: str | None = None
        while held:
            try:
                await self._attempt(record, data, held)
                return
            except Retryable as exc:
                if isinstance(exc, StoreUnavailable):
                    raise
                wait = min(wait * 2, float(exc.retry_after))
                if exc.code != waiting_on:  # one line and one summary update per wait, not one per retry
                    waiting_on = exc.code
                    log.warning("job %s waits: %s (%s); retrying until it clears", record.id, exc.code, exc.message)
                    with contextlib.suppress(StoreUnavailable):
                        await self.store.set_waiting(record.id, {"code": exc.code, "message": exc.message})
                await asyncio.sleep(wait)
            except OCRError as exc:  # the document no longer passes (say, MAX_PAGES was lowered)
                await self._finish(record.id, "failed", exc.to_dict())
                return

    async def _attempt(self, record: JobRecord, data: bytes, held: dict[int, Lease]) -> None:
        """Admit the document for this batch's pages only, and run them; each page is stored as it finishes."""
        others = frozenset(record.pages) - frozenset(held)
        service = self.service
        # The job's pages were charged to the client's rate at submit time; only this batch's pages are held.
        async with service.admit(
            data, pages=record.pages_spec, password=record.password, client=record.owner, charge_rate=False,
            done=others, options=ReadOptions.from_dict(record.options),
        ) as admitted:  # fmt: skip
            pages = service.iter_pages(admitted, skip=others)
            try:
                async for page in pages:
                    lease = held.pop(page.page, None)
                    if lease is None:
                        continue
                    completion = await self._complete(lease, page)
                    self.feed.notify(record.id)
                    if completion.job_done:
                        await self._finalize(record.id)
            finally:
                await pages.aclose()

    async def _complete(self, lease: Lease, page: FinishedPage) -> Completion:
        """Store the page (fenced); while the store is unreachable, keep it and retry until it is back."""
        delay = _STORE_RETRY_S
        kept = False
        try:
            while True:
                try:
                    completion = await self.store.complete(lease, page)
                    break
                except StoreUnavailable as exc:
                    if not kept:  # one line per page, not one per retry
                        kept = True
                        self.pages_kept += 1
                        log.warning("job %s page %d finished; store unreachable (%s): keeping it until it is back",
                                    lease.job_id, lease.page, exc.message)  # fmt: skip
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            if kept:
                self.pages_kept -= 1
        if not completion.accepted:
            log.info("job %s page %d: result refused (no longer the lease holder, or the job ended)",
                     lease.job_id, lease.page)  # fmt: skip
        return completion

    async def _finalize(self, job_id: str) -> None:
        """Every page is stored: assemble the document and end the job (idempotent: one finish wins)."""
        try:
            result = await anyio.to_thread.run_sync(self.service.assemble, await self.store.pages(job_id))
        except OCRError as exc:
            await self._finish(job_id, "failed", exc.to_dict())
            return
        await self._finish(job_id, "succeeded" if result.status == "ok" else "partial")

    async def _finish(self, job_id: str, status: JobStatus, error: dict[str, Any] | None = None) -> None:
        record = await self.store.finish(job_id, status, error)
        self.feed.ended(job_id)
        if record is not None:
            log.info("job %s %s (%d/%d pages)", job_id, status, record.pages_done, record.pages_total)
