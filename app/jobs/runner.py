"""The job runner: takes queued jobs from the store and runs them through `OCRService`.

Up to JOBS_CONCURRENCY jobs run at once; the next job goes preferably to an
owner with nothing running, so one client's backlog cannot hold every slot.
Each finished page is stored in its own transaction before the next is
awaited, so after a crash a job resumes from its first unfinished page and no
finished page is computed again. Jobs found `running` at start-up belonged to a
process that died: they are queued again.

Admission limits were checked when the job was submitted; a refusal here
(rate, per-client pages, queue bound, engine not ready or unreachable) only
makes the job wait and try again, it never fails it. A graceful stop leaves
running jobs `running` in the store, to be resumed by the next process.

Only the process holding the store's worker lock runs jobs; another process on
the same JOBS_DB serves the API and takes over within POLL_S once the holder is
gone. Webhooks are not sent from here: every process's `Outbox` delivers them
from the database (`app/jobs/outbox.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from app.errors import OCRError, Retryable, ServiceUnavailable
from app.jobs.events import JobFeed
from app.jobs.store import JobRecord, JobStatus, JobStore, SqliteJobStore
from app.logs import request_id
from app.results import ReadOptions
from app.service import OCRService
from app.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 2.0  # submits, cancels and finished jobs wake the loop at once; this catches other processes' work
SWEEP_INTERVAL_S = 60.0
_FIRST_RETRY_S = 0.1
_INTERNAL_ERROR = {"code": "internal_error", "message": "internal error while running the job; it was logged"}


class JobRunner:
    def __init__(
        self,
        service: OCRService,
        store: JobStore,
        *,
        concurrency: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.store = store
        self.concurrency = concurrency
        self.clock = clock
        self._wake = asyncio.Event()
        self.feed = JobFeed()  # wakes GET /api/jobs/{id}/events followers on this replica at once
        self._running: dict[str, asyncio.Task[None]] = {}
        self._owners: dict[str, str] = {}
        self._background: list[asyncio.Task[None]] = []
        self._worker = False
        self._stopping = False
        self._dead: str | None = None  # why a background loop ended, once one has

    @classmethod
    def from_settings(cls, settings: Settings, service: OCRService) -> JobRunner:
        store = SqliteJobStore(
            settings.jobs_db, ttl_s=settings.jobs_ttl_hours * 3600, max_bytes=settings.jobs_max_bytes
        )
        return cls(service, store, concurrency=settings.jobs_concurrency)

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self._claim()
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

    async def stop(self) -> None:
        """Stop without touching job states: running jobs resume in the next process."""
        self._stopping = True
        tasks = [*self._background, *self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.store.close()

    async def _claim(self) -> None:
        """Become the worker if no live process is; then resume what the previous worker left."""
        if self._worker or not self.store.claim_worker():
            return
        self._worker = True
        requeued = await self.store.requeue_running()
        if requeued:
            log.info("resuming %d job(s) left running by the previous process", requeued)

    def notify(self) -> None:
        """A job was queued: look for work now rather than at the next poll."""
        self._wake.set()

    async def cancel(self, job_id: str) -> JobRecord | None:
        """Mark the job cancelled, then stop its pages: those not started never reach the engine."""
        record, changed = await self.store.cancel(job_id)
        self.feed.ended(job_id)
        task = self._running.get(job_id)
        if changed and task is not None:
            task.cancel()
            await asyncio.wait({task})
        return record

    # -- scheduling ----------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._claim()
                while self._worker and len(self._running) < self.concurrency:
                    record = await self.store.next_queued(self._running.keys(), set(self._owners.values()))
                    if record is None:
                        break
                    self._launch(record)
            except Exception:  # a store failure must not kill the runner: retry at the next wake-up
                log.exception("job runner: cannot read queued jobs")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._wake.wait()

    def _launch(self, record: JobRecord) -> None:
        task = asyncio.create_task(self._run(record), name=f"job-{record.id}")
        self._running[record.id] = task
        self._owners[record.id] = record.owner

        def done(_: asyncio.Task[None]) -> None:
            self._running.pop(record.id, None)
            self._owners.pop(record.id, None)
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

    # -- one job -------------------------------------------------------------------------

    async def _run(self, record: JobRecord) -> None:
        try:
            await self._process(record)
        except Exception:
            log.exception("job %s failed unexpectedly", record.id)
            await self._finish(record.id, "failed", _INTERNAL_ERROR)

    async def _process(self, record: JobRecord) -> None:
        data = await self.store.document(record.id)
        if data is None:  # deleted meanwhile
            return
        wait = _FIRST_RETRY_S
        waiting_on: str | None = None
        while True:
            try:
                if not await self._attempt(record, data):
                    return
                break
            except Retryable as exc:
                wait = min(wait * 2, float(exc.retry_after))
                if exc.code != waiting_on:  # one line and one summary update per wait, not one per retry
                    waiting_on = exc.code
                    log.warning("job %s waits: %s (%s); retrying until it clears", record.id, exc.code, exc.message)
                    await self.store.set_waiting(record.id, {"code": exc.code, "message": exc.message})
                await asyncio.sleep(wait)
            except OCRError as exc:  # the document no longer passes (say, MAX_PAGES was lowered)
                await self._finish(record.id, "failed", exc.to_dict())
                return
        try:
            result = await anyio.to_thread.run_sync(self.service.assemble, await self.store.pages(record.id))
        except OCRError as exc:
            await self._finish(record.id, "failed", exc.to_dict())
            return
        await self._finish(record.id, "succeeded" if result.status == "ok" else "partial")

    async def _attempt(self, record: JobRecord, data: bytes) -> bool:
        """Admit the document and run its unfinished pages; False when the job was cancelled meanwhile."""
        done = frozenset(page.page for page in await self.store.pages(record.id))
        service = self.service
        # The job's pages were charged to the client's rate at submit time; its log lines carry the job id.
        request_id.set(f"job:{record.id}")
        async with service.admit(
            data,
            pages=record.pages_spec,
            password=record.password,
            client=record.owner,
            charge_rate=False,
            done=done,
            options=ReadOptions.from_dict(record.options),
        ) as admitted:
            if not await self.store.mark_running(record.id):
                return False
            pages = service.iter_pages(admitted, skip=done)
            try:
                async for page in pages:
                    if not await self.store.add_page(record.id, page):
                        return False  # cancelled through another process: drop the pages not started
                    self.feed.notify(record.id)
            finally:
                await pages.aclose()
        return True

    async def _finish(self, job_id: str, status: JobStatus, error: dict[str, Any] | None = None) -> None:
        record = await self.store.finish(job_id, status, error)
        self.feed.ended(job_id)
        if record is not None:
            log.info("job %s %s (%d/%d pages)", job_id, status, record.pages_done, record.pages_total)
