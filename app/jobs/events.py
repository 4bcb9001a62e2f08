"""A job's progress as the streaming API's events, readable from any replica and resumable.

`job_events` turns what the store holds into the events of `app/events.py`: `start` {total, pages}, then per
stored page `page` and `progress` {done, total}, and last `result` (succeeded, partial) or `error` (failed,
cancelled, gone). Pages come in the order they were stored (`JobStore.page_log`), which is the same on every
replica, so `progress.done` is a resume point anyone can honour: the SSE id of `start` is 0 and of each
`progress` its `done`; a client that reconnects with `Last-Event-ID: k` gets the pages after the k-th stored one.

A follower learns of new pages through `JobFeed`: in-process wake-ups (this replica's runner, or PostgreSQL
LISTEN/NOTIFY forwarded by the store) and, since a notification can be lost (another process on a SQLite
file, a dropped LISTEN connection), a poll every `poll_s` whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Protocol

import anyio

from app.background import cancel_and_wait
from app.errors import JobCancelled, JobNotFound, OCRError
from app.events import ErrorEvent, ErrorInfo, Event, PageEvent, ProgressEvent, ResultEvent, StartEvent
from app.jobs.store import JobRecord, JobStore
from app.results import DocumentResult, FinishedPage

log = logging.getLogger(__name__)

POLL_S = 1.0  # the fallback when no notification comes: a follower is never later than this


class Assemble(Protocol):
    def __call__(self, pages: list[FinishedPage], /) -> DocumentResult: ...


class JobFeed:
    """Wakes the followers of a job when something about it was stored (a page, its end)."""

    def __init__(self, poll_s: float = POLL_S) -> None:
        self.poll_s = poll_s
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._on_end: list[Callable[[str], None]] = []

    def notify(self, job_id: str) -> None:
        """Something changed for `job_id` (safe to call from the event loop's thread only)."""
        for waiter in self._waiters.get(job_id, ()):
            waiter.set()

    def ended(self, job_id: str) -> None:
        """The job ended here (finished or cancelled): wake its followers and whoever acts on ends (the outbox)."""
        self.notify(job_id)
        for callback in self._on_end:
            callback(job_id)

    def on_end(self, callback: Callable[[str], None]) -> None:
        self._on_end.append(callback)

    def subscribe(self, job_id: str) -> asyncio.Event:
        waiter = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(waiter)
        return waiter

    def unsubscribe(self, job_id: str, waiter: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[job_id]

    async def wait(self, waiter: asyncio.Event) -> None:
        """Until `waiter` is notified, or `poll_s` passed (whichever comes first); then re-armed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.poll_s):
                await waiter.wait()
        waiter.clear()

    @property
    def followers(self) -> int:
        return sum(len(waiters) for waiters in self._waiters.values())


async def job_events(
    store: JobStore,
    feed: JobFeed,
    assemble: Assemble,
    record: JobRecord,
    *,
    after: int | None = None,
) -> AsyncGenerator[Event, None]:
    """The job's events from the `after`-th stored page on (None: from `start`), until its final event."""
    job_id, total = record.id, record.pages_total
    waiter = feed.subscribe(job_id)  # before the first read: a page stored meanwhile wakes us
    try:
        if after is None:
            yield StartEvent(total=total, pages=record.pages)
        seen = after or 0
        while True:
            for page in await store.page_log(job_id, after=seen):
                seen += 1
                yield PageEvent(page=page.result, blocks=page.blocks)
                yield ProgressEvent(done=seen, total=total)
            current = await store.get(job_id)
            if current is None:
                gone = JobNotFound(f"job {job_id} was deleted or expired", job_id=job_id)
                yield ErrorEvent(error=ErrorInfo.of(gone))
                return
            if current.finished:
                # The end is stored after the job's last page: read once more for pages stored just before it.
                for page in await store.page_log(job_id, after=seen):
                    seen += 1
                    yield PageEvent(page=page.result, blocks=page.blocks)
                    yield ProgressEvent(done=seen, total=total)
                yield await _final(store, assemble, current)
                return
            await feed.wait(waiter)
    finally:
        feed.unsubscribe(job_id, waiter)


async def _final(store: JobStore, assemble: Assemble, record: JobRecord) -> Event:
    if record.status == "cancelled":
        cancelled = JobCancelled(
            f"job {record.id} was cancelled after {record.pages_done} of {record.pages_total} pages",
            pages_done=record.pages_done,
            pages_total=record.pages_total,
        )
        return ErrorEvent(error=ErrorInfo.of(cancelled))
    if record.status == "failed":
        error = record.error or {"code": "internal_error", "message": f"job {record.id} failed"}
        return ErrorEvent(error=ErrorInfo.model_validate(error))
    try:
        # Assembled off the event loop, as GET /api/jobs/{id}/result does.
        result = await anyio.to_thread.run_sync(assemble, await store.pages(record.id))
    except OCRError as exc:  # settings changed since it finished (say, a lower MAX_FAILED_PAGE_RATIO)
        return ErrorEvent(error=ErrorInfo.of(exc))
    return ResultEvent(result=result)


class NotifyListener:
    """Forwards PostgreSQL notifications to their handlers: a channel's payload to the handler named for it.

    The app wires two: job ids to its `JobFeed` (followers), and "pages became claimable" to its runner. One
    connection of its own (LISTEN needs it to stay open); when it drops it is opened again after a second, and
    meanwhile followers and runners fall back on their polls.
    """

    def __init__(self, conninfo: str, handlers: Mapping[str, Callable[[str], None]]) -> None:
        self.conninfo = conninfo
        self.handlers = dict(handlers)
        self.listening = asyncio.Event()  # set while LISTEN is in place (tests, readiness)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="jobs-listen")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _loop(self) -> None:
        import psycopg  # only with PostgreSQL

        lost = False  # said once per outage, not at every retry
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, connect_timeout=5
                ) as conn:
                    for channel in self.handlers:
                        await conn.execute(f"LISTEN {channel}")
                    self.listening.set()
                    if lost:
                        log.info("job events: listening again")
                        lost = False
                    async for notification in conn.notifies():
                        handler = self.handlers.get(notification.channel)
                        if handler is not None:
                            handler(notification.payload)
            except Exception as exc:  # the database went away: poll meanwhile, listen again soon
                if not lost:
                    log.warning("job events: LISTEN connection lost (%s); polling until it is back", exc)
                lost = True
            self.listening.clear()
            await asyncio.sleep(1.0)


def event_id(event: Event) -> int | None:
    """The SSE id of an event: 0 for `start`, `done` for `progress` (the stored pages seen), none for the rest."""
    if isinstance(event, StartEvent):
        return 0
    if isinstance(event, ProgressEvent):
        return event.done
    return None
